"""The open-files limit (sipguard.ops.fdlimit): what a config needs, the soft limit raised
toward it, the TCP cap fitted to it; and a real sipguard started under a low limit.

The last test runs ``python -m sipguard run`` as a child process whose RLIMIT_NOFILE is set
before it starts (``preexec_fn``), opens TCP connections past what the limit allows and
checks, over real sockets on 127.0.0.1, that the excess is refused at once, counted, and that
``/metrics``, UDP and a new TCP connection are still served.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipguard.ops import fdlimit
from sipguard.ops.config_load import parse_config
from sipguard.ops.fdlimit import BASE_RESERVE, BEYOND_CAP, budget, fit, raise_soft_limit
from sipguard.transport import redis_client

from .tls_pki import write_pki

REPO = Path(__file__).resolve().parents[2]
BASE = "listen: [udp://127.0.0.1:5060, tcp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"


def test_needed_is_the_tcp_cap_the_room_beyond_it_and_the_reserve(tmp_path: Path) -> None:
    """What one process needs: sip.tcp_max_connections, BEYOND_CAP for the core's and peers'
    connections, the base reserve, each listening socket (a worker binds two per listener)
    and each admin API connection (and a worker's to the others, for /metrics); Redis's
    client pool, identity's fetches and national_cli's lookups when configured."""
    plain = budget(parse_config(BASE))
    assert dict(plain.parts) == {"base": BASE_RESERVE, "listeners": 2}
    assert plain.needed == 4096 + BEYOND_CAP + BASE_RESERVE + 2
    admin = parse_config(BASE + "admin: {listen: 127.0.0.1:9090, max_connections: 10}\n"
                         "sip: {tcp_max_connections: 500}\n")
    assert budget(admin).needed == 500 + BEYOND_CAP + BASE_RESERVE + 2 + 11
    workers = parse_config(BASE + "admin: {listen: 127.0.0.1:9090}\nworkers: 4\n"
                           "state: {backend: shared_memory}\n")
    assert dict(budget(workers, worker=True).parts) == {
        "base": BASE_RESERVE, "listeners": 4, "admin": 64 + 1 + 3}
    ca = write_pki(tmp_path).ca
    clients = parse_config(
        BASE + "state: {backend: redis, url: 'redis://127.0.0.1:6379'}\n"
        "rules:\n  identity: {max_concurrent_fetches: 20, "
        f"trust_anchors: {ca}}}\n"
        "  national_cli:\n    home_countries: ['31']\n"
        "    roaming_lookup: {url: 'http://127.0.0.1:1/r', max_concurrent: 7}\n")
    assert dict(budget(clients).parts) == {
        "base": BASE_RESERVE, "listeners": 2, "redis": fdlimit.REDIS_CONNECTIONS,
        "identity_fetches": 20, "roaming_lookups": 7}
    # the client's pool and what the budget keeps for it agree
    assert fdlimit.REDIS_CONNECTIONS >= redis_client.MAX_CONNECTIONS


def test_the_cap_fits_the_soft_limit() -> None:
    """Room for TCP/TLS connections is the soft limit less the reserve; the cap on
    connections from parties is that less the room beyond it (a quarter at most): the
    config's when the limit is high enough, lower when not, 0 when nothing is left."""
    need = budget(parse_config(BASE + "sip: {tcp_max_connections: 1000}\n"))
    reserve = need.reserve
    assert fit(need, None) == (None, None)
    assert fit(need, need.needed) == (1000 + BEYOND_CAP, 1000)  # cap = the config's
    assert fit(need, reserve + 1100) == (1100, 1100 - BEYOND_CAP)  # lowered
    assert fit(need, reserve + 100) == (100, 75)  # little room: a quarter kept beyond
    assert fit(need, 10) == (0, 0)


def test_the_gauges_follow_a_reloaded_config_within_the_cap_the_limit_allows() -> None:
    """The gauges are read when scraped: ``fd_needed`` of the config running then, and
    ``tcp_connections_limit`` the lower of its tcp_max_connections and what the limit allows
    (a reload cannot raise the cap past the limit)."""
    cfg = parse_config(BASE + "sip: {tcp_max_connections: 1000}\n")
    need = budget(cfg)
    room, fd_cap = fit(need, need.reserve + 1100)
    fds = fdlimit.FdLimit(soft=need.reserve + 1100, hard=need.reserve + 1100,
                          before=need.reserve + 1100, need=need, room=room, fd_cap=fd_cap)
    assert fds.low and fds.cap == 844
    gauges = fds.gauges()
    assert gauges["fd_needed"] == need.needed and gauges["tcp_connections_limit"] == 844
    assert gauges["fd_limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert gauges["fd_open"] == len(os.listdir("/proc/self/fd")) - 1
    smaller = parse_config(BASE + "sip: {tcp_max_connections: 500}\n")
    larger = parse_config(BASE + "sip: {tcp_max_connections: 5000}\n")
    assert fds.gauges(smaller)["tcp_connections_limit"] == 500
    assert fds.gauges(larger)["tcp_connections_limit"] == 844
    assert fds.gauges(larger)["fd_needed"] == budget(larger).needed


@contextlib.contextmanager
def soft_limit(value: int) -> Iterator[int]:
    """The soft RLIMIT_NOFILE set to ``value`` for the block (then restored); yields the hard
    limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_toward_what_is_needed_never_past_the_hard_one() -> None:
    """raise_soft_limit raises the soft limit to what is needed, to the hard limit when that
    is lower, and never lowers it."""
    low = len(os.listdir("/proc/self/fd")) + 200
    with soft_limit(low) as hard:
        top = hard if hard != resource.RLIM_INFINITY else None
        if top is not None and top < low + 100:
            pytest.skip(f"hard limit {hard} leaves no room to raise the soft one")
        assert raise_soft_limit(low + 50) == (low, low + 50, top)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == low + 50
        assert raise_soft_limit(low) == (low + 50, low + 50, top)  # never lowered
        if top is not None:
            assert raise_soft_limit(top + 1000) == (low + 50, top, top)
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == top


# ------------------------------------------------------------------ a real sipguard


def _free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive ports free for both TCP and UDP on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            base = int(t.getsockname()[1])
        if base + n > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + n):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        sock = held.enter_context(socket.socket(socket.AF_INET, kind))
                        sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {n} free ports in a row")


def options(port: int, transport: str, n: int) -> bytes:
    return (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:9;rport;branch=z9hG4bK-fd{n}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:ping@127.0.0.1>;tag=a\r\nTo: <sip:127.0.0.1>\r\n"
        f"Call-ID: fd-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def metrics(admin_port: int) -> dict[str, float]:
    """Every unlabelled sample and sipguard_events_total{event} of GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out = {m[1]: float(m[2]) for m in re.finditer(r"^(sipguard_[a-z_]+) (\S+)$", text, re.M)}
    for m in re.finditer(r'^sipguard_events_total\{event="([^"]+)"\} (\S+)$', text, re.M):
        out[m[1]] = float(m[2])
    return out


def closed_at_once(sock: socket.socket) -> bool:
    """The far end closed the connection (EOF or reset) within 1 s."""
    sock.settimeout(1.0)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Guard:
    """``sipguard run`` as a child process with RLIMIT_NOFILE (soft, hard); its stdout's JSON
    lines collected by a thread."""

    def __init__(self, config: Path, soft: int, hard: int) -> None:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sipguard", "run", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), preexec_fn=limit,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(raw))

    def wait(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            self.seen.append(line)
            if line.get("event") == event:
                return line

    def stop(self) -> None:
        self.proc.terminate()  # (with workers: the supervisor stops them)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_sipguard_under_a_low_open_files_limit_refuses_the_excess_and_stays_reachable(
    tmp_path: Path,
) -> None:
    """sipguard started with RLIMIT_NOFILE soft 91, hard 111 (tcp_max_connections at its
    4,096; the admin API capped at 4 connections): it raises the soft limit to the hard one,
    logs one ``fd_limit_low`` warning (soft, hard, needed, the cap it lowered to 30, what to
    do) and exports the gauges. Of 40 TCP connections, 30 stay open and 10 are closed at once
    (``tcp_refused_total``), none left hanging; /metrics and /healthz answer, an OPTIONS over
    UDP is answered, and once connections close, one over a new TCP connection too."""
    port, admin_port = _free_ports(), _free_ports()
    config = tmp_path / "sipguard.yaml"
    config.write_text(
        f"listen: [udp://127.0.0.1:{port}, tcp://127.0.0.1:{port}]\n"
        "core: udp://127.0.0.3:5080\n"  # (not the clients' address: the core's is exempt)
        f"admin: {{listen: 127.0.0.1:{admin_port}, max_connections: 4}}\n"
        "sip: {tcp_max_connections_per_ip: 1000}\ndrain_timeout_s: 0\n"
    )
    reserve = BASE_RESERVE + 2 + 5  # two listeners; the admin API's 4 and its listener
    hard = reserve + 40  # room for 40 connections: 30 from parties, 10 kept beyond
    guard = Guard(config, hard - 20, hard)
    conns: list[socket.socket] = []
    try:
        low = guard.wait("fd_limit_low")
        assert low["level"] == "warning"
        assert (low["soft"], low["hard"], low["raised_from"]) == (hard, hard, hard - 20)
        assert low["needed"] == 4096 + BEYOND_CAP + reserve
        assert (low["tcp_max_connections"], low["tcp_connections_limit"]) == (4096, 30)
        assert "ulimit -n" in low["fix"] and "LimitNOFILE" in low["fix"]
        guard.wait("sipguard_started")
        for _ in range(40):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        refused = [c for c in conns[30:] if closed_at_once(c)]
        assert len(refused) == 10
        seen = metrics(admin_port)
        assert seen["tcp_refused_total"] == 10
        assert seen["sipguard_tcp_connections"] == 30
        assert seen["sipguard_tcp_connections_limit"] == 30
        assert (seen["sipguard_fd_limit"], seen["sipguard_fd_needed"]) == (hard, low["needed"])
        assert 30 < seen["sipguard_fd_open"] < hard
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=2) as r:
            assert r.status == 200
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(2)
            udp.sendto(options(port, "UDP", 1), ("127.0.0.1", port))
            assert udp.recv(4096).startswith(b"SIP/2.0 200 ")
        for conn in conns[:5]:
            conn.close()
        end = time.monotonic() + 2
        while metrics(admin_port)["sipguard_tcp_connections"] > 25:
            assert time.monotonic() < end, "closed connections still counted"
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as tcp:
            tcp.sendall(options(port, "TCP", 2))
            assert tcp.recv(4096).startswith(b"SIP/2.0 200 ")
        assert metrics(admin_port)["tcp_refused_total"] == 10
    finally:
        for conn in conns:
            conn.close()
        guard.stop()


def test_each_worker_raises_its_limit_and_fits_its_own_cap(tmp_path: Path) -> None:
    """With ``workers: 2`` each worker process checks its own limit: one ``fd_limit_low`` line
    per worker (its two sockets per listener and its connections to the other worker's admin
    API in the reserve), and each worker's cap on /metrics, labelled with the worker."""
    # the public port, the workers' own ports (2 listeners × 2 workers), worker i's admin
    # API on the admin port + i
    port, own, admin_port = _free_ports(), _free_ports(4), _free_ports(2)
    config = tmp_path / "sipguard.yaml"
    config.write_text(
        f"listen: [udp://127.0.0.1:{port}, tcp://127.0.0.1:{port}]\n"
        "core: udp://127.0.0.3:5080\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}, max_connections: 4}}\n"
        f"workers: 2\nworker_port_base: {own}\nstate: {{backend: shared_memory}}\n"
        "drain_timeout_s: 0\n"
    )
    reserve = BASE_RESERVE + 4 + 6  # 2 × 2 listening sockets; 4 + 1 + 1 for the admin API
    hard = reserve + 60
    guard = Guard(config, hard, hard)
    try:
        lines = [guard.wait("fd_limit_low"), guard.wait("fd_limit_low")]
        assert sorted(line["worker"] for line in lines) == [0, 1]
        for line in lines:
            assert line["reserve"] == {"base": BASE_RESERVE, "listeners": 4, "admin": 6}
            assert (line["soft"], line["tcp_connections_limit"]) == (hard, 60 - 15)
        text = ""
        end = time.monotonic() + 5
        while text.count("sipguard_tcp_connections_limit{") < 2:
            assert time.monotonic() < end, text
            url = f"http://127.0.0.1:{admin_port}/metrics"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                text = r.read().decode()
            time.sleep(0.05)
        for worker in ("0", "1"):
            assert f'sipguard_tcp_connections_limit{{worker="{worker}"}} 45.0' in text
            assert f'sipguard_fd_limit{{worker="{worker}"}} {hard}.0' in text
    finally:
        guard.stop()
