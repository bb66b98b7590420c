"""Property test: random calls fed to the edge core in random batches, as one event-loop pass
reads them (no send, no event drain in between) — arrivals, answers, failures, CANCELs and
BYEs mixed. After every single message the concurrency counts equal the live dialogs and stay
within the limits; at the end every count is zero."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sipguard.contract import Flow
from sipguard.policy.concurrency import dialog_keys
from sipguard.sip.message import Message
from tests.unit.dialog_helpers import PolicyHarness, cancel, in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, answer, invite

CALLERS = [f"+1212555{i:04d}" for i in range(6)]
CALLEES = [f"+1800555{i:04d}" for i in range(4)]
LIMITS = {"caller": 2, "callee": 3}
RULES = "rules:\n  concurrency: {per_caller: 2, per_callee: 3}\n"


class Call:
    __slots__ = ("n", "caller", "callee", "fwd", "state", "cseq")

    def __init__(self, n: int, caller: str, callee: str) -> None:
        self.n, self.caller, self.callee = n, caller, callee
        self.fwd: Message | None = None  # the INVITE as the core got it
        self.state = "sent"  # sent -> at_core -> ringing -> up -> over
        self.cseq = 2


def check(h: PolicyHarness, seen: Counter[str]) -> None:
    """Counts == live dialogs (nothing else holds a slot: every rule here answers at once)."""
    want: Counter[str] = Counter()
    for dialog in h.proxy.dialogs.values():
        want.update(dialog_keys(dialog))
    store = h.tracker.sync
    assert store is not None
    have = store.snapshot_now()
    assert have == dict(want)
    for key, n in have.items():
        kind = key.split(":", 1)[0]
        if kind in LIMITS:
            assert n <= LIMITS[kind], key
            seen[kind] = max(seen[kind], n)


def step(h: PolicyHarness, call: Call, rng: random.Random) -> tuple[bytes, tuple[str, int]] | None:
    """The next message of ``call`` (and who sends it), or None when it has nothing to send."""
    n, a, b = call.n, call.caller, call.callee
    if call.state == "sent" and call.fwd is None and rng.random() < 0.3:
        call.state = "over"
        return cancel(call_id=f"call-{n}", branch=f"z9hG4bK-c{n}", caller=a, callee=b), CALLER
    if call.state in ("at_core", "ringing") and call.fwd is not None:
        pick = rng.random()
        if call.state == "at_core" and pick < 0.3:
            call.state = "ringing"
            return answer(call.fwd, 180, "Ringing"), CORE
        if pick < 0.5:
            call.state = "over"
            return answer(call.fwd, rng.choice([404, 486, 603]), "No"), CORE
        if pick < 0.6:
            call.state = "over"
            return cancel(call_id=f"call-{n}", branch=f"z9hG4bK-c{n}", caller=a, callee=b), CALLER
        call.state = "up"
        return answer(call.fwd, 200, "OK"), CORE
    if call.state == "up":
        call.state = "over"
        from_callee = rng.random() < 0.5
        data = in_dialog("BYE", call_id=f"call-{n}", cseq=call.cseq, branch=f"z9hG4bK-bye{n}",
                         caller=a, callee=b, from_callee=from_callee)
        return data, CORE if from_callee else CALLER
    return None


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_keep_counts_equal_to_live_dialogs(seed: int) -> None:
    """Hundreds of calls in random one-pass batches: counts always equal live dialogs, the
    limits are reached but never passed, and everything ends at zero."""
    rng = random.Random(seed)
    h = PolicyHarness(RULES)
    seen: Counter[str] = Counter()
    calls: list[Call] = []
    by_call_id: dict[str, Call] = {}
    n = 0
    for _ in range(150):  # passes
        batch: list[tuple[bytes, tuple[str, int]]] = []
        for _ in range(rng.randint(1, 12)):
            live = [c for c in calls if c.state != "over"]
            if live and rng.random() < 0.5:
                msg = step(h, rng.choice(live), rng)
                if msg is not None:
                    batch.append(msg)
                continue
            call = Call(n, rng.choice(CALLERS), rng.choice(CALLEES))
            n += 1
            calls.append(call)
            by_call_id[f"call-{call.n}"] = call
            batch.append((invite(branch=f"z9hG4bK-c{call.n}", call_id=f"call-{call.n}",
                                 caller=call.caller, callee=call.callee), CALLER))
        for data, src in batch:
            h.feed(data, src=src)
            check(h, seen)  # after every message, before anything is sent or drained
        out: list[tuple[Flow, Message]] = h._drain()
        for m in to(out, CORE):
            if m.method == "INVITE" and m.call_id in by_call_id:
                c = by_call_id[m.call_id]
                if c.state == "sent":
                    c.fwd, c.state = m, "at_core"
        for m in to(out, CALLER):
            c = by_call_id.get(m.call_id)
            if c is not None and m.status is not None and m.status >= 300 and c.fwd is None:
                c.state = "over"  # rejected by the policy (or cancelled while deciding)
        check(h, seen)
    # Wind down: hang up what is up, fail what rings, then let the timers run out.
    for c in calls:
        while c.state != "over":
            msg = step(h, c, rng)
            if msg is None:
                break
            h.send(msg[0], src=msg[1])
            check(h, seen)
    h.advance(4 * 3600 + 600)
    check(h, seen)
    assert h.proxy.dialogs == {}
    assert h.tracker.snapshot() == {}
    stats = h.tracker.stats()
    assert stats["underflows"] == 0 and stats["unmatched_ends"] == 0
    assert seen["caller"] == LIMITS["caller"] and seen["callee"] == LIMITS["callee"]
