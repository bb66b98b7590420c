"""A peer matched by its TLS client certificate (peers[].tls_subject), end to end: the
certificate's name makes the connection the peer; the same address with a certificate that
names something else is an unknown source."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.tls_pki import TlsFiles, write_pki

from .harness import E2EStack
from .test_tls_e2e import TlsUac, _context

pytestmark = pytest.mark.e2e


def _peer_bound_guard(stack: E2EStack, pki: TlsFiles, subject: str, verify_clients: bool) -> int:
    """A sipguard on UDP and TLS with one peer, 127.0.0.1/32 bound to ``subject`` by its TLS
    client certificate, in front of a SIPp UAS taking one call; its port."""
    uas = stack.uas("uas_basic.xml", transport="udp", calls=1, duration_ms=50)
    _, port = stack.sipguard(
        core_port=uas.local_port,
        listen=("udp", "tls"),
        config_extra=(
            f"tls: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}, "
            f"ca_file: {pki.ca}, verify_clients: {str(verify_clients).lower()}}}\n"
            f"peers:\n  - name: sbc\n    networks: [127.0.0.1/32]\n    tls_subject: {subject}\n"
        ),
    )
    return port


@pytest.mark.parametrize(("subject", "expected"), [("peer-a.test", 200), ("peer-b.test", 403)])
def test_a_tls_peer_is_known_by_its_certificate(
    stack: E2EStack, tmp_path: Path, subject: str, expected: int
) -> None:
    """With peers [{networks: 127.0.0.1/32, tls_subject: S}] and a client certificate for
    peer-a.test: S = peer-a.test lets the call through to the core; S = peer-b.test makes the
    same client an unknown source (403)."""
    pki = write_pki(tmp_path / "pki", client_cn="peer-a.test")
    port = _peer_bound_guard(stack, pki, subject, verify_clients=True)
    uac = TlsUac(port, _context(pki, with_cert=True))
    try:
        invite_status, _, _ = uac.call()
    finally:
        uac.close()
    assert invite_status == expected


def test_another_tls_connection_of_the_host_without_the_certificate_cannot_end_the_call(
    stack: E2EStack, tmp_path: Path
) -> None:
    """A call set up over TLS by the peer bound to its certificate; a second TLS connection
    from the same host without a client certificate (verify_clients off) sends the call's
    BYE: 403 — it is not the peer — and the peer's own BYE then ends the call."""
    pki = write_pki(tmp_path / "pki", client_cn="peer-a.test")
    port = _peer_bound_guard(stack, pki, "peer-a.test", verify_clients=False)
    uac = TlsUac(port, _context(pki, with_cert=True))
    intruder = TlsUac(port, _context(pki, with_cert=False))
    try:
        invite_status, bye_status, _ = uac.call(intruder)
    finally:
        uac.close()
        intruder.close()
    assert (invite_status, intruder.status, bye_status) == (200, 403, 200)
