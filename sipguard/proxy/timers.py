"""A timer queue for the sans-I/O proxy: deadlines in, due callbacks out.

The proxy never reads the clock. It schedules callbacks at absolute times (``now`` values the
shell passed in), the shell asks :meth:`TimerQueue.next_deadline` when to wake it up, and calls
:meth:`TimerQueue.pop_due` with the current time.

Structure: a heap of ``(when, seq, entry)`` tuples for the timers of the current slot, and
buckets of ``SLOT_S`` (0.1 s: ``floor(when / SLOT_S)`` -> unordered list, plus a small heap of
the bucket keys) for everything later. Most long timers (B/F/C 32-180 s) are cancelled long before they are
due, and a bucketed timer is cancelled by a swap-remove from its bucket: O(1), and it is gone
at once, so cancelled far timers never touch the heap or linger in memory. When
:meth:`~TimerQueue.pop_due` reaches a bucket's start it moves that bucket's (live) entries into
the heap, and a timer added for a slot that has already been reached goes straight into the
heap; the heap thus stays small and its float-first tuples compare cheaply. The timers that
do fire (the ends of completed transactions: Timers J, K, L, 32 s or 5 s after a call's last
messages — several per call) arrive in a bucket's move all at once: with one-second buckets
that was ~4,000 heap pushes in one event-loop pass every second at 1,000 calls/s (1.6 ms
with nothing else served); a tenth of a second per bucket makes it a tenth of that, ten times
as often. Firing stays exact:
a callback comes out of the first ``pop_due(now)`` with ``now >= when``, never earlier, and
callbacks due in the same call come out in (``when``, order added) order. Cancelling an entry
already in the heap marks it dead; it is skipped when it reaches the top. A bucket start
counts as a deadline (a wake-up there only moves the bucket): at most one extra wake-up per
slot that still holds a live far timer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any, Final


class TimerEntry:
    """The handle :meth:`TimerQueue.add` returns; only :meth:`TimerQueue.cancel` uses it.

    ``callback`` is None once the timer fired or was cancelled (``arg`` is then None).
    ``bucket`` is the bucket list holding the entry, at position ``index``, while it waits in a
    bucket; None once it is in the heap, fired or cancelled.
    """

    __slots__ = ("when", "seq", "callback", "arg", "bucket", "index")

    def __init__(self, when: float, seq: int, callback: Callable[[Any, float], None],
                 arg: object) -> None:
        self.when = when
        self.seq = seq
        self.callback: Callable[[Any, float], None] | None = callback
        self.arg = arg
        self.bucket: list[TimerEntry] | None = None
        self.index = 0


_NEVER: Final = -(1 << 62)  # below every bucket: nothing has been moved yet
SLOTS_PER_S: Final = 10  # buckets of 0.1 s (SLOT_S)
SLOT_S: Final = 1.0 / SLOTS_PER_S
# pop_due moves a bucket when ``now`` is within this of its start: a start computed as
# ``key / SLOTS_PER_S`` may round a hair below ``key`` once multiplied back, and the wake-up
# that next_deadline asked for must move it (firing stays exact: the heap compares ``when``)
_EPSILON: Final = 1e-6


class TimerQueue:
    __slots__ = ("_heap", "_buckets", "_keys", "_moved", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerEntry]] = []  # due in this slot or earlier
        self._buckets: dict[int, list[TimerEntry]] = {}  # slot -> its timers, live only
        self._keys: list[int] = []  # heap of the keys of _buckets, each once
        self._moved = _NEVER  # the last pop_due's slot: every bucket up to it is in the heap
        self._seq = 0

    def add(self, when: float, callback: Callable[[Any, float], None],
            arg: object = None) -> TimerEntry:
        """Schedule ``callback(arg, now)`` at ``when``; return a handle for :meth:`cancel`.

        One argument, not ``*args``, and a callback the caller made once (a bound method kept
        by its owner), not one per timer: under load every object a timer holds is one more
        for the garbage collector's young passes (``sipguard/ops/collector.py``) to examine.
        """
        seq = self._seq + 1
        self._seq = seq
        entry = TimerEntry(when, seq, callback, arg)
        key = math.floor(when * SLOTS_PER_S)
        if key <= self._moved:
            heappush(self._heap, (when, seq, entry))
            return entry
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = []
            self._buckets[key] = bucket
            heappush(self._keys, key)
        entry.bucket = bucket
        entry.index = len(bucket)
        bucket.append(entry)
        return entry

    @staticmethod
    def cancel(entry: TimerEntry | None) -> None:
        """Cancel the timer (no-op for None or a timer that already fired or was cancelled)."""
        if entry is None:
            return
        bucket = entry.bucket
        if bucket is not None:  # swap-remove: the bucket's order does not matter
            last = bucket.pop()
            if last is not entry:
                index = entry.index
                bucket[index] = last
                last.index = index
            entry.bucket = None
        entry.callback = None
        entry.arg = None  # drop the references, so no cycle outlives the timer

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or an earlier bucket start; None when nothing is held."""
        heap = self._heap
        while heap and heap[0][2].callback is None:
            heappop(heap)
        keys = self._keys
        buckets = self._buckets
        while keys and not buckets[keys[0]]:  # every timer in it was cancelled
            del buckets[heappop(keys)]
        if keys:
            start = keys[0] / SLOTS_PER_S
            if not heap or start < heap[0][0]:
                return start
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[tuple[Callable[[Any, float], None], object]]:
        """Remove and return the live callbacks whose deadline is at or before ``now``, with
        their arguments."""
        until = math.floor(now * SLOTS_PER_S + _EPSILON)
        if until > self._moved:
            self._move(until)
        heap = self._heap
        due: list[tuple[Callable[[Any, float], None], object]] = []
        while heap and heap[0][0] <= now:
            entry = heappop(heap)[2]
            callback = entry.callback
            if callback is not None:
                due.append((callback, entry.arg))
                entry.callback = None  # fired: its owner may still hold the entry
                entry.arg = None
        return due

    def _move(self, until: int) -> None:
        """Move every bucket up to slot ``until`` into the heap: only the buckets held are
        visited, however far the clock jumped."""
        self._moved = until  # from now on, add() puts timers up to ``until`` in the heap
        heap = self._heap
        keys = self._keys
        buckets = self._buckets
        while keys and keys[0] <= until:
            for entry in buckets.pop(heappop(keys)):
                entry.bucket = None
                heappush(heap, (entry.when, entry.seq, entry))

    def __len__(self) -> int:
        """Entries held: every one in the heap (live, or cancelled and not yet skipped) and
        every one waiting in a bucket (always live: cancelling removes it)."""
        n = len(self._heap)
        for bucket in self._buckets.values():
            n += len(bucket)
        return n
