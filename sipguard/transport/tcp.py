"""TCP endpoints: listeners, outbound connections to the core and peers, and reuse of both.

Every connection has a :class:`~sipguard.sip.framing.StreamFramer`; framed messages go to the
proxy with the connection's id, so responses travel back on the connection the request came
on. Requests toward an address reuse any live connection to it (inbound or outbound) before
opening a new one; bytes sent while a connection is still opening wait in its buffer. A CRLFCRLF
keep-alive is answered with CRLF (RFC 5626 §3.5.1). A stream that cannot be framed is closed.

Limits (:class:`TcpLimits`, the ``sip.tcp_*`` settings), each reported through
``on_event(kind, addr, n)`` when it bites — the shell counts ``kind`` and logs it sampled:

- **connections**: at most ``max_connections`` connections in all and
  ``max_connections_per_ip`` with one IP address (an IPv6 one with its network of
  ``ipv6_prefix`` bits, :mod:`sipguard.addresses`), whichever side opened them. Beyond, a new
  inbound connection is accepted and closed at once (``tcp_refused_total``,
  ``tcp_refused_per_ip``): the kernel has finished the handshake already, and a connection
  left in the backlog would hold its place there; a connection sipguard would open (to a
  party, for an answer whose connection has closed, or a request from the core) is not opened
  and the message dropped, counted the same. The ``exempt`` addresses (the core's) are
  neither capped nor counted. With peers configured (``is_peer``), a connection from a peer's
  networks is admitted beyond ``max_connections`` (its per-address cap still holds), so
  connections from unknown sources cannot lock the trunks out.
- **file descriptors**: the shell fits the pool to the process's open-files limit
  (:mod:`sipguard.ops.fdlimit`): ``fd_cap`` lowers ``max_connections`` when the limit is
  below what the config needs, and ``fd_room`` bounds every connection, the core's and
  peers' included; beyond either a connection is refused as above (``tcp_refused_total``), so
  the admin API and the rest of the process keep their descriptors. The pool accepts on its
  listeners itself (:class:`Listener`): when ``accept()`` still fails for lack of
  descriptors (EMFILE, ENFILE) or kernel memory, it closes the one descriptor it holds in
  reserve, accepts and closes the connections waiting, and takes it again
  (``tcp_accept_failed``, per connection): a client is refused, not left in the backlog, and
  the listener accepts again as soon as descriptors are free.
- **first message**: with peers configured, a connection from an unknown source that brings
  no complete message within ``message_timeout_s`` of its accept is closed
  (``tcp_message_timeout``): an idle one must not hold its place for ``idle_timeout_s``.
- **slow messages**: a connection holding a partial message (bytes buffered, no complete
  message) for longer than ``message_timeout_s`` is closed (``tcp_message_timeout``; slowloris).
  Up to three buffered bytes do not count: they may be the start of a CRLFCRLF ping.
- **idle**: a connection with no complete SIP message, in either direction, for
  ``idle_timeout_s`` — counted from the last one, or from connect — is closed
  (``tcp_idle_closed``). CRLF keep-alives are answered but are not traffic here: otherwise a
  client sending nothing but pings would hold a connection (and its buffers) for ever. A peer
  that keeps a quiet connection on purpose (an RFC 5626 flow between REGISTERs, a long call
  without session timers) loses it after the timeout and opens a new one when it next sends;
  set ``idle_timeout_s`` above the longest quiet period such peers need.
- **write back-pressure**: when a connection's transport buffer holds more than
  ``write_buffer_max`` bytes (asyncio's ``pause_writing``), sipguard stops reading from it until
  the buffer is back under a quarter of that (``resume_writing``), so a client that never reads
  its answers cannot make sipguard queue more (``tcp_write_paused``). Still paused after
  ``write_stall_timeout_s``, or its buffer past four times ``write_buffer_max``, the connection
  is aborted, its buffer dropped (``tcp_write_stalled``, ``tcp_write_overflow``). Bytes waiting
  for an outbound connection to open are held up to ``write_buffer_max``; more are dropped
  (``tcp_send_dropped``).
- **outbound connect**: an outbound connection not open within ``connect_timeout_s``, or
  refused, is given up (``tcp_connect_failed``), and the messages that were waiting for it are
  dropped (``tcp_queued_dropped``, counted per message) and handed to ``undelivered`` (the
  proxy answers their requests at once, RFC 3261 §16.9); the next send tries again.
- **reader behind** (overload): after every read the connection asks the kernel how many
  bytes are still waiting on its socket (``FIONREAD``, one ioctl). More waiting after every
  read means sipguard reads that stream slower than it comes; the pool keeps since when each
  such connection has been behind (:meth:`TcpPool.behind_for`), and the overload watcher
  (:mod:`sipguard.ops.overload`) sheds new calls once one has been behind for longer than
  ``sip.overload_delay_ms`` — the stream's counterpart of a UDP queue's delay. TCP flow
  control keeps the backlog in the sender's buffers, where no fill share can be read, so
  time behind is what is measured. A connection paused for its own write back-pressure is not
  behind: a peer that does not read its answers cannot set off overload for everyone; nor is
  one from an unknown source (peers configured): a client sending faster than it is read
  (a stream of CRLF keep-alives) is read in turn with the others, and cannot make sipguard
  shed every trunk's calls.

The time-based limits are checked by :meth:`TcpPool.sweep`, which the pool runs every
:data:`SWEEP_S` seconds on its own.

TLS (RFC 3261 §26, RFC 5630) is TCP with an SSL context (:mod:`sipguard.transport.tls`, the
pool's ``tls``, replaced on reload): ``tls://`` listeners accept a TCP connection — the limits
above apply to it as to any — and then run the server handshake with the context current at
that moment (``loop.start_tls``), so a reloaded certificate serves every new connection. A
handshake not done within ``message_timeout_s``, or failed (no client certificate where one is
required, a bad one), closes the connection (``tls_handshake_failed``). Outbound TLS connections
verify the far end's certificate and name; a failure counts as ``tcp_connect_failed``. TLS and
TCP connections to one address are kept apart (``TcpConnection.tls``); a verified peer
certificate's subject CN and SAN DNS names are kept in ``TcpConnection.peer_names``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sipguard.addresses import source_key
from sipguard.sip.errors import SipParseError
from sipguard.sip.framing import PING, StreamFramer
from sipguard.transport.tls import TlsContexts, peer_names

MessageHandler = Callable[[bytes, tuple[str, int], int, int], None]  # data, addr, local, conn
# (the error, the source, the listener, the header block of the message it is about when that
# came whole — see StreamFramer.error_head — and the connection's id)
ErrorHandler = Callable[[SipParseError, tuple[str, int], int, bytes | None, int], None]
EventHandler = Callable[[str, tuple[str, int], int], None]  # kind, remote address, count

if sys.platform == "linux":
    from fcntl import ioctl
    from termios import FIONREAD

SWEEP_S = 1.0  # how often the time-based limits are checked
# A reader behind calls the overload check at most this often (besides its 50 ms timer), so
# overload starts within a long pass of reads rather than after it.
BEHIND_WATCH_S = 0.01
_INT = struct.Struct("i")
_NO_INT = bytes(_INT.size)
PARTIAL_MIN = 3  # buffered bytes that may be a ping's first half, not a partial message
HARD_CAP_FACTOR = 4  # abort a paused connection whose buffer passes this × write_buffer_max
ACCEPT_BATCH = 64  # connections accepted per wake-up of a listener; then the loop runs on
ACCEPT_RETRY_S = 0.5  # accepting paused this long when accept() failed and none could be shed
# accept() failing for lack of descriptors (EMFILE: the process's, ENFILE: the system's) or of
# kernel memory: the connection stays in the backlog, and the listener stays readable
_NO_ROOM = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() reporting an error of the connection it was to return (accept(2), "Error handling"):
# that connection is gone, the next one is taken
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ENOPROTOOPT, errno.EHOSTDOWN,
                   getattr(errno, "ENONET", errno.ENETDOWN), errno.EHOSTUNREACH,
                   errno.EOPNOTSUPP, errno.ENETUNREACH, errno.ENETDOWN, errno.EPERM,
                   errno.EINTR})

_ids = itertools.count(1)
# struct tcp_info's tcpi_unacked and tcpi_sacked (bytes 24-31): on a listening socket, Linux
# reports there the accept queue's length and its size
_TCP_INFO_QUEUE = struct.Struct("II")


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting to be accepted, the queue's size) of a listening socket; None
    where the kernel does not say (not Linux)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except (OSError, AttributeError):
        return None
    if len(raw) < 32:
        return None
    waiting, size = _TCP_INFO_QUEUE.unpack_from(raw, 24)
    return waiting, size


def listen_overflows() -> float | None:
    """The kernel's count of connections a full accept queue turned away (TcpExt
    ListenOverflows in /proc/net/netstat: this network namespace, every listener, since boot);
    None where it cannot be read."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
    except OSError:
        return None
    if len(lines) != 2 or "ListenOverflows" not in lines[0]:
        return None
    return float(lines[1][lines[0].index("ListenOverflows")])


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """The pool's limits; the defaults are the config's (``sip.tcp_*``)."""

    max_connections: int = 4096
    max_connections_per_ip: int = 64
    message_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0
    write_buffer_max: int = 1048576
    write_stall_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    exempt: frozenset[str] = frozenset()  # remote IPs neither capped nor counted (the core)
    ipv6_prefix: int = 64  # an IPv6 source is capped with its network of this many bits
    listen_backlog: int = 1024  # a listener's accept queue (listen(2); somaxconn caps it)


class TcpConnection(asyncio.Protocol):
    def __init__(
        self, pool: TcpPool, local: int, max_size: int, inbound: bool = True, tls: bool = False
    ) -> None:
        self.pool = pool
        self.local = local
        self.id = next(_ids)
        self.framer = StreamFramer(max_size)
        self.transport: asyncio.Transport | None = None
        self.addr: tuple[str, int] = ("", 0)
        self.inbound = inbound
        self.tls = tls
        self.peer_names: tuple[str, ...] = ()  # a verified TLS peer certificate's CN, SAN DNS
        self.raw: asyncio.BaseTransport | None = None  # the TCP transport of a TLS handshake
        self.counted = False  # holds a place in the pool's inbound counts
        self.admitted = False  # let in by the pool's accept (TcpPool.accepted)
        # from no configured peer, and no complete message yet: closed when none comes
        # within the message timeout (an idle connection must not hold a place for 10 min)
        self.awaiting_first = False
        # from no configured peer (peers configured): its reader falling behind says nothing
        # of sipguard's load — one client sending faster than it is read would otherwise shed
        # every trunk's new calls ("reader behind" above)
        self.unknown = False
        self.count_key = ""  # ... under this key of ``per_ip`` (sipguard.addresses)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.last_message = 0.0  # loop time of the last complete message either way, or connect
        self.partial_since: float | None = None  # a partial message is buffered since then
        self.paused_since: float | None = None  # reading paused for a full write buffer since
        self.fd = -1  # the socket's descriptor, for FIONREAD (-1: not asked)
        self.closed_at = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        pool = self.pool
        if peer is None:
            # reset by the other side before the loop got to it (no peer address left):
            # nothing to serve; its place, if it took one, goes back in connection_lost
            self.closed = True
            self.closed_at = pool.loop.time()
            pool.event("tcp_reset_at_connect", self.addr)
            transport.close()
            return
        self.addr = (peer[0], peer[1])
        self.last_message = pool.loop.time()
        if self.inbound and not self.admitted and not pool.admit(self):
            self.closed = True
            self.closed_at = self.last_message
            transport.close()
            return
        if self.inbound and self.tls:
            # TCP is up: the TLS handshake follows; until it is done sends wait in pending.
            # Reading stops at once: the handshake starts on a later pass of the loop, and a
            # ClientHello read before then would reach this (plain) protocol and be lost —
            # start_tls resumes reading under TLS.
            transport.pause_reading()  # type: ignore[attr-defined]
            self.raw = transport
            pool.register(self)
            pool.start_handshake(self, transport)
            return
        self.tls_ready(transport)

    def tls_ready(self, transport: asyncio.BaseTransport) -> None:
        """The connection carries SIP from now on (TCP connected, or TLS handshake done)."""
        self.transport = tr = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.raw = None
        sock = tr.get_extra_info("socket")
        if sock is not None and sys.platform == "linux":
            self.fd = sock.fileno()
        pool = self.pool
        if self.tls:
            self.peer_names = peer_names(transport.get_extra_info("peercert"))
        high = pool.limits.write_buffer_max
        tr.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[attr-defined]
        pool.register(self)
        for data in self.pending:
            tr.write(data)  # type: ignore[attr-defined]
        self.pending.clear()
        self.pending_bytes = 0

    def data_received(self, data: bytes) -> None:
        pool = self.pool
        if self.fd >= 0:
            self._note_backlog()
        framer = self.framer
        items = framer.feed(data)
        now = -1.0
        for item in items:
            if item is PING:
                self._write(b"\r\n")  # a pong is no traffic for the idle timeout
            else:
                assert isinstance(item, bytes)
                if now < 0:
                    now = self.last_message = pool.loop.time()
                    self.awaiting_first = False
                pool.on_message(item, self.addr, self.local, self.id)
        if framer.error is not None:  # what came before it is delivered; the rest is lost
            # (its answer, if it gets one, is written before the close: close() sends what
            # is buffered first)
            pool.on_error(framer.error, self.addr, self.local, framer.error_head, self.id)
            self.close()
            return
        if framer.buffered <= PARTIAL_MIN:
            self.partial_since = None
        elif items or self.partial_since is None:
            self.partial_since = now if now >= 0 else pool.loop.time()

    def _note_backlog(self) -> None:
        """After a read: bytes still waiting on the socket mean the reader is behind (see
        "reader behind" above); none, that it has caught up."""
        try:
            waiting = _INT.unpack(ioctl(self.fd, FIONREAD, _NO_INT))[0]
        except OSError:  # closed meanwhile
            waiting = 0
        pool = self.pool
        if waiting > 0 and self.paused_since is None and not self.unknown:
            if self.id not in pool.behind:
                pool.behind[self.id] = pool.loop.time()
            pool.watch_behind()
        else:
            pool.behind.pop(self.id, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.unregister(self)

    def pause_writing(self) -> None:
        pool = self.pool
        self.paused_since = pool.loop.time()
        pool.behind.pop(self.id, None)  # not read on purpose: no sign of overload
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.pause_reading()
        pool.event("tcp_write_paused", self.addr)

    def resume_writing(self) -> None:
        self.paused_since = None
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.resume_reading()

    def write(self, data: bytes) -> None:
        """Send a SIP message: traffic for the idle timeout."""
        self.last_message = self.pool.loop.time()
        self._write(data)

    def _write(self, data: bytes) -> None:
        tr = self.transport
        if tr is None:
            if self.closed:
                return
            limit = self.pool.limits.write_buffer_max
            if self.pending_bytes + len(data) > limit:
                self.pool.event("tcp_send_dropped", self.addr)
                return
            self.pending.append(data)
            self.pending_bytes += len(data)
            return
        if self.closed:
            return
        tr.write(data)
        if self.paused_since is not None and tr.get_write_buffer_size() > (
            HARD_CAP_FACTOR * self.pool.limits.write_buffer_max
        ):
            self.pool.event("tcp_write_overflow", self.addr)
            self.abort()

    def close(self) -> None:
        """Close after what is buffered is sent (the sweep aborts it if that never happens)."""
        tr = self.transport or self.raw
        if tr is not None and not self.closed:
            self.closed_at = self.pool.loop.time()
            tr.close()
        self.closed = True

    def abort(self) -> None:
        """Close at once, dropping whatever is buffered."""
        tr = self.transport or self.raw
        if tr is not None:
            tr.abort()  # type: ignore[attr-defined]
        self.closed = True


class TcpPool:
    """All TCP connections of one sipguard process, by id and by remote address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: MessageHandler,
        on_error: ErrorHandler,
        max_size: int,
        limits: TcpLimits | None = None,
        on_event: EventHandler | None = None,
    ) -> None:
        self.loop = loop
        self.on_message = on_message
        self.on_error = on_error
        self.on_event = on_event
        self.max_size = max_size
        self.limits = limits or TcpLimits()
        self.by_id: dict[int, TcpConnection] = {}
        self.by_addr: dict[tuple[str, int], TcpConnection] = {}
        self.tls_by_addr: dict[tuple[str, int], TcpConnection] = {}
        self.tls: TlsContexts | None = None  # set by the shell; replaced on reload
        self.servers: list[Listener] = []
        # The file-descriptor limit's share (sipguard.ops.fdlimit, set by the shell; None: no
        # bound): ``fd_room`` connections in all, whoever they are with — the core's and
        # peers' too —, and ``fd_cap`` connections from parties (below max_connections when
        # the limit is lower than the config needs), so that the admin API, the listeners
        # and the rest keep their descriptors.
        self.fd_room: int | None = None
        self.fd_cap: int | None = None
        # connections with a descriptor that are not in by_id yet: accepted ones being set
        # up, outbound ones connecting
        self.opening: dict[int, TcpConnection] = {}
        # one descriptor held in reserve: closed to accept and close the connections waiting
        # when accept() fails with EMFILE, so they are refused rather than left waiting
        self._spare = -1
        self.inbound = 0  # connections holding a place (exempt ones not included)
        self.per_ip: dict[str, int] = {}
        self._connecting: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = loop.call_later(SWEEP_S, self._tick)
        # Connections whose reader is behind, by id: since when (see "reader behind").
        self.behind: dict[int, float] = {}
        self.watch: Callable[[], None] | None = None  # the overload check (set by the shell)
        # the messages a failed outbound connect dropped (set by the shell: the proxy answers
        # their requests as RFC 3261 §16.9 asks, as if the next hop had said 503)
        self.undelivered: Callable[[list[bytes]], None] | None = None
        # Whether an address is in a configured peer's networks (set by the shell; it answers
        # None when no peers are configured: every source is served alike). A peer's
        # connection is admitted beyond max_connections (its per-address cap still holds):
        # connections from unknown sources must not lock the trunks out. An unknown source's
        # connection must bring a complete message within message_timeout_s.
        self.is_peer: Callable[[str], bool | None] | None = None
        self._watched = 0.0  # loop time of the last check a reader behind asked for

    def event(self, kind: str, addr: tuple[str, int], n: int = 1) -> None:
        if self.on_event is not None:
            self.on_event(kind, addr, n)

    def admit(self, conn: TcpConnection) -> bool:
        """Take a place for a new connection with ``conn.addr`` — one accepted, or one
        sipguard opens (an answer whose connection has closed goes to the party's Via port:
        a party must not make sipguard hold more connections to it than it may open) — or
        report why there is none."""
        ip = conn.addr[0]
        limits = self.limits
        room = self.fd_room
        if room is not None and len(self.by_id) + len(self.opening) >= room:
            self.event("tcp_refused_total", conn.addr)  # no descriptor left for it
            return False
        if ip in limits.exempt:
            return True
        peer = self.is_peer(ip) if self.is_peer is not None else None
        cap = limits.max_connections
        if self.fd_cap is not None and self.fd_cap < cap:
            cap = self.fd_cap
        if self.inbound >= cap and not peer:
            self.event("tcp_refused_total", conn.addr)
            return False
        # a peer's address on its own: a peer listed by address must not share its cap with
        # its neighbours in the /64
        key = ip if peer else source_key(ip, limits.ipv6_prefix)
        n = self.per_ip.get(key, 0)
        if n >= limits.max_connections_per_ip:
            self.event("tcp_refused_per_ip", conn.addr)
            return False
        self.per_ip[key] = n + 1
        self.inbound += 1
        conn.counted = True
        conn.count_key = key
        conn.awaiting_first = conn.inbound and peer is False
        conn.unknown = peer is False
        return True

    def register(self, conn: TcpConnection) -> None:
        self.by_id[conn.id] = conn
        self.opening.pop(conn.id, None)
        (self.tls_by_addr if conn.tls else self.by_addr)[conn.addr] = conn

    def behind_for(self) -> float:
        """Seconds the reader longest behind has been so (0.0: none is)."""
        behind = self.behind
        return self.loop.time() - min(behind.values()) if behind else 0.0

    def watch_behind(self) -> None:
        """A reader is behind: run the overload check, at most every BEHIND_WATCH_S."""
        if self.watch is not None:
            now = self.loop.time()
            if now - self._watched >= BEHIND_WATCH_S:
                self._watched = now
                self.watch()

    def unregister(self, conn: TcpConnection) -> None:
        self.by_id.pop(conn.id, None)
        self.opening.pop(conn.id, None)
        self.behind.pop(conn.id, None)
        table = self.tls_by_addr if conn.tls else self.by_addr
        if table.get(conn.addr) is conn:
            del table[conn.addr]
        self._release(conn)

    def _release(self, conn: TcpConnection) -> None:
        """Give back the place ``conn`` held in the connection counts, once."""
        if conn.counted:
            conn.counted = False
            self.inbound -= 1
            key = conn.count_key
            left = self.per_ip.get(key, 1) - 1
            if left > 0:
                self.per_ip[key] = left
            else:
                self.per_ip.pop(key, None)

    async def listen(
        self, host: str, port: int, local: int, tls: bool = False, reuse_port: bool = False
    ) -> None:
        """Listen for TCP (``tls``: TCP, then a TLS handshake with ``self.tls.server``).
        ``reuse_port``: SO_REUSEPORT, the address shared by the worker processes (the kernel
        spreads new connections over them). Raises OSError (the address in use, not local)."""
        if tls and (self.tls is None or self.tls.server is None):
            raise ValueError("a tls listener needs a server certificate (tls.cert_file)")
        socks = await bind_stream(self.loop, host, port, reuse_port, self.limits.listen_backlog)
        if self._spare < 0:
            self._spare = _open_spare()
        for sock in socks:
            self.servers.append(Listener(self, sock, local, tls))

    def accept_queue_fill(self) -> float:
        """The fullest listener's accept queue, as a share of its size (0.0: no listener, or
        the kernel does not say)."""
        fill = 0.0
        for listener in self.servers:
            if not listener.closed:
                got = accept_queue(listener.sock)
                if got is not None and got[1] > 0:
                    fill = max(fill, got[0] / got[1])
        return fill

    def relisten(self) -> None:
        """Every listener's accept queue resized to ``limits.listen_backlog`` (a reload):
        listen(2) again on a listening socket only changes its backlog."""
        for listener in self.servers:
            with contextlib.suppress(OSError):  # (a listener closed meanwhile)
                listener.sock.listen(self.limits.listen_backlog)

    def accepted(self, listener: Listener, sock: socket.socket, addr: tuple[str, int]) -> None:
        """A connection ``listener`` accepted: admitted (else closed at once, counted by
        :meth:`admit`) and handed to the event loop as a transport of a new
        :class:`TcpConnection`."""
        conn = TcpConnection(self, listener.local, self.max_size, tls=listener.tls)
        conn.addr = (addr[0], addr[1])
        if not self.admit(conn):
            sock.close()
            return
        conn.admitted = True
        self.opening[conn.id] = conn
        sock.setblocking(False)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        self._connecting.add(task)
        task.add_done_callback(partial(self._set_up, conn, sock))

    def _set_up(self, conn: TcpConnection, sock: socket.socket,
                task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        self._connecting.discard(task)
        if task.cancelled() or task.exception() is not None:  # (closed first: a stop)
            sock.close()
            conn.closed = True
            self.opening.pop(conn.id, None)
            self._release(conn)

    def no_room(self, listener: Listener) -> None:
        """accept() failed for lack of descriptors (or of kernel memory): the spare descriptor
        is closed for as long as it takes to accept and close the connections waiting (each
        counted as ``tcp_accept_failed``: refused, not left hanging in the backlog), then
        taken again. With none to close (or accept() failing still), accepting pauses for
        ACCEPT_RETRY_S, counted once: a listener left readable would spin the loop."""
        shed = 0
        last = listener.addr
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, addr = listener.sock.accept()
                except OSError:  # none left (EAGAIN), or no room even so
                    break
                sock.close()
                shed += 1
                last = (addr[0], addr[1])
            self._spare = _open_spare()
        self.event("tcp_accept_failed", last, max(shed, 1))
        if not shed:
            listener.pause(ACCEPT_RETRY_S)

    def start_handshake(self, conn: TcpConnection, raw: asyncio.BaseTransport) -> None:
        task = self.loop.create_task(self._handshake(conn, raw))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _handshake(self, conn: TcpConnection, raw: asyncio.BaseTransport) -> None:
        ctx = self.tls.server if self.tls is not None else None
        try:
            if ctx is None:
                raise ssl.SSLError("no server certificate")
            tr = await self.loop.start_tls(
                raw, conn, ctx, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.limits.message_timeout_s,
            )
        except OSError:  # a TLS error, the connection reset, or the handshake timed out
            self.event("tls_handshake_failed", conn.addr)
            conn.closed = True
            raw.abort()  # type: ignore[attr-defined]
            self.unregister(conn)
            return
        if tr is None or conn.closed:  # closed by a limit meanwhile
            if tr is not None:
                tr.abort()
            self.unregister(conn)
            return
        conn.tls_ready(tr)

    def send(
        self,
        data: bytes,
        addr: tuple[str, int],
        local: int,
        conn_id: int | None,
        tls: bool = False,
        host: str | None = None,
    ) -> None:
        """Send on connection ``conn_id`` if alive, else any connection to ``addr`` (a TLS one
        when ``tls``), else a new one (``host``: the name ``addr`` was resolved from, the name
        a TLS server's certificate must carry unless the contexts say otherwise)."""
        conn = self.by_id.get(conn_id) if conn_id is not None else None
        table = self.tls_by_addr if tls else self.by_addr
        if conn is None or conn.closed:
            conn = table.get(addr)
        if conn is None or conn.closed:
            conn = TcpConnection(self, local, self.max_size, inbound=False, tls=tls)
            conn.addr = addr
            if not self.admit(conn):  # the caps hold for sipguard's own connections too
                return
            table[addr] = conn
            self.opening[conn.id] = conn
            conn.write(data)
            task = self.loop.create_task(self._connect(conn, addr, host))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
            return
        conn.write(data)

    async def _connect(
        self, conn: TcpConnection, addr: tuple[str, int], host: str | None = None
    ) -> None:
        table = self.tls_by_addr if conn.tls else self.by_addr
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                if conn.tls:
                    if self.tls is None:
                        raise ssl.SSLError("no TLS contexts configured")
                    ctx, name = self.tls.for_target(addr, host)
                    await self.loop.create_connection(
                        lambda: conn, addr[0], addr[1], ssl=ctx, server_hostname=name,
                        ssl_handshake_timeout=self.limits.connect_timeout_s,
                    )
                else:
                    await self.loop.create_connection(lambda: conn, addr[0], addr[1])
        except OSError as exc:  # refused, unreachable, a TLS failure, TimeoutError (a subclass)
            conn.closed = True
            if table.get(addr) is conn:
                del table[addr]
            self.opening.pop(conn.id, None)
            self._release(conn)
            self.event("tcp_connect_failed", addr)
            if isinstance(exc, ssl.SSLCertVerificationError):
                # the far end's certificate (chain or name): tls.peers_ca_file / core_ca_file
                self.event("tls_verify_failed", addr)
            if conn.pending:
                self.event("tcp_queued_dropped", addr, len(conn.pending))
                dropped = conn.pending
                conn.pending = []
                conn.pending_bytes = 0
                if self.undelivered is not None:
                    self.undelivered(dropped)

    def _tick(self) -> None:
        self.sweep()
        if self._spare < 0 and self.servers:  # lost to a thread that took its number
            self._spare = _open_spare()
        self._sweeper = self.loop.call_later(SWEEP_S, self._tick)

    def sweep(self) -> None:
        """Apply the time-based limits: write stalls, slow messages, idle connections, and
        closed connections whose last bytes never drained (aborted after the message timeout)."""
        now = self.loop.time()
        limits = self.limits
        stall_cut = now - limits.write_stall_timeout_s
        message_cut = now - limits.message_timeout_s
        idle_cut = now - limits.idle_timeout_s
        for conn in list(self.by_id.values()):
            if conn.closed:
                if conn.closed_at < message_cut:
                    conn.abort()
            elif conn.paused_since is not None:
                if conn.paused_since < stall_cut:
                    self.event("tcp_write_stalled", conn.addr)
                    conn.abort()
            elif (conn.partial_since is not None and conn.partial_since < message_cut) or (
                conn.awaiting_first and conn.last_message < message_cut
            ):
                self.event("tcp_message_timeout", conn.addr)
                conn.close()
            elif conn.last_message < idle_cut:
                self.event("tcp_idle_closed", conn.addr)
                conn.close()

    def close_idle(self, idle_s: float) -> int:
        """Close the connections with no complete message for ``idle_s`` seconds (keep-alives
        do not count); return how many."""
        cutoff = self.loop.time() - idle_s
        idle = [c for c in self.by_id.values() if not c.closed and c.last_message < cutoff]
        for conn in idle:
            self.event("tcp_idle_closed", conn.addr)
            conn.close()
        return len(idle)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._connecting):
            task.cancel()
        for server in self.servers:
            server.close()
        for conn in list(self.by_id.values()):
            conn.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1


class Listener:
    """One listening socket, accepted from by the pool itself rather than by the event loop's
    server: a failed accept() is seen, counted and answered (:meth:`TcpPool.no_room`), and
    the listener goes on. asyncio's server stops reading a listener for a second on EMFILE
    and leaves the connections waiting; uvloop's (libuv) accepts and closes them unseen
    through a spare descriptor of its own, and without that spare (none could be opened when
    its first stream was made) retries accept() on every pass of the loop: thousands of
    failed calls a second, a CPU spent, the connections waiting all the same."""

    def __init__(self, pool: TcpPool, sock: socket.socket, local: int, tls: bool) -> None:
        self.pool = pool
        self.sock = sock
        self.local = local
        self.tls = tls
        name = sock.getsockname()
        self.addr: tuple[str, int] = (name[0], name[1])
        self._resume: asyncio.TimerHandle | None = None
        self.closed = False
        pool.loop.add_reader(sock.fileno(), self._ready)

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock]

    def _ready(self) -> None:
        pool = self.pool
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                if exc.errno in _NO_ROOM:
                    pool.no_room(self)
                else:  # not seen on Linux; paused as asyncio's server does
                    pool.event("tcp_accept_failed", self.addr)
                    self.pause(ACCEPT_RETRY_S)
                return
            pool.accepted(self, sock, addr)

    def pause(self, seconds: float) -> None:
        """Stop accepting for ``seconds``."""
        if self._resume is None and not self.closed:
            self.pool.loop.remove_reader(self.sock.fileno())
            self._resume = self.pool.loop.call_later(seconds, self._restart)

    def _restart(self) -> None:
        self._resume = None
        if not self.closed:
            self.pool.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            self.pool.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def bind_stream(
    loop: asyncio.AbstractEventLoop, host: str, port: int, reuse_port: bool, backlog: int,
) -> list[socket.socket]:
    """Listening TCP sockets on ``host:port``, as ``loop.create_server`` binds them: one per
    address ``host`` resolves to (SO_REUSEADDR; IPV6_V6ONLY on IPv6; SO_REUSEPORT when
    ``reuse_port``), non-blocking, each accepting ``backlog`` connections ahead. Raises
    OSError (every socket made closed)."""
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _open_spare() -> int:
    """A descriptor to hold in reserve (-1: none could be opened)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
