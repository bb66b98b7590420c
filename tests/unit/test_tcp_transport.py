"""TcpPool over real sockets on 127.0.0.1: framing per connection, errors, reuse, idle close,
and the limits (connection caps, message and idle timeouts, write back-pressure, connect
timeout).

No SIPp: the far ends are plain asyncio streams or sockets. The pool listens on port 0 (the
kernel picks a free port); clients bind 127.0.0.2 and up when a test needs other source
addresses (any 127/8 address is local on Linux). Every wait is bounded, so a missing message
fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from sipguard.sip.errors import SipParseError
from sipguard.transport import tcp
from sipguard.transport.tcp import TcpLimits, TcpPool, accept_queue, listen_overflows

LOCAL = 3  # the listener's index, as the shell numbers its endpoints
MAX_SIZE = 2048
TIMEOUT = 5.0


def msg(n: int, body: bytes = b"hello") -> bytes:
    """A complete SIP request with Content-Length, as a stream transport needs it."""
    return (
        b"MESSAGE sip:bob@192.0.2.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 192.0.2.7:5062;branch=z9hG4bK-" + str(n).encode() + b"\r\n"
        b"From: <sip:alice@192.0.2.7>;tag=a\r\nTo: <sip:bob@192.0.2.1>\r\n"
        b"Call-ID: c" + str(n).encode() + b"\r\nCSeq: 1 MESSAGE\r\n"
        b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        + body
    )


class Recorder:
    """The pool's three callbacks, recording what they were called with."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, tuple[str, int], int, int]] = []
        self.errors: list[tuple[SipParseError, tuple[str, int], int]] = []
        self.heads: list[bytes | None] = []  # the header block each error is about, if whole
        self.events: list[tuple[str, tuple[str, int], int]] = []

    def on_event(self, kind: str, addr: tuple[str, int], n: int) -> None:
        self.events.append((kind, addr, n))

    def count(self, kind: str) -> int:
        return sum(n for k, _, n in self.events if k == kind)

    def on_message(self, data: bytes, addr: tuple[str, int], local: int, conn: int) -> None:
        self.messages.append((data, addr, local, conn))

    def on_error(self, err: SipParseError, addr: tuple[str, int], local: int,
                 head: bytes | None, conn: int) -> None:
        self.errors.append((err, addr, local))
        self.heads.append(head)


class Listening:
    """A TcpPool listening on 127.0.0.1, its recorder and the port the kernel gave it."""

    def __init__(self, pool: TcpPool, rec: Recorder, port: int) -> None:
        self.pool = pool
        self.rec = rec
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []  # every client, closed at teardown

    async def connect(
        self, source: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(source, 0)
        )
        self.writers.append(writer)
        return reader, writer


async def until(cond: Callable[[], bool]) -> None:
    """Wait until ``cond()`` holds, failing after TIMEOUT seconds."""
    async with asyncio.timeout(TIMEOUT):
        while not cond():
            await asyncio.sleep(0.005)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the other end closed the connection (EOF, or a reset)."""
    try:
        async with asyncio.timeout(TIMEOUT):
            return await reader.read(65536) == b""
    except ConnectionResetError:
        return True


@contextlib.asynccontextmanager
async def listening_with(limits: TcpLimits) -> AsyncIterator[Listening]:
    """A pool with these limits listening on 127.0.0.1; every client closed at the end."""
    rec = Recorder()
    pool = TcpPool(
        asyncio.get_running_loop(), rec.on_message, rec.on_error, MAX_SIZE, limits, rec.on_event
    )
    await pool.listen("127.0.0.1", 0, LOCAL)
    port = pool.servers[0].sockets[0].getsockname()[1]
    ends = Listening(pool, rec, port)
    try:
        yield ends
    finally:
        for writer in ends.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await pool.close()


@pytest.fixture
async def listening() -> AsyncIterator[Listening]:
    async with listening_with(TcpLimits()) as ends:
        yield ends


@pytest.fixture
def fast_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool checks its time-based limits every 20 ms instead of every second."""
    monkeypatch.setattr(tcp, "SWEEP_S", 0.02)


async def test_pipelined_messages_in_one_write_come_out_one_by_one(listening: Listening) -> None:
    """Three messages in one write reach on_message as three messages, in order, with the
    client's address, the listener's index and the id of the connection they came on."""
    reader, writer = await listening.connect()
    a, b, c = msg(1, b"first\r\n\r\nCRLFCRLF inside the body"), msg(2, b""), msg(3)
    writer.write(a + b + c)
    await until(lambda: len(listening.rec.messages) == 3)
    client = writer.get_extra_info("sockname")
    assert [m[0] for m in listening.rec.messages] == [a, b, c]
    assert {m[1:] for m in listening.rec.messages} == {
        ((client[0], client[1]), LOCAL, listening.rec.messages[0][3])
    }
    assert list(listening.pool.by_id) == [listening.rec.messages[0][3]]


async def test_a_message_split_over_several_writes_comes_out_once_complete(
    listening: Listening,
) -> None:
    """A message written in pieces (cut inside a header line, inside the CRLFCRLF and inside
    the body) is delivered once, whole, only after its last byte."""
    reader, writer = await listening.connect()
    data = msg(1, b"0123456789")
    cuts = [0, 20, data.index(b"\r\n\r\n") + 2, len(data) - 4, len(data)]
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        writer.write(data[lo:hi])
        await writer.drain()
        await asyncio.sleep(0.05)  # each piece is its own read on the other end
        if hi < len(data):
            assert listening.rec.messages == []
    await until(lambda: len(listening.rec.messages) == 1)
    assert listening.rec.messages[0][0] == data


async def test_an_oversized_message_closes_the_connection_and_reports_513(
    listening: Listening,
) -> None:
    """A Content-Length above the maximum message size is reported as a 513 through on_error,
    with the sender's address, and the connection is closed and forgotten."""
    reader, writer = await listening.connect()
    writer.write(msg(1, b"x" * (MAX_SIZE + 1)))
    assert await closed_by_peer(reader)
    client = writer.get_extra_info("sockname")
    assert [(e.status, addr, local) for e, addr, local in listening.rec.errors] == [
        (513, (client[0], client[1]), LOCAL)
    ]
    assert listening.rec.messages == []
    assert listening.rec.heads == [msg(1, b"x" * (MAX_SIZE + 1)).split(b"\r\n\r\n")[0]]
    await until(lambda: not listening.pool.by_id and not listening.pool.by_addr)


async def test_an_endless_header_block_closes_the_connection(listening: Listening) -> None:
    """Bytes that never reach an empty line are cut off once they exceed the maximum size
    (513), not buffered for ever."""
    reader, writer = await listening.connect()
    writer.write(b"x" * (MAX_SIZE + 10))
    assert await closed_by_peer(reader)
    assert [e.status for e, _, _ in listening.rec.errors] == [513]
    assert listening.rec.heads == [None]  # no header block to answer from


async def test_garbage_without_content_length_closes_the_connection_with_400(
    listening: Listening,
) -> None:
    """A message that arrived whole is delivered; a header block after it without
    Content-Length cannot be framed on a stream: on_error gets a 400 and the connection closes."""
    reader, writer = await listening.connect()
    writer.write(msg(1))
    await until(lambda: len(listening.rec.messages) == 1)
    writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert await closed_by_peer(reader)
    assert [m[0] for m in listening.rec.messages] == [msg(1)]
    assert [e.status for e, _, _ in listening.rec.errors] == [400]


async def test_a_message_read_together_with_garbage_after_it_is_still_delivered(
    listening: Listening,
) -> None:
    """A whole message followed by garbage in the same read is delivered before the
    connection is closed, as it would be had the two arrived in separate reads."""
    reader, writer = await listening.connect()
    writer.write(msg(1) + b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert await closed_by_peer(reader)
    assert [e.status for e, _, _ in listening.rec.errors] == [400]
    assert [m[0] for m in listening.rec.messages] == [msg(1)]


async def test_a_crlfcrlf_keepalive_is_answered_with_crlf(listening: Listening) -> None:
    """RFC 5626 §3.5.1: a CRLFCRLF ping gets a CRLF pong and is not passed on as a message."""
    reader, writer = await listening.connect()
    writer.write(b"\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        assert await reader.readexactly(2) == b"\r\n"
    assert listening.rec.messages == [] and listening.rec.errors == []


async def test_a_response_goes_back_on_the_connection_the_request_came_on(
    listening: Listening,
) -> None:
    """send() with the connection id writes on that inbound connection; without an id, a send
    to the client's address reuses the same connection instead of opening one."""
    reader, writer = await listening.connect()
    writer.write(msg(1))
    await until(lambda: len(listening.rec.messages) == 1)
    _, addr, _, conn_id = listening.rec.messages[0]
    listening.pool.send(b"SIP/2.0 200 OK\r\n", addr, LOCAL, conn_id)
    listening.pool.send(b"by address\r\n", addr, LOCAL, None)
    async with asyncio.timeout(TIMEOUT):
        got = await reader.readexactly(len(b"SIP/2.0 200 OK\r\nby address\r\n"))
    assert got == b"SIP/2.0 200 OK\r\nby address\r\n"
    assert list(listening.pool.by_id) == [conn_id]


async def test_a_reader_that_falls_behind_is_noted_until_it_catches_up(
    listening: Listening,
) -> None:
    """Messages that take 100 µs each to handle, written as fast as the client can: after
    every read bytes are still waiting, so the pool notes the connection as behind, for
    longer and longer, and asks for the overload check at each read (at most every
    BEHIND_WATCH_S); once everything is read it is behind no more. A client sending at ease
    never is."""
    pool = listening.pool
    loop = asyncio.get_running_loop()
    watched: list[float] = []
    longest = 0.0

    def watch() -> None:
        nonlocal longest
        watched.append(loop.time())
        longest = max(longest, pool.behind_for())

    def slow(data: bytes, addr: tuple[str, int], local: int, conn: int) -> None:
        listening.rec.messages.append((data, addr, local, conn))
        end = time.perf_counter() + 0.0001
        while time.perf_counter() < end:  # the work sipguard does per message
            pass

    pool.watch = watch
    pool.on_message = slow
    _, writer = await listening.connect()
    for n in range(20):  # at ease: one message per read
        writer.write(msg(n))
        await writer.drain()
        await asyncio.sleep(0.002)
    await until(lambda: len(listening.rec.messages) == 20)
    assert not watched and pool.behind_for() == 0.0
    burst = 6000  # ~2.4 MB, 0.6 s of handling
    writer.write(b"".join(msg(n) for n in range(burst)))
    await until(lambda: len(listening.rec.messages) == 20 + burst)
    assert longest > 0.2, longest
    assert len(watched) >= 3  # a read is up to 256 KiB: ~60 ms of this handling each
    gaps = [b - a for a, b in zip(watched, watched[1:], strict=False)]
    assert min(gaps) >= tcp.BEHIND_WATCH_S * 0.99, gaps
    assert pool.behind_for() == 0.0 and not pool.behind


async def test_sends_to_one_address_share_one_outbound_connection(listening: Listening) -> None:
    """Sends to the same address reuse one connection: the first two go out of its buffer once
    it is open, the third on the open connection; what the far end sends back on it is framed
    and reported with that connection's id."""
    accepted: list[asyncio.StreamWriter] = []
    received = bytearray()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)
        while chunk := await r.read(65536):
            received.extend(chunk)

    core = await asyncio.start_server(serve, "127.0.0.1", 0)
    addr = core.sockets[0].getsockname()[:2]
    pool = listening.pool
    a, b, c = msg(1), msg(2), msg(3)
    pool.send(a, addr, LOCAL, None)
    pool.send(b, addr, LOCAL, None)  # still connecting: waits in the same buffer
    await until(lambda: received == a + b)
    pool.send(c, addr, LOCAL, None)
    await until(lambda: received == a + b + c)
    assert len(accepted) == 1
    conn = pool.by_addr[addr]
    assert list(pool.by_id) == [conn.id]
    accepted[0].write(msg(9))
    await until(lambda: len(listening.rec.messages) == 1)
    assert listening.rec.messages == [(msg(9), addr, LOCAL, conn.id)]
    accepted[0].close()
    core.close()
    await core.wait_closed()


async def test_a_failed_connect_is_forgotten_and_the_next_send_tries_again(
    listening: Listening,
) -> None:
    """A send to an address where nobody listens raises nothing; the dead connection leaves
    the pool, so the next send to that address opens a fresh one."""
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        addr = probe.getsockname()
    pool = listening.pool
    pool.send(msg(1), addr, LOCAL, None)
    first = pool.by_addr[addr]
    await until(lambda: addr not in pool.by_addr)
    assert first.closed and not pool.by_id
    pool.send(msg(2), addr, LOCAL, None)
    assert pool.by_addr[addr] is not first
    await until(lambda: addr not in pool.by_addr)


async def test_close_idle_closes_only_connections_idle_for_longer_than_the_limit(
    listening: Listening,
) -> None:
    """close_idle(s) closes the connections with no complete message in the last s seconds,
    returns how many it closed, and leaves a recently active connection open and working."""
    idle_reader, idle_writer = await listening.connect()
    busy_reader, busy_writer = await listening.connect()
    await until(lambda: len(listening.pool.by_id) == 2)
    assert listening.pool.close_idle(60.0) == 0
    await asyncio.sleep(0.5)
    busy_writer.write(msg(1))  # a message is traffic
    await until(lambda: len(listening.rec.messages) == 1)
    assert listening.pool.close_idle(0.4) == 1
    assert await closed_by_peer(idle_reader)
    await until(lambda: len(listening.pool.by_id) == 1)
    assert listening.rec.count("tcp_idle_closed") == 1
    busy_writer.write(msg(2))
    await until(lambda: len(listening.rec.messages) == 2)
    assert listening.rec.messages[1][0] == msg(2)


# ------------------------------------------------------------------------------ limits


async def test_connections_beyond_the_per_ip_cap_are_closed_at_once() -> None:
    """With a cap of 3 per IP, a 4th and 5th connection from 127.0.0.1 are closed at once and
    counted, while one from 127.0.0.2 is still accepted and served; closing one from 127.0.0.1
    frees its place."""
    async with listening_with(TcpLimits(max_connections_per_ip=3)) as ends:
        first = [await ends.connect() for _ in range(3)]
        await until(lambda: ends.pool.per_ip.get("127.0.0.1") == 3)
        for _ in range(2):
            reader, _ = await ends.connect()
            assert await closed_by_peer(reader)
        assert ends.rec.count("tcp_refused_per_ip") == 2
        assert ends.pool.per_ip == {"127.0.0.1": 3} and len(ends.pool.by_id) == 3
        reader, writer = await ends.connect("127.0.0.2")
        writer.write(msg(1))
        await until(lambda: len(ends.rec.messages) == 1)
        assert ends.rec.messages[0][1][0] == "127.0.0.2"
        assert ends.pool.per_ip == {"127.0.0.1": 3, "127.0.0.2": 1} and ends.pool.inbound == 4
        first[0][1].close()
        await until(lambda: ends.pool.per_ip.get("127.0.0.1") == 2)
        reader, writer = await ends.connect()
        writer.write(msg(2))
        await until(lambda: len(ends.rec.messages) == 2)
        assert ends.rec.count("tcp_refused_per_ip") == 2


async def test_connections_beyond_the_total_cap_are_closed_but_the_exempt_address_gets_in() -> None:
    """With a cap of 4 inbound connections in all, a 5th from a third address is closed and
    counted as tcp_refused_total; the exempt address (the core's) still connects and is not
    counted."""
    limits = TcpLimits(max_connections=4, exempt=frozenset({"127.0.0.4"}))
    async with listening_with(limits) as ends:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"):
            await ends.connect(source)
        await until(lambda: ends.pool.inbound == 4)
        reader, _ = await ends.connect("127.0.0.3")
        assert await closed_by_peer(reader)
        assert ends.rec.count("tcp_refused_total") == 1
        assert ends.rec.events[0][1][0] == "127.0.0.3"
        reader, writer = await ends.connect("127.0.0.4")
        writer.write(msg(1))
        await until(lambda: len(ends.rec.messages) == 1)
        assert ends.pool.inbound == 4 and "127.0.0.4" not in ends.pool.per_ip
        assert len(ends.pool.by_id) == 5


@pytest.mark.usefixtures("fast_sweep")
async def test_unknown_sources_cannot_lock_the_peers_out_with_idle_connections() -> None:
    """Peers configured (127.0.0.2 is one): two silent connections from an unknown source fill
    the total cap of 2, a third from it is refused, the peer's connection is still admitted.
    The unknown source's connections that brought no message are closed after the message
    timeout; the peer's silent one, and an unknown one that sent a message, stay open."""
    limits = TcpLimits(max_connections=2, message_timeout_s=0.3)
    async with listening_with(limits) as ends:
        ends.pool.is_peer = lambda ip: ip == "127.0.0.2"
        silent = [await ends.connect("127.0.0.3") for _ in range(2)]
        await until(lambda: ends.pool.inbound == 2)
        refused, _ = await ends.connect("127.0.0.3")
        assert await closed_by_peer(refused)
        assert ends.rec.count("tcp_refused_total") == 1
        peer_reader, peer_writer = await ends.connect("127.0.0.2")
        await until(lambda: ends.pool.inbound == 3)
        for reader, _ in silent:
            assert await closed_by_peer(reader)
        assert ends.rec.count("tcp_message_timeout") == 2
        talker_reader, talker_writer = await ends.connect("127.0.0.4")
        talker_writer.write(msg(1))
        await until(lambda: len(ends.rec.messages) == 1)
        await asyncio.sleep(0.6)
        peer_writer.write(msg(2))
        talker_writer.write(msg(3))
        await until(lambda: len(ends.rec.messages) == 3)
        assert ends.rec.count("tcp_message_timeout") == 2


@pytest.mark.usefixtures("fast_sweep")
async def test_a_slow_sender_is_closed_after_the_message_timeout() -> None:
    """A client trickling a header block a few bytes at a time is closed once its partial
    message is older than the message timeout (tcp_message_timeout), though bytes keep
    arriving; a client sending whole messages at the same pace stays open."""
    async with listening_with(TcpLimits(message_timeout_s=0.3)) as ends:
        slow_reader, slow_writer = await ends.connect()
        busy_reader, busy_writer = await ends.connect("127.0.0.2")
        data = msg(1)
        start = asyncio.get_running_loop().time()
        closed = asyncio.ensure_future(closed_by_peer(slow_reader))
        for i in range(60):  # at most 3 s
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                slow_writer.write(data[i * 4 : i * 4 + 4])
            busy_writer.write(msg(100 + i))
            await asyncio.sleep(0.05)
        assert await closed
        elapsed = asyncio.get_running_loop().time() - start
        assert 0.3 <= elapsed < 2.0
        assert ends.rec.count("tcp_message_timeout") == 1
        assert all(m[1][0] == "127.0.0.2" for m in ends.rec.messages)
        assert len(ends.pool.by_id) == 1  # the busy client's connection
        busy_writer.write(msg(999))
        await until(lambda: ends.rec.messages[-1][0] == msg(999))


@pytest.mark.usefixtures("fast_sweep")
async def test_keepalives_are_answered_but_do_not_hold_an_idle_connection_open() -> None:
    """CRLFCRLF pings every 50 ms are each answered with CRLF, yet the connection is closed
    once the idle timeout has passed since its last complete message (tcp_idle_closed); a
    client sending a message every 100 ms stays open."""
    async with listening_with(TcpLimits(idle_timeout_s=0.5)) as ends:
        reader, writer = await ends.connect()
        busy_reader, busy_writer = await ends.connect("127.0.0.2")
        writer.write(msg(1))
        await until(lambda: len(ends.rec.messages) == 1)
        last_message = asyncio.get_running_loop().time()
        pongs = 0
        closed_at = None
        for i in range(60):  # at most 60 pings, about 3 s
            try:
                writer.write(b"\r\n\r\n")
                async with asyncio.timeout(1.0):
                    got = await reader.read(2)
            except (ConnectionError, TimeoutError):
                got = b""
            if got == b"":
                closed_at = asyncio.get_running_loop().time()
                break
            assert got == b"\r\n"
            pongs += 1
            if i % 2 == 0:
                busy_writer.write(msg(100 + i))
            await asyncio.sleep(0.05)
        assert closed_at is not None, "pings kept the idle connection open"
        assert 0.5 <= closed_at - last_message < 2.0
        assert pongs >= 5
        assert ends.rec.count("tcp_idle_closed") == 1
        assert [c.addr[0] for c in ends.pool.by_id.values()] == ["127.0.0.2"]


def _stuffed_client(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer that will never read: its window fills at
    once, so what the pool sends stays in the pool's buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


async def _fill_until(
    pool: TcpPool, conn_id: int, addr: tuple[str, int], done: Callable[[], bool]
) -> int:
    """Send 64 KiB chunks on the connection until ``done()`` (at most 400 of them); the count."""
    chunk = b"x" * 65536
    for n in range(1, 401):
        pool.send(chunk, addr, LOCAL, conn_id)
        if done():
            return n
        await asyncio.sleep(0)
    raise AssertionError("the limit never bit")


async def test_a_full_write_buffer_pauses_reading_until_it_drains() -> None:
    """A client that does not read makes the pool's write buffer pass its high-water mark:
    the pool stops reading from it (a message sent meanwhile is not delivered) and counts
    tcp_write_paused; once the client reads everything, reading resumes and the message
    arrives."""
    async with listening_with(TcpLimits(write_buffer_max=65536)) as ends:
        loop = asyncio.get_running_loop()
        sock = _stuffed_client(ends.port)
        try:
            await until(lambda: len(ends.pool.by_id) == 1)
            await loop.sock_sendall(sock, msg(1))
            await until(lambda: len(ends.rec.messages) == 1)
            _, addr, _, conn_id = ends.rec.messages[0]
            conn = ends.pool.by_id[conn_id]
            sent = await _fill_until(
                ends.pool, conn_id, addr, lambda: conn.paused_since is not None
            )
            assert ends.rec.count("tcp_write_paused") == 1
            assert conn.transport is not None and not conn.transport.is_reading()
            await loop.sock_sendall(sock, msg(2))
            await asyncio.sleep(0.2)
            assert len(ends.rec.messages) == 1  # not read while paused
            assert ends.pool.behind_for() == 0.0  # not read on purpose: no overload sign
            want = sent * 65536
            got = 0
            async with asyncio.timeout(TIMEOUT):
                while got < want:
                    got += len(await loop.sock_recv(sock, 1 << 20))
            assert conn.paused_since is None and conn.transport.is_reading()
            await until(lambda: len(ends.rec.messages) == 2)
            assert ends.rec.messages[1][0] == msg(2)
            assert not conn.closed
        finally:
            sock.close()


@pytest.mark.usefixtures("fast_sweep")
async def test_a_client_that_never_reads_is_aborted_on_overflow_or_stall() -> None:
    """A paused connection whose buffer keeps growing past four times the high-water mark is
    aborted at once (tcp_write_overflow); one left paused past the stall timeout is aborted by
    the sweep (tcp_write_stalled). Both leave the pool."""
    limits = TcpLimits(write_buffer_max=65536, write_stall_timeout_s=0.3)
    async with listening_with(limits) as ends:
        socks = [_stuffed_client(ends.port), _stuffed_client(ends.port)]
        try:
            loop = asyncio.get_running_loop()
            await until(lambda: len(ends.pool.by_id) == 2)
            for i, sock in enumerate(socks):
                await loop.sock_sendall(sock, msg(i))
            await until(lambda: len(ends.rec.messages) == 2)
            (_, addr_a, _, id_a), (_, addr_b, _, id_b) = ends.rec.messages
            a, b = ends.pool.by_id[id_a], ends.pool.by_id[id_b]
            await _fill_until(ends.pool, id_a, addr_a, lambda: a.closed)
            assert ends.rec.count("tcp_write_overflow") == 1
            await _fill_until(ends.pool, id_b, addr_b, lambda: b.paused_since is not None)
            start = loop.time()
            await until(lambda: b.closed)
            assert loop.time() - start >= 0.25
            assert ends.rec.count("tcp_write_stalled") == 1
            await until(lambda: not ends.pool.by_id)
        finally:
            for sock in socks:
                sock.close()


async def test_a_refused_connect_is_counted_and_its_queued_messages_dropped(
    listening: Listening,
) -> None:
    """Three sends to a port where nothing listens: one tcp_connect_failed, and the three
    messages that waited for the connection are dropped and counted (tcp_queued_dropped)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        addr = probe.getsockname()
    for i in range(3):
        listening.pool.send(msg(i), addr, LOCAL, None)
    await until(lambda: listening.rec.count("tcp_connect_failed") == 1)
    assert listening.rec.events == [
        ("tcp_connect_failed", addr, 1),
        ("tcp_queued_dropped", addr, 3),
    ]
    assert addr not in listening.pool.by_addr


async def test_a_connect_that_hangs_times_out() -> None:
    """A connect to a listener whose accept queue is full (the kernel drops the SYN, as a
    blackholed address would) is given up after the connect timeout and counted."""
    async with listening_with(TcpLimits(connect_timeout_s=0.3)) as ends:
        loop = asyncio.get_running_loop()
        with socket.socket() as full:
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            addr = full.getsockname()
            fillers = []
            try:
                for _ in range(3):  # fill the accept queue (nobody accepts)
                    filler = socket.socket()
                    filler.setblocking(False)
                    filler.connect_ex(addr)
                    fillers.append(filler)
                await asyncio.sleep(0.1)
                start = loop.time()
                ends.pool.send(msg(1), addr, LOCAL, None)
                await until(lambda: ends.rec.count("tcp_connect_failed") == 1)
                assert 0.25 <= loop.time() - start < 2.0
                assert ends.rec.count("tcp_queued_dropped") == 1
                assert addr not in ends.pool.by_addr
            finally:
                for filler in fillers:
                    filler.close()


async def test_bytes_waiting_for_a_connection_are_capped() -> None:
    """While an outbound connection opens, at most write_buffer_max bytes wait for it; a send
    beyond is dropped and counted (tcp_send_dropped)."""
    async with listening_with(TcpLimits(write_buffer_max=16384, connect_timeout_s=0.3)) as ends:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            addr = probe.getsockname()
        for _ in range(3):
            ends.pool.send(b"x" * 6000, addr, LOCAL, None)
        assert ends.rec.count("tcp_send_dropped") == 1
        await until(lambda: ends.rec.count("tcp_queued_dropped") == 2)


def test_the_shell_takes_the_limits_from_the_config_and_exempts_the_core() -> None:
    """tcp_limits() maps every sip.tcp_* setting onto TcpLimits and exempts the core's IP
    address from the caps; a core named by hostname exempts nothing."""
    from sipguard.ops.config_load import parse_config
    from sipguard.server import tcp_limits

    cfg = parse_config(
        "listen: [tcp://127.0.0.1:5060]\ncore: tcp://10.0.0.10:5060\n"
        "sip: {tcp_max_connections: 10, tcp_max_connections_per_ip: 2, "
        "tcp_message_timeout_s: 3, tcp_idle_timeout_s: 30, tcp_write_buffer_max: 65536, "
        "tcp_write_stall_timeout_s: 7, tcp_connect_timeout_s: 2}\n"
    )
    assert tcp_limits(cfg) == TcpLimits(
        max_connections=10,
        max_connections_per_ip=2,
        message_timeout_s=3,
        idle_timeout_s=30,
        write_buffer_max=65536,
        write_stall_timeout_s=7,
        connect_timeout_s=2,
        exempt=frozenset({"10.0.0.10"}),
    )
    named = parse_config("listen: [tcp://127.0.0.1:5060]\ncore: tcp://core.example:5060\n")
    assert tcp_limits(named).exempt == frozenset()
    defaults = tcp_limits(parse_config("listen: [udp://127.0.0.1:5060]\ncore: udp://[::1]:5080\n"))
    assert defaults == TcpLimits(exempt=frozenset({"::1"}))  # the config's defaults are the pool's


# ------------------------------------------------------------------ file descriptors


async def test_the_fd_cap_lowers_the_total_cap_and_the_fd_room_bounds_every_connection(
) -> None:
    """The open-files limit's share (sipguard.ops.fdlimit): ``fd_cap`` 2 below
    max_connections 100 refuses a third connection from a party at once (tcp_refused_total);
    a peer's is let in beyond it, and the exempt core's too, until ``fd_room`` 4 connections
    are open: then even the core's is refused. One closed, the core connects again."""
    limits = TcpLimits(max_connections=100, exempt=frozenset({"127.0.0.4"}))
    async with listening_with(limits) as ends:
        ends.pool.fd_cap, ends.pool.fd_room = 2, 4
        ends.pool.is_peer = lambda ip: ip == "127.0.0.2"
        first = [await ends.connect("127.0.0.3") for _ in range(2)]
        await until(lambda: ends.pool.inbound == 2)
        refused, _ = await ends.connect("127.0.0.3")
        assert await closed_by_peer(refused)
        assert ends.rec.count("tcp_refused_total") == 1
        await ends.connect("127.0.0.2")  # a peer: beyond the cap
        await ends.connect("127.0.0.4")  # the core: exempt from the cap
        await until(lambda: len(ends.pool.by_id) == 4)
        for source in ("127.0.0.2", "127.0.0.4"):  # the room is full: nobody gets in
            reader, _ = await ends.connect(source)
            assert await closed_by_peer(reader)
        assert ends.rec.count("tcp_refused_total") == 3
        # sipguard's own connections count against the room too: none is opened
        ends.pool.send(msg(9), ("127.0.0.5", 9), LOCAL, None)
        assert ends.rec.count("tcp_refused_total") == 4 and not ends.pool.opening
        first[0][1].close()
        await until(lambda: len(ends.pool.by_id) == 3)
        reader, writer = await ends.connect("127.0.0.4")
        writer.write(msg(1))
        await until(lambda: len(ends.rec.messages) == 1)
        assert ends.rec.messages[0][1][0] == "127.0.0.4"
        # an outbound connection counts from its connect on, and once open in by_id only
        first[1][1].close()
        await until(lambda: len(ends.pool.by_id) == 3)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def far_end(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got.put_nowait(await r.readuntil(b"hello"))
            w.close()

        party = await asyncio.start_server(far_end, "127.0.0.6", 0)
        try:
            ends.pool.send(msg(2), ("127.0.0.6", party.sockets[0].getsockname()[1]), LOCAL, None)
            assert len(ends.pool.opening) == 1
            async with asyncio.timeout(TIMEOUT):
                assert (await got.get()).startswith(b"MESSAGE ")
            assert not ends.pool.opening
            assert ends.rec.count("tcp_refused_total") == 4
        finally:
            party.close()


def _open_now() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _accept_without_descriptors(spare: bool) -> tuple[list[str], float, int]:
    """A pool listening while every descriptor of the process is taken (``spare``: the pool
    holds its spare descriptor, else not): how the connections that arrive then end, the
    accept failures counted (per second of that time, without the spare), and how many
    messages were served once descriptors are free again (one from each of those clients
    still open, one on a new connection)."""
    rec = Recorder()
    loop = asyncio.get_running_loop()
    pool = TcpPool(loop, rec.on_message, rec.on_error, MAX_SIZE, TcpLimits(), rec.on_event)
    await pool.listen("127.0.0.1", 0, LOCAL)
    if not spare:
        os.close(pool._spare)
        pool._spare = -1
    port = pool.servers[0].sockets[0].getsockname()[1]
    clients = [socket.socket() for _ in range(4)]
    filler: list[int] = []
    try:
        with contextlib.suppress(OSError):  # take every descriptor left
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY))
        full = loop.time()
        for client in clients:  # the kernel completes the handshakes; accept() cannot
            client.setblocking(False)
            assert client.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        await until(lambda: rec.count("tcp_accept_failed") >= (4 if spare else 1))
        await asyncio.sleep(0.3)
        states = []
        for client in clients:
            try:
                async with asyncio.timeout(0.01):
                    data = await loop.sock_recv(client, 10)
                states.append("closed" if data == b"" else "data")
            except ConnectionResetError:
                states.append("closed")
            except TimeoutError:
                states.append("waiting")
        failed: float = rec.count("tcp_accept_failed")
        if not spare:
            failed /= loop.time() - full
        for fd in filler[:20]:
            os.close(fd)
        del filler[:20]
        for n, (client, state) in enumerate(zip(clients, states, strict=True)):
            if state == "waiting":
                await loop.sock_sendall(client, msg(n))
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(msg(9))
        expected = 1 + states.count("waiting")
        await until(lambda: len(rec.messages) == expected)
        writer.close()
        return states, failed, len(rec.messages)
    finally:
        for fd in filler:
            os.close(fd)
        for client in clients:
            client.close()
        await pool.close()


def _run_short_of_descriptors(loop_kind: str, spare: bool) -> tuple[list[str], float, int]:
    """_accept_without_descriptors on ``loop_kind``, the process's open-files soft limit
    lowered for it to what is open now plus 64 (and restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_now() + 64, hard))
    try:
        if loop_kind == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            return uvloop.run(_accept_without_descriptors(spare))
        return asyncio.run(_accept_without_descriptors(spare))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_accept_failing_for_lack_of_descriptors_refuses_the_waiting_and_recovers(
    loop_kind: str,
) -> None:
    """With no descriptor left (the process's open-files limit, lowered for the test, all
    taken), accept() fails with EMFILE: the pool closes its spare descriptor, accepts and
    closes each waiting connection and counts it (tcp_accept_failed) — the clients see their
    connection closed at once, not left in the backlog (asyncio's server would pause a second
    and retry; uvloop's would close them uncounted) — and the listener accepts again as soon
    as descriptors are free. Under asyncio's loop and under uvloop alike."""
    states, failed, served = _run_short_of_descriptors(loop_kind, spare=True)
    assert states == ["closed"] * 4
    assert failed == 4
    assert served == 1


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_without_its_spare_descriptor_the_listener_pauses_and_serves_the_waiting_later(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a spare descriptor to close (lost, or none could be opened) a failed accept()
    is counted and accepting pauses for ACCEPT_RETRY_S (the listener stays readable: a loop
    retrying at once would spin — uvloop's own server does, thousands of failed accept()
    calls a second); the waiting clients are accepted and served once descriptors are free."""
    monkeypatch.setattr(tcp, "ACCEPT_RETRY_S", 0.1)
    states, per_second, served = _run_short_of_descriptors(loop_kind, spare=False)
    assert states == ["waiting"] * 4
    assert 0 < per_second <= 12  # one per pause of 0.1 s: no spin
    assert served == 5


def test_the_accept_queue_of_a_listener_is_read_from_the_kernel() -> None:
    """accept_queue() reads a listening socket's waiting connections and its queue size
    (TCP_INFO); listen_overflows() the kernel's count of connections a full queue turned
    away."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        assert accept_queue(listener) == (0, 8)
        clients = [socket.create_connection(listener.getsockname(), timeout=2) for _ in range(5)]
        try:
            assert accept_queue(listener) == (5, 8)
        finally:
            for c in clients:
                c.close()
    overflows = listen_overflows()
    assert overflows is not None and overflows >= 0


async def test_a_connection_reset_before_the_loop_sets_it_up_is_closed_quietly(
    listening: Listening,
) -> None:
    """A client that resets its connection right after the handshake can leave the loop a
    transport with no peer address by the time the protocol hears of it (a race no test can
    make happen on purpose, so a transport that says so stands in): the connection is closed
    and counted, nothing raised into the event loop, and its place given back."""
    pool = listening.pool

    class Reset(asyncio.Transport):
        closed = False

        def get_extra_info(self, name: str, default: object = None) -> object:
            return None

        def close(self) -> None:
            self.closed = True

    conn = tcp.TcpConnection(pool, LOCAL, MAX_SIZE)
    conn.addr = ("127.0.0.1", 40000)
    assert pool.admit(conn)
    conn.admitted = True
    held = pool.inbound
    reset = Reset()
    conn.connection_made(reset)  # raised TypeError before
    assert reset.closed and conn.closed
    assert listening.rec.count("tcp_reset_at_connect") == 1
    conn.connection_lost(ConnectionResetError())
    assert pool.inbound == held - 1
