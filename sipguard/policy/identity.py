"""Rule ``identity``: STIR/SHAKEN verification of the Identity header (RFC 8224, RFC 8225,
RFC 8588, ATIS-1000074), as the terminating verification service.

Checks, in this order; the first that fails decides (``reason`` in the decision log; the
answer from ``answers.<key>``):

1. an Identity header is present — else ``missing`` with ``require: true`` (``missing``, 428);
   without ``require`` the call goes on as ``No-TN-Validation``;
2. header syntax (RFC 8224 §4.1 with errata 6499): several Identity headers may come, those
   with ``ppt=shaken`` (or without ppt) are taken in order and the first that passes 3–6 is
   verified (none: the first one's failure) — ``malformed`` / ``compact_form`` /
   ``bad_header`` / ``bad_passport`` (``invalid``, 438); no ``info`` — ``no_info`` (``bad_info``,
   436);
3. PASSporT header ``alg`` ES256, ``ppt`` shaken, ``typ`` passport, ``x5u`` equal to ``info``
   (``x5u_mismatch``), claims ``attest``, ``orig.tn``, ``dest.tn``, ``iat``, ``origid`` present
   and well typed (``invalid``, 438);
4. freshness: ``|now - iat| <= freshness_s`` — ``stale`` (too old) or ``future`` (``stale``,
   403 Stale Date);
5. numbers: ``orig.tn`` is the caller (P-Asserted-Identity, else From; digits only) —
   ``orig_mismatch``; ``dest.tn`` holds the called number (Request-URI or To), or ``ppt=div``
   PASSporTs (RFC 8946) lead from it to the called number, each then verified as 6–8 say —
   ``dest_mismatch`` / ``div_invalid`` (``invalid``, 438);
6. the certificate at ``x5u``: the URL passes the fetch policy (https, ``x5u_ports``, no
   userinfo/query/fragment, public address unless ``allow_private_x5u``) — ``x5u_refused``;
   fetched (cached per URL) — ``fetch_<why>`` (timeout, too_large, connect, tls, http_status,
   refused, busy); parsed — ``bad_certificate`` (``bad_info``, 436). With ``on_fetch_error:
   no_validation`` a fetch that could not be made — ``fetch_timeout``, ``fetch_connect``,
   ``fetch_busy`` (no fetch slot), ``fetch_unavailable`` — is not a failure: the call goes on
   as ``No-TN-Validation`` with that reason;
7. the chain leads to a ``trust_anchors`` root at the current time, the leaf's key is P-256
   with a Key Usage allowing digitalSignature, and the leaf carries TNAuthList with a service
   provider code, or (a delegate certificate, RFC 9060) numbers that hold ``orig.tn`` —
   ``untrusted`` / ``expired`` / ``no_tnauthlist`` / ``unsupported_key`` /
   ``tn_not_authorized`` (``untrusted``, 437);
8. the ES256 signature verifies with the leaf's key — ``bad_signature`` (``invalid``, 438);
9. ``attest`` is at least ``min_attestation`` — ``low_attestation`` (``low_attestation``, 403),
   handled by ``on_low_attestation`` (default: as ``on_fail``).

Cheap checks come before the fetch, so a junk header never makes sipguard fetch anything.

Outcome. ``on_fail: reject`` answers the caller; ``on_fail: tag`` forwards the call marked
failed. Every INVITE that reaches the core carries ``identity_header`` (default
``X-Sipguard-Identity``; copies a peer sent are removed)::

    X-Sipguard-Identity: TN-Validation-Passed;attest=A;origid=123e4567-e89b-12d3-a456-426655440000
    X-Sipguard-Identity: TN-Validation-Failed;reason=stale;attest=B
    X-Sipguard-Identity: No-TN-Validation
    X-Sipguard-Identity: No-TN-Validation;reason=fetch_timeout   (on_fetch_error: no_validation)

The value is the 3GPP ``verstat`` (TS 24.229 §7.2A.20). The decision log line and the counters
get ``identity`` (``passed``/``failed``/``none``), ``identity_attest`` and ``identity_reason``
through ``CallInfo.labels``, where a later rule (callerid's verstat) can read them too.

I/O. On a certificate cache hit the rule answers at once (no await). On a miss it returns an
awaitable that fetches through the shell's :class:`~sipguard.policy.stircert.CertFetcher`
(``RuleState.fetcher``; one request per URL however many INVITEs wait) while the INVITE
waits in its server transaction. At most ``max_concurrent_fetches`` URLs are fetched at once,
``max_fetches_per_host`` of them from one host; a fetch beyond either fails at once
(``fetch_busy``). Fetched chains that verify are cached apart from failures (failed fetches,
unreadable or untrusted chains, ``negative_cache_entries``), both least recently used first
out, so failures never push a good chain out. Unix time for ``iat`` and certificate validity is
``now`` plus ``RuleState.wall_offset`` (kept current by the shell; 0 when ``now`` is Unix time).

Fails closed: anything that cannot be verified is a failure, answered per ``on_fail`` — except,
with ``on_fetch_error: no_validation``, a certificate that could not be fetched (the server
unreachable or slow, or no fetch slot), which leaves the call unvalidated, as if it carried no
Identity header. That option cannot go with ``require: true``: naming an unreachable x5u
would then be a way round ``require``.

Known limitations: the RFC 8224 compact form (payload left out) is refused (SHAKEN claims
cannot be rebuilt from SIP); no CRL or OCSP check; ``div`` / ``rcd`` PASSporTs are ignored;
caller and callee are compared as digits, so a national-format From (no country code) does
not match an E.164 ``orig.tn`` unless the peer has ``default_region``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from sipguard.contract import Verdict
from sipguard.policy import callerid
from sipguard.policy.passport import (
    ATTESTATIONS,
    Passport,
    PassportError,
    canonical_tn,
    decode_div,
    decode_passport,
    safe_origid,
    verify_signature,
)
from sipguard.policy.stircert import (
    CertCache,
    CertFetcher,
    FetchError,
    FetchLimits,
    TrustAnchors,
    UrlEntry,
    X5uRefused,
    cache_ttl,
    check_x5u,
    load_trust_anchors,
    parse_chain,
)
from sipguard.sip.errors import SipParseError
from sipguard.sip.identity import Identity, parse_identity

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from sipguard.contract import CallInfo
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.identity_settings import Settings
    from sipguard.policy.peers import Peer
    from sipguard.policy.settings import Answer
    from sipguard.policy.state import RuleState

PASSED: Final = "TN-Validation-Passed"
FAILED: Final = "TN-Validation-Failed"
NO_VALIDATION: Final = "No-TN-Validation"

# reason code -> answers.<key>
ANSWER_OF: Final = {
    "missing": "missing",
    "malformed": "invalid",
    "compact_form": "invalid",
    "bad_header": "invalid",
    "bad_passport": "invalid",
    "x5u_mismatch": "invalid",
    "orig_mismatch": "invalid",
    "dest_mismatch": "invalid",
    "div_invalid": "invalid",
    "bad_signature": "invalid",
    "stale": "stale",
    "future": "stale",
    "no_info": "bad_info",
    "x5u_refused": "bad_info",
    "bad_certificate": "bad_info",
    "untrusted": "untrusted",
    "expired": "untrusted",
    "no_tnauthlist": "untrusted",
    "unsupported_key": "untrusted",
    "tn_not_authorized": "untrusted",
    "low_attestation": "low_attestation",
}  # and fetch_* -> bad_info

# A certificate that could not be fetched at all (the server unreachable or too slow, no fetch
# slot, no fetcher): with on_fetch_error: no_validation the call goes on unvalidated. Anything
# the server did answer (TLS, HTTP status, size) or the URL policy refused stays a failure.
UNREACHABLE: Final = frozenset({"fetch_timeout", "fetch_connect", "fetch_busy", "fetch_unavailable"})
# div PASSporTs followed from a SHAKEN PASSporT's dest to the callee (RFC 8946), at most
MAX_DIV_HOPS: Final = 4


# ------------------------------------------------------------------------------- the rule


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, passport: Passport | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.passport = passport


class IdentityRule:
    """The built rule (one per peer; the certificate cache is shared by all and by reloads)."""

    def __init__(
        self,
        settings: Settings,
        mode: str,
        anchors: TrustAnchors,
        cache: CertCache,
        state: RuleState,
    ) -> None:
        self.name = "identity"
        self.mode = mode
        self.s = settings
        self.anchors = anchors
        self.cache = cache
        self.state = state
        self.min_rank = ATTESTATIONS.index(settings.min_attestation)
        self.limits = FetchLimits(
            ports=frozenset(settings.x5u_ports),
            allow_private=settings.allow_private_x5u,
            max_bytes=settings.fetch_max_bytes,
            timeout_s=settings.fetch_timeout_s,
            ca_bundle=str(settings.fetch_ca_bundle) if settings.fetch_ca_bundle else None,
            max_inflight=settings.max_concurrent_fetches,
            max_per_host=settings.max_fetches_per_host,
            max_waiting_per_host=settings.max_fetches_waiting_per_host,
        )
        header = settings.identity_header
        self.header_key = header.lower() if header else None
        self.pai_verstat = True  # put verstat on P-Asserted-Identity (see build())
        self.trust_pai = True  # the peer's P-Asserted-Identity is an identity (see build())

    # ------------------------------------------------------------------ decide
    def decide(self, call: CallInfo, now: float) -> Verdict | Awaitable[Verdict]:
        wall = now + self.state.wall_offset
        msg = call.msg
        if not msg.has("identity"):
            return self._absent(call)
        try:
            candidates = _select(msg.values("identity"))
        except _Failure as f:
            return self._fail(call, f)
        if not candidates:
            return self._absent(call)
        failure: _Failure | None = None
        passport: Passport | None = None
        for identity in candidates:  # the first that passes the checks before the fetch
            try:
                passport = self._check_token(identity, call, wall)
                break
            except _Failure as f:
                failure = failure or f
        if passport is None:
            assert failure is not None
            return self._fail(call, failure)
        if passport.diverted:
            return self._with_divs(call, passport, now, wall)
        entry = self.cache.lookup(passport.x5u, now)
        if entry is None:
            return self._fetch_then_finish(call, passport, now, wall)
        return self._finish(call, passport, entry, now, wall)

    def _check_token(self, identity: Identity, call: CallInfo, wall: float) -> Passport:
        """Steps 2–6 up to the fetch: everything that needs no certificate."""
        if identity.alg is not None and identity.alg != "ES256":
            raise _Failure("bad_header", f"Identity alg={identity.alg}, expected ES256")
        try:
            passport = decode_passport(identity.token)
        except PassportError as exc:
            raise _Failure(exc.reason, exc.detail) from None
        if identity.info is None:
            raise _Failure("no_info", "Identity header without info", passport)
        if passport.x5u != identity.info:
            raise _Failure("x5u_mismatch", "x5u is not the info URL", passport)
        age = wall - passport.iat
        if age > self.s.freshness_s:
            raise _Failure("stale", f"iat {age:.0f} s old", passport)
        if -age > self.s.freshness_s:
            raise _Failure("future", f"iat {-age:.0f} s in the future", passport)
        caller = canonical_tn(call.caller) if call.caller else None
        if caller is None or caller != passport.orig:
            raise _Failure("orig_mismatch", "orig.tn is not the caller", passport)
        if self.s.check_dest and not _dest_matches(call, passport):
            # retargeted (RFC 8946): div PASSporTs lead from dest to the callee, or it fails
            passport.diverted = self._div_chain(call, passport, wall)
            if not passport.diverted:
                raise _Failure("dest_mismatch", "dest.tn does not hold the called number",
                               passport)
        try:
            check_x5u(passport.x5u, self.limits.ports, self.limits.allow_private)
        except X5uRefused as refused:  # not ``exc``: mypyc gives one name one type per function
            raise _Failure("x5u_refused", str(refused), passport) from None
        return passport

    def _div_chain(self, call: CallInfo, passport: Passport, wall: float) -> tuple[
        Passport, ...
    ]:
        """The div PASSporTs (RFC 8946) among the call's Identity headers that lead from
        ``passport``'s dest to the callee — each of the same ``orig``, fresh, diverting a
        number the one before was for — or () when they do not (their signatures are checked
        later, by :meth:`_with_divs`). At most MAX_DIV_HOPS, the headers read once."""
        callee = canonical_tn(call.callee) if call.callee else None
        if callee is None:
            return ()
        divs: list[Passport] = []
        for text in call.msg.values("identity")[:16]:
            try:
                identity = parse_identity(text)
                if identity.ppt is None or identity.ppt.lower() != "div":
                    continue
                div = decode_div(identity.token)
            except (SipParseError, PassportError):
                continue
            if identity.info == div.x5u and div.orig == passport.orig \
                    and abs(wall - div.iat) <= self.s.freshness_s:
                divs.append(div)
        chain: list[Passport] = []
        reached = passport.dest
        while len(chain) < MAX_DIV_HOPS:
            step = next((d for d in divs if d.div in reached
                         and not any(d is c for c in chain)), None)
            if step is None:
                return ()
            chain.append(step)
            if callee in step.dest:
                return tuple(chain)
            reached = step.dest
        return ()

    async def _with_divs(
        self, call: CallInfo, passport: Passport, now: float, wall: float
    ) -> Verdict:
        """A retargeted call: the SHAKEN PASSporT as any, then each div PASSporT of its chain
        verified as well (x5u policy, certificate chain, a delegate certificate holding the
        diverting number, signature) — ``div_invalid`` when one is not."""
        entry = self.cache.lookup(passport.x5u, now)
        verdict: Verdict | Awaitable[Verdict] = (
            self._fetch_then_finish(call, passport, now, wall) if entry is None
            else self._finish(call, passport, entry, now, wall))
        if not isinstance(verdict, Verdict):
            verdict = await verdict
        if verdict.action == "reject" or (
                call.labels.get("identity") != "passed"
                and call.labels.get("identity_reason") != "low_attestation"):
            return verdict  # refused already, or not verified: its dest is moot
        for div in passport.diverted:
            why = await self._div_failure(div, now, wall)
            if why is not None:
                return self._fail(call, _Failure("div_invalid", why, passport))
        return verdict

    async def _div_failure(self, div: Passport, now: float, wall: float) -> str | None:
        """Why the div PASSporT ``div`` does not verify; None when it does."""
        try:
            check_x5u(div.x5u, self.limits.ports, self.limits.allow_private)
        except X5uRefused as refused:
            return f"div x5u: {refused}"
        entry = self.cache.lookup(div.x5u, now)
        fetcher: CertFetcher | None = self.state.fetcher
        if entry is None and fetcher is not None:
            entry = await self._fetch_entry(fetcher, div.x5u, now, wall)
        if entry is None or entry.chain is None:
            return f"div certificate: {entry.detail if entry is not None else 'no fetcher'}"
        result = self.cache.verdict(self.anchors, entry.chain, wall, now,
                                    self.s.negative_cache_s)
        if not result.ok or result.key is None:
            return f"div certificate: {result.detail}"
        if not result.covers(div.div):
            return "div.tn is not among the delegate certificate's numbers"
        if not verify_signature(div, result.key):
            return "div PASSporT signature"
        self.cache.promote(div.x5u, now)
        return None

    async def _fetch_then_finish(
        self, call: CallInfo, passport: Passport, now: float, wall: float
    ) -> Verdict:
        fetcher: CertFetcher | None = self.state.fetcher
        if fetcher is None:
            return self._fail(call, _Failure("fetch_unavailable", "no fetcher", passport))
        entry = await self._fetch_entry(fetcher, passport.x5u, now, wall)
        assert entry is not None
        verdict = self._finish(call, passport, entry, now, wall)
        if not isinstance(verdict, Verdict):  # the signature is checked on a thread
            verdict = await verdict
        return verdict

    async def _fetch_entry(
        self, fetcher: CertFetcher, url: str, now: float, wall: float, anew: bool = False
    ) -> UrlEntry | None:
        """The cache entry for ``url`` after fetching it: the chain, or why there is none
        (stored as the cache settings say). ``anew``: the cached chain may have been renewed
        at the same URL: nothing is stored (the caller stores what verifies), a failed fetch
        is None."""
        s = self.s
        try:
            fetched = await fetcher.fetch(url, self.limits)
        except FetchError as exc:
            if anew:
                return None
            entry = self.cache.lookup(url, now)  # another call may have stored it meanwhile
            if entry is None:
                entry = UrlEntry(None, f"fetch_{exc.reason}", exc.detail,
                                 now + s.negative_cache_s)
                if exc.cacheable and s.negative_cache_s > 0:
                    self.cache.store(url, entry, now)
            return entry
        entry = None if anew else self.cache.lookup(url, now)
        if entry is None:
            trusted = False
            try:
                chain = parse_chain(fetched.body)
            except ValueError as exc:
                entry = UrlEntry(None, "bad_certificate", f"not a certificate chain ({exc})",
                                 now + s.negative_cache_s)
            else:
                ttl = cache_ttl(fetched.cache_control, s.cache_min_s, s.cache_max_s)
                # a chain that does not verify is kept with the failures, and as briefly
                trusted = self.cache.verdict(self.anchors, chain, wall, now,
                                             s.negative_cache_s).ok
                if not trusted:
                    ttl = min(ttl, s.negative_cache_s)
                entry = UrlEntry(chain, "", "", now + ttl, now)
            if entry.expires > now and not anew:
                # with the failures until a signature verifies with it (CertCache.promote)
                self.cache.store(url, entry, now, False)
        return entry

    def _finish(
        self, call: CallInfo, passport: Passport, entry: UrlEntry, now: float, wall: float,
        renew: bool = True,
    ) -> Verdict | Awaitable[Verdict]:
        """Steps 6–9 with the certificate in hand: CPU only. The signature check goes to the
        shell's threads when it has some (``verify_threads``), the rest waits for it. A
        signature that fails with a chain fetched more than ``cache_min_s`` ago fetches the
        URL once more (``renew``): a provider that renewed its certificate at the same URL."""
        if entry.chain is None:
            failure = _Failure(entry.reason, entry.detail, passport)
            if self.s.on_fetch_error == "no_validation" and entry.reason in UNREACHABLE:
                return self._unvalidated(call, failure)
            return self._fail(call, failure)
        result = self.cache.verdict(self.anchors, entry.chain, wall, now, self.s.negative_cache_s)
        if not result.ok or result.key is None:
            return self._fail(call, _Failure(result.reason, result.detail, passport))
        if not result.covers(passport.orig):
            return self._fail(call, _not_authorized(passport))
        renew = renew and now - max(entry.fetched, self.cache.renewed.get(passport.x5u, 0.0)) \
            > self.s.cache_min_s
        verifier = self.state.verifier
        if verifier is not None:
            checked = verifier.submit(passport, result.key)
            if checked is not None:
                return self._after_check(call, passport, checked, now, wall, renew)
            valid = verifier.check_here(passport, result.key)
        else:
            valid = verify_signature(passport, result.key)
        if not valid and renew and self.state.fetcher is not None:
            return self._renew_then_finish(call, passport, now, wall)
        return self._signed(call, passport, valid, now)

    async def _after_check(
        self, call: CallInfo, passport: Passport, checked: Awaitable[bool], now: float,
        wall: float, renew: bool,
    ) -> Verdict:
        valid = await checked
        if not valid and renew and self.state.fetcher is not None:
            return await self._renew_then_finish(call, passport, now, wall)
        return self._signed(call, passport, valid, now)

    async def _renew_then_finish(
        self, call: CallInfo, passport: Passport, now: float, wall: float
    ) -> Verdict:
        """The signature failed with a chain cached for a while: fetch the URL again (the
        attempt remembered: none again for ``cache_min_s``, so forged signatures naming a
        provider's URL cost it one fetch a minute at most) and check with what it serves now.
        What it serves replaces the cached chain when it verifies to the trust anchors
        (whatever this call's signature does); a failed fetch, junk or an untrusted chain
        leave the provider's chain where it is (``bad_signature``)."""
        fetcher = self.state.fetcher
        assert fetcher is not None
        url = passport.x5u
        # (calls meanwhile share this fetch: the fetcher fetches one URL once at a time)
        entry = await self._fetch_entry(fetcher, url, now, wall, anew=True)
        self.cache.renewing(url, now)
        if entry is None or entry.chain is None:
            return self._signed(call, passport, False, now)  # the cached chain stays
        result = self.cache.verdict(self.anchors, entry.chain, wall, now,
                                    self.s.negative_cache_s)
        if not result.ok or result.key is None:
            return self._signed(call, passport, False, now)  # junk or untrusted: it stays
        # what the provider's URL serves now and the trust anchors vouch for replaces the
        # cached chain, whatever this call's signature does (a forged one must not keep
        # the renewed chain out)
        self.cache.store(url, entry, now, True)
        if not result.covers(passport.orig):
            return self._fail(call, _not_authorized(passport))
        return self._signed(call, passport, verify_signature(passport, result.key), now)

    def _signed(self, call: CallInfo, passport: Passport, valid: bool, now: float) -> Verdict:
        """Steps 8–9 once the signature has been checked."""
        if not valid:
            return self._fail(call, _Failure("bad_signature", "ES256 signature", passport))
        self.cache.promote(passport.x5u, now)
        if ATTESTATIONS.index(passport.attest) > self.min_rank:
            action = self.s.on_low_attestation or self.s.on_fail
            failure = _Failure("low_attestation", f"attest {passport.attest}", passport)
            return self._fail(call, failure, action)
        return self._pass(call, passport)

    # ------------------------------------------------------------------ verdicts
    def _edits(
        self, value: str | None, call: CallInfo | None = None
    ) -> tuple[tuple[str, str | None], ...]:
        """The identity header (and, when rule ``callerid`` does not do it, verstat on
        P-Asserted-Identity) for the forwarded INVITE."""
        edits: tuple[tuple[str, str | None], ...] = ()
        if self.header_key is not None:
            line = None if value is None else f"{self.s.identity_header}: {value}"
            edits = ((self.header_key, line),)
        if self.pai_verstat and call is not None and value is not None:
            pai = callerid.pai_with_verstat(call.msg, value.split(";", 1)[0], call.caller,
                                            self.trust_pai)
            if pai is not None:
                edits = (*edits, ("p-asserted-identity", pai or None))
        return edits

    def _absent(self, call: CallInfo) -> Verdict:
        if self.s.require:
            return self._fail(call, _Failure("missing", "no Identity header"))
        call.labels["identity"] = "none"
        return Verdict("accept", rule=self.name,
                       replace_headers=self._edits(NO_VALIDATION, call))

    def _unvalidated(self, call: CallInfo, failure: _Failure) -> Verdict:
        """The certificate could not be fetched (on_fetch_error: no_validation): forwarded as
        if unsigned, the reason kept; the PASSporT's claims, unverified, are not reported."""
        call.labels["identity"] = "none"
        call.labels["identity_reason"] = failure.reason
        value = f"{NO_VALIDATION};reason={failure.reason}"
        return Verdict("accept", rule=self.name, replace_headers=self._edits(value, call),
                       detail={"identity_detail": failure.detail})

    def _pass(self, call: CallInfo, passport: Passport) -> Verdict:
        call.labels["identity"] = "passed"
        call.labels["identity_attest"] = passport.attest
        value = f"{PASSED};attest={passport.attest}"
        origid = safe_origid(passport)
        if origid is not None:
            value += f";origid={origid}"
        return Verdict("accept", rule=self.name, replace_headers=self._edits(value, call))

    def _fail(self, call: CallInfo, failure: _Failure, action: str | None = None) -> Verdict:
        reason = failure.reason
        call.labels["identity"] = "failed"
        call.labels["identity_reason"] = reason
        value = f"{FAILED};reason={reason}"
        if failure.passport is not None:
            call.labels["identity_attest"] = failure.passport.attest
            value += f";attest={failure.passport.attest}"
        edits = self._edits(value, call)
        if (action or self.s.on_fail) == "tag":
            return Verdict("accept", rule=self.name, replace_headers=edits)
        answer: Answer = getattr(self.s.answers, ANSWER_OF.get(reason, "bad_info"))
        return Verdict(
            "reject",
            rule=self.name,
            reason=reason,
            status=answer.status,
            phrase=answer.phrase or "",
            headers=answer.headers,
            replace_headers=edits,  # reaches the core when the rule is monitored
            detail={"identity_detail": failure.detail},
        )


def _not_authorized(passport: Passport) -> _Failure:
    return _Failure("tn_not_authorized",
                    "orig.tn is not among the delegate certificate's numbers", passport)


def _select(values: list[str]) -> list[Identity]:
    """The SHAKEN Identity headers among several, in order: the ``ppt=shaken`` ones, else
    those without ppt (at most 8). Empty when only other PASSporT types came; ``malformed``
    when none parses."""
    parsed: list[Identity] = []
    error: str | None = None
    for text in values[:16]:
        try:
            parsed.append(parse_identity(text))
        except SipParseError as exc:
            error = exc.detail
    shaken = [i for i in parsed if i.ppt is not None and i.ppt.lower() == "shaken"]
    if not shaken:
        shaken = [i for i in parsed if i.ppt is None]
    if not shaken and error is not None:
        raise _Failure("malformed", error)
    return shaken[:8]


def _dest_matches(call: CallInfo, passport: Passport) -> bool:
    """dest.tn holds the called number as CallInfo has it: the Request-URI's (To's only when
    the Request-URI has no user part). Not To's beside it: a PASSporT captured from one call
    would otherwise pass for a call to any Request-URI that keeps the old To."""
    callee = canonical_tn(call.callee) if call.callee else None
    return callee is not None and callee in passport.dest


# ------------------------------------------------------------------------------- build


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> IdentityRule:
    """The rule for ``peer``; the certificate cache is ``RuleState.certs`` (kept on reload),
    bounded when this policy is activated by the largest ``cache_entries`` and
    ``negative_cache_entries`` of the config's identity sections (top level and peers), which
    the cache shares."""
    assert settings.trust_anchors is not None  # the settings validator insists
    anchors = load_trust_anchors(settings.trust_anchors)
    cache = ctx.state.certs
    sections = [s for s in (ctx.cfg.rules.identity, *(p.rules.identity for p in ctx.cfg.peers))
                if s is not None and s.enabled]
    entries = max((s.cache_entries for s in sections), default=settings.cache_entries)
    failures = max((s.negative_cache_entries for s in sections),
                   default=settings.negative_cache_entries)

    threads = max((s.verify_threads for s in sections if s.verify_threads != "auto"),
                  default=0)
    if any(s.verify_threads == "auto" for s in sections) and threads == 0:
        threads_setting: int | str = "auto"
    else:
        threads_setting = threads
    queued = max((s.verify_queue for s in sections), default=settings.verify_queue)

    def bound() -> None:
        cache.max_entries = entries
        cache.max_failures = failures
        verifier = ctx.state.verifier
        if verifier is not None:
            verifier.configure(threads_setting, queued)

    ctx.on_activate(bound)
    rule = IdentityRule(settings, ctx.mode_of(settings), anchors, cache, ctx.state)
    # verstat on P-Asserted-Identity is callerid's job when it is on with verstat; else ours
    cid = ctx.rules.callerid if ctx.rules is not None else None
    rule.pai_verstat = not (cid is not None and cid.enabled and cid.verstat)
    rule.trust_pai = peer is None or peer.trust_pai
    return rule
