"""Hostile TCP clients end to end: a client that closes its connection before the answer, and
one that streams nothing but CRLF keep-alives.

The core (a UDP socket the test answers by hand, or the scripted core) sits on 127.0.0.1,
whose address is exempt from the per-address cap; the TCP clients on 127.0.0.2 (any 127/8
address is local on Linux).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import pytest

from .harness import HOST, E2EStack, events_total, free_port
from .scripted import Caller, Core, read_head

pytestmark = pytest.mark.e2e

CLIENT_HOST = "127.0.0.2"


def _invite(port: int, via_port: int, call_id: str) -> bytes:
    return (
        f"INVITE sip:+18005550199@{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {CLIENT_HOST}:{via_port};branch=z9hG4bK-{uuid.uuid4().hex[:12]}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:+12125550100@{CLIENT_HOST}>;tag=c1\r\n"
        f"To: <sip:+18005550199@{HOST}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:+12125550100@{CLIENT_HOST}:{via_port};transport=tcp>\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def _answer(req: bytes, status: int) -> bytes:
    """The core's answer to a forwarded request: every Via, From, To (tagged), Call-ID, CSeq."""
    head = req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    keep = [ln for ln in head if ln.split(b":", 1)[0].strip().lower()
            in (b"via", b"from", b"to", b"call-id", b"cseq", b"record-route")]
    keep = [ln + b";tag=core1" if ln.lower().startswith(b"to:") else ln for ln in keep]
    return (f"SIP/2.0 {status} OK\r\n".encode() + b"\r\n".join(keep)
            + f"\r\nContact: <sip:core@{HOST}>\r\nContent-Length: 0\r\n\r\n".encode())


def test_an_answer_whose_connection_closed_goes_to_the_via_port_and_is_capped(
    stack: E2EStack,
) -> None:
    """A TCP caller sends its INVITE and closes the connection before the core answers: the
    200 goes over a new connection to the source address and the Via's port (RFC 3261
    §18.2.2), not to the closed connection's temporary port. Those connections count
    against tcp_max_connections_per_ip (2): after two such calls the caller's address holds
    its two places, and its next connection is refused at once (tcp_refused_per_ip)."""
    core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core.bind((HOST, 0))
    core.settimeout(5)
    metrics_port = free_port()
    _, port = stack.sipguard(
        core_port=core.getsockname()[1], listen=("udp", "tcp"),
        config_extra=f"metrics: {{listen: {HOST}:{metrics_port}}}\n"
        "sip: {tcp_max_connections_per_ip: 2}\n",
    )
    listeners: list[socket.socket] = []
    accepted: list[socket.socket] = []
    try:
        for n in range(2):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((CLIENT_HOST, 0))
            listener.listen(4)
            listeners.append(listener)
            via_port = listener.getsockname()[1]
            client = socket.create_connection((HOST, port), timeout=5,
                                              source_address=(CLIENT_HOST, 0))
            client.sendall(_invite(port, via_port, f"closed-{n}"))
            trying = read_head(client, 5)
            assert trying.startswith(b"SIP/2.0 100 "), trying
            client.close()
            forwarded, sipguard_addr = core.recvfrom(65535)
            assert f"Call-ID: closed-{n}".encode() in forwarded
            time.sleep(0.2)  # sipguard sees the connection closed before the answer comes
            core.sendto(_answer(forwarded, 200), sipguard_addr)
            listener.settimeout(5)
            conn, _ = listener.accept()
            accepted.append(conn)  # kept open: sipguard's connection holds its place
            ok = read_head(conn, 5)
            assert ok.startswith(b"SIP/2.0 200 ") and f"closed-{n}".encode() in ok, ok
        refused = socket.create_connection((HOST, port), timeout=5,
                                           source_address=(CLIENT_HOST, 0))
        with refused:
            refused.settimeout(5)
            assert refused.recv(1) == b""  # closed at once: the two places are taken
        counts = events_total(metrics_port)
        assert counts.get("tcp_refused_per_ip", 0) >= 1, counts
    finally:
        core.close()
        for sock in (*accepted, *listeners):
            sock.close()


def test_a_stream_of_keepalives_neither_stalls_sipguard_nor_sheds_calls(
    stack: E2EStack,
) -> None:
    """One TCP client streams 16 MiB of CRLFCRLF pings (4 million of them): it gets its pongs
    (one per read), and meanwhile UDP calls from elsewhere are answered within a second each,
    with no overload protection started (overload_rejected not counted)."""
    core = Core()
    metrics_port = free_port()
    _, port = stack.sipguard(
        core_port=core.port, listen=("udp", "tcp"),
        config_extra=f"metrics: {{listen: {HOST}:{metrics_port}}}\n",
    )
    flood = socket.create_connection((HOST, port), timeout=10, source_address=(CLIENT_HOST, 0))
    pongs = bytearray()
    done = threading.Event()

    def stream() -> None:
        block = b"\r\n\r\n" * 16384  # 64 KiB
        with contextlib.suppress(OSError):
            for _ in range(256):
                flood.sendall(block)
        done.set()

    def drain() -> None:
        flood.settimeout(0.2)
        while not (done.is_set() and len(pongs) > 0):
            try:
                chunk = flood.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            pongs.extend(chunk)

    sender = threading.Thread(target=stream, daemon=True)
    reader = threading.Thread(target=drain, daemon=True)
    caller = Caller(port)
    try:
        reader.start()
        sender.start()
        for n in range(5):
            started = time.monotonic()
            caller.send(caller.request("INVITE", f"during-{n}"))
            [ok] = caller.finals(seconds=3, call_id=f"during-{n}")
            assert ok.startswith(b"SIP/2.0 200 "), ok
            assert time.monotonic() - started < 1.0
        sender.join(30)
        assert done.is_set(), "the pings were not all taken in 30 s"
        reader.join(5)
        assert pongs and set(pongs) <= {13, 10}, bytes(pongs[:20])
        counts = events_total(metrics_port)
        assert counts.get("overload_rejected") is None, counts
    finally:
        caller.close()
        flood.close()
        core.close()


def test_a_message_a_stream_cannot_frame_is_answered_before_the_connection_closes(
    stack: E2EStack,
) -> None:
    """Over TCP, an INVITE whose Content-Length is past sip.max_message_size hears 513, one
    with two different Content-Lengths or none 400, each before sipguard closes the connection
    (the rest of the stream cannot be read); the core gets none of them."""
    core = Core()
    _, port = stack.sipguard(core_port=core.port, listen=("udp", "tcp"))
    cases = (
        (b"Content-Length: 0", b"Content-Length: 70000", 513),
        (b"Content-Length: 0", b"Content-Length: 0\r\nContent-Length: 5", 400),
        (b"Content-Length: 0\r\n", b"", 400),
    )
    try:
        for n, (old, new, status) in enumerate(cases):
            conn = socket.create_connection((HOST, port), timeout=5,
                                            source_address=(CLIENT_HOST, 0))
            try:
                via_port = conn.getsockname()[1]
                data = _invite(port, via_port, f"unframed-{n}").replace(old, new)
                assert data != _invite(port, via_port, f"unframed-{n}")
                conn.sendall(data)
                answer = read_head(conn)
                assert answer.startswith(f"SIP/2.0 {status} ".encode()), (n, answer)
                assert f"Call-ID: unframed-{n}".encode() in answer
                conn.settimeout(5)
                # then closed: nothing more, the end of the stream (or a reset) within 5 s
                with contextlib.suppress(ConnectionResetError):
                    assert conn.recv(65536) == b"", n
            finally:
                conn.close()
        time.sleep(0.2)
        assert core.received == []
    finally:
        core.close()
