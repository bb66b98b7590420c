"""A one-second timing wheel: keys with an expiry time in, the keys that are due out.

Used for dialog expiry in the proxy core and lease expiry in the memory backend. Unlike a heap
with lazy deletion, removing a key frees its entry at once — a dialog that ends long before its
expiry leaves nothing behind — and moving a key (a refreshed session timer) is O(1) too, so
expiry times need not arrive in order.

A key set to expire at ``when`` lands in slot ``ceil(when)`` and is returned by the first
:meth:`ExpiryWheel.pop_due` call with ``now >= ceil(when)``: never early, at most one second
late. Nothing here reads the clock; the caller passes ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class ExpiryWheel(Generic[K]):
    __slots__ = ("_slots", "_at", "_done")

    def __init__(self) -> None:
        self._slots: dict[int, dict[K, None]] = {}  # second -> keys due then (insertion order)
        self._at: dict[K, int] = {}  # key -> its slot
        self._done: int | None = None  # every slot up to this second has been popped

    def set(self, key: K, when: float) -> None:
        """Make ``key`` due at ``when`` (adding it, or moving it if present)."""
        slot = math.ceil(when)
        done = self._done
        if done is not None and slot <= done:
            slot = done + 1  # already in the past: due at the next pop
        old = self._at.get(key)
        if old == slot:
            return
        if old is not None:
            self._unlink(key, old)
        self._at[key] = slot
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = {key: None}
        else:
            bucket[key] = None

    def discard(self, key: K) -> None:
        """Forget ``key`` (no-op when absent)."""
        old = self._at.pop(key, None)
        if old is not None:
            self._unlink(key, old)

    def _unlink(self, key: K, slot: int) -> None:
        bucket = self._slots[slot]
        del bucket[key]
        if not bucket:
            del self._slots[slot]

    def pop_due(self, now: float) -> list[K]:
        """Remove and return every key due at or before ``now``, earliest slot first."""
        until = math.floor(now)
        done = self._done
        if done is not None and until <= done:
            return []
        slots = self._slots
        self._done = until
        if not slots:
            return []
        if done is None or until - done > len(slots):
            due = sorted(s for s in slots if s <= until)  # a long gap: look at what exists
        else:
            due = [s for s in range(done + 1, until + 1) if s in slots]
        out: list[K] = []
        at = self._at
        for s in due:
            for key in slots.pop(s):
                del at[key]
                out.append(key)
        return out

    def when(self, key: K) -> int | None:
        """The slot (whole second) ``key`` is due in, or None."""
        return self._at.get(key)

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: object) -> bool:
        return key in self._at
