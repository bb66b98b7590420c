"""Suspensions and flood bans shared through a real Redis: two SharedLists, each with its own
client and its own local stores (as two sipguard processes have), on one redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sipguard.ops.shared_lists import SharedLists, ban_field, ban_key
from sipguard.policy.flood import FloodGuard, FloodState
from sipguard.policy.flood_settings import Settings
from sipguard.policy.suspensions import SuspensionStore

from ..redis_server import RedisServer
from .test_admin_api import request, start_guard
from .test_server_shell import invite
from .udp_peer import Peer

PREFIX = "t:"


class Node:
    """One instance's local stores and its SharedLists."""

    def __init__(self, url: str, name: str, resync_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.client = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.suspensions = SuspensionStore()
        self.flood = FloodState()
        self.counters: Counter[str] = Counter()
        self.offset = time.time() - loop.time()
        self.changes: list[tuple[list[str], list[str]]] = []
        self.lists = SharedLists(
            self.client, PREFIX, self.suspensions, self.flood, loop.time, lambda: self.offset,
            origin=name, counters=self.counters, resync_s=resync_s,
            on_suspensions=lambda a, b: self.changes.append(
                ([e.key for e in a], [e.key for e in b])),
        )
        self.flood.on_ban = self.lists.ban_added

    @property
    def now(self) -> float:
        return self.loop.time()

    def suspend(self, key: str, ttl: float | None = None, reason: str = "fraud") -> None:
        self.suspensions.add(key, reason, "alice", self.now, ttl)
        self.lists.suspension_changed(key)

    def lift(self, key: str) -> None:
        assert self.suspensions.lift(key) is not None
        self.lists.suspension_changed(key)

    def suspended(self, number: str) -> bool:
        return self.suspensions.match(number, self.now) is not None

    async def close(self) -> None:
        await self.lists.stop()
        await self.client.aclose()


async def eventually(check: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.005)
    return loop.time() - start


@pytest.fixture
async def nodes(redis_url: str) -> AsyncIterator[tuple[Node, Node]]:
    a, b = Node(redis_url, "a"), Node(redis_url, "b")
    assert await a.lists.start() and await b.lists.start()
    yield a, b
    await a.close()
    await b.close()


def _raw(url: str) -> Redis:
    return Redis.from_url(url, socket_timeout=1.0)


# --------------------------------------------------------------------------- propagation


async def test_suspension_and_lift_reach_the_other_instance(nodes: tuple[Node, Node]) -> None:
    """A suspension made on A matches on B within a second (pub/sub), with its reason, author
    and expiry; a prefix likewise; a lift on B reaches A."""
    a, b = nodes
    a.suspend("+31201234567", ttl=600)
    a.suspend("+3130*")
    took = await eventually(lambda: b.suspended("+31201234567") and b.suspended("+31301111"))
    assert took < 1.0
    entry = b.suspensions.get("+31201234567")
    assert entry is not None and entry.reason == "fraud" and entry.by == "alice"
    assert entry.expires is not None and abs(entry.expires - (b.now + 600)) < 1.0
    assert "+31201234567" in [key for added, _ in b.changes for key in added]
    b.lift("+3130*")
    await eventually(lambda: not a.suspended("+31301111"))
    assert a.suspended("+31201234567")
    assert a.counters["shared_lists_suspensions_lifted"] == 1


async def test_ban_from_the_flood_guard_reaches_the_other_instance(
    nodes: tuple[Node, Node]
) -> None:
    """A ban the flood guard sets on A (the FloodState.on_ban hook) drops the source on B
    within a second, with the same end; a lift on B reaches A."""
    a, b = nodes
    guard_a = FloodGuard(Settings(sampling_s=10, density=3, ban_s=120), "enforce", a.flood)
    guard_b = FloodGuard(Settings(sampling_s=10, density=3, ban_s=120), "enforce", b.flood)
    src = ("192.0.2.7", 5060)
    verdicts = [guard_a.check(src, b"OPTIONS sip:x SIP/2.0\r\n\r\n", a.now) for _ in range(5)]
    assert "flood" in verdicts
    took = await eventually(lambda: guard_b.banned(src))
    assert took < 1.0
    assert guard_b.check(src, b"OPTIONS sip:x SIP/2.0\r\n\r\n", b.now) == "banned"
    ban_a, ban_b = a.flood.bans["192.0.2.7"], b.flood.bans["192.0.2.7"]
    assert abs((ban_a.until + a.offset) - (ban_b.until + b.offset)) < 0.01
    assert ban_b.reason == "flood"
    assert b.flood.lift("192.0.2.7")
    b.lists.ban_changed("192.0.2.7")
    await eventually(lambda: not guard_a.banned(src))


async def test_lift_all_bans_and_ip_port_keys(nodes: tuple[Node, Node]) -> None:
    """Bans per address and port (IPv4 and IPv6) travel too; lifting every ban on A empties
    B's bans."""
    a, b = nodes
    guard = FloodGuard(Settings(sampling_s=10, density=2, ban_s=60, key="ip_port"), "enforce",
                       a.flood)
    for src in (("192.0.2.8", 5070), ("2001:db8::9", 5080)):
        for _ in range(4):
            guard.check(src, b"OPTIONS sip:x SIP/2.0\r\n\r\n", a.now)
    await eventually(lambda: set(b.flood.bans) == {("192.0.2.8", 5070), ("2001:db8::9", 5080)})
    a.flood.lift_all()
    a.lists.bans_lifted_all()
    await eventually(lambda: not b.flood.bans)


async def test_a_monitor_mode_ban_is_not_shared(nodes: tuple[Node, Node]) -> None:
    """A flood guard in monitor mode bans for its own counting only: nothing goes to Redis."""
    a, b = nodes
    guard = FloodGuard(Settings(sampling_s=10, density=2, ban_s=60), "monitor", a.flood)
    for _ in range(4):
        guard.check(("192.0.2.60", 5060), b"OPTIONS sip:x SIP/2.0\r\n\r\n", a.now)
    assert "192.0.2.60" in a.flood.bans and not a.lists.dirty
    await asyncio.sleep(0.1)
    assert not b.flood.bans


def test_ban_fields_round_trip() -> None:
    for key in ("192.0.2.1", "2001:db8::1", ("192.0.2.1", 5060), ("2001:db8::1", 5060)):
        assert ban_key(ban_field(key)) == key
    assert ban_field(("2001:db8::1", 5060)) == "[2001:db8::1]:5060"
    for bad in ("", "[2001:db8::1]", "1.2.3.4:x", "a b", "{x}"):
        with pytest.raises(ValueError):
            ban_key(bad)


# --------------------------------------------------------------------------- restarts


async def test_a_new_instance_loads_what_is_in_force(redis_url: str) -> None:
    """Suspensions and bans outlive every instance: one started after the changes (all others
    gone) has them at once; an expired entry is dropped and deleted from Redis."""
    a = Node(redis_url, "a")
    assert await a.lists.start()
    a.suspend("+31201234567")
    a.suspend("+31207654321", ttl=0.2)
    guard = FloodGuard(Settings(sampling_s=10, density=2, ban_s=60), "enforce", a.flood)
    for _ in range(4):
        guard.check(("198.51.100.1", 5060), b"OPTIONS sip:x SIP/2.0\r\n\r\n", a.now)
    await a.lists.flush()
    await a.close()
    await asyncio.sleep(0.3)
    c = Node(redis_url, "c")
    try:
        assert await c.lists.start()
        assert c.suspended("+31201234567") and not c.suspended("+31207654321")
        assert "198.51.100.1" in c.flood.bans
        raw = _raw(redis_url)
        assert await raw.hkeys(PREFIX + "suspensions") == [b"+31201234567"]
        await raw.aclose()
    finally:
        await c.close()


async def test_changes_during_an_outage_converge(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Redis stops (and comes back with its data): nothing crashes, local changes still apply
    at once, and what each instance changed meanwhile is written and reaches the other."""
    a, b = Node(redis_url, "a"), Node(redis_url, "b")
    assert await a.lists.start() and await b.lists.start()
    dump = Path(redis_server.workdir) / "dump.rdb"
    try:
        a.suspend("+31201111111")
        await eventually(lambda: b.suspended("+31201111111"))
        redis_server.command("SAVE")  # a Redis that keeps its data over the restart
        redis_server.stop()
        a.lift("+31201111111")
        b.suspend("+31202222222")
        assert not a.suspended("+31201111111") and b.suspended("+31202222222")
        await eventually(lambda: not a.lists.connected and not b.lists.connected, 3.0)
        await asyncio.sleep(0.5)
        redis_server.start()
        await eventually(lambda: a.suspended("+31202222222") and not b.suspended("+31201111111"),
                         8.0)
        assert a.lists.connected and b.lists.connected
        assert a.counters["shared_lists_disconnected"] == 1
        assert not a.lists.dirty and not b.lists.dirty
    finally:
        if redis_server.proc is None:
            redis_server.start()
        dump.unlink(missing_ok=True)
        await a.close()
        await b.close()


async def test_a_redis_that_lost_its_data_is_refilled(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Redis restarts empty (no persistence): the instances write back what they hold instead
    of dropping it, so both end with the union of their lists."""
    a, b = Node(redis_url, "a"), Node(redis_url, "b")
    assert await a.lists.start() and await b.lists.start()
    try:
        a.suspend("+31201111111")
        await eventually(lambda: b.suspended("+31201111111"))
        redis_server.kill()
        b.suspend("+31202222222")
        await asyncio.sleep(0.5)
        redis_server.start()
        await eventually(lambda: a.suspended("+31202222222"), 8.0)
        assert a.suspended("+31201111111") and b.suspended("+31201111111")
        raw = _raw(redis_url)
        assert set(await raw.hkeys(PREFIX + "suspensions")) == {b"+31201111111",
                                                                b"+31202222222"}
        await raw.aclose()
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await a.close()
        await b.close()


async def test_start_without_redis_keeps_local_lists(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Redis down at start: start() gives up waiting after its bound, the local lists (a
    state file's, say) stay in force and are written once Redis answers."""
    redis_server.stop()
    a = Node(redis_url, "a")
    try:
        a.suspensions.add("+31203333333", "from file", "bob", a.now)
        assert not await a.lists.start(wait_s=0.3)
        assert a.suspended("+31203333333")
        redis_server.start()
        b = Node(redis_url, "b")
        try:
            await b.lists.start(wait_s=5.0)
            await eventually(lambda: b.suspended("+31203333333"), 8.0)
        finally:
            await b.close()
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await a.close()


async def test_a_refused_password_is_logged_as_such_at_once(tmp_path: Path) -> None:
    """Redis answers, refusing the password: start() does not wait its bound out and report
    a Redis that "did not answer" — it logs an authentication failure, at once."""
    server = RedisServer(tmp_path, None, "--requirepass", "s3cret").start()
    a = Node(f"redis://:wrong@127.0.0.1:{server.port}/0", "a")
    lines: list[tuple[str, str, dict[str, object]]] = []

    class Log:
        def info(self, event: str, **fields: object) -> None:
            lines.append(("info", event, fields))

        def warning(self, event: str, **fields: object) -> None:
            lines.append(("warning", event, fields))

    a.lists.log = Log()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await a.lists.start(wait_s=2.0)  # Redis answered
        assert loop.time() - started < 1.0
        [(level, event, fields)] = lines
        assert (level, event, fields["reason"]) == (
            "warning", "shared_lists_not_loaded", "authentication failed")
        assert "invalid username-password" in str(fields["error"])
        assert "wrong" not in str(fields["error"])
        assert not a.lists.connected
    finally:
        await a.close()
        server.stop()


# --------------------------------------------------------------------------- bad data


async def test_malformed_messages_and_entries_are_counted_and_ignored(
    redis_url: str, nodes: tuple[Node, Node]
) -> None:
    """Garbage on the channel or in the hashes is skipped and counted; the listener goes on
    and the next real change still arrives."""
    a, b = nodes
    raw = _raw(redis_url)
    try:
        for payload in (
            b"not json", b"[1, 2]", json.dumps({"kind": "x", "op": "add", "key": "1",
                                                 "origin": "z"}),
            json.dumps({"kind": "suspension", "op": "add", "key": "abc", "origin": "z"}),
            json.dumps({"kind": "ban", "op": "add", "key": "a b", "origin": "z"}),
            b"{" * 5000, b"\xff\xfe",
        ):
            await raw.publish(PREFIX + "events", payload)
        await raw.hset(PREFIX + "suspensions", "+31209999999", "not json")
        await raw.hset(PREFIX + "bans", "192.0.2.99", json.dumps({"since": 1}))
        await raw.publish(PREFIX + "events", json.dumps(
            {"kind": "suspension", "op": "add", "key": "+31209999999", "origin": "z"}))
        await raw.publish(PREFIX + "events", json.dumps(
            {"kind": "ban", "op": "add", "key": "192.0.2.99", "origin": "z"}))
        await eventually(lambda: b.counters["shared_lists_bad_message"] == 7
                         and b.counters["shared_lists_bad_entry"] == 2)
        assert not b.suspended("+31209999999") and "192.0.2.99" not in b.flood.bans
        a.suspend("+31201234567")
        await eventually(lambda: b.suspended("+31201234567"))
        b.lists._resync_due = True  # a full read skips the bad entries too
        await eventually(lambda: b.counters["shared_lists_resyncs"] >= 2
                         and b.counters["shared_lists_bad_entry"] >= 4)
        assert b.suspended("+31201234567")
    finally:
        await raw.aclose()


async def test_a_dialer_cooldown_lift_reaches_the_other_instance(
    redis_url: str, nodes: tuple[Node, Node]
) -> None:
    """A cooldown lifted on one instance is announced: the other is told (scope, key) — the
    sender is not; a cooldown message with an unknown scope or op is counted and ignored."""
    a, b = nodes
    got_a: list[tuple[str, str]] = []
    got_b: list[tuple[str, str]] = []
    a.lists.on_cooldown_lift = lambda scope, key: got_a.append((scope, key))
    b.lists.on_cooldown_lift = lambda scope, key: got_b.append((scope, key))
    raw = _raw(redis_url)
    try:
        for bad in ({"kind": "cooldown", "op": "lift", "key": "peer:carrier-a"},
                    {"kind": "cooldown", "op": "add", "key": "caller:+12125550100"},
                    {"kind": "cooldown", "op": "lift", "key": "caller:"}):
            await raw.publish(PREFIX + "events", json.dumps({**bad, "origin": "z"}))
        assert await a.lists.cooldown_lifted("origin", "2001:db8::7")
        await eventually(lambda: got_b == [("origin", "2001:db8::7")]
                         and b.counters["shared_lists_bad_message"] == 3)
        assert got_a == []
    finally:
        await raw.aclose()


async def test_own_messages_are_ignored_and_dirty_keys_win(nodes: tuple[Node, Node]) -> None:
    """An instance skips its own messages; a key changed here and not yet written is not
    overwritten by a resync."""
    a, b = nodes
    a.suspend("+31201234567")
    await eventually(lambda: b.suspended("+31201234567"))
    assert a.counters["shared_lists_messages"] == 0
    a.suspensions.lift("+31201234567")
    a.lists.dirty[("suspension", "+31201234567")] = None  # changed, the writer not woken yet
    await a.lists._resync()
    assert not a.suspended("+31201234567") and b.suspended("+31201234567")
    a.lists.suspension_changed("+31201234567")
    await eventually(lambda: not b.suspended("+31201234567"))


# --------------------------------------------------------------------------- two servers


async def test_two_servers_share_suspensions_and_bans(tmp_path: Path, redis_url: str) -> None:
    """Two sipguard servers on one Redis, over real sockets: a number suspended through A's
    admin API is refused by B within a second (and lands in B's state_dir file), and lifted
    likewise; a flood ban set on A shows on B, and lifted through B's admin API is lifted on
    A."""
    caller, core = Peer(), Peer()
    extra = (f"state: {{backend: redis, url: '{redis_url}', key_prefix: 'e2e:'}}\n"
             "rules:\n  flood: {sampling_s: 10, density: 50, ban_s: 60}\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    guard_a = await start_guard(tmp_path / "a", core, extra)
    guard_b = await start_guard(tmp_path / "b", core,
                                extra + f"state_dir: {tmp_path / 'b' / 'state'}\n")
    loop = asyncio.get_running_loop()
    try:
        assert guard_a.server.shared_lists is not None
        status, body = await request("POST", guard_a.url + "/suspensions",
                                     {"number": "+31201234567", "reason": "fraud"})
        assert status == 201
        start = loop.time()
        while True:  # an INVITE to B every 50 ms until it is refused
            caller.sock.sendto(invite(caller, guard_b.port, f"x-{loop.time()}",
                                      caller="+31201234567"), ("127.0.0.1", guard_b.port))
            try:
                answer = await caller.recv_until(b"SIP/2.0 4", timeout=0.05)
            except TimeoutError:
                assert loop.time() - start < 1.0, "B did not refuse within 1 s"
                continue
            assert answer.startswith(b"SIP/2.0 403 ")
            break
        status, body = await request("GET", guard_b.url + "/suspensions")
        assert [s.get("number") for s in body["suspensions"]] == ["+31201234567"]
        saved = tmp_path / "b" / "state" / "suspensions.journal"  # B's files follow too
        await eventually(lambda: saved.exists() and "+31201234567" in saved.read_text())
        status, _ = await request("DELETE", guard_b.url + "/suspensions/%2B31201234567")
        assert status == 200
        await eventually(lambda: not guard_a.server.state.suspensions)
        # a flood ban set on A (the guard's hook) shows on B, and B's lift reaches A
        guard = guard_a.server.policy.flood
        assert guard is not None
        for _ in range(60):
            guard.check(("192.0.2.50", 5060), b"OPTIONS sip:x SIP/2.0\r\n\r\n", loop.time())
        await eventually(lambda: "192.0.2.50" in guard_b.server.state.flood.bans)
        status, body = await request("GET", guard_b.url + "/bans")
        assert [b["source"] for b in body["bans"]] == ["192.0.2.50"]
        status, _ = await request("DELETE", guard_b.url + "/bans/192.0.2.50")
        assert status == 200
        await eventually(lambda: not guard_a.server.state.flood.bans)
    finally:
        await guard_a.server.stop()
        await guard_b.server.stop()
        caller.sock.close()
        core.sock.close()
