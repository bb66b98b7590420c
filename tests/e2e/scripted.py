"""Scripted SIP parties for end-to-end tests that need exact control of every message: a core
that answers (or, on request, loses) requests, a caller that speaks UDP or TCP from any
127.0.0.x address, and a third party that counts what reaches it."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import uuid

from .harness import HOST

THIRD = "127.0.0.3"  # a third party that must never hear anything

def header(data: bytes, name: str) -> str:
    m = re.search(rb"^" + name.encode() + rb":[ \t]*([^\r\n]*)", data, re.M | re.I)
    return m.group(1).decode() if m else ""


def read_head(conn: socket.socket, seconds: float = 5.0) -> bytes:
    """What a stream brings until the end of a header block (a message without a body), or
    until it closes or ``seconds`` pass."""
    conn.settimeout(seconds)
    data = b""
    with contextlib.suppress(TimeoutError, OSError):
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65535)
            if not chunk:
                break
            data += chunk
    return data


class Core:
    """A UDP core that answers INVITE, BYE, INFO, MESSAGE, SUBSCRIBE and OPTIONS with 200 OK
    (copying what a UAS copies, Record-Route included) and records every request it gets.

    ``lose_byes``: BYEs are dropped unanswered and their call forgotten, so a later in-dialog
    OPTIONS for it is answered 481. ``only_top_via``: answers carry only the top Via (a broken
    core). ``forks``: an INVITE is answered 200 that many times, as a forking core whose ring
    group answers more than once (To tags ``core1``, ``core2`` …, Contacts ``agent1``, …).
    ``invite_from`` is where the last INVITE came from (sipguard), for :meth:`send`.
    ``ring``: Call-IDs whose INVITE is answered 180 only (a call that rings on)."""

    def __init__(self, *, lose_byes: bool = False, only_top_via: bool = False,
                 forks: int = 1, ring: frozenset[str] = frozenset()) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.lose_byes = lose_byes
        self.only_top_via = only_top_via
        self.forks = forks
        self.ring = ring
        self.forgotten: set[str] = set()
        self.invite_from: tuple[str, int] | None = None
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
            call_id = header(data, "Call-ID")
            if method == b"INVITE":
                self.invite_from = addr
            if method == b"BYE" and self.lose_byes:
                self.forgotten.add(call_id)
                continue
            if method == b"OPTIONS" and call_id in self.forgotten:
                self.sock.sendto(self.response(data, 481, "Call/Transaction Does Not Exist"),
                                 addr)
            elif method == b"INVITE" and call_id in self.ring:
                self.sock.sendto(self.response(data, 180, "Ringing"), addr)
            elif method == b"INVITE" and self.forks > 1:
                for leg in range(1, self.forks + 1):
                    self.sock.sendto(self.response(data, 200, "OK", leg), addr)
            elif method in (b"INVITE", b"BYE", b"INFO", b"MESSAGE", b"SUBSCRIBE", b"OPTIONS"):
                self.sock.sendto(self.response(data, 200, "OK"), addr)

    def response(self, req: bytes, status: int, phrase: str, leg: int = 1) -> bytes:
        head = req.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        keep = [ln for ln in head[1:] if re.match(
            r"(?i)(via|record-route|from|call-id|cseq|to)\s*:", ln)]
        out = []
        vias = 0
        for ln in keep:
            if re.match(r"(?i)via\s*:", ln):
                vias += 1
                if self.only_top_via and vias > 1:
                    continue
                if self.only_top_via:
                    ln = ln.split(",", 1)[0]
            if re.match(r"(?i)to\s*:", ln) and ";tag=" not in ln:
                ln += f";tag=core{leg}"
            out.append(ln)
        user = "core" if self.forks == 1 else f"agent{leg}"
        out.append(f"Contact: <sip:{user}@{HOST}:{self.port}>")
        return (f"SIP/2.0 {status} {phrase}\r\n" + "\r\n".join(out)
                + "\r\nContent-Length: 0\r\n\r\n").encode()

    def send(self, data: bytes) -> None:
        """A request from the core to sipguard (where the last INVITE came from)."""
        assert self.invite_from is not None
        self.sock.sendto(data, self.invite_from)

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

    def finals(self, seconds: float = 1.5, want: int = 1, call_id: str | None = None
               ) -> list[bytes]:
        got: list[bytes] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(got) < want:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(b"SIP/2.0") and not data.startswith(b"SIP/2.0 1") and (
                call_id is None or header(data, "Call-ID") == call_id
            ):
                got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()
