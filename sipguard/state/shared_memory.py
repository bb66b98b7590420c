"""Limit counters shared exactly by the sipguard workers of one host, without Redis:
:class:`ShmCounts`, a :class:`~sipguard.state.base.SharedCounts` on a shared-memory segment
(the C extension ``sipguard/state/_shm.c``; its header comment has the tables, the hashing,
the expiry and the lock).

The supervisor makes the segment (:func:`create_segment`) before it starts the workers; each
worker maps it (``ShmCounts(path, create=False, ...)``) with the same capacities. Every
operation is one locked step of a few microseconds in the calling process: the same
semantics as :class:`sipguard.transport.redis_state.SharedStore` (the ``ADMIT`` script: checks
in order, an enforced failure takes nothing, monitored failures and measures reported, a lease
already on a key counts as room there, releases idempotent, leases lapse unless re-scored),
with no round trip and no batching.

Where it answers ``None`` as Redis unreachable would (the policy applies ``fail: open |
closed``): a table is full (``state_shm_full``; nothing changed, ``available`` stays True) or
the segment's lock could not be had.

The lock and the breaker
    Every call waits up to ``_shm.LOCK_WAIT_MS`` (100 ms) for the segment's lock. A holder that
    died is no wait (the robust mutex says so, the next locker repairs the tables); one that
    is alive but does not let go — stopped by SIGSTOP or a debugger, or not scheduled for that
    long — would make every call of every other worker wait the whole 100 ms. So the first
    call that waits in vain (``state_shm_timeouts``) opens a circuit breaker, as Redis's does:
    ``state_unreachable`` is logged once, with ``reason: lock_timeout`` and the holder's pid
    (``holder_pid``), ``state_breaker_opened`` counted, :attr:`ShmCounts.available` is False
    (gauge ``state_available`` 0, ``/readyz`` unready with ``fail: closed``), and no call asks
    for the lock: :meth:`ShmCounts.admit_now` answers None at once (``state.fail`` decides),
    releases are kept (``state_pending_releases``), dialogs' adds wait for the re-scoring,
    marks are skipped, sweeps and refreshes wait. Every ``probe_s`` (1 s) a probe asks for the
    lock for at most PROBE_WAIT_MS (10 ms); once it has it, the kept releases are sent and
    every live lease of this process re-scored (calls admitted with ``fail: open`` meanwhile
    are counted, calls that ended hold nothing), and only then does the breaker close
    (``state_reachable``, ``state_reconnected``). A worker stopped for good is killed by the
    supervisor after ``worker_hang_timeout_s``; the next probe then repairs the tables.

This package is sans-I/O (``tests/unit/test_layering.py``: no event loop, no clock here), so
:meth:`ShmCounts.start` takes the loop's ``call_later`` for its timer; every other method
answers at once (the ``async`` ones only fit :class:`SharedCounts`).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any, Protocol

from sipguard.state.base import Admitted, Check

try:
    from sipguard.state import _shm
except ImportError:  # not built (`make native`): only state.backend shared_memory needs it
    _shm = None  # type: ignore[assignment]

SET_CAP = 128  # the most distinct members a window counts (dialer thresholds); _shm.SET_CAP
TICK_S = 0.5  # the timer: a sweep each tick (at most; lease_s / 3 when that is shorter)
LAP_S = 2.0  # every slot of both tables is visited this often
SWEEP_CHUNK = 4096  # slots per locked step of a sweep
MAX_PENDING = 100_000  # releases kept while the lock could not be had
PROBE_S = 1.0  # the breaker: the lock tried again this long after it could not be had
PROBE_WAIT_MS = 10  # the probe's wait for the lock (a working holder keeps it for µs)


class _Timer(Protocol):
    def cancel(self) -> None: ...


# the event loop's call_later(delay, callback)
CallLater = Callable[[float, Callable[[], object]], _Timer]


def create_segment(path: str, max_keys: int, max_leases: int, max_sets: int) -> None:
    """A fresh, empty segment at ``path`` (in /dev/shm): the supervisor's, before it starts the
    workers. An old file there is replaced (a process that still maps it keeps the old one)."""
    if _shm is None:
        raise OSError("state.backend shared_memory needs the compiled extension "
                      "sipguard.state._shm: run `make native`")
    _shm.create(path, max_keys, max_leases, max_sets)


class ShmCounts:
    """Leases, rate cells, measures and marks in a shared-memory segment, for one process."""

    def __init__(
        self,
        path: str,
        *,
        create: bool,
        lease_s: float = 60.0,
        fail_open: bool = True,
        retry_after_s: int = 5,
        max_keys: int,
        max_leases: int,
        max_sets: int,
        counters: MutableMapping[str, int] | None = None,
        log: Callable[..., None] | None = None,
        probe_s: float = PROBE_S,
    ) -> None:
        if create or _shm is None:
            create_segment(path, max_keys, max_leases, max_sets)
        self.segment = _shm.Segment(path, max_keys, max_leases, max_sets)
        self.path = path
        self.lease_s = lease_s
        self.lease_ms = max(1, int(lease_s * 1000))
        self.fail_open = fail_open
        self.retry_after_s = retry_after_s
        self.counters: MutableMapping[str, int] = counters if counters is not None else Counter()
        self._log = log
        # the leases this process holds, for re-scoring (set by the concurrency tracker)
        self.live: Callable[[], Iterable[tuple[str, tuple[str, ...]]]] = tuple
        self.held: Callable[[str], bool] = lambda lease: False
        self.pending: deque[tuple[str, tuple[str, ...]]] = deque(maxlen=MAX_PENDING)
        # the timer: a sweep every tick_s, visiting every slot each LAP_S; a refresh every
        # refresh_ticks ticks (lease_s / 3)
        self.tick_s = min(TICK_S, lease_s / 3)
        self.refresh_ticks = max(1, round(lease_s / 3 / self.tick_s))
        # the tables' slots (the segment's stats would wait for the lock: a stopped holder)
        slots = max(max_keys, max_leases)
        slots += slots // 3 + 1
        self.sweep_slots = math.ceil(slots * self.tick_s / LAP_S)
        self._ticks = 0
        self._call_later: CallLater | None = None
        self._timer: _Timer | None = None
        # the breaker: open after a call waited LOCK_WAIT_MS for the lock in vain; no call
        # asks for it until a probe (every probe_s, on the timer) had it and reconciled
        self.open = False
        self.probe_s = probe_s
        self.probes = 0  # probes since the breaker opened
        self.holder = 0  # the pid that held the lock when it opened (0: unknown)
        self._probe_timer: _Timer | None = None
        self.closed = False

    @property
    def available(self) -> bool:
        """The segment mapped and the breaker closed (``/readyz``, the gauge ``state_available``)."""
        return not self.closed and not self.open

    def _usable(self) -> bool:
        return not self.closed and not self.open

    # ------------------------------------------------------------------ the INVITE path
    async def admit(self, lease: str, checks: Sequence[Check], take: Sequence[str]) -> \
            Admitted | None:
        """Run ``checks`` and, when no enforced one fails, take ``lease`` on ``take`` — one
        atomic step. None: a table is full or the lock could not be had."""
        return self.admit_now(lease, checks, take)

    def admit_now(self, lease: str, checks: Sequence[Check], take: Sequence[str]) -> \
            Admitted | None:
        """:meth:`admit` without a coroutine: None at once while the breaker is open."""
        if self.open or self.closed:
            return None
        try:
            result = self.segment.admit(lease, checks, take, self.lease_ms)
        except TimeoutError as exc:
            self._timed_out("admit", exc)
            return None
        if result is None:
            self._full("admit")
        return result

    # ------------------------------------------------------------------ dialogs
    async def add(self, lease: str, take: Sequence[str]) -> None:
        """Take ``lease`` on ``take`` whatever the counts; a full table or a held lock leaves
        it to the next refresh (the probe's, while the breaker is open)."""
        if not self._usable() or not take:
            return
        try:
            done = self.segment.add(lease, take, self.lease_ms)
        except TimeoutError as exc:
            self._timed_out("add", exc)
            return
        if done is None:
            self._full("add")

    async def release(self, lease: str, take: Sequence[str]) -> None:
        """Give ``lease`` back on ``take`` (idempotent)."""
        self.release_soon(lease, take)

    def release_soon(self, lease: str, take: Sequence[str]) -> bool:
        """:meth:`release`, done now (always True: a release that met a held lock, or the
        breaker open, is kept and sent on the next tick or by the probe that closes it)."""
        if self.closed or not take:
            return True
        if self.open:
            self._keep(lease, tuple(take))
        else:
            self._release(lease, tuple(take))
        return True

    def _release(self, lease: str, take: tuple[str, ...]) -> bool:
        """Released now, or kept (False: the lock could not be had)."""
        try:
            self.segment.release(lease, take)
        except TimeoutError as exc:
            self._timed_out("release", exc)
            self._keep(lease, take)
            return False
        return True

    async def mark(self, counter: str, value: int, seconds: float) -> None:
        """Set ``counter`` to ``value`` for ``seconds`` (a cooldown every worker honours);
        best effort."""
        if not self._usable():
            return
        try:
            done = self.segment.mark(counter, value, max(1, int(seconds * 1000)))
        except TimeoutError as exc:
            self._timed_out("mark", exc)
            return
        if not done:
            self._full("mark")

    async def unmark(self, mark: str,
                     measures: Sequence[tuple[str, str, Sequence[float]]] = ()) -> int | None:
        """Remove the cooldown mark ``mark`` and forget the measures ``(kind, counter,
        windows ms)`` (every window of the counter: the windows are not needed here) — an
        operator lifting a dialer cooldown. The mark's value (ms left * 16 + its code), -1
        when there was none, None when the lock could not be had."""
        if not self._usable():
            return None
        try:
            value = self.segment.forget(mark, "b")
            for kind, counter, _ in measures:
                self.segment.forget(counter, kind)
        except TimeoutError as exc:
            self._timed_out("unmark", exc)
            return None
        return -1 if value is None else value

    async def counts(self, counters: Sequence[str]) -> list[int] | None:
        """Live leases on each counter across every worker (for the admin API); None when the
        lock could not be had."""
        if not self._usable():
            return None
        try:
            return [self.segment.count(counter) for counter in counters]
        except TimeoutError as exc:
            self._timed_out("counts", exc)
            return None

    # ------------------------------------------------------------------ background
    async def refresh(self) -> int:
        """Re-score every lease this process holds (kept releases first); how many were."""
        return self.refresh_now()

    def refresh_now(self) -> int:
        """:meth:`refresh` without a coroutine (nothing while the breaker is open: its probe
        does it). A lease ``held`` says ended meanwhile is released again after, so a
        refresh never brings back an ended call."""
        if not self._usable():
            return 0
        return self._refresh_all()[0]

    def _refresh_all(self) -> tuple[int, bool]:
        """The kept releases, then every live lease re-scored, whether or not the breaker is
        open: how many leases were, and whether all of it was done (a lock timeout stops
        it)."""
        if not self._flush_pending():
            return 0, False
        add, lease_ms, held = self.segment.add, self.lease_ms, self.held
        done = 0
        complete = True
        for lease, take in list(self.live()):
            try:
                if add(lease, take, lease_ms) is None:
                    self._full("refresh")
            except TimeoutError as exc:
                self._timed_out("refresh", exc)
                complete = False
                break
            done += 1
            if not held(lease) and not self._release(lease, tuple(take)):
                complete = False
                break
        self.counters["state_leases_refreshed"] += done
        return done, complete

    def sweep_now(self, slots: int | None = None) -> int:
        """Drop what lapsed in the next ``slots`` slots of each table (default: a tick's
        share), in locked steps of SWEEP_CHUNK; how many entries were dropped."""
        left = self.sweep_slots if slots is None else slots
        dropped = 0
        while left > 0 and self._usable():
            try:
                dropped += self.segment.sweep(min(left, SWEEP_CHUNK))
            except TimeoutError as exc:
                self._timed_out("sweep", exc)
                break
            left -= SWEEP_CHUNK
        return dropped

    def _flush_pending(self) -> bool:
        """The kept releases, oldest first; False when the lock could not be had (the rest
        stays kept)."""
        while self.pending and not self.closed:
            lease, take = self.pending[0]
            try:
                self.segment.release(lease, take)
            except TimeoutError as exc:
                self._timed_out("release", exc)
                return False
            self.pending.popleft()
            self.counters["state_releases_retried"] += 1
        return not self.closed

    def start(self, call_later: CallLater) -> None:
        """Sweep every ``tick_s`` and re-score the live leases every ``lease_s / 3``, on a
        timer of the event loop: ``store.start(loop.call_later)``."""
        if self._call_later is None and not self.closed:
            self._call_later = call_later
            self._timer = call_later(self.tick_s, self._tick)
            if self.open:  # it opened before the timer was there
                self._probe_timer = call_later(self.probe_s, self._probe)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        try:
            if not self.open:  # open: the probe asks for the lock, nothing else does
                if self._flush_pending():
                    self.sweep_now()
                self._ticks += 1
                if self._ticks >= self.refresh_ticks:
                    self._ticks = 0
                    self.refresh_now()
        except Exception as exc:  # never let the timer die
            self._note("state_refresh_failed", error=repr(exc))
        if not self.closed and self._call_later is not None:
            self._timer = self._call_later(self.tick_s, self._tick)

    async def close(self) -> None:
        """Stop the timers and unmap the segment (this process's leases lapse)."""
        self.closed = True
        for timer in (self._timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._probe_timer = None
        self.segment.close()

    # ------------------------------------------------------------------ the breaker
    def _trip(self, what: str, exc: BaseException) -> None:
        """A call waited LOCK_WAIT_MS for the lock in vain: no call asks for it any more
        until a probe has it (logged once)."""
        self.open = True
        self.probes = 0
        self.holder = self.segment.holder  # still holding it: it is stopped
        self.counters["state_breaker_opened"] += 1
        fields: dict[str, Any] = {"what": what, "reason": "lock_timeout",
                                  "error": str(exc), "probe_s": self.probe_s}
        if self.holder:
            fields["holder_pid"] = self.holder
        self._note("state_unreachable", **fields)
        if self._call_later is not None and self._probe_timer is None:
            self._probe_timer = self._call_later(self.probe_s, self._probe)

    def _probe(self) -> None:
        """While the breaker is open, every ``probe_s``: the lock within PROBE_WAIT_MS; once
        had, the kept releases and every live lease re-scored, and only when all of that
        went through does the breaker close."""
        self._probe_timer = None
        if not self.open or self.closed:
            return
        self.probes += 1
        done, complete = 0, False
        try:
            if self.segment.probe(PROBE_WAIT_MS):
                done, complete = self._refresh_all()
        except Exception as exc:  # never let the probe die
            self._note("state_refresh_failed", error=repr(exc))
        if self.closed:
            return
        if not complete:
            self._probe_timer = self._call_later(self.probe_s, self._probe) \
                if self._call_later is not None else None
            return
        self.open = False
        self.counters["state_reconnected"] += 1
        fields: dict[str, Any] = {"reason": "lock_timeout", "probes": self.probes,
                                  "leases_restored": done, "pending_releases": len(self.pending)}
        if self.holder:
            fields["holder_pid"] = self.holder
        self._note("state_reachable", **fields)

    # ------------------------------------------------------------------ counts
    def _keep(self, lease: str, take: tuple[str, ...]) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.counters["state_releases_lapsed"] += 1
        self.pending.append((lease, take))

    def _full(self, what: str) -> None:
        self.counters["state_shm_full"] += 1
        n = self.counters["state_shm_full"]
        if n == 1 or n % 1000 == 0:  # the first, then every thousandth
            try:
                fills: dict[str, int] = self.segment.stats()
            except TimeoutError as exc:
                self._timed_out("stats", exc)
                fills = {}
            self._note("state_shm_full", what=what, events=n, **fills)

    def _timed_out(self, what: str, exc: BaseException) -> None:
        self.counters["state_shm_timeouts"] += 1
        if not self.open and not self.closed:
            self._trip(what, exc)

    def _note(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log(event, **fields)

    def stats(self) -> dict[str, float]:
        out = {"state_available": 1.0 if self.available else 0.0,
               "state_pending_releases": float(len(self.pending))}
        if not self.available:  # (open: no wait for the lock)
            return out
        try:
            s = self.segment.stats()
        except TimeoutError as exc:
            self._timed_out("stats", exc)
            return out
        for name in ("keys", "leases", "sets"):
            out[f"state_shm_{name}"] = float(s[name])
            out[f"state_shm_{name}_max"] = float(s[f"max_{name}"])
        out["state_shm_recovered"] = float(s["recovered"])  # holders that died with the lock
        # distinct counts left out because every set was in use (the limits went on)
        out["state_shm_unmeasured"] = float(s["unmeasured"])
        return out
