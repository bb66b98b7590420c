"""Overload protection end to end: a full UDP receive queue, a long queue delay, or a TCP
reader that stays behind turns new calls into 503s.

sipguard is frozen (SIGSTOP) while a burst of new INVITEs fills its receive queue past the
kernel's limit, then thawed: the queue is over ``sip.overload_shed_above``, so the INVITEs
still queued are answered 503 with Retry-After and none of them is sent to the core; once the
queue has drained, a new call is proxied again. The core is a UDP socket of the test, so what
reached it can be counted.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from sipguard.transport.udp import WATCH_EVERY

from .harness import HOST, E2EStack, RawUdpCaller, _parse_response

pytestmark = pytest.mark.e2e

BURST = 3000  # far more than a 256 KiB receive buffer holds: the kernel drops the rest


_CALL_ID = re.compile(rb"\r\nCall-ID: *([^\r\n]+)", re.I)


def _call_id(message: bytes) -> str | None:
    """The Call-ID of a raw SIP message, or None."""
    m = _CALL_ID.search(message)
    return m.group(1).decode() if m is not None else None


def _drain(sock: socket.socket, seconds: float) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(65535))
        except TimeoutError:
            break
    return out


def test_full_receive_queue_answers_new_calls_503_then_recovers(stack: E2EStack) -> None:
    core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core.bind((HOST, 0))
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller.bind((HOST, 0))
    caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    with core, caller:
        guard, port = stack.sipguard(
            core_port=core.getsockname()[1], listen=("udp",),
            config_extra="sip: {udp_receive_buffer: 262144, overload_retry_after_s: 7}\n",
        )
        target = (HOST, port)
        local = caller.getsockname()[1]
        os.kill(guard.pid, signal.SIGSTOP)
        try:
            for _ in range(BURST):
                caller.sendto(RawUdpCaller(local, target).invite_bytes(), target)
        finally:
            os.kill(guard.pid, signal.SIGCONT)
        guard.wait_event("overload_started", 1, timeout=10)
        guard.wait_event("overload_ended", 1, timeout=20)
        answers = [_parse_response(d) for d in _drain(caller, 3.0)]
        finals = [a for a in answers if a is not None and a[0] >= 200]
        # One per call: the 503s are retransmitted (Timer G) as nobody ACKs them here.
        shed = list({h["call-id"][0]: h for status, h in finals if status == 503}.values())
        # One per call: the core never answers, so Timer A retransmits what was forwarded.
        forwarded = list({
            cid for d in _drain(core, 0.5)
            if d.startswith(b"INVITE ") and (cid := _call_id(d)) is not None
        })
        detail = guard.diagnostics()
        assert all(h.get("retry-after") == ["7"] for h in shed), shed[:2]
        assert {status for status, _ in finals} == {503}, detail

        # Drained: a new call is proxied again.
        call = RawUdpCaller(local, target)
        caller.sendto(call.invite_bytes(), target)
        got = _drain(core, 2.0)
        assert any(call.call_id.encode() in d and d.startswith(b"INVITE ") for d in got), detail
        stopped = guard.stop()
        assert stopped == 0
        final = [e for e in guard.events if e.get("event") == "sipguard_stopped"]
        counters = final[0]["counters"] if final else {}
        assert counters.get("overload_rejected", 0) == len(shed), counters
        dropped = counters.get("udp_receive_dropped", 0)
        held = BURST - dropped  # what the kernel queue held when sipguard was thawed
        assert dropped > 0 and held > 0, counters
        # The queue was full: the watcher looks after every WATCH_EVERY datagrams read (not
        # only on its 50 ms timer, which a burst can beat), so at most that many went on to
        # the core before it noticed; then every new call was shed until the queue was below
        # a tenth again.
        assert len(shed) + len(forwarded) <= held, (len(shed), len(forwarded), held)
        assert len(shed) >= held // 2 and len(forwarded) <= WATCH_EVERY + held // 8, (
            len(shed), len(forwarded), held)


SMALL_BURST = 200  # ~150 KB: a few per cent of the default 4 MiB receive buffer


@pytest.mark.parametrize("delay_ms", [200, None], ids=["delay_mark", "delay_mark_off"])
def test_queue_delay_sheds_new_calls_long_before_the_queue_fills(
    stack: E2EStack, delay_ms: int | None
) -> None:
    """INVITEs that waited 0.6 s in a queue far from full: with ``sip.overload_delay_ms`` the
    check at the WATCH_EVERY-th read sees the wait, so the calls still queued hear 503 +
    Retry-After rather than being forwarded 0.6 s late (their callers retransmit from 0.5 s
    on); with the mark off (null) every one is forwarded."""
    core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core.bind((HOST, 0))
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller.bind((HOST, 0))
    caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    core.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    mark = "null" if delay_ms is None else str(delay_ms)
    with core, caller:
        guard, port = stack.sipguard(
            core_port=core.getsockname()[1], listen=("udp",),
            config_extra=f"sip: {{overload_delay_ms: {mark}, overload_retry_after_s: 7}}\n",
        )
        target = (HOST, port)
        local = caller.getsockname()[1]
        calls = [RawUdpCaller(local, target) for _ in range(SMALL_BURST)]
        os.kill(guard.pid, signal.SIGSTOP)
        try:
            for call in calls:
                caller.sendto(call.invite_bytes(), target)
            time.sleep(0.6)
        finally:
            os.kill(guard.pid, signal.SIGCONT)
        if delay_ms is not None:
            guard.wait_event("overload_started", 1, timeout=10)
            guard.wait_event("overload_ended", 1, timeout=10)
        forwarded = {
            cid for d in _drain(core, 1.5)
            if d.startswith(b"INVITE ") and (cid := _call_id(d)) is not None
        }
        answers = [_parse_response(d) for d in _drain(caller, 0.5)]
        shed = {h["call-id"][0]: h for status, h in (a for a in answers if a is not None)
                if status == 503}
        detail = guard.diagnostics()
        assert not set(shed) & forwarded, detail
        if delay_ms is None:
            assert len(forwarded) == SMALL_BURST and not shed, (len(forwarded), len(shed))
            assert not [e for e in guard.events if e.get("event") == "overload_started"]
        else:
            started = [e for e in guard.events if e.get("event") == "overload_started"][0]
            assert started["cause"] == "queue_delay" and started["queue_delay_ms"] > 400, started
            assert started["queue_ratio"] < 0.5, started
            assert len(forwarded) < WATCH_EVERY, (len(forwarded), len(shed))
            assert len(shed) + len(forwarded) == SMALL_BURST, (len(forwarded), len(shed))
            assert all(h.get("retry-after") == ["7"] for h in shed.values())
        # Recovered: a new call is proxied.
        call = RawUdpCaller(local, target)
        caller.sendto(call.invite_bytes(), target)
        assert any(call.call_id.encode() in d and d.startswith(b"INVITE ")
                   for d in _drain(core, 2.0)), detail
        assert guard.stop() == 0


STREAM_BURST = 10000  # ~6 MB over one connection: a second or two of work for sipguard
# The stream test's mark. Behind means bytes wait on the socket after every read; the kernel can
# interrupt that: a receiver whose buffer is full may drop a segment (Linux 6.17+ checks
# sk_rcvbuf strictly), the sender then waits for its retransmission timeout (200 ms, doubling)
# and sipguard, having read everything else, has caught up meanwhile. The reader is behind
# without a break for the first ~250 ms of the burst on such a kernel, so the mark is 50 ms.
STREAM_DELAY_MS = 50


def _tcp_invites(local_port: int, target: tuple[str, int], n: int) -> tuple[bytes, list[str]]:
    calls = [RawUdpCaller(local_port, target) for _ in range(n)]
    data = b"".join(c.invite_bytes().replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP", 1)
                    .replace(b"transport=UDP", b"transport=TCP", 1) for c in calls)
    return data, [c.call_id for c in calls]


def _read_stream(sock: socket.socket, out: bytearray, idle: float, limit: float) -> None:
    """Collect what sipguard answers on ``sock`` until it has been quiet for ``idle`` s."""
    deadline = time.monotonic() + limit
    sock.settimeout(idle)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return
        if not chunk:
            return
        out += chunk


@pytest.mark.parametrize("delay_ms", [STREAM_DELAY_MS, None], ids=["delay_mark", "delay_mark_off"])
def test_a_tcp_reader_behind_sheds_new_calls(stack: E2EStack, delay_ms: int | None) -> None:
    """One TCP connection writes INVITEs far faster than sipguard can take them: flow control
    keeps the backlog in the sender's buffers, but the reader finds bytes waiting after every
    read, and once that has lasted longer than ``sip.overload_delay_ms`` the INVITEs still
    coming hear 503 + Retry-After instead of reaching the core seconds late; overload ends when
    the reader has caught up, and a new call is proxied. With the mark off every INVITE is
    forwarded."""
    core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core.bind((HOST, 0))
    core.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    mark = "null" if delay_ms is None else str(delay_ms)
    with core:
        guard, port = stack.sipguard(
            core_port=core.getsockname()[1], listen=("udp", "tcp"),  # UDP: to the core
            config_extra=f"sip: {{overload_delay_ms: {mark}, overload_retry_after_s: 7}}\n",
        )
        target = (HOST, port)
        forwarded: set[str] = set()
        stop = threading.Event()

        def count_core() -> None:  # the core's socket must not overflow while this runs
            core.settimeout(0.2)
            while not stop.is_set():
                try:
                    d = core.recv(65535)
                except TimeoutError:
                    continue
                if d.startswith(b"INVITE ") and (cid := _call_id(d)) is not None:
                    forwarded.add(cid)

        counter = threading.Thread(target=count_core)
        counter.start()
        answers = bytearray()
        try:
            with socket.create_connection(target) as conn:
                data, call_ids = _tcp_invites(conn.getsockname()[1], target, STREAM_BURST)
                reader = threading.Thread(target=_read_stream, args=(conn, answers, 3.0, 60.0))
                reader.start()
                conn.sendall(data)
                reader.join(70)
            # Caught up: a new call on a new connection is proxied.
            with socket.create_connection(target) as conn:
                late, (late_id,) = _tcp_invites(conn.getsockname()[1], target, 1)
                conn.sendall(late)
                deadline = time.monotonic() + 5
                while late_id not in forwarded and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            stop.set()
            counter.join(5)
        detail = guard.diagnostics()
        assert late_id in forwarded, detail
        replies = [r for r in answers.split(b"\r\n\r\n") if r.startswith(b"SIP/2.0 ")]
        shed = {cid for r in replies
                if r.startswith(b"SIP/2.0 503") and (cid := _call_id(r)) is not None}
        burst = forwarded - {late_id}
        assert not shed & burst and (shed | burst) <= set(call_ids), detail
        if delay_ms is None:
            assert len(burst) == STREAM_BURST and not shed, (len(burst), len(shed))
            assert not [e for e in guard.events if e.get("event") == "overload_started"]
        else:
            assert len(burst) + len(shed) == STREAM_BURST, (len(burst), len(shed))
            assert shed and len(burst) < STREAM_BURST, (len(burst), len(shed))
            assert all(b"\r\nRetry-After: 7\r\n" in r for r in replies
                       if r.startswith(b"SIP/2.0 503")), detail
            started = [e for e in guard.events if e.get("event") == "overload_started"]
            assert started and started[0]["cause"] == "stream_behind", started
            # Overload starts once the reader is behind by more than the mark; the log line
            # rounds to 0.1 ms, so 50.04 ms is logged as 50.0.
            assert started[0]["stream_behind_ms"] >= delay_ms, started
            guard.wait_event("overload_ended", 1, timeout=10)
        assert guard.stop() == 0


def test_an_unknown_sources_fast_stream_does_not_shed_the_peers_calls(stack: E2EStack) -> None:
    """Peers configured (127.0.0.1): one TCP connection from an unknown source (127.0.0.2)
    writes pipelined requests as fast as it can for 3 s, reading its 403s, so sipguard always
    finds more waiting on it. That says nothing of sipguard's load — it reads that stream in
    turn with the rest — so the peer's INVITEs meanwhile all reach the core, none hears 503,
    and no overload starts."""
    core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core.bind((HOST, 0))
    with core:
        guard, port = stack.sipguard(
            core_port=core.getsockname()[1], listen=("udp", "tcp"),
            config_extra="peers:\n  - name: carrier\n    networks: [127.0.0.1/32]\n",
        )
        target = (HOST, port)
        one = (b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;"
               b"branch=z9hG4bK-f1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: f1\r\n"
               b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        blob = one * 500
        stop = threading.Event()
        answers = bytearray()

        def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.2", 0))
                s.connect(target)
                reader = threading.Thread(target=_read_stream, args=(s, answers, 1.0, 10.0))
                reader.start()
                s.settimeout(0.5)
                end = time.monotonic() + 3.0
                while time.monotonic() < end and not stop.is_set():
                    try:
                        s.sendall(blob)
                    except (TimeoutError, OSError):
                        break
                reader.join(12)

        flooder = threading.Thread(target=flood)
        flooder.start()
        heard: list[bytes] = []
        forwarded: list[bytes] = []
        try:
            time.sleep(0.5)
            for _ in range(10):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((HOST, 0))
                    udp.sendto(RawUdpCaller(udp.getsockname()[1], target).invite_bytes(), target)
                    heard += _drain(udp, 0.15)
                time.sleep(0.05)
            forwarded = [d for d in _drain(core, 0.5) if d.startswith(b"INVITE ")]
        finally:
            stop.set()
            flooder.join(15)
        assert answers.count(b"SIP/2.0 403") > 500, len(answers)  # it was read, and refused
        assert not [h for h in heard if h.startswith(b"SIP/2.0 503")]
        assert len(forwarded) >= 10, (len(forwarded), guard.diagnostics())
        assert not [e for e in guard.events if e.get("event") == "overload_started"]
