"""The rule pipeline: runs rules in order over an initial INVITE and returns one verdict.

Each rule is an object with a ``name``, a ``mode`` (``enforce`` or ``monitor``) and
``decide(call, now) -> Verdict | None`` (None: no objection). The first rule that rejects or
drops in enforce mode decides; a rule in monitor mode is evaluated and reported the same way,
but the call goes on (the final verdict is an accept marked ``monitored``, naming the first
monitored rule that objected; the others that objected ride along in its ``also``, as they do
on a refusal by a later rule in enforce mode, so each is counted and logged). Headers that rules want on the forwarded INVITE
(``forward_headers`` to append, ``replace_headers`` to replace or strip) are collected from every
rule that ran, rejecting ones included, so a monitored rule's findings reach the core; so is
the first ``anonymise`` (rule ``national_cli``), which the proxy applies after every edit. With
no rules, every call is accepted.

A rule whose answer needs I/O (a certificate fetch) returns an awaitable instead of a
verdict; the pipeline then returns an awaitable too, which resumes with the remaining rules.
Rules that answer at once never pay for that.

With a shared state store (``state.backend: redis``, :mod:`sipguard.transport.redis_state`;
``shared_memory``, :mod:`sipguard.state.shared_memory`) the rules that count across instances
(``concurrency``, ``rate``, part of ``dialer``) do not decide on their own: their
``plan(call, now, plan)`` adds their checks to one :class:`Plan` for the call, and after the
last rule the pipeline sends the whole plan to the store in one step — one round trip to
Redis (awaited), or one locked call into shared memory (``admit_now``: decided at once, no
coroutine) — then folds each refusal back through the rule that asked (``refused(info,
value)``), in rule order. While the store cannot answer, ``state.fail`` decides: ``open`` forwards the call tagged ``X-Sipguard-Verdict:
state.unavailable`` (reported like a monitored rule, ``state:state_unavailable``), ``closed``
answers ``503`` with Retry-After.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

from sipguard.contract import ACCEPT, Anonymise, CallInfo, Verdict
from sipguard.state.base import Check, SharedCounts

Decision = Verdict | None | Awaitable[Verdict | None]
MEASURES: Final = ("h", "n")  # check kinds that report a count and never refuse


class Rule(Protocol):
    name: str
    mode: str  # "enforce" | "monitor"

    def decide(self, call: CallInfo, now: float) -> Decision: ...


class Plan:
    """What one INVITE asks of the shared store: checks in rule order, who asked each, and the
    counters the call's lease goes on."""

    __slots__ = ("checks", "owners", "take", "settlers")

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.owners: list[tuple[Any, Any]] = []  # (rule, what it needs to word a refusal)
        self.take: tuple[str, ...] = ()
        # rules whose verdict waits for their measures: (rule, what it found meanwhile)
        self.settlers: list[tuple[Any, Any]] = []

    def add(self, check: Check, rule: Any, info: Any) -> None:
        self.checks.append(check)
        self.owners.append((rule, info))

    def later(self, rule: Any, found: Any) -> None:
        """``rule`` gives its verdict in ``rule.settle(call, found, measured, now)`` once the
        shared store answered (``measured``: its measures' (info, value))."""
        self.settlers.append((rule, found))

    def pending(self) -> bool:
        return bool(self.checks or self.take or self.settlers)


class _StateRule:
    """Stands for the shared store in a verdict when it cannot answer."""

    __slots__ = ("name", "mode")

    def __init__(self, mode: str) -> None:
        self.name = "state"
        self.mode = mode

    def decide(self, call: CallInfo, now: float) -> Decision:
        return None  # never in a pipeline's rules


def unavailable_verdict(retry_after_s: int) -> Verdict:
    headers = (f"Retry-After: {retry_after_s}",) if retry_after_s else ()
    return Verdict("reject", rule="state", reason="state_unavailable", status=503,
                   phrase="Service Unavailable", headers=headers,
                   forward_headers=("X-Sipguard-Verdict: state.unavailable",),
                   sample="state:unavailable")


class Shared:
    """A pipeline's link to the shared store: the store, what to do while it cannot answer,
    and how to give a lease back (the concurrency tracker's)."""

    __slots__ = ("store", "rule", "verdict", "hold", "give_back")

    def __init__(self, store: SharedCounts, retry_after_s: int,
                 hold: Callable[[CallInfo, tuple[str, ...]], None],
                 give_back: Callable[[CallInfo], Awaitable[None] | None]) -> None:
        self.store = store
        self.rule = _StateRule("monitor" if store.fail_open else "enforce")
        self.verdict = unavailable_verdict(retry_after_s)
        self.hold = hold  # record a lease this process holds (call.held set)
        self.give_back = give_back  # release a held call's lease


class _Run:
    """The state of one evaluation: what monitored rules said, headers to add."""

    __slots__ = ("monitored", "forward", "replace", "anonymise")

    def __init__(self) -> None:
        self.monitored: list[Verdict] = []  # every rule in monitor mode that would refuse
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
            # one per rule: a rule counting in the shared store may report two limits over
            if all(m.rule != verdict.rule for m in self.monitored):
                self.monitored.append(verdict)
            return None
        if self.monitored:  # rules in monitor mode objected before this one refused
            return verdict.with_also(tuple(self.monitored))
        return verdict

    def result(self) -> Verdict:
        replace = tuple(self.replace.items())
        if self.monitored:
            m = self.monitored[0]
            return Verdict("accept", rule=m.rule, reason=m.reason, status=m.status,
                           phrase=m.phrase, forward_headers=tuple(self.forward),
                           replace_headers=replace, monitored=True, detail=m.detail,
                           sample=m.sample, anonymise=self.anonymise,
                           also=tuple(self.monitored[1:]))
        if self.forward or replace or self.anonymise is not None:
            return Verdict("accept", forward_headers=tuple(self.forward), replace_headers=replace,
                           anonymise=self.anonymise)
        return ACCEPT


class Pipeline:
    __slots__ = ("rules", "shared", "planners")

    def __init__(self, rules: Sequence[Rule] = (), shared: Shared | None = None) -> None:
        self.rules = tuple(rules)
        self.shared = shared
        # per rule: its plan() when it counts in the shared store, else None
        self.planners: tuple[Callable[[CallInfo, float, Plan], Verdict | None] | None, ...] = (
            tuple(getattr(r, "plan", None) if shared is not None else None for r in self.rules)
        )

    def decide(self, call: CallInfo, now: float, monitored: tuple[Verdict, ...] = ()) -> \
            Verdict | Awaitable[Verdict]:
        """The call's verdict; ``monitored``: refusals already made in monitor mode (the
        policy's own: an unknown source, a suspended number), reported first."""
        run = _Run()
        if monitored:
            run.monitored.extend(monitored)
        plan = Plan() if self.shared is not None else None
        planners = self.planners
        for i, rule in enumerate(self.rules):
            answer = self._ask(rule, planners[i], call, now, plan)
            if answer is not None and not isinstance(answer, Verdict):  # awaitable: I/O
                return self._resume(run, i, answer, call, now, plan)
            final = run.take(rule, answer)
            if final is not None:
                return final
        if plan is not None and plan.pending():
            return self._admit(run, plan, call, now)
        return run.result()

    async def _resume(
        self, run: _Run, i: int, pending: Awaitable[Verdict | None], call: CallInfo, now: float,
        plan: Plan | None,
    ) -> Verdict:
        final = run.take(self.rules[i], await pending)
        if final is not None:
            return final
        for j in range(i + 1, len(self.rules)):
            rule = self.rules[j]
            answer = self._ask(rule, self.planners[j], call, now, plan)
            if inspect.isawaitable(answer):
                answer = await answer
            final = run.take(rule, answer)
            if final is not None:
                return final
        if plan is not None and plan.pending():
            answer = self._admit(run, plan, call, now)
            return answer if isinstance(answer, Verdict) else await answer
        return run.result()

    @staticmethod
    def _ask(
        rule: Rule, planner: Callable[[CallInfo, float, Plan], Verdict | None] | None,
        call: CallInfo, now: float, plan: Plan | None,
    ) -> Decision:
        """One rule's answer: its plan() into the shared plan when it has one, else decide()."""
        if planner is not None and plan is not None:
            return planner(call, now, plan)
        return rule.decide(call, now)

    def _admit(self, run: _Run, plan: Plan, call: CallInfo, now: float) -> \
            Verdict | Awaitable[Verdict]:
        """The plan's one step in the shared store, its refusals folded back through their
        rules: at once with a store in this host's memory (``admit_now``: no coroutine, no
        second pass of the event loop), else one awaited round trip."""
        shared = self.shared
        assert shared is not None
        now_admit = getattr(shared.store, "admit_now", None)
        if now_admit is None:
            return self._admit_remote(run, plan, call, now)
        result = now_admit(call.lease, plan.checks, plan.take) if plan.checks or plan.take \
            else None
        final, later, marks = self._fold(run, plan, call, now, result)
        if later is None and not marks:
            return final
        return self._finish(final, later, marks)

    async def _finish(self, final: Verdict, later: Awaitable[None] | None,
                      marks: list[tuple[str, int, float]]) -> Verdict:
        shared = self.shared
        assert shared is not None
        if later is not None:
            await later
        for mark in marks:
            await shared.store.mark(*mark)  # a cooldown every instance honours
        return final

    async def _admit_remote(self, run: _Run, plan: Plan, call: CallInfo, now: float) -> Verdict:
        shared = self.shared
        assert shared is not None
        result = None
        if plan.checks or plan.take:
            result = await shared.store.admit(call.lease, plan.checks, plan.take)
        final, later, marks = self._fold(run, plan, call, now, result)
        return await self._finish(final, later, marks)

    def _fold(
        self, run: _Run, plan: Plan, call: CallInfo, now: float, result: Any,
    ) -> tuple[Verdict, Awaitable[None] | None, list[tuple[str, int, float]]]:
        """The verdict from the store's answer (``result``; None: it could not answer, when
        the plan asked), what to await first (a lease given back) and the cooldown marks to
        set."""
        shared = self.shared
        assert shared is not None
        store = shared.store
        later: Awaitable[None] | None = None
        marks: list[tuple[str, int, float]] = []
        if result is None and (plan.checks or plan.take):  # it cannot answer: state.fail
            if store.fail_open and plan.take:
                shared.hold(call, plan.take)  # counted when it is back (refresh)
                if call.settled:  # cancelled while the store was silent: give it back
                    later = shared.give_back(call)
            final = run.take(shared.rule, shared.verdict)
            if final is not None:
                return final, later, marks
        measured: dict[int, int] = {}
        if result is not None:
            taken, refused, value, reported = result
            if taken and plan.take:
                shared.hold(call, plan.take)
                if call.settled:  # cancelled while the store answered: give the slot back
                    later = shared.give_back(call)
            checks = plan.checks
            for index, rvalue in reported:
                rule, info = plan.owners[index]
                if checks[index][0] in MEASURES:
                    measured[index] = rvalue
                else:  # a rule in monitor mode over its limit
                    run.take(rule, rule.refused(info, rvalue, call, now))
            if refused >= 0:
                rule, info = plan.owners[refused]
                final = run.take(rule, rule.refused(info, value, call, now))
                if final is not None:
                    return final, later, marks
        for rule, found in plan.settlers:
            mine = [(plan.owners[i][1], v) for i, v in measured.items()
                    if plan.owners[i][0] is rule]
            verdict, mark = rule.settle(call, found, mine, now)
            if mark is not None and result is not None:
                marks.append(mark)
            final = run.take(rule, verdict)
            if final is not None:
                return final, later, marks
        return run.result(), later, marks
