"""UDP endpoint: datagrams in, straight to the proxy; datagrams out on the same socket.

Each datagram is processed inline in ``datagram_received`` — no per-datagram task or queue.
The kernel's receive buffer (``sip.udp_receive_buffer``) is the bounded queue: under overload
the kernel drops and counts datagrams, which is the cheapest place to shed load, and the proxy
never holds more than one datagram at a time.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

Handler = Callable[[bytes, tuple[str, int], int], None]


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, index: int, handler: Handler) -> None:
        self.index = index
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.handler(data, (addr[0], addr[1]), self.index)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: nothing to do for a datagram proxy.
        pass

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def open_udp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, index: int, handler: Handler,
    rcvbuf: int,
) -> UdpEndpoint:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    _, protocol = await loop.create_datagram_endpoint(lambda: UdpEndpoint(index, handler), sock=sock)
    return protocol
