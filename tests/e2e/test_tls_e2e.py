"""End-to-end calls over TLS: a TLS UAC -> sipguard (tls:// listener, client certificates
verified) -> SIPp UAS over UDP as the core, on 127.0.0.1.

The installed SIPp (``SIPp v3.6.1-SCTP-PCAP-RTPSTREAM``) is built without TLS (no ``-t l1``,
no ``-tls_cert``), so the callers here are a small Python ``ssl`` UAC (INVITE, 200, ACK and BYE
over one TLS connection, the in-dialog requests routed by the Record-Route set) and a real SIPp
UAC over TCP behind ``socat``, which wraps its one TCP connection into one TLS connection with
the client certificate. The PKI is made with ``cryptography`` (:mod:`tests.unit.tls_pki`).
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.unit.tls_pki import TlsFiles, write_pki

from .harness import (
    HOST,
    E2EStack,
    _live,
    _parse_response,
    _split_header_values,
    free_port,
    stop_pid,
    wait_port_bound,
)

pytestmark = pytest.mark.e2e

CALLS = 5
SIPP_CALLS = 20


class TlsUac:
    """A hand-made SIP UAC over one TLS connection."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection((HOST, port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="sip.test")
        self.local_port = self.sock.getsockname()[1]
        self.port = port
        self.buf = b""
        self.status = 0  # (see call's intruder)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_message(self) -> bytes:
        """One framed message (headers + Content-Length body); CRLF keep-alives skipped."""
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
                n = int(m.group(1)) if m else 0
                if len(rest) >= n:
                    self.buf = rest[n:]
                    return head + sep + rest[:n]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("sipguard closed the TLS connection")
            self.buf += data

    def response(self, method: str) -> tuple[int, dict[str, list[str]]]:
        """The next final (or provisional, skipped) response to ``method``: its final one."""
        while True:
            parsed = _parse_response(self.recv_message())
            if parsed is None:
                continue
            code, hdrs = parsed
            if hdrs.get("cseq", ["1 ?"])[0].split()[-1] == method and code >= 200:
                return code, hdrs

    def via(self) -> str:
        return f"SIP/2.0/TLS {HOST}:{self.local_port};branch=z9hG4bK-tls-{uuid.uuid4().hex[:16]}"

    def call(self, intruder: TlsUac | None = None) -> tuple[int, int, list[str]]:
        """One call: INVITE, then ACK and BYE by the route set. (INVITE, BYE status,
        Record-Route entries.) With ``intruder`` (another connection), it sends the call's BYE
        first, its answer's status kept in ``intruder.status``."""
        call_id = f"tls-{uuid.uuid4().hex}@{HOST}"
        tag = uuid.uuid4().hex[:10]
        frm = f"<sip:+12125550199@{HOST}>;tag={tag}"
        to = f"<sip:+16465550199@{HOST}:{self.port}>"
        sdp = (
            f"v=0\r\no=tls 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
        self.send((
            f"INVITE sips:+16465550199@{HOST}:{self.port} SIP/2.0\r\nVia: {self.via()}\r\n"
            f"From: {frm}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sips:+12125550199@{HOST}:{self.local_port}>\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}"
        ).encode())
        code, hdrs = self.response("INVITE")
        if code >= 300:
            return code, 0, []
        rr: list[str] = []
        for v in hdrs.get("record-route", []):
            rr.extend(_split_header_values(v))
        contact = _split_header_values(hdrs["contact"][0])[0]
        m = re.search(r"<([^>]+)>", contact)
        target = m.group(1) if m else contact.split(";")[0]
        route = f"Route: {', '.join(reversed(rr))}\r\n" if rr else ""
        to_tagged = hdrs["to"][0]

        def request(method: str, cseq: int) -> bytes:
            return (
                f"{method} {target} SIP/2.0\r\nVia: {self.via()}\r\n{route}From: {frm}\r\n"
                f"To: {to_tagged}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
                "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()

        self.send(request("ACK", 1))
        if intruder is not None:
            intruder.send(request("BYE", 2).replace(
                f"SIP/2.0/TLS {HOST}:{self.local_port};".encode(),
                f"SIP/2.0/TLS {HOST}:{intruder.local_port};".encode()))
            intruder.status, _ = intruder.response("BYE")
        self.send(request("BYE", 3))
        bye, _ = self.response("BYE")
        return code, bye, rr


def _context(pki: TlsFiles, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if with_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def test_calls_over_tls_reach_a_udp_core(stack: E2EStack, tmp_path: Path) -> None:
    """Calls from a TLS client with a certificate complete through sipguard to a UDP core:
    Record-Route carries the TLS entry facing the caller and the UDP one facing the core; a
    client without a certificate is refused (verify_clients)."""
    pki = write_pki(tmp_path / "pki")
    uas = stack.uas("uas_basic.xml", transport="udp", calls=CALLS, duration_ms=50)
    guard, port = stack.sipguard(
        core_port=uas.local_port,
        listen=("udp", "tls"),
        config_extra=(
            f"tls: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}, "
            f"ca_file: {pki.ca}, verify_clients: true}}\n"
        ),
    )

    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        bare = TlsUac(port, _context(pki, with_cert=False))
        try:
            bare.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n")  # TLS 1.3: refused after the client's Finished
            bare.recv_message()
        finally:
            bare.close()
    guard.wait_event("tls_handshake_failed", 1, timeout=5.0)

    uac = TlsUac(port, _context(pki, with_cert=True))
    try:
        for _ in range(CALLS):
            invite, bye, rr = uac.call()
            assert (invite, bye) == (200, 200), guard.diagnostics()
            assert rr == [f"<sip:{HOST}:{port};lr>", f"<sip:{HOST}:{port};transport=tls;lr>"]
    finally:
        uac.close()
    res = stack.finish_uas(uas)
    assert res.successful == CALLS and res.failed == 0, res.describe()


def _start_socat(listen_port: int, tls_port: int, pki: TlsFiles, workdir: Path) -> subprocess.Popen[bytes]:
    """socat: TCP on 127.0.0.1:listen_port -> TLS to sipguard, the client certificate presented
    and sipguard's certificate verified against the test CA (one TLS connection per TCP one)."""
    socat = shutil.which("socat")
    assert socat is not None
    cmd = [
        socat,
        "-d",
        f"TCP-LISTEN:{listen_port},bind={HOST},reuseaddr,fork",
        f"OPENSSL:{HOST}:{tls_port},cafile={pki.ca},cert={pki.client_cert},"
        f"key={pki.client_key},verify=1",
    ]
    log = open(workdir / "socat_stderr.txt", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    _live[proc.pid] = proc  # killed at interpreter exit should the finally below be skipped
    return proc


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not on PATH (`make tools`)")
def test_sipp_calls_over_tls_via_socat(stack: E2EStack, tmp_path: Path) -> None:
    """Real SIPp calls over TLS: SIPp UAC over TCP -> socat (TLS client with the client
    certificate) -> sipguard's tls:// listener (verify_clients) -> SIPp UAS over UDP. Every
    call completes and sipguard decided every INVITE as arriving over TLS."""
    pki = write_pki(tmp_path / "pki")
    uas = stack.uas("uas_basic.xml", transport="udp", calls=SIPP_CALLS, duration_ms=50)
    guard, tls_port = stack.sipguard(
        core_port=uas.local_port,
        listen=("udp", "tls"),  # the udp:// listener is the socket toward the UDP core
        config_extra=(
            f"tls: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}, "
            f"ca_file: {pki.ca}, verify_clients: true}}\n"
        ),
    )
    wait_port_bound(tls_port, "tcp", timeout=5.0, proc=guard.proc)
    socat_port = free_port()
    socat = _start_socat(socat_port, tls_port, pki, tmp_path)
    try:
        wait_port_bound(socat_port, "tcp", timeout=5.0, proc=socat)
        uac = stack.uac(
            "uac_basic.xml",
            remote_port=socat_port,
            transport="tcp",
            calls=SIPP_CALLS,
            rate=20,
            duration_ms=50,
            timeout=30.0,
        )
        uas_res = stack.finish_uas(uas)
    finally:
        stop_pid(socat, grace=3.0)
    socat_log = (tmp_path / "socat_stderr.txt").read_text(errors="replace")
    detail = f"{uac.describe()}\n\n{uas_res.describe()}\n--- socat\n{socat_log[-3000:]}"
    assert not uac.timed_out, detail
    assert uac.successful == SIPP_CALLS and uac.failed == 0, detail
    assert uac.returncode == 0, detail
    assert uas_res.successful == SIPP_CALLS and uas_res.failed == 0, detail

    decided = guard.settle("invite_decided", timeout=5.0, expect=SIPP_CALLS)
    assert decided == SIPP_CALLS, guard.diagnostics()
    events = [e for e in list(guard.events) if e.get("event") == "invite_decided"]
    transports = [e.get("transport") for e in events]
    assert transports == ["tls"] * SIPP_CALLS, guard.diagnostics()
