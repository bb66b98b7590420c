"""TCP endpoints: listeners, outbound connections to the core and peers, and reuse of both.

Every connection has a :class:`~sipguard.sip.framing.StreamFramer`; framed messages go to the
proxy with the connection's id, so responses travel back on the connection the request came
on. Requests toward an address reuse any live connection to it (inbound or outbound) before
opening a new one; bytes sent while a connection is still opening wait in its buffer. A CRLFCRLF
keep-alive is answered with CRLF (RFC 5626 §3.5.1). A stream that cannot be framed is closed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from sipguard.sip.errors import SipParseError
from sipguard.sip.framing import PING, StreamFramer

MessageHandler = Callable[[bytes, tuple[str, int], int, int], None]  # data, addr, local, conn
ErrorHandler = Callable[[SipParseError, tuple[str, int], int], None]

_ids = itertools.count(1)


class TcpConnection(asyncio.Protocol):
    def __init__(self, pool: TcpPool, local: int, max_size: int) -> None:
        self.pool = pool
        self.local = local
        self.id = next(_ids)
        self.framer = StreamFramer(max_size)
        self.transport: asyncio.Transport | None = None
        self.addr: tuple[str, int] = ("", 0)
        self.pending: list[bytes] = []
        self.last_active = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.addr = (peer[0], peer[1])
        self.last_active = self.pool.loop.time()
        self.pool.register(self)
        for data in self.pending:
            tr.write(data)  # type: ignore[attr-defined]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.pool.loop.time()
        try:
            items = self.framer.feed(data)
        except SipParseError as err:
            self.pool.on_error(err, self.addr, self.local)
            self.close()
            return
        for item in items:
            if item is PING:
                self.write(b"\r\n")
            else:
                assert isinstance(item, bytes)
                self.pool.on_message(item, self.addr, self.local, self.id)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.unregister(self)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.last_active = self.pool.loop.time()
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class TcpPool:
    """All TCP connections of one sipguard process, by id and by remote address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: MessageHandler,
        on_error: ErrorHandler,
        max_size: int,
    ) -> None:
        self.loop = loop
        self.on_message = on_message
        self.on_error = on_error
        self.max_size = max_size
        self.by_id: dict[int, TcpConnection] = {}
        self.by_addr: dict[tuple[str, int], TcpConnection] = {}
        self.servers: list[asyncio.Server] = []

    def register(self, conn: TcpConnection) -> None:
        self.by_id[conn.id] = conn
        self.by_addr[conn.addr] = conn

    def unregister(self, conn: TcpConnection) -> None:
        self.by_id.pop(conn.id, None)
        if self.by_addr.get(conn.addr) is conn:
            del self.by_addr[conn.addr]

    async def listen(self, host: str, port: int, local: int) -> None:
        server = await self.loop.create_server(
            lambda: TcpConnection(self, local, self.max_size), host, port, reuse_address=True
        )
        self.servers.append(server)

    def send(self, data: bytes, addr: tuple[str, int], local: int, conn_id: int | None) -> None:
        """Send on connection ``conn_id`` if alive, else any connection to ``addr``, else a new one."""
        conn = self.by_id.get(conn_id) if conn_id is not None else None
        if conn is None or conn.closed:
            conn = self.by_addr.get(addr)
        if conn is None or conn.closed:
            conn = TcpConnection(self, local, self.max_size)
            conn.addr = addr
            self.by_addr[addr] = conn
            conn.pending.append(data)
            self.loop.create_task(self._connect(conn, addr))
            return
        conn.write(data)

    async def _connect(self, conn: TcpConnection, addr: tuple[str, int]) -> None:
        try:
            await self.loop.create_connection(lambda: conn, addr[0], addr[1])
        except OSError:
            conn.closed = True
            if self.by_addr.get(addr) is conn:
                del self.by_addr[addr]

    def close_idle(self, idle_s: float) -> int:
        cutoff = self.loop.time() - idle_s
        idle = [c for c in self.by_id.values() if c.last_active < cutoff]
        for conn in idle:
            conn.close()
        return len(idle)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.by_id.values()):
            conn.close()
        for server in self.servers:
            await server.wait_closed()
