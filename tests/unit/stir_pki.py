"""A STIR/SHAKEN test PKI built with ``cryptography``, PASSporT signing, and a local HTTPS
server for x5u: shared by the identity rule's unit tests and its end-to-end test.

- :class:`Pki`: an STI-CA root, an intermediate, an SP leaf with TNAuthList (SPC ``709J``),
  plus the bad variants (expired leaf, leaf without TNAuthList, a chain from an unknown CA), and
  a separate TLS CA with a server certificate for ``127.0.0.1`` / ``localhost``.
- :func:`sign_passport` / :func:`identity_value`: ES256 PASSporTs and Identity header values.
- :class:`X5uServer`: HTTPS on 127.0.0.1 in a thread, fixed routes, counts requests per path.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import json
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

TNAUTHLIST = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.26")
SPC_DER = bytes.fromhex("3008a00616043730394a")  # SEQUENCE { [0] IA5String "709J" }
ORIG = "12125550100"
DEST = "18005550199"
ORIGID = "123e4567-e89b-12d3-a456-426655440000"

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    subject: str,
    key: Key,
    issuer: str,
    issuer_key: Key,
    *,
    ca: bool,
    tnauthlist: bytes | None = SPC_DER,
    tn_critical: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    san: list[x509.GeneralName] | None = None,
    key_usage: str = "standard",
) -> x509.Certificate:
    """One certificate shaped like ATIS-1000080's: CA certs with basicConstraints and
    keyCertSign, SP leaves with digitalSignature and TNAuthList."""
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if key_usage != "none":  # "standard"; "agreement": keyAgreement only; "none": left out
        signs = not ca and key_usage == "standard"
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=signs, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=key_usage == "agreement",
                key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    if issuer != subject or issuer_key is not key:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if not ca and tnauthlist is not None:
        b = b.add_extension(x509.UnrecognizedExtension(TNAUTHLIST, tnauthlist), tn_critical)
    if san is not None:
        b = b.add_extension(x509.SubjectAlternativeName(san), False)
    return b.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


class Pki:
    """Every certificate and key the identity tests need, made fresh per instance."""

    def __init__(self) -> None:
        self.root_key, self.inter_key, self.leaf_key = new_key(), new_key(), new_key()
        self.root = make_cert("STI-CA Test Root", self.root_key, "STI-CA Test Root",
                              self.root_key, ca=True)
        self.inter = make_cert("STI-CA Test Intermediate", self.inter_key, "STI-CA Test Root",
                               self.root_key, ca=True)
        self.leaf = make_cert("SHAKEN 709J", self.leaf_key, "STI-CA Test Intermediate",
                              self.inter_key, ca=False)
        now = dt.datetime.now(dt.UTC)
        self.expired_leaf = make_cert(
            "SHAKEN 709J expired", self.leaf_key, "STI-CA Test Intermediate", self.inter_key,
            ca=False, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1),
        )
        self.notn_leaf = make_cert("SHAKEN no TNAuthList", self.leaf_key,
                                   "STI-CA Test Intermediate", self.inter_key, ca=False,
                                   tnauthlist=None)
        self.crit_tn_leaf = make_cert("SHAKEN critical TNAuthList", self.leaf_key,
                                      "STI-CA Test Intermediate", self.inter_key, ca=False,
                                      tn_critical=True)
        self.rogue_key = new_key()
        self.rogue_root = make_cert("Rogue Root", self.rogue_key, "Rogue Root", self.rogue_key,
                                    ca=True)
        self.rogue_leaf = make_cert("SHAKEN rogue", self.leaf_key, "Rogue Root",
                                    self.rogue_key, ca=False)
        # TLS for the x5u server: its own CA, trusted through fetch_ca_bundle
        self.tls_ca_key, self.tls_key = new_key(), new_key()
        self.tls_ca = make_cert("x5u TLS Test CA", self.tls_ca_key, "x5u TLS Test CA",
                                self.tls_ca_key, ca=True)
        self.tls_cert = make_cert(
            "localhost", self.tls_key, "x5u TLS Test CA", self.tls_ca_key, ca=False,
            tnauthlist=None,
            san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )

    def chains(self) -> dict[str, bytes]:
        """Served bodies by path."""
        return {
            "/good.pem": pem(self.leaf, self.inter),
            "/expired.pem": pem(self.expired_leaf, self.inter),
            "/notn.pem": pem(self.notn_leaf, self.inter),
            "/crit.pem": pem(self.crit_tn_leaf, self.inter),
            "/rogue.pem": pem(self.rogue_leaf, self.rogue_root),
            "/junk.pem": b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        }

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write the trust anchors (STI-CA root) and the TLS CA bundle; return both paths."""
        anchors = folder / "sti-ca"
        anchors.mkdir(exist_ok=True)
        (anchors / "root.pem").write_bytes(pem(self.root))
        bundle = folder / "x5u-tls-ca.pem"
        bundle.write_bytes(pem(self.tls_ca))
        return anchors, bundle

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # ssl loads a chain from files only; the context keeps it, so the files (a private
        # key among them) go as soon as it is loaded.
        with tempfile.TemporaryDirectory(prefix="sipguard-x5u-") as tmp:
            cert, key = Path(tmp) / "tls.pem", Path(tmp) / "tls.key"
            cert.write_bytes(pem(self.tls_cert, self.tls_ca))
            key.write_bytes(self.tls_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ))
            ctx.load_cert_chain(cert, key)
        return ctx


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_passport(
    key: Key,
    x5u: str,
    *,
    attest: str = "A",
    orig: str = ORIG,
    dest: tuple[str, ...] = (DEST,),
    iat: int | None = None,
    origid: str = ORIGID,
    header: dict[str, Any] | None = None,
) -> str:
    """A SHAKEN PASSporT signed ES256 (raw r || s), as a JWS compact serialisation."""
    hdr = {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": x5u, **(header or {})}
    claims = {"attest": attest, "dest": {"tn": list(dest)},
              "iat": int(time.time()) if iat is None else iat,
              "orig": {"tn": orig}, "origid": origid}
    signing_input = f"{b64(json.dumps(hdr).encode())}.{b64(json.dumps(claims).encode())}"
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def identity_value(token: str, info: str, ppt: str = '"shaken"') -> str:
    """An Identity header value (RFC 8224 §4.1) for ``token``."""
    return f"{token};info=<{info}>;alg=ES256;ppt={ppt}"


# ----------------------------------------------------------------------------- x5u server


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunked_close: bool = False  # no Content-Length: the body ends when the connection does


class X5uServer:
    """HTTPS on 127.0.0.1:<ephemeral> in a thread; ``hits`` counts requests per path."""

    def __init__(self, context: ssl.SSLContext, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with outer._lock:
                    outer.hits[self.path] += 1
                route = outer.routes.get(self.path)
                if route is None:
                    route = Route(404, b"not found")
                if route.delay_s:
                    time.sleep(route.delay_s)
                try:
                    self.send_response(route.status)
                    for k, v in route.headers.items():
                        self.send_header(k, v)
                    if route.chunked_close:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    view = memoryview(route.body)
                    for i in range(0, len(view), 65536):
                        self.wfile.write(view[i : i + 65536])
                except (OSError, ssl.SSLError):
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                try:
                    tls = context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                super().finish_request(tls, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="x5u-https",
                                       daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def start(self) -> X5uServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def standard_routes(pki: Pki) -> dict[str, Route]:
    """The routes every identity test uses: the chains, a 10 MB body (with and without
    Content-Length), a slow answer, a redirect, an error."""
    routes = {path: Route(body=body, headers={"Content-Type": "application/pem-certificate-chain"})
              for path, body in pki.chains().items()}
    big = b"A" * (10 * 1024 * 1024)
    routes["/big.pem"] = Route(body=big)
    routes["/big-stream.pem"] = Route(body=big, chunked_close=True)
    routes["/slow.pem"] = Route(body=pem(pki.leaf, pki.inter), delay_s=1.0)
    routes["/slowish.pem"] = Route(body=pem(pki.leaf, pki.inter), delay_s=0.3)
    routes["/moved.pem"] = Route(status=302, headers={"Location": "/good.pem"})
    routes["/maxage.pem"] = Route(body=pem(pki.leaf, pki.inter),
                                  headers={"Cache-Control": "public, max-age=120"})
    return routes
