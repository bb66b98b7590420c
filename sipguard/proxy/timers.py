"""A timer queue for the sans-I/O proxy: deadlines in, due callbacks out.

The proxy never reads the clock. It schedules callbacks at absolute times (``now`` values the
shell passed in), the shell asks :meth:`TimerQueue.next_deadline` when to wake it up, and calls
:meth:`TimerQueue.pop_due` with the current time. Cancelling is O(1): the entry is marked dead
and skipped when it reaches the head of the heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

TimerEntry = list[Any]  # [when, seq, callback | None, args]


class TimerQueue:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[TimerEntry] = []
        self._seq = 0

    def add(self, when: float, callback: Callable[..., None], *args: Any) -> TimerEntry:
        """Schedule ``callback(*args, now)`` at ``when``; return a handle for :meth:`cancel`."""
        self._seq += 1
        entry: TimerEntry = [when, self._seq, callback, args]
        heapq.heappush(self._heap, entry)
        return entry

    @staticmethod
    def cancel(entry: TimerEntry | None) -> None:
        if entry is not None:
            entry[2] = None
            entry[3] = ()  # drop the references, so no cycle outlives the timer

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
        """Remove and return the live callbacks whose deadline is at or before ``now``."""
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            cb, args = entry[2], entry[3]
            entry[2], entry[3] = None, ()  # fired: its owner may still hold the entry
            if cb is not None:
                due.append((cb, args))
        return due

    def __len__(self) -> int:
        return len(self._heap)
