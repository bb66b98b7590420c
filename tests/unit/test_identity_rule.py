"""Tests for rule ``identity``: STIR/SHAKEN verification through the proxy, against a real test
PKI and a real HTTPS x5u server on 127.0.0.1 (see ``stir_pki.py``).

Each call goes through the sans-I/O proxy (``Harness``) with the real policy; an asynchronous
decision (certificate fetch) is awaited the way the shell does, then ``proxy.resolve`` carries
on. Assertions are on what the caller hears and on whether the core saw the INVITE.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sipguard.contract import CallInfo, DecisionPending, Flow, InviteDecided, Verdict
from sipguard.edge import EdgeCore
from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.policy.stircert import FetchError, FetchLimits, parse_chain
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message
from sipguard.transport.https_fetch import HttpsFetcher

from .proxy_helpers import CALLER, CORE, Harness, invite, settings
from .stir_pki import (
    DEST,
    ORIG,
    Pki,
    Route,
    X5uServer,
    b64,
    identity_value,
    make_cert,
    new_key,
    pem,
    sign_passport,
    standard_routes,
)

CALLER_NUMBER = "+" + ORIG
CALLEE_NUMBER = "+" + DEST


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def x5u(pki: Pki) -> Iterator[X5uServer]:
    server = X5uServer(pki.server_context(), standard_routes(pki)).start()
    yield server
    server.stop()


@pytest.fixture
async def fetcher() -> AsyncIterator[HttpsFetcher]:
    f = HttpsFetcher()
    yield f
    await f.close()


class PolicyHarness(Harness):
    """The proxy harness deciding with a real Policy; pending (async) decisions are awaited
    together by :meth:`settle`, as the shell's tasks would run them."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.pending: list[tuple[CallInfo, Awaitable[Verdict]]] = []
        self.sync_decisions = 0
        super().__init__(self._decide)

    def _decide(self, call: CallInfo, now: float) -> Verdict | None:
        verdict = self.policy.decide(call, now)
        if isinstance(verdict, Verdict):
            self.sync_decisions += 1
            return verdict
        self.pending.append((call, verdict))
        return None

    async def settle(self) -> list[tuple[Flow, Message]]:
        pending, self.pending = self.pending, []
        verdicts = await asyncio.gather(*(aw for _, aw in pending))
        for (call, _), verdict in zip(pending, verdicts, strict=True):
            self.proxy.resolve(call, verdict, self.now)
        return self._drain()


@dataclass
class Outcome:
    status: int | None  # the final status the caller heard (None: forwarded, no answer yet)
    phrase: str
    forwarded: Message | None  # the INVITE as the core saw it
    labels: dict[str, str] = field(default_factory=dict)
    sync: bool = False  # decided without awaiting anything

    @property
    def identity_header(self) -> str | None:
        return self.forwarded.get("x-sipguard-identity") if self.forwarded else None


def outcome(out: list[tuple[Flow, Message]], h: PolicyHarness, sync: bool) -> Outcome:
    finals = [m for f, m in out if f.addr == CALLER and m.status >= 200]
    invites = [m for f, m in out if f.addr == CORE and m.method == "INVITE"]
    decided = [e for e in h.events if isinstance(e, InviteDecided)]
    return Outcome(
        finals[-1].status if finals else None,
        finals[-1].reason if finals else "",
        invites[-1] if invites else None,
        dict(decided[-1].call.labels) if decided else {},
        sync,
    )


class Stir:
    """One test's setting: a test PKI, the x5u server, a policy built from YAML settings."""

    def __init__(self, tmp: Path, pki: Pki, server: X5uServer, fetcher: HttpsFetcher) -> None:
        self.pki = pki
        self.server = server
        self.fetcher = fetcher
        self.anchors, self.bundle = pki.write(tmp)
        self.tmp = tmp
        self.wall = float(int(time.time()))  # whole seconds: iat arithmetic is exact
        self.state = RuleState(fetcher=fetcher, wall_offset=self.wall - 1000.0)
        self._hits = dict(server.hits)  # the server is shared by the module's tests
        self.policy = self.use()

    def hits(self, path: str) -> int:
        """Requests the x5u server got for ``path`` during this test."""
        return self.server.hits[path] - self._hits.get(path, 0)

    def settings(self, **over: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "trust_anchors": str(self.anchors),
            "fetch_ca_bundle": str(self.bundle),
            "allow_private_x5u": True,
            "x5u_ports": [self.server.port, 443],
        }
        base.update(over)
        return base

    def use(self, mode: str = "enforce", *, peers: list[dict[str, Any]] | None = None,
            **over: Any) -> Policy:
        """Build the policy with rules.identity = test defaults + ``over`` (and ``peers``) on
        the same RuleState, and swap it in (activate) as a reload does."""
        cfg: dict[str, Any] = {
            "listen": ["udp://192.0.2.1:5060"],
            "core": "udp://10.0.0.10:5080",
            "mode": mode,
            "rules": {"identity": self.settings(**over)},
        }
        if peers is not None:
            cfg["peers"] = peers
        self.policy = Policy(parse_config(json.dumps(cfg), base_dir=self.tmp), self.state)
        self.policy.activate()
        return self.policy

    def url(self, path: str = "/good.pem") -> str:
        return self.server.url(path)

    def token(self, path: str = "/good.pem", *, age: float = 0, **kw: Any) -> str:
        kw.setdefault("iat", int(self.wall - age))
        return sign_passport(self.pki.leaf_key, self.url(path), **kw)

    def header(self, path: str = "/good.pem", **kw: Any) -> str:
        return identity_value(self.token(path, **kw), self.url(path))

    async def call(
        self,
        identity: str | list[str] | None,
        *,
        n: int = 1,
        caller: str = CALLER_NUMBER,
        callee: str = CALLEE_NUMBER,
        extra: str = "",
        uri: str | None = None,
        later_s: float = 0.0,
    ) -> Outcome:
        h = PolicyHarness(self.policy)
        h.now += later_s  # the loop clock moves on; the wall clock (iat) stays
        offset = self.state.wall_offset
        self.state.wall_offset = offset - later_s
        try:
            values = [identity] if isinstance(identity, str) else identity or []
            lines = "".join(f"Identity: {v}\r\n" for v in values) + extra
            out = h.send(invite(caller=caller, callee=callee, extra=lines, uri=uri))
            sync = h.sync_decisions == 1
            out += await h.settle()
        finally:
            self.state.wall_offset = offset
        return outcome(out, h, sync)


@pytest.fixture
def stir(tmp_path: Path, pki: Pki, x5u: X5uServer, fetcher: HttpsFetcher) -> Stir:
    return Stir(tmp_path, pki, x5u, fetcher)


# ----------------------------------------------------------------------------- passes


@pytest.mark.parametrize("attest", ["A", "B", "C"])
async def test_valid_passport_is_forwarded_with_passed_verstat(stir: Stir, attest: str) -> None:
    """A valid PASSporT of each attestation level is forwarded marked passed with its level."""
    res = await stir.call(stir.header(attest=attest))
    assert res.status is None and res.forwarded is not None
    assert res.identity_header == (
        f"TN-Validation-Passed;attest={attest};origid=123e4567-e89b-12d3-a456-426655440000"
    )
    assert res.labels == {"identity": "passed", "identity_attest": attest}


async def test_identity_alone_puts_verstat_on_p_asserted_identity(stir: Stir) -> None:
    """With rule identity on and callerid off, the core still gets verstat: on the received
    P-Asserted-Identity, or on a tel: one for the E.164 caller when there was none."""
    pai = f"P-Asserted-Identity: <sip:{CALLER_NUMBER}@198.51.100.7;user=phone>\r\n"
    res = await stir.call(stir.header(), extra=pai)
    assert res.forwarded is not None
    assert "verstat=TN-Validation-Passed" in (res.forwarded.get("p-asserted-identity") or "")
    res = await stir.call(None)
    assert res.forwarded is not None
    assert res.forwarded.get("p-asserted-identity") == (
        f"<tel:{CALLER_NUMBER};verstat=No-TN-Validation>"
    )


async def test_second_call_is_decided_synchronously_from_the_cache(stir: Stir) -> None:
    """The first call fetches the certificate; the next one for the same x5u needs no await."""
    first = await stir.call(stir.header())
    second = await stir.call(stir.header())
    assert not first.sync and second.sync
    assert second.forwarded is not None and stir.fetcher.requests == 1


async def test_critical_tnauthlist_is_accepted(stir: Stir) -> None:
    """A leaf whose TNAuthList is marked critical (RFC 8226 allows it) still verifies."""
    res = await stir.call(stir.header("/crit.pem"))
    assert res.forwarded is not None, res


async def test_shaken_identity_is_picked_among_several(stir: Stir) -> None:
    """With a div PASSporT and a malformed header beside it, the shaken Identity is used."""
    div = identity_value(stir.token(), stir.url(), ppt="div")
    res = await stir.call(["garbage!!", div, stir.header()])
    assert res.labels["identity"] == "passed"


# ----------------------------------------------------------------------------- claims


async def test_tampered_payload_is_438(stir: Stir) -> None:
    """A payload changed after signing (attest C -> A) fails the signature: 438."""
    header, payload, sig = stir.token(attest="C").split(".")
    claims = json.loads(b64_decode(payload))
    claims["attest"] = "A"
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{sig}"
    res = await stir.call(identity_value(forged, stir.url()))
    assert (res.status, res.forwarded) == (438, None)
    assert res.labels["identity_reason"] == "bad_signature"


async def test_wrong_key_is_438(stir: Stir) -> None:
    """A PASSporT signed with a key other than the certificate's is 438."""
    from .stir_pki import new_key

    token = sign_passport(new_key(), stir.url(), iat=int(stir.wall))
    res = await stir.call(identity_value(token, stir.url()))
    assert (res.status, res.phrase, res.forwarded) == (438, "Invalid Identity Header", None)


async def test_orig_not_the_caller_is_438(stir: Stir) -> None:
    """orig.tn other than the caller's number is 438, before any fetch."""
    res = await stir.call(stir.header(orig="12125550111"))
    assert (res.status, res.labels["identity_reason"]) == (438, "orig_mismatch")
    assert stir.fetcher.requests == 0 and res.sync


async def test_dest_not_the_callee_is_438(stir: Stir) -> None:
    """dest.tn without the called number is 438."""
    res = await stir.call(stir.header(dest=("18005550100",)))
    assert (res.status, res.labels["identity_reason"]) == (438, "dest_mismatch")


async def test_a_passport_for_tos_number_does_not_pass_for_another_request_uri(
        stir: Stir) -> None:
    """dest.tn holds To's number, the Request-URI names another: 438 — a PASSporT captured
    from one call, replayed to another Request-URI with the old To, is not the callee's."""
    res = await stir.call(stir.header(), uri="sip:+19005551234@192.0.2.1:5060;user=phone")
    assert (res.status, res.labels["identity_reason"]) == (438, "dest_mismatch")


async def test_dest_check_can_be_switched_off(stir: Stir) -> None:
    """check_dest: false lets a retargeted call (dest.tn not the callee) pass."""
    stir.use(check_dest=False)
    res = await stir.call(stir.header(dest=("18005550100",)))
    assert res.forwarded is not None


async def test_iat_61s_old_is_403_stale_date(stir: Stir) -> None:
    """iat 61 s before now is outside the 60 s window: 403 Stale Date."""
    res = await stir.call(stir.header(age=61))
    assert (res.status, res.phrase, res.forwarded) == (403, "Stale Date", None)
    assert res.labels["identity_reason"] == "stale"


async def test_iat_60s_old_still_passes(stir: Stir) -> None:
    """iat exactly 60 s old is inside the window."""
    res = await stir.call(stir.header(age=60))
    assert res.forwarded is not None


async def test_iat_61s_in_the_future_is_403_stale_date(stir: Stir) -> None:
    """A future-dated iat fails too (other verifiers accept it)."""
    res = await stir.call(stir.header(age=-61))
    assert (res.status, res.phrase) == (403, "Stale Date")
    assert res.labels["identity_reason"] == "future"


async def test_garbage_identity_header_is_438(stir: Stir) -> None:
    """An Identity header that is not a JWS is 438."""
    res = await stir.call("this is not a jws;info=<https://x/y>")
    assert (res.status, res.labels["identity_reason"]) == (438, "malformed")


async def test_unsigned_header_claims_are_438(stir: Stir) -> None:
    """A PASSporT with typ/alg wrong is 438 (bad_header); one without info is 436."""
    res = await stir.call(stir.header(header={"alg": "RS256"}))
    assert (res.status, res.labels["identity_reason"]) == (438, "bad_header")
    res = await stir.call(stir.token())
    assert (res.status, res.labels["identity_reason"]) == (436, "no_info")


async def test_x5u_other_than_info_is_438(stir: Stir) -> None:
    """x5u must equal the info URL of the header."""
    res = await stir.call(identity_value(stir.token(), stir.url("/other.pem")))
    assert (res.status, res.labels["identity_reason"]) == (438, "x5u_mismatch")


async def test_compact_form_is_438(stir: Stir) -> None:
    """The RFC 8224 compact form (payload left out) cannot carry SHAKEN claims: 438."""
    h, _, s = stir.token().split(".")
    res = await stir.call(identity_value(f"{h}..{s}", stir.url()))
    assert (res.status, res.labels["identity_reason"]) == (438, "compact_form")


# ----------------------------------------------------------------------------- certificates


async def test_unknown_ca_is_437(stir: Stir) -> None:
    """A chain that ends at a root that is not a trust anchor is 437 Unsupported Credential."""
    res = await stir.call(stir.header("/rogue.pem"))
    assert (res.status, res.phrase, res.forwarded) == (437, "Unsupported Credential", None)
    assert res.labels["identity_reason"] == "untrusted"


async def test_expired_leaf_is_437(stir: Stir) -> None:
    """An expired SP certificate is 437."""
    res = await stir.call(stir.header("/expired.pem"))
    assert (res.status, res.labels["identity_reason"]) == (437, "expired")


async def test_leaf_without_tnauthlist_is_437(stir: Stir) -> None:
    """An SP certificate without TNAuthList is 437 even though its chain is trusted."""
    res = await stir.call(stir.header("/notn.pem"))
    assert (res.status, res.labels["identity_reason"]) == (437, "no_tnauthlist")


async def test_unparsable_certificate_is_436(stir: Stir) -> None:
    """A body that is not a certificate chain is 436 Bad Identity Info."""
    res = await stir.call(stir.header("/junk.pem"))
    assert (res.status, res.labels["identity_reason"]) == (436, "bad_certificate")


async def test_x5u_over_http_is_refused_without_fetching(stir: Stir) -> None:
    """An http:// x5u is 436 and nothing is fetched."""
    url = f"http://127.0.0.1:{stir.server.port}/good.pem"
    token = sign_passport(stir.pki.leaf_key, url, iat=int(stir.wall))
    res = await stir.call(identity_value(token, url))
    assert (res.status, res.labels["identity_reason"]) == (436, "x5u_refused")
    assert stir.fetcher.requests == 0 and stir.hits("/good.pem") == 0


async def test_x5u_port_not_allowed_is_refused(stir: Stir) -> None:
    """An x5u on a port outside x5u_ports is 436 without a fetch."""
    stir.use(x5u_ports=[443])
    res = await stir.call(stir.header())
    assert (res.status, res.labels["identity_reason"]) == (436, "x5u_refused")
    assert stir.fetcher.requests == 0


async def test_x5u_to_unreachable_port_is_436(stir: Stir) -> None:
    """A closed port answers 436 (fetch_connect), and the failure is cached briefly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stir.use(x5u_ports=[port])
    url = f"https://127.0.0.1:{port}/good.pem"
    token = sign_passport(stir.pki.leaf_key, url, iat=int(stir.wall))
    res = await stir.call(identity_value(token, url))
    assert (res.status, res.labels["identity_reason"]) == (436, "fetch_connect")
    again = await stir.call(identity_value(token, url))
    assert again.status == 436 and again.sync and stir.fetcher.requests == 1


async def test_x5u_returning_10mb_is_436(stir: Stir) -> None:
    """A 10 MB answer is refused at the size limit, with or without Content-Length."""
    for path in ("/big.pem", "/big-stream.pem"):
        res = await stir.call(stir.header(path))
        assert (res.status, res.labels["identity_reason"]) == (436, "fetch_too_large"), path


async def test_x5u_slower_than_the_timeout_is_436(stir: Stir) -> None:
    """An x5u server slower than fetch_timeout_s is 436 after the timeout, not later."""
    stir.use(fetch_timeout_s=0.3)
    started = time.monotonic()
    res = await stir.call(stir.header("/slow.pem"))
    assert (res.status, res.labels["identity_reason"]) == (436, "fetch_timeout")
    assert time.monotonic() - started < 0.9


async def test_http_error_and_redirect_are_436(stir: Stir) -> None:
    """A 404 and a 302 (redirects are not followed) are 436 fetch_http_status."""
    for path in ("/missing.pem", "/moved.pem"):
        res = await stir.call(stir.header(path))
        assert (res.status, res.labels["identity_reason"]) == (436, "fetch_http_status"), path
    assert stir.hits("/good.pem") == 0


async def test_untrusted_tls_server_is_436(stir: Stir) -> None:
    """Without fetch_ca_bundle the test server's TLS certificate is not trusted: 436."""
    stir.use(fetch_ca_bundle=None)
    res = await stir.call(stir.header())
    assert (res.status, res.labels["identity_reason"]) == (436, "fetch_tls")


async def test_private_address_refused_without_allow_private(stir: Stir) -> None:
    """127.0.0.1 as an IP literal, and localhost after resolution, are refused (SSRF)."""
    stir.use(allow_private_x5u=False)
    res = await stir.call(stir.header())
    assert (res.status, res.labels["identity_reason"]) == (436, "x5u_refused")
    url = stir.server.url("/good.pem", host="localhost")
    token = sign_passport(stir.pki.leaf_key, url, iat=int(stir.wall))
    res = await stir.call(identity_value(token, url))
    assert (res.status, res.labels["identity_reason"]) == (436, "fetch_refused")
    assert stir.hits("/good.pem") == 0


async def test_localhost_allowed_with_allow_private(stir: Stir) -> None:
    """With allow_private_x5u a host name resolving to 127.0.0.1 is fetched and verified."""
    url = stir.server.url("/good.pem", host="localhost")
    token = sign_passport(stir.pki.leaf_key, url, iat=int(stir.wall))
    res = await stir.call(identity_value(token, url))
    assert res.labels == {"identity": "passed", "identity_attest": "A"}


async def test_cache_control_max_age_is_honoured(stir: Stir) -> None:
    """A chain served with max-age=120 is fetched again only after 120 s."""
    stir.fetcher.linger_s = 0  # the fetcher's own short reuse window is real time
    await stir.call(stir.header("/maxage.pem"))
    stir.state.wall_offset -= 100  # keep iat fresh while the loop clock moves on
    h = PolicyHarness(stir.policy)
    h.now += 100
    token = identity_value(stir.token("/maxage.pem"), stir.url("/maxage.pem"))
    h.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, extra=f"Identity: {token}\r\n"))
    assert h.sync_decisions == 1
    h2 = PolicyHarness(stir.policy)
    h2.now += 121
    stir.state.wall_offset -= 21
    h2.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, extra=f"Identity: {token}\r\n"))
    assert h2.sync_decisions == 0
    await h2.settle()
    assert stir.hits("/maxage.pem") == 2


# ----------------------------------------------------------------------------- I/O behaviour


async def test_concurrent_invites_share_one_fetch(stir: Stir) -> None:
    """Twenty INVITEs arriving while the certificate is being fetched cause one request."""
    h = PolicyHarness(stir.policy)
    value = stir.header("/slowish.pem")
    for i in range(20):
        h.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, call_id=f"c{i}@x",
                      branch=f"z9hG4bK-sf-{i}", extra=f"Identity: {value}\r\n"))
    assert len(h.pending) == 20
    out = await h.settle()
    assert stir.hits("/slowish.pem") == 1 and stir.fetcher.requests == 1
    assert sum(1 for f, m in out if f.addr == CORE and m.method == "INVITE") == 20


async def test_fetches_beyond_the_limit_fail_fast_uncached(stir: Stir) -> None:
    """With max_concurrent_fetches: 1 a second URL fetched meanwhile is 436 fetch_busy at
    once, and is not remembered as a failure."""
    stir.use(max_concurrent_fetches=1)
    h = PolicyHarness(stir.policy)
    for i, path in enumerate(("/slowish.pem", "/good.pem")):
        h.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, call_id=f"b{i}@x",
                      branch=f"z9hG4bK-busy-{i}", extra=f"Identity: {stir.header(path)}\r\n"))
    out = await h.settle()
    finals = sorted(m.status for f, m in out if f.addr == CALLER and m.status >= 200)
    assert finals == [436]
    assert [e.call.labels.get("identity_reason") for e in h.events
            if isinstance(e, InviteDecided)] == [None, "fetch_busy"]
    res = await stir.call(stir.header("/good.pem"))
    assert res.labels["identity"] == "passed"


async def test_retransmission_during_fetch_is_absorbed(stir: Stir) -> None:
    """An INVITE retransmitted while its certificate is fetched gets 100 again; the core
    sees one INVITE, carrying the identity outcome."""
    h = PolicyHarness(stir.policy)
    data = invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER,
                  extra=f"Identity: {stir.header('/slowish.pem')}\r\n")
    first = h.send(data)
    h.now += 0.5
    again = h.send(data)
    assert [m.status for _, m in first] == [100] and [m.status for _, m in again] == [100]
    assert len(h.pending) == 1
    out = await h.settle()
    invites = [m for f, m in out if f.addr == CORE and m.method == "INVITE"]
    assert len(invites) == 1
    assert (invites[0].get("x-sipguard-identity") or "").startswith("TN-Validation-Passed")


async def test_cancel_during_fetch_answers_487(stir: Stir) -> None:
    """A CANCEL while the fetch runs ends the call with 487; the late verdict is dropped."""
    h = PolicyHarness(stir.policy)
    data = invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER,
                  extra=f"Identity: {stir.header('/slowish.pem')}\r\n")
    h.send(data)
    cancel = data.split(b"\r\n\r\n")[0].replace(b"INVITE sip", b"CANCEL sip").replace(
        b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL")
    cancel = cancel.replace(b"Content-Type: application/sdp\r\n", b"")
    cancel = cancel.split(b"Content-Length")[0] + b"Content-Length: 0\r\n\r\n"
    out = h.send(cancel)
    assert sorted(m.status for _, m in out) == [200, 487]
    out = await h.settle()
    assert not any(f.addr == CORE for f, _ in out)


def closed_port() -> int:
    """A local TCP port nothing listens on (a connection is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def header_at(stir: Stir, url: str) -> str:
    """A valid Identity header whose x5u and info are ``url``."""
    return identity_value(sign_passport(stir.pki.leaf_key, url, iat=int(stir.wall)), url)


def slow_routes(stir: Stir, *names: str, delay_s: float) -> None:
    """Good chains at /slow-<name>.pem answered after ``delay_s`` (the handler sleeps)."""
    for name in names:
        stir.server.routes[f"/slow-{name}.pem"] = Route(
            body=pem(stir.pki.leaf, stir.pki.inter), delay_s=delay_s)


async def test_slow_host_holding_its_slots_does_not_stop_another_host(stir: Stir) -> None:
    """max_concurrent_fetches 3, max_fetches_per_host 2, none waiting: three slow x5u URLs on
    127.0.0.1 get two fetch slots (the third fails at once, fetch_busy), and a call whose
    certificate is on another host (localhost) is fetched and passes while the slow ones
    still hang. Before per-host slots the slow host took all three slots and that call
    failed fetch_busy."""
    stir.use(max_concurrent_fetches=3, max_fetches_per_host=2, fetch_timeout_s=5,
             max_fetches_waiting_per_host=0)
    slow_routes(stir, "a", "b", "c", delay_s=1.5)
    urls = [stir.url(f"/slow-{n}.pem") for n in "abc"]
    urls.append(stir.server.url("/good.pem", host="localhost"))
    h = PolicyHarness(stir.policy)
    for i, url in enumerate(urls):
        h.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, call_id=f"host{i}@x",
                      branch=f"z9hG4bK-host-{i}", extra=f"Identity: {header_at(stir, url)}\r\n"))
    assert len(h.pending) == 4
    calls = [call for call, _ in h.pending]
    tasks = [asyncio.ensure_future(aw) for _, aw in h.pending]
    h.pending = []
    started = time.monotonic()
    other = await asyncio.wait_for(asyncio.shield(tasks[3]), 1.0)
    assert other.action == "accept" and calls[3].labels["identity"] == "passed"
    assert time.monotonic() - started < 1.0
    assert stir.fetcher.in_flight(f"127.0.0.1:{stir.server.port}") == 2 and not tasks[0].done()
    assert tasks[2].done() and tasks[2].result().status == 436
    assert calls[2].labels["identity_reason"] == "fetch_busy"
    verdicts = await asyncio.gather(*tasks)
    assert [v.action for v in verdicts] == ["accept", "accept", "reject", "accept"]
    assert stir.hits("/slow-c.pem") == 0 and stir.fetcher.in_flight(f"127.0.0.1:{stir.server.port}") == 0


async def test_fetcher_per_host_slots_over_https(stir: Stir) -> None:
    """HttpsFetcher alone: two slow fetches hold 127.0.0.1's two slots; a third URL there
    fails at once as busy (not cacheable) while localhost is fetched meanwhile; with one
    global limit only (the old behaviour) localhost would be busy too; once the slow ones
    end the host's slots are free again."""
    slow_routes(stir, "d", "e", delay_s=1.0)
    limits = FetchLimits(ports=frozenset({stir.server.port}), allow_private=True,
                         max_bytes=65536, timeout_s=5.0, ca_bundle=str(stir.bundle),
                         max_inflight=64, max_per_host=2)
    f = stir.fetcher
    slow = [asyncio.ensure_future(f.fetch(stir.url(f"/slow-{n}.pem"), limits)) for n in "de"]
    await asyncio.sleep(0)
    assert f.in_flight(f"127.0.0.1:{stir.server.port}") == 2
    with pytest.raises(FetchError) as caught:
        await f.fetch(stir.url("/good.pem"), limits)
    assert caught.value.reason == "busy" and not caught.value.cacheable
    assert "to 127.0.0.1" in caught.value.detail
    global_only = FetchLimits(ports=limits.ports, allow_private=True, max_bytes=65536,
                              timeout_s=5.0, ca_bundle=str(stir.bundle), max_inflight=2,
                              max_per_host=64)
    other = stir.server.url("/good.pem", host="localhost")
    with pytest.raises(FetchError, match="2 fetches in flight"):
        await f.fetch(other, global_only)
    started = time.monotonic()
    fetched = await f.fetch(other, limits)
    assert parse_chain(fetched.body).leaf == stir.pki.leaf
    assert time.monotonic() - started < 0.8 and f.in_flight(f"127.0.0.1:{stir.server.port}") == 2
    await asyncio.gather(*slow)
    assert f.in_flight(f"127.0.0.1:{stir.server.port}") == 0 and f.running == 0
    assert (await f.fetch(stir.url("/crit.pem"), limits)).body


async def test_a_thousand_failing_x5u_urls_do_not_evict_a_good_chain(stir: Stir) -> None:
    """With the smallest caches (16 each), 1,000 calls naming 1,000 unique x5u URLs that
    fail (connection refused) leave the carrier's chain cached: its next call is decided at
    once, without a fetch. Failures are kept in their own table."""
    port = closed_port()
    stir.use(x5u_ports=[stir.server.port, port], cache_entries=16, negative_cache_entries=16)
    assert (await stir.call(stir.header())).labels["identity"] == "passed"
    for i in range(1000):
        res = await stir.call(header_at(stir, f"https://127.0.0.1:{port}/junk-{i}.pem"))
        assert (res.status, res.labels["identity_reason"]) == (436, "fetch_connect")
    certs = stir.state.certs
    assert len(certs.failures) <= 16 and list(certs.urls) == [stir.url()]
    res = await stir.call(stir.header())
    assert res.sync and res.labels["identity"] == "passed"
    assert stir.hits("/good.pem") == 1


async def test_untrusted_chain_is_cached_with_the_failures(stir: Stir) -> None:
    """A fetched chain that does not verify (rogue CA) is remembered with the failures, not
    among the trusted chains, so it cannot push one out either."""
    await stir.call(stir.header("/rogue.pem"))
    await stir.call(stir.header())
    certs = stir.state.certs
    assert stir.url("/rogue.pem") in certs.failures and stir.url("/rogue.pem") not in certs.urls
    assert stir.url() in certs.urls


def test_cache_bounds_follow_the_config(stir: Stir) -> None:
    """cache_entries and negative_cache_entries set the shared cache's bounds when the policy
    is activated, smaller than the built-in defaults too."""
    stir.use(cache_entries=16, negative_cache_entries=32)
    assert (stir.state.certs.max_entries, stir.state.certs.max_failures) == (16, 32)
    stir.use()
    assert (stir.state.certs.max_entries, stir.state.certs.max_failures) == (10000, 1000)


async def test_on_fetch_error_no_validation_forwards_a_refused_fetch(stir: Stir) -> None:
    """on_fetch_error: no_validation — an x5u whose server refuses the connection leaves the
    call unvalidated: forwarded as No-TN-Validation with the reason, labelled identity none
    (counted identity_none, identity_reason_fetch_connect); the failure is cached, so the next
    call is decided at once the same way."""
    port = closed_port()
    stir.use(x5u_ports=[stir.server.port, port], on_fetch_error="no_validation")
    url = f"https://127.0.0.1:{port}/good.pem"
    res = await stir.call(header_at(stir, url))
    assert res.status is None and res.forwarded is not None
    assert res.identity_header == "No-TN-Validation;reason=fetch_connect"
    assert res.labels == {"identity": "none", "identity_reason": "fetch_connect"}
    again = await stir.call(header_at(stir, url))
    assert again.sync and again.identity_header == "No-TN-Validation;reason=fetch_connect"
    assert stir.fetcher.requests == 1


async def test_on_fetch_error_no_validation_covers_timeout_and_busy(stir: Stir) -> None:
    """A fetch that times out, and one that finds no free fetch slot, are unvalidated too."""
    stir.use(on_fetch_error="no_validation", fetch_timeout_s=0.3)
    res = await stir.call(stir.header("/slow.pem"))
    assert res.forwarded is not None
    assert res.identity_header == "No-TN-Validation;reason=fetch_timeout"
    stir.use(on_fetch_error="no_validation", max_concurrent_fetches=1)
    h = PolicyHarness(stir.policy)
    for i, path in enumerate(("/slowish.pem", "/good.pem")):
        h.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, call_id=f"nv{i}@x",
                      branch=f"z9hG4bK-nv-{i}", extra=f"Identity: {stir.header(path)}\r\n"))
    out = await h.settle()
    assert not [m for f, m in out if f.addr == CALLER and m.status >= 200]
    forwarded = [m.get("x-sipguard-identity") for f, m in out
                 if f.addr == CORE and m.method == "INVITE"]
    assert sorted(forwarded, key=str) == [
        "No-TN-Validation;reason=fetch_busy",
        "TN-Validation-Passed;attest=A;origid=123e4567-e89b-12d3-a456-426655440000",
    ]


async def test_on_fetch_error_no_validation_keeps_bad_answers_failures(stir: Stir) -> None:
    """Only an unreachable or busy fetch is let through: a server that answers 404, a body
    that is no certificate, an untrusted chain, and a TLS failure still fail (436/437)."""
    stir.use(on_fetch_error="no_validation")
    for path, want in (("/missing.pem", (436, "fetch_http_status")),
                       ("/junk.pem", (436, "bad_certificate")),
                       ("/rogue.pem", (437, "untrusted"))):
        res = await stir.call(stir.header(path))
        assert (res.status, res.labels["identity_reason"]) == want, path
    stir.use(on_fetch_error="no_validation", fetch_ca_bundle=None)
    res = await stir.call(stir.header())
    assert (res.status, res.labels["identity_reason"]) == (436, "fetch_tls")


async def test_on_fetch_error_reject_is_the_default(stir: Stir) -> None:
    """Without on_fetch_error a fetch that times out is 436, as before."""
    stir.use(fetch_timeout_s=0.3)
    res = await stir.call(stir.header("/slow.pem"))
    assert (res.status, res.labels["identity_reason"]) == (436, "fetch_timeout")


def test_no_validation_on_fetch_error_cannot_go_with_require(tmp_path: Path, pki: Pki) -> None:
    """require: true with on_fetch_error: no_validation is a config error (an unreachable
    x5u would get any call past require), also when a peer override makes the pair."""
    anchors, _ = pki.write(tmp_path)
    base = ("listen: udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\n")
    rules = f"rules:\n  identity: {{trust_anchors: {anchors}, on_fetch_error: no_validation"
    with pytest.raises(ConfigError, match="cannot go with require"):
        parse_config(base + rules + ", require: true}\n", base_dir=tmp_path)
    peer = ("peers:\n  - {name: c, networks: [203.0.113.0/24], "
            "rules: {identity: {require: true}}}\n")
    with pytest.raises(ConfigError, match=r"peers\[0\]|peers\.0|cannot go with require"):
        parse_config(base + peer + rules + "}\n", base_dir=tmp_path)
    assert parse_config(base + rules + "}\n", base_dir=tmp_path).rules.identity is not None


# ----------------------------------------------------------------------------- outcomes


async def test_missing_identity_with_require_is_428(stir: Stir) -> None:
    """require: true answers a call without Identity 428 Use Identity Header."""
    stir.use(require=True)
    res = await stir.call(None)
    assert (res.status, res.phrase, res.forwarded) == (428, "Use Identity Header", None)


async def test_missing_identity_without_require_is_forwarded_unvalidated(stir: Stir) -> None:
    """Without require a call without Identity goes on, marked No-TN-Validation."""
    res = await stir.call(None)
    assert res.identity_header == "No-TN-Validation" and res.sync
    assert res.labels == {"identity": "none"}


async def test_forged_outcome_header_from_peer_is_replaced(stir: Stir) -> None:
    """An X-Sipguard-Identity sent by the peer never reaches the core."""
    res = await stir.call(None, extra="X-Sipguard-Identity: TN-Validation-Passed;attest=A\r\n")
    assert res.forwarded is not None
    assert res.forwarded.values("x-sipguard-identity") == ["No-TN-Validation"]


async def test_on_fail_tag_forwards_failed_calls_marked(stir: Stir) -> None:
    """on_fail: tag forwards a failing call with TN-Validation-Failed and the reason."""
    stir.use(on_fail="tag")
    res = await stir.call(stir.header(age=61, attest="B"))
    assert res.status is None
    assert res.identity_header == "TN-Validation-Failed;reason=stale;attest=B"
    assert res.labels == {"identity": "failed", "identity_reason": "stale",
                          "identity_attest": "B"}


async def test_below_min_attestation_follows_on_low_attestation(stir: Stir) -> None:
    """min_attestation B: a C call is rejected 403 by default and tagged when so configured."""
    stir.use(min_attestation="B")
    res = await stir.call(stir.header(attest="C"))
    assert (res.status, res.labels["identity_reason"]) == (403, "low_attestation")
    assert (await stir.call(stir.header(attest="B"))).forwarded is not None
    stir.use(min_attestation="B", on_low_attestation="tag")
    res = await stir.call(stir.header(attest="C"))
    assert res.identity_header == "TN-Validation-Failed;reason=low_attestation;attest=C"


async def test_answers_are_configurable(stir: Stir) -> None:
    """answers.stale can change the status, phrase and headers of a stale-date reject."""
    stir.use(answers={"stale": {"status": 438, "phrase": "Too Old",
                                "headers": ['Reason: SIP;cause=438;text="stale"']}})
    res = await stir.call(stir.header(age=100))
    assert (res.status, res.phrase) == (438, "Too Old")


async def test_monitor_mode_forwards_failures_with_the_outcome(stir: Stir) -> None:
    """In monitor mode a failing call reaches the core, marked failed."""
    stir.use(mode="monitor")
    res = await stir.call(stir.header("/rogue.pem"))
    assert res.status is None
    assert res.identity_header == "TN-Validation-Failed;reason=untrusted;attest=A"


async def test_verstat_goes_on_the_verified_number_only(stir: Stir) -> None:
    """Rule identity putting verstat on P-Asserted-Identity (callerid off): with two PAI
    values only the signed caller's gets TN-Validation-Passed, and the other number's value
    is not forwarded; from a peer with trust_pai: false the peer's PAI (a number nobody
    checked) is replaced by the verified From number."""
    second = "<tel:+13125550111;verstat=TN-Validation-Passed>"
    res = await stir.call(stir.header(), extra=f"P-Asserted-Identity: <tel:{CALLER_NUMBER}>, "
                                               f"{second}\r\n")
    assert res.forwarded is not None
    assert res.forwarded.values("p-asserted-identity") == [
        f"<tel:{CALLER_NUMBER};verstat=TN-Validation-Passed>"]
    stir.use(peers=[{"name": "carrier", "networks": ["198.51.100.0/24"], "trust_pai": False}])
    res = await stir.call(stir.header(), extra="P-Asserted-Identity: <tel:+13125550111>\r\n")
    assert res.forwarded is not None
    assert res.forwarded.values("p-asserted-identity") == [
        f"<tel:{CALLER_NUMBER};verstat=TN-Validation-Passed>"]


async def test_an_iat_past_any_time_is_a_bad_passport_and_monitor_mode_forwards_it(
    stir: Stir,
) -> None:
    """iat 10**400 (past a float: the age computed from it would overflow) is refused as
    bad_passport (438), not an internal error (500), and a monitored rule lets the call on."""
    res = await stir.call(stir.header(iat=10**400))
    assert (res.status, res.forwarded) == (438, None)
    stir.use(mode="monitor")
    res = await stir.call(stir.header(iat=10**400))
    assert res.status is None and res.forwarded is not None
    assert res.identity_header == "TN-Validation-Failed;reason=bad_passport"


async def test_cache_survives_a_reload(stir: Stir) -> None:
    """A policy rebuilt from the same RuleState keeps the fetched certificates."""
    await stir.call(stir.header())
    stir.use(freshness_s=30)
    res = await stir.call(stir.header())
    assert res.sync and res.forwarded is not None and stir.fetcher.requests == 1


# ----------------------------------------------------------------------------- config


def test_identity_needs_trust_anchors(tmp_path: Path) -> None:
    """An enabled identity rule without trust_anchors is a config error naming the field."""
    text = "listen: udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\nrules:\n  identity: {}\n"
    with pytest.raises(ConfigError, match=r"rules.identity: .*trust_anchors is required"):
        parse_config(text, base_dir=tmp_path)


def test_identity_trust_anchors_must_be_certificates(tmp_path: Path) -> None:
    """A trust_anchors file that holds no certificate is a config error."""
    (tmp_path / "bad.pem").write_text("hello\n")
    text = ("listen: udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\nrules:\n"
            "  identity: {trust_anchors: bad.pem}\n")
    with pytest.raises(ConfigError, match="bad.pem"):
        parse_config(text, base_dir=tmp_path)


def test_example_config_identity_section_is_valid(tmp_path: Path, pki: Pki) -> None:
    """The commented identity example in config/sipguard.yaml validates once uncommented."""
    example = Path(__file__).parents[2] / "config" / "sipguard.yaml"
    lines = example.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   identity:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#  "):
            break
        block.append(line[1:])
    anchors, _ = pki.write(tmp_path)
    text = ("listen: udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\nrules:\n"
            + "\n".join(block).replace("sti-ca/", str(anchors)) + "\n")
    cfg = parse_config(text, base_dir=tmp_path)
    assert cfg.rules.identity is not None and cfg.rules.identity.trust_anchors == anchors


def b64_decode(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# ----------------------------------------------------------------------------- signature threads


async def test_signature_threads_follow_the_config(stir: Stir) -> None:
    """verify_threads / verify_queue size the shell's pool when the policy activates (as a
    reload does); ``auto`` follows the CPU affinity; back to 0, checks are in the loop."""
    from collections import Counter

    from sipguard.verify_threads import SignatureVerifier, auto_threads, available

    if not available():
        pytest.skip("sipguard._es256 not built (sipguard.native)")
    verifier = SignatureVerifier(asyncio.get_running_loop(), Counter())
    stir.state.verifier = verifier
    try:
        stir.use(verify_threads=2, verify_queue=5)
        assert (verifier.threads, verifier.max_pending) == (2, 5)
        stir.use()
        assert (verifier.threads, verifier.max_pending) == (auto_threads(), 1024)
        stir.use(verify_threads=0)
        assert verifier.threads == 0
    finally:
        verifier.close()


async def test_signatures_checked_on_a_thread_decide_the_same(stir: Stir) -> None:
    """With a thread the rule awaits the check (the decision is not synchronous) and the
    outcomes are those of the loop's check: a good PASSporT passes, a wrong key and a
    tampered payload are 438 bad_signature, a low attestation still follows its setting."""
    from collections import Counter

    from sipguard.verify_threads import SignatureVerifier, available

    from .stir_pki import new_key

    if not available():
        pytest.skip("sipguard._es256 not built (sipguard.native)")
    counters: Counter[str] = Counter()
    verifier = SignatureVerifier(asyncio.get_running_loop(), counters)
    stir.state.verifier = verifier
    try:
        stir.use(verify_threads=1, min_attestation="B", on_low_attestation="reject")
        await stir.call(stir.header())  # the certificate is fetched and cached first
        good = await stir.call(stir.header())
        assert not good.sync and good.status is None and good.forwarded is not None
        assert good.labels["identity"] == "passed"
        wrong = await stir.call(identity_value(
            sign_passport(new_key(), stir.url(), iat=int(stir.wall)), stir.url()))
        assert (wrong.status, wrong.labels["identity_reason"]) == (438, "bad_signature")
        low = await stir.call(stir.header(attest="C"))
        assert (low.status, low.labels["identity_reason"]) == (403, "low_attestation")
        assert counters["identity_verify_threaded"] == 4
        assert verifier.waiting == 0
    finally:
        verifier.close()


async def test_a_suspension_that_lands_while_the_decision_waits_holds(stir: Stir) -> None:
    """The caller is suspended while its INVITE waits for the certificate fetch: when the
    fetch has passed the signature, the caller hears 403 (caller_suspended), the core gets
    nothing and the call holds nothing. A call of another number decided in the same wait
    goes through."""
    core = EdgeCore(settings(), stir.policy, b"k" * 32)
    other = "+12125550111"
    for n, caller in enumerate((CALLER_NUMBER, other)):
        value = stir.header("/slowish.pem", orig=caller[1:])
        core.receive(invite(caller=caller, callee=CALLEE_NUMBER, call_id=f"late-{n}@x",
                            branch=f"z9hG4bK-late-{n}", extra=f"Identity: {value}\r\n"),
                     Flow("udp", CALLER, 0), 1000.0)
    events = core.drain_events()
    pending = [e for e in events if isinstance(e, DecisionPending)]
    assert len(pending) == 2, events
    stir.state.suspensions.add(CALLER_NUMBER, "ticket 7", "noc", 1000.5)
    verdicts = await asyncio.gather(*(e.pending for e in pending))
    assert [v.action for v in verdicts] == ["accept", "accept"]  # the rule passed both
    # as if a rule in monitor mode had objected to the first: still counted beside the 403
    verdicts[0] = Verdict("accept", rule="rate", reason="per_caller", status=503,
                          monitored=True)
    for event, verdict in zip(pending, verdicts, strict=True):
        core.resolve(event.call, verdict, 1001.0)
    out = [(f, parse_message(d)) for f, d in core.proxy.outbox]
    finals = [(m.call_id, m.status, m.get("reason")) for f, m in out
              if f.addr == CALLER and (m.status or 0) >= 200]
    assert finals == [("late-0@x", 403, 'SIP;cause=403;text="Caller number suspended"')]
    assert [m.call_id for f, m in out if f.addr == CORE and m.method == "INVITE"] == ["late-1@x"]
    decided = [e for e in core.drain_events() if isinstance(e, InviteDecided)]
    assert [(e.call.call_id, e.verdict.rule, e.verdict.reason) for e in decided] == [
        ("late-0@x", "suspended", "caller_suspended"), ("late-1@x", "", "")]
    assert [(a.rule, a.reason) for a in decided[0].verdict.also] == [("rate", "per_caller")]
    assert len(core.proxy.dialogs) == 1 and not core.proxy.pending


# ----------------------------------------------------------------------------- certificates


def _delegate(pki: Pki, tnauthlist: bytes) -> bytes:
    leaf = make_cert("SHAKEN delegate", pki.leaf_key, "STI-CA Test Intermediate", pki.inter_key,
                     ca=False, tnauthlist=tnauthlist)
    return pem(leaf, pki.inter)


async def test_a_delegate_certificate_signs_for_its_own_numbers_only(stir: Stir) -> None:
    """A delegate certificate (RFC 9060: TNAuthList holding telephone numbers or ranges, no
    service provider code) passes for a caller among its numbers; for any other caller it is
    ``tn_not_authorized`` (437) — it was refused whole before (``no_tnauthlist``)."""
    # SEQUENCE { [1] SEQUENCE { "12125550100", 100 } }: +1 212 555 0100 … 0199
    covering = bytes.fromhex("3014a1123010160b3132313235353530313030020164")
    # SEQUENCE { [2] "12125550999" }
    other = bytes.fromhex("300fa20d160b3132313235353530393939")
    stir.server.routes["/delegate-ok.pem"] = Route(body=_delegate(stir.pki, covering))
    stir.server.routes["/delegate-other.pem"] = Route(body=_delegate(stir.pki, other))
    res = await stir.call(stir.header("/delegate-ok.pem"))
    assert res.status is None and res.labels["identity"] == "passed"
    res = await stir.call(stir.header("/delegate-other.pem"))
    assert (res.status, res.labels["identity_reason"]) == (437, "tn_not_authorized")
    assert res.forwarded is None


async def test_a_leaf_without_digital_signature_key_usage_is_437(stir: Stir) -> None:
    leaf = make_cert("SHAKEN agreement", stir.pki.leaf_key, "STI-CA Test Intermediate",
                     stir.pki.inter_key, ca=False, key_usage="agreement")
    stir.server.routes["/agreement.pem"] = Route(body=pem(leaf, stir.pki.inter))
    res = await stir.call(stir.header("/agreement.pem"))
    assert (res.status, res.labels["identity_reason"]) == (437, "unsupported_key")


async def test_a_certificate_renewed_at_the_same_url_is_fetched_again(stir: Stir) -> None:
    """The provider renews its certificate (a new key) at the same x5u: the cached chain
    fails the new signatures, so once it is older than cache_min_s the URL is fetched again
    and the call passes — it heard 438 for up to cache_max_s (a day) before. Forged
    signatures naming the URL make it fetched at most once per cache_min_s."""
    stir.fetcher.linger_s = 0  # the fetcher's own short reuse window is real time
    path = "/renewed.pem"
    stir.server.routes[path] = Route(body=pem(stir.pki.leaf, stir.pki.inter))
    assert (await stir.call(stir.header(path))).labels["identity"] == "passed"
    assert stir.hits(path) == 1
    new_key_ = new_key()
    renewed = make_cert("SHAKEN 709J renewed", new_key_, "STI-CA Test Intermediate",
                        stir.pki.inter_key, ca=False)
    stir.server.routes[path] = Route(body=pem(renewed, stir.pki.inter))
    new_header = identity_value(sign_passport(new_key_, stir.url(path), iat=int(stir.wall)),
                                stir.url(path))
    # within cache_min_s (60 s) of the fetch: the cached chain decides, no fetch
    res = await stir.call(new_header, later_s=30)
    assert (res.status, res.labels["identity_reason"]) == (438, "bad_signature")
    assert stir.hits(path) == 1
    # later: fetched once more, and the new signature verifies
    res = await stir.call(new_header, later_s=120)
    assert res.status is None and res.labels["identity"] == "passed"
    assert stir.hits(path) == 2
    # forged signatures naming it: no fetch within cache_min_s of the last one ...
    forged = identity_value(sign_passport(new_key(), stir.url(path), iat=int(stir.wall)),
                            stir.url(path))
    for later in (130, 150, 170):
        assert (await stir.call(forged, later_s=later)).status == 438
    assert stir.hits(path) == 2
    # ... then one, and the provider's chain stays where it is, trusted
    assert (await stir.call(forged, later_s=200)).status == 438
    assert stir.hits(path) == 3
    certs = stir.state.certs
    assert stir.url(path) in certs.urls
    res = await stir.call(new_header, later_s=201)
    assert res.labels["identity"] == "passed" and res.sync
    # a URL that serves junk, or fails, when fetched again: the chain in use stays, and the
    # failed attempt counts as one (no fetch per forged call)
    stir.server.routes[path] = Route(body=b"not a certificate")
    assert (await stir.call(forged, later_s=300)).status == 438
    stir.server.routes[path] = Route(status=500, body=b"oops")
    for later in (400, 420, 440):
        assert (await stir.call(forged, later_s=later)).status == 438
    assert stir.hits(path) == 5
    res = await stir.call(new_header, later_s=441)
    assert res.labels["identity"] == "passed" and res.sync and stir.url(path) in certs.urls


async def test_urls_whose_signatures_fail_never_push_a_providers_chain_out(stir: Stir) -> None:
    """Anyone can serve a copy of a real provider's chain at x5u URLs of their own; their
    forged PASSporTs all fail the signature. Such a chain waits with the failures and joins
    the trusted chains only once a signature verifies with it: with cache_entries 16, twenty
    such URLs leave the provider's chain cached (they evicted it before)."""
    stir.use(cache_entries=16, negative_cache_entries=16)
    certs = stir.state.certs
    assert (await stir.call(stir.header())).labels["identity"] == "passed"
    assert stir.url() in certs.urls
    body = pem(stir.pki.leaf, stir.pki.inter)
    forger = new_key()
    for i in range(20):
        path = f"/copy-{i}.pem"
        stir.server.routes[path] = Route(body=body)
        forged = identity_value(sign_passport(forger, stir.url(path), iat=int(stir.wall)),
                                stir.url(path))
        assert (await stir.call(forged)).labels["identity_reason"] == "bad_signature"
        assert stir.url(path) not in certs.urls
    assert stir.url() in certs.urls
    hits = stir.hits("/good.pem")
    res = await stir.call(stir.header())
    assert res.sync and res.labels["identity"] == "passed" and stir.hits("/good.pem") == hits
    # a chain that verified a signature is promoted at once
    stir.server.routes["/fresh.pem"] = Route(body=body)
    await stir.call(stir.header("/fresh.pem"))
    assert stir.url("/fresh.pem") in certs.urls


# ----------------------------------------------------------------------------- diverted calls

NEW_TARGET = "18005550123"


def sign_div(stir: Stir, *, key: Any = None, path: str = "/good.pem", orig: str = ORIG,
             div: str = DEST, dest: str = NEW_TARGET) -> str:
    """An Identity header with a div PASSporT (RFC 8946 §3): the call for ``div`` retargeted
    to ``dest``, signed ES256 by the retargeting party."""
    hdr = {"alg": "ES256", "ppt": "div", "typ": "passport", "x5u": stir.url(path)}
    claims = {"dest": {"tn": [dest]}, "div": {"tn": div}, "iat": int(stir.wall),
              "orig": {"tn": orig}}
    signing_input = f"{b64(json.dumps(hdr).encode())}.{b64(json.dumps(claims).encode())}"
    der = (key or stir.pki.leaf_key).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    token = f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    return identity_value(token, stir.url(path), ppt='"div"')


async def test_a_call_retargeted_with_a_div_passport_passes(stir: Stir) -> None:
    """The SHAKEN PASSporT names the number first called; the call was forwarded to another
    (Request-URI), and the forwarding party added a div PASSporT (RFC 8946) from the first to
    the second. Verified as a chain, the call passes — it heard 438 dest_mismatch before."""
    shaken = stir.header()  # dest: DEST
    res = await stir.call([shaken, sign_div(stir)], callee="+" + NEW_TARGET,
                          extra=f"Diversion: <sip:+{DEST}@192.0.2.9>;reason=unconditional\r\n")
    assert res.status is None and res.labels["identity"] == "passed", res
    # two hops: DEST -> 18005550150 -> NEW_TARGET, headers in any order
    first = sign_div(stir, dest="18005550150")
    second = sign_div(stir, div="18005550150")
    res = await stir.call([second, shaken, first], callee="+" + NEW_TARGET)
    assert res.labels["identity"] == "passed", res


async def test_a_div_passport_that_does_not_verify_or_lead_to_the_callee_fails(
    stir: Stir,
) -> None:
    shaken = stir.header()
    # no div: as before
    res = await stir.call(shaken, callee="+" + NEW_TARGET)
    assert (res.status, res.labels["identity_reason"]) == (438, "dest_mismatch")
    # a forged div (signed by a key no certificate holds)
    res = await stir.call([shaken, sign_div(stir, key=new_key())], callee="+" + NEW_TARGET)
    assert (res.status, res.labels["identity_reason"]) == (438, "div_invalid")
    assert res.forwarded is None
    # a div for another caller, or from a number the SHAKEN PASSporT was not for
    for div in (sign_div(stir, orig="12125550999"), sign_div(stir, div="18005550777")):
        res = await stir.call([shaken, div], callee="+" + NEW_TARGET)
        assert (res.status, res.labels["identity_reason"]) == (438, "dest_mismatch")
    # a div to another target than the call's
    res = await stir.call([shaken, sign_div(stir, dest="18005550888")], callee="+" + NEW_TARGET)
    assert (res.status, res.labels["identity_reason"]) == (438, "dest_mismatch")
    # a div whose certificate is untrusted
    res = await stir.call([shaken, sign_div(stir, path="/rogue.pem")], callee="+" + NEW_TARGET)
    assert (res.status, res.labels["identity_reason"]) == (438, "div_invalid")


async def test_of_several_shaken_headers_the_first_that_passes_the_early_checks_is_used(
    stir: Stir,
) -> None:
    """Two SHAKEN Identity headers (one added by a transit carrier, RFC 8224 §6.2.2): the
    order does not decide the outcome — a stale or mismatched one before a valid one no
    longer fails the call; when none passes, the first one's failure is the answer."""
    good = stir.header()
    stale = stir.header(age=3600)
    other = stir.header(orig="12125550999")
    for values in ([stale, good], [good, stale], [other, good]):
        res = await stir.call(values)
        assert res.status is None and res.labels["identity"] == "passed", values
    res = await stir.call([stale, other])
    assert (res.status, res.labels["identity_reason"]) == (403, "stale")


async def test_a_cold_cache_burst_on_one_repository_host_waits_for_its_slots(stir: Stir) -> None:
    """Six providers' certificates on one repository host, each answered in 0.3 s, a cold
    cache: with two slots per host the other four fetches wait for a slot (first come,
    first served) and every call passes — four of six heard 436 fetch_busy before. With one
    waiting place the burst's fourth and later calls are busy at once; a wait longer than
    fetch_timeout_s is busy too."""
    slow_routes(stir, *"uvwxyz", delay_s=0.3)

    async def burst(names: str) -> list[CallInfo]:
        h = PolicyHarness(stir.policy)
        for i, name in enumerate(names):
            url = stir.url(f"/slow-{name}.pem")
            h.send(invite(caller=CALLER_NUMBER, callee=CALLEE_NUMBER, call_id=f"{names}{i}@x",
                          branch=f"z9hG4bK-{names}-{i}",
                          extra=f"Identity: {header_at(stir, url)}\r\n"))
        calls = [call for call, _ in h.pending]
        await asyncio.gather(*(aw for _, aw in h.pending))
        return calls

    stir.fetcher.linger_s = 0
    calls = await burst("uvwxyz")
    assert [c.labels["identity"] for c in calls] == ["passed"] * 6
    assert stir.fetcher.in_flight(f"127.0.0.1:{stir.server.port}") == 0 and not stir.fetcher._waiting
    stir.state.certs.urls.clear()
    stir.state.certs.failures.clear()
    stir.use(max_fetches_waiting_per_host=1)
    calls = await burst("uvwxyz")
    reasons = [c.labels.get("identity_reason", c.labels["identity"]) for c in calls]
    assert reasons == ["passed"] * 3 + ["fetch_busy"] * 3
    stir.state.certs.urls.clear()
    stir.state.certs.failures.clear()
    stir.use(fetch_timeout_s=0.2)  # slower than the timeout: every fetch times out anyway
    calls = await burst("uvw")
    assert [c.labels.get("identity_reason") for c in calls] == ["fetch_timeout"] * 2 + [
        "fetch_busy"]
    assert not stir.fetcher._waiting


async def test_a_low_attestation_call_still_needs_its_div_chain(stir: Stir) -> None:
    """A verified PASSporT below min_attestation, tagged and forwarded (on_low_attestation:
    tag), naming another callee: its div chain is checked as for a passed one — a forged div
    does not turn a replayed PASSporT's dest_mismatch into a low_attestation tag."""
    stir.use(min_attestation="A", on_low_attestation="tag")
    shaken = stir.header(attest="B")
    res = await stir.call([shaken, sign_div(stir, key=new_key())], callee="+" + NEW_TARGET)
    assert (res.status, res.labels["identity_reason"]) == (438, "div_invalid")
    res = await stir.call([shaken, sign_div(stir)], callee="+" + NEW_TARGET)
    assert res.status is None and res.labels["identity_reason"] == "low_attestation"


async def test_fetches_waiting_for_a_host_go_first_come_first_served(stir: Stir) -> None:
    """HttpsFetcher alone, one slot per host, three waiting places: fetches queued behind a
    slow one start in the order they came, each handed the slot the one before frees (none
    re-queued, none overtaken by a newcomer); one more than the places is busy at once."""
    slow_routes(stir, "q1", "q2", "q3", "q4", "q5", delay_s=0.2)
    limits = FetchLimits(ports=frozenset({stir.server.port}), allow_private=True,
                         max_bytes=65536, timeout_s=5.0, ca_bundle=str(stir.bundle),
                         max_inflight=64, max_per_host=1, max_waiting_per_host=3)
    f = stir.fetcher
    done: list[str] = []

    async def one(name: str) -> None:
        await f.fetch(stir.url(f"/slow-{name}.pem"), limits)
        done.append(name)

    tasks = [asyncio.ensure_future(one("q1"))]
    for name in ("q2", "q3", "q4"):
        await asyncio.sleep(0.02)
        tasks.append(asyncio.ensure_future(one(name)))
    await asyncio.sleep(0.02)
    with pytest.raises(FetchError) as caught:
        await f.fetch(stir.url("/slow-q5.pem"), limits)
    assert caught.value.reason == "busy" and "3 waiting" in caught.value.detail
    await asyncio.gather(*tasks)
    assert done == ["q1", "q2", "q3", "q4"]
    assert f.in_flight(f"127.0.0.1:{stir.server.port}") == 0 and not f._waiting and f.running == 0


async def test_a_low_attestation_reject_stays_a_reject_whatever_its_div(stir: Stir) -> None:
    """on_low_attestation: reject with on_fail: tag: a C call is refused 403, with a bad div
    PASSporT too (its div failure, tagged by on_fail, turned the refusal into a forward)."""
    stir.use(min_attestation="A", on_low_attestation="reject", on_fail="tag")
    shaken = stir.header(attest="C")
    for divs in ([], [sign_div(stir)], [sign_div(stir, key=new_key())]):
        res = await stir.call([shaken, *divs], callee="+" + NEW_TARGET if divs else
                              CALLEE_NUMBER)
        assert (res.status, res.labels["identity_reason"]) == (403, "low_attestation"), divs


async def test_a_forged_call_fetching_a_renewed_chain_keeps_it_for_the_real_calls(
    stir: Stir,
) -> None:
    """A forged signature naming a provider's URL after it renewed its key: the re-fetch
    brings the renewed chain, which the trust anchors vouch for — it replaces the cached one
    although the forged call still fails, and the provider's real call a second later
    passes (it heard 438 until cache_min_s had passed again)."""
    stir.fetcher.linger_s = 0
    path = "/renewed-2.pem"
    stir.server.routes[path] = Route(body=pem(stir.pki.leaf, stir.pki.inter))
    assert (await stir.call(stir.header(path))).labels["identity"] == "passed"
    key2 = new_key()
    renewed = make_cert("SHAKEN renewed 2", key2, "STI-CA Test Intermediate",
                        stir.pki.inter_key, ca=False)
    stir.server.routes[path] = Route(body=pem(renewed, stir.pki.inter))
    forged = identity_value(sign_passport(new_key(), stir.url(path), iat=int(stir.wall)),
                            stir.url(path))
    assert (await stir.call(forged, later_s=120)).labels["identity_reason"] == "bad_signature"
    real = identity_value(sign_passport(key2, stir.url(path), iat=int(stir.wall)),
                          stir.url(path))
    res = await stir.call(real, later_s=121)
    assert res.labels["identity"] == "passed" and res.sync and stir.hits(path) == 2


async def test_a_failed_fetch_keeps_no_frame_of_the_fetch(stir: Stir) -> None:
    """A fetch that fails (404 from the real x5u server): its waiter gets the FetchError, and
    the shared task that answers further requests for ``linger_s`` keeps the failure without
    a traceback or context — a raised one held the fetch's frames, its response and buffers in
    a cycle only a full collection freed (an hour on), ~230 KB per failed fetch a caller could
    name with every INVITE."""
    limits = FetchLimits(ports=frozenset({stir.server.port}), allow_private=True,
                         max_bytes=65536, timeout_s=5.0, ca_bundle=str(stir.bundle),
                         max_inflight=64, max_per_host=2)
    f = stir.fetcher
    url = stir.url("/no-such-chain.pem")
    with pytest.raises(FetchError) as caught:
        await f.fetch(url, limits)
    assert caught.value.reason == "http_status"
    kept = f._inflight[(url, limits)].result()
    assert isinstance(kept, FetchError) and kept.reason == "http_status"
    assert kept.__traceback__ is None and kept.__context__ is None and kept.__cause__ is None
    with pytest.raises(FetchError):  # a second request within linger_s: the same failure
        await f.fetch(url, limits)


async def test_a_hanging_port_of_a_host_does_not_take_the_slots_of_its_other_port(
        stir: Stir) -> None:
    """A caller names the x5u server's host on another allowed port that never answers (a
    socket that listens and accepts nothing): those fetches hold that port's two slots, and
    the real repository on the same host's own port is still fetched at once — slots are
    counted per host and port (by host alone it waited, then failed busy)."""
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        dead = hang.getsockname()[1]
        limits = FetchLimits(ports=frozenset({stir.server.port, dead}), allow_private=True,
                             max_bytes=65536, timeout_s=1.5, ca_bundle=str(stir.bundle),
                             max_inflight=64, max_per_host=2)
        f = stir.fetcher
        stuck = [asyncio.ensure_future(f.fetch(f"https://127.0.0.1:{dead}/x{n}.pem", limits))
                 for n in range(2)]
        await asyncio.sleep(0)
        assert f.in_flight(f"127.0.0.1:{dead}") == 2
        started = time.monotonic()
        fetched = await f.fetch(stir.url("/good.pem"), limits)
        assert fetched.body and time.monotonic() - started < 1.0
        for task in stuck:
            with pytest.raises(FetchError):
                await task
