"""The state interface rules use for shared counters: live-call slots as leases.

A *lease* is one live call's hold on a set of counter *keys* (``caller:+12125550100``,
``callee:+18005550199``, ``peer:carrier-a`` ...). Acquiring a lease adds one to each of its keys,
releasing it takes that one away again, and a lease that is never released lapses at its expiry
(which its holder may push back with :meth:`LeaseStore.refresh`). Because a count is only ever
the number of live leases naming the key, it cannot leak or underflow the way a bare integer
does: releasing twice, or releasing a lease that was never acquired, changes nothing.

Every method is async so that a networked backend (Redis, in a later issue: a hash per lease,
``INCR``/``DECR`` in one script, key TTLs for expiry) fits the same shape. A backend that lives
in this process also offers the :class:`SyncLeaseStore` methods (``*_now``), which callers on the
hot path use to avoid creating a coroutine per call.

Times are the caller's ``now`` (seconds, the shell's loop clock); nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable


class LeaseStore(Protocol):
    async def acquire(self, lease: str, keys: Sequence[str], expires: float, now: float) -> bool:
        """Take a lease on ``keys`` until ``expires``; False (and only a refresh) when the
        lease is already held."""
        ...

    async def take(
        self,
        lease: str,
        keys: Sequence[str],
        limits: Sequence[tuple[str, int]],
        expires: float,
        now: float,
    ) -> tuple[int, int]:
        """Check and take in one atomic step: when every ``(key, most)`` in ``limits`` has
        fewer than ``most`` live leases, take ``lease`` on ``keys`` and return ``(-1, 0)``;
        otherwise take nothing and return the index of the first full limit and its count.
        A lease already held counts as taken (its expiry moves)."""
        ...

    async def refresh(self, lease: str, expires: float, now: float) -> bool:
        """Move a held lease's expiry; False when no such lease is held."""
        ...

    async def release(self, lease: str, now: float) -> bool:
        """Give a lease back; False (and no change) when no such lease is held."""
        ...

    async def counts(self, keys: Sequence[str], now: float) -> list[int]:
        """The number of live leases naming each key."""
        ...

    async def snapshot(self, prefix: str, now: float) -> dict[str, int]:
        """Every key starting with ``prefix`` that has live leases, with its count."""
        ...

    async def lease_ids(self, now: float) -> list[str]:
        """Every lease held."""
        ...

    async def expire(self, now: float) -> int:
        """Release leases whose expiry has passed; how many were."""
        ...


@runtime_checkable
class SyncLeaseStore(LeaseStore, Protocol):
    """A :class:`LeaseStore` in this process: the same operations without awaiting."""

    def acquire_now(self, lease: str, keys: Sequence[str], expires: float, now: float) -> bool:
        ...

    def take_now(
        self,
        lease: str,
        keys: Sequence[str],
        limits: Sequence[tuple[str, int]],
        expires: float,
        now: float,
    ) -> tuple[int, int]:
        ...

    def refresh_now(self, lease: str, expires: float, now: float) -> bool:
        ...

    def release_now(self, lease: str, now: float) -> bool:
        ...

    def count_now(self, key: str) -> int:
        ...

    def snapshot_now(self, prefix: str = "") -> dict[str, int]:
        ...

    def lease_ids_now(self) -> Iterable[str]:
        ...

    def expire_now(self, now: float) -> int:
        ...


# --------------------------------------------------------------------------- shared counts

# One check of a call against a shared counter: (kind, counter, a, b, monitor, member).
# ``counter`` is ``kind:ident`` (``caller:+12125550100``). Kinds that can refuse:
#   "c": fewer than ``a`` live leases on ``counter``;
#   "r": the GCRA cell ``counter`` (emission interval ``a``, tolerance ``b`` seconds) on time;
#   "b": no cooldown mark on ``counter`` (its value: ms left * 16 + a code).
# Kinds that only measure (the value is reported, never a refusal), over a window of ``a`` ms
# kept as 4 buckets plus the current one (so between 1 and 1.25 windows):
#   "h": distinct ``member`` values (HyperLogLog) — the call's own added;
#   "n": calls — this one counted.
# ``monitor``: a failure is reported but does not refuse the call.
Check = tuple[str, str, float, float, bool, str]
# (taken, refused check index or -1, its value, [(check, value)] for failed monitored checks
# and for every measure); value: a count, or the microseconds a rate cell is ahead of schedule.
Admitted = tuple[bool, int, int, list[tuple[int, int]]]


class SharedCounts(Protocol):
    """Counts shared by every sipguard instance (live-call leases and rate cells) in a store
    reached over the network — :class:`sipguard.transport.redis_state.SharedStore`. The policy
    sees only this; the round trips are the shell's I/O."""

    fail_open: bool  # state.fail: open (pass calls) or closed (503) while unreachable
    retry_after_s: int  # Retry-After of the 503 with fail: closed
    # this process's leases (for re-scoring) and whether one is still held; set by the tracker
    live: Callable[[], Iterable[tuple[str, tuple[str, ...]]]]
    held: Callable[[str], bool]

    @property
    def available(self) -> bool: ...

    async def admit(self, lease: str, checks: Sequence[Check], take: Sequence[str]) -> \
            Admitted | None:
        """Every check and, when no enforced one fails, ``lease`` taken on ``take`` — one
        atomic step; None: the store could not answer."""
        ...

    async def add(self, lease: str, take: Sequence[str]) -> None:
        """Take ``lease`` on ``take`` whatever the counts."""
        ...

    async def release(self, lease: str, take: Sequence[str]) -> None:
        """Give ``lease`` back (idempotent; kept and retried while unreachable)."""
        ...

    def release_soon(self, lease: str, take: Sequence[str]) -> bool:
        """:meth:`release` without waiting, when the store can (False: it cannot, await
        :meth:`release` instead)."""
        ...

    async def mark(self, counter: str, value: int, seconds: float) -> None:
        """Set ``counter`` to ``value`` for ``seconds`` (a cooldown every instance honours);
        best effort."""
        ...

    async def unmark(self, mark: str,
                     measures: Sequence[tuple[str, str, Sequence[float]]] = ()) -> int | None:
        """Remove the cooldown mark ``mark`` and forget the measures ``(kind, counter, windows
        in ms)`` named (an operator lifting a cooldown): the mark's value (ms left * 16 + its
        code), -1 when there was none, None when the store could not answer."""
        ...
