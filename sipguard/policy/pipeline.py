"""The rule pipeline: runs rules in order over an initial INVITE and returns one verdict.

Each rule is an object with a ``name``, a ``mode`` (``enforce`` or ``monitor``) and
``decide(call, now) -> Verdict | None`` (None: no objection). The first rule that rejects or
drops in enforce mode decides; a rule in monitor mode is evaluated and reported the same way,
but the call goes on (the final verdict is an accept marked ``monitored``, naming the first
monitored rule that objected). Headers that rules want on the forwarded INVITE
(``forward_headers`` to append, ``replace_headers`` to replace or strip) are collected from every
rule that ran, rejecting ones included, so a monitored rule's findings reach the core; so is
the first ``anonymise`` (rule ``national_cli``), which the proxy applies after every edit. With
no rules, every call is accepted.

A rule whose answer needs I/O (a certificate fetch, a Redis round trip) returns an awaitable
instead of a verdict; the pipeline then returns an awaitable too, which resumes with the
remaining rules. Rules that answer at once never pay for that.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence
from typing import Protocol

from sipguard.contract import ACCEPT, Anonymise, CallInfo, Verdict

Decision = Verdict | None | Awaitable[Verdict | None]


class Rule(Protocol):
    name: str
    mode: str  # "enforce" | "monitor"

    def decide(self, call: CallInfo, now: float) -> Decision: ...


class _Run:
    """The state of one evaluation: what monitored rules said, headers to add."""

    __slots__ = ("monitored", "forward", "replace", "anonymise")

    def __init__(self) -> None:
        self.monitored: Verdict | None = None
        self.forward: list[str] = []
        self.replace: dict[str, str | None] = {}
        self.anonymise: Anonymise | None = None

    def take(self, rule: Rule, verdict: Verdict | None) -> Verdict | None:
        """Fold one rule's verdict in; return it when it ends the evaluation."""
        if verdict is None:
            return None
        self.forward.extend(verdict.forward_headers)
        if verdict.replace_headers:
            self.replace.update(verdict.replace_headers)
        if verdict.anonymise is not None:
            self.anonymise = self.anonymise or verdict.anonymise
        if verdict.action == "accept":
            return None
        if rule.mode == "monitor":
            self.monitored = self.monitored or verdict
            return None
        return verdict

    def result(self) -> Verdict:
        m = self.monitored
        replace = tuple(self.replace.items())
        if m is not None:
            return Verdict("accept", rule=m.rule, reason=m.reason, status=m.status,
                           phrase=m.phrase, forward_headers=tuple(self.forward),
                           replace_headers=replace, monitored=True, detail=m.detail,
                           sample=m.sample, anonymise=self.anonymise)
        if self.forward or replace or self.anonymise is not None:
            return Verdict("accept", forward_headers=tuple(self.forward), replace_headers=replace,
                           anonymise=self.anonymise)
        return ACCEPT


class Pipeline:
    __slots__ = ("rules",)

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = tuple(rules)

    def decide(self, call: CallInfo, now: float) -> Verdict | Awaitable[Verdict]:
        run = _Run()
        for i, rule in enumerate(self.rules):
            answer = rule.decide(call, now)
            if inspect.isawaitable(answer):
                return self._resume(run, i, answer, call, now)
            final = run.take(rule, answer)
            if final is not None:
                return final
        return run.result()

    async def _resume(
        self, run: _Run, i: int, pending: Awaitable[Verdict | None], call: CallInfo, now: float
    ) -> Verdict:
        final = run.take(self.rules[i], await pending)
        if final is not None:
            return final
        for rule in self.rules[i + 1 :]:
            answer = rule.decide(call, now)
            if inspect.isawaitable(answer):
                answer = await answer
            final = run.take(rule, answer)
            if final is not None:
                return final
        return run.result()
