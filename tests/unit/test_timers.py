"""The proxy's timer queue: exact firing, order, cancelling, next_deadline, bounded work."""

from __future__ import annotations

import gc
import math
import random
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sipguard.proxy.timers import SLOT_S, SLOTS_PER_S, TimerEntry, TimerQueue

BASE = 1_234_567.25  # a loop.time()-like clock value


def run(q: TimerQueue, now: float) -> None:
    """What the proxy does: call every due callback with its argument and ``now``."""
    for callback, arg in q.pop_due(now):
        callback(arg, now)


def names(due: list[tuple[Callable[[Any, float], None], object]]) -> list[Any]:
    return [arg for _, arg in due]


def noop(*args: Any) -> None:
    pass


@pytest.fixture
def no_auto_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("when", [0.0, 1000.0, 1000.5, 1000.999999, BASE + 32.0, BASE + 0.5])
def test_fires_at_when_never_a_hair_earlier(when: float) -> None:
    """Due at ``now == when``, not at the float just below, whether bucketed or not."""
    for primed in (False, True):
        q = TimerQueue()
        if primed:  # the current second has been reached: the timer goes straight to the heap
            q.pop_due(when - 0.25)
        q.add(when, noop, "t")
        just_before = when - 1e-9 if when else -1e-9
        assert names(q.pop_due(just_before)) == []
        assert names(q.pop_due(when)) == ["t"]
        assert names(q.pop_due(when + 100.0)) == []
        assert len(q) == 0


def test_bucket_start_boundary() -> None:
    """A timer at an exact second and one just before it, added long in advance."""
    q = TimerQueue()
    q.add(BASE + 10.0 - 1.25, noop, "a")  # BASE is x.25: this one is at an integer second
    q.add(BASE + 10.0 - 1.25 - 1e-6, noop, "b")
    assert names(q.pop_due(BASE + 10.0 - 1.25 - 2e-6)) == []
    assert names(q.pop_due(BASE + 10.0 - 1.25 - 1e-6)) == ["b"]
    assert names(q.pop_due(BASE + 10.0 - 1.25 - 1e-9)) == []
    assert names(q.pop_due(BASE + 10.0 - 1.25)) == ["a"]


def test_time_going_backwards_is_harmless() -> None:
    q = TimerQueue()
    q.pop_due(50.0)
    q.add(10.0, noop, "past")  # already due
    q.add(60.0, noop, "later")
    assert names(q.pop_due(40.0)) == ["past"]
    assert names(q.pop_due(59.0)) == []
    assert names(q.pop_due(60.0)) == ["later"]


# ------------------------------------------------------------------------------ order


def test_same_pop_comes_out_in_when_then_insertion_order() -> None:
    q = TimerQueue()
    q.add(105.0, noop, "d")
    q.add(101.5, noop, "b1")
    q.add(100.2, noop, "a")
    q.add(101.5, noop, "b2")
    q.add(103.0, noop, "c")
    q.add(101.5, noop, "b3")
    assert names(q.pop_due(104.0)) == ["a", "b1", "b2", "b3", "c"]
    assert names(q.pop_due(105.0)) == ["d"]


def test_order_across_a_bucket_move() -> None:
    """Timers of one second added before and after it was moved keep their insertion order."""
    q = TimerQueue()
    q.add(10.5, noop, "early1")  # bucket 10
    q.add(10.25, noop, "earliest")
    q.add(11.5, noop, "next1")  # bucket 11
    assert names(q.pop_due(10.0)) == []  # moves bucket 10
    q.add(10.5, noop, "early2")  # straight into the heap
    q.add(11.5, noop, "next2")  # bucket 11, not yet moved
    q.add(10.25, noop, "earliest2")
    assert names(q.pop_due(11.5)) == ["earliest", "earliest2", "early1", "early2", "next1",
                                      "next2"]


def test_callback_gets_its_argument_then_now() -> None:
    got: list[tuple[Any, ...]] = []
    q = TimerQueue()
    q.add(5.0, lambda *a: got.append(a), (1, "two"))
    q.add(5.0, lambda *a: got.append(a))
    run(q, 7.5)
    assert got == [((1, "two"), 7.5), (None, 7.5)]


# ------------------------------------------------------------------------------ cancel


def test_cancel_none_and_twice_and_after_firing() -> None:
    q = TimerQueue()
    TimerQueue.cancel(None)
    e = q.add(1.0, noop, "x")
    assert names(q.pop_due(1.0)) == ["x"]
    TimerQueue.cancel(e)  # fired already: nothing happens
    TimerQueue.cancel(e)
    f = q.add(2.0, noop, "y")
    TimerQueue.cancel(f)
    TimerQueue.cancel(f)
    assert names(q.pop_due(10.0)) == []
    assert len(q) == 0


def test_cancel_before_the_bucket_moves_frees_it_at_once() -> None:
    """A far timer cancelled in its bucket is gone from the queue; the others keep their order."""
    q = TimerQueue()
    entries = [q.add(BASE + 32.0 + i / 100, noop, i) for i in range(10)]
    assert len(q) == 10
    for i in (0, 9, 4, 5):  # first, last, middle: the swap-remove moves others around
        TimerQueue.cancel(entries[i])
    assert len(q) == 6
    assert names(q.pop_due(BASE + 40.0)) == [1, 2, 3, 6, 7, 8]
    assert len(q) == 0


def test_cancel_after_the_bucket_moved() -> None:
    q = TimerQueue()
    a = q.add(20.02, noop, "a")
    b = q.add(20.07, noop, "b")
    q.pop_due(20.0)  # their bucket (20.0 to 20.1) is in the heap now
    TimerQueue.cancel(a)
    assert len(q) == 2  # a is dead but still held until skipped
    assert names(q.pop_due(20.05)) == []
    assert len(q) == 1
    TimerQueue.cancel(b)
    assert q.next_deadline() is None
    assert len(q) == 0


def test_cancel_every_timer_of_a_bucket() -> None:
    q = TimerQueue()
    es = [q.add(30.0 + i / 10, noop, i) for i in range(5)]
    q.add(40.0, noop, "keep")
    for e in es:
        TimerQueue.cancel(e)
    assert q.next_deadline() == 40.0  # the emptied bucket is no deadline
    assert names(q.pop_due(40.0)) == ["keep"]


def test_handles_drop_their_references(no_auto_gc: None) -> None:
    """After firing or cancelling, in a bucket or in the heap, nothing keeps the argument
    alive."""

    class Payload:
        pass

    q = TimerQueue()
    refs: list[weakref.ref[Payload]] = []
    handles: list[TimerEntry] = []
    for when in (100.0, 100.3, 100.4, 200.0):
        p = Payload()
        refs.append(weakref.ref(p))
        handles.append(q.add(when, noop, p))
        del p
    q.pop_due(99.0)
    TimerQueue.cancel(handles[0])  # bucketed
    q.pop_due(100.0)  # bucket 100 moved
    TimerQueue.cancel(handles[1])  # in the heap
    q.pop_due(100.4)  # handles[2] fires
    q.pop_due(200.0)  # handles[3] fires from its bucket
    for h in handles:
        assert h.callback is None and h.arg is None and h.bucket is None
    assert [r() for r in refs] == [None, None, None, None]
    assert gc.collect() == 0


# ------------------------------------------------------------------------------ next_deadline


def test_next_deadline_empty() -> None:
    q = TimerQueue()
    assert q.next_deadline() is None
    q.pop_due(BASE)
    assert q.next_deadline() is None


def test_next_deadline_only_near() -> None:
    q = TimerQueue()
    q.pop_due(BASE)
    q.add(BASE + 0.5, noop, "a")  # BASE is x.25: same second, straight into the heap
    q.add(BASE + 0.25, noop, "b")
    assert q.next_deadline() == BASE + 0.25


def test_next_deadline_only_far() -> None:
    """Far timers: the next bucket's start, a wake-up that moves it, then the exact deadline."""
    q = TimerQueue()
    q.pop_due(BASE)
    q.add(BASE + 32.57, noop, "a")  # its bucket starts SLOT_S or less before it
    start = math.floor((BASE + 32.57) * SLOTS_PER_S) / SLOTS_PER_S
    assert BASE + 32.57 - SLOT_S < start < BASE + 32.57
    assert q.next_deadline() == start
    assert names(q.pop_due(start)) == []
    assert q.next_deadline() == BASE + 32.57
    assert names(q.pop_due(BASE + 32.57)) == ["a"]
    assert q.next_deadline() is None


def test_next_deadline_mixed() -> None:
    q = TimerQueue()
    q.pop_due(10.0)
    q.add(10.05, noop, "near")  # the slot reached: straight into the heap
    q.add(42.55, noop, "far")
    assert q.next_deadline() == 10.05
    assert names(q.pop_due(10.05)) == ["near"]
    assert q.next_deadline() == 42.5  # its bucket's start
    q.add(10.09, noop, "near2")
    assert q.next_deadline() == 10.09
    q.add(41.55, noop, "far2")  # earlier bucket
    assert names(q.pop_due(10.09)) == ["near2"]
    assert q.next_deadline() == 41.5


def test_a_wake_up_at_a_bucket_start_always_moves_it() -> None:
    """next_deadline's bucket start, computed back from the slot number, may round a hair
    below the slot: the wake-up there still moves the bucket, so the next deadline is the
    timer's own (never the same start again: a shell would spin on it)."""
    rng = random.Random(11)
    for _ in range(2000):
        q = TimerQueue()
        now = rng.uniform(0, 1e7)
        q.pop_due(now)
        when = now + rng.uniform(1, 60)
        q.add(when, noop, "t")
        start = q.next_deadline()
        assert start is not None and start <= when
        assert names(q.pop_due(start)) == ([] if start < when else ["t"])
        if start < when:
            assert q.next_deadline() == when


def test_a_bucket_move_is_one_slot_of_timers() -> None:
    """10,000 timers due over one second, added long before: reaching any instant moves only
    the slots up to it, so no event-loop pass pushes the whole second into the heap."""
    q = TimerQueue()
    q.pop_due(100.0)
    for i in range(10_000):
        q.add(200.0 + i / 10_000, noop, i)
    fired = names(q.pop_due(200.0 + SLOT_S / 2))
    assert fired == list(range(501))  # 200.05 included
    assert len(q._heap) <= 10_000 * SLOT_S  # the rest of the first slot only


def test_next_deadline_only_dead() -> None:
    q = TimerQueue()
    q.pop_due(10.0)
    near = [q.add(10.5, noop, i) for i in range(3)]
    far = [q.add(50.5 + i, noop, i) for i in range(3)]
    for e in near + far:
        TimerQueue.cancel(e)
    assert q.next_deadline() is None
    assert len(q) == 0


def test_next_deadline_dead_top_live_below() -> None:
    q = TimerQueue()
    q.pop_due(10.0)
    a = q.add(10.25, noop, "a")
    q.add(10.5, noop, "b")
    TimerQueue.cancel(a)
    assert q.next_deadline() == 10.5


# ------------------------------------------------------------------------------ time jumps


def test_large_time_jumps_do_bounded_work() -> None:
    """Hours (or aeons) between pops: only the buckets that exist are visited."""
    q = TimerQueue()
    q.add(BASE + 1.5, noop, "a")
    q.add(BASE + 3 * 3600.0, noop, "b")
    q.add(1e15, noop, "c")  # iterating every second up to it would never finish
    t0 = time.process_time()
    assert names(q.pop_due(BASE + 5 * 3600.0)) == ["a", "b"]
    assert q.next_deadline() == 1e15
    assert names(q.pop_due(1e15)) == ["c"]
    q.add(1e15 + 7200.0, noop, "d")
    assert names(q.pop_due(2e15)) == ["d"]
    assert time.process_time() - t0 < 1.0
    assert len(q) == 0


def test_many_timers_many_seconds() -> None:
    """A proxy-like mix over ten minutes of simulated time: every timer not cancelled before it
    was due fires exactly once, at or after its deadline."""
    rng = random.Random(7)
    q = TimerQueue()
    now = BASE
    pending: dict[int, float] = {}
    fired: list[int] = []
    cancelled: set[int] = set()
    handles: list[TimerEntry] = []

    def fire(i: int, t: float) -> None:
        assert t >= pending.pop(i)
        fired.append(i)

    for _ in range(60_000):
        now += 0.01
        for _ in range(2):
            when = now + rng.choice((0.5, 4.0, 5.0, 32.0, 180.0))
            pending[len(handles)] = when
            handles.append(q.add(when, fire, len(handles)))
        if rng.random() < 0.7:
            victim = rng.randrange(len(handles))
            TimerQueue.cancel(handles[victim])
            if pending.pop(victim, None) is not None:
                cancelled.add(victim)
        run(q, now)
    run(q, now + 1000.0)
    assert pending == {}
    assert len(set(fired)) == len(fired)
    assert sorted(fired + list(cancelled)) == list(range(len(handles)))
    assert len(q) == 0


# ------------------------------------------------------------------------------ reference


class Reference:
    """Trivially correct: a sorted list of (when, seq, name), cancelled ones removed."""

    def __init__(self) -> None:
        self.items: list[tuple[float, int, int]] = []
        self.seq = 0

    def add(self, when: float, name: int) -> tuple[float, int, int]:
        self.seq += 1
        item = (when, self.seq, name)
        self.items.append(item)
        self.items.sort()
        return item

    def cancel(self, item: tuple[float, int, int]) -> None:
        if item in self.items:
            self.items.remove(item)

    def pop_due(self, now: float) -> list[int]:
        due = [i for i in self.items if i[0] <= now]
        self.items = [i for i in self.items if i[0] > now]
        return [name for _, _, name in due]

    def earliest(self) -> float | None:
        return self.items[0][0] if self.items else None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_a_sorted_list_reference(seed: int) -> None:
    rng = random.Random(seed)
    q = TimerQueue()
    ref = Reference()
    handles: list[tuple[TimerEntry, tuple[float, int, int]]] = []
    now = rng.choice((0.0, 1000.0, BASE))
    name = 0
    for _ in range(4000):
        op = rng.random()
        if op < 0.45:
            kind = rng.random()
            if kind < 0.3:
                when = now + rng.choice((0.0, 0.5, 1.0, 4.0, 5.0, 32.0, 180.0))
            elif kind < 0.5:
                when = float(int(now) + rng.randrange(0, 5))  # exactly on a second
            elif kind < 0.6:
                when = now - rng.random() * 3  # already in the past
            elif kind < 0.7:
                when = now + rng.choice((1e-9, -1e-9, 1 - 1e-9))
            else:
                when = now + rng.random() * rng.choice((1.0, 10.0, 200.0))
            handles.append((q.add(when, noop, name), ref.add(when, name)))
            name += 1
        elif op < 0.65 and handles:
            entry, item = handles[rng.randrange(len(handles))]
            TimerQueue.cancel(entry)
            ref.cancel(item)
        elif op < 0.8:
            deadline = q.next_deadline()
            earliest = ref.earliest()
            if earliest is None:
                assert deadline is None
            else:
                assert deadline is not None and deadline <= earliest
                if earliest > now:
                    assert deadline > now  # no wake-up for nothing in the past
                # wake up like the shell: at most one extra wake-up, then the real deadline
                for _ in range(2):
                    now = max(now, deadline)
                    due = names(q.pop_due(now))
                    expected = ref.pop_due(now)
                    assert due == expected
                    if due:
                        break
                    deadline = q.next_deadline()
                    assert deadline is not None
                else:
                    pytest.fail("no timer came out after two wake-ups")
        else:
            step = rng.choice((0.0, 1e-9, 0.01, 0.3, 0.5, 1.0, 2.7, 40.0, 3600.0))
            if rng.random() < 0.1 and now > 10:
                step = -rng.random()  # a caller may pass an older now: nothing breaks
            now += step
            assert names(q.pop_due(now)) == ref.pop_due(now)
        assert len(q) >= len(ref.items)
    now += 1e6
    assert names(q.pop_due(now)) == ref.pop_due(now)
    assert q.next_deadline() is None
    assert len(q) == 0
