"""The state layer: the expiry wheel and the in-memory lease store."""

from __future__ import annotations

import asyncio
import math
import random

from sipguard.state.base import SyncLeaseStore
from sipguard.state.expiry import ExpiryWheel
from sipguard.state.memory import MemoryLeases

# ------------------------------------------------------------------------------ wheel


def test_wheel_pops_keys_at_their_second_never_early() -> None:
    """A key due at 10.2 comes out at 11.0, not at 10.9; earlier slots first."""
    w: ExpiryWheel[str] = ExpiryWheel()
    w.set("b", 10.2)
    w.set("a", 5.0)
    assert w.pop_due(4.9) == []
    assert w.pop_due(5.0) == ["a"]
    assert w.pop_due(10.9) == []
    assert w.pop_due(11.0) == ["b"]
    assert len(w) == 0


def test_wheel_moves_and_discards_keys() -> None:
    """Setting a key again moves it; discarding frees it; neither leaves a slot behind."""
    w: ExpiryWheel[str] = ExpiryWheel()
    w.set("a", 100.0)
    w.set("a", 50.0)
    w.set("b", 60.0)
    w.discard("b")
    w.discard("nope")
    assert w.when("a") == 50 and "b" not in w
    assert w.pop_due(49.0) == []
    assert w.pop_due(55.0) == ["a"]
    assert w._slots == {}


def test_wheel_key_set_in_the_past_is_due_at_the_next_pop() -> None:
    """A key whose time already went by is returned by the next pop, not lost."""
    w: ExpiryWheel[str] = ExpiryWheel()
    w.pop_due(100.0)
    w.set("late", 20.0)
    assert w.pop_due(100.5) == []  # same second as the last pop
    assert w.pop_due(101.0) == ["late"]


def test_wheel_matches_a_naive_model_over_random_operations() -> None:
    """Random set / discard / pop sequences return exactly the keys a naive model says are due:
    slot ceil(when), or the next second when that slot was already swept."""
    rng = random.Random(7)
    w: ExpiryWheel[int] = ExpiryWheel()
    model: dict[int, int] = {}  # key -> slot
    now, done = 0.0, None
    for _ in range(20000):
        op = rng.random()
        key = rng.randrange(300)
        if op < 0.5:
            when = now + rng.uniform(-5, 200)
            w.set(key, when)
            slot = math.ceil(when)
            model[key] = done + 1 if done is not None and slot <= done else slot
        elif op < 0.7:
            w.discard(key)
            model.pop(key, None)
        else:
            now += rng.choice([0.3, 1.0, 2.5, 40.0])
            done = math.floor(now)
            got = w.pop_due(now)
            assert set(got) == {k for k, slot in model.items() if slot <= done}
            assert [model[k] for k in got] == sorted(model[k] for k in got)
            for k in got:
                del model[k]
    assert len(w) == len(model)


# ------------------------------------------------------------------------------ leases


def test_memory_store_is_a_sync_lease_store() -> None:
    """MemoryLeases offers the synchronous fast paths the rules use on the hot path."""
    assert isinstance(MemoryLeases(), SyncLeaseStore)


def test_lease_counts_each_key_once_and_release_is_idempotent() -> None:
    """A lease adds one per distinct key; releasing twice or an unknown lease changes nothing."""
    s = MemoryLeases()
    assert s.acquire_now("l1", ["caller:1", "callee:2", "caller:1"], 100.0, 0.0)
    assert s.acquire_now("l2", ["caller:1"], 100.0, 0.0)
    assert not s.acquire_now("l1", ["caller:1"], 200.0, 0.0)  # held: only a refresh
    assert s.count_now("caller:1") == 2 and s.count_now("callee:2") == 1
    assert s.release_now("l1", 1.0)
    assert not s.release_now("l1", 1.0)
    assert not s.release_now("never", 1.0)
    assert s.snapshot_now() == {"caller:1": 1}
    assert s.release_now("l2", 1.0)
    assert s.snapshot_now() == {} and s.underflows == 0 and len(s) == 0


def test_lease_expires_unless_refreshed() -> None:
    """A lease lapses at its expiry; a refresh pushes that back; expiry is counted."""
    s = MemoryLeases()
    s.acquire_now("a", ["k"], 10.0, 0.0)
    s.acquire_now("b", ["k"], 10.0, 0.0)
    assert s.refresh_now("b", 50.0, 5.0)
    assert not s.refresh_now("zzz", 50.0, 5.0)
    assert s.expire_now(10.0) == 1
    assert s.count_now("k") == 1 and s.expired == 1
    assert s.expire_now(50.0) == 1
    assert s.snapshot_now() == {}


def test_snapshot_filters_by_prefix() -> None:
    """snapshot_now(prefix) returns only the keys of one kind."""
    s = MemoryLeases()
    s.acquire_now("a", ["caller:1", "peer:x"], 10.0, 0.0)
    assert s.snapshot_now("peer:") == {"peer:x": 1}


def test_async_interface_matches_the_sync_one() -> None:
    """The awaitable LeaseStore methods act on the same state as the fast paths."""
    s = MemoryLeases()

    async def run() -> None:
        assert await s.acquire("a", ["k1", "k2"], 10.0, 0.0)
        assert await s.counts(["k1", "k3"], 0.0) == [1, 0]
        assert await s.refresh("a", 20.0, 0.0)
        assert await s.lease_ids(0.0) == ["a"]
        assert await s.snapshot("k2", 0.0) == {"k2": 1}
        assert await s.expire(15.0) == 0
        assert await s.release("a", 16.0)
        assert await s.expire(30.0) == 0

    asyncio.run(run())
