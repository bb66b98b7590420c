"""TLS contexts for the TCP pool (RFC 3261 §26, RFC 5630): what ``tls://`` listeners present
and verify, and how sipguard verifies the far end of its own TLS connections.

:func:`build_contexts` reads the certificate files and makes the :class:`TlsContexts` the pool
uses; the shell calls it at start and on every reload (new connections use the new files, open
ones keep theirs). :func:`peer_names` gives a verified peer certificate's subject CN and SAN DNS
names, which the pool records per connection.
"""

from __future__ import annotations

import asyncio.sslproto
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TlsContexts", "build_contexts", "peer_names"]

# asyncio's TLS layer (``loop.start_tls``, which the pool's TLS connections use) gives every
# connection a read buffer of ``SSLProtocol.max_size``: 256 KiB in CPython 3.11 — about 1 GiB
# for ``sip.tcp_max_connections`` (4,096) idle TLS connections that anyone may open. A TLS
# record holds 16 KiB at most and a SIP message is read across reads, so 32 KiB loses
# nothing (the HTTPS certificate fetcher reads through it too).
TLS_READ_BUFFER = 32 * 1024
if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The SSL contexts of one config: ``server`` for ``tls://`` listeners (None: no
    certificate configured), ``core`` for connections to the core (``core_addr``, its host as
    configured and port), ``client`` for other outbound TLS connections; ``server_names`` maps
    such an address to the name its certificate must carry (the core's ``core_server_name``)."""

    server: ssl.SSLContext | None
    core: ssl.SSLContext
    client: ssl.SSLContext
    core_addr: tuple[str, int] | None = None
    server_names: dict[tuple[str, int], str] = field(default_factory=dict)

    def for_target(self, addr: tuple[str, int], host: str | None) -> tuple[ssl.SSLContext, str]:
        """The context and server name for an outbound connection to ``addr`` (``host``: the
        name it was resolved from, if any)."""
        key = (host or addr[0], addr[1])
        ctx = self.core if key == self.core_addr or addr == self.core_addr else self.client
        return ctx, self.server_names.get(key) or self.server_names.get(addr) or key[0]


def _client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
    also: Path | None = None,
) -> ssl.SSLContext:
    """Verifies servers against ``ca_file`` (None: the system's CAs), and ``also``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if also is not None:
        ctx.load_verify_locations(cafile=also)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file)  # offered when the far end asks for one
    return ctx


def build_contexts(
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    ca_file: Path | None = None,
    verify_clients: bool = False,
    core_ca_file: Path | None = None,
    core_server_name: str | None = None,
    core_addr: tuple[str, int] | None = None,
    peers_ca_file: Path | None = None,
) -> TlsContexts:
    """Read the files and make the contexts; OSError / ssl.SSLError (an OSError) / ValueError
    name what could not be loaded."""
    server: ssl.SSLContext | None = None
    if cert_file is not None and key_file is not None:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            server.load_cert_chain(cert_file, key_file)
        except (OSError, ValueError) as exc:
            raise _named(exc, f"tls.cert_file {cert_file} / tls.key_file {key_file}") from None
        if ca_file is not None:
            try:
                server.load_verify_locations(cafile=ca_file)
            except (OSError, ValueError) as exc:
                raise _named(exc, f"tls.ca_file {ca_file}") from None
            server.verify_mode = ssl.CERT_REQUIRED if verify_clients else ssl.CERT_OPTIONAL
        else:
            server.verify_mode = ssl.CERT_NONE
    try:
        core = _client_context(core_ca_file, cert_file, key_file)
    except (OSError, ValueError) as exc:
        raise _named(exc, f"tls.core_ca_file {core_ca_file}") from None
    # toward peers: the system's CAs, and tls.peers_ca_file (a PBX's private CA) — not
    # tls.ca_file, whose holder would then vouch for every server sipguard calls
    try:
        client = _client_context(None, cert_file, key_file, peers_ca_file) if (
            core_ca_file is not None or peers_ca_file is not None) else core
    except (OSError, ValueError) as exc:
        raise _named(exc, f"tls.peers_ca_file {peers_ca_file}") from None
    names = {core_addr: core_server_name} if core_addr and core_server_name else {}
    return TlsContexts(server, core, client, core_addr, names)


def _named(exc: BaseException, what: str) -> OSError:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OSError(f"cannot load {what}: {detail}")


def peer_names(cert: Any) -> tuple[str, ...]:
    """Subject CN and SAN DNS names of a certificate as ``SSLObject.getpeercert()`` gives it
    (a verified one; an unverified peer's is ``{}``): lower case, CNs first."""
    if not isinstance(cert, dict):
        return ()
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value).lower())
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and str(value).lower() not in names:
            names.append(str(value).lower())
    return tuple(names)
