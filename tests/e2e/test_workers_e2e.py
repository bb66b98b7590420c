"""Several worker processes on one host, end to end: ``sipguard run --workers 2`` with the
Redis state backend in front of a UAS, on 127.0.0.1.

- a SIPp UAC with one socket per call (``-t un``): the kernel spreads the calls over both
  workers (SO_REUSEPORT), every call completes, and every call ends on the worker that
  decided it (its ACK and BYE reached the worker holding the dialog);
- a caller that sends its ACK and BYE from another port, to the Record-Route address: the
  worker's own port brings them to the worker holding the call;
- SIGHUP to the supervisor reloads every worker; a worker killed with SIGKILL is started
  again and takes calls; SIGTERM stops every worker and the supervisor exits 0;
- a worker whose loop stops (SIGSTOP) is killed after ``worker_hang_timeout_s`` and started
  again.

Every process is stopped by its PID at the end; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .harness import HOST, E2EStack, SipguardProcess, SippProcess, free_port
from .scripted import Caller, Core, header

pytestmark = pytest.mark.e2e

WORKERS = 2


def free_block(n: int, tries: int = 200) -> int:
    """The first of ``n`` consecutive ports free for UDP and TCP on HOST."""
    for _ in range(tries):
        base = free_port()
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def start_workers(stack: E2EStack, redis_url: str, core_port: int,
                  extra: str = "") -> tuple[SipguardProcess, int, int, int]:
    """sipguard --workers 2 on one free UDP port: (process, public port, worker_port_base,
    first admin port)."""
    port, base, admin = free_port(), free_block(WORKERS), free_block(WORKERS)
    g = SipguardProcess(
        stack.workdir,
        listen=[f"udp://{HOST}:{port}"],
        core=f"udp://{HOST}:{core_port}",
        config_extra=(
            f"state: {{backend: redis, url: '{redis_url}'}}\n"
            f"worker_port_base: {base}\nadmin: {{listen: '{HOST}:{admin}'}}\n{extra}"
        ),
    )
    g.cmd += ["--workers", str(WORKERS)]
    stack.guards.append(g)
    g.start(ready_timeout=20)
    g.wait_event("sipguard_started", WORKERS, timeout=20)
    g.wait_event("workers_started", 1, timeout=20)
    return g, port, base, admin


def per_worker(guard: SipguardProcess, event: str) -> Counter[Any]:
    with guard._cv:
        return Counter(e.get("worker") for e in guard.events if e.get("event") == event)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and \
        Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_sipp_calls_spread_over_both_workers_and_complete(
    stack: E2EStack, redis_url: str
) -> None:
    """200 calls at 50 calls/s, one UAC socket per call: all complete, both workers decided
    some, and each call's dialog ended on the worker that decided it (ACK and BYE found it)."""
    calls = 200
    uas = stack.uas("uas_basic.xml", calls=calls, duration_ms=0, timeout=90)
    guard, port, _, _ = start_workers(stack, redis_url, uas.local_port)
    uac = SippProcess("uac", "uac_basic.xml", stack.workdir, local_port=free_port(),
                      remote=(HOST, port), calls=calls, rate=50, duration_ms=100, timeout=60)
    # a socket (source port) per call: the kernel spreads the calls by source address
    uac.cmd[uac.cmd.index("u1")] = "un"
    uac.cmd += ["-max_socket", "1000"]
    stack.sipps.append(uac.start())
    res = uac.wait()
    assert res.successful == calls and res.failed == 0, res.describe()
    uas_res = stack.finish_uas(uas, grace=10)
    assert uas_res.successful == calls, uas_res.describe()
    decided = per_worker(guard, "invite_decided")
    deadline = time.monotonic() + 10
    while sum(per_worker(guard, "dialog_ended").values()) < calls and time.monotonic() < deadline:
        time.sleep(0.1)
    ended = per_worker(guard, "dialog_ended")
    assert set(decided) == {0, 1}, decided  # both workers took calls
    assert min(decided.values()) >= calls // 10, decided
    assert sum(decided.values()) == calls
    assert ended == decided, (ended, decided)  # each call ended where it was decided
    with guard._cv:
        reasons = Counter(e.get("reason") for e in guard.events if e.get("event") == "dialog_ended")
    assert reasons == {"bye_caller": calls}, reasons


def _call(caller: Caller, call_id: str) -> tuple[str, str]:
    """INVITE to the public port; (to tag, Record-Route) of the 200."""
    caller.send(caller.request("INVITE", call_id))
    [ok] = caller.finals(seconds=5, call_id=call_id)
    assert ok.startswith(b"SIP/2.0 200 "), ok[:200]
    m = re.search(r"tag=([^;>\s]+)", header(ok, "To"))
    assert m is not None
    return m.group(1), header(ok, "Record-Route")


def test_in_dialog_requests_follow_record_route_to_the_worker_holding_the_call(
    stack: E2EStack, redis_url: str
) -> None:
    """(``worker_spread: source``: the kernel's choice by source port.) Callers (one peer)
    send ACK and BYE from another socket (another source port) to the
    address in Record-Route: a worker's own port. Every BYE is answered 200 and reaches the core, from
    whichever worker took the call; calls went to both workers' ports."""
    core = Core()
    # one peer: its other source ports speak for its calls too (else: 403, another party)
    guard, port, base, _ = start_workers(
        stack, redis_url, core.port,
        extra=f"peers:\n  - name: lab\n    networks: [{HOST}/32]\nworker_spread: source\n")
    own_ports: set[int] = set()
    try:
        for n in range(16):
            caller = Caller(port)
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.bind((HOST, 0))
            other.settimeout(0.2)
            try:
                call_id = f"rr-{n}"
                to_tag, rr = _call(caller, call_id)
                m = re.search(r"<sip:127\.0\.0\.1:(\d+);lr>", rr)
                assert m is not None, rr
                own = int(m.group(1))
                assert base <= own < base + WORKERS, (rr, base)
                own_ports.add(own)
                route = f"Route: {rr}\r\n"
                oport = other.getsockname()[1]
                ack = caller.request("ACK", call_id, to_tag=to_tag, extra=route, port=oport)
                bye = caller.request("BYE", call_id, cseq=2, to_tag=to_tag, extra=route,
                                     port=oport)
                other.sendto(ack, (HOST, own))
                other.sendto(bye, (HOST, own))
                answer = b""
                deadline = time.monotonic() + 5
                while not answer.startswith(b"SIP/2.0 200") and time.monotonic() < deadline:
                    try:
                        answer = other.recv(65535)
                    except TimeoutError:
                        other.sendto(bye, (HOST, own))
                assert answer.startswith(b"SIP/2.0 200"), answer[:200]
                assert header(answer, "CSeq").endswith("BYE")
                assert "BYE" in core.methods(call_id)
            finally:
                caller.close()
                other.close()
        assert own_ports == {base, base + 1}, own_ports  # both workers held calls
    finally:
        core.close()


def test_supervisor_reloads_restarts_and_stops_every_worker(
    stack: E2EStack, redis_url: str
) -> None:
    """SIGHUP: both workers reload. SIGKILL to a worker: it is started again, on its own port,
    and calls to it complete. SIGTERM: every worker drains and exits, then the supervisor, 0."""
    core = Core()
    guard, port, base, admin = start_workers(stack, redis_url, core.port,
                                             extra="drain_timeout_s: 5\n")
    assert guard.proc is not None
    try:
        [started] = [e for e in guard.events if e.get("event") == "workers_started"]
        pids = started["pids"]
        assert len(pids) == WORKERS and all(pid_alive(p) for p in pids)

        os.kill(guard.pid, signal.SIGHUP)
        guard.wait_event("config_reloaded", WORKERS, timeout=10)
        assert set(per_worker(guard, "config_reloaded")) == {0, 1}

        os.kill(pids[1], signal.SIGKILL)
        guard.wait_event("worker_exited", 1, timeout=10)
        guard.wait_event("worker_restarted", 1, timeout=15)
        guard.wait_event("sipguard_started", WORKERS + 1, timeout=10)
        [restarted] = [e for e in guard.events if e.get("event") == "worker_restarted"]
        assert restarted["worker"] == 1 and restarted["pid"] != pids[1]
        assert not pid_alive(pids[1])
        # the new worker 1 answers on its own port and its admin port
        caller = Caller(base + 1)
        try:
            to_tag, rr = _call(caller, "after-restart")
            assert f"127.0.0.1:{base + 1};lr" in rr, rr
        finally:
            caller.close()
        with socket.create_connection((HOST, admin + 1), timeout=5) as http:
            http.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert http.recv(100).startswith(b"HTTP/1.")

        workers_now = [pids[0], restarted["pid"]]
        os.kill(guard.pid, signal.SIGTERM)
        try:
            code = guard.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("the supervisor did not exit within 15 s of SIGTERM")
        assert code == 0
        assert guard.count("drain_started") >= WORKERS
        assert guard.count("workers_stopped") == 1
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in workers_now) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in workers_now)
    finally:
        core.close()


def test_a_worker_that_stops_answering_is_killed_and_started_again(
    stack: E2EStack, redis_url: str
) -> None:
    """A worker stopped with SIGSTOP looks alive to waitpid() while its share of the calls go
    unanswered: its heartbeats stop, and after ``worker_hang_timeout_s`` the supervisor kills
    it and starts it again; the new worker takes calls on its own port. The other worker,
    which kept sending its heartbeats, is left alone."""
    core = Core()
    guard, port, base, admin = start_workers(stack, redis_url, core.port,
                                             extra="worker_hang_timeout_s: 3\n")
    stopped = 0
    try:
        [started] = [e for e in guard.events if e.get("event") == "workers_started"]
        pids = started["pids"]
        time.sleep(4)  # longer than the timeout: heartbeats keep both workers
        assert guard.count("worker_hung") == 0
        stopped = pids[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        guard.wait_event("worker_hung", 1, timeout=10)
        noticed = time.monotonic() - t0
        [hung] = [e for e in guard.events if e.get("event") == "worker_hung"]
        assert hung["worker"] == 1 and hung["pid"] == stopped and hung["silent_s"] >= 3
        assert 2.0 <= noticed <= 7.0, noticed
        guard.wait_event("worker_exited", 1, timeout=10)
        [exited] = [e for e in guard.events if e.get("event") == "worker_exited"]
        assert exited["worker"] == 1 and exited["code"] == -signal.SIGKILL
        guard.wait_event("worker_restarted", 1, timeout=15)
        guard.wait_event("sipguard_started", WORKERS + 1, timeout=10)
        [restarted] = [e for e in guard.events if e.get("event") == "worker_restarted"]
        assert restarted["worker"] == 1 and restarted["pid"] != stopped
        assert not pid_alive(stopped) and pid_alive(pids[0])
        caller = Caller(base + 1)
        try:
            to_tag, rr = _call(caller, "after-hang")
            assert f"127.0.0.1:{base + 1};lr" in rr, rr
        finally:
            caller.close()
        assert guard.count("worker_hung") == 1  # the running workers are left alone
    finally:
        if stopped and pid_alive(stopped):
            os.kill(stopped, signal.SIGCONT)
        core.close()
