"""Several workers on one host without Redis, end to end: ``sipguard run --workers 2`` with
``state.backend: shared_memory`` and ``worker_spread: caller`` (the default), on 127.0.0.1.

- one SIPp UAC socket (one source address and port, as one trunk sends from): the calls
  still spread over both workers by caller number, every call completes, and each ends on
  the worker that decided it;
- twenty INVITEs from one socket, twenty callers, one called number with ``per_callee: 2``
  (callers hash to both workers): exactly two reach the core — the count is shared;
- a rate limit per called number: exactly the burst passes, across both workers;
- a CANCEL sent to the public address reaches the worker holding the INVITE.

Every process is stopped by its PID at the end; every wait is bounded.
"""

from __future__ import annotations

import glob
import socket
import time
import zlib
from collections import Counter
from typing import Any

import pytest

from .harness import HOST, E2EStack, SipguardProcess, SippProcess, free_port
from .test_burst_e2e import CoreSocket, final_statuses, invite
from .test_workers_e2e import free_block, per_worker

pytestmark = pytest.mark.e2e

WORKERS = 2


def start_shm_workers(stack: E2EStack, core_port: int,
                      extra: str = "") -> tuple[SipguardProcess, int]:
    """sipguard --workers 2, shared-memory state, on one free UDP port: (process, port)."""
    port, base = free_port(), free_block(WORKERS)
    g = SipguardProcess(
        stack.workdir,
        listen=[f"udp://{HOST}:{port}"],
        core=f"udp://{HOST}:{core_port}",
        config_extra=f"state: {{backend: shared_memory}}\nworker_port_base: {base}\n{extra}",
    )
    g.cmd += ["--workers", str(WORKERS)]
    stack.guards.append(g)
    g.start(ready_timeout=20)
    g.wait_event("sipguard_started", WORKERS, timeout=20)
    g.wait_event("workers_started", 1, timeout=20)
    return g, port


def stopped_counters(g: SipguardProcess) -> list[dict[str, Any]]:
    with g._cv:
        return [e.get("counters") or {} for e in g.events if e.get("event") == "sipguard_stopped"]


def test_one_uac_socket_spreads_over_both_workers(stack: E2EStack) -> None:
    """200 calls at 50 calls/s from one SIPp socket: all complete, both workers decided some,
    each call ended where it was decided, and the hand-overs were counted."""
    calls = 200
    uas = stack.uas("uas_basic.xml", calls=calls, duration_ms=0, timeout=90)
    guard, port = start_shm_workers(stack, uas.local_port)
    uac = SippProcess("uac", "uac_basic.xml", stack.workdir, local_port=free_port(),
                      remote=(HOST, port), calls=calls, rate=50, duration_ms=100, timeout=60)
    stack.sipps.append(uac.start())
    res = uac.wait()
    assert res.successful == calls and res.failed == 0, res.describe()
    uas_res = stack.finish_uas(uas, grace=10)
    assert uas_res.successful == calls, uas_res.describe()
    deadline = time.monotonic() + 10
    while sum(per_worker(guard, "dialog_ended").values()) < calls and time.monotonic() < deadline:
        time.sleep(0.1)
    decided = per_worker(guard, "invite_decided")
    ended = per_worker(guard, "dialog_ended")
    assert set(decided) == {0, 1}, decided
    assert min(decided.values()) >= calls // 5, decided
    assert sum(decided.values()) == calls
    assert ended == decided, (ended, decided)
    group = glob.glob(f"/dev/shm/sipguard-{guard.pid}-*")
    assert len(group) == 1, group  # the workers' directory, removed at stop (below)
    guard.stop()
    totals: Counter[str] = Counter()
    for c in stopped_counters(guard):
        totals.update(c)
    assert totals["worker_handed_over"] > 0 and \
        totals["worker_handed_over"] == totals["worker_received_over"], totals
    assert totals["worker_handover_failed"] == 0
    assert not glob.glob(f"/dev/shm/sipguard-{guard.pid}-*")


def _send_all(sock: socket.socket, port: int, n: int, callee: str, tag: str) -> None:
    local = sock.getsockname()[1]
    for i in range(n):
        sock.sendto(invite(i, caller=f"+1212555{i:04d}", callee=callee, transport="udp",
                           local_port=local, target_port=port, tag=tag), (HOST, port))


def _finals(sock: socket.socket, want: int, seconds: float) -> dict[str, int]:
    got = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(final_statuses(got)) < want:
        try:
            got += sock.recv(65535) + b"\r\n"
        except TimeoutError:
            continue
    return final_statuses(got)


@pytest.mark.parametrize("rules, status", [
    ("rules:\n  concurrency: {per_callee: 2}\n", 486),
    ("rules:\n  rate: {per_callee: {rate: 0.2, burst: 2}}\n", 503),
])
def test_limit_is_exact_across_workers(stack: E2EStack, rules: str, status: int) -> None:
    """Twenty INVITEs back to back from one socket, twenty callers, one called number: the
    callers land on both workers, and exactly two calls reach the core."""
    core = CoreSocket()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(0.05)
    try:
        g, port = start_shm_workers(stack, core.port, rules)
        _send_all(sock, port, 20, "+18005550199", "shm1")
        reached = core.collect(1.5)
        finals = _finals(sock, 18, 3.0)
        assert len(reached) == 2, sorted(reached)
        assert len(finals) == 18 and set(finals.values()) == {status}, finals
        workers = {e.get("worker") for e in g.events if e.get("event") == "invite_decided"}
        assert workers == {0, 1}, workers
    finally:
        sock.close()
        core.close()


def test_suspension_through_one_worker_reaches_the_other(stack: E2EStack) -> None:
    """`sipguard suspend` against worker 0's admin API: a caller owned by worker 1 hears 403
    at once; unsuspended the same way, its next call reaches the core."""
    from .test_cli_e2e import sipguard

    caller = next(f"+1212555{i:04d}" for i in range(100)
                  if zlib.crc32(f"+1212555{i:04d}".encode()) % WORKERS == 1)
    admin = free_block(WORKERS)
    core = CoreSocket()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(0.05)
    local = sock.getsockname()[1]
    url = f"http://{HOST}:{admin}"  # worker 0's
    try:
        g, port = start_shm_workers(stack, core.port, f"admin: {{listen: '{HOST}:{admin}'}}\n")
        res = sipguard("suspend", caller, "--reason", "fraud", "--admin", url)
        assert res.returncode == 0, res.stderr
        g.wait_event("suspension_added", 2, timeout=5)  # worker 0, then worker 1 (via=worker)
        sock.sendto(invite(1, caller=caller, callee="+18005550199", transport="udp",
                           local_port=local, target_port=port, tag="susp"), (HOST, port))
        assert set(_finals(sock, 1, 3.0).values()) == {403}
        assert not core.collect(0.3)
        decided = [e for e in g.events if e.get("event") == "invite_decided"]
        assert [e.get("worker") for e in decided] == [1], decided
        res = sipguard("unsuspend", caller, "--admin", url)
        assert res.returncode == 0, res.stderr
        g.wait_event("suspension_lifted", 2, timeout=5)
        sock.sendto(invite(2, caller=caller, callee="+18005550199", transport="udp",
                           local_port=local, target_port=port, tag="susp"), (HOST, port))
        assert len(core.collect(1.0)) == 1
    finally:
        sock.close()
        core.close()
