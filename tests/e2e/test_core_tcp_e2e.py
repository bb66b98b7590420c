"""A core over TCP that opens its own connection for its requests, end to end.

The caller is a UDP socket on 127.0.0.1; the core a TCP listener on 127.0.0.3 that answers
the INVITE on sipguard's connection, then sends its BYE over a connection it opens itself
(as Asterisk and FreeSWITCH do). With ``sip.core_tcp_any_port`` that BYE is the core's and
reaches the caller; without, the connection counts as an outside source and hears 403.
"""

from __future__ import annotations

import contextlib
import re
import socket

import pytest

from .harness import HOST, E2EStack, SipguardProcess, free_port
from .scripted import Caller, header, read_head

pytestmark = pytest.mark.e2e

CORE_HOST = "127.0.0.3"


def _answer(req: bytes) -> bytes:
    head = req.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    keep = [ln for ln in head if re.match(r"(?i)(via|record-route|from|call-id|cseq|to)\s*:", ln)]
    keep = [ln + ";tag=core1" if ln.lower().startswith("to:") else ln for ln in keep]
    return ("SIP/2.0 200 OK\r\n" + "\r\n".join(keep)
            + f"\r\nContact: <sip:core@{CORE_HOST};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
            ).encode()


@pytest.mark.parametrize("any_port", [True, False])
def test_the_cores_bye_on_a_connection_of_its_own(stack: E2EStack, any_port: bool) -> None:
    """The core's BYE over a connection the core opened: forwarded to the caller with
    sip.core_tcp_any_port, refused (403, nothing forwarded) without it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((CORE_HOST, 0))
    listener.listen(4)
    core_port = listener.getsockname()[1]
    port = free_port()
    guard = SipguardProcess(
        stack.workdir, listen=[f"udp://{HOST}:{port}", f"tcp://{HOST}:{port}"],
        core=f"tcp://{CORE_HOST}:{core_port}",
        config_extra=f"sip: {{core_tcp_any_port: {'true' if any_port else 'false'}}}\n",
    )
    stack.guards.append(guard)  # stopped by the fixture
    guard.start(10.0)
    caller = Caller(port)
    conns: list[socket.socket] = []
    try:
        caller.send(caller.request("INVITE", "tcp-core-1"))
        listener.settimeout(5)
        conn, _ = listener.accept()
        conns.append(conn)
        invite = read_head(conn)
        assert invite.startswith(b"INVITE "), invite
        conn.sendall(_answer(invite))
        [ok] = caller.finals(call_id="tcp-core-1")
        assert ok.startswith(b"SIP/2.0 200 "), ok
        # the core's BYE, along the route set the INVITE recorded, on a connection of its own
        routes = [ln.split(":", 1)[1].strip() for ln in invite.decode().split("\r\n")
                  if ln.lower().startswith("record-route:")]
        own = socket.create_connection((HOST, port), timeout=5, source_address=(CORE_HOST, 0))
        conns.append(own)
        bye = (
            f"BYE sip:+12125550100@{caller.host}:{caller.port} SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {CORE_HOST}:{core_port};branch=z9hG4bK-corebye\r\n"
            f"Route: {', '.join(routes)}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:+18005550199@{HOST}>;tag=core1\r\n"
            f"To: {header(invite, 'From')}\r\nCall-ID: tcp-core-1\r\nCSeq: 9 BYE\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        own.sendall(bye)
        if any_port:
            caller.sock.settimeout(3)
            got = caller.sock.recv(65535)
            assert got.startswith(b"BYE "), got
        else:
            refused = read_head(own)
            assert refused.startswith(b"SIP/2.0 403 "), refused
            caller.sock.settimeout(1)
            with contextlib.suppress(TimeoutError):
                assert not caller.sock.recv(65535).startswith(b"BYE ")
    finally:
        caller.close()
        for sock in (*conns, listener):
            sock.close()


def test_a_tcp_core_that_refuses_the_connection_is_a_503_at_once(stack: E2EStack) -> None:
    """The core's TCP port refuses the connection: the caller hears 503 at once (RFC 3261
    §16.9: a transport error is as if the next hop said 503), not 408 after Timer B's 32 s,
    and the call's slot is free again (the next call from the same number is decided)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((CORE_HOST, 0))  # a port nobody listens on
        dead = probe.getsockname()[1]
    port = free_port()
    guard = SipguardProcess(
        stack.workdir, listen=[f"udp://{HOST}:{port}"], core=f"tcp://{CORE_HOST}:{dead}",
        config_extra="rules:\n  concurrency: {per_caller: 1}\n",
    )
    stack.guards.append(guard)
    guard.start(10.0)
    caller = Caller(port)
    try:
        for n in (1, 2):
            call_id = f"tcp-dead-{n}"
            caller.send(caller.request("INVITE", call_id))
            finals = caller.finals(seconds=3.0, call_id=call_id)
            assert [f.split(b" ", 2)[1] for f in finals] == [b"503"], finals
            caller.send(caller.request("ACK", call_id, to_tag=_to_tag(finals[0])))
    finally:
        caller.close()


def _to_tag(response: bytes) -> str:
    m = re.search(r";tag=([^;>\s]+)", header(response, "To"))
    return m.group(1) if m else ""


def test_a_folded_header_reaches_a_tcp_core_unfolded(stack: E2EStack) -> None:
    """A fold that reads ` Content-Length: 0` under another header, and a body that is a
    second INVITE: a core's stream framer that takes the folded line for the length would read
    the body as a request nobody checked (with sipguard's own headers forged in it). sipguard
    sends every header line unfolded (RFC 3261 §7.3.1): one message, one Content-Length."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((CORE_HOST, 0))
    listener.listen(4)
    port = free_port()
    guard = SipguardProcess(stack.workdir, listen=[f"udp://{HOST}:{port}"],
                            core=f"tcp://{CORE_HOST}:{listener.getsockname()[1]}")
    stack.guards.append(guard)
    guard.start(10.0)
    caller = Caller(port)
    smuggled = (f"INVITE sip:+19005550100@{CORE_HOST} SIP/2.0\r\n"
                f"Via: SIP/2.0/TCP {HOST}:{port};branch=z9hG4bK-smuggled\r\n"
                "From: <sip:+13125550000@evil.example>;tag=s\r\nTo: <sip:+19005550100@x>\r\n"
                "Call-ID: smuggled\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
                "X-Sipguard-Identity: TN-Validation-Passed;attest=A\r\n"
                "Content-Length: 0\r\n\r\n").encode()
    conns: list[socket.socket] = []
    try:
        for fold in (b" ", b"\t"):
            call_id = f"folded-{fold[0]}"
            req = caller.request("INVITE", call_id, extra="Subject: hello\r\n" + fold.decode()
                                 + "Content-Length: 0\r\n").replace(
                b"Content-Length: 0\r\n\r\n", b"Content-Length: %d\r\n\r\n" % len(smuggled)
                + smuggled)
            caller.send(req)
            listener.settimeout(5)
            if not conns:
                conns.append(listener.accept()[0])
            conn = conns[0]
            data = read_head(conn)
            with contextlib.suppress(TimeoutError, OSError):
                conn.settimeout(0.5)
                while chunk := conn.recv(65535):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"INVITE ") and call_id.encode() in head, head
            assert b"\r\n " not in head and b"\r\n\t" not in head, head
            lengths = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")]
            assert lengths == [b"Content-Length: %d" % len(smuggled)]
            assert body == smuggled  # the whole rest of the stream is that one body
    finally:
        caller.close()
        for conn in conns:
            conn.close()
        listener.close()
