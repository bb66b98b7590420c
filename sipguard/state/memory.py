"""The embedded state backend: leases and counts in this process's memory.

Counts live in one dict (key -> live leases naming it); a key whose count drops to zero is
deleted, so memory follows the live calls, not every number ever seen. Leases live in another
dict (lease -> its keys) and in an :class:`ExpiryWheel` for their expiry. Every operation is
O(number of keys of the lease), whatever the number of leases or keys held.

A count is changed only by adding or removing a lease, so it equals the number of live leases
naming the key at all times and cannot go below zero; ``underflows`` counts the impossible
case anyway, so a test (or a metric) can prove it stayed at zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sipguard.state.expiry import ExpiryWheel


class MemoryLeases:
    """:class:`sipguard.state.base.SyncLeaseStore` in a dict."""

    __slots__ = ("_counts", "_leases", "_expiry", "expired", "underflows")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._leases: dict[str, tuple[str, ...]] = {}
        self._expiry: ExpiryWheel[str] = ExpiryWheel()
        self.expired = 0  # leases released by their expiry rather than by their holder
        self.underflows = 0  # counts that would have gone below zero (must stay 0)

    # ------------------------------------------------------------------ synchronous
    def acquire_now(self, lease: str, keys: Sequence[str], expires: float, now: float) -> bool:
        if lease in self._leases:
            self._expiry.set(lease, expires)
            return False
        held = tuple(dict.fromkeys(keys))
        counts = self._counts
        for key in held:
            counts[key] = counts.get(key, 0) + 1
        self._leases[lease] = held
        self._expiry.set(lease, expires)
        return True

    def take_now(
        self,
        lease: str,
        keys: Sequence[str],
        limits: Sequence[tuple[str, int]],
        expires: float,
        now: float,
    ) -> tuple[int, int]:
        if lease not in self._leases:
            counts = self._counts
            for i, (key, most) in enumerate(limits):
                count = counts.get(key, 0)
                if count >= most:
                    return i, count
        self.acquire_now(lease, keys, expires, now)
        return -1, 0

    def refresh_now(self, lease: str, expires: float, now: float) -> bool:
        if lease not in self._leases:
            return False
        self._expiry.set(lease, expires)
        return True

    def release_now(self, lease: str, now: float) -> bool:
        held = self._leases.pop(lease, None)
        if held is None:
            return False
        self._expiry.discard(lease)
        counts = self._counts
        for key in held:
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                if left < 0:
                    self.underflows += 1
                counts.pop(key, None)
        return True

    def count_now(self, key: str) -> int:
        return self._counts.get(key, 0)

    def snapshot_now(self, prefix: str = "") -> dict[str, int]:
        if not prefix:
            return dict(self._counts)
        return {k: n for k, n in self._counts.items() if k.startswith(prefix)}

    def lease_ids_now(self) -> Iterable[str]:
        return list(self._leases)

    def expire_now(self, now: float) -> int:
        due = self._expiry.pop_due(now)
        n = 0
        for lease in due:
            if self.release_now(lease, now):
                n += 1
        self.expired += n
        return n

    def holds(self, lease: str) -> bool:
        return lease in self._leases

    def keys_of(self, lease: str) -> tuple[str, ...]:
        """The keys ``lease`` holds (empty when not held)."""
        return self._leases.get(lease, ())

    def items_now(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every lease held with its keys."""
        return list(self._leases.items())

    def __len__(self) -> int:
        """The number of leases held."""
        return len(self._leases)

    # ------------------------------------------------------------------ LeaseStore
    async def acquire(self, lease: str, keys: Sequence[str], expires: float, now: float) -> bool:
        return self.acquire_now(lease, keys, expires, now)

    async def take(
        self,
        lease: str,
        keys: Sequence[str],
        limits: Sequence[tuple[str, int]],
        expires: float,
        now: float,
    ) -> tuple[int, int]:
        return self.take_now(lease, keys, limits, expires, now)

    async def refresh(self, lease: str, expires: float, now: float) -> bool:
        return self.refresh_now(lease, expires, now)

    async def release(self, lease: str, now: float) -> bool:
        return self.release_now(lease, now)

    async def counts(self, keys: Sequence[str], now: float) -> list[int]:
        return [self._counts.get(k, 0) for k in keys]

    async def snapshot(self, prefix: str, now: float) -> dict[str, int]:
        return self.snapshot_now(prefix)

    async def lease_ids(self, now: float) -> list[str]:
        return list(self._leases)

    async def expire(self, now: float) -> int:
        return self.expire_now(now)
