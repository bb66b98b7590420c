"""The rule pipeline: runs rules in order over an initial INVITE and returns one verdict.

Each rule is an object with a ``name``, a ``mode`` (``enforce`` or ``monitor``) and a pure
``decide(call, now) -> Verdict | None`` (None: no objection). The first rule that rejects or
drops in enforce mode decides; a rule in monitor mode is evaluated and reported exactly the
same way, but the call goes on (the verdict comes back marked ``monitored``). With no rules,
every call is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sipguard.policy.verdict import ACCEPT, Verdict
from sipguard.proxy.events import CallInfo


class Rule(Protocol):
    name: str
    mode: str  # "enforce" | "monitor"

    def decide(self, call: CallInfo, now: float) -> Verdict | None: ...


class Pipeline:
    __slots__ = ("rules",)

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = tuple(rules)

    def decide(self, call: CallInfo, now: float) -> Verdict:
        monitored: Verdict | None = None
        forward: list[str] = []
        for rule in self.rules:
            verdict = rule.decide(call, now)
            if verdict is None:
                continue
            forward.extend(verdict.forward_headers)
            if verdict.action == "accept":
                continue
            if rule.mode == "monitor":
                monitored = monitored or verdict
                continue
            return verdict
        if monitored is not None:
            return Verdict(
                "accept",
                rule=monitored.rule,
                reason=monitored.reason,
                status=monitored.status,
                phrase=monitored.phrase,
                forward_headers=tuple(forward),
                monitored=True,
            )
        if forward:
            return Verdict("accept", forward_headers=tuple(forward))
        return ACCEPT
