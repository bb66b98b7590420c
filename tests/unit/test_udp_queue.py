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
