"""Rule ``concurrency``: live calls per caller, called number, diverting number and peer.

Against trunking one number, or forwarding it to a PBX, so that it carries many simultaneous
calls. A *live call* is a dialog sipguard accepted and that has not ended yet (early or
confirmed). Parameters (``rules.concurrency``; each optional — absent or ``null`` is no limit —
and each overridable per peer):

- ``per_caller``: live calls with the same caller number (P-Asserted-Identity, else From).
- ``per_callee``: live calls to the same called number (the Request-URI's; To's only when the Request-URI has no user part): a DID used as a
  trunk.
- ``per_diverter``: live calls forwarded by the same number, read from Diversion (RFC 5806)
  and History-Info (RFC 7044 entries marked by ``mp`` or an RFC 4458 forwarding ``cause``); a
  call forwarded by several numbers counts for each of them.
- ``max_diversions``: reject a call forwarded more than this many times: the larger of the
  Diversion hop count (each entry counts its ``counter`` parameter, default 1) and the number of
  diverting History-Info entries (one forwarding often shows in both headers; the larger is
  taken, not the sum). ``0`` rejects every forwarded call.
- ``per_peer``: live calls from one peer (call admission control for a trunk); with no peers
  configured every source counts as one peer named ``-``.
- ``answers.<limit>``: what the caller hears (``status``, ``phrase``, ``headers``, given whole):
  ``403 Forbidden`` with a ``Reason`` naming the limit for ``per_caller``, ``per_diverter`` and
  ``max_diversions``; ``486 Busy Here`` for ``per_callee``; ``503 Service Unavailable`` with
  ``Retry-After: 5`` for ``per_peer`` (RFC 3261 §21.5.4: an upstream proxy may stop sending
  anything to sipguard for that long — keep it short).

Checks run in the order max_diversions, per_caller, per_diverter, per_callee, per_peer; the
first limit reached decides, and the verdict carries ``detail`` = ``{limit, number, count,
max}`` for the decision log line. ``mode: monitor`` decides and logs the same way but forwards.

How counting stays exact
    Check and take are one step. When every limit has room, ``decide`` takes the call's slot
    at once (a *lease*, :mod:`sipguard.state.base`, on ``caller:N``, ``callee:N``,
    ``diverter:N``, ``peer:P``) under the call's lease id, before the next INVITE is looked at
    — so twenty INVITEs read in one pass of the event loop are counted exactly like twenty
    spaced out, and a decision that later waits for I/O (a certificate fetch) already holds its
    slot. The edge core then either hands the lease to the dialog (the call was accepted) or
    gives it back (a later rule rejected it, it was cancelled while deciding, it could not be
    routed), exactly once. The dialog's lease is released when the dialog ends — BYE from
    either side, CANCEL/487, a final non-2xx, Timer B/C, session-timer expiry (RFC 4028) or
    the maximum lifetime, whichever comes first, exactly once. A count is the number of live
    leases naming the key: a late BYE, a retransmitted 2xx or a second end report release
    nothing, and no count goes below zero. Every kind is counted for every call whatever
    limits are set (a dialog takes its lease when it starts if the rule had not), so enabling
    a limit (or a peer override) by reload sees the calls already up. A lease also expires on
    its own a minute after its dialog's maximum lifetime, a backstop that should never fire
    (counted as ``leases_expired``).

    The counts live in a :class:`Tracker` in ``RuleState.tracker``, so a reload keeps them;
    when a reload turns the rule on (or back on), the edge core hands it the live dialogs and
    it rebuilds its leases from them (:meth:`Tracker.resync`).

Fails open: a call without a caller (callee) number is not limited per caller (callee).

Cost: a dict lookup per configured limit per INVITE and one lease per live call, whatever the
number of distinct numbers (measured in ``loadtest/concurrency_cost.py``).

Shared across instances (``state.backend: redis``)
    The tracker's memory store then holds only this process's leases (a mirror, for refresh,
    release and the local views); the counts that decide are in Redis
    (:mod:`sipguard.transport.redis_state`). :meth:`Concurrency.plan` adds the rule's limits and the
    call's counters to the pipeline's one round trip, which checks and takes atomically on the
    Redis side; the lease is released in Redis when the dialog ends (retried when Redis was
    away), re-scored every ``state.lease_s / 3`` while it lives, and lapses ``lease_s`` after
    its instance stopped re-scoring it (a crash).

Known limitations
    * A dialog whose BYE is lost holds its slot until its session timer (when the 2xx
      negotiated one) or ``sip.max_dialog_lifetime_s`` expires; no in-dialog OPTIONS probing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

from sipguard.contract import Verdict
from sipguard.policy.concurrency_settings import Answers
from sipguard.sip.history_info import diverting_entries
from sipguard.sip.params import get_param
from sipguard.state.base import LeaseStore, SharedCounts, SyncLeaseStore
from sipguard.state.memory import MemoryLeases

if TYPE_CHECKING:
    from sipguard.contract import CallInfo, Dialog
    from sipguard.policy.concurrency_settings import Settings
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.peers import Peer
    from sipguard.policy.pipeline import Plan
    from sipguard.policy.settings import Answer
    from sipguard.sip.message import Message

KINDS: Final = ("caller", "callee", "diverter", "peer")
_Check = tuple[str, str, str, int]  # (limit, key, number, max)
NO_PEER: Final = "-"  # the peer key of traffic from no configured peer
LEASE_GRACE: Final = 60.0  # a lease outlives its dialog's maximum lifetime by this much (backstop)
# A slot taken by a decision is handed to its dialog or given back within one decision; this
# expiry is only a backstop for a decision that never finishes.
DECISION_LEASE_S: Final = 600.0


# ------------------------------------------------------------------------------- counting


def lease_id(dialog: Dialog) -> str:
    """The lease of one dialog: the id its accepted call took its slot under (Call-ID, caller
    tag and server transaction; none can hold a line break)."""
    return dialog.lease


def lease_keys(
    caller: str | None, callee: str | None, diverters: Sequence[str], peer: str | None
) -> tuple[str, ...]:
    """The counter keys a live call holds a slot on."""
    keys = [f"peer:{peer or NO_PEER}"]
    if caller:
        keys.append(f"caller:{caller}")
    if callee:
        keys.append(f"callee:{callee}")
    keys.extend(f"diverter:{d}" for d in diverters)
    return tuple(keys)


def dialog_keys(dialog: Dialog) -> tuple[str, ...]:
    """The counter keys a live dialog holds a slot on."""
    return lease_keys(dialog.caller, dialog.callee, dialog.diverters, dialog.peer)


def call_keys(call: CallInfo) -> tuple[str, ...]:
    """The counter keys a call being decided takes (the same its dialog will hold)."""
    return lease_keys(call.caller, call.callee, call.diverters, call.peer)


class Tracker:
    """Live calls per number and peer: one lease per live dialog, shared by every pipeline and
    kept across reloads. Registered with the policy for dialog starts and ends.

    With a backend that has synchronous fast paths (the memory one) every method answers at
    once; otherwise ``dialog_started`` / ``dialog_ended`` / ``resync`` return an awaitable the
    shell runs.
    """

    __slots__ = ("store", "sync", "grace", "unmatched_ends", "shared", "mirror")

    def __init__(self, store: LeaseStore | None = None, grace: float = LEASE_GRACE,
                 shared: SharedCounts | None = None) -> None:
        self.store: LeaseStore = store if store is not None else MemoryLeases()
        self.sync: SyncLeaseStore | None = (
            self.store if isinstance(self.store, SyncLeaseStore) else None
        )
        self.grace = grace
        self.unmatched_ends = 0  # dialog ends without a lease (must stay 0 after a resync)
        # With a shared store the counts that decide are in Redis and ``mirror`` holds this
        # process's own leases (what it re-scores and releases).
        self.shared: SharedCounts | None = None
        self.mirror = MemoryLeases()
        if shared is not None:
            self.share(shared)

    def share(self, shared: SharedCounts) -> None:
        """Count in ``shared`` from now on (the shell, at start-up)."""
        self.shared = shared
        mirror = self.mirror
        shared.live = mirror.items_now
        shared.held = mirror.holds

    # ------------------------------------------------------------------ shared store
    def hold(self, call: CallInfo, take: tuple[str, ...]) -> None:
        """The shared store took (or will be told of) ``call``'s lease on ``take``."""
        self.mirror.acquire_now(call.lease, take, call.received_at + DECISION_LEASE_S,
                                call.received_at)
        call.held = True

    def give_back(self, call: CallInfo) -> Awaitable[None] | None:
        call.held = False
        return self._shared_release(call.lease, call.received_at)

    def _shared_release(self, lease: str, now: float) -> Awaitable[None] | None:
        mirror = self.mirror
        keys = mirror.keys_of(lease)
        if not mirror.release_now(lease, now):
            self.unmatched_ends += 1
            return None
        shared = self.shared
        assert shared is not None
        if shared.release_soon(lease, keys):
            return None
        return shared.release(lease, keys)

    # ------------------------------------------------------------------ dialog events
    def dialog_started(self, dialog: Dialog, now: float) -> Awaitable[None] | None:
        lease, keys, expires = lease_id(dialog), dialog_keys(dialog), dialog.expires + self.grace
        if self.shared is not None:
            mirror = self.mirror
            mirror.expire_now(now)
            if mirror.refresh_now(lease, expires, now):
                return None  # the decision took it in Redis already
            mirror.acquire_now(lease, keys, expires, now)
            return self.shared.add(lease, keys)
        sync = self.sync
        if sync is None:
            return self._acquire(lease, keys, expires, now)
        sync.expire_now(now)
        sync.acquire_now(lease, keys, expires, now)
        return None

    def call_abandoned(self, call: CallInfo, now: float) -> Awaitable[None] | None:
        """A call whose decision took a slot did not become a dialog: give the slot back."""
        if self.shared is not None:
            return self._shared_release(call.lease, now)
        sync = self.sync
        if sync is None:
            return self._release(call.lease, now)
        if not sync.release_now(call.lease, now):
            self.unmatched_ends += 1
        return None

    def try_take(
        self, call: CallInfo, checks: Sequence[_Check], now: float
    ) -> tuple[_Check, int] | None | Awaitable[tuple[_Check, int] | None]:
        """Check every limit and, when all have room, take the call's slot — one step. The
        first limit reached and its count, or None (taken; ``call.held`` is set)."""
        keys = call_keys(call)
        limits = [(c[1], c[3]) for c in checks]
        expires = now + DECISION_LEASE_S
        sync = self.sync
        if sync is None:
            return self._try_take_later(call, checks, keys, limits, expires, now)
        sync.expire_now(now)
        full, count = sync.take_now(call.lease, keys, limits, expires, now)
        if full < 0:
            call.held = True
            return None
        return checks[full], count

    async def _try_take_later(
        self, call: CallInfo, checks: Sequence[_Check], keys: Sequence[str],
        limits: Sequence[tuple[str, int]], expires: float, now: float,
    ) -> tuple[_Check, int] | None:
        full, count = await self.store.take(call.lease, keys, limits, expires, now)
        if full < 0:
            call.held = True
            return None
        return checks[full], count

    def dialog_ended(self, dialog: Dialog, now: float) -> Awaitable[None] | None:
        if self.shared is not None:
            later = self._shared_release(lease_id(dialog), now)
            self.mirror.expire_now(now)
            return later
        sync = self.sync
        if sync is None:
            return self._release(lease_id(dialog), now)
        if not sync.release_now(lease_id(dialog), now):
            self.unmatched_ends += 1
        sync.expire_now(now)
        return None

    async def _acquire(self, lease: str, keys: Sequence[str], expires: float, now: float) -> None:
        await self.store.acquire(lease, keys, expires, now)

    async def _release(self, lease: str, now: float) -> None:
        if not await self.store.release(lease, now):
            self.unmatched_ends += 1

    def resync(self, dialogs: Iterable[Dialog], now: float) -> Awaitable[None] | None:
        """Make the leases exactly the live ``dialogs``: release leases of dialogs that ended
        while nobody told us (the rule was off), take leases for dialogs that started then."""
        live = {lease_id(d): d for d in dialogs}
        if self.shared is not None:
            return self._resync_shared(live, now)
        sync = self.sync
        if sync is None:
            return self._resync(live, now)
        for lease in sync.lease_ids_now():
            if lease not in live:
                sync.release_now(lease, now)
        for lease, d in live.items():
            sync.acquire_now(lease, dialog_keys(d), d.expires + self.grace, now)
        return None

    async def _resync(self, live: dict[str, Dialog], now: float) -> None:
        store = self.store
        for lease in await store.lease_ids(now):
            if lease not in live:
                await store.release(lease, now)
        for lease, d in live.items():
            await store.acquire(lease, dialog_keys(d), d.expires + self.grace, now)

    async def _resync_shared(self, live: dict[str, Dialog], now: float) -> None:
        mirror, shared = self.mirror, self.shared
        assert shared is not None
        for lease, keys in mirror.items_now():
            if lease not in live:
                mirror.release_now(lease, now)
                await shared.release(lease, keys)
        for lease, d in live.items():
            if not mirror.holds(lease):
                keys = dialog_keys(d)
                mirror.acquire_now(lease, keys, d.expires + self.grace, now)
                await shared.add(lease, keys)

    # ------------------------------------------------------------------ queries
    def counts(self, kind: str, number: str) -> int:
        """Live calls for ``number`` as ``kind`` (caller, callee, diverter, peer)."""
        return self._sync().count_now(f"{kind}:{number}")

    def snapshot(self, kind: str | None = None) -> dict[str, dict[str, int]]:
        """``{kind: {number: live calls}}`` for every number with live calls (one kind, or
        all); for the admin API."""
        return _by_kind(self._sync().snapshot_now(f"{kind}:" if kind else ""))

    async def snapshot_async(self, kind: str | None = None, now: float = 0.0) -> dict[
        str, dict[str, int]
    ]:
        """:meth:`snapshot` for any backend."""
        return _by_kind(await self.store.snapshot(f"{kind}:" if kind else "", now))

    def stats(self) -> dict[str, int]:
        """Aggregates for metrics (never per number): live calls, numbers with live calls per
        kind, and the counters that must stay at zero. O(numbers with live calls): for a
        scrape, not for every call."""
        store = self._sync()
        out = dict.fromkeys(KINDS, 0)
        for key in store.snapshot_now():
            kind = key.split(":", 1)[0]
            out[kind] = out.get(kind, 0) + 1
        stats = {f"numbers_{k}": n for k, n in out.items()}
        stats["unmatched_ends"] = self.unmatched_ends
        if isinstance(store, MemoryLeases):
            stats["live_calls"] = len(store)  # with a shared store: this process's
            stats["leases_expired"] = store.expired
            stats["underflows"] = store.underflows
        else:
            stats["live_calls"] = sum(1 for _ in store.lease_ids_now())
        return stats

    def leaks(self) -> dict[str, float]:
        """The counters that must stay at zero, for every scrape (O(1), unlike :meth:`stats`):
        dialog ends that found no lease; with the in-memory store, leases that lapsed on their
        own (the backstop after a dialog's lifetime) and counts that would have gone below
        zero."""
        out = {"concurrency_unmatched_ends": float(self.unmatched_ends)}
        store = self.mirror if self.shared is not None else self.store  # this process's
        if isinstance(store, MemoryLeases):
            out["concurrency_leases_expired"] = float(store.expired)
            out["concurrency_underflows"] = float(store.underflows)
        return out

    def _sync(self) -> SyncLeaseStore:
        if self.shared is not None:
            return self.mirror  # this process's calls (the shared counts are in Redis)
        if self.sync is None:
            raise RuntimeError("this state backend is remote: use the async queries")
        return self.sync


def _by_kind(flat: dict[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, n in flat.items():
        kind, _, number = key.partition(":")
        out.setdefault(kind, {})[number] = n
    return out


def diversion_hops(msg: Message) -> int:
    """How many times a call was forwarded: the larger of the Diversion hop count (RFC 5806
    ``counter``, default 1 per entry) and the number of diverting History-Info entries."""
    div = 0
    if msg.has("diversion"):
        for na in msg.diversions:
            counter = get_param(na.params, "counter")
            # diversion-counter = "counter" EQUAL 1*2DIGIT; a longer one counts as many
            # (counter=100 is no way around max_diversions), 0 or junk as one entry
            ok = counter is not None and counter.isascii() and counter.isdigit()
            value = counter.lstrip("0") if ok and counter else ""
            div += (int(value) if len(value) <= 3 else 999) if value else 1
    hi = 0
    if msg.has("history-info"):
        hi = len(diverting_entries(msg.history_info))
    return max(div, hi)


# ------------------------------------------------------------------------------- the rule



class Concurrency:
    """The built rule for one peer (or for traffic from no configured peer)."""

    __slots__ = ("name", "mode", "settings", "tracker", "answers")

    def __init__(self, settings: Settings, mode: str, tracker: Tracker) -> None:
        self.name = "concurrency"
        self.mode = mode
        self.settings = settings
        self.tracker = tracker
        self.answers: dict[str, Answer] = {
            k: getattr(settings.answers, k) for k in Answers.model_fields
        }

    def decide(self, call: CallInfo, now: float) -> Verdict | None | Awaitable[Verdict | None]:
        checks = self._checks(call)
        if isinstance(checks, Verdict):
            return checks
        if not checks:
            return None
        full = self.tracker.try_take(call, checks, now)
        if full is None:
            return None
        if isinstance(full, tuple):
            (limit, _, number, most), count = full
            return self._reject(limit, number, count, most)
        return self._decide_later(full)

    def _checks(self, call: CallInfo) -> Verdict | list[_Check]:
        """The limits this call is checked against, in order, or the verdict when it was
        forwarded too many times."""
        s = self.settings
        if s.max_diversions is not None and (
            call.diverters or call.msg.has("diversion") or call.msg.has("history-info")
        ):
            hops = diversion_hops(call.msg)
            if hops > s.max_diversions:
                first = call.diverters[0] if call.diverters else None
                return self._reject("max_diversions", first, hops, s.max_diversions)
        checks: list[_Check] = []
        if s.per_caller is not None and call.caller:
            checks.append(("per_caller", f"caller:{call.caller}", call.caller, s.per_caller))
        if s.per_diverter is not None:
            for d in call.diverters:
                checks.append(("per_diverter", f"diverter:{d}", d, s.per_diverter))
        if s.per_callee is not None and call.callee:
            checks.append(("per_callee", f"callee:{call.callee}", call.callee, s.per_callee))
        if s.per_peer is not None:
            peer = call.peer or NO_PEER
            checks.append(("per_peer", f"peer:{peer}", peer, s.per_peer))
        return checks

    async def _decide_later(
        self, pending: Awaitable[tuple[_Check, int] | None]
    ) -> Verdict | None:
        full = await pending
        if full is None:
            return None
        (limit, _, number, most), count = full
        return self._reject(limit, number, count, most)

    def plan(self, call: CallInfo, now: float, plan: Plan) -> Verdict | None:
        """The shared-store form of :meth:`decide`: the limits and the call's counters go into
        the pipeline's one round trip (see :mod:`sipguard.policy.pipeline`)."""
        checks = self._checks(call)
        if isinstance(checks, Verdict):
            return checks
        monitor = self.mode == "monitor"
        for limit, key, number, most in checks:
            plan.add(("c", key, most, 0, monitor, ""), self, (limit, number, most))
        plan.take = call_keys(call)
        return None

    def refused(self, info: tuple[str, str, int], count: int, call: CallInfo, now: float) -> \
            Verdict:
        limit, number, most = info
        return self._reject(limit, number, count, most)

    def _reject(self, limit: str, number: str | None, count: int, most: int) -> Verdict:
        answer = self.answers[limit]
        return Verdict(
            "reject",
            rule=self.name,
            reason=f"{limit}_exceeded",
            status=answer.status,
            phrase=answer.phrase or "",
            headers=answer.headers,
            detail={"limit": limit, "number": number, "count": count, "max": most},
        )


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> Concurrency:
    """The rule for ``peer`` (None: traffic from no configured peer); one tracker for all."""
    tracker = ctx.state.tracker
    ctx.observe(tracker)
    return Concurrency(settings, ctx.mode_of(settings), tracker)
