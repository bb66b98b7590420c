"""Bounded, self-expiring tables and sliding-window counters for the rate and dialer rules.

Theory of operation
-------------------
Both rules keep a little state per caller number, called number, peer or source address, and
see millions of numbers that call once and never again. Memory must follow the numbers active
*now*, not every number ever seen, at O(1) per call and without a timer that walks the table.

:class:`Generations` does that with two plain dicts, the *current* and the *previous*
generation. Every write goes to the current one (a key found in the previous one moves over);
once per ``horizon`` seconds the previous generation is dropped whole and the current one
becomes the previous. A key therefore survives at least ``horizon`` seconds after its last
write and at most twice that. A rule sets ``horizon`` to the longest time its state for a key
means anything (a GCRA bucket's time to drain, an analytics window), so what is dropped is
always expired. A dict used as a FIFO (delete from the front, append at the back) would do the
same key by key, but CPython dicts skip deleted front slots linearly, which turns such a queue
quadratic; whole-dict drops cost nothing.

The tables are capped (``max_keys``, current and previous together): a write that would go
beyond the cap rotates the generations early, forgetting the previous generation even though
some of it may still be live (counted in ``dropped``). That is the fail-open bound on memory
under a flood of distinct keys.

:class:`Count` and :class:`Pair` are sliding-window counters of fixed size: the current fixed
window and the previous one, the previous weighted by how much of it the sliding window still
covers (the usual sliding-window-counter approximation; exact when events are spread evenly,
and never off by more than the previous window's count).

Nothing here reads the clock: every method takes ``now`` in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class Generations(Generic[V]):
    """Key -> value for the keys written within the last ``horizon`` (up to 2x) seconds."""

    __slots__ = ("cur", "prev", "horizon", "rotated", "max_keys", "dropped")

    def __init__(self, horizon: float, max_keys: int) -> None:
        self.cur: dict[str, V] = {}
        self.prev: dict[str, V] = {}
        self.horizon = horizon
        self.rotated = float("-inf")
        self.max_keys = max_keys
        self.dropped = 0  # keys forgotten early because the table was full

    def need(self, horizon: float, max_keys: int | None = None) -> None:
        """Make the horizon at least ``horizon`` (a rule built with a longer window); a new
        ``max_keys`` replaces the cap."""
        if horizon > self.horizon:
            self.horizon = horizon
        if max_keys is not None:
            self.max_keys = max_keys

    def _rotate(self, now: float) -> None:
        # Everything in ``prev`` was written before the last rotation, at least one horizon
        # ago: expired. What is in ``cur`` may be recent: it gets one more horizon.
        self.prev = self.cur
        self.cur = {}
        self.rotated = now

    def get(self, key: str, now: float) -> V | None:
        """The value of ``key``, or None; a key read from the previous generation moves into
        the current one (it is in use)."""
        if now - self.rotated >= self.horizon:
            self._rotate(now)
        value = self.cur.get(key)
        if value is None and self.prev:
            value = self.prev.pop(key, None)
            if value is not None:
                self._insert(key, value)
        return value

    def obtain(self, key: str, factory: Callable[[], V], now: float) -> V:
        """The value of ``key`` (as :meth:`get`), created with ``factory()`` when absent."""
        if now - self.rotated >= self.horizon:
            self._rotate(now)
        value = self.cur.get(key)
        if value is None:
            if self.prev:
                value = self.prev.pop(key, None)
            if value is None:
                value = factory()
            self._insert(key, value)
        return value

    def peek(self, key: str) -> V | None:
        """The value of ``key`` without touching it (None when absent)."""
        value = self.cur.get(key)
        return self.prev.get(key) if value is None else value

    def put(self, key: str, value: V, now: float) -> None:
        if now - self.rotated >= self.horizon:
            self._rotate(now)
        cur = self.cur
        if key in cur:
            cur[key] = value
            return
        if self.prev:
            self.prev.pop(key, None)
        self._insert(key, value)

    def _insert(self, key: str, value: V) -> None:
        cur = self.cur
        if len(cur) + len(self.prev) >= self.max_keys:
            self.dropped += len(self.prev)  # full: forget the older generation now
            if len(cur) >= self.max_keys:  # the current one alone is full: it goes too
                self.dropped += len(cur)
                cur = {}
            self.prev = cur
            cur = self.cur = {}
        cur[key] = value

    def pop(self, key: str) -> V | None:
        value = self.cur.pop(key, None)
        return self.prev.pop(key, None) if value is None else value

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)

    def items(self) -> Iterator[tuple[str, V]]:
        yield from self.prev.items()
        yield from self.cur.items()


class Count:
    """Events in the last ``width`` seconds (sliding-window counter approximation).

    Counts are ints (small ones are shared objects in CPython: no allocation per event)."""

    __slots__ = ("epoch", "cur", "prev")

    def __init__(self) -> None:
        self.epoch = 0
        self.cur = 0
        self.prev = 0

    def add(self, now: float, width: float, n: int = 1) -> float:
        """Count ``n`` events at ``now``; returns the estimate including them."""
        self._roll(now, width)
        self.cur += n
        return self._estimate(now, width)

    def value(self, now: float, width: float) -> float:
        self._roll(now, width)
        return self._estimate(now, width)

    def _roll(self, now: float, width: float) -> None:
        epoch = int(now // width)
        if epoch != self.epoch:
            self.prev = self.cur if epoch == self.epoch + 1 else 0
            self.cur = 0
            self.epoch = epoch

    def _estimate(self, now: float, width: float) -> float:
        if not self.prev:
            return self.cur
        covered = 1.0 - (now - self.epoch * width) / width  # share of the previous window
        return self.cur + self.prev * covered


class Pair:
    """Two counts over the same sliding window (a ratio's numerator and denominator)."""

    __slots__ = ("epoch", "a", "b", "pa", "pb")

    def __init__(self) -> None:
        self.epoch = 0
        self.a = self.b = self.pa = self.pb = 0

    def add(self, now: float, width: float, a: int, b: int) -> None:
        self._roll(now, width)
        self.a += a
        self.b += b

    def values(self, now: float, width: float) -> tuple[float, float]:
        """(a, b) over the sliding window ending at ``now``."""
        self._roll(now, width)
        if not self.pb:
            return self.a, self.b
        covered = 1.0 - (now - self.epoch * width) / width
        return self.a + self.pa * covered, self.b + self.pb * covered

    def _roll(self, now: float, width: float) -> None:
        epoch = int(now // width)
        if epoch != self.epoch:
            if epoch == self.epoch + 1:
                self.pa, self.pb = self.a, self.b
            else:
                self.pa = self.pb = 0
            self.a = self.b = 0
            self.epoch = epoch
