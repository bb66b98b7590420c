"""Suspensions and flood bans shared by every sipguard instance through Redis / Valkey.

With ``state.backend: redis`` each instance keeps its own :class:`SuspensionStore` and
:class:`FloodState` in memory — the INVITE path and the flood guard read only those, nothing
there waits for Redis — and :class:`SharedLists` keeps them equal across instances:

What lives in Redis
    * ``<prefix>suspensions``: a hash, field = the normalised key (``+31201234567``,
      ``+3120*``), value = JSON ``{"reason", "by", "created", "expires"}`` (Unix times;
      ``expires`` null: until lifted).
    * ``<prefix>bans``: a hash, field = the ban key (``192.0.2.7``; with ``key: ip_port``
      ``192.0.2.7:5060`` / ``[2001:db8::7]:5060``), value = JSON ``{"since", "until",
      "reason"}`` (Unix times).
    * ``<prefix>lists:epoch``: a random id set when the hashes were first filled; its absence
      means the Redis lost its data (a restart without persistence), see below.
    * Channel ``<prefix>events``: one small JSON message per change, ``{"kind": "suspension" |
      "ban", "op": "add" | "lift" | "lift_all" | "sync", "key", "origin"}``. ``origin`` is
      the instance's id; an instance ignores its own messages. ``{"kind": "cooldown", "op":
      "lift", "key": "<scope>:<key>"}``: an operator lifted a dialer cooldown (its mark in
      Redis is gone already); every other instance drops its local copy at once
      (``on_cooldown_lift``). Nothing is stored for it: an instance that misses the message
      keeps its copy until the copy runs out (``block_s`` at most).

A change made here
    (the admin API's suspend / lift, a new flood ban, a ban lifted) marks its key *dirty* —
    a dict insert, cheap enough for the flood guard's hot path — and wakes the writer task,
    which writes each dirty key's *current* local value (HSET, or HDEL when it is gone), then
    publishes the messages. Repeated changes to one key take one slot. While Redis cannot be
    reached the dirty keys wait (at most ``max_pending``; beyond it further changes stay
    local only, counted ``shared_lists_pending_dropped``, and the next resync replaces them
    with what Redis holds) and are written once it is back.

A change made elsewhere
    arrives as a message; the listener reads the key's value from Redis (HGET, batched per
    burst of messages) and applies it to the local store at once: typically within a few
    milliseconds of the change. Reading the value rather than trusting the message makes the
    outcome the same whatever order messages from different instances arrive in. A key that
    is dirty here is left alone (this instance's write follows and wins).

Resync
    At start, after every reconnect (a missed message cannot be told apart from none) and
    every ``resync_s`` (30 s) as a safety net, both hashes are read in full (HSCAN) and
    replace the local lists, dirty keys excepted; entries that ran out are dropped and deleted
    from Redis (only when unchanged since read). When the epoch key is missing — the first
    start, or a Redis that came back empty — the instance first writes its own entries
    (HSETNX: a newer value already there wins) and sets a new epoch; an instance that then
    sees a different epoch than at its last resync, or at its first one an epoch set after
    it started, merges its entries in the same way (and announces ``sync``: the others read
    the hashes again). So a Redis that loses its data is refilled from the instances' memory
    instead of wiping every list; a lift made meanwhile may come back from an instance that
    still held the entry. An instance that starts while Redis already has an older epoch
    takes Redis's lists as they are (its ``state_dir`` file may be out of date).

Bounds and bad data
    At most ``max_suspensions`` suspensions and ``max_bans`` bans are taken from Redis (the
    flood rule's ``max_bans``: the oldest ban goes first). A malformed message or entry is
    skipped and counted (``shared_lists_bad_message`` / ``shared_lists_bad_entry``), and
    logged sampled; it never stops the listener.

Times: the local stores use the event loop's clock; Redis holds Unix times, converted with the
``wall_offset`` the shell keeps current (Unix time − loop time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from redis.exceptions import AuthenticationError, RedisError

from sipguard.ops.logging import SampledLogger
from sipguard.policy.flood import Ban, FloodState, Key
from sipguard.policy.suspensions import Suspension, SuspensionStore, suspension_key

SUSPENSION = "suspension"
BAN = "ban"
COOLDOWN = "cooldown"
COOLDOWN_SCOPES = frozenset({"caller", "origin", "callee", "high_cost"})  # the dialer's
OPS = frozenset({"add", "lift", "lift_all", "sync"})
MAX_MESSAGE = 2048  # bytes; a longer payload is not one of ours
MAX_BATCH = 512  # messages read (and keys written) per round trip
SCAN_COUNT = 1000
RESYNC_S = 30.0
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
MAX_SUSPENSIONS = 100_000

_FAILURES = (RedisError, OSError, asyncio.TimeoutError, ConnectionError)


def refused_login(exc: BaseException) -> bool:
    """Redis answered, and refused sipguard's credentials (a wrong or missing password or
    user): not a Redis that did not answer."""
    text = str(exc)
    return isinstance(exc, AuthenticationError) or any(
        code in text for code in ("WRONGPASS", "NOAUTH", "without any password configured"))

# Delete a hash field only when it still holds the value read (an entry that ran out, unless
# another instance wrote it anew meanwhile).
DELETE_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def ban_field(key: Key) -> str:
    """A FloodState ban key as a Redis field: ``ip``, ``ip:port`` or ``[v6]:port``."""
    if isinstance(key, str):
        return key
    host, port = key
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ban_key(field: str) -> Key:
    """The FloodState ban key of a Redis field (:func:`ban_field` reversed); ValueError for a
    field that is not one."""
    if not field or len(field) > 64 or any(c in field for c in " \t\r\n{}\"'"):
        raise ValueError(f"{field[:64]!r} is not a ban key")
    if field.startswith("["):
        host, sep, port = field[1:].partition("]:")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{field!r} is not a ban key")
        return (host, int(port))
    if field.count(":") == 1:
        host, _, port = field.partition(":")
        if not port.isdigit() or not host:
            raise ValueError(f"{field!r} is not a ban key")
        return (host, int(port))
    return field


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SharedLists:
    """Keeps one instance's suspensions and flood bans equal to every other's, via Redis."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        suspensions: SuspensionStore,
        flood: FloodState,
        clock: Callable[[], float],
        wall_offset: Callable[[], float],
        *,
        origin: str | None = None,
        max_suspensions: int = MAX_SUSPENSIONS,
        max_bans: Callable[[], int] = lambda: 100_000,
        max_pending: int = 200_000,
        resync_s: float = RESYNC_S,
        counters: MutableMapping[str, int] | None = None,
        log: Any = None,
        sampled: SampledLogger | None = None,
        on_suspensions: Callable[[list[Suspension], list[Suspension]], None] | None = None,
        on_cooldown_lift: Callable[[str, str], None] | None = None,
    ) -> None:
        self.client = client
        self.suspensions = suspensions
        self.flood = flood
        self.clock = clock
        self.wall_offset = wall_offset
        self.origin = origin or f"{socket.gethostname()[:40]}/{os.getpid()}/{os.urandom(4).hex()}"
        self.max_suspensions = max_suspensions
        self.max_bans = max_bans
        self.max_pending = max_pending
        self.resync_s = resync_s
        self.counters: MutableMapping[str, int] = counters if counters is not None else Counter()
        self.log = log
        self.sampled = sampled
        # remote changes to the suspensions (added or replaced, lifted): the shell logs them
        # (numbers as log.numbers says) and saves the state_dir file
        self.on_suspensions = on_suspensions
        # a dialer cooldown lifted on another instance: (scope, key), to drop the local copy
        self.on_cooldown_lift = on_cooldown_lift
        self.key_suspensions = f"{prefix}suspensions"
        self.key_bans = f"{prefix}bans"
        self.key_epoch = f"{prefix}lists:epoch"
        self.channel = f"{prefix}events"
        self._delete_if = client.register_script(DELETE_IF)
        # (kind, field) changed here and not yet written, oldest first
        self.dirty: dict[tuple[str, str], None] = {}
        self._lift_all_bans = False  # every ban lifted here, not yet written
        self.connected = False  # subscribed and resynced since the last failure
        self.epoch: bytes | None = None  # the epoch of the last resync
        self.started = clock() + wall_offset()  # Unix time
        self._resync_due = True
        self._lock = asyncio.Lock()  # a write and a resync never interleave
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._refused = asyncio.Event()  # Redis refused the login (before the first load)
        self.refusal: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._watched: Any = None  # the pub/sub connection whose reconnects mean a resync
        self._stopping = False
        self._session_ok = False  # the current listener session has resynced

    # ------------------------------------------------------------------ local changes
    def suspension_changed(self, key: str) -> None:
        """``key`` was suspended, replaced or lifted here: write its current state."""
        self._mark(SUSPENSION, key)

    def ban_changed(self, key: Key) -> None:
        """A ban on ``key`` was set or lifted here."""
        self._mark(BAN, ban_field(key))

    def ban_added(self, key: Key, ban: Ban) -> None:
        """:attr:`FloodState.on_ban`: the flood guard banned ``key`` (hot path: O(1))."""
        self._mark(BAN, ban_field(key))

    def bans_lifted_all(self) -> None:
        """Every ban was lifted here (:meth:`FloodState.lift_all`)."""
        for item in [i for i in self.dirty if i[0] == BAN]:
            del self.dirty[item]
        self._lift_all_bans = True
        self._wake.set()

    async def cooldown_lifted(self, scope: str, key: str, timeout_s: float = 1.0) -> bool:
        """Tell every other instance that the dialer cooldown of ``key`` in ``scope`` was
        lifted here (they drop their local copies); False when Redis did not take the
        message (those copies then run out by themselves)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._publish([(COOLDOWN, "lift", f"{scope}:{key}")])
        except _FAILURES as exc:
            self._warn("shared_lists_publish_failed", "shared_lists:publish", what="cooldown",
                       error=repr(exc) or type(exc).__name__)
            return False
        return True

    def _mark(self, kind: str, field: str) -> None:
        item = (kind, field)
        dirty = self.dirty
        if item not in dirty:
            if len(dirty) >= self.max_pending:
                self.counters["shared_lists_pending_dropped"] += 1
                return
            dirty[item] = None
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, wait_s: float = 2.0) -> bool:
        """Start the listener and the writer; wait up to ``wait_s`` for the first full load.
        False when Redis did not answer by then (it goes on trying in the background). A
        Redis that answered by refusing the login is not that: it is logged here as what it
        is (``shared_lists_not_loaded``, ``reason: authentication failed``), at once, and the
        answer is True; the listener goes on trying too."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._write())]
        waits = [loop.create_task(self._synced.wait()), loop.create_task(self._refused.wait())]
        try:
            await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if self._synced.is_set():
            return True
        if self.refusal is None:
            return False
        if self.log is not None:
            self.log.warning("shared_lists_not_loaded", reason="authentication failed",
                             error=f"{type(self.refusal).__name__}: {self.refusal}",
                             detail="Redis refused the login (the password or user in "
                                    "state.url): local lists until it accepts it")
        return True

    async def stop(self) -> None:
        """Stop both tasks (changes not yet written stay unwritten)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self._close_pubsub()

    async def flush(self) -> None:
        """Write what is dirty now (tests, and a graceful stop); raises when Redis fails."""
        async with self._lock:
            while self.dirty or self._lift_all_bans:
                await self._write_batch()

    def stats(self) -> dict[str, float]:
        return {"shared_lists_connected": float(self.connected),
                "shared_lists_pending": float(len(self.dirty))}

    # ------------------------------------------------------------------ the writer
    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                continue  # the listener wakes this task once it has resynced
            try:
                async with self._lock:
                    while self.dirty or self._lift_all_bans:
                        await self._write_batch()
            except _FAILURES as exc:
                self._lost("write", exc)
            except Exception as exc:  # never let the task die
                self.counters["internal_errors"] += 1
                self._warn("shared_lists_failed", "shared_lists:write", error=repr(exc))
                await asyncio.sleep(RETRY_MIN_S)
                self._wake.set()

    async def _write_batch(self) -> None:
        """Write (then publish) up to MAX_BATCH dirty keys; on failure they stay dirty."""
        batch: list[tuple[str, str]] = []
        for item in self.dirty:
            batch.append(item)
            if len(batch) >= MAX_BATCH:
                break
        for item in batch:
            del self.dirty[item]
        lift_all, self._lift_all_bans = self._lift_all_bans, False
        now, offset = self.clock(), self.wall_offset()
        writes = self.client.pipeline(transaction=False)
        messages: list[tuple[str, str, str]] = []
        if lift_all:
            writes.delete(self.key_bans)
            messages.append((BAN, "lift_all", ""))
        for kind, field in batch:
            value = self._local_value(kind, field, now, offset)
            name = self.key_suspensions if kind == SUSPENSION else self.key_bans
            if value is None:
                writes.hdel(name, field)
                messages.append((kind, "lift", field))
            else:
                writes.hset(name, field, value)
                messages.append((kind, "add", field))
        try:
            await writes.execute()
            await self._publish(messages)
        except BaseException:
            for item in batch:
                self.dirty.setdefault(item, None)
            self._lift_all_bans = self._lift_all_bans or lift_all
            raise
        self.counters["shared_lists_written"] += len(messages)

    async def _publish(self, messages: Iterable[tuple[str, str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for kind, op, field in messages:
            pipe.publish(self.channel, json.dumps(
                {"kind": kind, "op": op, "key": field, "origin": self.origin},
                separators=(",", ":")))
            n += 1
        if n:
            await pipe.execute()

    def _local_value(self, kind: str, field: str, now: float, offset: float) -> str | None:
        """The JSON to store for a key as this instance has it now; None: not in force."""
        if kind == SUSPENSION:
            entry = self.suspensions.get(field)
            if entry is None or not entry.live(now):
                return None
            return json.dumps({
                "reason": entry.reason, "by": entry.by, "created": entry.created + offset,
                "expires": None if entry.expires is None else entry.expires + offset,
            }, separators=(",", ":"))
        try:
            ban = self.flood.bans.get(ban_key(field))
        except ValueError:
            return None
        if ban is None or ban.until <= now or ban.monitor:  # a monitor-mode ban stays here
            return None
        return json.dumps({"since": ban.since + offset, "until": ban.until + offset,
                           "reason": ban.reason}, separators=(",", ":"))

    # ------------------------------------------------------------------ the listener
    async def _listen(self) -> None:
        wait = RETRY_MIN_S
        while True:
            self._session_ok = False
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                self._lost("listen", exc)
            except Exception as exc:  # never let the task die
                self.counters["internal_errors"] += 1
                self._lost("listen", exc)
            await self._close_pubsub()
            await asyncio.sleep(wait)
            wait = RETRY_MIN_S if self._session_ok else min(RETRY_MAX_S, wait * 2)

    async def _session(self) -> None:
        """Subscribe, resync, then apply messages until something fails."""
        pubsub = self._pubsub = self.client.pubsub()
        await pubsub.subscribe(self.channel)
        connection = getattr(pubsub, "connection", None)
        if connection is not None and hasattr(connection, "register_connect_callback"):
            # redis-py reconnects a pub/sub connection by itself: messages may have been
            # missed meanwhile, so a silent reconnect means a resync too
            connection.register_connect_callback(self._reconnected)
            self._watched = connection
        self._resync_due = True
        next_resync = 0.0
        while True:
            if self._resync_due or self.clock() >= next_resync:
                self._resync_due = False
                await self._resync()
                next_resync = self.clock() + self.resync_s
                if not self.connected:
                    self.connected = True
                    self.counters["shared_lists_connected"] += 1
                    self._note("shared_lists_connected", pending=len(self.dirty))
                self._session_ok = True
                self._synced.set()
                self._wake.set()  # the writer: what waited can go now
            timeout = max(0.01, min(1.0, next_resync - self.clock()))
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is None:
                continue
            batch = [message]
            while len(batch) < MAX_BATCH:
                more = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                if more is None:
                    break
                batch.append(more)
            await self._apply_messages(batch)

    def _reconnected(self, connection: Any) -> None:
        self._resync_due = True

    async def _close_pubsub(self) -> None:
        watched, self._watched = self._watched, None
        if watched is not None:  # the connection goes back to the pool
            with contextlib.suppress(Exception):
                watched.deregister_connect_callback(self._reconnected)
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _lost(self, what: str, exc: BaseException) -> None:
        if self._stopping:
            return
        self._resync_due = True
        if self.connected:
            self.connected = False
            self.counters["shared_lists_disconnected"] += 1
            self._warn("shared_lists_unreachable", "shared_lists:lost", what=what,
                       error=repr(exc) or type(exc).__name__, pending=len(self.dirty))
        else:
            self.counters["shared_lists_retries"] += 1
            if not self._synced.is_set() and refused_login(exc):
                self.refusal = exc
                self._refused.set()

    # ------------------------------------------------------------------ messages
    async def _apply_messages(self, batch: list[Any]) -> None:
        wanted: dict[tuple[str, str], None] = {}
        for message in batch:
            item = self._parse(message)
            if item is None:
                continue
            kind, op, field = item
            if kind == COOLDOWN:
                if self.on_cooldown_lift is not None:
                    scope, _, key = field.partition(":")
                    self.on_cooldown_lift(scope, key)
            elif op in ("lift_all", "sync"):
                self._resync_due = True  # read the whole hash: the truth after a wipe
            else:
                wanted[(kind, field)] = None
        if not wanted:
            return
        items = list(wanted)
        pipe = self.client.pipeline(transaction=False)
        for kind, field in items:
            pipe.hget(self.key_suspensions if kind == SUSPENSION else self.key_bans, field)
        values = await pipe.execute()
        now, offset = self.clock(), self.wall_offset()
        added: list[Suspension] = []
        lifted: list[Suspension] = []
        for (kind, field), raw in zip(items, values, strict=True):
            if (kind, field) in self.dirty:
                continue
            if kind == SUSPENSION:
                self._apply_suspension(field, raw, now, offset, added, lifted)
            else:
                self._apply_ban(field, raw, now, offset)
        self._report(added, lifted)

    def _parse(self, message: Any) -> tuple[str, str, str] | None:
        """(kind, op, field) of a message from another instance; None for ours, for other
        message types and (counted) for anything malformed."""
        try:
            if message.get("type") != "message":
                return None
            data = message["data"]
            if not isinstance(data, bytes | str) or len(data) > MAX_MESSAGE:
                raise ValueError("payload missing or too long")
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            kind, op, field, origin = body["kind"], body["op"], body["key"], body["origin"]
            if kind not in (SUSPENSION, BAN, COOLDOWN) or op not in OPS or (
                    kind == COOLDOWN and op != "lift"):
                raise ValueError("unknown kind or op")
            if not isinstance(field, str) or not isinstance(origin, str):
                raise ValueError("key and origin must be strings")
            if origin == self.origin:
                return None
            if kind == COOLDOWN:
                scope, _, key = field.partition(":")
                if scope not in COOLDOWN_SCOPES or not key:
                    raise ValueError("not a cooldown's scope:key")
            elif op in ("add", "lift"):
                if kind == SUSPENSION:
                    if suspension_key(field) != field:
                        raise ValueError("key is not normalised")
                else:
                    ban_key(field)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            self.counters["shared_lists_bad_message"] += 1
            self._warn("shared_lists_bad_message", "shared_lists:bad_message",
                       error=str(exc)[:200])
            return None
        self.counters["shared_lists_messages"] += 1
        return kind, op, field

    # ------------------------------------------------------------------ applying entries
    def _suspension_of(self, field: str, raw: bytes | str, offset: float) -> Suspension:
        """A Redis entry as a Suspension (loop times). ValueError / KeyError / TypeError for
        anything malformed."""
        if len(raw) > MAX_MESSAGE:
            raise ValueError("entry too long")
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise TypeError("not an object")
        probe = SuspensionStore()
        probe.load([{"key": field, "reason": value["reason"], "by": value["by"],
                     "created": value["created"], "expires": value["expires"]}],
                   offset, float("-inf"))
        entry = probe.get(field)
        if entry is None or entry.key != field:
            raise ValueError("key not normalised, or a time that is not a number")
        return entry

    def _apply_suspension(
        self, field: str, raw: bytes | str | None, now: float, offset: float,
        added: list[Suspension], lifted: list[Suspension],
    ) -> bool:
        """Make the local entry for ``field`` what Redis holds (None: no entry). True when
        ``field`` is in force here afterwards."""
        store = self.suspensions
        entry: Suspension | None = None
        if raw is not None:
            try:
                entry = self._suspension_of(field, raw, offset)
            except (ValueError, KeyError, TypeError) as exc:
                self._bad_entry("suspensions", field, exc)
                return store.get(field) is not None
            if not entry.live(now):
                entry = None
        current = store.get(field)
        if entry is None:
            if current is not None:
                store.lift(field)
                lifted.append(current)
            return False
        if current is not None and _same(current, entry):
            return True
        if current is None and len(store) >= self.max_suspensions:
            self.counters["shared_lists_full"] += 1
            self._warn("shared_lists_full", "shared_lists:full", list="suspensions",
                       max=self.max_suspensions)
            return False
        store.load([{"key": entry.key, "reason": entry.reason, "by": entry.by,
                     "created": entry.created, "expires": entry.expires}], 0.0, now)
        added.append(entry)
        return True

    def _apply_ban(self, field: str, raw: bytes | str | None, now: float, offset: float) -> \
            Key | None:
        """Make the local ban for ``field`` what Redis holds; its key when in force here."""
        bans = self.flood.bans
        try:
            key = ban_key(field)
        except ValueError as exc:
            self._bad_entry("bans", field, exc)
            return None
        if raw is None:
            if bans.pop(key, None) is not None:
                self.counters["shared_lists_bans_lifted"] += 1
            return None
        try:
            if len(raw) > MAX_MESSAGE:
                raise ValueError("entry too long")
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise TypeError("not an object")
            since = float(value["since"]) - offset
            until = float(value["until"]) - offset
            reason = value["reason"]
            if not isinstance(reason, str) or len(reason) > 32:
                raise ValueError("reason is not a short string")
            if not (math.isfinite(since) and math.isfinite(until)):
                raise ValueError("since / until not finite")
        except (ValueError, KeyError, TypeError) as exc:
            self._bad_entry("bans", field, exc)
            return key if key in bans else None
        if until <= now:
            if bans.pop(key, None) is not None:
                self.counters["shared_lists_bans_lifted"] += 1
            return None
        current = bans.get(key)
        if current is not None and abs(current.until - until) < 0.01 \
                and current.reason == reason:
            return key
        ban = Ban(since, until, reason)
        if current is not None:
            ban.dropped = current.dropped
        elif len(bans) >= self.max_bans() and not self.flood.sweep(now):
            del bans[next(iter(bans))]
        bans[key] = ban
        self.counters["shared_lists_bans_applied"] += 1
        return key

    def _bad_entry(self, name: str, field: str, exc: BaseException) -> None:
        self.counters["shared_lists_bad_entry"] += 1
        self._warn("shared_lists_bad_entry", f"shared_lists:bad_entry:{name}", hash=name,
                   field=field[:64], error=str(exc)[:200])

    # ------------------------------------------------------------------ resync
    async def _resync(self) -> None:
        """Both hashes read in full and made the local lists (dirty keys excepted)."""
        async with self._lock:
            merged = await self._check_epoch()
            if merged:
                await self._publish([(SUSPENSION, "sync", ""), (BAN, "sync", "")])
            sus = await self._read(self.key_suspensions)
            bans = await self._read(self.key_bans)
            now, offset = self.clock(), self.wall_offset()
            added: list[Suspension] = []
            lifted: list[Suspension] = []
            expired: list[tuple[str, str, bytes | str]] = []
            seen: set[str] = set()
            for field, raw in sus.items():
                if (SUSPENSION, field) in self.dirty or self._apply_suspension(field, raw, now, offset, added, lifted):
                    seen.add(field)
                elif self.suspensions.get(field) is None and _ran_out(raw, "expires", offset,
                                                                     now):
                    expired.append((self.key_suspensions, field, raw))
            for entry in self.suspensions.entries():
                if entry.key not in seen and (SUSPENSION, entry.key) not in self.dirty:
                    self.suspensions.lift(entry.key)
                    lifted.append(entry)
            in_force: set[Key] = set()
            for field, raw in bans.items():
                if (BAN, field) in self.dirty:
                    with contextlib.suppress(ValueError):
                        in_force.add(ban_key(field))
                    continue
                key = self._apply_ban(field, raw, now, offset)
                if key is not None:
                    in_force.add(key)
                elif _ran_out(raw, "until", offset, now):
                    expired.append((self.key_bans, field, raw))
            flood_bans = self.flood.bans
            for key in [k for k in flood_bans if k not in in_force]:
                if (BAN, ban_field(key)) not in self.dirty and not flood_bans[key].monitor:
                    del flood_bans[key]  # (monitor-mode bans are this instance's own)
            self.counters["shared_lists_resyncs"] += 1
            self._report(added, lifted)
            if expired:
                pipe = self.client.pipeline(transaction=False)
                for name, field, raw in expired:
                    await self._delete_if(keys=[name], args=[field, raw], client=pipe)
                await pipe.execute()

    async def _check_epoch(self) -> bool:
        """Make sure the epoch key is there, and write this instance's entries that Redis
        lacks (HSETNX) when the lists in Redis are younger than what it holds: no epoch (the
        first start, or Redis lost its data), another epoch than at the last resync (refilled
        since), or, at the first resync, an epoch set after this instance started. True
        when it wrote any."""
        epoch = await self.client.get(self.key_epoch)
        merge = False
        if epoch is None:
            mine = f"{self.clock() + self.wall_offset():.3f} {self.origin}".encode()
            if await self.client.set(self.key_epoch, mine, nx=True):
                epoch, merge = mine, True
            else:
                epoch = await self.client.get(self.key_epoch)
        if epoch != self.epoch and not merge:
            merge = self.epoch is not None or _epoch_time(epoch) >= self.started
        written = await self._merge_local() if merge else 0
        if written:
            self.counters["shared_lists_merged"] += written
            self._note("shared_lists_merged", entries=written)
        self.epoch = epoch
        return written > 0

    async def _merge_local(self) -> int:
        """HSETNX every entry in force here; how many Redis lacked."""
        now, offset = self.clock(), self.wall_offset()
        items: list[tuple[str, str, str]] = []
        for entry in self.suspensions.entries():
            value = self._local_value(SUSPENSION, entry.key, now, offset)
            if value is not None:
                items.append((self.key_suspensions, entry.key, value))
        for key in list(self.flood.bans):
            field = ban_field(key)
            value = self._local_value(BAN, field, now, offset)
            if value is not None:
                items.append((self.key_bans, field, value))
        written = 0
        for start in range(0, len(items), MAX_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for name, field, value in items[start:start + MAX_BATCH]:
                pipe.hsetnx(name, field, value)
            written += sum(1 for done in await pipe.execute() if done)
        return written

    async def _read(self, name: str) -> dict[str, bytes | str]:
        """A whole hash (HSCAN: Redis is never blocked by one big read)."""
        out: dict[str, bytes | str] = {}
        cursor: int = 0
        while True:
            cursor, chunk = await self.client.hscan(name, cursor, count=SCAN_COUNT)
            for field, raw in chunk.items():
                try:
                    out[_text(field)] = raw
                except UnicodeDecodeError as exc:
                    self._bad_entry(name, repr(field), exc)
            if not cursor:
                return out

    # ------------------------------------------------------------------ reporting
    def _report(self, added: list[Suspension], lifted: list[Suspension]) -> None:
        if added:
            self.counters["shared_lists_suspensions_applied"] += len(added)
        if lifted:
            self.counters["shared_lists_suspensions_lifted"] += len(lifted)
        if (added or lifted) and self.on_suspensions is not None:
            try:
                self.on_suspensions(added, lifted)
            except Exception:
                self.counters["internal_errors"] += 1

    def _note(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.info(event, **fields)

    def _warn(self, event: str, key: str, **fields: Any) -> None:
        if self.sampled is not None:
            self.sampled.log("warning", event, key=key, **fields)
        elif self.log is not None:
            self.log.warning(event, **fields)


def _same(a: Suspension, b: Suspension) -> bool:
    if a.reason != b.reason or a.by != b.by or abs(a.created - b.created) > 0.01:
        return False
    if a.expires is None or b.expires is None:
        return a.expires is b.expires
    return abs(a.expires - b.expires) < 0.01


def _epoch_time(epoch: bytes | None) -> float:
    """When an epoch was set (Unix time); 0 for one that does not say."""
    try:
        return float((epoch or b"").split(b" ", 1)[0])
    except ValueError:
        return 0.0


def _ran_out(raw: bytes | str, name: str, offset: float, now: float) -> bool:
    """Whether a stored entry's ``name`` time (Unix) has passed (False when unreadable)."""
    try:
        value = json.loads(raw)[name]
        return value is not None and float(value) - offset <= now
    except (ValueError, KeyError, TypeError):
        return False
