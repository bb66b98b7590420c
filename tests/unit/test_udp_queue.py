"""UdpEndpoint.receive_queue reads the kernel's view of a real socket's receive queue."""

from __future__ import annotations

import socket
import sys
import time
from collections import Counter

import pytest
import structlog

from sipguard.transport.udp import UdpEndpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_MEMINFO is Linux only")


def test_receive_queue_reports_fill_and_drops() -> None:
    """An unread socket fills up, then the kernel drops and counts; reading empties it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, sender:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.bind(("127.0.0.1", 0))
        ep = UdpEndpoint(0, lambda data, flow: None, sock)
        assert ep.receive_queue() == (0.0, 0)
        for _ in range(500):
            sender.sendto(b"x" * 600, sock.getsockname())
        state = ep.receive_queue()
        assert state is not None
        fill, drops = state
        assert 0.5 < fill <= 1.0 and drops > 0
        sock.setblocking(False)
        while True:
            try:
                sock.recv(2048)
            except BlockingIOError:
                break
        assert ep.receive_queue() == (0.0, drops)


def test_overload_check_runs_every_watch_every_datagrams_before_the_handler() -> None:
    """The watcher is asked after every WATCH_EVERY datagrams, before that datagram is handled,
    so a burst that fills the queue between two timer ticks is shed from that datagram on."""
    from sipguard.transport.udp import WATCH_EVERY

    order: list[str] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        ep = UdpEndpoint(0, lambda data, flow: order.append(data.decode()), sock)
        ep.datagram_received(b"unwatched", ("127.0.0.1", 5060))  # no watcher yet: handled only
        ep.watch = lambda: order.append("check")
        for i in range(2 * WATCH_EVERY):
            ep.datagram_received(str(i).encode(), ("127.0.0.1", 5060))
    checks = [i for i, what in enumerate(order) if what == "check"]
    assert len(checks) == 2, order
    # The check comes before the WATCH_EVERY-th datagram read (the unwatched one counts).
    assert order[checks[0] + 1] == str(WATCH_EVERY - 2)
    assert order.count("check") == 2 and len(order) == 2 * WATCH_EVERY + 1 + 2


def test_arrival_delay_is_the_wait_in_the_kernel_queue() -> None:
    """The kernel's arrival stamp of the datagram read last: a datagram left unread for
    0.25 s waited that long; one read at once did not; an empty queue resets the delay."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, sender:
        sock.bind(("127.0.0.1", 0))
        ep = UdpEndpoint(0, lambda data, flow: None, sock)
        assert ep.stamped and ep.delay == 0.0
        # Linux turns arrival stamps on for the whole system from a work queue: a datagram
        # that arrives before that has run is stamped when it is read. Let it run first.
        time.sleep(0.05)
        sender.sendto(b"old", sock.getsockname())
        time.sleep(0.25)
        assert sock.recv(100) == b"old"
        assert 0.2 < ep.arrival_delay() < 5.0
        sender.sendto(b"new", sock.getsockname())
        time.sleep(0.01)
        assert sock.recv(100) == b"new"
        assert ep.arrival_delay() < 0.15
        ep.delay = 0.3
        assert ep.receive_queue() == (0.0, 0) and ep.delay == 0.0  # nothing waits


@pytest.mark.parametrize("mark", [0.2, None], ids=["delay_mark", "delay_mark_off"])
def test_queue_delay_past_the_mark_starts_overload_and_an_empty_queue_ends_it(
    mark: float | None,
) -> None:
    """Datagrams that waited 0.3 s, far below any fill mark: the check made at the
    WATCH_EVERY-th read measures the wait and turns overload on (cause queue_delay); once
    the queue is read empty it ends. With the delay mark off the same wait does nothing."""
    from structlog.testing import capture_logs

    from sipguard.ops.overload import OverloadWatcher
    from sipguard.transport.udp import WATCH_EVERY

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, sender, capture_logs() as logs:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        ep = UdpEndpoint(0, lambda data, flow: None, sock)
        watcher = OverloadWatcher(Counter(), structlog.get_logger())
        states: list[bool] = []
        ep.watch = lambda: states.append(watcher.check([ep], 0.5, 0.1, mark))
        for _ in range(2 * WATCH_EVERY):
            sender.sendto(b"x" * 500, sock.getsockname())
        time.sleep(0.3)
        for _ in range(2 * WATCH_EVERY):  # read as the loop does: each handled at once
            ep.datagram_received(sock.recv(2048), ("127.0.0.1", 5060))
        assert states == [mark is not None] * 2, states
        if mark is not None:
            assert watcher.queue_delay > 0.25 and watcher.queue_fill < 0.5
            started = [e for e in logs if e["event"] == "overload_started"]
            assert len(started) == 1 and started[0]["cause"] == "queue_delay", logs
        assert watcher.check([ep], 0.5, 0.1, mark) is False  # read empty: over
        assert watcher.queue_delay == 0.0
        assert watcher.counters["overload_started"] == (1 if mark is not None else 0)


def test_a_stream_reader_behind_past_the_mark_starts_overload_until_it_catches_up() -> None:
    """The watcher's TCP input: a reader behind for longer than the delay mark starts
    overload (cause stream_behind) with every UDP queue empty; it ends only once that time is
    under a quarter of the mark; with the mark off it counts for nothing."""
    from structlog.testing import capture_logs

    from sipguard.ops.overload import OverloadWatcher

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, capture_logs() as logs:
        sock.bind(("127.0.0.1", 0))
        ep = UdpEndpoint(0, lambda data, flow: None, sock)
        watcher = OverloadWatcher(Counter(), structlog.get_logger())
        assert watcher.check([ep], 0.5, 0.1, 0.3, stream_behind=0.29) is False
        assert watcher.check([ep], 0.5, 0.1, 0.3, stream_behind=0.31) is True
        assert watcher.stream_behind == 0.31
        started = [e for e in logs if e["event"] == "overload_started"]
        assert started[0]["cause"] == "stream_behind" and started[0]["stream_behind_ms"] == 310
        assert watcher.check([ep], 0.5, 0.1, 0.3, stream_behind=0.1) is True  # not caught up
        assert watcher.check([ep], 0.5, 0.1, 0.3, stream_behind=0.0) is False
        assert [e["event"] for e in logs].count("overload_ended") == 1
        assert watcher.check([ep], 0.5, 0.1, None, stream_behind=5.0) is False


def test_one_flow_per_source_and_the_flow_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Datagrams from one source share one Flow (no new objects per message); datagrams from
    more sources than FLOWS_MAX empty the table instead of growing it; every datagram is still
    handed over with its own source."""
    import asyncio

    import sipguard.transport.udp as udp
    from sipguard.contract import Flow

    monkeypatch.setattr(udp, "FLOWS_MAX", 8)
    got: list[tuple[bytes, Flow]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ep = await udp.open_udp(loop, "127.0.0.1", 0, 3, lambda d, f: got.append((d, f)), 65536)
        port = ep.sock.getsockname()[1]
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
        try:
            for i, s in enumerate(senders):
                s.sendto(f"a{i}".encode(), ("127.0.0.1", port))
                s.sendto(f"b{i}".encode(), ("127.0.0.1", port))
            for _ in range(200):
                if len(got) == 40:
                    break
                await asyncio.sleep(0.01)
            assert len(ep._flows) <= 8
        finally:
            if ep.transport is not None:
                ep.transport.close()
            ports = {s.getsockname()[1] for s in senders}
            for s in senders:
                s.close()
            assert {f.addr[1] for _, f in got} == ports

    asyncio.run(run())
    assert len(got) == 40
    by_data = dict(got)
    for i in range(20):
        a, b = by_data[f"a{i}".encode()], by_data[f"b{i}".encode()]
        assert a == Flow("udp", ("127.0.0.1", a.addr[1]), 3)
        assert b is a  # sent back to back from one source: the one Flow object
