"""Rule ``concurrency`` through the in-memory proxy: limits, answers, exact release, reloads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from sipguard.contract import CallInfo, Dialog, DialogStarted, Flow, Verdict
from sipguard.ops.config_load import parse_config
from sipguard.policy.concurrency import (
    Concurrency,
    Tracker,
    diversion_hops,
    lease_id,
)
from sipguard.policy.concurrency_settings import Settings
from sipguard.policy.pipeline import Pipeline
from sipguard.sip.parser import parse_message
from sipguard.state.memory import MemoryLeases
from tests.unit.dialog_helpers import PolicyHarness, cancel, in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, answer, invite

A = "+12125550100"
B = "+12125550101"
DID = "+18005550199"
DIV = "+13125550000"


def rules(body: str) -> str:
    return f"rules:\n  concurrency: {body}\n"


def statuses(msgs: Sequence[object]) -> list[int]:
    return [m.status for m in msgs]  # type: ignore[attr-defined]


def reason_of(h: PolicyHarness) -> str | None:
    return h.verdicts[-1].reason or None


# ------------------------------------------------------------------------------ config


def test_commented_example_in_the_config_file_is_valid_and_shows_the_defaults() -> None:
    """The concurrency example in config/sipguard.yaml parses once uncommented, and its
    answers are exactly the defaults."""
    text = (Path(__file__).resolve().parents[2] / "config" / "sipguard.yaml").read_text()
    block = text.split("# Example: live-call limits", 1)[1].split("#   concurrency:", 1)[1]
    lines = ["concurrency:"]
    for line in block.splitlines()[1:]:
        if not line.startswith("#   "):
            break
        lines.append(line[4:])
    body = "".join(f"  {line}\n" for line in lines)
    cfg = parse_config(f"listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\nrules:\n{body}")
    assert cfg.rules.concurrency is not None
    assert cfg.rules.concurrency.per_caller == 2
    assert cfg.rules.concurrency.answers == Settings().answers


# ------------------------------------------------------------------------------ limits


def test_per_caller_rejects_the_third_call_with_403_and_reason() -> None:
    """With per_caller 2, a caller's third live call gets 403 with a Reason naming the limit."""
    h = PolicyHarness(rules("{per_caller: 2}"))
    for n in (1, 2):
        got, fwd = h.call(n, callee=f"+1800555000{n}")
        assert fwd is not None and statuses(got) == [100]
    got, fwd = h.call(3, callee="+18005550003")
    assert fwd is None and statuses(got) == [100, 403]
    assert "per_caller" in (got[1].get("reason") or "")
    v = h.verdicts[-1]
    assert v.rule == "concurrency" and v.reason == "per_caller_exceeded"
    assert v.detail == {"limit": "per_caller", "number": A, "count": 2, "max": 2}
    assert h.call(4, caller=B, callee="+18005550004")[1] is not None  # another caller is fine
    assert h.count("caller", A) == 2 and h.count("caller", B) == 1


def test_per_callee_rejects_with_486() -> None:
    """With per_callee 1, a second live call to the same DID is answered 486 Busy Here."""
    h = PolicyHarness(rules("{per_callee: 1}"))
    assert h.call(1, caller=A, callee=DID)[1] is not None
    got, fwd = h.call(2, caller=B, callee=DID)
    assert fwd is None and statuses(got) == [100, 486]
    assert h.verdicts[-1].detail == {"limit": "per_callee", "number": DID, "count": 1, "max": 1}


def test_per_diverter_counts_diversion_and_history_info_together() -> None:
    """A number that forwards via Diversion and via History-Info fills one per_diverter count."""
    h = PolicyHarness(rules("{per_diverter: 2}"))
    diversion = f"Diversion: <sip:{DIV}@pbx.example.com>;reason=unconditional\r\n"
    history = (f"History-Info: <sip:{DIV}@pbx.example.com>;index=1, "
               f"<sip:{DID}@192.0.2.1;cause=302>;index=1.1\r\n")
    assert h.call(1, caller=A, extra=diversion)[1] is not None
    assert h.call(2, caller=B, extra=history)[1] is not None
    assert h.count("diverter", DIV) == 2
    got, fwd = h.call(3, caller="+12125550102", extra=history)
    assert fwd is None and statuses(got) == [100, 403]
    assert h.verdicts[-1].detail == {"limit": "per_diverter", "number": DIV, "count": 2, "max": 2}
    assert h.call(4, caller="+12125550103")[1] is not None  # not forwarded: not limited


def test_one_diverter_in_several_spellings_is_one_diverter() -> None:
    """With the peer's default_region, a diverter written +1312..., 1312... or 312... is
    one number for per_diverter, as callers and callees are."""
    peers = ("peers:\n  - name: carrier-a\n    networks: [198.51.100.0/24]\n"
             "    default_region: US\n")
    h = PolicyHarness(rules("{per_diverter: 1}"), extra_yaml=peers)
    spellings = (f"tel:{DIV}", "sip:13125550000@pbx.example.com", "sip:3125550000@pbx.example.com")
    assert h.call(1, caller=A, extra=f"Diversion: <{spellings[0]}>\r\n")[1] is not None
    for n, spelling in enumerate(spellings[1:], start=2):
        got, fwd = h.call(n, caller=f"+1212555020{n}", extra=f"Diversion: <{spelling}>\r\n")
        assert fwd is None and statuses(got) == [100, 403], spelling
    assert h.count("diverter", DIV) == 1


@pytest.mark.parametrize(
    ("extra", "hops"),
    [
        ("", 0),
        ("Diversion: <sip:+13125550001@a.example>\r\n", 1),
        ("Diversion: <sip:+13125550001@a.example>, <sip:+13125550002@b.example>\r\n", 2),
        ("Diversion: <sip:+13125550001@a.example>;counter=3\r\n", 3),
        # RFC 5806 allows two digits: more count as many, never as one; 0 or junk as one
        ("Diversion: <sip:+13125550001@a.example>;counter=100\r\n", 100),
        ("Diversion: <sip:+13125550001@a.example>;counter=" + "9" * 5000 + "\r\n", 999),
        ("Diversion: <sip:+13125550001@a.example>;counter=0\r\n", 1),
        ("Diversion: <sip:+13125550001@a.example>;counter=0100\r\n", 100),
        ("Diversion: <sip:+13125550001@a.example>;counter=x\r\n", 1),
        ("History-Info: <sip:+13125550001@a.example>;index=1, "
         "<sip:+13125550002@b.example;cause=302>;index=1.1, "
         "<sip:+18005550199@c.example;cause=486>;index=1.1.1\r\n", 2),
    ],
)
def test_diversion_hops_counts_forwardings(extra: str, hops: int) -> None:
    """Diversion entries count their counter (default 1); History-Info counts diverting entries."""
    assert diversion_hops(parse_message(invite(extra=extra))) == hops


def test_max_diversions_rejects_a_longer_forwarding_chain() -> None:
    """With max_diversions 1, a call forwarded twice is rejected 403, once is accepted."""
    h = PolicyHarness(rules("{max_diversions: 1}"))
    once = "Diversion: <sip:+13125550001@a.example>\r\n"
    twice = "Diversion: <sip:+13125550001@a.example>, <sip:+13125550002@b.example>\r\n"
    assert h.call(1, extra=once)[1] is not None
    got, fwd = h.call(2, extra=twice)
    assert fwd is None and statuses(got) == [100, 403]
    assert "max_diversions" in (got[1].get("reason") or "")
    assert h.verdicts[-1].detail == {
        "limit": "max_diversions", "number": "+13125550001", "count": 2, "max": 1,
    }


def test_per_peer_answers_503_with_retry_after_and_counts_unpeered_traffic_as_one() -> None:
    """With no peers configured, per_peer caps all live calls; the answer is 503 + Retry-After."""
    h = PolicyHarness(rules("{per_peer: 2}"))
    assert h.call(1, caller=A)[1] is not None and h.call(2, caller=B)[1] is not None
    got, fwd = h.call(3, caller="+12125550102")
    assert fwd is None and statuses(got) == [100, 503]
    assert got[1].get("retry-after") == "5"
    assert h.count("peer", "-") == 2


def test_answers_are_configurable() -> None:
    """answers.per_caller replaces the status, phrase and headers of the reject."""
    h = PolicyHarness(rules(
        "{per_caller: 1, answers: {per_caller: {status: 603, phrase: Decline, "
        "headers: ['X-Why: trunking']}}}"
    ))
    h.call(1)
    got, _ = h.call(2)
    assert statuses(got) == [100, 603] and got[1].reason == "Decline"
    assert got[1].get("x-why") == "trunking"


def test_call_without_caller_number_is_not_limited_per_caller() -> None:
    """A caller URI without a telephone number fails open for per_caller."""
    h = PolicyHarness(rules("{per_caller: 1}"))
    for n in (1, 2):
        data = invite(branch=f"z9hG4bK-x{n}", call_id=f"x-{n}").replace(
            b"<sip:+12125550100@198.51.100.7>", b"<sip:alice@198.51.100.7>")
        assert to(h.send(data), CORE)


# ------------------------------------------------------------------------------ release


def _answered(h: PolicyHarness, n: int = 1) -> None:
    _, fwd = h.call(n)
    assert fwd is not None
    h.answer(fwd, 180, "Ringing")
    h.answer(fwd, 200, "OK")
    h.send(in_dialog("ACK", call_id=f"call-{n}", cseq=1, branch=f"z9hG4bK-a{n}"))


def _bye_caller(h: PolicyHarness) -> None:
    _answered(h)
    h.bye(1)


def _bye_callee(h: PolicyHarness) -> None:
    _answered(h)
    h.bye(1, from_callee=True)


def _cancelled(h: PolicyHarness) -> None:
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 180, "Ringing")
    out = h.send(cancel(call_id="call-1", branch="z9hG4bK-c1"))
    core_cancel = [m for m in to(out, CORE) if m.method == "CANCEL"][0]
    h.answer(core_cancel, 200, "OK")
    h.answer(fwd, 487, "Request Terminated")


def _failed(h: PolicyHarness) -> None:
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 486, "Busy Here")


def _timer_b(h: PolicyHarness) -> None:
    h.call(1)
    h.advance(40)


def _timer_c(h: PolicyHarness) -> None:
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 180, "Ringing")
    h.advance(250)


def _timer_c_cancel_answered(h: PolicyHarness) -> None:
    """Timer C's CANCEL answered by the core (200, then 487 for the INVITE): still a timeout,
    not a caller that hung up (an ACD counts those as abandoned calls)."""
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 180, "Ringing")
    out = h.advance(186)
    cancel = [m for f, m in out if f.addr == CORE and m.method == "CANCEL"][0]
    h.send(answer(cancel, 200, "OK"), src=CORE)
    heard = h.answer(fwd, 487, "Request Terminated")
    assert [m.status for m in heard] == [487]
    h.advance(40)


def _lifetime(h: PolicyHarness) -> None:
    _answered(h)
    h.advance(3700)


def _session_expired(h: PolicyHarness) -> None:
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 200, "OK", extra="Session-Expires: 120;refresher=uac\r\n")
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a1"))
    h.advance(122)


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        (_bye_caller, "bye_caller"),
        (_bye_callee, "bye_callee"),
        (_cancelled, "cancelled"),
        (_failed, "failed"),
        (_timer_b, "timeout"),
        (_timer_c, "timeout"),
        (_timer_c_cancel_answered, "timeout"),
        (_lifetime, "lifetime"),
        (_session_expired, "session_expired"),
    ],
)
def test_slot_is_released_once_on_each_end_reason(
    scenario: Callable[[PolicyHarness], None], reason: str
) -> None:
    """Whatever ends the dialog, its slot is given back once and the number can call again."""
    h = PolicyHarness(rules("{per_caller: 1, per_callee: 1, per_peer: 1}"),
                      max_dialog_lifetime=3600.0)
    scenario(h)
    assert h.ended() == [reason]
    assert h.tracker.snapshot() == {}
    stats = h.tracker.stats()
    assert stats["live_calls"] == 0 and stats["unmatched_ends"] == 0
    assert stats["underflows"] == 0 and stats["leases_expired"] == 0
    assert h.call(9)[1] is not None
    assert h.count("caller", A) == 1


def test_late_bye_and_retransmitted_2xx_after_release_change_nothing() -> None:
    """A BYE retransmission, a late BYE from the other side and a 2xx retransmission after the
    release neither end anything again nor push a count below zero."""
    h = PolicyHarness(rules("{per_caller: 1}"))
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 200, "OK")
    h.bye(1)
    assert h.count("caller", A) == 0
    h.bye(1)  # retransmission
    h.bye(1, cseq=5, from_callee=True)  # the other side hangs up too
    assert statuses(h.answer(fwd, 200, "OK")) == [200]  # 2xx retransmitted: still relayed
    h.advance(40)
    h.bye(1, cseq=6)  # long after every transaction is gone
    assert h.ended() == ["bye_caller"]
    assert h.tracker.snapshot() == {} and h.tracker.stats()["underflows"] == 0
    assert h.tracker.stats()["unmatched_ends"] == 0
    got, fwd2 = h.call(2)
    assert fwd2 is not None
    assert h.call(3)[1] is None  # and the limit still holds at exactly one


def test_reinvite_and_retransmitted_invite_take_no_slot() -> None:
    """A retransmitted initial INVITE and a re-INVITE in the dialog do not count as calls."""
    h = PolicyHarness(rules("{per_caller: 2}"))
    _, fwd = h.call(1)
    assert fwd is not None
    h.call(1)  # retransmission
    h.answer(fwd, 200, "OK")
    reinvite = in_dialog("INVITE", call_id="call-1", cseq=2, branch="z9hG4bK-re1")
    assert [m.method for m in to(h.send(reinvite), CORE)] == ["INVITE"]
    assert h.count("caller", A) == 1
    assert len([e for e in h.events if isinstance(e, DialogStarted)]) == 1


def test_a_later_rule_rejecting_the_call_takes_no_slot() -> None:
    """When a rule after concurrency rejects, no dialog starts, so no slot is taken."""
    h = PolicyHarness(rules("{per_caller: 1}"))
    (rule,) = h.policy.default.rules
    assert isinstance(rule, Concurrency)

    class RejectAll:
        name, mode = "later", "enforce"

        def decide(self, call: CallInfo, now: float) -> Verdict:
            return Verdict("reject", rule="later", status=603)

    h.policy.default = Pipeline([rule, RejectAll()])
    got, fwd = h.call(1)
    assert fwd is None and statuses(got) == [100, 603] and h.verdicts[-1].rule == "later"
    assert not [e for e in h.events if isinstance(e, DialogStarted)]
    # concurrency took the slot when it admitted the call; the reject gave it back at once
    assert h.tracker.snapshot() == {}
    stats = h.tracker.stats()
    assert stats["live_calls"] == 0 and stats["unmatched_ends"] == 0


def test_monitor_mode_forwards_reports_and_counts() -> None:
    """In monitor mode a call over the limit is forwarded with a monitored verdict and counted."""
    h = PolicyHarness(rules("{per_caller: 1, mode: monitor}"))
    h.call(1)
    _, fwd = h.call(2)
    assert fwd is not None
    v = h.verdicts[-1]
    assert v.accepted and v.monitored and v.reason == "per_caller_exceeded"
    assert v.detail == {"limit": "per_caller", "number": A, "count": 1, "max": 1}
    assert h.count("caller", A) == 2


def test_per_peer_override_changes_the_limit_for_that_peer_only() -> None:
    """A peer's rules override merges over the top-level limits for its traffic only."""
    peers = (
        "peers:\n"
        "  - {name: a, networks: [198.51.100.0/24]}\n"
        "  - {name: b, networks: [203.0.113.0/24], rules: {concurrency: {per_caller: 3}}}\n"
    )
    h = PolicyHarness(rules("{per_caller: 1, per_peer: 10}"), extra_yaml=peers)
    b_src = ("203.0.113.5", 5060)
    assert h.call(1)[1] is not None
    assert h.call(2)[1] is None
    for n in (3, 4):  # peer b: the same caller number gets 3 (one already counted from a)
        assert h.call(n, src=b_src)[1] is not None
    got, fwd = h.call(5, src=b_src)
    assert fwd is None and statuses(got) == [100, 403]
    assert h.count("peer", "a") == 1 and h.count("peer", "b") == 2


def test_counters_survive_a_policy_rebuild_on_the_same_rule_state() -> None:
    """A reload builds a new Policy on the same RuleState: counts go on, ends still release."""
    h = PolicyHarness(rules("{per_caller: 2}"))
    _answered(h, 1)
    _answered(h, 2)
    h.reload(rules("{per_caller: 2, per_callee: 5}"))
    assert h.count("caller", A) == 2
    assert h.call(3)[1] is None
    h.bye(1)
    h.bye(2)
    assert h.tracker.snapshot() == {}
    assert h.call(4)[1] is not None


def test_rule_turned_on_by_reload_counts_calls_already_up() -> None:
    """Enabling the rule by reload starts from the live dialogs; turning it off and on again
    forgets the calls that ended meanwhile."""
    h = PolicyHarness("")
    _answered(h, 1)
    h.reload(rules("{per_caller: 1}"))
    assert h.count("caller", A) == 1
    assert h.call(2)[1] is None
    h.reload("")
    h.bye(1)  # ends while nobody counts
    h.reload(rules("{per_caller: 1}"))
    assert h.tracker.snapshot() == {}
    assert h.call(3)[1] is not None


# ------------------------------------------------------------------------------ backends


class AsyncOnly:
    """A LeaseStore with no synchronous fast path (the shape a Redis backend has)."""

    def __init__(self) -> None:
        self.inner = MemoryLeases()

    async def acquire(self, lease: str, keys: Sequence[str], expires: float, now: float) -> bool:
        return await self.inner.acquire(lease, keys, expires, now)

    async def refresh(self, lease: str, expires: float, now: float) -> bool:
        return await self.inner.refresh(lease, expires, now)

    async def release(self, lease: str, now: float) -> bool:
        return await self.inner.release(lease, now)

    async def counts(self, keys: Sequence[str], now: float) -> list[int]:
        return await self.inner.counts(keys, now)

    async def snapshot(self, prefix: str, now: float) -> dict[str, int]:
        return await self.inner.snapshot(prefix, now)

    async def take(
        self,
        lease: str,
        keys: Sequence[str],
        limits: Sequence[tuple[str, int]],
        expires: float,
        now: float,
    ) -> tuple[int, int]:
        return await self.inner.take(lease, keys, limits, expires, now)

    async def lease_ids(self, now: float) -> list[str]:
        return await self.inner.lease_ids(now)

    async def expire(self, now: float) -> int:
        return await self.inner.expire(now)


def _dialog(call_id: str, caller: str, expires: float = 100.0) -> Dialog:
    return Dialog(call_id, "t", None, caller, DID, (), None, CALLER, 0.0, expires)


def test_async_backend_decides_and_counts_through_awaitables() -> None:
    """With a backend that must be awaited, decide and the dialog events return awaitables."""
    tracker = Tracker(AsyncOnly())
    rule = Concurrency(Settings(per_caller=1), "enforce", tracker)

    def new_call(call_id: str) -> CallInfo:
        return CallInfo(parse_message(invite(call_id=call_id)), Flow("udp", CALLER, 0), 0.0)

    async def run() -> None:
        call = new_call("c1")
        first = rule.decide(call, 0.0)
        assert not isinstance(first, Verdict) and first is not None
        assert await first is None
        assert call.held  # admitted: the slot is taken already
        assert await tracker.snapshot_async() == {"caller": {A: 1}, "callee": {DID: 1},
                                                  "peer": {"-": 1}}
        dialog = _dialog("c1", A)
        dialog.lease = call.lease  # the proxy hands the call's lease to its dialog
        started = tracker.dialog_started(dialog, 0.0)
        assert started is not None
        await started
        second = rule.decide(new_call("c2"), 1.0)
        verdict = await second  # type: ignore[misc]
        assert isinstance(verdict, Verdict) and verdict.status == 403
        ended = tracker.dialog_ended(dialog, 2.0)
        assert ended is not None
        await ended
        assert await tracker.snapshot_async() == {}
        third = new_call("c3")
        assert await rule.decide(third, 3.0) is None  # type: ignore[misc]
        abandoned = tracker.call_abandoned(third, 3.0)  # not a dialog: the slot goes back
        assert abandoned is not None
        await abandoned
        assert await tracker.snapshot_async() == {} and tracker.unmatched_ends == 0

    asyncio.run(run())


def test_pipeline_resumes_after_an_async_concurrency_rule() -> None:
    """The pipeline turns an awaitable rule answer into an awaitable verdict."""
    tracker = Tracker(AsyncOnly())
    pipeline = Pipeline([Concurrency(Settings(per_caller=1), "enforce", tracker)])
    call = CallInfo(parse_message(invite()), Flow("udp", CALLER, 0), 0.0)

    async def run() -> Verdict:
        await tracker.store.acquire("x", ["caller:" + A], 100.0, 0.0)
        pending = pipeline.decide(call, 0.0)
        assert not isinstance(pending, Verdict)
        return await pending

    assert asyncio.run(run()).reason == "per_caller_exceeded"


def test_lease_backstop_expires_a_lease_whose_end_was_never_reported() -> None:
    """A lease that no dialog end releases lapses a grace period after its dialog's expiry."""
    tracker = Tracker(grace=60.0)
    d = _dialog("c1", A)
    tracker.dialog_started(d, 0.0)
    assert tracker.counts("caller", A) == 1
    tracker.dialog_started(_dialog("c2", B, 1000.0), 150.0)  # any later event runs the expiry
    assert tracker.counts("caller", A) == 1
    tracker.dialog_started(_dialog("c3", B, 1000.0), 161.0)
    assert tracker.counts("caller", A) == 0
    assert tracker.stats()["leases_expired"] == 1
    tracker.dialog_ended(d, 170.0)  # a very late end report: nothing to release
    assert tracker.stats()["unmatched_ends"] == 1 and tracker.counts("caller", A) == 0
    assert lease_id(d) == "c1\nt"


def test_dialog_ended_events_are_ignored_for_unknown_dialogs() -> None:
    """An end report for a dialog that never started changes no count."""
    tracker = Tracker()
    tracker.dialog_started(_dialog("c1", A), 0.0)
    tracker.dialog_ended(_dialog("other", A), 1.0)
    assert tracker.counts("caller", A) == 1
