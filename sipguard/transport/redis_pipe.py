"""One pipelined Redis connection for the INVITE path: commands out, replies back in order.

redis-py is the client for everything else (connecting to Sentinel and Cluster, re-scoring,
releases, pub/sub); for the one command every INVITE sends — ``EVALSHA`` of the admission
script — its per-command machinery (a pooled connection checked out and back, a command
object, its own parser loop) cost about 270 µs of CPU per call here, more than the rest of
sipguard's work on a call. This connection costs about 30–70 µs: commands are packed by
hiredis, the commands of one event-loop pass go out in one write, replies are parsed by
hiredis's C reader and handed to the waiting futures in order (RESP answers in order on one
connection). ``loadtest/run.py --paths sipguard,redis`` measures the difference.

Used for a single server (``redis://``, ``rediss://``, ``unix://``); Sentinel and Cluster go
through redis-py. The connection opens on first use and again after it is lost; a lost
connection fails every command in flight (the caller's breaker counts it). Commands in flight
are bounded (``max_inflight``): beyond it a call fails at once instead of queueing without
end behind a Redis that stopped answering.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url


class PipeError(ConnectionError):
    """The connection failed, was lost, or has too much in flight."""


class RespPipe(asyncio.Protocol):
    """A lazily (re)connected, pipelined RESP connection."""

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0,
                 max_inflight: int = 10_000, scripts: tuple[str, ...] = ()) -> None:
        opts = parse_url(url)
        self.path: str | None = opts.get("path")
        self.host: str = opts.get("host", "127.0.0.1")
        self.port: int = int(opts.get("port", 6379))
        self.db = int(opts.get("db") or 0)
        self.username: str | None = opts.get("username")
        self.password: str | None = opts.get("password")
        cls = opts.get("connection_class")
        self.tls = cls is SSLConnection
        if cls is UnixDomainSocketConnection and self.path is None:
            raise ValueError("unix:// URL without a path")
        self.connect_timeout_s = connect_timeout_s
        self.max_inflight = max_inflight
        self.scripts = scripts  # loaded on every (re)connect: EVALSHA then finds them
        self._transport: asyncio.Transport | None = None
        # set once the connection is logged in and the scripts are loaded: only then may
        # commands be queued (the replies of the set-up commands come first, in order)
        self._ready = False
        self._connecting: asyncio.Future[None] | None = None
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False

    # ------------------------------------------------------------------ calls
    async def call(self, *args: Any) -> Any:
        """Send one command; its reply (a ``hiredis.ReplyError`` is returned, not raised)."""
        if not self._ready:
            await self._connect()
        return await self.send(*args)

    def send(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command on the open connection without a coroutine; the future gets the
        reply. Raises PipeError when the connection is not open (use :meth:`call` to open
        it) or too much is in flight."""
        if not self._ready:
            raise PipeError("Redis connection not open")
        if len(self._waiting) >= self.max_inflight:
            raise PipeError(f"{len(self._waiting)} Redis commands in flight")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(fut)
        self._out.append(hiredis.pack_command(args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    @property
    def connected(self) -> bool:
        return self._ready

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(b"".join(out))

    async def _connect(self) -> None:
        if self._connecting is not None:
            await asyncio.shield(self._connecting)
            if not self._ready:
                raise PipeError("cannot connect to Redis")
            return
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    await loop.create_unix_connection(lambda: self, self.path)
                else:
                    context = ssl.create_default_context() if self.tls else None
                    await loop.create_connection(lambda: self, self.host, self.port,
                                                 ssl=context)
                hello: list[tuple[Any, ...]] = []
                if self.password is not None:
                    hello.append(("AUTH", self.username, self.password) if self.username
                                 else ("AUTH", self.password))
                if self.db:
                    hello.append(("SELECT", self.db))
                hello.extend(("SCRIPT", "LOAD", script) for script in self.scripts)
                for command in hello:
                    reply = await self._raw(command)
                    if isinstance(reply, hiredis.ReplyError):
                        raise PipeError(f"{command[0]}: {reply}")
                if self._transport is None:
                    raise PipeError("connection lost while setting up")
                self._ready = True
        except (OSError, TimeoutError, PipeError) as exc:
            self.close()
            raise PipeError(f"cannot connect to Redis: {exc!r}") from None
        finally:
            self._connecting.set_result(None)
            self._connecting = None

    async def _raw(self, command: tuple[Any, ...]) -> Any:
        assert self._transport is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._transport.write(hiredis.pack_command(command))
        return await fut

    def close(self) -> None:
        self._ready = False
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        self._fail_all()

    def _fail_all(self) -> None:
        waiting, self._waiting = self._waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(PipeError("Redis connection lost"))
        self._out.clear()
        self._reader = hiredis.Reader()

    # ------------------------------------------------------------------ protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                self.close()
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.close()
                return
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._ready = False
        self._transport = None
        self._fail_all()
