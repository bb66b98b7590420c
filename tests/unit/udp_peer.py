"""A UDP peer for the unit tests that run a real Server on 127.0.0.1: a caller or a core."""

from __future__ import annotations

import asyncio
import socket


class Peer:
    """A non-blocking UDP socket on 127.0.0.1 read through the event loop."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])

    async def recv(self, timeout: float = 2.0) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)

    async def recv_until(self, prefix: bytes, timeout: float = 2.0) -> bytes:
        """The first datagram starting with ``prefix`` (others are skipped)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            data = await self.recv(max(0.01, end - loop.time()))
            if data.startswith(prefix):
                return data
