"""The dialer's cooldowns for the operator: list them, lift one (the admin API's
``GET /dialer/cooldowns`` and ``DELETE /dialer/cooldowns/{key}``).

Rule ``dialer`` (:mod:`sipguard.policy.dialer`) answers a caller number, a peer / source address
or a called number ``603`` for ``block_s`` once it has crossed a block threshold. A legitimate
customer cooled down — a contact center's own DIDs called in sequence, a burst forged with its
number — is let through again here, from its next INVITE on.

Where a cooldown lives
    * In the process's rule state (:class:`~sipguard.policy.dialer_state.DialerState`, one per
      process, kept over reloads): every cooldown this process started, and a copy of each one
      another instance or worker started that a call of this process met in the shared store
      (for the time it had left).
    * With ``state.backend: redis`` or ``shared_memory``, an enforced cooldown is also a mark
      in the shared store (``dialer.block.<scope>:<key>``, ``block_s`` TTL) that every instance
      and worker checks; so are the shared measures: a caller's distinct called numbers
      (``dialer.callees``), a called number's calls (``dialer.calls``), a peer's high-cost calls
      (``dialer.high_cost``). A cooldown started in monitor mode stays in its process.

Listing them therefore shows this process's cooldowns (every worker's, through the admin API)
and, with Redis, the marks other instances set that this process has not met: a SCAN of the
keyspace, bounded in entries and to ~1 s (``SharedStore.cooldown_marks``). Shared memory keeps
only the hashes of names, so its marks cannot be listed: the workers' own lists cover them.

Lifting ``key`` (every scope, or the one asked) therefore
    1. deletes the mark and those measures in the shared store (one script / one locked
       step per scope);
    2. ends the cooldown in this process and forgets what the scope counted for the key
       (:meth:`DialerState.lift`): its next call starts afresh, where it would otherwise cross
       the threshold again at once;
    3. with several workers, the admin API asks every other worker the same on its admin
       port (``DELETE ...?local=1&reset=<scopes>``: its own tables only, the scopes found in
       the shared store going along so each forgets its counts there too) and gathers what
       each lifted — whatever ``worker_spread``, and with an answer, where the hand-over's
       broadcast (suspensions, ban lifts) gives none;
    4. with Redis, announces the lift on the shared lists' channel: the other instances drop
       their copies within milliseconds (:mod:`sipguard.ops.shared_lists`).

Every lift is logged ``dialer_cooldown_lifted`` (``by``; ``via=worker`` / ``via=shared`` where
another worker or instance applied it) and counted (``dialer_cooldowns_lifted``: one per scope
lifted, by the process whose API took it, :mod:`sipguard.ops.admin`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from sipguard.policy.dialer import ANALYTICS
from sipguard.policy.dialer_state import SCOPES, Block, DialerState
from sipguard.policy.suspensions import suspension_key

MAX_COOLDOWNS_SHOWN = 1000  # GET /dialer/cooldowns: then "truncated": true
MAX_KEY = 128  # a cooldown key: a number, a peer name, an address
NUMBER_SCOPES = ("caller", "callee")  # keys that are telephone numbers (log.numbers applies)


class Unmarks(Protocol):
    """The shared store, as far as a lift needs it (Redis or shared memory)."""

    async def unmark(self, mark: str,
                     measures: Sequence[tuple[str, str, Sequence[float]]] = ()) -> int | None:
        ...


class ListsMarks(Protocol):
    """The Redis store, as far as listing the cooldowns of every instance needs it."""

    async def cooldown_marks(self, scopes: Sequence[str], key: str | None, limit: int,
                             budget_s: float = 1.0) -> tuple[list[tuple[str, str, int, int]],
                                                             bool] | None:
        ...


class Announces(Protocol):
    """The shared lists (Redis), as far as a lift needs them."""

    async def cooldown_lifted(self, scope: str, key: str, timeout_s: float = 1.0) -> bool:
        ...


def cooldown_key(text: str) -> str:
    """A key as the operator gave it, checked: ValueError for an empty, overlong or
    unprintable one."""
    key = text.strip()
    if key[:1].isdigit() or key[:2].lstrip("+")[:1].isdigit():
        # a number written with visual separators ("+1 (212) 555-0101"): key_in reads it
        key = "".join(c for c in key if c not in " \t()")
    if not key or len(key) > MAX_KEY or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{text[:40]!r} is not a cooldown key (a number, a peer name or an "
                         f"address, at most {MAX_KEY} characters, no spaces)")
    return key


def scope_of(text: str | None) -> str | None:
    """The ``scope`` query parameter: None (every scope) or one of SCOPES; ValueError else."""
    if text is None or text == "":
        return None
    if text not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    return text


def scopes_of(text: str) -> tuple[str, ...]:
    """A comma-separated list of scopes (``reset`` between workers); ValueError for others."""
    out = tuple(s for s in text.split(",") if s)
    for s in out:
        scope_of(s)
    return out


def key_in(scope: str, key: str) -> str:
    """The key as the rule stores it in ``scope``: a number's spelling normalised as the
    rules read numbers (``+1 212-555-0100`` → ``+12125550100``) for caller and callee; a peer
    name or address as given."""
    if scope in NUMBER_SCOPES:
        try:
            normal = suspension_key(key)
        except ValueError:
            return key
        return key if normal.endswith("*") else normal
    return key


def dialer_windows(rules: Iterable[Any]) -> dict[str, list[float]]:
    """Per scope, the windows (ms) over which the given dialer rules (every peer's and the
    default's) count the shared measure of that scope; a scope none counts is absent."""
    out: dict[str, set[float]] = {}
    for rule in rules:
        if getattr(rule, "name", None) != "dialer":
            continue
        if rule.d_on:
            out.setdefault("caller", set()).add(rule.distinct_w * 1000)
        if rule.pc_on:
            out.setdefault("callee", set()).add(rule.pumping_w * 1000)
        if rule.h_on:
            out.setdefault("high_cost", set()).add(rule.pumping_w * 1000)
    return {scope: sorted(windows) for scope, windows in out.items()}


def _measures(scope: str, key: str,
              windows: dict[str, list[float]]) -> list[tuple[str, str, Sequence[float]]]:
    """The shared measures a cooldown in ``scope`` was tripped from, to forget with it."""
    counted = windows.get(scope)
    if not counted:
        return []
    name = {"caller": "dialer.callees", "callee": "dialer.calls",
            "high_cost": "dialer.high_cost"}.get(scope)
    if name is None:
        return []
    return [("h" if scope == "caller" else "n", f"{name}:{key}", counted)]


class DialerCooldowns:
    """What the admin API asks about the dialer's cooldowns, for one process."""

    def __init__(
        self,
        state: Callable[[], DialerState],
        clock: Callable[[], float],
        wall_offset: Callable[[], float],
        shown: Callable[[str], str],
        log: Any,
    ) -> None:
        self.state = state
        self.clock = clock
        self.wall_offset = wall_offset
        self.shown = shown  # a number as log lines show it (log.numbers)
        self.log = log

    # ------------------------------------------------------------------ list
    def view(self, scope: str | None = None, key: str | None = None,
             limit: int = MAX_COOLDOWNS_SHOWN) -> dict[str, Any]:
        """The cooldowns in force in this process (``scope`` / ``key``: only those), at most
        ``limit``, then ``"truncated": true``."""
        now = self.clock()
        state = self.state()
        found: list[tuple[str, str, Block]] = []
        total = 0
        for s in SCOPES if scope is None else (scope,):
            got, n = state.cooldowns(now, s, None if key is None else key_in(s, key),
                                     limit - len(found))
            found += got
            total += n
        view: dict[str, Any] = {"cooldowns": [self._entry(s, k, b, now) for s, k, b in found]}
        if total > len(found):
            view["truncated"] = True
        return view

    async def shared_view(self, store: ListsMarks, scope: str | None = None,
                          key: str | None = None,
                          limit: int = MAX_COOLDOWNS_SHOWN) -> dict[str, Any] | None:
        """The cooldowns marked in Redis that this process does not hold — started by another
        instance or worker and not yet met here — at most ``limit`` (``scope`` / ``key``: only
        those), each ``"where": "shared"`` with its reason and time left; ``truncated`` when
        there were more or the walk of the keyspace ran out of time. None when Redis cannot
        answer."""
        scopes = SCOPES if scope is None else (scope,)
        now = self.clock()
        state = self.state()
        if key is None:
            got = await store.cooldown_marks(scopes, None, limit)
        else:  # per scope, the key as that scope stores it
            got = ([], False)
            for s in scopes:
                one = await store.cooldown_marks((s,), key_in(s, key), limit)
                if one is None:
                    return None
                got[0].extend(one[0])
        if got is None:
            return None
        marks, more = got
        offset = self.wall_offset()
        entries = []
        for s, k, code, ms in marks:
            if state.cooldowns(now, s, k, 1)[1]:
                continue  # this process holds it (or a copy): listed with its own
            entries.append({
                "scope": s,
                "key": self._key_shown(s, k),
                "reason": ANALYTICS[code] if 0 <= code < len(ANALYTICS) else "dialer",
                "until": _iso(now + ms / 1000 + offset),
                "left_s": round(ms / 1000, 1),
                "where": "shared",
            })
        view: dict[str, Any] = {"cooldowns": entries}
        if more:
            view["truncated"] = True
        return view

    def _entry(self, scope: str, key: str, block: Block, now: float) -> dict[str, Any]:
        offset = self.wall_offset()
        return {
            "scope": scope,
            "key": self._key_shown(scope, key),
            "reason": block.reason,
            "monitor": block.monitor,
            "since": _iso(block.since + offset),
            "until": _iso(block.until + offset),
            "age_s": round(now - block.since, 1),
            "left_s": round(block.until - now, 1),
            "copy": block.copy,
        }

    def _key_shown(self, scope: str, key: str) -> str:
        return self.shown(key) if scope in NUMBER_SCOPES else key

    # ------------------------------------------------------------------ lift
    async def lift(
        self,
        key: str,
        scope: str | None,
        by: str,
        *,
        store: Unmarks | None = None,
        windows: dict[str, list[float]] | None = None,
        lists: Announces | None = None,
        local: bool = False,
        reset: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Lift the cooldowns of ``key`` (in ``scope``, or every scope): from the shared
        ``store`` (unless ``local``: a worker asked by the one whose API took the request),
        then from this process, forgetting what each scope lifted had counted (``reset``: also
        in these scopes, where the asking worker found a mark in the shared store); with
        ``lists``, the other instances are told. The answer: ``lifted`` (one entry per
        cooldown: scope, key, reason, monitor, left_s, ``where``: shared / local),
        ``windows_reset`` (the scopes whose counts were forgotten), and what could not be done
        (``shared_store: "unreachable"``, ``other_instances_told: false``)."""
        now = self.clock()
        scopes = SCOPES if scope is None else (scope,)
        lifted: list[dict[str, Any]] = []
        in_store: dict[str, int] = {}
        answer: dict[str, Any] = {"lifted": lifted}
        if store is not None and not local:
            for s in scopes:
                k = key_in(s, key)
                value = await store.unmark(f"dialer.block.{s}:{k}",
                                           _measures(s, k, windows or {}))
                if value is None:
                    answer["shared_store"] = "unreachable"
                elif value >= 0:
                    in_store[s] = value
        state = self.state()
        reset_scopes: list[str] = []
        via = {"via": "worker"} if local else {}
        for s in scopes:
            k = key_in(s, key)
            block = state.lift(s, k, now, reset=s in in_store or s in reset)
            if block is not None or s in in_store or s in reset:
                reset_scopes.append(s)
            reason, left = "", 0.0
            if s in in_store:
                left_ms, code = divmod(in_store[s], 16)
                reason = ANALYTICS[code] if code < len(ANALYTICS) else "dialer"
                left = left_ms / 1000
                lifted.append(self._lifted(s, k, reason, False, left, "shared"))
            if block is not None:
                reason, left = block.reason, block.until - now
                lifted.append(self._lifted(s, k, reason, block.monitor, left, "local"))
            if block is not None or s in in_store:
                self.log.info("dialer_cooldown_lifted", scope=s, key=self._key_shown(s, k),
                              reason=reason, monitor=block is not None and block.monitor,
                              left_s=round(max(0.0, left), 1), by=by,
                              local=block is not None, shared=s in in_store, **via)
        answer["windows_reset"] = reset_scopes
        answer["shared_scopes"] = sorted(in_store)  # for the other workers (reset)
        if not local and lists is not None and lifted:
            told = True
            for s in sorted({e["scope"] for e in lifted}):
                told = await lists.cooldown_lifted(s, key_in(s, key)) and told
            answer["other_instances_told"] = told
        return answer

    def _lifted(self, scope: str, key: str, reason: str, monitor: bool, left: float,
                where: str) -> dict[str, Any]:
        return {"scope": scope, "key": self._key_shown(scope, key), "reason": reason,
                "monitor": monitor, "left_s": round(max(0.0, left), 1), "where": where}

    def lifted_elsewhere(self, scope: str, key: str) -> None:
        """Another instance lifted the cooldown of ``key`` in ``scope`` (the shared lists'
        message): this process's copy goes too, with what it counted there."""
        if scope not in SCOPES:
            return
        block = self.state().lift(scope, key, self.clock(), reset=True)
        if block is not None:
            self.log.info("dialer_cooldown_lifted", scope=scope, key=self._key_shown(scope, key),
                          reason=block.reason, monitor=block.monitor,
                          left_s=round(block.until - self.clock(), 1), via="shared")


def _iso(unix: float) -> str:
    """A Unix time as ISO 8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
