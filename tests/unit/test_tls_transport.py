"""TcpPool with TLS over real sockets on 127.0.0.1: a tls listener delivers framed messages and
answers on the connection, client certificates (required, recorded), outbound TLS verifying the
server's certificate, and new contexts (reload) serving new connections.

The PKI is made per test module with ``cryptography`` (:mod:`tests.unit.tls_pki`); the far
ends are asyncio streams with Python ``ssl`` contexts. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipguard.proxy.routing import Router
from sipguard.transport.tcp import TcpLimits, TcpPool
from sipguard.transport.tls import TlsContexts, build_contexts
from tests.unit.test_tcp_transport import LOCAL, MAX_SIZE, TIMEOUT, Recorder, msg, until
from tests.unit.tls_pki import TlsFiles, write_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return write_pki(tmp_path_factory.mktemp("pki"))


def server_contexts(pki: TlsFiles, verify_clients: bool = False) -> TlsContexts:
    return build_contexts(
        cert_file=pki.server_cert, key_file=pki.server_key,
        ca_file=pki.ca if verify_clients else None, verify_clients=verify_clients,
    )


def client_context(pki: TlsFiles, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if with_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


@contextlib.asynccontextmanager
async def tls_pool(tls: TlsContexts, limits: TcpLimits | None = None) -> AsyncIterator[
    tuple[TcpPool, Recorder, int]
]:
    rec = Recorder()
    pool = TcpPool(asyncio.get_running_loop(), rec.on_message, rec.on_error, MAX_SIZE,
                   limits or TcpLimits(), rec.on_event)
    pool.tls = tls
    await pool.listen("127.0.0.1", 0, LOCAL, tls=True)
    port = pool.servers[0].sockets[0].getsockname()[1]
    try:
        yield pool, rec, port
    finally:
        await pool.close()


async def test_tls_listener_delivers_framed_messages_and_answers_on_the_connection(
    pki: TlsFiles,
) -> None:
    """A TLS client's pipelined messages come out one by one, marked as a TLS connection; a
    response sent to the connection's id goes back over TLS on it."""
    async with tls_pool(server_contexts(pki)) as (pool, rec, port):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki), server_hostname="sip.test"
        )
        writer.write(msg(1) + msg(2))
        await writer.drain()
        await until(lambda: len(rec.messages) == 2)
        (m1, addr, local, conn_id), (m2, *_) = rec.messages
        assert (m1, m2, local) == (msg(1), msg(2), LOCAL)
        conn = pool.by_id[conn_id]
        assert conn.tls and conn.inbound and conn.peer_names == ()
        assert conn.fd >= 0  # the raw socket's: a TLS reader behind is noted like a TCP one
        assert pool.tls_by_addr[addr] is conn and addr not in pool.by_addr
        pool.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", addr, LOCAL, conn_id, tls=True)
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readuntil(b"\r\n\r\n") == (
                b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
            )
        writer.write(b"\r\n\r\n")  # a keep-alive ping over TLS is answered too
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(2) == b"\r\n"
        writer.close()
        await until(lambda: not pool.by_id)


async def test_a_client_without_certificate_is_refused_when_clients_are_verified(
    pki: TlsFiles,
) -> None:
    """verify_clients: no client certificate fails the handshake (``tls_handshake_failed``),
    nothing is delivered; a client with one gets through and its CN / SAN names are kept."""
    async with tls_pool(server_contexts(pki, verify_clients=True)) as (pool, rec, port):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_context(pki), server_hostname="sip.test"
                )
                writer.write(msg(1))  # TLS 1.3: the refusal comes after the client's finish
                await writer.drain()
                if not await reader.read(1):
                    raise ConnectionError("closed by the listener")
        await until(lambda: rec.count("tls_handshake_failed") == 1)
        await until(lambda: not pool.by_id and pool.inbound == 0)
        assert rec.messages == []

        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki, with_cert=True), server_hostname="sip.test"
        )
        writer.write(msg(3))
        await writer.drain()
        await until(lambda: len(rec.messages) == 1)
        conn = pool.by_id[rec.messages[0][3]]
        assert conn.peer_names == ("peer-a.test",)
        writer.close()


async def test_connection_caps_apply_to_tls_connections(pki: TlsFiles) -> None:
    """The TCP limits hold for TLS: a second connection from one IP beyond the cap is closed
    before any handshake."""
    limits = TcpLimits(max_connections_per_ip=1)
    async with tls_pool(server_contexts(pki), limits) as (pool, rec, port):
        _, w1 = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki), server_hostname="sip.test"
        )
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            async with asyncio.timeout(TIMEOUT):
                await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_context(pki), server_hostname="sip.test"
                )
        assert rec.count("tcp_refused_per_ip") == 1
        w1.close()


async def test_new_contexts_serve_new_connections(pki: TlsFiles, tmp_path: Path) -> None:
    """Replacing ``pool.tls`` (a reload) changes the certificate new connections see."""
    other = write_pki(tmp_path / "other")
    async with tls_pool(server_contexts(pki)) as (pool, rec, port):
        pool.tls = server_contexts(other)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(pki), server_hostname="sip.test"
            )
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(other), server_hostname="sip.test"
        )
        writer.write(msg(4))
        await until(lambda: len(rec.messages) == 1)
        writer.close()


async def _tls_server(pki: TlsFiles, got: list[bytes]) -> asyncio.Server:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            got.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)


async def test_outbound_tls_verifies_the_server_certificate(pki: TlsFiles) -> None:
    """An outbound TLS connection to the core verifies its certificate against core_ca_file
    and core_server_name: the message arrives and the answer comes back on the connection; a
    wrong CA (or name) fails like a connect failure and drops the queued message."""
    got: list[bytes] = []
    server = await _tls_server(pki, got)
    port = server.sockets[0].getsockname()[1]
    core = ("127.0.0.1", port)
    rec = Recorder()
    pool = TcpPool(asyncio.get_running_loop(), rec.on_message, rec.on_error, MAX_SIZE,
                   TcpLimits(connect_timeout_s=2.0), rec.on_event)
    try:
        pool.tls = build_contexts(core_ca_file=pki.other_ca, core_addr=core)
        pool.send(msg(1), core, LOCAL, None, tls=True)
        await until(lambda: rec.count("tcp_connect_failed") == 1)
        assert rec.count("tcp_queued_dropped") == 1 and got == []
        assert core not in pool.tls_by_addr

        pool.tls = build_contexts(core_ca_file=pki.ca, core_addr=core,
                                  core_server_name="wrong.test")
        pool.send(msg(2), core, LOCAL, None, tls=True)
        await until(lambda: rec.count("tcp_connect_failed") == 2)

        pool.tls = build_contexts(core_ca_file=pki.ca, core_addr=core,
                                  core_server_name="sip.test")
        pool.send(msg(3), core, LOCAL, None, tls=True)
        await until(lambda: len(rec.messages) == 1)
        assert got == [msg(3).split(b"\r\n\r\n")[0] + b"\r\n\r\n"]
        conn = pool.tls_by_addr[core]
        assert conn.tls and not conn.inbound and rec.messages[0][3] == conn.id
        assert conn.peer_names == ("sip.test", "localhost")
        assert core not in pool.by_addr  # TLS and TCP connections are kept apart
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_outbound_tls_to_a_peer_trusts_the_peers_ca_file(pki: TlsFiles) -> None:
    """A call the core places to a party over TLS: its server certificate, from a private CA
    (a PBX's), is verified against tls.peers_ca_file beside the system's CAs — with the
    system's alone the connection failed and the core heard 500. tls.ca_file (the CA of
    client certificates) vouches for no server."""
    got: list[bytes] = []
    server = await _tls_server(pki, got)
    peer = ("127.0.0.1", server.sockets[0].getsockname()[1])
    rec = Recorder()
    pool = TcpPool(asyncio.get_running_loop(), rec.on_message, rec.on_error, MAX_SIZE,
                   TcpLimits(connect_timeout_s=2.0), rec.on_event)
    try:
        pool.tls = build_contexts()
        pool.send(msg(1), peer, LOCAL, None, tls=True)
        await until(lambda: rec.count("tcp_connect_failed") == 1)
        assert rec.count("tls_verify_failed") == 1  # said as such
        pool.tls = build_contexts(ca_file=pki.ca)
        pool.send(msg(2), peer, LOCAL, None, tls=True)
        await until(lambda: rec.count("tcp_connect_failed") == 2)
        pool.tls = build_contexts(peers_ca_file=pki.ca)
        pool.send(msg(2), peer, LOCAL, None, tls=True)
        await until(lambda: len(rec.messages) == 1)
        assert got == [msg(2).split(b"\r\n\r\n")[0] + b"\r\n\r\n"]
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


def test_a_tls_listener_needs_a_server_certificate() -> None:
    """build_contexts without cert/key has no server context; listen(tls=True) refuses."""
    tls = build_contexts()
    assert tls.server is None

    async def go() -> None:
        rec = Recorder()
        pool = TcpPool(asyncio.get_running_loop(), rec.on_message, rec.on_error, MAX_SIZE)
        pool.tls = tls
        try:
            with pytest.raises(ValueError, match="tls.cert_file"):
                await pool.listen("127.0.0.1", 0, LOCAL, tls=True)
        finally:
            await pool.close()

    asyncio.run(go())


def test_unreadable_certificate_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="tls.cert_file"):
        build_contexts(cert_file=tmp_path / "no.pem", key_file=tmp_path / "no.key")


def test_sips_and_transport_tls_route_over_tls_only_with_a_tls_listener() -> None:
    """flow_for_uri: sips: / transport=tls → tls (port 5061 by default) when a tls listener
    exists, else tcp as before."""
    from sipguard.contract import Flow, Local
    from sipguard.proxy import build
    from sipguard.proxy.settings import ProxySettings
    from sipguard.sip.uri import parse_uri

    core = Flow("udp", ("10.0.0.10", 5080), 0)
    plain = ProxySettings(locals=(Local(0, "udp", "10.0.0.1", 5060),
                                  Local(1, "tcp", "10.0.0.1", 5060)), core=core)
    tls = ProxySettings(locals=(*plain.locals, Local(2, "tls", "10.0.0.1", 5061)), core=core)
    router = Router(plain, build.Ids(b"k"))
    assert router.flow_for_uri(parse_uri("sips:bob@192.0.2.5")) == Flow(
        "tcp", ("192.0.2.5", 5060), 1)
    router.configure(tls)
    assert router.flow_for_uri(parse_uri("sips:bob@192.0.2.5")) == Flow(
        "tls", ("192.0.2.5", 5061), 2)
    assert router.flow_for_uri(parse_uri("sip:bob@192.0.2.5:5070;transport=tls")) == Flow(
        "tls", ("192.0.2.5", 5070), 2)
    loc = tls.locals[2]
    assert build.our_via(loc, "tls", "z9hG4bKsgx").startswith(b"Via: SIP/2.0/TLS 10.0.0.1:5061;")
    assert build.record_route(loc, "tls") == b"Record-Route: <sip:10.0.0.1:5061;transport=tls;lr>"
