"""Listeners on IPv4 and IPv6 at once, over real sockets on 127.0.0.1 and ::1.

A socket of one address family cannot send to the other: sipguard sends to the IPv4 core from
its IPv4 listener and to an IPv6 caller from its IPv6 one, whichever is listed first, and
names that listener in its Via and Record-Route. Checked in both orders: an IPv6 caller's
call reaches the IPv4 core with a double Record-Route (one entry per side), the answer
reaches the caller, and the core's BYE reaches the caller over IPv6.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import HOST, SipguardProcess, free_port
from tests.e2e.scripted import Core, header


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


def _invite(port: int, sg: int, call_id: str) -> bytes:
    return (
        f"INVITE sip:+18005550199@[::1]:{sg} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP [::1]:{port};branch=z9hG4bK-{uuid.uuid4().hex[:12]};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:+12125550100@[::1]>;tag=c6\r\n"
        f"To: <sip:+18005550199@[::1]>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:+12125550100@[::1]:{port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _lines(data: bytes, name: str) -> list[str]:
    """Every value of header ``name``, line by line, in order."""
    return [m.decode() for m in re.findall(rb"(?im)^" + name.encode() + rb":[ \t]*([^\r\n]*)",
                                           data)]


def _recv(sock: socket.socket, want: bytes, seconds: float = 3.0) -> bytes | None:
    """The first datagram that starts with ``want`` within ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        if data.startswith(want):
            return data
    return None


@pytest.mark.parametrize("v6_first", [True, False], ids=["ipv6-listed-first",
                                                        "ipv4-listed-first"])
def test_a_call_between_an_ipv6_caller_and_an_ipv4_core(tmp_path: Path, v6_first: bool) -> None:
    port = free_port()
    v4, v6 = f"udp://{HOST}:{port}", f"udp://[::1]:{port}"
    core = Core()
    caller = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    caller.bind(("::1", 0))
    caller.settimeout(0.1)
    cport = caller.getsockname()[1]
    listen = [v6, v4] if v6_first else [v4, v6]
    config = tmp_path / "sipguard.yaml"
    config.write_text(f"listen: {json.dumps(listen)}\ncore: udp://{HOST}:{core.port}\n")
    guard = SipguardProcess(tmp_path, listen=listen, core=f"udp://{HOST}:{core.port}",
                            config_path=config).start()
    try:
        call_id = f"dual-{int(v6_first)}"
        caller.sendto(_invite(cport, port, call_id), ("::1", port))
        ok = _recv(caller, b"SIP/2.0 200")
        assert ok is not None, "the IPv6 caller heard no 200 through the IPv4 core"
        [invite] = [d for d in core.received if d.startswith(b"INVITE")]
        rr = ", ".join(_lines(invite, "Record-Route"))
        # one entry faces the core (IPv4), one faces the caller (IPv6)
        assert f"<sip:{HOST}:{port};lr>" in rr and f"<sip:[::1]:{port};lr>" in rr, rr
        assert header(invite, "Via").startswith(f"SIP/2.0/UDP {HOST}:{port};"), invite
        # the core hangs up: its BYE, routed through sipguard, reaches the caller over IPv6
        routes = rr  # a UAS's route set: the INVITE's Record-Route in its order
        to_line = header(ok, "To")
        bye = (
            f"BYE sip:+12125550100@[::1]:{cport} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{core.port};branch=z9hG4bK-{uuid.uuid4().hex[:12]}\r\n"
            f"Route: {routes}\r\nMax-Forwards: 70\r\nFrom: {to_line}\r\n"
            f"To: <sip:+12125550100@[::1]>;tag=c6\r\nCall-ID: {call_id}\r\nCSeq: 1 BYE\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        core.send(bye)
        got = _recv(caller, b"BYE ")
        assert got is not None, "the core's BYE never reached the IPv6 caller"
        assert header(got, "Via").startswith(f"SIP/2.0/UDP [::1]:{port};"), got
    finally:
        guard.stop()
        caller.close()
        core.close()
