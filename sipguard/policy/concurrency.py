"""Rule ``concurrency``: live calls per caller, called number, diverting number and peer.

Against trunking one number, or forwarding it to a PBX, so that it carries many simultaneous
calls. A *live call* is a dialog sipguard accepted and that has not ended yet (early or
confirmed). Parameters (``rules.concurrency``; each optional — absent or ``null`` is no limit —
and each overridable per peer):

- ``per_caller``: live calls with the same caller number (P-Asserted-Identity, else From).
- ``per_callee``: live calls to the same called number (Request-URI, else To): a DID used as a
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
    The rule only reads counts. The slot is taken when the proxy reports the dialog started
    (right after the accept, in the same turn of the event loop, so a later rule that rejects
    the call never takes one) and given back when it reports the dialog ended — BYE from
    either side, CANCEL/487, a final non-2xx, Timer B/C, session-timer expiry (RFC 4028) or the
    maximum lifetime, whichever comes first, exactly once. Every live call holds one *lease*
    (:mod:`sipguard.state.base`) on its keys (``caller:N``, ``callee:N``, ``diverter:N``,
    ``peer:P``), so a count is the number of live leases naming the key: a late BYE, a
    retransmitted 2xx or a second end report release nothing, and no count goes below zero.
    Every kind is counted for every call whatever limits are set, so enabling a limit (or a
    peer override) by reload sees the calls already up. A lease also expires on its own a
    minute after its dialog's maximum lifetime, a backstop that should never fire (counted as
    ``leases_expired``).

    The counts live in a :class:`Tracker` kept in the policy's ``shared`` state, so a reload
    keeps them; when a reload turns the rule on (or back on), the shell hands it the live
    dialogs and it rebuilds its leases from them (:meth:`Tracker.resync`).

Fails open: a call without a caller (callee) number is not limited per caller (callee).

Cost: a dict lookup per configured limit per INVITE and one lease per live call, whatever the
number of distinct numbers (measured in ``loadtest/concurrency_cost.py``).

Known limitations
    * With a backend that needs I/O (Redis, a later issue) the check (in ``decide``) and the
      take (at dialog start) are separated by awaits, so two INVITEs for the same number that
      overlap can both pass at ``limit - 1``; that backend needs an atomic check-and-take.
      The same holds with the memory backend if a rule *after* this one awaits (put it last).
    * Calls are counted on this instance only (the memory backend).
    * A dialog whose BYE is lost holds its slot until its session timer (when the 2xx
      negotiated one) or ``sip.max_dialog_lifetime_s`` expires; no in-dialog OPTIONS probing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from sipguard.policy.settings import FROZEN, Answer, RuleSettings
from sipguard.policy.verdict import Verdict
from sipguard.sip.history_info import diverting_entries
from sipguard.sip.params import get_param
from sipguard.state.base import LeaseStore, SyncLeaseStore
from sipguard.state.memory import MemoryLeases

if TYPE_CHECKING:
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.peers import Peer
    from sipguard.proxy.events import CallInfo, Dialog
    from sipguard.sip.message import Message

SHARED_KEY = "concurrency.tracker"
KINDS = ("caller", "callee", "diverter", "peer")
NO_PEER = "-"  # the peer key of traffic from no configured peer
LEASE_GRACE = 60.0  # a lease outlives its dialog's maximum lifetime by this much (backstop)


def _reason(limit: str, text: str) -> tuple[str, ...]:
    return (f'Reason: SIP;cause=403;text="{text} ({limit})"',)


# ------------------------------------------------------------------------------- settings


class Answers(BaseModel):
    """What the caller hears when a limit is reached."""

    model_config = FROZEN

    per_caller: Answer = Field(
        default=Answer(status=403, phrase="Forbidden",
                       headers=_reason("per_caller", "Too many concurrent calls from caller")),
        description="per_caller reached.",
    )
    per_callee: Answer = Field(
        default=Answer(status=486, phrase="Busy Here"), description="per_callee reached."
    )
    per_diverter: Answer = Field(
        default=Answer(status=403, phrase="Forbidden",
                       headers=_reason("per_diverter",
                                       "Too many concurrent calls forwarded by a number")),
        description="per_diverter reached.",
    )
    max_diversions: Answer = Field(
        default=Answer(status=403, phrase="Forbidden",
                       headers=_reason("max_diversions", "Call forwarded too many times")),
        description="max_diversions exceeded.",
    )
    per_peer: Answer = Field(
        default=Answer(status=503, phrase="Service Unavailable", headers=("Retry-After: 5",)),
        description="per_peer reached.",
    )


class Settings(RuleSettings):
    """Parameters of rule ``concurrency`` (``rules.concurrency`` in the config)."""

    per_caller: int | None = Field(
        default=None, ge=1, description="Live calls per caller number; null: no limit."
    )
    per_callee: int | None = Field(
        default=None, ge=1, description="Live calls per called number; null: no limit."
    )
    per_diverter: int | None = Field(
        default=None, ge=1,
        description="Live calls per diverting number (Diversion, History-Info); null: no limit.",
    )
    max_diversions: int | None = Field(
        default=None, ge=0, description="Most times a call may have been forwarded; null: any."
    )
    per_peer: int | None = Field(
        default=None, ge=1, description="Live calls per peer; null: no limit."
    )
    answers: Answers = Field(default=Answers(), description="What the caller hears.")


# ------------------------------------------------------------------------------- counting


def lease_id(dialog: Dialog) -> str:
    """The lease of one dialog: its Call-ID and caller tag (neither can hold a line break)."""
    return f"{dialog.call_id}\n{dialog.caller_tag}"


def dialog_keys(dialog: Dialog) -> tuple[str, ...]:
    """The counter keys a live dialog holds a slot on."""
    keys = [f"peer:{dialog.peer or NO_PEER}"]
    if dialog.caller:
        keys.append(f"caller:{dialog.caller}")
    if dialog.callee:
        keys.append(f"callee:{dialog.callee}")
    keys.extend(f"diverter:{d}" for d in dialog.diverters)
    return tuple(keys)


class Tracker:
    """Live calls per number and peer: one lease per live dialog, shared by every pipeline and
    kept across reloads. Registered with the policy for dialog starts and ends.

    With a backend that has synchronous fast paths (the memory one) every method answers at
    once; otherwise ``dialog_started`` / ``dialog_ended`` / ``resync`` return an awaitable the
    shell runs.
    """

    __slots__ = ("store", "sync", "grace", "unmatched_ends")

    def __init__(self, store: LeaseStore | None = None, grace: float = LEASE_GRACE) -> None:
        self.store: LeaseStore = store if store is not None else MemoryLeases()
        self.sync: SyncLeaseStore | None = (
            self.store if isinstance(self.store, SyncLeaseStore) else None
        )
        self.grace = grace
        self.unmatched_ends = 0  # dialog ends without a lease (must stay 0 after a resync)

    # ------------------------------------------------------------------ dialog events
    def dialog_started(self, dialog: Dialog, now: float) -> Awaitable[None] | None:
        lease, keys, expires = lease_id(dialog), dialog_keys(dialog), dialog.expires + self.grace
        sync = self.sync
        if sync is None:
            return self._acquire(lease, keys, expires, now)
        sync.expire_now(now)
        sync.acquire_now(lease, keys, expires, now)
        return None

    def dialog_ended(self, dialog: Dialog, now: float) -> Awaitable[None] | None:
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
            stats["live_calls"] = len(store)
            stats["leases_expired"] = store.expired
            stats["underflows"] = store.underflows
        else:
            stats["live_calls"] = sum(1 for _ in store.lease_ids_now())
        return stats

    def _sync(self) -> SyncLeaseStore:
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
            # diversion-counter = "counter" EQUAL 1*2DIGIT
            ok = counter is not None and counter.isascii() and counter.isdigit()
            div += int(counter) if ok and counter and len(counter) <= 2 and int(counter) else 1
    hi = 0
    if msg.has("history-info"):
        hi = len(diverting_entries(msg.history_info))
    return max(div, hi)


# ------------------------------------------------------------------------------- the rule

_Check = tuple[str, str, str, int]  # (limit, key, number, max)


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
        if not checks:
            return None
        sync = self.tracker.sync
        if sync is None:
            return self._decide_later(checks, now)
        sync.expire_now(now)
        for limit, key, number, most in checks:
            count = sync.count_now(key)
            if count >= most:
                return self._reject(limit, number, count, most)
        return None

    async def _decide_later(self, checks: list[_Check], now: float) -> Verdict | None:
        counts = await self.tracker.store.counts([c[1] for c in checks], now)
        for (limit, _, number, most), count in zip(checks, counts, strict=True):
            if count >= most:
                return self._reject(limit, number, count, most)
        return None

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


def tracker_of(shared: dict[str, Any]) -> Tracker:
    """The tracker kept in the policy's shared state (created on first use)."""
    tracker = shared.get(SHARED_KEY)
    if not isinstance(tracker, Tracker):
        tracker = Tracker()
        shared[SHARED_KEY] = tracker
    return tracker


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> Concurrency:
    """The rule for ``peer`` (None: traffic from no configured peer); one tracker for all."""
    tracker = tracker_of(ctx.shared)
    ctx.observe(tracker)
    return Concurrency(settings, ctx.mode_of(settings), tracker)
