"""The shared-memory state store (sipguard/state/_shm.c, ShmCounts): the Redis store's
scenarios (tests/unit/test_shared_store.py) on a segment, every check kind, table-full and
lock behaviour, the hash tables' invariants under churn, exactness across real processes
racing on one segment, a process killed holding the lock, and the policy on top of it."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import pytest

from sipguard.contract import MAX_DIVERTERS
from sipguard.proxy import build
from sipguard.state import _shm
from sipguard.state.base import Admitted, Check, SharedCounts
from sipguard.state.shared_memory import SET_CAP, ShmCounts, create_segment
from tests.unit.dialog_helpers import to
from tests.unit.proxy_helpers import CORE, invite
from tests.unit.test_shared_policy import SharedHarness, h_answer

CAPS = {"max_keys": 2048, "max_leases": 2048, "max_sets": 64}
TAKE = ("peer:-", "caller:+12125550100", "callee:+18005550199")


@pytest.fixture
def path() -> Iterator[str]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    where = os.path.join(base, f"sipguard-test-{uuid.uuid4().hex}")
    try:
        yield where
    finally:
        Path(where).unlink(missing_ok=True)


def store(path: str, create: bool = False, **kw: Any) -> ShmCounts:
    params: dict[str, Any] = {"lease_s": 60.0, "counters": Counter(), **CAPS}
    params.update(kw)
    return ShmCounts(path, create=create, **params)


def caller_limit(most: int, monitor: bool = False) -> Check:
    return ("c", "caller:+12125550100", most, 0, monitor, "")


def answer(result: Admitted | None) -> Admitted:
    assert result is not None
    return result


def took(result: Admitted | None) -> bool:
    return answer(result)[0]


def measured(result: Admitted | None) -> list[tuple[int, int]]:
    return answer(result)[3]


def segment(path: str, **caps: int) -> _shm.Segment:
    c = {**CAPS, **caps}
    return _shm.Segment(path, c["max_keys"], c["max_leases"], c["max_sets"])


# --------------------------------------------------------------------------- the Redis scenarios

async def test_check_and_take_is_shared_between_processes_stores(path: str) -> None:
    a, b = store(path, create=True), store(path)
    typed: SharedCounts = a  # the protocol the policy sees
    assert typed.available
    try:
        assert answer(await a.admit("L1", [caller_limit(2)], TAKE))[:2] == (True, -1)
        assert answer(await b.admit("L2", [caller_limit(2)], TAKE))[:2] == (True, -1)
        assert await a.admit("L3", [caller_limit(2)], TAKE) == (False, 0, 2, [])
        # a lease already held counts as room (a retried decision takes nothing twice)
        assert await b.admit("L2", [caller_limit(2)], TAKE) == (True, -1, 0, [])
        assert await a.counts(TAKE) == [2, 2, 2]
        await a.release("L1", TAKE)
        await a.release("L1", TAKE)  # idempotent
        assert a.release_soon("L1", TAKE) is True
        assert await b.counts(TAKE) == [1, 1, 1]
        assert took(await b.admit("L3", [caller_limit(2)], TAKE)) is True
        assert took(await a.admit("L4", [caller_limit(2)], TAKE)) is False
        assert a.segment._verify() == ""
    finally:
        await a.close()
        await b.close()


async def test_refused_call_takes_nothing_anywhere(path: str) -> None:
    a = store(path, create=True)
    try:
        callee = ("c", "callee:+18005550199", 1, 0, False, "")
        assert took(await a.admit("L1", [callee], TAKE))
        rate = ("r", "rate.per_caller:+12125550100", 1.0, 0.0, False, "")
        # the caller has room, the callee not: nothing taken, no rate cell advanced
        assert await a.admit("L2", [caller_limit(5), rate, callee], TAKE) == (False, 2, 1, [])
        assert took(await a.admit("L3", [rate], ())) is True
        assert await a.counts(["caller:+12125550100"]) == [1]
        assert a.segment.stats()["leases"] == 3
    finally:
        await a.close()


async def test_leases_lapse_without_refresh_and_live_with_it(path: str) -> None:
    a = store(path, create=True, lease_s=0.6)
    b = store(path, lease_s=0.6)
    try:
        assert took(await a.admit("dead", [caller_limit(1)], TAKE))
        assert took(await b.admit("other", [caller_limit(1)], TAKE)) is False
        await asyncio.sleep(0.75)
        # "dead"'s process never re-scored it: gone once the sweep passes (a whole table
        # every LAP_S with the timer; here at once)
        assert b.sweep_now(10**6) == 3
        assert took(await b.admit("live", [caller_limit(1)], TAKE)) is True
        b.live = lambda: [("live", TAKE)]
        b.held = lambda lease: True
        for _ in range(3):  # re-scored every 0.3 s, it outlives lease_s
            await asyncio.sleep(0.3)
            assert await b.refresh() == 1
            b.sweep_now(10**6)
        assert took(await a.admit("late", [caller_limit(1)], TAKE)) is False
        assert b.counters["state_leases_refreshed"] == 3
    finally:
        await a.close()
        await b.close()


async def test_an_expired_own_lease_is_no_room_and_expired_rivals_only_after_a_sweep(
    path: str,
) -> None:
    a = store(path, create=True, lease_s=0.05)
    try:
        assert took(await a.admit("L1", [caller_limit(1)], TAKE))
        await asyncio.sleep(0.08)
        # its own lapsed lease is dropped at the check (as ZREMRANGEBYSCORE would): room
        assert await a.admit("L1", [caller_limit(1)], TAKE) == (True, -1, 0, [])
        await asyncio.sleep(0.08)
        assert await a.admit("L2", [caller_limit(1)], TAKE) == (False, 0, 1, [])
        a.sweep_now(10**6)
        assert took(await a.admit("L2", [caller_limit(1)], TAKE)) is True
    finally:
        await a.close()


async def test_the_timer_sweeps_and_refreshes(path: str) -> None:
    a = store(path, create=True, lease_s=0.3)
    b = store(path, lease_s=0.3)
    loop = asyncio.get_running_loop()
    try:
        assert a.tick_s == pytest.approx(0.1) and a.refresh_ticks == 1
        await b.admit("dead", [], ("callee:+1",))
        await a.admit("kept", [], ("callee:+1",))
        a.live = lambda: [("kept", ("callee:+1",)), ("ended", ("callee:+1",))]
        a.held = lambda lease: lease == "kept"
        await a.add("ended", ("callee:+1",))
        a.sweep_slots = 10**4  # the whole table each tick (normally: in LAP_S)
        a.start(loop.call_later)
        await asyncio.sleep(0.7)  # about 7 ticks
        assert await a.counts(["callee:+1"]) == [1]  # "kept" lives, "dead" lapsed, "ended" gone
        assert a.counters["state_leases_refreshed"] >= 5
    finally:
        await a.close()
        await b.close()
    assert a._timer is None and not a.available
    assert await a.admit("x", [], ()) is None
    assert a.stats() == {"state_available": 0.0, "state_pending_releases": 0.0}


async def test_gcra_rate_across_stores(path: str) -> None:
    a, b = store(path, create=True), store(path)
    try:
        limit = ("r", "rate.per_caller:+1", 1.0, 2.0, False, "")  # 1/s, burst 3
        results = [await (a if i % 2 else b).admit(f"x{i}", [limit], ()) for i in range(5)]
        assert [r[0] for r in results if r] == [True, True, True, False, False]
        refused = results[3]
        assert refused is not None and 900_000 < refused[2] <= 1_000_000  # µs to wait
        assert refused[:2] == (False, 0)
        # a cell drained long ago is as new (its slot expires with its TAT)
        fast = ("r", "rate.fast:+1", 0.01, 0.0, False, "")
        assert [took(await a.admit(f"f{i}", [fast], ())) for i in range(2)] == [True, False]
        await asyncio.sleep(0.02)
        assert took(await a.admit("f2", [fast], ())) is True
    finally:
        await a.close()
        await b.close()


async def test_monitor_checks_report_and_do_not_stop(path: str) -> None:
    a = store(path, create=True)
    try:
        assert took(await a.admit("L1", [caller_limit(1)], TAKE))
        rate = ("r", "rate:+1", 10.0, 0.0, True, "")
        assert took(await a.admit("L0", [rate], ()))
        result = await a.admit("L2", [caller_limit(1, True), rate], TAKE)
        assert result is not None
        taken, refused, _, monitored = result
        assert (taken, refused) == (True, -1)
        assert monitored[0] == (0, 1) and monitored[1][0] == 1 and monitored[1][1] > 9_000_000
        assert await a.counts(["caller:+12125550100"]) == [2]
    finally:
        await a.close()


async def test_measures_and_cooldown_marks(path: str) -> None:
    """The dialer's kinds: distinct members and calls over a window (this call included),
    a cooldown mark refusing with its time left and code."""
    a = store(path, create=True)
    try:
        result = None
        for i, callee in enumerate(("+1646", "+1303", "+1646")):
            distinct = ("h", "dialer.callees:+1", 60_000, 0, False, callee)
            calls = ("n", "dialer.calls:+1", 60_000, 0, False, "")
            result = await a.admit(f"m{i}", [distinct, calls], ())
            assert result is not None and result[0]
        assert result is not None and result[3] == [(0, 2), (1, 3)]
        block = ("b", "dialer.block.caller:+1", 0, 0, False, "")
        assert took(await a.admit("x", [block], ())) is True
        await a.mark("dialer.block.caller:+1", 6, 300)
        refused = await a.admit("y", [block], ())
        assert refused is not None and refused[:2] == (False, 0)
        left_ms, code = divmod(refused[2], 16)
        assert code == 6 and 299_000 < left_ms <= 300_000
        monitored = ("b", "dialer.block.caller:+1", 0, 0, True, "")
        result = await a.admit("z", [monitored], ())
        assert result is not None and result[:3] == (True, -1, 0)
        assert result[3][0][0] == 0 and result[3][0][1] % 16 == 6
        await a.mark("dialer.block.caller:+2", 1, 0.03)
        await asyncio.sleep(0.05)  # the mark lapsed
        assert took(await a.admit("w", [("b", "dialer.block.caller:+2", 0, 0, False, "")], ()))
        # an operator's lift: the mark and the measures named go at once (a set freed)
        sets = a.segment.stats()["sets"]
        measures = [("h", "dialer.callees:+1", [60_000.0]), ("n", "dialer.calls:+1", [60_000.0])]
        value = await a.unmark("dialer.block.caller:+1", measures)
        assert value is not None and value % 16 == 6 and 299_000 < value // 16 <= 300_000
        assert await a.unmark("dialer.block.caller:+1", measures) == -1
        assert a.segment.stats()["sets"] == sets - 1 and a.segment._verify() == ""
        assert measured(await a.admit("after", [block, distinct, calls], ())) == [(1, 1), (2, 1)]
        with pytest.raises(ValueError, match="none of b n h"):
            a.segment.forget("dialer.calls:+1", "c")
    finally:
        await a.close()


async def test_measures_recorded_before_a_refusal_stay_and_windows_slide(path: str) -> None:
    a = store(path, create=True)
    try:
        calls = ("n", "dialer.calls:+9", 40, 0, False, "")  # 40 ms: buckets of 10 ms
        assert await a.admit("L1", [caller_limit(0)], TAKE) == (False, 0, 0, [])
        assert await a.admit("L2", [calls, caller_limit(0)], TAKE) == (False, 1, 0, [])
        result = await a.admit("L3", [calls], ())
        assert result is not None and result[3] == [(0, 2)]  # the refused call counted
        await asyncio.sleep(0.08)  # past 4 buckets and the current one
        assert measured(await a.admit("L4", [calls], ())) == [(0, 1)]
        distinct = ("h", "dialer.callees:+9", 40, 0, False, "")
        counts = []
        for i in range(SET_CAP + 40):  # distinct members: the count saturates at SET_CAP
            member = ("h", "dialer.callees:+9", 60_000, 0, False, f"+1555{i:07d}")
            counts.append(measured(await a.admit(f"h{i}", [member], ()))[0][1])
        assert counts[:3] == [1, 2, 3] and counts[SET_CAP - 1] == SET_CAP
        assert max(counts) == SET_CAP == counts[-1]
        # a window of another width starts over
        assert measured(await a.admit("hw", [distinct], ())) == [(0, 1)]
    finally:
        await a.close()


async def test_add_takes_whatever_the_counts_and_moves_the_expiry(path: str) -> None:
    a = store(path, create=True, lease_s=0.2)
    try:
        assert took(await a.admit("L1", [caller_limit(1)], TAKE))
        await a.add("L2", TAKE)  # admitted while the store was not asked
        assert await a.counts(TAKE) == [2, 2, 2]
        for _ in range(3):
            await asyncio.sleep(0.1)
            await a.add("L2", TAKE)  # re-scored, not counted twice
        a.sweep_now(10**6)
        assert await a.counts(TAKE) == [1, 1, 1]  # L1 lapsed, L2 lives
        assert await a.admit("L3", [caller_limit(1)], TAKE) == (False, 0, 1, [])
    finally:
        await a.close()


# --------------------------------------------------------------------------- full tables

async def test_a_full_table_answers_none_changes_nothing_and_is_counted(path: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    a = store(path, create=True, max_keys=4, max_leases=4, max_sets=1,
              log=lambda event, **fields: seen.append((event, fields)))
    try:
        assert took(await a.admit("L1", [], ("caller:+1", "callee:+2")))
        # three more memberships needed, two free: refused as "unreachable", nothing taken
        assert await a.admit("L2", [caller_limit(9)], ("caller:+1", "a", "b")) is None
        assert a.available and a.counters["state_shm_full"] == 1
        assert seen[0][0] == "state_shm_full" and seen[0][1]["what"] == "admit"
        assert a.segment.stats()["leases"] == 2 and await a.counts(["caller:+1"]) == [1]
        # the lease already on a key needs no room: re-admitting it works
        assert took(await a.admit("L1", [], ("caller:+1", "callee:+2")))
        # keys: 2 used of 4; a rate cell and an h measure fit; a second h has no set block:
        # that distinct count is left out (counted), the step is no "full" table
        h1 = ("h", "dialer.callees:+1", 60_000, 0, False, "+1")
        h2 = ("h", "dialer.callees:+2", 60_000, 0, False, "+1")
        assert took(await a.admit("x", [h1], ()))
        assert await a.admit("y", [h2], ()) == (True, -1, 0, [])
        assert a.stats()["state_shm_unmeasured"] == 1.0
        assert took(await a.admit("z", [("r", "rate:+1", 1.0, 5.0, False, "")], ()))
        await a.mark("dialer.block.caller:+1", 1, 60)  # a fifth key: full
        await a.add("L3", ("peer:x",))
        assert a.counters["state_shm_full"] == 3
        assert a.segment.stats()["full"] == 3 and a.segment._verify() == ""
        # an existing key needs no room; the refused h2 left no key behind
        h1b = ("h", "dialer.callees:+1", 60_000, 0, False, "+2")
        assert measured(await a.admit("x2", [h1b], ())) == [(0, 2)]
        assert a.stats()["state_shm_keys"] == 4.0
    finally:
        await a.close()


async def test_every_set_in_use_leaves_the_limits_on(path: str) -> None:
    """The sets (distinct-callee counts) all in use — a burst of new callers — leave that
    count out for a new caller, not every limit: its concurrency limit still refuses, its
    rate still counts (before, the whole step answered "full" and `state.fail: open`
    admitted every call, every limit off)."""
    a = store(path, create=True, max_sets=2)
    try:
        for n in range(2):
            h = ("h", f"dialer.callees:+{n}", 60_000, 0, False, "+18005550199")
            assert took(await a.admit(f"f{n}", [h], ()))
        assert a.segment.stats()["sets"] == 2
        fresh = ("h", "dialer.callees:+12125550100", 60_000, 0, False, "+18005550199")
        assert took(await a.admit("L1", [fresh, caller_limit(1)], TAKE))
        assert await a.admit("L2", [fresh, caller_limit(1)], TAKE) == (False, 1, 1, [])
        rate = ("r", "rate:+12125550100", 10_000_000.0, 0.0, False, "")
        assert took(await a.admit("L3", [fresh, rate], ()))
        refused = await a.admit("L4", [fresh, rate], ())
        assert refused is not None and refused[:2] == (False, 1)
        assert a.stats()["state_shm_unmeasured"] == 4.0 and a.counters["state_shm_full"] == 0
    finally:
        await a.close()


async def test_lapsed_entries_make_room_for_a_full_table(path: str) -> None:
    a = store(path, create=True, max_keys=4, max_leases=4, lease_s=0.03)
    try:
        for i in range(4):
            assert took(await a.admit(f"L{i}", [], (f"k{i}",)))
        assert await a.admit("L9", [], ("k9",)) is None
        await asyncio.sleep(0.05)  # lapsed, not swept: a full admit sweeps before it gives up
        assert took(await a.admit("L9", [], ("k9",))) is True
    finally:
        await a.close()


# --------------------------------------------------------------------------- arguments

def test_arguments_are_checked(path: str) -> None:
    create_segment(path, **CAPS)
    seg = segment(path)
    bad: list[tuple[Any, type[Exception]]] = [
        ([("c", "k", 1, 0, False)], TypeError),  # five fields
        ([["c", "k", 1, 0, False, ""]], TypeError),  # a list
        ([("x", "k", 1, 0, False, "")], ValueError),
        ([("cc", "k", 1, 0, False, "")], ValueError),
        ([("c", 7, 1, 0, False, "")], TypeError),
        ([("c", "k", "1", 0, False, "")], TypeError),
        ([("c", "k", -1, 0, False, "")], ValueError),
        ([("r", "k", float("nan"), 0, False, "")], ValueError),
        ([("r", "k", 1e10, 0, False, "")], ValueError),
        ([("h", "k", 1, 0, False, None)], TypeError),
        ([("c", "k", 1, 0, False, "")] * (_shm.MAX_ITEMS + 1), ValueError),
        (5, TypeError),
    ]
    for checks, error in bad:
        with pytest.raises(error):
            seg.admit("L", checks, (), 1000)
    with pytest.raises(TypeError):
        seg.admit(7, [], (), 1000)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seg.admit("L", [], ("k", 3), 1000)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        seg.admit("L", [], (), 0)
    with pytest.raises(TypeError):
        seg.admit("L", [], (), 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seg.admit("L", [])  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        seg.mark("k", 1, 0)
    with pytest.raises(ValueError):
        seg.sweep(-1)
    assert seg.stats()["keys"] == 0 and seg._verify() == ""  # nothing half done
    with pytest.raises(ValueError, match="capacities"):
        _shm.create(path + ".x", 0, 10, 10)
    with pytest.raises(ValueError, match=path):
        segment(path, max_sets=CAPS["max_sets"] + 1)  # another size
    Path(path + ".x").write_bytes(b"\0" * seg.stats()["bytes"])
    try:
        with pytest.raises(ValueError, match="no sipguard segment"):
            segment(path + ".x")  # the size, not the magic
    finally:
        Path(path + ".x").unlink()
    with pytest.raises(FileNotFoundError):
        segment(path + ".missing")
    seg.close()
    seg.close()
    with pytest.raises(ValueError, match="closed"):
        seg.count("k")


def test_create_replaces_an_old_segment_and_mappers_keep_theirs(path: str) -> None:
    create_segment(path, **CAPS)
    old = segment(path)
    assert old.add("L", ["k"], 60_000) == 1
    create_segment(path, **CAPS)
    new = segment(path)
    assert new.count("k") == 0 and old.count("k") == 1
    assert [p for p in os.listdir(os.path.dirname(path)) if p.startswith(
        os.path.basename(path) + ".")] == []  # no temporary file left
    old.close()
    new.close()


# --------------------------------------------------------------------------- the tables

def test_the_tables_stay_consistent_under_churn(path: str) -> None:
    """Random takes, releases and re-adds on small tables (long runs, wrap-around,
    backward shifts): every count equals the model and the invariants hold."""
    create_segment(path, 64, 96, 4)
    seg = _shm.Segment(path, 64, 96, 4)
    rng = random.Random(7)
    keys = [f"caller:+1{i}" for i in range(40)]
    model: dict[str, set[str]] = {}
    for step in range(4000):
        lease = f"L{rng.randrange(60)}"
        chosen = rng.sample(keys, rng.randint(1, 3))
        if rng.random() < 0.55:
            most = rng.randint(0, 4)
            check: Check = ("c", chosen[0], most, 0, False, "")
            room = lease in model.get(chosen[0], set()) or len(model.get(chosen[0], ())) < most
            result = seg.admit(lease, [check], chosen, 600_000)
            needed = sum(1 for k in set(chosen) if lease not in model.get(k, set()))
            new_keys = sum(1 for k in set(chosen) if k not in model)
            in_use = sum(len(v) for v in model.values())
            assert (result is None) == (in_use + needed > 96 or len(model) + new_keys > 64)
            if result is None:
                continue
            assert result[0] is room
            if room:
                for k in chosen:
                    model.setdefault(k, set()).add(lease)
        else:
            removed = seg.release(lease, chosen)
            assert removed == sum(1 for k in set(chosen) if lease in model.get(k, set()))
            for k in chosen:
                model.get(k, set()).discard(lease)
                if k in model and not model[k]:
                    del model[k]
        if step % 50 == 0:
            assert seg._verify() == ""
            assert [seg.count(k) for k in keys] == [len(model.get(k, ())) for k in keys]
    assert seg._verify() == ""
    seg.close()


def test_lapsing_cells_measures_and_marks_keep_the_tables_consistent(path: str) -> None:
    """Rate cells, windows and marks of a few ms on a small table, with takes and sweeps
    between: slots and set blocks come and go, the invariants hold, and every measure
    counts between 1 and SET_CAP."""
    create_segment(path, 32, 32, 4)
    seg = _shm.Segment(path, 32, 32, 4)
    rng = random.Random(11)
    answers = Counter[str]()
    deadline = time.monotonic() + 1.0
    step = 0
    while time.monotonic() < deadline and step < 20000:
        n = rng.randrange(12)
        kind = rng.choice("rnhbm")
        lease = f"L{rng.randrange(20)}"
        take = (f"k{rng.randrange(12)}",) if rng.random() < 0.3 else ()
        if kind == "m":
            answers["mark" if seg.mark(f"b{n}", n, rng.randint(1, 5)) else "full"] += 1
        else:
            a = 0.001 if kind == "r" else rng.choice((4, 8))  # r: s; n, h: window ms
            check: Check = (kind, f"{kind}{n}", a, 0.002, False, f"+1{rng.randrange(200)}")
            result = seg.admit(lease, [check], take, rng.randint(1, 5))
            if result is None:
                answers["full"] += 1
            else:
                answers[str(result[0])] += 1
                for _, value in result[3]:
                    assert value >= 1 and (kind == "n" or value <= SET_CAP)
        if rng.random() < 0.2:
            seg.release(lease, take)
        if rng.random() < 0.1:
            seg.sweep(rng.randint(1, 64))
        if step % 25 == 0:
            assert seg._verify() == ""
        step += 1
    assert seg._verify() == ""
    assert answers["True"] and answers["False"] and answers["full"] and answers["mark"]
    time.sleep(0.02)
    seg.sweep(1000)  # everything lapsed: both tables and the set pool empty again
    stats = seg.stats()
    assert (stats["keys"], stats["leases"], stats["sets"]) == (0, 0, 0)
    seg.close()


# --------------------------------------------------------------------------- processes

def _race(path: str, checks: list[Check], take: tuple[str, ...], tries: int, churn: bool,
          go: Any, out: Queue[tuple[int, int]]) -> None:
    """Admit ``tries`` leases (and with ``churn``, give back half of the taken ones at
    random); report (taken in all, still held)."""
    seg = _shm.Segment(path, CAPS["max_keys"], CAPS["max_leases"], CAPS["max_sets"])
    rng = random.Random(os.getpid())
    held: list[str] = []
    taken = 0
    go.wait()  # every process ready: they start together
    for i in range(tries):
        lease = f"{os.getpid()}-{i}"
        result = seg.admit(lease, checks, take, 60_000)
        if result is not None and result[0]:
            taken += 1
            held.append(lease)
        if churn and held and rng.random() < 0.5:
            seg.release(held.pop(rng.randrange(len(held))), take)
    out.put((taken, len(held)))


def _race_processes(path: str, checks: list[Check], take: tuple[str, ...], tries: int,
                    churn: bool = False, n: int = 4) -> list[tuple[int, int]]:
    ctx = mp.get_context("spawn")
    go = ctx.Barrier(n)
    out: Queue[tuple[int, int]] = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, checks, take, tries, churn, go, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        return [out.get(timeout=20) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=5)


def test_processes_racing_take_exactly_the_limit(path: str) -> None:
    create_segment(path, **CAPS)
    seg = segment(path)
    limit: Check = ("c", "caller:+1", 10, 0, False, "")
    rate: Check = ("r", "rate.per_caller:+2", 100.0, 900.0, False, "")  # burst 10, no refill
    # 4 processes x 2000 admits: exactly the limit taken, on every key of the take
    results = _race_processes(path, [limit], ("caller:+1", "peer:-"), 2000)
    assert sum(t for t, _ in results) == 10
    assert seg.count("caller:+1") == 10 == seg.count("peer:-")
    # the rate cell: exactly its burst
    assert sum(t for t, _ in _race_processes(path, [rate], (), 2000)) == 10
    # takes and releases racing: the count is what the processes still hold, never more
    # than the limit, and slots were reused many times
    other: Check = ("c", "callee:+3", 10, 0, False, "")
    results = _race_processes(path, [other], ("callee:+3",), 2000, churn=True)
    assert sum(t for t, _ in results) > 100
    assert seg.count("callee:+3") == sum(h for _, h in results) <= 10
    assert seg._verify() == ""
    seg.close()


def _hold(path: str, held: Any) -> None:
    seg = _shm.Segment(path, CAPS["max_keys"], CAPS["max_leases"], CAPS["max_sets"])
    seg.add("holder", ["caller:+1"], 60_000)
    seg._hold()
    held.set()
    time.sleep(60)


def _churn(path: str, started: Any) -> None:
    """Takes, releases, leases of a few ms and whole-table sweeps, until killed: a kill lands
    in the middle of a change now and then (the lock is held most of the time)."""
    seg = _shm.Segment(path, CAPS["max_keys"], CAPS["max_leases"], CAPS["max_sets"])
    started.set()
    i = 0
    while True:
        take = ("caller:+1", f"k{i % 7}", f"k{i % 11}")
        seg.admit(f"{os.getpid()}-{i % 500}", [("c", "caller:+1", 50, 0, False, "")], take,
                  1 + i % 5)
        if i % 3:
            seg.release(f"{os.getpid()}-{(i * 7) % 500}", take)
        seg.sweep(10**6)
        i += 1


async def test_a_process_killed_holding_the_lock_blocks_nobody(path: str) -> None:
    a = store(path, create=True, probe_s=0.05)
    ctx = mp.get_context("spawn")
    held = ctx.Event()
    proc = ctx.Process(target=_hold, args=(path, held))
    proc.start()
    try:
        assert held.wait(20)
        started = time.monotonic()
        assert await a.admit("L1", [caller_limit(5)], TAKE) is None  # the lock is held
        assert 0.09 < time.monotonic() - started < 1.0
        assert a.counters["state_shm_timeouts"] == 1 and a.open and a.holder == proc.pid
        assert a.release_soon("L0", TAKE) and len(a.pending) == 1  # kept for later
    finally:
        proc.kill()  # SIGKILL
        proc.join(5)
    assert await a.admit("L1", [caller_limit(5)], TAKE) is None  # the breaker: no probe yet
    a.start(asyncio.get_running_loop().call_later)  # the probe: owner dead, repaired
    for _ in range(100):
        if a.available:
            break
        await asyncio.sleep(0.01)
    assert a.available and a.counters["state_reconnected"] == 1
    assert not a.pending and a.counters["state_releases_retried"] == 1  # the kept release
    assert await a.admit("L1", [caller_limit(5)], TAKE) == (True, -1, 0, [])
    stats = a.segment.stats()
    assert stats["recovered"] == 1 and a.segment._verify() == ""
    assert await a.counts(["caller:+12125550100", "caller:+1"]) == [1, 1]  # "holder" kept
    assert a.counters["state_shm_timeouts"] == 1
    await a.close()


def _hold_until(path: str, held: Any, go: Any) -> None:
    """Take the lock and keep it until ``go`` (meanwhile the test stops this process)."""
    seg = _shm.Segment(path, CAPS["max_keys"], CAPS["max_leases"], CAPS["max_sets"])
    seg._hold()
    held.set()
    go.wait(30)
    seg._unhold()
    seg.close()


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_a_stopped_lock_holder_opens_the_breaker_until_it_lets_go(
        path: str, fail_open: bool) -> None:
    """A process holds the segment's lock and is stopped (SIGSTOP). The first INVITE waits
    the lock's 100 ms and opens the breaker (logged once, with the holder's pid); the next
    ones are decided at once by state.fail — passed and tagged (open) or 503 (closed) — and
    nothing else waits for the lock (timer, stats). Calls that end meanwhile keep their
    release. Once the holder lets go, the next probe has the lock, sends the kept releases,
    re-scores the calls admitted meanwhile, and closes the breaker: the counts are exactly
    the calls up."""
    seen: list[tuple[str, dict[str, Any]]] = []
    shm = store(path, create=True, fail_open=fail_open, retry_after_s=7, probe_s=0.1,
                log=lambda event, **fields: seen.append((event, fields)))
    h = SharedHarness("rules:\n  concurrency: {per_caller: 4}\n", shm)
    shm.tick_s = 0.05  # the timer ticks while it is open too (and asks for no lock)
    shm.start(asyncio.get_running_loop().call_later)
    caller = "caller:+12125550100"
    ctx = mp.get_context("spawn")
    held, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_until, args=(path, held, go))
    try:
        _, up = await h.invite(1)  # a call up before: counted in the segment
        assert up is not None and shm.segment.count(caller) == 1
        per_call = shm.segment.stats()["leases"]  # memberships of one call
        proc.start()
        assert held.wait(20)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)
        assert shm.segment.holder == proc.pid and shm.segment.probe(0) is False
        waits, answers = [], []
        for n in range(2, 8):
            started = time.perf_counter()
            answers.append(await h.invite(n))
            waits.append(time.perf_counter() - started)
        assert 0.09 < waits[0] < 0.5, waits  # the lock's wait, once
        # then at once: none waits the lock (one may be held up by a busy machine: it failed
        # once at 0.2 s under two test processes and other work, the others at µs)
        assert sorted(waits[1:])[-2] < 0.03 and sorted(waits[1:])[2] < 0.005, waits
        for got, fwd in answers:
            if fail_open:
                assert fwd is not None and fwd.get("x-sipguard-verdict") == "state.unavailable"
            else:
                assert fwd is None and [m.status for m in got if m.status >= 200] == [503]
                assert got[-1].get("retry-after") == "7"
        assert {v.reason for v in h.verdicts[1:]} == {"state_unavailable"}
        assert not shm.available and shm.stats() == {"state_available": 0.0,
                                                     "state_pending_releases": 0.0}
        [(event, fields)] = seen
        assert event == "state_unreachable" and fields["reason"] == "lock_timeout"
        assert fields["holder_pid"] == proc.pid and f"pid {proc.pid}" in fields["error"]
        assert fields["what"] == "admit"
        # calls end while it is open: their releases are kept, nobody waits
        started = time.perf_counter()
        h.feed(h_answer(up, 486), src=CORE)  # the call up before
        if fail_open:
            first = answers[0][1]
            assert first is not None
            h.feed(h_answer(first, 486), src=CORE)  # one admitted meanwhile
        await h.settle()
        assert await shm.counts([caller]) is None and await shm.refresh() == 0
        assert time.perf_counter() - started < 0.05
        assert len(shm.pending) == (2 if fail_open else 1)
        await asyncio.sleep(0.25)  # probes and ticks while it is still held
        assert shm.open and shm.probes >= 1
        assert shm.counters["state_shm_timeouts"] == 1  # neither waited 100 ms
        os.kill(proc.pid, signal.SIGCONT)
        go.set()
        proc.join(5)
        assert proc.exitcode == 0  # it let go (no owner-dead repair)
        for _ in range(100):
            if shm.available:
                break
            await asyncio.sleep(0.01)
        assert shm.available and shm.counters["state_reconnected"] == 1
        assert [e for e, _ in seen] == ["state_unreachable", "state_reachable"]
        reachable = seen[1][1]
        assert reachable["holder_pid"] == proc.pid and reachable["pending_releases"] == 0
        up_now = 5 if fail_open else 0  # calls 3..7 passed and are up
        assert reachable["leases_restored"] == up_now
        assert not shm.pending and shm.counters["state_releases_retried"] == (
            2 if fail_open else 1)
        stats = shm.segment.stats()
        assert shm.segment.count(caller) == up_now and stats["leases"] == per_call * up_now
        assert stats["recovered"] == 0 and shm.segment._verify() == ""
        assert shm.segment.holder == 0
        # decided by the counts again: over per_caller 4 with five up (open), else passed
        got, fwd = await h.invite(8)
        if fail_open:
            assert fwd is None and h.verdicts[-1].reason == "per_caller_exceeded"
        else:
            assert fwd is not None and shm.segment.count(caller) == 1
        assert shm.counters["state_shm_timeouts"] == 1
        assert shm.counters["state_breaker_opened"] == 1
    finally:
        if proc.pid is not None and proc.exitcode is None:
            proc.kill()
            proc.join(5)
        await shm.close()


def test_the_lock_holder_is_recorded_and_probed(path: str) -> None:
    create_segment(path, **CAPS)
    seg = segment(path)
    assert seg.holder == 0 and seg.probe(0) is True and seg.probe(10) is True
    seg._hold()
    assert seg.holder == os.getpid()
    seg._unhold()
    assert seg.holder == 0 and seg.count("k") == 0
    with pytest.raises(ValueError, match="does not hold"):
        seg._unhold()
    with pytest.raises(ValueError, match="wait_ms"):
        seg.probe(_shm.LOCK_WAIT_MS + 1)
    assert _shm.LOCK_WAIT_MS == 100
    seg.close()
    with pytest.raises(ValueError, match="closed"):
        seg.probe(0)


def test_processes_killed_at_random_leave_consistent_tables(path: str) -> None:
    create_segment(path, **CAPS)
    seg = segment(path)
    ctx = mp.get_context("spawn")
    for _ in range(3):
        started = ctx.Event()
        procs = [ctx.Process(target=_churn, args=(path, started)) for _ in range(2)]
        for p in procs:
            p.start()
        assert started.wait(20)
        time.sleep(0.15)
        for p in procs:
            p.kill()  # SIGKILL
            p.join(5)
        assert seg.count("caller:+1") <= 50  # the lock is free again (or was recovered)
        assert seg._verify() == ""
    seg.close()


# --------------------------------------------------------------------------- the policy on it

async def test_the_policy_limits_across_stores_of_one_segment(path: str) -> None:
    rules = ("rules:\n  rate: {per_caller: {rate: 100, burst: 100}}\n"
             "  concurrency: {per_caller: 2, per_callee: 5}\n")
    sa, sb = store(path, create=True), store(path)
    a, b = SharedHarness(rules, sa), SharedHarness(rules, sb)
    try:
        assert (await a.invite(1))[1] is not None
        assert (await b.invite(2))[1] is not None
        got, fwd = await a.invite(3)
        assert fwd is None and [m.status for m in got if m.status >= 200] == [403]
        assert a.verdicts[-1].reason == "per_caller_exceeded"
        assert a.verdicts[-1].detail == {"limit": "per_caller", "number": "+12125550100",
                                         "count": 2, "max": 2}
        assert await sa.counts(["caller:+12125550100", "callee:+18005550199"]) == [2, 2]
        # the store is in this host's memory: every call decided in its receive, none waited
        assert a.waited == b.waited == 0
    finally:
        await sa.close()
        await sb.close()


async def test_the_dialer_counts_and_cools_down_across_stores(path: str) -> None:
    rules = ("rules:\n  dialer:\n    distinct_callees: {tag: 3, block: 5}\n"
             "    pumping: {per_callee: {tag: 2, block: 4}}\n")
    callees = ["+16465550107", "+13035550142", "+17205550199", "+14155550123",
               "+12065550178"]
    sa, sb = store(path, create=True), store(path)
    a, b = SharedHarness(rules, sa), SharedHarness(rules, sb)
    try:
        forwarded = [(await (a if i % 2 == 0 else b).invite(i, callee=c))[1]
                     for i, c in enumerate(callees[:4])]
        assert all(f is not None for f in forwarded)
        assert forwarded[2] is not None and \
            forwarded[2].get("x-sipguard-verdict") == "dialer.distinct_callees"
        got, fwd = await a.invite(10, callee=callees[4])  # the fifth distinct: blocked
        assert fwd is None and a.verdicts[-1].reason == "distinct_callees"
        got, fwd = await b.invite(11, callee=callees[0])  # B never counted five itself
        assert fwd is None and b.verdicts[-1].reason == "distinct_callees_cooldown"
    finally:
        await sa.close()
        await sb.close()


# --------------------------------------------------------------------------- stats

async def test_stats(path: str) -> None:
    a = store(path, create=True)
    try:
        await a.admit("L1", [("h", "dialer.callees:+1", 1000, 0, False, "+2")], TAKE)
        stats = a.stats()
        assert stats["state_available"] == 1.0 and stats["state_pending_releases"] == 0.0
        assert (stats["state_shm_keys"], stats["state_shm_leases"], stats["state_shm_sets"]) \
            == (4.0, 3.0, 1.0)
        assert stats["state_shm_keys_max"] == CAPS["max_keys"]
        assert stats["state_shm_sets_max"] == CAPS["max_sets"]
    finally:
        await a.close()


async def test_a_call_forwarded_by_a_hundred_numbers_is_decided(path: str) -> None:
    """An INVITE naming 100 distinct diverting numbers (Diversion and History-Info) is
    counted under the first ``MAX_DIVERTERS`` of them: it is decided like any other call
    (the segment takes at most 64 keys per call; 100 would have been an internal error)."""
    shm = store(path, create=True)
    try:
        h = SharedHarness("rules:\n  concurrency: {per_caller: 5, per_diverter: 2}\n", shm)
        diversion = "".join(f"Diversion: <sip:+1212555{i:04d}@198.51.100.7>;reason=unconditional"
                            f"\r\n" for i in range(100))
        resp, fwd = await h.invite(1, extra=diversion)
        assert fwd is not None, [m.status for m in resp]
        assert len(fwd.values("diversion")) == 100  # passed on as it came
        counts = await shm.counts(tuple(f"diverter:+1212555{i:04d}" for i in (0, 15, 16, 99)))
        assert counts == [1, 1, 0, 0]
        assert MAX_DIVERTERS == 16
    finally:
        await shm.close()


async def test_one_invite_sent_to_two_instances_is_two_calls_in_the_shared_counts(
        path: str) -> None:
    """The same INVITE (Call-ID, tags, branch, all the caller's choice) sent to two instances
    sharing their counts is two calls at the core: it takes two slots, so two instances never
    let through twice a limit. Its lease id is of fixed size whatever the caller wrote."""
    a_store, b_store = store(path, create=True), store(path)
    try:
        rules = "rules:\n  concurrency: {per_caller: 5}\n"
        a, b = SharedHarness(rules, a_store), SharedHarness(rules, b_store)
        b.proxy.ids = build.Ids(os.urandom(32))  # another process: its own secret
        long_id = "x" * 12000
        data = invite(branch="z9hG4bK-dup", call_id=long_id)
        for h in (a, b):
            h.feed(data)
            assert to(await h.settle(), CORE)
        assert await a_store.counts(("caller:+12125550100",)) == [2]
        leases = {d.lease for h in (a, b) for d in h.proxy.dialogs.values()}
        assert len(leases) == 2 and all(len(lease) <= 32 for lease in leases)
    finally:
        await a_store.close()
        await b_store.close()
