"""The shared state store (:class:`sipguard.state.base.SharedCounts` for Redis / Valkey):
live-call slots and rate buckets, one round trip per INVITE, with a circuit breaker in front.

What lives in Redis
    * A live-call count is a sorted set per number and kind (``sipguard:{+12125550100}:caller``)
      of lease ids scored by their expiry (milliseconds, Redis's own clock). A lease is taken
      by adding its id to every key it counts on; it is released by removing it (idempotent:
      removing twice changes nothing); it lapses by itself at its score, so the slots of an
      instance that died come back after ``lease_s`` at most. Each instance re-scores the
      leases of its live calls every ``lease_s / 3`` (:meth:`SharedStore.refresh`).
    * A rate limit is one GCRA cell per key (``sipguard:{+12125550100}:rate.per_caller``): its
      theoretical arrival time in microseconds, with a TTL so that a drained bucket vanishes.

One INVITE, one round trip
    The policy collects every check the call's rules need (``c``: fewer than N live leases on a
    key; ``r``: a rate cell not ahead of schedule) and the keys its lease goes on, and
    :meth:`SharedStore.admit` runs them as one Lua script (``ADMIT``): checks in rule order;
    the first failure of a rule in enforce mode refuses the call and *nothing* is taken;
    otherwise every passing rate cell advances and the lease is added to its keys — check and
    take in one atomic step, so two instances admitting at once can never both take the last
    slot. Failures of rules in monitor mode are reported and take nothing. With Redis Cluster
    the keys are grouped by hash slot (all of one number's keys share one, see
    :mod:`sipguard.transport.redis_client`) and one script per slot runs, concurrently; if one
    group refuses, what the others took is released again (rate cells they advanced stay
    advanced).

When Redis cannot be reached, or refuses to write
    Every call has ``timeout_ms``; ``breaker_failures`` failures in a row open the breaker:
    no call waits for Redis any more, :meth:`admit` answers ``None`` at once and the policy
    applies ``fail: open | closed``. A Redis that answers but refuses writes — over
    ``maxmemory`` (``OOM``), a read-only replica (``READONLY``), a failed save (``MISCONF``)
    — is a failure like a timeout: every script starts with a ``#!lua`` line without flags
    (Redis 7 or Valkey), so Redis refuses it *as a whole* before it runs, never half-way (a
    flag-less script of the old kind is stopped at its first write that may grow memory,
    after the writes before it), and the epoch read below is such a script too. A re-scoring
    Redis refuses opens the breaker at once (the live calls' leases would lapse while the
    admissions went on), and so does a refused login (``authentication failed``). The breaker
    is logged ``state_unreachable`` once per outage, with a ``reason`` when Redis named one.
    A background probe (backoff 0.2 s doubling to 5 s) runs the epoch script — a Redis that
    answers PING but refuses writes keeps the breaker open — then sends the kept releases and
    re-scores every live lease, and only then closes the breaker: a lease id is a set member,
    so a call re-added after the outage is counted once, a call that ended meanwhile is
    removed (its release was kept) or lapses, and no admission runs against counts that miss
    a call that is up. Until Redis has answered once after start the store is not
    :attr:`available` (``/readyz`` with ``fail: closed``), though calls are still tried.

When Redis loses its data
    A restart without persistence, a FLUSHALL or a failover to a replica that lacks the sets
    empties the counts while calls are up, often with no failed round trip at all. At start
    and then every second each instance reads ``<prefix>counts:epoch`` (a random value, no
    expiry, set by whoever finds it missing); when it is gone or changed, the instance
    re-scores its live leases at once (``state_data_lost``), so the limits count the calls that
    are up within a second (and the re-scoring's round trips) instead of ``lease_s / 3``. The
    first read that succeeds is followed by a re-scoring too, so calls admitted before it
    (while the instance was starting) are back even when Redis lost them just before. With
    Redis Cluster the key lives on one shard: another shard losing its data alone waits for
    the refresh.

Nothing here reads the event loop's clock for the data (Redis's ``TIME`` scores everything);
``clock`` only paces the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

import hiredis
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError

from sipguard.state.base import Admitted, Check
from sipguard.transport.redis_client import by_slot, key
from sipguard.transport.redis_pipe import PipeError, RespPipe

# KEYS: the keys of the checks and of the take.
# ARGV: lease, lease_ms, n, then n checks of 6 fields (kind, key index, a, b, monitor 0|1,
#       member), then the number of take keys and their key indices.
# c: a = most live leases (the lease itself already there counts as room).
# r: a = emission interval us, b = tolerance us.
# b: a cooldown mark (a string: its code); value = ms left * 16 + code.
# h / n: a = window ms; distinct members (HyperLogLog) / calls in 4 buckets of a/4 ms plus the
#        current one, this call included; they only measure.
# Returns {taken 1|0, refused check (0-based) or -1, value, then (check, value) pairs for failed
# monitored checks and for measures}; value: a count, or the microseconds a rate cell is ahead.
# Every script starts with "#!lua" and no flags: Redis 7 then refuses it as a whole, before it
# runs, whenever it refuses writes (OOM over maxmemory, READONLY replica, MISCONF, NOREPLICAS),
# instead of stopping it at its first write that may grow memory, after the ones before it.
ADMIT = """#!lua
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local lease = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local pos = 4
local cells = {}
local out = {1, -1, 0}
for i = 1, n do
  local kind = ARGV[pos]
  local k = KEYS[tonumber(ARGV[pos + 1])]
  local a = tonumber(ARGV[pos + 2])
  local b = tonumber(ARGV[pos + 3])
  local monitor = ARGV[pos + 4] == '1'
  local member = ARGV[pos + 5]
  pos = pos + 6
  local failed = false
  local value = 0
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now_ms)
    if not redis.call('ZSCORE', k, lease) then
      local count = redis.call('ZCARD', k)
      if count >= a then
        failed = true
        value = count
      end
    end
  elseif kind == 'r' then
    local tat = tonumber(redis.call('GET', k) or '0') or 0
    if tat < now_us then tat = now_us end
    local ahead = tat - now_us - b
    if ahead > 0 then
      failed = true
      value = math.ceil(ahead)
    else
      cells[#cells + 1] = {k, tat + a}
    end
  elseif kind == 'b' then
    local code = redis.call('GET', k)
    if code then
      failed = true
      value = math.max(0, redis.call('PTTL', k)) * 16 + (tonumber(code) or 0)
    end
  else
    local width = math.max(1, math.floor(a / 4))
    local bucket = math.floor(now_ms / width)
    local cur = k .. ':' .. bucket
    if kind == 'h' then redis.call('PFADD', cur, member) else redis.call('INCR', cur) end
    redis.call('PEXPIRE', cur, a + 2 * width)
    local names = {}
    for j = 0, 4 do names[#names + 1] = k .. ':' .. (bucket - j) end
    local count = 0
    if kind == 'h' then
      count = redis.call('PFCOUNT', unpack(names))
    else
      for _, name in ipairs(names) do count = count + (tonumber(redis.call('GET', name)) or 0) end
    end
    out[#out + 1] = i - 1
    out[#out + 1] = count
  end
  if failed then
    if not monitor then
      return {0, i - 1, value}
    end
    out[#out + 1] = i - 1
    out[#out + 1] = value
  end
end
for _, c in ipairs(cells) do
  redis.call('SET', c[1], string.format('%.0f', c[2]), 'PX',
             math.max(1, math.ceil((c[2] - now_us) / 1000)))
end
local m = tonumber(ARGV[pos])
for j = 1, m do
  local k = KEYS[tonumber(ARGV[pos + j])]
  redis.call('ZADD', k, now_ms + lease_ms, lease)
  redis.call('PEXPIRE', k, lease_ms)
end
return out
"""

# KEYS: keys; ARGV: lease_ms, then the member for each key. Adds or re-scores each member.
REFRESH = """#!lua
local t = redis.call('TIME')
local expires = math.floor((tonumber(t[1]) * 1000000 + tonumber(t[2])) / 1000) + tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, expires, ARGV[i + 1])
  redis.call('PEXPIRE', k, ARGV[1])
end
return #KEYS
"""

# KEYS: keys; ARGV: the member for each key. Removes each; how many were there.
RELEASE = """#!lua
local n = 0
for i, k in ipairs(KEYS) do
  n = n + redis.call('ZREM', k, ARGV[i])
end
return n
"""

# KEYS: the epoch key; ARGV: a new random value, set when the key is missing. Returns
# {the epoch, 1 when this call set it}. A script (not GET): refused wherever ADMIT is, so the
# watch and the breaker's probe fail exactly when calls would.
WATCH = """#!lua
local epoch = redis.call('GET', KEYS[1])
if epoch then
  return {epoch, 0}
end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], 1}
"""

# KEYS: a cooldown mark, then the measures to forget; ARGV: for each measure, its window ms.
# Deletes the mark and the window's buckets of each measure (the five ADMIT reads and the one
# after); returns the mark's value as a b check reports it (ms left * 16 + code), or -1.
LIFT = """#!lua
local t = redis.call('TIME')
local now_ms = math.floor((tonumber(t[1]) * 1000000 + tonumber(t[2])) / 1000)
local value = -1
local code = redis.call('GET', KEYS[1])
if code then
  value = math.max(0, redis.call('PTTL', KEYS[1])) * 16 + (tonumber(code) or 0)
  redis.call('DEL', KEYS[1])
end
for i = 2, #KEYS do
  local width = math.max(1, math.floor(tonumber(ARGV[i - 1]) / 4))
  local bucket = math.floor(now_ms / width)
  for j = -1, 5 do redis.call('DEL', KEYS[i] .. ':' .. (bucket - j)) end
end
return value
"""

REFRESH_CHUNK = 256  # leases per refresh script
WATCH_S = 1.0  # how often the epoch key is read: a Redis that lost its data is noticed
PROBE_MIN_S, PROBE_MAX_S = 0.2, 5.0

def _quietly(f: asyncio.Future[Any]) -> None:
    """A reply nobody waits for: its error read (the next refresh makes up for it)."""
    if not f.cancelled():
        f.exception()


class BadReply(ValueError):
    """Redis (or something in its place) answered a script with what the script never
    returns: treated as a failed round trip (the breaker counts it, ``state.fail`` decides)."""


_FAILURES = (RedisError, OSError, asyncio.TimeoutError, ConnectionError, BadReply)
_FAILED = object()  # what _guarded returns for a round trip that failed

# The codes of the error replies by which Redis refuses what a call needs, as logged (reason).
_REFUSALS = {
    "WRONGPASS": "authentication failed", "NOAUTH": "authentication failed",
    "OOM": "out of memory (maxmemory)", "READONLY": "read-only replica",
    "MISCONF": "cannot save (MISCONF)", "NOREPLICAS": "not enough replicas",
    "LOADING": "loading its data", "MASTERDOWN": "replica without its master",
}
_REFUSAL = re.compile(r"\b(" + "|".join(_REFUSALS) + r")\b")


def failure_reason(exc: BaseException) -> str | None:
    """Why Redis refused, when its error says so (``authentication failed``, ``out of memory
    (maxmemory)``, ``read-only replica`` …); None for a timeout, a lost connection or
    anything else."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) or "without any password configured" in text:
        return "authentication failed"
    found = _REFUSAL.search(text)
    return _REFUSALS[found.group(1)] if found else None


def _glob_escaped(text: str) -> str:
    """``text`` matched literally in a Redis glob pattern (SCAN MATCH)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _describe(exc: BaseException) -> str:
    """An error for the log: redis-py's own repr drops the message (``server:ResponseError``)."""
    if isinstance(exc, RedisError):
        return f"{type(exc).__name__}({str(exc)!r})"
    return repr(exc) or type(exc).__name__


class SharedStore:
    """Leases and rate cells in Redis for one sipguard process."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "sipguard:",
        cluster: bool = False,
        timeout_s: float = 0.05,
        lease_s: float = 60.0,
        fail_open: bool = True,
        retry_after_s: int = 5,
        breaker_failures: int = 3,
        max_pending: int = 100_000,
        counters: MutableMapping[str, int] | None = None,
        log: Callable[..., None] | None = None,
        pipe: RespPipe | None = None,
    ) -> None:
        self.client = client
        # the INVITE path's own pipelined connection (a single server); None: redis-py's
        self.pipe = pipe
        if pipe is not None:
            pipe.scripts = (ADMIT, RELEASE, REFRESH, WATCH)
        self.prefix = prefix
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.lease_ms = int(lease_s * 1000)
        self.fail_open = fail_open
        self.retry_after_s = retry_after_s
        self.breaker_failures = breaker_failures
        self.counters: MutableMapping[str, int] = counters if counters is not None else Counter()
        self._log = log
        self._admit = client.register_script(ADMIT)
        self._refresh = client.register_script(REFRESH)
        self._release = client.register_script(RELEASE)
        self._watch = client.register_script(WATCH)
        self._lift = client.register_script(LIFT)
        self._keys: dict[str, str] = {}  # "kind:ident" -> Redis key (bounded cache)
        self.failures = 0  # failed round trips in a row
        self.epoch: Any = None  # the counts' epoch key as last read (see _data_lost)
        self.last_failure: BaseException | None = None  # the last failed round trip's error
        self.open = False  # the breaker: no call waits for Redis while open
        self.answered = False  # Redis ran something for this process since it started
        self.pending: deque[tuple[str, tuple[str, ...]]] = deque(maxlen=max_pending or None)
        self.max_pending = max_pending
        # the leases this process holds, for re-scoring (set by the concurrency tracker)
        self.live: Callable[[], Iterable[tuple[str, tuple[str, ...]]]] = tuple
        self.held: Callable[[str], bool] = lambda lease: False
        # ADMITs of this event-loop pass, sent together (one pipeline) at its end
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.closed = False

    # ------------------------------------------------------------------ keys
    def rkey(self, counter: str) -> str:
        """The Redis key of a counter named ``kind:ident`` (``caller:+1212...``,
        ``rate.per_caller:+1212...``)."""
        found = self._keys.get(counter)
        if found is None:
            kind, _, ident = counter.partition(":")
            found = key(self.prefix, ident, kind)
            if len(self._keys) >= 65536:
                self._keys.clear()
            self._keys[counter] = found
        return found

    @property
    def available(self) -> bool:
        """Redis answered since start and the breaker is closed (``/readyz``, the gauge)."""
        return self.answered and not self.open

    # ------------------------------------------------------------------ the INVITE path
    async def admit(self, lease: str, checks: Sequence[Check], take: Sequence[str]) -> \
            Admitted | None:
        """Run ``checks`` and, when no enforced one fails, take ``lease`` on ``take`` (counter
        names) — one round trip. None: Redis could not answer (breaker open, error, timeout)."""
        if self.open:
            return None
        keys: list[str] = []
        index: dict[str, int] = {}
        cidx: list[int] = []  # each check's key, as an index into keys
        tidx: list[int] = []  # each take counter's key
        rkey = self.rkey
        for counters, out in ((tuple(c[1] for c in checks), cidx), (take, tidx)):
            for counter in counters:
                k = rkey(counter)
                i = index.get(k)
                if i is None:
                    i = index[k] = len(keys)
                    keys.append(k)
                out.append(i)
        if self.cluster:
            result = await self._guarded(
                "admit", self._admit_cluster(lease, keys, checks, cidx, tidx), self.timeout_s)
        else:
            result = await self._guarded(
                "admit", self._admit_one(lease, keys, checks, cidx, tidx), self.timeout_s)
        if result is _FAILED:
            if take and isinstance(self.last_failure, TimeoutError):
                # The script was sent: a Redis that stalled past the timeout runs it when it
                # wakes. Fail closed refuses the call, which would hold a phantom slot for
                # lease_s: give it back, queued behind the take on the same connection when it
                # is open, else at the next refresh. Fail open passes the call — but the late
                # script checks the limits too and, with the calls up then, may take nothing:
                # the call would hold no slot there, and others would be let past it until
                # the next refresh. So its slot is taken whatever the counts, queued behind the
                # script (the same member again when the script took it: no change).
                if self.fail_open:
                    self._take_soon(lease, take)
                else:
                    self._give_back(lease, take)
            return None
        admitted: Admitted = result
        return admitted

    def _take_soon(self, lease: str, take: Sequence[str]) -> None:
        """Take ``lease`` on ``take`` whatever the counts (the REFRESH script: ZADD), sent on the
        pipelined connection without waiting; when that is not possible, or it fails, the
        next refresh re-scores the lease (every live one is)."""
        pipe = self.pipe
        if pipe is None or self.cluster or not pipe.connected:
            return
        keys = [self.rkey(t) for t in take]
        try:
            fut = pipe.send("EVALSHA", self._refresh.sha, len(keys), *keys, self.lease_ms,
                            *([lease] * len(keys)))
        except PipeError:
            return
        self.counters["state_round_trips"] += 1
        fut.add_done_callback(_quietly)

    def _give_back(self, lease: str, take: Sequence[str]) -> None:
        if not self.release_soon(lease, take):
            self._keep(lease, tuple(take))

    async def _admit_one(
        self, lease: str, keys: list[str], checks: Sequence[Check], cidx: list[int],
        tidx: list[int],
    ) -> Admitted:
        """The script over every key at once, its reply read (BadReply: a failed trip)."""
        return _admitted(await self._admit_group(lease, keys, checks, cidx, tidx, None), None,
                         len(checks))

    async def _guarded(self, what: str, work: Awaitable[Any], timeout: float) -> Any:
        """``work`` within ``timeout``, through the breaker: its result, or ``_FAILED``."""
        try:
            async with asyncio.timeout(timeout):
                result = await work
        except _FAILURES as exc:
            self._failed(what, exc)
            return _FAILED
        self._ok()
        return result

    async def _eval(self, script: Any, text: str, keys: Sequence[str],
                    args: Sequence[Any]) -> Any:
        """One script on the pipelined connection when there is one, else redis-py's."""
        self.counters["state_round_trips"] += 1
        if self.pipe is not None:
            return await self._piped(self.pipe, script.sha, text, keys, args)
        return await script(keys=keys, args=args)

    async def _admit_group(
        self, lease: str, keys: list[str], checks: Sequence[Check], cidx: list[int],
        tidx: list[int], only: set[int] | None,
    ) -> Any:
        """One script over the keys with indices in ``only`` (None: all)."""
        if only is None:
            group_keys = keys
            local = None
        else:
            local = {}
            group_keys = []
            for i, k in enumerate(keys):
                if i in only:
                    local[i] = len(group_keys) + 1
                    group_keys.append(k)
        args: list[Any] = [lease, self.lease_ms, 0]
        n = 0
        for c, i in zip(checks, cidx, strict=True):
            if local is None:
                pos = i + 1
            elif i in local:
                pos = local[i]
            else:
                continue
            n += 1
            kind = c[0]
            if kind == "r":
                args += ("r", pos, round(c[2] * 1e6), round(c[3] * 1e6), 1 if c[4] else 0, "")
            else:
                args += (kind, pos, int(c[2]), 0, 1 if c[4] else 0, c[5])
        args[2] = n
        takes = ([i + 1 for i in tidx] if local is None
                 else [local[i] for i in tidx if i in local])
        args.append(len(takes))
        args.extend(takes)
        if self.cluster:
            self.counters["state_round_trips"] += 1
            return await self._admit(keys=group_keys, args=args)
        if self.pipe is None:
            return await self._batched(group_keys, args)
        self.counters["state_round_trips"] += 1
        return await self._piped(self.pipe, self._admit.sha, ADMIT, group_keys, args)

    @staticmethod
    async def _piped(pipe: RespPipe, sha: str, script: str, keys: Sequence[str],
                     args: Sequence[Any]) -> Any:
        """EVALSHA on the pipelined connection (loading the script when Redis lost it)."""
        reply = await pipe.call("EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, hiredis.ReplyError):
            if not str(reply).startswith("NOSCRIPT"):
                raise ResponseError(str(reply))
            await pipe.call("SCRIPT", "LOAD", script)  # a Redis restarted empty
            reply = await pipe.call("EVALSHA", sha, len(keys), *keys, *args)
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
        return reply

    # ------------------------------------------------------------------ batching
    async def _batched(self, keys: list[str], args: list[Any]) -> Any:
        """Queue one ADMIT for the batch of this event-loop pass: the INVITEs read in one
        pass go to Redis as one pipeline (one write, one read), each still its own atomic
        script; the caller awaits only its own answer."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_batch)
        return await fut

    def _flush_batch(self) -> None:
        self._flush_scheduled = False
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_batch(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) \
            -> None:
        self.counters["state_round_trips"] += 1
        self.counters["state_batched_admits"] += len(batch)
        try:
            replies = await self._pipeline(batch)
            if any(isinstance(r, NoScriptError) for r in replies):  # Redis restarted empty
                await self.client.script_load(ADMIT)
                replies = await self._pipeline(batch)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RedisError("x"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, fut), reply in zip(batch, replies, strict=True):
            if fut.done():  # its caller stopped waiting (timeout)
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    async def _pipeline(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) \
            -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        sha = self._admit.sha
        for keys, args, _ in batch:
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _admit_cluster(
        self, lease: str, keys: list[str], checks: Sequence[Check], cidx: list[int],
        tidx: list[int],
    ) -> Admitted:
        groups = [set(g) for g in by_slot(keys, True)]
        # each group numbers its checks from 0: map back to the checks' global order
        orders: list[list[int]] = []
        for g in groups:
            orders.append([j for j, i in enumerate(cidx) if i in g])
        answers = await asyncio.gather(
            *(self._admit_group(lease, keys, checks, cidx, tidx, g) for g in groups)
        )
        taken_any, refused, value, monitored = False, -1, 0, []
        for answer, order in zip(answers, orders, strict=True):
            part = _admitted(answer, order, len(order))
            taken_any = taken_any or part[0]
            if part[1] >= 0 and (refused < 0 or part[1] < refused):
                refused, value = part[1], part[2]
            monitored.extend(part[3])
        if refused >= 0 and taken_any:
            # another group refused: give back what the others took (not atomic across slots)
            await self._release_now(lease, [keys[i] for i in tidx])
        monitored.sort()
        return (refused < 0, refused, value, monitored)

    # ------------------------------------------------------------------ dialogs
    async def add(self, lease: str, take: Sequence[str]) -> None:
        """Take ``lease`` on ``take`` whatever the counts (a call admitted while Redis was
        away, or without a check); a failure leaves it to the next refresh."""
        if self.open or not take:
            return
        await self._guarded("add", self._rescore([(lease, tuple(take))]), self.timeout_s * 4)

    async def mark(self, counter: str, value: int, seconds: float) -> None:
        """Set ``counter`` to ``value`` for ``seconds`` (a dialer cooldown); best effort."""
        if self.open:
            return
        await self._guarded("mark", self._set(self.rkey(counter), value,
                                              max(1, int(seconds * 1000))), self.timeout_s * 4)

    async def unmark(self, mark: str,
                     measures: Sequence[tuple[str, str, Sequence[float]]] = ()) -> int | None:
        """Delete the cooldown mark ``mark`` and the buckets of the measures ``(kind, counter,
        windows ms)`` (each window a rule counts it over), in one script (the keys share the
        number's hash slot) — an operator lifting a dialer cooldown. The mark's value (ms
        left * 16 + its code), -1 when there was none, None when Redis cannot answer."""
        if self.open:
            return None
        keys, args = [self.rkey(mark)], []
        for _, counter, windows in measures:
            for window in windows:
                keys.append(self.rkey(counter))
                args.append(int(window))
        value = await self._guarded("unmark", self._lift(keys=keys, args=args),
                                    max(0.5, self.timeout_s * 10))
        if value is _FAILED:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            self._failed("unmark", BadReply(f"LIFT answered {value!r}"))
            return None

    async def _set(self, key_: str, value: int, px: int) -> None:
        if self.pipe is None:
            await self.client.set(key_, value, px=px)
            return
        reply = await self.pipe.call("SET", key_, value, "PX", px)
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))

    def release_soon(self, lease: str, take: Sequence[str]) -> bool:
        """Send the release of ``lease`` on the open pipelined connection without waiting
        (no task, no coroutine: a call's end costs one queued command); an error keeps it
        for the next refresh. False when that is not possible (use :meth:`release`)."""
        pipe = self.pipe
        if pipe is None or self.cluster or self.open or not pipe.connected or not take:
            return False
        keys = [self.rkey(t) for t in take]
        try:
            fut = pipe.send("EVALSHA", self._release.sha, len(keys), *keys,
                            *([lease] * len(keys)))
        except PipeError:
            return False
        self.counters["state_round_trips"] += 1
        kept = (lease, tuple(take))

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None or \
                    isinstance(f.result(), hiredis.ReplyError):
                self._keep(*kept)  # (NOSCRIPT included: the refresh loads it again)

        fut.add_done_callback(done)
        return True

    async def release(self, lease: str, take: Sequence[str]) -> None:
        """Give ``lease`` back on ``take``; kept for later when Redis cannot answer."""
        if not take:
            return
        if self.open:
            self._keep(lease, tuple(take))
            return
        done = await self._guarded("release", self._release_now(
            lease, [self.rkey(t) for t in take]), self.timeout_s * 4)
        if done is _FAILED:
            self._keep(lease, tuple(take))

    def _keep(self, lease: str, take: tuple[str, ...]) -> None:
        if self.max_pending == 0:
            self.counters["state_releases_lapsed"] += 1
            return
        if len(self.pending) == self.pending.maxlen:
            self.counters["state_releases_lapsed"] += 1
        self.pending.append((lease, take))

    async def _release_now(self, lease: str, keys: list[str]) -> None:
        for group in by_slot(keys, self.cluster):
            ks = [keys[i] for i in group]
            await self._eval(self._release, RELEASE, ks, [lease] * len(ks))

    async def _rescore(self, leases: Sequence[tuple[str, tuple[str, ...]]]) -> None:
        keys: list[str] = []
        members: list[str] = []
        for lease, take in leases:
            for t in take:
                keys.append(self.rkey(t))
                members.append(lease)
        for group in by_slot(keys, self.cluster):
            await self._eval(self._refresh, REFRESH, [keys[i] for i in group],
                             [self.lease_ms, *(members[i] for i in group)])

    # ------------------------------------------------------------------ background
    async def refresh(self) -> int:
        """Re-score every lease this process holds (and retry kept releases first); how many
        leases were re-scored. A lease released while this ran is released again after, so
        a refresh can never bring back an ended call."""
        if self.open:
            return 0
        done, _ = await self._refresh_all()
        return done

    async def _refresh_all(self) -> tuple[int, bool]:
        """:meth:`refresh` whether or not the breaker is open (the probe re-scores before it
        closes it): how many leases were re-scored, and whether all of them were."""
        if not await self._flush_pending():
            return 0, False
        leases = list(self.live())
        done = 0
        for start in range(0, len(leases), REFRESH_CHUNK):
            chunk = leases[start:start + REFRESH_CHUNK]
            if await self._guarded("refresh", self._rescore(chunk),
                                   max(1.0, self.timeout_s * 10)) is _FAILED:
                self.counters["state_leases_refreshed"] += done
                return done, False
            done += len(chunk)
            for lease, take in chunk:
                if not self.held(lease):  # ended while its refresh was on the way
                    await self._release_or_keep(lease, take)
        self.counters["state_leases_refreshed"] += done
        return done, True

    async def _release_or_keep(self, lease: str, take: tuple[str, ...]) -> None:
        if await self._guarded("release", self._release_now(
                lease, [self.rkey(t) for t in take]), self.timeout_s * 4) is _FAILED:
            self._keep(lease, take)

    async def _flush_pending(self) -> bool:
        """The kept releases, oldest first; False when Redis failed one (it stays kept)."""
        while self.pending:
            lease, take = self.pending.popleft()
            if await self._guarded("release", self._release_now(
                    lease, [self.rkey(t) for t in take]), self.timeout_s * 4) is _FAILED:
                self.pending.appendleft((lease, take))
                return False
            self.counters["state_releases_retried"] += 1
        return True

    def start(self) -> None:
        """Read the epoch key now, then re-score the live leases every ``lease_s / 3``."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """At once and then every :data:`WATCH_S` a look at the epoch key; a refresh every
        ``lease_s / 3``, at once when Redis lost its data (see :meth:`_data_lost`) or the
        first look succeeded, and again at the next look when one did not complete (a lease
        has two thirds of ``lease_s`` left when its refresh is due)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.lease_s / 3
        first = True
        while not self.closed:
            if not first:
                await asyncio.sleep(min(WATCH_S, self.lease_s / 3))
            first = False
            try:
                baseline = self.epoch is None  # no epoch read yet: this one sets it
                lost = await self._data_lost()
                if self.open:
                    continue
                if lost or loop.time() >= due or (baseline and self.epoch is not None):
                    done, complete = await self._refresh_all()
                    if complete:
                        due = loop.time() + self.lease_s / 3
                    if lost:
                        self._note("state_data_lost", leases_restored=done)
            except Exception as exc:  # never let the loop die
                self._note("state_refresh_failed", error=repr(exc))

    async def _data_lost(self) -> bool:
        """True when Redis lost the counts since the last look: the epoch key (a random
        value this or another instance set, no expiry) is gone — Redis restarted empty, was
        flushed, or failed over to a replica without it — or another instance set a new one
        since. The live calls' leases are then re-scored at once, not up to ``lease_s / 3``
        later: until then the limits would count none of the calls that are up."""
        if self.open:
            return False
        epoch = await self._guarded("watch", self._read_epoch(), self.timeout_s * 4)
        if epoch is _FAILED:
            return False
        return self._epoch_seen(epoch)

    def _epoch_seen(self, epoch: bytes) -> bool:
        lost = self.epoch is not None and epoch != self.epoch
        self.epoch = epoch
        if lost:
            self.counters["state_data_lost"] += 1
        return lost

    async def _read_epoch(self) -> bytes:
        """The epoch (set first when missing), by the WATCH script: refused like ADMIT."""
        key = self.prefix + "counts:epoch"
        mine = os.urandom(8).hex()
        if self.pipe is not None and not self.cluster:
            reply = await self._piped(self.pipe, self._watch.sha, WATCH, [key], [mine])
        else:
            reply = await self._watch(keys=[key], args=[mine])
        try:
            epoch, _ = reply
        except (TypeError, ValueError):
            raise BadReply(f"watch answered {str(reply)[:60]!r}") from None
        if isinstance(epoch, str):
            epoch = epoch.encode()
        if not isinstance(epoch, bytes):
            raise BadReply(f"watch answered {str(reply)[:60]!r}")
        return epoch

    async def close(self) -> None:
        self.closed = True
        for task in (self._refresher, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.pipe is not None:
            self.pipe.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # ------------------------------------------------------------------ the breaker
    def _ok(self) -> None:
        self.failures = 0
        self.answered = True

    def _failed(self, what: str, exc: BaseException) -> None:
        self.last_failure = exc
        self.counters["state_failures"] += 1
        if isinstance(exc, BadReply):
            self.counters["state_bad_replies"] += 1
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            self.counters["state_timeouts"] += 1
        self.failures += 1
        reason = failure_reason(exc)
        # a refused re-scoring or login trips at once: the live calls' leases would lapse
        # while admissions went on, and a wrong password does not heal by retrying
        trip = (what == "refresh" and (reason is not None or isinstance(exc, ResponseError))) \
            or reason == "authentication failed"
        if not self.open and (trip or self.failures >= self.breaker_failures):
            self.open = True
            if self.pipe is not None:
                self.pipe.close()  # what is in flight fails now; a new connection later
            self.counters["state_breaker_opened"] += 1
            fields: dict[str, Any] = {"what": what, "error": _describe(exc),
                                      "failures": self.failures}
            if reason is not None:
                fields["reason"] = reason
            self._note("state_unreachable", **fields)
            if self._probe is None or self._probe.done():
                with contextlib.suppress(RuntimeError):
                    self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        """While the breaker is open: the epoch script (refused wherever calls would be — a
        PING is answered by a replica or a full Redis too), then the kept releases and every
        live lease re-scored; only when all of that went through does the breaker close."""
        wait = PROBE_MIN_S
        while self.open and not self.closed:
            await asyncio.sleep(wait)
            wait = min(PROBE_MAX_S, wait * 2)
            try:
                async with asyncio.timeout(max(0.25, self.timeout_s * 4)):
                    epoch = await self._read_epoch()
            except _FAILURES as exc:
                self.last_failure = exc
                continue
            try:
                lost = self._epoch_seen(epoch)
                done, complete = await self._refresh_all()
            except Exception as exc:
                self._note("state_refresh_failed", error=repr(exc))
                continue
            if not complete:
                continue
            self.open = False
            self._ok()
            self.counters["state_reconnected"] += 1
            self._note("state_reachable", pending_releases=len(self.pending))
            if lost:
                self._note("state_data_lost", leases_restored=done)

    async def counts(self, counters: Sequence[str]) -> list[int] | None:
        """Live leases on each counter across every instance (for the admin API); None when
        Redis cannot answer."""
        if self.open:
            return None
        out: list[int] = []
        try:
            async with asyncio.timeout(max(0.5, self.timeout_s * 10)):
                now_ms = await self._now_ms()
                for counter in counters:
                    out.append(int(await self.client.zcount(self.rkey(counter),
                                                            now_ms + 1, "+inf")))
        except _FAILURES as exc:
            self._failed("counts", exc)
            return None
        return out

    async def cooldown_marks(self, scopes: Sequence[str], key: str | None, limit: int,
                             budget_s: float = 1.0) -> tuple[list[tuple[str, str, int, int]],
                                                             bool] | None:
        """The dialer cooldowns in force across every instance (for the admin API): the marks
        ``dialer.block.<scope>:<key>`` of ``scopes`` in Redis, as (scope, key, code, ms left),
        at most ``limit``; True when there were more, or the keyspace was not walked to its end
        within ``budget_s`` (SCAN, on every primary of a cluster). With ``key`` (as the rules
        store it) only its marks, read at once. None when Redis cannot answer."""
        if self.open:
            return None
        found: list[tuple[str, str, int, int]] = []
        try:
            async with asyncio.timeout(budget_s + max(0.5, self.timeout_s * 10)):
                if key is not None:
                    names = [(s, key, self.rkey(f"dialer.block.{s}:{key}")) for s in scopes]
                    return await self._marks_read(names, found), False
                pattern = _glob_escaped(self.prefix) + "{*}:dialer.block.*"
                deadline = asyncio.get_running_loop().time() + budget_s
                batch: list[tuple[str, str, str]] = []
                more = False
                async for raw in self.client.scan_iter(match=pattern, count=1000):
                    name = raw.decode() if isinstance(raw, bytes) else str(raw)
                    ident, _, kind = name[len(self.prefix) + 1:].rpartition("}:")
                    scope = kind.removeprefix("dialer.block.")
                    if scope in scopes and ident:
                        batch.append((scope, ident, name))
                    if len(batch) >= 200:
                        await self._marks_read(batch, found)
                        batch = []
                    if len(found) > limit or asyncio.get_running_loop().time() > deadline:
                        more = True
                        break
                await self._marks_read(batch, found)
        except _FAILURES as exc:
            self._failed("cooldown_marks", exc)
            return None
        more = more or len(found) > limit
        return found[:limit], more

    async def _marks_read(self, names: Sequence[tuple[str, str, str]],
                          into: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int,
                                                                                int]]:
        """GET and PTTL of the marks ``(scope, key, redis key)``; those still set go
        ``into``."""
        if not names:
            return into
        pipe = self.client.pipeline(transaction=False)
        for _, _, name in names:
            pipe.get(name)
            pipe.pttl(name)
        replies = await pipe.execute()
        self.counters["state_round_trips"] += 1
        for i, (scope, ident, _) in enumerate(names):
            value, left = replies[2 * i], replies[2 * i + 1]
            try:
                code, ms = int(value), int(left)
            except (TypeError, ValueError):  # gone since the scan, or not a mark
                continue
            if ms > 0:
                into.append((scope, ident, code, ms))
        return into

    async def _now_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def _note(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log(event, **fields)

    def stats(self) -> dict[str, float]:
        return {"state_available": 1.0 if self.available else 0.0,
                "state_pending_releases": float(len(self.pending))}


def _admitted(answer: Any, order: list[int] | None, checks: int) -> Admitted:
    """The script's reply as (taken, refused, value, monitored), check indices mapped through
    ``order`` (a cluster group's checks in the global order); ``checks``: how many checks it
    was given. BadReply for anything the script never returns."""
    try:
        items = [int(x) for x in answer]
    except (TypeError, ValueError):
        raise BadReply(f"admit answered {str(answer)[:60]!r}") from None
    if len(items) < 3 or (len(items) - 3) % 2 or not -1 <= items[1] < checks or any(
        not 0 <= items[i] < checks for i in range(3, len(items), 2)
    ):
        raise BadReply(f"admit answered {items[:8]!r}")
    refused = items[1]
    monitored = [(items[i], items[i + 1]) for i in range(3, len(items) - 1, 2)]
    if order is not None:
        if refused >= 0:
            refused = order[refused]
        monitored = [(order[i], v) for i, v in monitored]
    return (items[0] == 1, refused, items[2], monitored)
