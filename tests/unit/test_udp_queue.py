"""UdpEndpoint.receive_queue reads the kernel's view of a real socket's receive queue."""

from __future__ import annotations

import socket
import sys

import pytest

from sipguard.transport.udp import UdpEndpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_MEMINFO is Linux only")


def test_receive_queue_reports_fill_and_drops() -> None:
    """An unread socket fills up, then the kernel drops and counts; reading empties it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, sender:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.bind(("127.0.0.1", 0))
        ep = UdpEndpoint(0, lambda data, addr, local: None, sock)
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
        ep = UdpEndpoint(0, lambda data, addr, local: order.append(data.decode()), sock)
        ep.datagram_received(b"unwatched", ("127.0.0.1", 5060))  # no watcher yet: handled only
        ep.watch = lambda: order.append("check")
        for i in range(2 * WATCH_EVERY):
            ep.datagram_received(str(i).encode(), ("127.0.0.1", 5060))
    checks = [i for i, what in enumerate(order) if what == "check"]
    assert len(checks) == 2, order
    # The check comes before the WATCH_EVERY-th datagram read (the unwatched one counts).
    assert order[checks[0] + 1] == str(WATCH_EVERY - 2)
    assert order.count("check") == 2 and len(order) == 2 * WATCH_EVERY + 1 + 2
