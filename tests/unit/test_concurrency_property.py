"""Property test: thousands of random, overlapping call lifecycles through the in-memory proxy
and a real Policy; the concurrency counters always equal the live dialogs and end at zero."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Generator

import pytest

from sipguard.contract import DialogEnded, DialogStarted, Flow
from sipguard.policy.concurrency import dialog_keys
from sipguard.sip.message import Message
from tests.unit.dialog_helpers import PolicyHarness, cancel, in_dialog, to
from tests.unit.proxy_helpers import CORE, answer, invite

CALLERS = [f"+1212555{i:04d}" for i in range(80)]
CALLEES = [f"+1800555{i:04d}" for i in range(40)]
DIVERTERS = [f"+1312555{i:04d}" for i in range(5)]
LIMITS = {"caller": 2, "callee": 3, "diverter": 3, "peer": 80}
RULES = (
    "rules:\n  concurrency: {per_caller: 2, per_callee: 3, per_diverter: 3, per_peer: 80, "
    "max_diversions: 1}\n"
)
LIFETIME = 300.0

Steps = Generator[float, None, None]


class Checked(PolicyHarness):
    """After every message and timer that starts or ends a dialog: counts == live dialogs,
    within limits, never below zero."""

    max_seen: Counter[str]

    def _drain(self) -> list[tuple[Flow, Message]]:
        changed = any(isinstance(e, DialogStarted | DialogEnded) for e in self.proxy.events)
        out = super()._drain()
        if not changed:  # dialogs start and end only with these events
            return out
        want: Counter[str] = Counter()
        for dialog in self.proxy.dialogs.values():
            want.update(dialog_keys(dialog))
        store = self.tracker.sync
        assert store is not None
        have = store.snapshot_now()
        assert have == dict(want)
        assert all(n > 0 for n in have.values())
        for key, n in have.items():
            kind = key.split(":", 1)[0]
            assert n <= LIMITS[kind], key
            self.max_seen[kind] = max(self.max_seen[kind], n)
        stats = self.tracker.stats()
        assert stats["underflows"] == 0 and stats["unmatched_ends"] == 0
        assert stats["leases_expired"] == 0
        return out


def _ack_reject(h: Checked, n: int, caller: str, callee: str, resp: list[Message]) -> None:
    finals = [m for m in resp if m.status >= 300]
    if not finals:
        return
    data = invite(branch=f"z9hG4bK-c{n}", call_id=f"call-{n}", caller=caller, callee=callee)
    data = data.replace(b"INVITE sip", b"ACK sip", 1).replace(b"CSeq: 1 INVITE", b"CSeq: 1 ACK")
    data = data.replace(f"To: <sip:{callee}@192.0.2.1>".encode(),
                        f"To: <sip:{callee}@192.0.2.1>;tag={finals[-1].to_tag}".encode())
    h.send(data)


def lifecycle(h: Checked, n: int, rng: random.Random, tally: Counter[str]) -> Steps:
    caller, callee = rng.choice(CALLERS), rng.choice(CALLEES)
    div = rng.choice(DIVERTERS)
    pick = rng.random()
    extra = ""
    if pick < 0.15:
        extra = f"Diversion: <sip:{div}@pbx.example>;reason=unconditional\r\n"
    elif pick < 0.25:
        extra = (f"History-Info: <sip:{div}@pbx.example>;index=1, "
                 f"<sip:{callee}@192.0.2.1;cause=302>;index=1.1\r\n")
    elif pick < 0.28:
        extra = f"Diversion: <sip:{div}@a.example>, <sip:{rng.choice(DIVERTERS)}@b.example>\r\n"
    resp, fwd = h.call(n, caller=caller, callee=callee, extra=extra)
    if fwd is None:
        tally["rejected_by_policy"] += 1
        if rng.random() < 0.7:
            _ack_reject(h, n, caller, callee, resp)
        if rng.random() < 0.2:
            yield rng.uniform(0.1, 2.0)
            h.call(n, caller=caller, callee=callee, extra=extra)  # retransmission: absorbed
        return
    kind = rng.choices(
        ["answered", "refreshed", "core_rejects", "cancel", "cancel_early", "cancel_race",
         "silent", "ring_forever"],
        weights=[40, 10, 10, 10, 5, 5, 5, 5],
    )[0]
    tally[kind] += 1
    if rng.random() < 0.2:
        yield rng.uniform(0.1, 1.0)
        h.call(n, caller=caller, callee=callee, extra=extra)  # INVITE retransmission
    if kind == "silent":
        return  # Timer B: 408
    if kind == "cancel_early":
        h.send(cancel(call_id=f"call-{n}", branch=f"z9hG4bK-c{n}", caller=caller, callee=callee))
        yield rng.uniform(0.0, 2.0)
    yield rng.uniform(0.0, 3.0)
    out = h.send(answer(fwd, 180, "Ringing"), src=CORE)
    if kind == "ring_forever":
        return  # Timer C: CANCEL, then 408
    if kind == "core_rejects":
        yield rng.uniform(0.0, 20.0)
        resp = h.answer(fwd, rng.choice([404, 480, 486, 603]), "No")
        if rng.random() < 0.7:
            _ack_reject(h, n, caller, callee, resp)
        return
    if kind in ("cancel", "cancel_early", "cancel_race"):
        if kind != "cancel_early":  # else the CANCEL went out with the 180 (RFC 3261 §9.1)
            yield rng.uniform(0.0, 10.0)
            out = h.send(cancel(call_id=f"call-{n}", branch=f"z9hG4bK-c{n}", caller=caller, callee=callee))
        core_cancel = [m for m in to(out, CORE) if m.method == "CANCEL"]
        if core_cancel:
            h.answer(core_cancel[0], 200, "OK")
        yield rng.uniform(0.0, 1.0)
        if kind != "cancel_race":
            if rng.random() < 0.9:  # else the core never answers: Timer C / B end it
                h.answer(fwd, 487, "Request Terminated")
            return
    se = rng.choice([None, None, 90, 120, 300]) if kind != "refreshed" else 90
    se_hdr = f"Session-Expires: {se};refresher=uac\r\n" if se else ""
    yield rng.uniform(0.0, 5.0)
    h.answer(fwd, 200, "OK", extra=se_hdr)
    if rng.random() < 0.3:
        yield rng.uniform(0.0, 1.0)
        h.answer(fwd, 200, "OK", extra=se_hdr)  # 2xx retransmission
    h.send(in_dialog("ACK", call_id=f"call-{n}", cseq=1, branch=f"z9hG4bK-a{n}", caller=caller, callee=callee))
    cseq = 2
    if kind == "refreshed":
        for _ in range(rng.randrange(1, 5)):
            yield 45.0
            method = rng.choice(["INVITE", "UPDATE"])
            out = h.send(in_dialog(method, call_id=f"call-{n}", cseq=cseq,
                                   branch=f"z9hG4bK-r{n}-{cseq}", caller=caller, callee=callee))
            cseq += 1
            reqs = [m for m in to(out, CORE) if m.method == method]
            if reqs and rng.random() < 0.9:
                h.answer(reqs[0], 200, "OK", extra=se_hdr)
    yield rng.expovariate(1 / 60.0)
    end = rng.choice(["bye_caller", "bye_callee", "lost"])
    tally[end] += 1
    if end == "bye_caller":
        out = h.bye(n, cseq=cseq, caller=caller, callee=callee, answered=False)
        byes = [m for m in to(out, CORE) if m.method == "BYE"]
        if rng.random() < 0.3:
            h.bye(n, cseq=cseq, caller=caller, callee=callee, answered=False)  # retransmission
        if byes and rng.random() < 0.9:
            h.answer(byes[0], 200, "OK")
    elif end == "bye_callee":
        h.bye(n, cseq=cseq, from_callee=True, caller=caller, callee=callee)
    if rng.random() < 0.2:
        yield rng.uniform(0.0, LIFETIME + 100)
        h.bye(n, cseq=cseq + 7, from_callee=rng.random() < 0.5, caller=caller, callee=callee)  # late BYE
    if rng.random() < 0.1:
        h.answer(fwd, 200, "OK")  # very late 2xx retransmission: stray by now


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_lifecycles_leave_every_counter_at_zero(seed: int) -> None:
    """1,000 overlapping random calls per seed (answered, rejected, cancelled, lost BYE,
    retransmitted 200 and BYE, late BYE, session expiry, timeouts): after every message and
    timer the counts equal the live dialogs and stay within limits, and all end at zero."""
    rng = random.Random(seed)
    h = Checked(RULES, max_dialog_lifetime=LIFETIME)
    h.max_seen = Counter()
    tally: Counter[str] = Counter()
    queue: list[tuple[float, int, Steps]] = []
    t = h.now
    for n in range(1000):
        t += rng.expovariate(1.0)  # a new call a second
        heapq.heappush(queue, (t, n, lifecycle(h, n, rng, tally)))
    while queue:
        when, n, steps = heapq.heappop(queue)
        h.advance(max(0.0, when - h.now))
        try:
            delay = next(steps)
        except StopIteration:
            continue
        heapq.heappush(queue, (h.now + delay, n, steps))
    h.advance(LIFETIME + 300)
    assert h.proxy.dialogs == {}
    assert h.tracker.snapshot() == {}
    started = [e.dialog.call_id for e in h.events if isinstance(e, DialogStarted)]
    ended = [e.dialog.call_id for e in h.events if isinstance(e, DialogEnded)]
    assert sorted(started) == sorted(ended) and len(set(ended)) == len(ended)
    reasons = Counter(e.reason for e in h.events if isinstance(e, DialogEnded))
    # every way of ending showed up, and the limits were actually reached
    assert set(reasons) >= {"bye_caller", "bye_callee", "cancelled", "failed", "timeout",
                            "session_expired", "lifetime"}, reasons
    assert tally["rejected_by_policy"] > 50
    assert h.max_seen["caller"] == LIMITS["caller"] and h.max_seen["callee"] == LIMITS["callee"]
