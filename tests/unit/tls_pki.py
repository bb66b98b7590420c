"""A SIP TLS test PKI built with ``cryptography``: a CA, a server certificate for
``127.0.0.1`` / ``localhost`` / ``sip.test``, a client certificate (CN ``peer-a.test``), and a
second, unrelated CA — shared by the TLS transport unit tests and the TLS end-to-end test.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.unit.stir_pki import Key, make_cert, new_key, pem


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsFiles:
    """The PKI written out as PEM files."""

    ca: Path  # the CA both certificates chain to
    other_ca: Path  # a CA that signed neither
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def write_pki(folder: Path, client_cn: str = "peer-a.test") -> TlsFiles:
    """Make the CAs and certificates and write them into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, server_key, client_key = new_key(), new_key(), new_key(), new_key()
    ca = make_cert("SIP Test CA", ca_key, "SIP Test CA", ca_key, ca=True, tnauthlist=None)
    other = make_cert("Other CA", other_key, "Other CA", other_key, ca=True, tnauthlist=None)
    server = make_cert(
        "sip.test", server_key, "SIP Test CA", ca_key, ca=False, tnauthlist=None,
        san=[
            x509.DNSName("sip.test"),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    client = make_cert(
        client_cn, client_key, "SIP Test CA", ca_key, ca=False, tnauthlist=None,
        san=[x509.DNSName(client_cn)],
    )
    files = TlsFiles(
        folder / "ca.pem", folder / "other-ca.pem", folder / "server.pem",
        folder / "server.key", folder / "client.pem", folder / "client.key",
    )
    files.ca.write_bytes(pem(ca))
    files.other_ca.write_bytes(pem(other))
    files.server_cert.write_bytes(pem(server))
    files.server_key.write_bytes(_key_pem(server_key))
    files.client_cert.write_bytes(pem(client))
    files.client_key.write_bytes(_key_pem(client_key))
    return files
