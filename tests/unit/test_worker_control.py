"""The operator's changes reach every worker on one host (``workers: 2``, shared memory),
with either ``worker_spread``: two workers in this process, as the supervisor starts them
(their directory with its secret and segment, the suspensions in its ``suspensions/``),
over real sockets on 127.0.0.1. A suspension made, and lifted, through worker 0's admin API
decides a call worker 1 reads (sent to worker 1's own port: with ``source`` the kernel
would pick the worker by source port); a flood ban worker 1 holds is lifted through worker
0's; a worker started again gets what was changed while it was down."""

from __future__ import annotations

import asyncio
import os
import socket
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipguard.ops.config_load import load_config
from sipguard.server import Server
from sipguard.state.shared_memory import create_segment
from sipguard.supervisor import SEGMENT_NAME, STATE_DIR_NAME
from sipguard.transport.worker_link import make_token

from .test_admin_api import request
from .test_dialer_cooldowns import _free_pair, invite, reaches_core
from .test_server_shell import _free_udp_port
from .udp_peer import Peer

WORKERS = 2
# a number worker 1 owns (the hand-over's choice with worker_spread: caller)
CALLER = next(f"+1212555{i:04d}" for i in range(100)
              if zlib.crc32(f"1212555{i:04d}"[-8:].encode()) % WORKERS == 1)


pytestmark = pytest.mark.usefixtures("reset_structlog")



class Group:
    """Two workers' config and directory; ``start(i)`` starts worker i in this process."""

    def __init__(self, tmp_path: Path, core: Peer, spread: str) -> None:
        self.dir = tmp_path / "group"
        self.dir.mkdir(mode=0o700)
        make_token(self.dir)
        create_segment(os.path.join(self.dir, SEGMENT_NAME), 1024, 1024, 16)
        self.sip_port = _free_udp_port()
        self.admin = _free_pair(socket.SOCK_STREAM)
        base = _free_pair(socket.SOCK_DGRAM)
        path = tmp_path / "sipguard.yaml"
        path.write_text(
            f"listen: [udp://127.0.0.1:{self.sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
            f"admin: {{listen: 127.0.0.1:{self.admin}}}\nworkers: {WORKERS}\n"
            f"worker_port_base: {base}\nworker_spread: {spread}\n"
            # (the supervisor's workers keep the API's suspensions in its directory)
            f"state_dir: {self.dir / STATE_DIR_NAME}\n"
            "state: {backend: shared_memory, max_keys: 1024, max_leases: 1024, max_sets: 16}\n"
            # (ip_port: the caller and the core share 127.0.0.1)
            "rules:\n  flood: {sampling_s: 1, density: 10, key: ip_port}\n")
        self.cfg = load_config(path)
        self.workers: list[Server | None] = [None] * WORKERS

    async def start(self, i: int) -> Server:
        server = Server(self.cfg, worker=i, group=str(self.dir))
        await server.start()
        self.workers[i] = server
        return server

    async def stop(self, i: int) -> None:
        server, self.workers[i] = self.workers[i], None
        if server is not None:
            await server.stop()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.admin + i}"

    def own_port(self, i: int) -> int:
        return self.cfg.worker_port(0, i)


@pytest.fixture
async def make_group(tmp_path: Path) -> AsyncIterator[object]:
    made: list[Group] = []

    def make(core: Peer, spread: str) -> Group:
        made.append(Group(tmp_path, core, spread))
        return made[-1]

    yield make
    for g in made:
        for i in range(WORKERS):
            await g.stop(i)


async def refused(caller: Peer, core: Peer, port: int, call_id: str, status: bytes) -> None:
    """The INVITE is answered ``status`` and nothing reaches the core."""
    caller.sock.sendto(invite(caller, port, call_id, "+18005550199", CALLER),
                       ("127.0.0.1", port))
    answer = await caller.recv_until(b"SIP/2.0 " + status, 2.0)
    assert f"Call-ID: {call_id}\r\n".encode() in answer
    with pytest.raises(TimeoutError):
        await core.recv_until(b"INVITE ", 0.2)


async def silent(caller: Peer, core: Peer, port: int, call_id: str) -> None:
    """The INVITE gets no answer (a banned source: dropped) and does not reach the core
    (what else arrives meanwhile — answers to earlier requests — is skipped)."""
    caller.sock.sendto(invite(caller, port, call_id, "+18005550199", CALLER),
                       ("127.0.0.1", port))
    mark = f"Call-ID: {call_id}\r\n".encode()
    loop = asyncio.get_running_loop()
    end = loop.time() + 0.3
    for peer in (caller, core):
        while loop.time() < end:
            try:
                got = await peer.recv(max(0.01, end - loop.time()))
            except TimeoutError:
                break
            assert mark not in got, got
        end = loop.time() + 0.05  # (the core: what is queued by now)


@pytest.mark.parametrize("spread", ["caller", "source"])
async def test_a_suspension_and_a_ban_lift_through_one_worker_reach_the_other(
        peers: tuple[Peer, Peer], make_group: object, spread: str) -> None:
    """Suspended through worker 0: worker 1 answers its caller's INVITE 403 and the core sees
    nothing; lifted through worker 0: the next one reaches the core. Worker 1 bans the
    caller's address for a flood of OPTIONS: worker 0 lists it (as worker 1's) and lifts it
    (200, naming worker 1; again: 404), and the caller's next INVITE to worker 1 reaches the
    core."""
    caller, core = peers
    g = make_group(core, spread)  # type: ignore[operator]
    for i in range(WORKERS):
        await g.start(i)
    one = g.own_port(1)
    status, body = await request("POST", g.url(0) + "/suspensions",
                                 {"number": CALLER, "reason": "fraud"})
    assert status == 201 and body["other_workers_told"] == 1, body
    w1 = g.workers[1]
    await _until(lambda: w1.state.suspensions.get(CALLER) is not None)
    await refused(caller, core, one, "s-1", b"403")
    status, body = await request("DELETE", g.url(0) + f"/suspensions/{CALLER}")
    assert status == 200, body
    await _until(lambda: w1.state.suspensions.get(CALLER) is None)
    await reaches_core(caller, core, one, "s-2", "+18005550199")
    # a flood from the caller's address, read by worker 1: banned there
    for n in range(15):
        caller.sock.sendto(
            f"OPTIONS sip:127.0.0.1:{one} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{caller.port}"
            f";branch=z9hG4bK-o{n}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=o"
            f"\r\nTo: <sip:127.0.0.1>\r\nCall-ID: o{n}\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n".encode(), ("127.0.0.1", one))
    await _until(lambda: w1.bans_view()["bans"] != [])
    source = f"127.0.0.1:{caller.port}"
    assert [b["source"] for b in w1.bans_view()["bans"]] == [source]
    await silent(caller, core, one, "b-1")
    status, body = await request("GET", g.url(0) + "/bans")  # worker 0 lists worker 1's too
    assert status == 200 and [(b["source"], b["worker"]) for b in body["bans"]] == [
        (source, 1)] and body["total"] == 1, body
    status, body = await request("DELETE", g.url(0) + f"/bans/{source}")
    assert status == 200 and body == {"lifted": source, "workers": [1]}, body
    assert w1.bans_view()["bans"] == []  # lifted before the answer
    status, body = await request("DELETE", g.url(0) + f"/bans/{source}")
    assert status == 404, body  # held nowhere now
    await reaches_core(caller, core, one, "b-2", "+18005550199")
    for i in range(WORKERS):
        assert g.workers[i].counters["worker_handover_bad"] == 0
    if spread == "source":  # nothing handed over: each worker decided what it read
        assert all(g.workers[i].counters["worker_handed_over"] == 0 for i in range(WORKERS))


@pytest.mark.parametrize("spread", ["caller", "source"])
async def test_a_worker_started_again_has_what_changed_while_it_was_down(
        peers: tuple[Peer, Peer], make_group: object, spread: str) -> None:
    """Worker 1 stopped; through worker 0 one number suspended, another suspended and lifted
    again; worker 1 started again lists the first, not the second, and refuses its call."""
    caller, core = peers
    g = make_group(core, spread)  # type: ignore[operator]
    for i in range(WORKERS):
        await g.start(i)
    await g.stop(1)
    other = "+13035550142"
    for number in (CALLER, other):
        status, body = await request("POST", g.url(0) + "/suspensions", {"number": number})
        assert status == 201 and body["saved"] is True, body
    assert (await request("DELETE", g.url(0) + f"/suspensions/{other}"))[0] == 200
    w1 = await g.start(1)
    status, body = await request("GET", g.url(1) + "/suspensions")
    assert status == 200 and [s["number"] for s in body["suspensions"]] == [CALLER], body
    await refused(caller, core, g.own_port(1), "r-1", b"403")
    # worker 0 sent worker 1 what it changed in the last REPLAY_S once it greeted it, in order
    await _until(lambda: w1.counters["worker_control_received"] == 3)
    assert [s["number"] for s in (await request("GET", g.url(1) + "/suspensions"))[1][
        "suspensions"]] == [CALLER]


async def _until(check: object, seconds: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not check():  # type: ignore[operator]
        assert loop.time() < end, "not within the time"
        await asyncio.sleep(0.01)
