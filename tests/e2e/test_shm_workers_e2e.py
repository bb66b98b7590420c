"""Several workers on one host without Redis, end to end: ``sipguard run --workers 2`` with
``state.backend: shared_memory`` and ``worker_spread: caller`` (the default), on 127.0.0.1.

- one SIPp UAC socket (one source address and port, as one trunk sends from): the calls
  still spread over both workers by caller number, every call completes, and each ends on
  the worker that decided it;
- twenty INVITEs from one socket, twenty callers, one called number with ``per_callee: 2``
  (callers hash to both workers): exactly two reach the core — the count is shared;
- a rate limit per called number: exactly the burst passes, across both workers;
- a suspension made through one worker's admin API reaches a caller of the other;
- `sipguard reload` through one worker's admin API reloads the other too: a number the new
  file suspends is refused on the worker that did not take the request;
- `sipguard calls` through one worker's admin API lists the number's calls on both workers;
- a core that sends every request to the public address (its outbound proxy), with the route
  set in Route or without it: its BYE, with the callee in From, reaches the worker holding
  the call, as does the caller's CANCEL of another call.

Every process is stopped by its PID at the end; every wait is bounded.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sipguard.transport.udp import WATCH_EVERY

from .harness import HOST, REPO, E2EStack, SipguardProcess, SippProcess, free_port, suspend_number
from .scripted import Caller, Core
from .test_burst_e2e import CoreSocket, final_statuses, invite
from .test_workers_e2e import _call, free_block, per_worker

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


def number_of(worker: int, prefix: str = "+1212555") -> str:
    """The first number ``prefix`` + 4 digits whose CRC-32 (of its last eight digits, as
    the hand-over reads a number) picks ``worker``."""
    return next(f"{prefix}{i:04d}" for i in range(100)
                if zlib.crc32(f"{prefix}{i:04d}"[-8:].encode()) % WORKERS == worker)


def uac_socket() -> tuple[socket.socket, int]:
    """A UDP socket on 127.0.0.1 (short read timeout) and its port: a caller's or the core's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(0.05)
    return sock, sock.getsockname()[1]


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

    caller = number_of(1)
    admin = free_block(WORKERS)
    core = CoreSocket()
    sock, local = uac_socket()
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


def test_reload_through_one_worker_reloads_the_other(stack: E2EStack) -> None:
    """The config file gains `suspended: [caller]` (a caller worker 1 owns); `sipguard
    reload` against worker 0's admin API: both workers reload (worker 1 on the supervisor's
    SIGHUP), and the caller hears 403 from worker 1 without a second reload."""
    from .test_cli_e2e import sipguard

    caller = number_of(1)
    admin = free_block(WORKERS)
    core = CoreSocket()
    sock, local = uac_socket()
    try:
        g, port = start_shm_workers(stack, core.port, f"admin: {{listen: '{HOST}:{admin}'}}\n")
        sock.sendto(invite(1, caller=caller, callee="+18005550199", transport="udp",
                           local_port=local, target_port=port, tag="rl"), (HOST, port))
        assert len(core.collect(1.0)) == 1  # before the reload: it reaches the core
        g.config.write_text(g.config.read_text() + f"suspended: ['{caller}']\n")
        res = sipguard("reload", "--admin", f"http://{HOST}:{admin}")  # worker 0's
        assert res.returncode == 0, res.stderr
        assert '"other_workers_reloading": 1' in res.stdout, res.stdout
        g.wait_event("config_reloaded", 2, timeout=10)
        assert sorted(e.get("worker") for e in g.events
                      if e.get("event") == "config_reloaded") == [0, 1]
        [asked] = [e for e in g.events if e.get("event") == "workers_reloading"]
        assert asked.get("by_worker") == 0
        sock.sendto(invite(2, caller=caller, callee="+18005550199", transport="udp",
                           local_port=local, target_port=port, tag="rl"), (HOST, port))
        assert set(_finals(sock, 1, 3.0).values()) == {403}  # call 1 is never answered
        assert len(core.collect(0.3)) == 1  # call 2 did not reach the core
        decided = [e for e in g.events if e.get("event") == "invite_decided"]
        assert [e.get("worker") for e in decided] == [1, 1], decided
    finally:
        sock.close()
        core.close()


def test_calls_through_one_worker_list_both_workers_calls(stack: E2EStack) -> None:
    """Two callers, one on each worker, call one number (the core does not answer: both
    calls stay up, early): `sipguard calls NUMBER` against worker 0 lists both, each with the
    worker that holds it."""
    from .test_cli_e2e import sipguard

    callers = [number_of(w) for w in range(WORKERS)]
    callee = "+18005550123"
    admin = free_block(WORKERS)
    core = CoreSocket()
    sock, local = uac_socket()
    try:
        g, port = start_shm_workers(stack, core.port, f"admin: {{listen: '{HOST}:{admin}'}}\n")
        for i, caller in enumerate(callers):
            sock.sendto(invite(i, caller=caller, callee=callee, transport="udp",
                               local_port=local, target_port=port, tag="cl"), (HOST, port))
        end = time.monotonic() + 5
        while len(core.collect(0.2)) < len(callers) and time.monotonic() < end:
            pass
        assert len(core.collect(0.1)) == len(callers)
        res = sipguard("calls", callee, "--admin", f"http://{HOST}:{admin}")
        assert res.returncode == 0, res.stderr
        view = json.loads(res.stdout)
        assert sorted((c["worker"], c["caller"]) for c in view["calls"]) == [
            (w, callers[w]) for w in range(WORKERS)]
        assert "workers_unanswered" not in view
        # one scrape of worker 0 holds both workers' metrics, each labelled with its worker
        with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        held = {s.labels["worker"]: s.value
                for s in fams["sipguard_server_transactions"].samples}
        assert held == {str(w): 1.0 for w in range(WORKERS)}, text
        up = {s.labels["worker"]: s.value for s in fams["sipguard_worker_up"].samples}
        assert up == {str(w): 1.0 for w in range(WORKERS)}
    finally:
        sock.close()
        core.close()


def _recv_until(sock: socket.socket, pattern: bytes, seconds: float,
                from_: list[tuple[str, int]] | None = None) -> bytes:
    """Datagrams read from ``sock`` until one matches ``pattern`` (a regex): that one (its
    source address appended to ``from_``)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if re.search(pattern, data, re.S):
            if from_ is not None:
                from_.append(addr)
            return data
    raise AssertionError(f"nothing matching {pattern!r} within {seconds} s")


def _header(data: bytes, name: bytes) -> list[bytes]:
    return re.findall(rb"^" + name + rb":[ \t]*([^\r\n]*)", data, re.M | re.I)


def _answer(request: bytes, status: str, to_tag: str | None, extra: bytes = b"") -> bytes:
    """A response to ``request``: its Via, From, To (with ``to_tag``), Call-ID and CSeq."""
    lines = [b"SIP/2.0 " + status.encode()]
    lines += [b"Via: " + v for v in _header(request, b"Via")]
    lines += [b"Record-Route: " + v for v in _header(request, b"Record-Route")]
    to = _header(request, b"To")[0]
    if to_tag is not None and b";tag=" not in to:
        to += b";tag=" + to_tag.encode()
    lines += [b"From: " + _header(request, b"From")[0], b"To: " + to,
              b"Call-ID: " + _header(request, b"Call-ID")[0],
              b"CSeq: " + _header(request, b"CSeq")[0]]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"Content-Length: 0\r\n\r\n"


@pytest.mark.parametrize("routed", [True, False], ids=["route-set", "no-route"])
def test_requests_to_the_public_address_reach_the_calls_worker(stack: E2EStack,
                                                               routed: bool) -> None:
    """The core answers a call and then ends it with a BYE sent to sipguard's public address
    (its outbound proxy), the Record-Route in Route (or, from a core that drops the route set,
    no Route at all) and the *callee* in From — a number that hashes to the other worker: the
    BYE still reaches the worker holding the call (not 481) — by the worker's port in Route,
    or by its To (the caller) — the caller hears it, the 200 goes back, and the call ends
    there. The caller's CANCEL of a second call, also to the public address, reaches the
    worker holding that INVITE."""
    caller, callee = number_of(0), number_of(1, "+1800555")
    core, _ = uac_socket()  # the core's socket: the same kind
    uac, local = uac_socket()
    try:
        g, port = start_shm_workers(stack, core.getsockname()[1])
        public = (HOST, port)
        uac.sendto(invite(1, caller=caller, callee=callee, transport="udp", local_port=local,
                          target_port=port, tag="pub"), public)
        sources: list[tuple[str, int]] = []
        inv = _recv_until(core, rb"^INVITE ", 5, sources)
        worker_addr = sources[0]  # the worker's own port: requests leave from it
        own = _header(inv, b"Record-Route")[0]
        assert f":{worker_addr[1]};".encode() in own
        assert f":{port};".encode() not in own  # the worker's own port, not the public one
        core_contact = f"Contact: <sip:{callee}@{HOST}:{core.getsockname()[1]}>\r\n".encode()
        core.sendto(_answer(inv, "200 OK", "core1", core_contact), worker_addr)
        ok = _recv_until(uac, rb"^SIP/2\.0 200 .*CSeq: 1 INVITE", 5)
        to = _header(ok, b"To")[0]
        uac.sendto((f"ACK sip:{callee}@{HOST}:{core.getsockname()[1]} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK-pub-ack;rport\r\n").encode()
                   + b"Route: " + own + b"\r\nMax-Forwards: 70\r\nFrom: "
                   + _header(ok, b"From")[0] + b"\r\nTo: " + to + b"\r\nCall-ID: "
                   + _header(ok, b"Call-ID")[0] + b"\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
                   public)
        _recv_until(core, rb"^ACK ", 5)
        # the core's BYE, to the public address, route set in Route, the callee in From
        bye = (f"BYE sip:{caller}@{HOST}:{local} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {HOST}:{core.getsockname()[1]};branch=z9hG4bK-core-bye\r\n"
               ).encode() + (b"Route: " + own + b"\r\n" if routed else b"") + \
            b"Max-Forwards: 70\r\nFrom: " + to + \
            b"\r\nTo: " + _header(ok, b"From")[0] + b"\r\nCall-ID: " + \
            _header(ok, b"Call-ID")[0] + b"\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
        core.sendto(bye, public)
        got = _recv_until(uac, rb"^BYE ", 5)
        uac.sendto(_answer(got, "200 OK", None), (HOST, port))
        final = _recv_until(core, rb"^SIP/2\.0 \d{3} .*CSeq: 1 BYE", 5)
        assert final.startswith(b"SIP/2.0 200 "), final[:80]
        g.wait_event("dialog_ended", 1, timeout=5)
        ended = [e for e in g.events if e.get("event") == "dialog_ended"]
        decided = [e for e in g.events if e.get("event") == "invite_decided"]
        assert [e.get("worker") for e in decided] == [0]
        assert [(e.get("worker"), e.get("reason")) for e in ended] == [(0, "bye_callee")], ended
        # a second call, cancelled by the caller through the public address
        uac.sendto(invite(2, caller=caller, callee=callee, transport="udp", local_port=local,
                          target_port=port, tag="pub"), public)
        inv2 = _recv_until(core, rb"^INVITE .*CSeq: 1 INVITE", 5)
        core.sendto(_answer(inv2, "180 Ringing", "core2"), worker_addr)
        _recv_until(uac, rb"^SIP/2\.0 180 ", 5)
        first = invite(2, caller=caller, callee=callee, transport="udp", local_port=local,
                       target_port=port, tag="pub")
        head = first.split(b"\r\nContact:")[0]
        cancel = head.replace(b"INVITE sip:", b"CANCEL sip:", 1).replace(
            b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL") + b"\r\nContent-Length: 0\r\n\r\n"
        uac.sendto(cancel, public)
        answered = _recv_until(uac, rb"^SIP/2\.0 \d{3} .*CSeq: 1 CANCEL", 5)
        assert answered.startswith(b"SIP/2.0 200 "), answered[:80]
        _recv_until(core, rb"^CANCEL ", 5)
        # Whichever worker the kernel gave the BYE to, hashing its From (the callee) would
        # have sent it to worker 1, which does not hold the call (481); its Route names 0,
        # and without one its To (the caller) hashes to 0.
        totals: Counter[str] = Counter()
        g.stop()
        for c in stopped_counters(g):
            totals.update(c)
        assert totals["dropped_in_dialog_refused"] == 0, totals
    finally:
        uac.close()
        core.close()


def test_a_worker_behind_sheds_the_new_calls_it_reads_whoever_owns_them(
    stack: E2EStack,
) -> None:
    """Both workers frozen while 200 new calls from one socket (so one worker reads them all)
    wait 0.6 s in the queue; half of the callers belong to each worker. Thawed, the reading
    worker is behind (overload_delay_ms 200): it sheds every new call it reads with 503 +
    Retry-After, its own and the other worker's alike, instead of handing the other's over
    late — at most the reads before its first check (WATCH_EVERY) go on."""
    admin = free_block(WORKERS)
    core = CoreSocket()
    sock, local = uac_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    owners = [number_of(w) for w in range(WORKERS)]
    burst = 200
    try:
        g, port = start_shm_workers(
            stack, core.port,
            f"admin: {{listen: '{HOST}:{admin}'}}\n"
            "sip: {overload_delay_ms: 200, overload_retry_after_s: 7}\n")
        children = Path(f"/proc/{g.pid}/task/{g.pid}/children").read_text()
        workers = [int(p) for p in children.split()]
        assert len(workers) == WORKERS
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(burst):
                sock.sendto(invite(i, caller=owners[i % WORKERS], callee="+18005550199",
                                   transport="udp", local_port=local, target_port=port,
                                   tag="ov"), (HOST, port))
            time.sleep(0.6)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        shed: set[str] = set()
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(b"SIP/2.0 503 "):
                assert b"\r\nRetry-After: 7" in data
                shed.add(re.search(rb"Call-ID: (\S+)", data).group(1).decode())  # type: ignore[union-attr]
        forwarded = core.collect(0.5)
        assert len(shed) + len(forwarded) == burst, (len(shed), len(forwarded))
        assert len(forwarded) <= WATCH_EVERY, len(forwarded)
        with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5) as resp:
            fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        events = Counter[str]()
        for s in fams["sipguard_events"].samples:
            events[s.labels["event"]] += int(s.value)
        # only what was read before the first check went to the other worker
        assert events["worker_handed_over"] <= WATCH_EVERY, events
        assert events["overload_rejected"] == len(shed), events
    finally:
        sock.close()
        core.close()


def test_a_draining_worker_answers_every_new_call_it_reads(stack: E2EStack) -> None:
    """SIGTERM while worker 0 holds a call in progress: worker 1, with none, ends its drain at
    once and exits. The new calls worker 0 then reads — its own callers' and the gone
    worker's — hear the drain's 503 from it; none is handed to the worker that is gone (which
    left those callers retransmitting into silence)."""
    core = CoreSocket()
    sock, local = uac_socket()
    try:
        g, port = start_shm_workers(stack, core.port, "drain_timeout_s: 15\n")
        sock.sendto(invite(0, caller=number_of(0), callee="+18005550199", transport="udp",
                           local_port=local, target_port=port, tag="dr"), (HOST, port))
        assert core.collect(1.0), "the call reached the core (unanswered: it stays in progress)"
        os.kill(g.pid, signal.SIGTERM)
        g.wait_event("drain_ended", 1, timeout=10)
        with g._cv:
            [ended] = [e for e in g.events if e.get("event") == "drain_ended"]
        assert ended.get("worker") == 1 and ended.get("live_calls") == 0, ended
        time.sleep(0.5)  # worker 1 exits; its socket leaves the group
        for i, worker in enumerate((1, 0, 1)):
            sock.sendto(invite(10 + i, caller=number_of(worker), callee="+18005550199",
                               transport="udp", local_port=local, target_port=port, tag="dr"),
                        (HOST, port))
        got = b""
        end = time.monotonic() + 3
        while time.monotonic() < end and len(final_statuses(got)) < 3:
            try:
                got += sock.recv(65535)
            except TimeoutError:
                continue
        statuses = final_statuses(got)
        assert statuses == {f"burst-dr-{10 + i}@{HOST}": 503 for i in range(3)}, statuses
    finally:
        sock.close()
        core.close()


def test_a_new_call_sent_to_a_workers_own_port_is_decided_by_its_callers_worker(
    stack: E2EStack,
) -> None:
    """A caller that sends its INVITEs straight to the workers' own ports, in turn, cannot
    pick the worker that decides (and split a dialer's calls out of sight of each worker's
    dialer analytics): every call is decided by its caller's worker, as on the public
    address."""
    core = CoreSocket()
    sock, local = uac_socket()
    try:
        g, _ = start_shm_workers(stack, core.port)
        m = re.search(r"worker_port_base: (\d+)", g.config.read_text())
        assert m is not None
        base = int(m.group(1))
        for i in range(4):
            own = base + i % WORKERS
            sock.sendto(invite(30 + i, caller=number_of(0), callee=f"+1800555{i:04d}",
                               transport="udp", local_port=local, target_port=own, tag="own"),
                        (HOST, own))
        assert len(core.collect(1.5)) == 4
        assert per_worker(g, "invite_decided") == Counter({0: 4})
        # the CANCEL of the call sent to worker 1's port goes where its INVITE went: 200
        own = base + 1
        via = f"SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK-burst-own-31;rport"
        sock.sendto((
            f"CANCEL sip:+18005550001@{HOST}:{own} SIP/2.0\r\nVia: {via}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{number_of(0)}@{HOST}:{local}>;tag=fown31\r\n"
            f"To: <sip:+18005550001@{HOST}:{own}>\r\nCall-ID: burst-own-31@{HOST}\r\n"
            f"CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n").encode(), (HOST, own))
        got = b""
        end = time.monotonic() + 2
        while time.monotonic() < end and b"CANCEL\r\n" not in got:
            try:
                got += sock.recv(65535)
            except TimeoutError:
                continue
        assert re.search(rb"SIP/2\.0 200 [^\r]*\r\n(?:[^\r]+\r\n)*CSeq: 1 CANCEL", got), got
    finally:
        sock.close()
        core.close()


def _get(port: int, path: str) -> tuple[int, Any]:
    """GET on a worker's admin API: (status, JSON answer or text)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def test_a_second_sipguard_on_the_same_public_port_is_refused(stack: E2EStack) -> None:
    """A second `workers: 2` sipguard with the same `listen` but its own worker_port_base
    (a copy of the config): its workers would join the first's public port through
    SO_REUSEPORT and split the callers; it refuses to start, naming the port, exit 1, and
    leaves no workers' directory behind."""
    guard, port = start_shm_workers(stack, free_port())
    second = stack.workdir / "second"
    second.mkdir()
    g2 = SipguardProcess(second, listen=[f"udp://{HOST}:{port}"], core=guard.core,
                         config_extra="state: {backend: shared_memory}\n"
                                      f"worker_port_base: {free_block(WORKERS)}\n")
    g2.cmd += ["--workers", str(WORKERS)]
    proc = subprocess.Popen(g2.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err_bytes = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err_bytes)
    err = err_bytes.decode()
    assert f"sipguard: cannot listen on udp://{HOST}:{port}: Address already in use " \
        "(another process holds it" in err, err
    assert b"sipguard_started" not in out  # no worker of it ever started
    assert not glob.glob(f"/dev/shm/sipguard-{proc.pid}-*")
    assert guard.proc is not None and guard.proc.poll() is None  # the first runs on
    assert glob.glob(f"/dev/shm/sipguard-{guard.pid}-*")


def test_a_restarted_worker_keeps_the_groups_suspensions_and_config(stack: E2EStack) -> None:
    """No state_dir: a suspension made through worker 0's admin API, then the config file's
    `suspended:` list edited but not reloaded, then worker 1 killed (SIGKILL). The restarted
    worker 1 lists the API's suspension (loaded from the workers' directory) and runs the
    group's config (the list before the edit), as worker 0 does."""
    admin = free_block(WORKERS)
    guard, _ = start_shm_workers(stack, free_port(), extra=(
        f"admin: {{listen: '{HOST}:{admin}'}}\nsuspended: ['+12125550111']\n"))
    suspend_number(admin, "+12125550122", reason="fraud")
    guard.config.write_text(guard.config.read_text().replace("+12125550111", "+12125550133"))
    [started] = [e for e in guard.events if e.get("event") == "workers_started"]
    os.kill(started["pids"][1], signal.SIGKILL)
    guard.wait_event("worker_restarted", 1, timeout=10)
    guard.wait_event("sipguard_started", WORKERS + 1, timeout=10)
    views = []
    for worker in range(WORKERS):
        status, answer = _get(admin + worker, "/suspensions")
        assert status == 200, answer
        views.append(sorted((s.get("source") == "config", s.get("number"))
                            for s in answer["suspensions"]))
    assert views[1] == views[0] == [(False, "+12125550122"), (True, "+12125550111")], views


def test_worker_0_answers_through_the_whole_drain(stack: E2EStack) -> None:
    """SIGTERM with a call up on worker 1 only: worker 0, drained at once, keeps its admin
    port (the documented one) answering — /readyz 503, /metrics — until worker 1 has drained
    (here its drain_timeout_s ends the call); then both exit and the supervisor exits 0."""
    core = Core()
    admin = free_block(WORKERS)
    try:
        guard, _ = start_shm_workers(stack, core.port, extra=(
            f"admin: {{listen: '{HOST}:{admin}'}}\ndrain_timeout_s: 2\n"))
        m = re.search(r"worker_port_base: (\d+)", guard.config.read_text())
        assert m is not None
        caller = Caller(int(m.group(1)) + 1)  # worker 1's own port: the call is worker 1's
        try:
            _, rr = _call(caller, "drain-hold")
            assert f"{HOST}:{int(m.group(1)) + 1};lr" in rr, rr
            assert guard.proc is not None
            os.kill(guard.pid, signal.SIGTERM)
            guard.wait_event("drain_waiting_for_workers", 1, timeout=5)
            assert _get(admin, "/readyz")[0] == 503
            status, text = _get(admin, "/metrics")
            assert status == 200 and "sipguard_" in text
            code = guard.proc.wait(10)
        finally:
            caller.close()
        assert code == 0
        with guard._cv:
            order = [e.get("worker") for e in guard.events
                     if e.get("event") == "sipguard_stopped"]
        assert order == [1, 0], order
        [waiting] = [e for e in guard.events if e.get("event") == "drain_waiting_for_workers"]
        assert waiting.get("worker") == 0
    finally:
        core.close()
