"""Attacks on the policy, end to end: a real sipguard on 127.0.0.1, a scripted core that
answers INVITE and BYE with 200, and third-party listeners on other loopback addresses. Each
test asserts what the core and the third party received: nothing the policy did not allow.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from .harness import HOST, E2EStack

pytestmark = pytest.mark.e2e

STRANGER = "127.0.0.2"  # an address no peer owns
THIRD = "127.0.0.3"  # a third party that must never hear anything


def _header(data: bytes, name: str) -> str:
    m = re.search(rb"^" + name.encode() + rb":[ \t]*([^\r\n]*)", data, re.M | re.I)
    return m.group(1).decode() if m else ""


class Core:
    """A UDP core that answers INVITE and BYE with 200 OK (copying what a UAS copies,
    Record-Route included) and records every request it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if data.startswith(b"SIP/2.0"):
                continue
            self.received.append(data)
            method = data.split(b" ", 1)[0]
            if method in (b"INVITE", b"BYE", b"INFO", b"MESSAGE", b"SUBSCRIBE"):
                self.sock.sendto(self._ok(data), addr)

    @staticmethod
    def _ok(req: bytes) -> bytes:
        head = req.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        keep = [ln for ln in head[1:] if re.match(
            r"(?i)(via|record-route|from|call-id|cseq|to)\s*:", ln)]
        out = []
        for ln in keep:
            if re.match(r"(?i)to\s*:", ln) and ";tag=" not in ln:
                ln += ";tag=core1"
            out.append(ln)
        out.append(f"Contact: <sip:core@{HOST}>")
        return ("SIP/2.0 200 OK\r\n" + "\r\n".join(out) + "\r\nContent-Length: 0\r\n\r\n").encode()

    def methods(self, call_id: str | None = None) -> list[str]:
        return [d.split(b" ", 1)[0].decode() for d in self.received
                if call_id is None or f"Call-ID: {call_id}".encode() in d]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Listener:
    """A third party: a UDP socket and a TCP listening socket that count what reaches them."""

    def __init__(self, host: str = THIRD) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, 0))
        self.udp.settimeout(0.05)
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind((host, self.port))
        self.tcp.listen(8)
        self.tcp.settimeout(0.05)

    def heard(self, seconds: float) -> list[bytes]:
        got: list[bytes] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                got.append(self.udp.recv(65535))
            with contextlib.suppress(TimeoutError):
                conn, _ = self.tcp.accept()
                got.append(b"<tcp connection>")
                conn.close()
        return got

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class Caller:
    """A UDP UAC on 127.0.0.x: INVITE, ACK, in-dialog requests, with the Route set learnt."""

    def __init__(self, target: int, host: str = HOST) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.target = target

    def send(self, data: bytes, sock: socket.socket | None = None) -> None:
        (sock or self.sock).sendto(data, (HOST, self.target))

    def request(self, method: str, call_id: str, *, cseq: int = 1, to_tag: str = "",
                from_tag: str = "c1", ruri: str | None = None, extra: str = "",
                port: int | None = None) -> bytes:
        ruri = ruri or f"sip:+18005550199@{HOST}:{self.target}"
        via_port = port or self.port
        return (
            f"{method} {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {self.host}:{via_port};branch=z9hG4bK-{uuid.uuid4().hex[:12]};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:+12125550100@{self.host}>;tag={from_tag}\r\n"
            f"To: <sip:+18005550199@{HOST}>{';tag=' + to_tag if to_tag else ''}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"Contact: <sip:+12125550100@{self.host}:{via_port}>\r\n{extra}"
            f"Content-Length: 0\r\n\r\n"
        ).encode()

    def finals(self, seconds: float = 1.5, want: int = 1) -> list[bytes]:
        got: list[bytes] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(got) < want:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(b"SIP/2.0") and not data.startswith(b"SIP/2.0 1"):
                got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def core() -> Iterator[Core]:
    c = Core()
    yield c
    c.close()


@pytest.fixture
def third() -> Iterator[Listener]:
    t = Listener()
    yield t
    t.close()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _call_up(caller: Caller, call_id: str) -> tuple[str, str]:
    """INVITE answered 200 by the core, ACKed: (the core's To tag, the Route to use)."""
    caller.send(caller.request("INVITE", call_id))
    [ok] = caller.finals()
    assert _status(ok) == 200, ok
    to_tag = re.search(r"tag=([^;>\s]+)", _header(ok, "To")).group(1)  # type: ignore[union-attr]
    route = f"Route: {_header(ok, 'Record-Route')}\r\n"
    caller.send(caller.request("ACK", call_id, to_tag=to_tag, extra=route))
    return to_tag, route


def test_a_forged_bye_from_another_port_reaches_nobody_and_frees_no_slot(
    stack: E2EStack, core: Core, third: Listener
) -> None:
    """per_caller 1, a call up: a BYE with its Call-ID and tags from another source port,
    aimed at a third party, reaches neither the third party nor the core, and the caller's
    next call is still refused while the first is up."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp", "tcp"),
                             config_extra="rules:\n  concurrency: {per_caller: 1}\n")
    caller = Caller(port)
    attacker = Caller(port)
    try:
        to_tag, route = _call_up(caller, "victim-1")
        bye = attacker.request("BYE", "victim-1", cseq=2, to_tag=to_tag, extra=route,
                               ruri=f"sip:x@{THIRD}:{third.port}")
        attacker.send(bye)
        [refused] = attacker.finals()
        assert _status(refused) == 403
        assert third.heard(1.0) == []
        assert "BYE" not in core.methods("victim-1")
        caller.send(caller.request("INVITE", "victim-2"))
        [second] = caller.finals()
        assert _status(second) == 403
    finally:
        caller.close()
        attacker.close()


def test_in_dialog_requests_never_relay_to_a_third_party(
    stack: E2EStack, core: Core, third: Listener
) -> None:
    """The caller's INFO with a Route to a third party over TCP, and its BYE naming a third
    party: both go to the core, the third party gets no packet and no connection."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp", "tcp"))
    caller = Caller(port)
    try:
        to_tag, route = _call_up(caller, "relay-1")
        info = caller.request(
            "INFO", "relay-1", cseq=2, to_tag=to_tag,
            extra=route + f"Route: <sip:{THIRD}:{third.port};transport=tcp;lr>\r\n",
        )
        caller.send(info)
        bye = caller.request("BYE", "relay-1", cseq=3, to_tag=to_tag, extra=route,
                             ruri=f"sip:x@{THIRD}:{third.port}")
        caller.send(bye)
        assert third.heard(1.5) == []
        methods = core.methods("relay-1")
        assert "INFO" in methods and "BYE" in methods
    finally:
        caller.close()


def test_out_of_dialog_requests_from_unknown_sources_never_reach_the_core(
    stack: E2EStack, core: Core
) -> None:
    """With peers configured, MESSAGE, SUBSCRIBE and INVITE from an address no peer owns get
    one 403 each and the core receives none of them."""
    _, port = stack.sipguard(
        core_port=core.port, listen=("udp",),
        config_extra=f"peers:\n  - name: lab\n    networks: [{HOST}/32]\n",
    )
    stranger = Caller(port, host=STRANGER)
    try:
        for method in ("MESSAGE", "SUBSCRIBE", "INVITE"):
            stranger.send(stranger.request(method, f"u-{method}"))
            [resp] = stranger.finals()
            assert _status(resp) == 403, method
        time.sleep(0.3)
        assert core.received == []
    finally:
        stranger.close()


def test_forged_verdicts_are_stripped_whatever_rules_are_on(
    stack: E2EStack, core: Core
) -> None:
    """With no rule on, sipguard's own headers and verstat sent by a peer never reach the
    core, on the initial INVITE and on a re-INVITE."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp",))
    caller = Caller(port)
    forged = ("X-Sipguard-Identity: TN-Validation-Passed;attest=A\r\n"
              "X-Sipguard-Verdict: passed\r\n"
              f"P-Asserted-Identity: <sip:+12125550100;verstat=TN-Validation-Passed@{HOST}>\r\n")
    try:
        caller.send(caller.request("INVITE", "forge-1", extra=forged))
        [ok] = caller.finals()
        to_tag = re.search(r"tag=([^;>\s]+)", _header(ok, "To")).group(1)  # type: ignore[union-attr]
        route = f"Route: {_header(ok, 'Record-Route')}\r\n"
        caller.send(caller.request("INVITE", "forge-1", cseq=2, to_tag=to_tag,
                                   extra=route + forged))
        caller.finals()
        invites = [d for d in core.received if d.startswith(b"INVITE")]
        assert len(invites) >= 2
        for data in invites:
            low = data.lower()
            assert b"x-sipguard-identity" not in low and b"x-sipguard-verdict" not in low
            assert b"verstat" not in low
    finally:
        caller.close()


def test_an_unknown_source_is_not_a_reflector(stack: E2EStack, core: Core) -> None:
    """An INVITE from an unknown address whose Via names a victim port: the victim gets one
    403 no larger than the INVITE plus a little, no 100 Trying and no retransmission; with
    unknown_source: drop, nothing."""
    for mode, expected in (("reject", 1), ("drop", 0)):
        _, port = stack.sipguard(
            core_port=core.port, listen=("udp",),
            config_extra=(f"peers:\n  - name: lab\n    networks: [{HOST}/32]\n"
                          f"unknown_source: {mode}\n"),
        )
        victim = Listener(STRANGER)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((STRANGER, 0))
        try:
            invite = Caller(port, host=STRANGER).request(
                "INVITE", f"refl-{mode}", port=victim.port).replace(b";rport", b"")
            sender.sendto(invite, (HOST, port))
            heard = victim.heard(3.0)  # Timer G would have resent a 403 at 0.5, 1.5 s
            assert len(heard) == expected, (mode, heard)
            if heard:
                assert heard[0].startswith(b"SIP/2.0 403 ")
                assert len(heard[0]) <= len(invite) + 100
        finally:
            sender.close()
            victim.close()
        assert core.received == []
