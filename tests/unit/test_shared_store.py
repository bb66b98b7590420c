"""The Redis state store against a real redis-server: check-and-take, release, lapse,
GCRA, monitor checks, re-scoring, the circuit breaker and convergence after an outage."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from sipguard.transport.redis_client import Where, connect
from sipguard.transport.redis_pipe import RespPipe
from sipguard.transport.redis_state import BadReply, SharedStore, _admitted
from tests.redis_server import RedisServer


def store(url: str, **kw: object) -> SharedStore:
    """A store as sipguard makes it for one server: redis-py plus the INVITE path's pipe."""
    params: dict[str, object] = {"timeout_s": 0.5, "lease_s": 60.0, "counters": Counter(),
                                 "pipe": RespPipe(url)}
    params.update(kw)
    return SharedStore(connect(Where(url=url, timeout_s=0.5)), **params)  # type: ignore[arg-type]


def caller_limit(most: int, monitor: bool = False) -> tuple[str, str, float, float, bool, str]:
    return ("c", "caller:+12125550100", most, 0, monitor, "")


TAKE = ("peer:-", "caller:+12125550100", "callee:+18005550199")


async def test_check_and_take_is_shared_between_instances(redis_url: str) -> None:
    a, b = store(redis_url), store(redis_url)
    try:
        assert (await a.admit("L1", [caller_limit(2)], TAKE))[:2] == (True, -1)
        assert (await b.admit("L2", [caller_limit(2)], TAKE))[:2] == (True, -1)
        refused = await a.admit("L3", [caller_limit(2)], TAKE)
        assert refused == (False, 0, 2, [])  # the first check refused, with its count
        # a lease already held counts as room (a retried decision takes nothing twice)
        assert (await b.admit("L2", [caller_limit(2)], TAKE))[0] is True
        await a.release("L1", TAKE)
        await a.release("L1", TAKE)  # idempotent
        assert (await b.admit("L3", [caller_limit(2)], TAKE))[0] is True
        assert (await a.admit("L4", [caller_limit(2)], TAKE))[0] is False
    finally:
        await a.close()
        await b.close()


async def test_refused_call_takes_nothing_anywhere(redis_url: str) -> None:
    a = store(redis_url)
    try:
        callee = ("c", "callee:+18005550199", 1, 0, False, "")
        assert (await a.admit("L1", [callee], TAKE))[0]
        # the caller has room, the callee not: nothing taken, not even the caller's slot,
        # and no rate cell advanced
        rate = ("r", "rate.per_caller:+12125550100", 1.0, 0.0, False, "")
        assert (await a.admit("L2", [caller_limit(5), rate, callee], TAKE))[:2] == (False, 2)
        assert (await a.admit("L3", [rate], ()))[0] is True  # the cell was still fresh
        raw = await a.client.zcard(a.rkey("caller:+12125550100"))
        assert raw == 1
    finally:
        await a.close()


async def test_leases_lapse_without_refresh_and_live_with_it(redis_url: str) -> None:
    a = store(redis_url, lease_s=0.6)
    b = store(redis_url, lease_s=0.6)
    try:
        assert (await a.admit("dead", [caller_limit(1)], TAKE))[0]
        assert (await b.admit("other", [caller_limit(1)], TAKE))[0] is False
        await asyncio.sleep(0.75)  # "dead"'s instance never re-scored it: its slot came back
        assert (await b.admit("live", [caller_limit(1)], TAKE))[0] is True
        b.live = lambda: [("live", TAKE)]
        b.held = lambda lease: True
        for _ in range(3):  # re-scored every 0.3 s, it outlives lease_s
            await asyncio.sleep(0.3)
            assert await b.refresh() == 1
        assert (await a.admit("late", [caller_limit(1)], TAKE))[0] is False
    finally:
        await a.close()
        await b.close()


async def test_gcra_rate_across_instances(redis_url: str) -> None:
    a, b = store(redis_url), store(redis_url)
    try:
        limit = ("r", "rate.per_caller:+1", 1.0, 2.0, False, "")  # 1/s, burst 3
        results = [await (a if i % 2 else b).admit(f"x{i}", [limit], ()) for i in range(5)]
        assert [r[0] for r in results if r] == [True, True, True, False, False]
        refused = results[3]
        assert refused is not None and 900_000 < refused[2] <= 1_000_000  # µs to wait
        ttl = await a.client.pttl(a.rkey("rate.per_caller:+1"))
        assert 0 < ttl <= 3000  # the cell vanishes once drained
    finally:
        await a.close()
        await b.close()


async def test_monitor_checks_report_and_do_not_stop(redis_url: str) -> None:
    a = store(redis_url)
    try:
        assert (await a.admit("L1", [caller_limit(1)], TAKE))[0]
        taken, refused, _, monitored = await a.admit("L2", [caller_limit(1, True)], TAKE)
        assert (taken, refused, monitored) == (True, -1, [(0, 1)])
        assert await a.client.zcard(a.rkey("caller:+12125550100")) == 2
    finally:
        await a.close()


async def test_breaker_opens_and_closes_and_counts_converge(
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    counters: Counter[str] = Counter()
    a = store(redis_server.url, timeout_s=0.1, breaker_failures=2, counters=counters)
    mirror = {"up": TAKE}
    a.live = lambda: list(mirror.items())
    a.held = lambda lease: lease in mirror
    try:
        assert (await a.admit("gone", [caller_limit(5)], TAKE))[0]
        redis_server.stop()
        for _ in range(2):
            assert await a.admit("x", [caller_limit(5)], TAKE) is None
        assert a.open and counters["state_breaker_opened"] == 1
        started = asyncio.get_running_loop().time()
        assert await a.admit("y", [caller_limit(5)], TAKE) is None  # at once while open
        assert asyncio.get_running_loop().time() - started < 0.01
        await a.release("gone", TAKE)  # the call ended during the outage: kept
        assert len(a.pending) == 1
        redis_server.start()
        for _ in range(100):
            if not a.open:
                break
            await asyncio.sleep(0.1)
        assert not a.open and counters["state_reconnected"] == 1
        for _ in range(50):  # the probe's refresh: "gone" released, "up" (admitted meanwhile)
            members = await a.client.zrange(a.rkey("caller:+12125550100"), 0, -1)
            if members == [b"up"]:
                break
            await asyncio.sleep(0.05)
        assert members == [b"up"]
        assert not a.pending
        # the restarted Redis has no scripts cached: the next admit loads it and goes on
        assert (await a.admit("z", [caller_limit(5)], TAKE))[0] is True
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await a.close()


async def test_unreachable_store_answers_within_its_timeout() -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = store(f"redis://127.0.0.1:{port}/0", timeout_s=0.05)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await a.admit("x", [caller_limit(1)], TAKE) is None
        assert loop.time() - started < 0.5
    finally:
        await a.close()


@pytest.mark.parametrize("n", [20])
async def test_concurrent_burst_from_two_instances_takes_exactly_the_limit(
    redis_url: str, n: int
) -> None:
    a, b = store(redis_url), store(redis_url)
    try:
        results = await asyncio.gather(*(
            (a if i % 2 else b).admit(f"L{i}", [caller_limit(2)], TAKE) for i in range(n)
        ))
        assert sum(1 for r in results if r and r[0]) == 2
    finally:
        await a.close()
        await b.close()


async def test_redis_cluster_checks_per_slot_and_gives_back_a_partial_take(
    tmp_path: Path,
) -> None:
    """On a real three-node cluster: a caller's and a callee's keys sit in different slots;
    when the callee is full, what the caller's slot took is given back, and no key ever
    counts more than its limit."""
    from sipguard.transport.redis_client import by_slot
    from tests.redis_server import RedisCluster

    cluster = RedisCluster(tmp_path).start()
    a = SharedStore(connect(Where(url=cluster.url, cluster=True, timeout_s=1.0)),
                    cluster=True, timeout_s=2.0, counters=Counter())
    b = SharedStore(connect(Where(url=cluster.url, cluster=True, timeout_s=1.0)),
                    cluster=True, timeout_s=2.0, counters=Counter())
    try:
        callee = ("c", "callee:+18005550199", 1, 0, False, "")
        take_1 = ("caller:+12125550100", "callee:+18005550199")
        take_2 = ("caller:+13035550100", "callee:+18005550199")
        assert len(by_slot([a.rkey(k) for k in take_2], True)) == 2  # two slots really
        assert (await a.admit("L1", [caller_limit(1), callee], take_1))[0] is True
        caller_2 = ("c", "caller:+13035550100", 1, 0, False, "")
        refused = await b.admit("L2", [caller_2, callee], take_2)
        assert refused is not None and refused[:3] == (False, 1, 1)
        assert await b.client.zcard(b.rkey("caller:+13035550100")) == 0  # given back
        await a.release("L1", take_1)
        assert (await b.admit("L2", [caller_2, callee], take_2))[0] is True
        # the same burst from both instances: exactly one
        other = ("c", "callee:+18005550100", 1, 0, False, "")
        results = await asyncio.gather(*(
            (a if i % 2 else b).admit(f"M{i}", [other], ("callee:+18005550100",))
            for i in range(10)
        ))
        assert sum(1 for r in results if r and r[0]) == 1
        limit = ("r", "rate.per_caller:+1", 1.0, 1.0, False, "")
        assert [(await a.admit(f"r{i}", [limit], ()))[0] for i in range(3)] == [  # type: ignore[index]
            True, True, False]
        # the dialer's measures keep their buckets in the number's slot
        seen = []
        for i, callee in enumerate(("+1646", "+1303", "+1646", "+1720")):
            distinct = ("h", "dialer.callees:+12125550100", 60_000, 0, False, callee)
            calls = ("n", "dialer.calls:+12125550100", 60_000, 0, False, "")
            result = await (a if i % 2 else b).admit(f"d{i}", [distinct, calls], ())
            assert result is not None
            seen.append(result[3])
        assert seen[-1] == [(0, 3), (1, 4)]
    finally:
        await a.close()
        await b.close()
        cluster.stop()


async def test_sentinel_finds_the_master(tmp_path: Path) -> None:
    """Through a real Sentinel: the store asks it for ``mymaster`` and counts there."""
    from tests.redis_server import RedisSentinel

    sentinel = RedisSentinel(tmp_path).start()
    where = Where(sentinel_master="mymaster", sentinel_nodes=(("127.0.0.1", sentinel.port),),
                  timeout_s=1.0)
    a = SharedStore(connect(where), timeout_s=2.0, counters=Counter())
    try:
        assert (await a.admit("L1", [caller_limit(1)], TAKE))[0] is True
        assert (await a.admit("L2", [caller_limit(1)], TAKE))[0] is False
        raw = sentinel.master.command("ZCARD", a.rkey("caller:+12125550100"))
        assert raw == b":1\r\n"
    finally:
        await a.close()
        sentinel.stop()


async def test_redis_py_batch_path_and_password_and_db(tmp_path: Path) -> None:
    """Without the pipe (as with Sentinel) the admits of one pass go as one redis-py
    pipeline; the pipe logs in with the URL's password and selects its database."""
    server = RedisServer(tmp_path, None, "--requirepass", "s3cret").start()
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    plain = store(url, pipe=None)
    piped = store(url)
    try:
        results = await asyncio.gather(*(
            (plain if i % 2 else piped).admit(f"L{i}", [caller_limit(3)], TAKE)
            for i in range(10)
        ))
        assert sum(1 for r in results if r and r[0]) == 3
        assert plain.counters["state_batched_admits"] == 5  # in one or two pipelines
        assert plain.counters["state_round_trips"] <= 2
        assert await piped.client.zcard(piped.rkey("caller:+12125550100")) == 3
        bad = store(f"redis://:wrong@127.0.0.1:{server.port}/0")
        assert await bad.admit("x", [caller_limit(3)], TAKE) is None
        await bad.close()
    finally:
        await plain.close()
        await piped.close()
        server.stop()


async def test_measures_and_cooldown_marks(redis_url: str) -> None:
    """The dialer's kinds: distinct members and calls over a window (this call included),
    a cooldown mark refusing with its time left and code."""
    a = store(redis_url)
    try:
        for i, callee in enumerate(("+1646", "+1303", "+1646")):
            distinct = ("h", "dialer.callees:+1", 60_000, 0, False, callee)
            calls = ("n", "dialer.calls:+1", 60_000, 0, False, "")
            result = await a.admit(f"m{i}", [distinct, calls], ())
            assert result is not None and result[0]
        assert result[3] == [(0, 2), (1, 3)]
        block = ("b", "dialer.block.caller:+1", 0, 0, False, "")
        assert (await a.admit("x", [block], ()))[0] is True
        await a.mark("dialer.block.caller:+1", 6, 300)
        refused = await a.admit("y", [block], ())
        assert refused is not None and refused[:2] == (False, 0)
        left_ms, code = divmod(refused[2], 16)
        assert code == 6 and 299_000 < left_ms <= 300_000
        # an operator's lift: the mark and the measures named go, in every bucket
        measures = [("h", "dialer.callees:+1", [60_000.0]), ("n", "dialer.calls:+1", [60_000.0])]
        value = await a.unmark("dialer.block.caller:+1", measures)
        assert value is not None and value % 16 == 6 and 299_000 < value // 16 <= 300_000
        assert await a.unmark("dialer.block.caller:+1", measures) == -1
        result = await a.admit("after", [block, distinct, calls], ())
        assert result is not None and result[0] and result[3] == [(1, 1), (2, 1)]
    finally:
        await a.close()


def test_pipe_works_on_uvloop(redis_url: str) -> None:
    """sipguard runs on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def admits() -> list[bool]:
        a = store(redis_url)
        try:
            out = []
            for i in range(3):
                result = await a.admit(f"U{i}", [caller_limit(2)], TAKE)
                out.append(bool(result and result[0]))
            return out
        finally:
            await a.close()

    assert uvloop.run(admits()) == [True, True, False]


async def test_commands_queued_while_connecting_keep_their_replies(redis_url: str) -> None:
    """Thirty admits at once on a pipe that is not connected yet (it selects a database and
    loads three scripts first): every admit gets its own reply, exactly the limit is taken."""
    url = redis_url.rsplit("/", 1)[0] + "/5"
    a = store(url)
    try:
        results = await asyncio.gather(*(
            a.admit(f"Q{i}", [caller_limit(4)], TAKE) for i in range(30)
        ))
        assert all(r is not None and len(r) == 4 for r in results)
        assert sum(1 for r in results if r and r[0]) == 4
        assert a.counters["state_failures"] == 0
    finally:
        await a.close()


@pytest.mark.parametrize("reply", [None, b"OK", [b"x"], [1], [1, 5, 0], [0, -1, 0, 9, 1],
                                   [0, -1, 0, 0]])
def test_a_reply_the_admit_script_never_gives_is_a_bad_reply(reply: object) -> None:
    """Not a list of integers, too short, a refused or monitored check index out of range, an
    odd tail: BadReply (a failed round trip), never an IndexError deep in a decision."""
    with pytest.raises(BadReply):
        _admitted(reply, None, 2)
    assert _admitted([1, -1, 0, 1, 3], None, 2) == (True, -1, 0, [(1, 3)])


async def test_a_garbage_reply_fails_like_an_unreachable_redis(redis_url: str) -> None:
    """Something in Redis's place answers the admit script with garbage (the script's reply is
    stood in for: a real Redis never gives it): admit answers None — the caller applies
    state.fail — and the failure counts toward the breaker, as a timeout would."""
    a = store(redis_url, breaker_failures=2)

    async def garbage(*_: object) -> object:
        return [b"not", b"numbers"]

    a._admit_group = garbage  # type: ignore[method-assign]
    try:
        assert await a.admit("L1", [caller_limit(2)], TAKE) is None
        assert a.counters["state_bad_replies"] == 1 and not a.open
        assert await a.admit("L2", [caller_limit(2)], TAKE) is None
        assert a.open  # two failures: the breaker opened
    finally:
        await a.close()


async def test_counts_lost_by_redis_are_restored_within_a_second(
    redis_server: RedisServer,
) -> None:
    """Redis flushed (or restarted empty) while calls are up, with no failed round trip: the
    instance notices the missing epoch key within a second and re-scores its live leases, so
    the limits count the calls that are up long before the next lease_s / 3 refresh."""
    redis_server.flush()
    counters: Counter[str] = Counter()
    a = store(redis_server.url, counters=counters, lease_s=600.0)  # refresh: 200 s away
    mirror = {"up1": TAKE, "up2": TAKE}
    a.live = lambda: list(mirror.items())
    a.held = lambda lease: lease in mirror
    try:
        for lease in mirror:
            assert (await a.admit(lease, [caller_limit(5)], TAKE))[0]
        a.start()
        await asyncio.sleep(1.3)  # the first look sets the epoch
        await a.client.flushall()
        key = a.rkey("caller:+12125550100")
        members: list[bytes] = []
        for _ in range(40):
            members = sorted(await a.client.zrange(key, 0, -1))
            if members:
                break
            await asyncio.sleep(0.1)
        assert members == [b"up1", b"up2"] and counters["state_data_lost"] == 1
        assert await a.client.get("sipguard:counts:epoch") is not None
    finally:
        await a.close()


class Events(list[tuple[str, dict[str, object]]]):
    """The store's log lines (its ``log`` callback), in order."""

    def __call__(self, event: str, **fields: object) -> None:
        self.append((event, fields))

    def named(self, event: str) -> list[dict[str, object]]:
        return [fields for name, fields in self if name == event]


async def until(check: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def test_redis_over_maxmemory_refuses_whole_scripts_and_the_limit_stays_exact(
    redis_server: RedisServer,
) -> None:
    """Redis over maxmemory (noeviction): the admission script is refused as a whole (it
    takes nothing), a refused re-scoring opens the breaker at once with one log line naming
    the cause, the store is unavailable; once Redis has room again the probe re-scores the
    lease that lapsed meanwhile *before* it closes the breaker, so a second call of a caller
    limited to one is refused, not let through."""
    redis_server.flush()
    events = Events()
    a = store(redis_server.url, timeout_s=0.2, lease_s=0.9, log=events)
    mirror = {"up": TAKE}
    a.live = lambda: list(mirror.items())
    a.held = lambda lease: lease in mirror
    key = a.rkey("caller:+12125550100")
    try:
        assert (await a.admit("up", [caller_limit(1)], TAKE))[0]
        a.start()
        await until(lambda: a.available, 0.5)
        redis_server.command("CONFIG", "SET", "maxmemory", "1")
        assert await a.admit("other", [caller_limit(5)], ("caller:+12125550100",)) is None
        assert await a.client.zcard(key) == 1  # nothing taken, not even half of it
        await until(lambda: a.open, 0.6)  # the next refresh (lease_s / 3) is refused
        assert not a.available and a.stats()["state_available"] == 0.0
        [opened] = events.named("state_unreachable")
        assert opened["reason"] == "out of memory (maxmemory)", opened
        await asyncio.sleep(1.0)  # the lease lapses meanwhile (lease_s 0.9)
        now_ms = (await a._now_ms())
        assert await a.client.zcount(key, now_ms + 1, "+inf") == 0
        assert await a.admit("second", [caller_limit(1)], TAKE) is None  # breaker open
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
        await until(lambda: not a.open, 2.0)
        # re-scored before the breaker closed: the limit holds at once
        assert await a.admit("second", [caller_limit(1)], TAKE) == (False, 0, 1, [])
        assert len(events.named("state_unreachable")) == 1
        assert len(events.named("state_reachable")) == 1
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
        await a.close()


async def test_a_read_only_replica_keeps_the_breaker_open_without_flapping(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    """state.url names a replica: it answers PING but refuses the scripts (READONLY). The
    breaker opens once, is logged once with the reason, and stays open — the probe runs what
    calls run, not PING — and the store stays unavailable from the start (``/readyz``)."""
    replica = RedisServer(tmp_path).start()
    events = Events()
    a = store(replica.url, timeout_s=0.1, log=events)
    try:
        replica.command("REPLICAOF", "127.0.0.1", str(redis_server.port))
        a.start()
        assert not a.available
        samples = []
        for _ in range(60):  # 1.8 s: several probes (0.2, 0.4, 0.8 s apart)
            await a.admit("x", [caller_limit(1)], TAKE)
            samples.append(a.available)
            await asyncio.sleep(0.03)
        assert not any(samples) and a.open
        [opened] = events.named("state_unreachable")
        assert opened["reason"] == "read-only replica", opened
        assert not events.named("state_reachable")
        assert a.counters["state_breaker_opened"] == 1
    finally:
        await a.close()
        replica.stop()


async def test_counts_lost_in_the_first_second_are_restored(redis_server: RedisServer) -> None:
    """The epoch is read at start, not a second later: a call admitted while the instance was
    starting and lost before that first read is re-scored at once, and a loss just after it
    is noticed by the next look (state_data_lost) — not at the refresh lease_s / 3 later."""
    redis_server.flush()
    events = Events()
    a = store(redis_server.url, lease_s=600.0, log=events)  # refresh: 200 s away
    mirror = {"early": TAKE}
    a.live = lambda: list(mirror.items())
    a.held = lambda lease: lease in mirror
    key = a.rkey("caller:+12125550100")

    async def members() -> list[bytes]:
        return sorted(await a.client.zrange(key, 0, -1))

    try:
        assert (await a.admit("early", [caller_limit(5)], TAKE))[0]
        await a.client.flushall()  # lost before the instance ever read the epoch
        a.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while await members() != [b"early"]:
            assert loop.time() - started < 0.3
            await asyncio.sleep(0.01)
        mirror["late"] = TAKE
        assert (await a.admit("late", [caller_limit(5)], TAKE))[0]
        await a.client.flushall()  # well within the first second
        while await members() != [b"early", b"late"]:
            assert loop.time() - started < 1.5
            await asyncio.sleep(0.02)
        assert a.counters["state_data_lost"] == 1
        assert events.named("state_data_lost") == [{"leases_restored": 2}]
    finally:
        await a.close()


async def test_unavailable_until_redis_answers_and_a_wrong_password_says_so(
    tmp_path: Path,
) -> None:
    """Nothing answered yet: not available (``/readyz`` with fail: closed) even before a
    call failed; available as soon as Redis answers, with no call needed. A refused password
    opens the breaker at once, logged as an authentication failure."""
    server = RedisServer(tmp_path, None, "--requirepass", "s3cret")
    port = server.port
    events = Events()
    a = store(f"redis://:s3cret@127.0.0.1:{port}/0", timeout_s=0.1, fail_open=False)
    bad = store(f"redis://:wrong@127.0.0.1:{port}/0", timeout_s=0.1, log=events)
    try:
        a.start()
        assert not a.available and a.stats()["state_available"] == 0.0
        await asyncio.sleep(0.1)  # the first look failed: still not available
        assert not a.available and a.failures == 1 and not a.open
        server.start()
        await until(lambda: a.available, 1.5)  # the next look, with no call at all
        bad.start()
        await until(lambda: bad.open, 0.5)
        [opened] = events.named("state_unreachable")
        assert opened["reason"] == "authentication failed" and opened["failures"] == 1
        assert "s3cret" not in repr(events) and "wrong" not in repr(opened["reason"])
        assert not bad.available
    finally:
        await a.close()
        await bad.close()
        server.stop()


async def test_cooldown_marks_are_listed_across_the_keyspace_and_bounded(redis_url: str) -> None:
    """The marks of every instance, found by SCAN among other keys (a prefix with glob
    characters matched literally); at most the limit, then truncated; one key read at once;
    an unreachable Redis gives None."""
    a = store(redis_url, prefix="sg*1:")
    other = store(redis_url)  # another deployment's prefix on the same server: not listed
    try:
        for i in range(30):
            await a.mark(f"dialer.block.caller:+1212555{i:04d}", 3, 300)
            assert (await a.admit(f"L{i}", [("c", f"caller:+1212555{i:04d}", 5, 0, False,
                                             "")], (f"caller:+1212555{i:04d}",)))[0]
        await a.mark("dialer.block.origin:198.51.100.7", 0, 60)
        await other.mark("dialer.block.caller:+12125550000", 3, 300)
        got = await a.cooldown_marks(("caller", "origin", "callee"), None, 100)
        assert got is not None
        marks, more = got
        assert not more and len(marks) == 31
        assert sorted(marks)[0][:3] == ("caller", "+12125550000", 3)
        assert 290_000 < sorted(marks)[0][3] <= 300_000
        assert [m[:3] for m in marks if m[0] == "origin"] == [("origin", "198.51.100.7", 0)]
        marks, more = await a.cooldown_marks(("caller",), None, 10) or ([], False)
        assert len(marks) == 10 and more
        marks, more = await a.cooldown_marks(("caller",), None, 30) or ([], True)
        assert len(marks) == 30 and not more  # exactly the limit: nothing left out
        for i in range(170):  # 200 in all: one full batch of reads
            await a.mark(f"dialer.block.callee:+1303555{i:04d}", 3, 300)
        marks, more = await a.cooldown_marks(("caller", "callee"), None, 200) or ([], True)
        assert len(marks) == 200 and not more
        assert await a.cooldown_marks(("caller",), "+12125550007", 10) == (
            [("caller", "+12125550007", 3, pytest.approx(300_000, abs=10_000))], False)
        assert await a.cooldown_marks(("callee",), "+12125550007", 10) == ([], False)
    finally:
        await a.close()
        await other.close()
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = store(f"redis://127.0.0.1:{port}/0", timeout_s=0.05)
    try:
        assert await gone.cooldown_marks(("caller",), None, 10) is None
    finally:
        await gone.close()
