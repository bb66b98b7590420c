"""When the cyclic garbage collector runs, and on what: short young passes, frozen survivors.

sipguard frees its calls and transactions by reference counting (the proxy breaks its own
cycles; ``tests/unit/test_no_cycles.py`` keeps it so); the cyclic collector is only the net
for a rare cycle (an exception kept with its traceback, a task). What a collector pass costs is
one visit per live container object it examines, about a microsecond each once the object has
left the CPU's caches. Under load the live objects are many: at 1,000 calls/s a minute of
surviving objects was 2.7 million (the RFC 3261 timers keep each transaction up to 32 s after
its call), and the one-minute young pass this module replaces stopped the event loop for
2.4-2.7 s every minute — seconds of retransmissions, and overload shedding.

So, with the collector's automatic runs off (the CLI disables them after freezing what startup
made; where they are on — sipguard embedded, the tests — the passes below do nothing):

- every :data:`YOUNG_EVERY_S` a young pass examines only what was made since the previous one
  and is still alive, then freezes (:func:`gc.freeze`) the survivors: moved, in constant time,
  to the permanent generation that no pass examines. A cycle made and dropped between two passes
  is collected at once; every object is examined once, while it is still warm, in pauses of a
  few milliseconds at 1,000 calls/s instead of one pause of seconds.
- a full pass unfreezes everything, examines it all, and freezes the survivors again: the net
  for a cycle that became garbage after its objects were frozen (none is known: the passes of
  the load runs found nothing). It costs the whole live heap at once — measured 0.57-0.66 s at
  1,000 calls/s with 65,000 transactions held, a pause long enough for overload shedding to
  start — so it comes due :data:`FULL_EVERY_S` after the last one and then waits for a lull:
  the proxy holding at most a quarter of the transactions and dialogs it held at its busiest
  since then (the pause is about proportional to them). Without a lull it runs at the latest
  :data:`FULL_AT_LATEST_S` after the last one. Never while overloaded (a pause then would only
  deepen the queue). Its pause is logged (``gc_full``) and exported, like the young passes'
  longest pause.
"""

from __future__ import annotations

import gc
import time
from collections import Counter

YOUNG_EVERY_S = 0.05  # a young pass (what was made since the last one) every 50 ms
FULL_EVERY_S = 3600.0  # a full pass (everything, frozen objects too) is due an hour after the last
FULL_AT_LATEST_S = 86400.0  # and runs at the next lull, or this long after the last without one
FULL_PUT_OFF_S = 10.0  # a full pass due while overloaded is tried again this much later


class Collector:
    """Runs the passes and keeps what they cost; the server calls :meth:`young` every
    :data:`YOUNG_EVERY_S` and :meth:`full` when :meth:`full_due` says so."""

    def __init__(self, counters: Counter[str], now: float) -> None:
        self.counters = counters  # gc_collected: objects the passes found unreachable
        self.full_at = now + FULL_EVERY_S
        self.last_full = now
        self.peak = 0  # most transactions and dialogs held since the last full pass
        self.young_pause_max = 0.0  # longest young pause since the last scrape, seconds
        self.full_pause = 0.0  # the last full pass's pause, seconds

    def young(self) -> int:
        """Collect what was made since the last pass; freeze what survives it."""
        if gc.isenabled():
            return 0
        start = time.perf_counter()
        found = gc.collect(1)  # generation 1 is empty between passes: this is the young set
        gc.freeze()
        pause = time.perf_counter() - start
        if pause > self.young_pause_max:
            self.young_pause_max = pause
        if found:
            self.counters["gc_collected"] += found
        return found

    def full_due(self, now: float, held: int) -> bool:
        """Is a full pass to run now, with ``held`` transactions and dialogs in the proxy?"""
        if held > self.peak:
            self.peak = held
        if now < self.full_at:
            return False
        return held <= self.peak // 4 or now >= self.last_full + FULL_AT_LATEST_S

    def full(self, now: float) -> tuple[int, float] | None:
        """Examine everything, frozen objects too; (objects found, pause in seconds), or None
        where the automatic runs are on."""
        self.full_at = now + FULL_EVERY_S
        self.last_full = now
        self.peak = 0
        if gc.isenabled():
            return None
        start = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.full_pause = time.perf_counter() - start
        self.counters["gc_full_runs"] += 1
        if found:
            self.counters["gc_collected"] += found
        return found, self.full_pause

    def put_off(self, now: float) -> None:
        self.full_at = now + FULL_PUT_OFF_S

    def take_young_pause_max(self) -> float:
        """The longest young pause since the last call (a scrape), then start again."""
        pause, self.young_pause_max = self.young_pause_max, 0.0
        return pause
