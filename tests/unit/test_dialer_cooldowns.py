"""Rule dialer's cooldowns through the admin API, over real sockets: a cooldown tripped by
INVITEs over UDP, listed (``GET /dialer/cooldowns``), lifted (``DELETE
/dialer/cooldowns/{key}``) so that the number's next INVITE reaches the core — with the memory
backend, across two instances sharing Redis, and across two workers sharing memory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import zlib
from pathlib import Path

import pytest
import structlog

from sipguard import cli
from sipguard.ops.config_load import load_config
from sipguard.ops.cooldowns import MAX_COOLDOWNS_SHOWN
from sipguard.policy.dialer_state import Block
from sipguard.server import Server
from sipguard.state.shared_memory import create_segment
from sipguard.supervisor import SEGMENT_NAME
from sipguard.transport.worker_link import make_token

from .test_admin_api import Guard, _free_tcp_port, request, start_guard
from .test_server_shell import _free_udp_port
from .udp_peer import Peer

CALLER = "+12125550100"
# only the per-caller sequential run, blocking at its third step (the first two pass)
SEQUENTIAL = ("rules:\n  dialer: {distinct_callees: null, short_calls: null, asr: null, "
              "sequential: {tag: null, block: 3}}\n")
# only distinct called numbers (counted in the shared store with Redis), blocking at 3
DISTINCT = ("rules:\n  dialer: {sequential: null, short_calls: null, asr: null, "
            "distinct_callees: {tag: null, block: 3}}\n")


pytestmark = pytest.mark.usefixtures("reset_structlog")



def invite(peer: Peer, port: int, call_id: str, callee: str, caller: str = CALLER) -> bytes:
    return (
        f"INVITE sip:{callee}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK-{call_id};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{caller}@127.0.0.1>;tag=t{call_id}\r\n"
        f"To: <sip:{callee}@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{caller}@127.0.0.1:{peer.port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def reaches_core(caller: Peer, core: Peer, port: int, call_id: str, callee: str) -> None:
    """The INVITE is forwarded to the core (retransmissions of earlier ones skipped)."""
    caller.sock.sendto(invite(caller, port, call_id, callee), ("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    end = loop.time() + 2.0
    while True:
        forwarded = await core.recv_until(b"INVITE ", max(0.01, end - loop.time()))
        if f"\r\nCall-ID: {call_id}\r\n".encode() in forwarded:
            return


async def refused_603(caller: Peer, port: int, call_id: str, callee: str) -> bytes:
    """The INVITE is answered 603 (a retransmitted answer to an earlier one skipped)."""
    caller.sock.sendto(invite(caller, port, call_id, callee), ("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    end = loop.time() + 2.0
    while True:
        answer = await caller.recv_until(b"SIP/2.0 ", max(0.01, end - loop.time()))
        if answer.startswith(b"SIP/2.0 1"):
            continue
        if f"\r\nCall-ID: {call_id}\r\n".encode() in answer:
            assert answer.startswith(b"SIP/2.0 603 Network Blocked"), answer
            return answer


async def trip(caller: Peer, core: Peer, port: int, tag: str, callees: list[str]) -> None:
    """Every callee but the last reaches the core; the last one is blocked (603)."""
    for i, callee in enumerate(callees[:-1]):
        await reaches_core(caller, core, port, f"{tag}-{i}", callee)
    await refused_603(caller, port, f"{tag}-{len(callees)}", callees[-1])


async def test_a_cooldown_is_listed_lifted_and_the_next_invite_reaches_the_core(
    tmp_path: Path, peers: tuple[Peer, Peer], capfd: pytest.CaptureFixture[str]
) -> None:
    """A contact center's DIDs called in sequence cool the caller down (603); the operator
    sees it (scope, key, check, since, until), lifts it, and the caller's next call — the
    next number of the same run, which would trip the rule again had its run not been
    forgotten — reaches the core. The lift is logged and counted."""
    caller, core = peers
    guard = await start_guard(tmp_path, core, SEQUENTIAL)
    try:
        await trip(caller, core, guard.port, "seq",
                   ["+18005550100", "+18005550101", "+18005550102"])
        await refused_603(caller, guard.port, "seq-again", "+18005550999")  # cooled down
        status, body = await request("GET", guard.url + "/dialer/cooldowns")
        assert status == 200, body
        (entry,) = body["cooldowns"]
        assert {k: entry[k] for k in ("scope", "key", "reason", "monitor", "copy")} == {
            "scope": "caller", "key": CALLER, "reason": "sequential", "monitor": False,
            "copy": False}
        assert 295 < entry["left_s"] <= 300 and 0 <= entry["age_s"] < 5
        iso = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
        assert re.match(iso, entry["since"]) and re.match(iso, entry["until"])
        assert entry["since"] < entry["until"] and "truncated" not in body
        # filtered by key (a literal + stays a plus) and by scope
        status, body = await request("GET", guard.url + f"/dialer/cooldowns?key={CALLER}")
        assert [e["key"] for e in body["cooldowns"]] == [CALLER]
        status, body = await request("GET", guard.url + "/dialer/cooldowns?scope=origin")
        assert body == {"cooldowns": []}

        status, body = await request("DELETE", guard.url + "/dialer/cooldowns/a%20b?by=alice")
        assert status == 400  # a space in a name: not a key
        # a number with the separators it is written with (spaces, brackets, dashes)
        status, body = await request(
            "DELETE", guard.url + "/dialer/cooldowns/%2B1%20(212)%20555-0100?by=alice")
        assert status == 200, body
        (lifted,) = body["lifted"]
        assert {k: lifted[k] for k in ("scope", "key", "reason", "where")} == {
            "scope": "caller", "key": CALLER, "reason": "sequential", "where": "local"}
        assert body["windows_reset"] == ["caller"]
        # at once: the next number of the same run goes through
        await reaches_core(caller, core, guard.port, "seq-after", "+18005550103")
        status, body = await request("GET", guard.url + "/dialer/cooldowns")
        assert body == {"cooldowns": []}
        status, body = await request("DELETE", guard.url + f"/dialer/cooldowns/{CALLER}")
        assert status == 404 and "no dialer cooldown" in body["error"]
        status, text = await request("GET", guard.url + "/metrics")
        assert re.search(r'^sipguard_events_total\{event="dialer_cooldowns_lifted"\} 1\.0$',
                         text, re.M), text
    finally:
        await guard.server.stop()
    logged = [line for line in capfd.readouterr().out.splitlines()
              if "dialer_cooldown_lifted" in line]
    assert len(logged) == 1 and "alice" in logged[0] and "sequential" in logged[0], logged


async def test_cli_lists_and_lifts_a_cooldown(
    tmp_path: Path, peers: tuple[Peer, Peer], capsys: pytest.CaptureFixture[str]
) -> None:
    """``sipguard cooldowns`` lists, ``--lift`` lifts (exit 0), a second lift exits 1 with
    the API's 404."""
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # stdout: the CLI's
    caller, core = peers
    guard = await start_guard(tmp_path, core, SEQUENTIAL)
    admin = ["--admin", guard.url]
    try:
        await trip(caller, core, guard.port, "cli",
                   ["+18005550100", "+18005550101", "+18005550102"])
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["cooldowns", "--key", CALLER, *admin]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(e["scope"], e["key"]) for e in listed["cooldowns"]] == [("caller", CALLER)]
        assert await asyncio.to_thread(
            cli.main, ["cooldowns", "--lift", CALLER, "--scope", "caller", "--by", "carol",
                       *admin]) == 0
        lifted = json.loads(capsys.readouterr().out)
        assert [e["reason"] for e in lifted["lifted"]] == ["sequential"]
        assert await asyncio.to_thread(cli.main, ["cooldowns", "--lift", CALLER, *admin]) == 1
        assert "404" in capsys.readouterr().err
    finally:
        await guard.server.stop()


async def test_bad_requests_unknown_keys_and_the_token(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """Without the token both endpoints answer 401; with it, a bad scope or key is 400 and
    a key with no cooldown 404."""
    _, core = peers
    (tmp_path / "token").write_text("s3cret\n")
    sip_port, admin_port = _free_udp_port(), _free_tcp_port()
    path = tmp_path / "sipguard.yaml"
    path.write_text(f"listen: [udp://127.0.0.1:{sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
                    f"admin: {{listen: 127.0.0.1:{admin_port}, token_file: token}}\n"
                    f"{SEQUENTIAL}")
    server = Server(load_config(path))
    await server.start()
    url = f"http://127.0.0.1:{admin_port}"
    try:
        for method, path_ in (("GET", "/dialer/cooldowns"),
                              ("DELETE", f"/dialer/cooldowns/{CALLER}")):
            status, body = await request(method, url + path_)
            assert status == 401 and "token" in body["error"]
            assert (await request(method, url + path_, token="wrong"))[0] == 401
        status, body = await request("GET", url + "/dialer/cooldowns", token="s3cret")
        assert (status, body) == (200, {"cooldowns": []})
        status, body = await request("GET", url + "/dialer/cooldowns?scope=peer",
                                     token="s3cret")
        assert status == 400 and "scope must be one of" in body["error"]
        status, body = await request("DELETE", url + "/dialer/cooldowns/" + "9" * 200,
                                     token="s3cret")
        assert status == 400 and "not a cooldown key" in body["error"]
        status, body = await request("DELETE", url + "/dialer/cooldowns/carrier-a?scope=origin",
                                     token="s3cret")
        assert status == 404 and body["error"] == "carrier-a has no dialer cooldown in scope origin"
    finally:
        await server.stop()


async def test_the_list_is_bounded(tmp_path: Path, peers: tuple[Peer, Peer]) -> None:
    """More cooldowns than MAX_COOLDOWNS_SHOWN: that many are listed, and "truncated"."""
    _, core = peers
    guard = await start_guard(tmp_path, core, SEQUENTIAL)
    try:
        now = guard.server.loop.time()
        table = guard.server.state.dialer.blocks["caller"]
        for i in range(MAX_COOLDOWNS_SHOWN + 5):
            table.put(f"+1212555{i:04d}", Block(now, now + 60, "sequential", False), now)
        status, body = await request("GET", guard.url + "/dialer/cooldowns")
        assert status == 200 and len(body["cooldowns"]) == MAX_COOLDOWNS_SHOWN
        assert body["truncated"] is True
    finally:
        await guard.server.stop()


async def gone(guard: Guard, key: str = CALLER, timeout: float = 1.0) -> None:
    """Wait (bounded) until ``guard`` lists no cooldown of ``key``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        status, body = await request("GET", guard.url + f"/dialer/cooldowns?key={key}")
        if status == 200 and body["cooldowns"] == []:
            return
        assert loop.time() < end, body
        await asyncio.sleep(0.02)


async def test_redis_a_lift_through_one_instance_reaches_every_instance(
    tmp_path: Path, peers: tuple[Peer, Peer], redis_url: str
) -> None:
    """Two instances on one Redis: three distinct called numbers through both block the caller
    on one; the other lists the mark (from Redis) before it meets the caller, then honours the
    mark and keeps a copy. Lifted through the first, the mark
    and the shared count of called numbers go from Redis, the other instance drops its copy,
    and the caller's next calls — to further numbers — reach the core through either."""
    caller, core = peers
    state = f"state: {{backend: redis, url: '{redis_url}'}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await start_guard(tmp_path / "a", core, state + DISTINCT)
    b = await start_guard(tmp_path / "b", core, state + DISTINCT)
    try:
        await reaches_core(caller, core, a.port, "r-0", "+18005550100")
        await reaches_core(caller, core, b.port, "r-1", "+13035550142")
        await refused_603(caller, a.port, "r-2", "+17205550199")
        # b has not met the caller since: it lists a's mark, read from Redis
        for query in ("", f"?key={CALLER}", "?scope=caller"):
            status, body = await request("GET", b.url + "/dialer/cooldowns" + query)
            assert status == 200, body
            (mark,) = body["cooldowns"]
            assert {k: mark[k] for k in ("scope", "key", "reason", "where")} == {
                "scope": "caller", "key": CALLER, "reason": "distinct_callees",
                "where": "shared"}, body
            assert 290 < mark["left_s"] <= 300, mark
        status, body = await request("GET", b.url + "/dialer/cooldowns?scope=callee")
        assert body == {"cooldowns": []}
        status, body = await request("GET", a.url + "/dialer/cooldowns")  # a's own, once
        assert [(e["key"], "where" in e) for e in body["cooldowns"]] == [(CALLER, False)]
        await refused_603(caller, b.port, "r-3", "+18005550100")  # the mark, from Redis
        status, body = await request("GET", b.url + "/dialer/cooldowns")
        (copy,) = body["cooldowns"]  # b's copy now, not the mark again
        assert (copy["reason"], copy["copy"]) == ("distinct_callees", True)
        status, body = await request("DELETE", a.url + f"/dialer/cooldowns/{CALLER}?by=bob")
        assert status == 200, body
        assert sorted(e["where"] for e in body["lifted"]) == ["local", "shared"]
        assert {e["reason"] for e in body["lifted"]} == {"distinct_callees"}
        assert body["windows_reset"] == ["caller"] and body["other_instances_told"] is True
        await gone(b)
        await reaches_core(caller, core, b.port, "r-4", "+14155550123")
        await reaches_core(caller, core, a.port, "r-5", "+12065550178")
    finally:
        await a.server.stop()
        await b.server.stop()


def _free_pair(kind: int) -> int:
    """The first of two consecutive free loopback ports of ``kind``."""
    for _ in range(200):
        first = _free_udp_port() if kind == socket.SOCK_DGRAM else _free_tcp_port()
        socks = []
        try:
            for port in (first, first + 1):
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no two consecutive free ports")


async def test_shared_memory_workers_a_lift_through_either_worker_reaches_the_holder(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """Two workers on one host (shared memory, calls handed to the caller's worker): the
    caller's worker cools it down; the other worker's API lists it (with its worker) and lifts
    it — the mark in shared memory and the holder's own cooldown and counts — and the
    caller's next call reaches the core."""
    caller, core = peers
    group = tmp_path / "group"
    group.mkdir(mode=0o700)
    make_token(group)
    sip_port, admin_port = _free_udp_port(), _free_pair(socket.SOCK_STREAM)
    base = _free_pair(socket.SOCK_DGRAM)
    path = tmp_path / "sipguard.yaml"
    path.write_text(
        f"listen: [udp://127.0.0.1:{sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}}}\nworkers: 2\nworker_port_base: {base}\n"
        "state: {backend: shared_memory, max_keys: 1024, max_leases: 1024, max_sets: 16}\n"
        + DISTINCT)
    cfg = load_config(path)
    create_segment(os.path.join(group, SEGMENT_NAME), 1024, 1024, 16)
    workers = [Server(cfg, worker=i, group=str(group)) for i in range(2)]
    for w in workers:
        await w.start()
    holder = zlib.crc32(CALLER[-8:].encode()) % 2  # the caller's worker (worker_link)
    other = Guard(workers[1 - holder], path, sip_port, admin_port + 1 - holder)
    try:
        await trip(caller, core, sip_port, "w", ["+18005550100", "+13035550142",
                                                 "+17205550199"])
        status, body = await request("GET", other.url + "/dialer/cooldowns")
        assert status == 200 and "workers_unanswered" not in body, body
        (entry,) = body["cooldowns"]
        assert (entry["key"], entry["reason"], entry["worker"]) == (
            CALLER, "distinct_callees", holder)
        status, body = await request("DELETE", other.url + f"/dialer/cooldowns/{CALLER}")
        assert status == 200, body
        assert sorted((e["where"], e.get("worker")) for e in body["lifted"]) == [
            ("local", holder), ("shared", None)]
        assert body["windows_reset"] == ["caller"]
        await reaches_core(caller, core, sip_port, "w-after", "+14155550123")
        await reaches_core(caller, core, sip_port, "w-after-2", "+12065550178")
    finally:
        for w in workers:
            await w.stop()
