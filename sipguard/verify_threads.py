"""ES256 signature checks on threads beside the event loop (rule ``identity``).

A PASSporT's signature check is the costliest step of an INVITE that carries Identity: ~70 µs
of OpenSSL's P-256 arithmetic on a 2-core VM, ~2x that under load. :class:`SignatureVerifier`
moves it to other CPUs while the event loop goes on with the other calls' messages:

* The threads are C threads (``sipguard/_es256.c``) that never take the GIL: they verify with
  the system's OpenSSL and wake the loop through an eventfd, once for every answer ready. (A
  pool of Python threads was tried first: each check took and gave back the GIL twice, and
  the hand-overs stalled the loop — CPU per call rose by 15 % and the highest passing rate
  fell; see loadtest/README.md.)
* :meth:`SignatureVerifier.submit` hands a check over and gives back a future the rule awaits
  (the INVITE waits in its server transaction, as for a certificate fetch). It gives back
  ``None`` — the rule then verifies in the loop, as without threads — when there are no
  threads or ``max_pending`` checks already wait. Nothing is refused or lost.
* :meth:`SignatureVerifier.configure` sets the number of threads and the queue bound from
  ``rules.identity.verify_threads`` / ``verify_queue`` (the largest of the config's identity
  sections, as for the certificate cache); ``auto`` is one thread per CPU this process may run
  on beyond the first (its CPU affinity), at most 4 — none when it is pinned to one CPU, where
  a thread would only add context switches.
* With ``auto`` the threads take the checks only while the event loop is busy. A hand-over
  costs CPU of its own (a futex wake of the thread, an eventfd wake of the loop, the rule's
  coroutine suspended and resumed): ~7 % more CPU per call at 1,000 calls/s than the same check
  in the loop. What it buys is the loop's time, which matters only when the loop is what limits
  the rate. So the server measures the loop's busy share every 50 ms (its thread's CPU time
  over the wall time) and says whether the loop is busy (:meth:`note_load`): the checks move to
  the threads from ``sipguard.server.OFFLOAD_ABOVE`` (0.7) on and come back below
  ``OFFLOAD_BELOW`` (0.5). While the loop is not busy it does at
  most :data:`HERE_PER_WINDOW` checks itself between two reports (~3 ms of its time): a burst
  of signed INVITEs in one pass goes to the threads past that, never stalls the loop. A number
  of threads set explicitly takes every check, as before.

Without the compiled extension (no C compiler or OpenSSL headers at build time) every check
runs in the loop. Counters (``sipguard_events_total``): ``identity_verify_threaded`` (checks
done on a thread), ``identity_verify_in_loop`` (done in the loop by ``auto``'s choice, threads
running), ``identity_verify_queue_full`` (done in the loop because ``verify_queue`` checks
waited). The gauge ``identity_verify_waiting`` is the number of checks handed over and not yet
answered.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections import Counter
from types import ModuleType
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipguard.policy.passport import Passport, verify_signature

if TYPE_CHECKING:
    from sipguard._es256 import Key, Pool


def _extension() -> ModuleType | None:
    try:
        return importlib.import_module("sipguard._es256")
    except ImportError:  # not built: every check in the loop
        return None


_es256 = _extension()

AUTO_MAX: Final = 4  # threads ``auto`` starts at most
HERE_PER_WINDOW: Final = 64  # checks ``auto`` does in the loop between two load reports at most
KEYS_MAX: Final = 256  # signer keys converted for the threads, kept at most


def auto_threads() -> int:
    """``verify_threads: auto``: one per CPU this process may run on beyond the first, at
    most :data:`AUTO_MAX`; 0 when it may run on one CPU only."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(AUTO_MAX, cpus - 1))


def available() -> bool:
    """True when the threads can run (the C extension is built)."""
    return _es256 is not None


class SignatureVerifier:
    """ES256 checks on C threads; answers come back on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: Counter[str]) -> None:
        self.loop = loop
        self.counters = counters
        self.max_pending = 1024
        self._threads = 0
        built = _es256
        self._pool: Pool | None = built.Pool(self.max_pending) if built is not None else None
        self._waiting: dict[int, asyncio.Future[bool]] = {}  # token -> the rule's future
        self._next = 0
        # id(key) -> (key, its copy for the threads); the key is held so the id stays its own
        self._keys: dict[int, tuple[ec.EllipticCurvePublicKey, Key]] = {}
        self._watching = False
        self._closed = False
        self.adaptive = False  # ``auto``: the threads take checks while the loop is busy
        self.offload = False  # (adaptive) the loop is busy: checks go to the threads
        self._here = HERE_PER_WINDOW  # (adaptive) checks the loop may still do itself

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def waiting(self) -> int:
        """Checks handed to the threads and not yet answered."""
        return len(self._waiting)

    def configure(self, threads: int | str, max_pending: int) -> None:
        """Run ``threads`` threads (``"auto"``: :func:`auto_threads`; surplus ones end once
        the checks queued before them are done) and queue at most ``max_pending`` checks."""
        self.max_pending = max_pending
        pool = self._pool
        if pool is None or self._closed:
            return
        self.adaptive = not isinstance(threads, int)
        if not isinstance(threads, int):
            threads = auto_threads()
        pool.capacity = max_pending
        pool.threads(threads)
        self._threads = threads
        if threads and not self._watching:
            self.loop.add_reader(pool.fd, self._deliver)
            self._watching = True

    def close(self) -> None:
        """End every thread (after the checks already queued, whose answers are delivered);
        later checks run in the loop."""
        pool = self._pool
        self._closed = True
        self._threads = 0
        if pool is None:
            return
        pool.close()
        self._deliver()
        if self._watching:
            self.loop.remove_reader(pool.fd)
            self._watching = False

    def note_load(self, offload: bool) -> None:
        """The server's report, every ~50 ms: the loop is busy (``offload``: ``auto``'s
        checks go to the threads) or not, until the next one."""
        self.offload = offload
        self._here = HERE_PER_WINDOW

    def submit(self, passport: Passport, key: ec.EllipticCurvePublicKey) -> \
            asyncio.Future[bool] | None:
        """A future for the check of ``passport``'s signature with ``key`` on a thread; None
        when the caller must verify in the loop (:meth:`check_here`: no threads, ``auto`` with
        the loop not busy, the queue full, not a P-256 key)."""
        pool = self._pool
        if pool is None or not self._threads:
            return None
        if self.adaptive and not self.offload and self._here > 0:
            self._here -= 1
            self.counters["identity_verify_in_loop"] += 1
            return None
        theirs = self._key(key)
        if theirs is None:
            return None
        token = self._next
        # False: max_pending checks wait (the pool's capacity is the one bound)
        if not pool.submit(token, theirs, passport.signing_input, passport.signature):
            self.counters["identity_verify_queue_full"] += 1
            return None
        self._next = token + 1
        future: asyncio.Future[bool] = self.loop.create_future()
        self._waiting[token] = future
        return future

    def check_here(self, passport: Passport, key: ec.EllipticCurvePublicKey) -> bool:
        """The check in this thread (the loop): with the threads' own code where it can (one
        ``ECDSA_do_verify`` on a key converted once), else with ``cryptography``."""
        built = _es256
        theirs = self._key(key) if built is not None else None
        if built is not None and theirs is not None:
            valid: int = built.verify(theirs, passport.signing_input, passport.signature)
            if valid >= 0:
                return valid == 1
        return verify_signature(passport, key)

    def _key(self, key: ec.EllipticCurvePublicKey) -> Key | None:
        entry = self._keys.get(id(key))
        if entry is not None and entry[0] is key:
            return entry[1]
        built = _es256
        if built is None or not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        try:
            theirs: Key = built.key(key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        except ValueError:  # not P-256: verify_signature says False in the loop
            return None
        if len(self._keys) >= KEYS_MAX:
            self._keys.clear()
        self._keys[id(key)] = (key, theirs)
        return theirs

    def _deliver(self) -> None:
        """On the loop (the eventfd is readable): every answer the threads have."""
        pool = self._pool
        if pool is None:
            return
        answers = pool.take()
        self.counters["identity_verify_threaded"] += len(answers)
        waiting = self._waiting
        for token, valid in answers:
            future = waiting.pop(token, None)
            if future is None or future.done():  # cancelled: the call went away meanwhile
                continue
            if valid < 0:
                future.set_exception(MemoryError("ES256 check could not be set up"))
            else:
                future.set_result(valid == 1)
