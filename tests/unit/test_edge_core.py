"""The edge core (proxy + policy as one sans-I/O machine): limits are exact under bursts.

Every test here feeds INVITEs to the core *before* sending anything or draining an event —
what one pass of the event loop does when the kernel hands it many datagrams at once — and
then checks what reached the core.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator

from sipguard.contract import (
    CallInfo,
    DecisionPending,
    Failed,
    InviteDecided,
    Verdict,
)
from sipguard.policy.pipeline import Pipeline
from sipguard.sip.message import Message
from tests.unit.dialog_helpers import PolicyHarness, cancel, in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, answer, invite

PER_CALLER_2 = "rules:\n  concurrency: {per_caller: 2}\n"


def burst(h: PolicyHarness, n: int, *, caller: str = "+12125550100",
          callees: list[str] | None = None, callers: list[str] | None = None) -> tuple[
    list[Message], list[Message]
]:
    """Feed ``n`` INVITEs in one go, then drain: (INVITEs at the core, finals to callers)."""
    for i in range(n):
        h.feed(invite(branch=f"z9hG4bK-b{i}", call_id=f"burst-{i}",
                      caller=callers[i] if callers else caller,
                      callee=callees[i] if callees else "+18005550199"))
    out = h._drain()
    at_core = [m for m in to(out, CORE) if m.method == "INVITE"]
    finals = [m for m in to(out, CALLER) if m.status is not None and m.status >= 200]
    return at_core, finals


def test_burst_from_one_caller_admits_exactly_the_limit() -> None:
    """Twenty INVITEs from one caller read in one pass: exactly per_caller reach the core."""
    h = PolicyHarness(PER_CALLER_2)
    at_core, finals = burst(h, 20)
    assert len(at_core) == 2
    assert [m.status for m in finals] == [403] * 18
    assert h.count("caller", "+12125550100") == 2


def test_burst_to_one_callee_from_many_callers_admits_exactly_the_limit() -> None:
    """Twenty callers to one called number in one pass: exactly per_callee reach the core."""
    h = PolicyHarness("rules:\n  concurrency: {per_callee: 2}\n")
    callers = [f"+1212555{i:04d}" for i in range(20)]
    at_core, finals = burst(h, 20, callers=callers)
    assert len(at_core) == 2
    assert {m.status for m in finals} == {486} and len(finals) == 18


def test_burst_rate_limit_admits_the_burst_size() -> None:
    """A per-caller rate of 1/s with burst 3: a back-to-back burst of 10 lets 3 through."""
    h = PolicyHarness("rules:\n  rate: {per_caller: {rate: 1, burst: 3}}\n")
    at_core, finals = burst(h, 10)
    assert len(at_core) == 3
    assert {m.status for m in finals} == {503} and len(finals) == 7


def test_burst_dialer_distinct_callees_blocks_at_the_threshold() -> None:
    """Dialer analytics count a burst call by call: the caller is blocked at the threshold."""
    h = PolicyHarness(
        "rules:\n  dialer: {window_s: 60, distinct_callees: {tag: 5, block: 5}}\n"
    )
    callees = [f"+1800555{i:04d}" for i in range(12)]
    at_core, finals = burst(h, 12, callees=callees)
    assert 4 <= len(at_core) <= 5
    assert len(finals) == 12 - len(at_core)


def test_a_later_rule_that_rejects_gives_the_slot_back() -> None:
    """Concurrency admits and takes a slot, then rate rejects: the slot is free again at once."""
    h = PolicyHarness(
        "rules:\n  concurrency: {per_caller: 2}\n  rate: {per_caller: {rate: 1, burst: 1}}\n"
    )
    at_core, finals = burst(h, 5)
    assert len(at_core) == 1
    assert [m.status for m in finals] == [503] * 4
    assert h.count("caller", "+12125550100") == 1
    stats = h.tracker.stats()
    assert stats["unmatched_ends"] == 0 and stats["underflows"] == 0


def test_counts_equal_live_dialogs_after_rejected_burst_and_hangups() -> None:
    """After a rejected burst and the admitted calls' failures, every count is back at zero."""
    h = PolicyHarness(PER_CALLER_2)
    at_core, _ = burst(h, 20)
    for req in at_core:
        h.answer(req, 486, "Busy Here")
    assert h.count("caller", "+12125550100") == 0
    assert not h.tracker.sync or not h.tracker.sync.snapshot_now()


class AsyncRule:
    """A rule whose every answer needs I/O (like an uncached certificate fetch)."""

    name = "slow"
    mode = "enforce"

    def decide(self, call: CallInfo, now: float) -> Awaitable[Verdict | None]:
        return _NoObjection()


class _NoObjection:
    """An awaitable that answers "no objection" (None) without suspending."""

    def __await__(self) -> Generator[None, None, Verdict | None]:
        return None
        yield


def _with_async_rule(h: PolicyHarness) -> None:
    p = h.policy
    p.default = Pipeline([*p.default.rules, AsyncRule()])


def _pending(events: list[object]) -> list[DecisionPending]:
    return [e for e in events if isinstance(e, DecisionPending)]


def test_slots_taken_before_an_awaited_step_stay_taken() -> None:
    """Two calls waiting for I/O hold their slots: a third in the same pass is rejected."""
    h = PolicyHarness(PER_CALLER_2)
    _with_async_rule(h)
    at_core, finals = burst(h, 3)
    pending = _pending(h.events)
    assert len(pending) == 2 and at_core == []
    assert [m.status for m in finals] == [403]
    assert h.count("caller", "+12125550100") == 2
    # The first resolves (accepted, forwarded), the second is cancelled while it waits.
    h.core.resolve(pending[0].call, Verdict("accept"), h.now)
    assert len([m for m in to(h._drain(), CORE) if m.method == "INVITE"]) == 1
    h.send(cancel(call_id="burst-1", branch="z9hG4bK-b1"))
    assert h.count("caller", "+12125550100") == 1
    # The late verdict for the cancelled call changes nothing.
    h.core.resolve(pending[1].call, Verdict("accept"), h.now)
    assert [m for m in to(h._drain(), CORE) if m.method == "INVITE"] == []
    assert h.count("caller", "+12125550100") == 1
    for e in pending:  # resolved by hand above: the shell would have awaited them
        close = getattr(e.pending, "close", None)
        if close is not None:
            close()


def test_merged_request_with_a_live_calls_dialog_id_gets_482() -> None:
    """A second INVITE with a live call's Call-ID and From tag on a new branch is a merged
    request (RFC 3261 §8.2.2.2): 482, no second slot, no second dialog."""
    h = PolicyHarness(PER_CALLER_2)
    h.feed(invite(branch="z9hG4bK-m1", call_id="same"))
    h.feed(invite(branch="z9hG4bK-m2", call_id="same"))
    out = h._drain()
    assert len([m for m in to(out, CORE) if m.method == "INVITE"]) == 1
    assert [m.status for m in to(out, CALLER) if m.status and m.status >= 200] == [482]
    assert h.count("caller", "+12125550100") == 1
    assert len(h.proxy.dialogs) == 1


class RaisingRule:
    """A rule with a bug: it raises for one caller."""

    name = "buggy"
    mode = "enforce"

    def decide(self, call: CallInfo, now: float) -> Verdict | None:
        if call.caller == "+19995550000":
            raise RuntimeError("rule bug")
        return None


def test_a_rule_that_raises_costs_exactly_that_invite() -> None:
    """Fault injection: the INVITE whose rule raises hears 500; the OPTIONS before it and the
    INVITEs after it in the same pass are answered and forwarded; its slot is given back."""
    h = PolicyHarness(PER_CALLER_2)
    p = h.policy
    p.default = Pipeline([*p.default.rules, RaisingRule()])
    options = (
        b"OPTIONS sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-o\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:ping@198.51.100.7>;tag=o1\r\nTo: <sip:192.0.2.1>\r\n"
        b"Call-ID: opt-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    h.feed(options)
    h.feed(invite(branch="z9hG4bK-x", call_id="bad", caller="+19995550000"))
    h.feed(invite(branch="z9hG4bK-y", call_id="good"))
    out = h._drain()
    statuses = [(m.call_id, m.status) for m in to(out, CALLER) if m.status and m.status >= 200]
    assert ("opt-1", 200) in statuses and ("bad", 500) in statuses
    assert [m.call_id for m in to(out, CORE) if m.method == "INVITE"] == ["good"]
    assert [e.where for e in h.events if isinstance(e, Failed)] == ["decide"]
    assert h.count("caller", "+19995550000") == 0
    decided = [e.verdict.reason for e in h.events if isinstance(e, InviteDecided)]
    assert "decision_failed" in decided


def test_overloaded_sheds_new_calls_statelessly_and_lets_calls_up_go_on() -> None:
    """While overloaded, a new INVITE gets one 503 + Retry-After and leaves nothing behind (no
    transaction, no 100, no timer); its retransmission is answered again, the same way; a call
    already up still gets its BYE through; once the load is gone the same call is proxied."""
    h = PolicyHarness()
    h.feed(invite(branch="z9hG4bK-up", call_id="up", caller="+12125550100"))
    out = h._drain()
    up = [m for m in to(out, CORE) if m.method == "INVITE"]
    assert len(up) == 1
    h.core.overloaded = True
    servers, timers = len(h.proxy.servers), len(h.proxy.timers)
    shed = invite(branch="z9hG4bK-shed", call_id="shed", caller="+12125550101")
    answers = []
    for _ in range(2):  # the INVITE and its retransmission
        h.feed(shed)
        out = h._drain()
        assert not [m for m in to(out, CORE)], "nothing reaches the core"
        answers += [m for m in to(out, CALLER)]
    assert [m.status for m in answers] == [503, 503]
    assert all(m.get("retry-after") == "5" for m in answers)
    assert answers[0].to_tag and answers[0].to_tag == answers[1].to_tag
    assert (len(h.proxy.servers), len(h.proxy.timers)) == (servers, timers)
    # The call that was up goes on: the core's 200 reaches the caller, the caller's ACK and
    # BYE reach the core.
    h.feed(answer(up[0], 200, "OK"), src=CORE)
    assert [m.status for m in to(h._drain(), CALLER)] == [200]
    h.feed(in_dialog("ACK", call_id="up", cseq=1, branch="z9hG4bK-upack"))
    h.feed(in_dialog("BYE", call_id="up", cseq=2, branch="z9hG4bK-upbye"))
    assert [m.method for m in to(h._drain(), CORE)] == ["ACK", "BYE"]
    h.core.overloaded = False
    h.feed(shed)
    assert [m.method for m in to(h._drain(), CORE)] == ["INVITE"]
