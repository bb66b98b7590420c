"""STIR/SHAKEN certificates: the x5u URL policy, chain validation to the STI-CA trust anchors,
the TNAuthList extension, and the caches that keep all of it off the per-call path.

Pure (sans-I/O): the HTTPS fetch itself is the shell's (``sipguard/transport/https_fetch.py``),
reached through the :class:`CertFetcher` protocol defined here; this module decides what may
be fetched (:func:`check_x5u`), how long a fetched chain is kept (:func:`cache_ttl`), and
whether a chain is trusted (:func:`verify_chain`).

Theory of operation:

- ``CertCache.lookup(url)`` gives the parsed chain behind an x5u URL, or the failure of the
  last attempt (negative caching), until the entry expires (``Cache-Control`` clamped to
  ``[cache_min_s, cache_max_s]``; failures for ``negative_cache_s``). Entries live in the
  rules' state (``RuleState.certs``), so a reload keeps them.
- Trusted chains and failures (failed fetches, unreadable or untrusted chains) are kept in two
  tables, each bounded and least-recently-used first out (a hit refreshes an entry): whatever
  a caller makes us fail on — a thousand unique x5u URLs — only ever pushes out other
  failures, never a carrier's certificate.
- ``CertCache.verdict(anchors, chain, wall)`` gives the result of validating that chain
  against that set of trust anchors (~0.2–0.4 ms with ``cryptography``), computed once per
  (anchors, chain) pair; the validity window of the verified chain is kept with it and checked
  on every use, so an expiring certificate fails from the second it expires. Trusted and
  failed verdicts are kept apart the same way.
- Chain validation uses ``cryptography.x509.verification``'s client verifier with the WebPKI
  defaults, except that the end-entity certificate need not carry subjectAltName (SHAKEN
  certificates identify a service provider by TNAuthList, not by name), may carry any
  extendedKeyUsage, and may mark TNAuthList critical (RFC 8226 §9 allows it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as xv

TNAUTHLIST_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.26")  # RFC 8226 id-pe-TNAuthList
ANCHOR_SUFFIXES = (".pem", ".crt", ".cer")
_DER = Encoding.DER

# ----------------------------------------------------------------------------- x5u URLs

# https://host[:port][/path] with nothing else: no userinfo, query or fragment (ATIS-1000074
# §5.3.1 asks for a plain HTTPS URL; anything more only widens what a caller can make us fetch).
_X5U = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)"
    r"(?P<query>\?[^#]*)?(?P<fragment>#.*)?",
    re.DOTALL,
)
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.\-]+))(?::(?P<port>\d{1,5}))?")
_PATH = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@%]*)*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BAD_CHARS = re.compile(r"[\x00-\x20\\\x7f]")


class X5uRefused(ValueError):
    """The x5u URL is one sipguard will not fetch (scheme, port, form, or address)."""


@dataclass(frozen=True, slots=True)
class X5u:
    """A checked x5u URL."""

    url: str
    host: str  # lower case; an IPv6 literal without brackets
    port: int
    path: str


# IPv4-compatible IPv6 addresses (::a.b.c.d, RFC 4291 §2.5.5.1, deprecated; routed over
# automatic tunnels where a host still has them): the IPv4 address in them decides
_IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local,
    shared (CGN), multicast, reserved and other special-purpose space, also when embedded in an
    IPv6 address (IPv4-mapped, 6to4, Teredo, NAT64)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (ip in _NAT64 or ip in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
        if ip.sixtofour is not None:
            # 6to4 (2002::/16) reaches the IPv4 address in it, which decides: Python's own
            # table counts the whole prefix as private in 3.11.2 (Debian 12), global in 3.11.7
            return True
    return ip.is_global and not ip.is_multicast


def check_x5u(url: str, ports: Iterable[int], allow_private: bool) -> X5u:
    """Check an x5u URL against the fetch policy; raise :class:`X5uRefused` saying why.

    Only ``https``; the port (443 when omitted) must be in ``ports``; no userinfo, query or
    fragment; an IP-literal host must be a public address unless ``allow_private`` (host
    names are checked again after resolution, by the fetcher). Numeric host forms that
    resolvers read as IPv4 (``2130706433``, ``127.1``, ``0x7f.1``) count as IP literals.
    Memoised: every call from one carrier names the same URL.
    """
    return _check_x5u(url, frozenset(ports), allow_private)


@lru_cache(maxsize=4096)
def _check_x5u(url: str, ports: frozenset[int], allow_private: bool) -> X5u:
    if len(url) > 2048 or not url.isascii() or _BAD_CHARS.search(url):
        raise X5uRefused("x5u has spaces, control or non-ASCII characters, or is too long")
    m = _X5U.fullmatch(url)
    if m is None:
        raise X5uRefused("x5u is not an absolute URL")
    if m["scheme"].lower() != "https":
        raise X5uRefused(f"x5u scheme {m['scheme']!r}: only https is fetched")
    if m["query"] is not None:
        raise X5uRefused("x5u has a query")
    if m["fragment"] is not None:
        raise X5uRefused("x5u has a fragment")
    authority = m["authority"]
    if "@" in authority:
        raise X5uRefused("x5u has userinfo")
    hm = _HOST.fullmatch(authority)
    if hm is None:
        raise X5uRefused(f"x5u host {authority!r} is not a host name or IP address")
    path = m["path"] or "/"
    if not _PATH.fullmatch(path):
        raise X5uRefused("x5u path has characters outside RFC 3986")
    port = int(hm["port"]) if hm["port"] is not None else 443
    if port not in ports:
        raise X5uRefused(f"x5u port {port} is not in x5u_ports")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if hm["v6"] is not None:
        try:
            ip = ipaddress.IPv6Address(hm["v6"])
        except ValueError:
            raise X5uRefused(f"x5u host [{hm['v6']}] is not an IPv6 address") from None
        host = str(ip)
    else:
        host = hm["name"].lower().rstrip(".")
        labels = host.split(".")
        if not host or not all(labels):
            raise X5uRefused(f"x5u host {hm['name']!r} is not a host name")
        last = labels[-1]
        if last.isdigit() or last.startswith("0x"):  # no TLD is numeric: an IPv4 attempt
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                raise X5uRefused(f"x5u host {host!r} is not a canonical IPv4 address") from None
    if ip is not None and not allow_private and not is_public_address(ip):
        raise X5uRefused(f"x5u host {host} is not a public address")
    return X5u(url, host, port, path)


# ----------------------------------------------------------------------------- fetching


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """What one certificate fetch may do (from the rule's settings)."""

    ports: frozenset[int]
    allow_private: bool
    max_bytes: int
    timeout_s: float
    ca_bundle: str | None  # PEM file trusted for the HTTPS connection, besides the system CAs
    max_inflight: int  # distinct URLs fetched at once; beyond it a fetch fails at once
    max_per_host: int = 2  # ... of them from one x5u host; beyond it a fetch waits for one
    max_waiting_per_host: int = 0  # fetches that may wait for a host's slot (0: none wait)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful fetch: the body and the response's Cache-Control (None when absent)."""

    body: bytes
    cache_control: str | None


class FetchError(Exception):
    """A fetch failed. ``reason``: ``refused`` (URL or address policy), ``connect``, ``tls``,
    ``timeout``, ``too_large``, ``http_status``, ``busy`` (no fetch slot: ``max_inflight`` in
    all, or ``max_per_host`` for the URL's host). ``cacheable`` is False for failures that say
    nothing about the URL (``busy``)."""

    def __init__(self, reason: str, detail: str, cacheable: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.cacheable = cacheable


class CertFetcher(Protocol):
    """The shell's HTTPS fetcher: one GET, within ``limits``; concurrent calls for one URL
    share one request. Raises :class:`FetchError`."""

    def fetch(self, url: str, limits: FetchLimits) -> Awaitable[Fetched]: ...


_DIRECTIVE = re.compile(r"\s*([A-Za-z\-]+)\s*(?:=\s*(\"[^\"]*\"|[^,\s]*))?\s*(?:,|$)")


def cache_ttl(cache_control: str | None, min_s: float, max_s: float) -> float:
    """How long to keep a fetched chain: ``s-maxage``/``max-age`` clamped to [min_s, max_s];
    ``no-store``/``no-cache`` count as 0 (so ``min_s``); no directive at all gives ``max_s``."""
    if not cache_control:
        return max_s
    age: float | None = None
    shared_age: float | None = None
    for name, value in _DIRECTIVE.findall(cache_control):
        name = name.lower()
        value = value.strip('"')
        if name in ("no-store", "no-cache"):
            return min_s
        if name in ("max-age", "s-maxage") and value.isdigit():
            if name == "max-age":
                age = float(value)
            else:
                shared_age = float(value)
    chosen = shared_age if shared_age is not None else age
    if chosen is None:
        return max_s
    return max(min_s, min(chosen, max_s))


# ----------------------------------------------------------------------------- trust anchors


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """The STI-CA root certificates chains must lead to."""

    certs: tuple[x509.Certificate, ...]
    store: xv.Store
    fingerprint: bytes  # identifies this set in the verification cache


def _read_pem_certs(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    if b"-----BEGIN" not in data:
        return [x509.load_der_x509_certificate(data)]
    return list(x509.load_pem_x509_certificates(data))


def load_trust_anchors(path: Path) -> TrustAnchors:
    """Read a PEM file, or every ``*.pem``/``*.crt``/``*.cer`` file in a folder; raise
    ValueError naming the file when one does not parse or none holds a certificate."""
    files = (
        sorted(p for p in path.iterdir() if p.suffix.lower() in ANCHOR_SUFFIXES and p.is_file())
        if path.is_dir()
        else [path]
    )
    certs: list[x509.Certificate] = []
    for file in files:
        try:
            certs.extend(_read_pem_certs(file))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{file}: not a PEM certificate file ({exc})") from None
    if not certs:
        raise ValueError(f"no certificate found in {path}")
    ders = sorted(c.public_bytes(_DER) for c in certs)
    return TrustAnchors(tuple(certs), xv.Store(certs), hashlib.sha256(b"".join(ders)).digest())


# ----------------------------------------------------------------------------- chains



class _TNAuthList(x509.ExtensionType):
    """Marker so the verifier's extension policy accounts for TNAuthList (parsed here)."""

    oid = TNAUTHLIST_OID

    def public_bytes(self) -> bytes:  # pragma: no cover - never serialised
        return b""


_CRIT = xv.Criticality.AGNOSTIC
_CA_POLICY = xv.ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY = (
    xv.ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, _CRIT, None)
    .may_be_present(x509.ExtendedKeyUsage, _CRIT, None)
    .may_be_present(_TNAuthList, _CRIT, None)
)


@dataclass(frozen=True, slots=True)
class CertChain:
    """The certificates an x5u URL served, leaf first."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    fingerprint: bytes  # SHA-256 over every DER, in order


# Certificates one x5u chain may hold: a SHAKEN chain is the leaf and one or two
# intermediates (ATIS-1000080); the path builder's work grows with them, and a chain padded
# with self-issued "CA" certificates sharing one name and key took ~25 times a real chain's
# validation, in the event loop.
MAX_CHAIN_CERTS: Final = 8


def parse_chain(body: bytes) -> CertChain:
    """A PEM chain (leaf first; ``application/pem-certificate-chain``) or one DER
    certificate; raise ValueError when it holds none, or more than
    :data:`MAX_CHAIN_CERTS`."""
    if b"-----BEGIN" in body:
        if body.count(b"-----BEGIN CERTIFICATE-----") > MAX_CHAIN_CERTS:
            raise ValueError(f"more than {MAX_CHAIN_CERTS} certificates in the chain")
        certs = list(x509.load_pem_x509_certificates(body))
    else:
        certs = [x509.load_der_x509_certificate(body)]
    digest = hashlib.sha256()
    for cert in certs:
        digest.update(cert.public_bytes(_DER))
    return CertChain(certs[0], tuple(certs[1:]), digest.digest())


def _der_items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The DER TLVs in data[start:end] as (tag, value start, value end); ValueError if bad."""
    out = []
    i = start
    while i < end:
        if i + 2 > end:
            raise ValueError("truncated DER")
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 3 or i + n > end:
                raise ValueError("bad DER length")
            length = int.from_bytes(data[i : i + n], "big")
            i += n
        if i + length > end:
            raise ValueError("DER value runs past its container")
        out.append((tag, i, i + length))
        i += length
    return out


def service_provider_codes(der: bytes) -> tuple[str, ...]:
    """The SPC entries of a TNAuthList extension value (see :func:`tn_auth_list`)."""
    return tn_auth_list(der)[0]


def tn_auth_list(der: bytes) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """The entries of a TNAuthList extension value (RFC 8226 §9, ATIS-1000080): its service
    provider codes, and its telephone numbers as (first number, count) ranges — a delegate
    certificate's (RFC 9060, ATIS-1000092) holds numbers instead of a code::

        TNAuthorizationList ::= SEQUENCE SIZE (1..MAX) OF TNEntry
        TNEntry ::= CHOICE { spc [0] ServiceProviderCode, range [1] TelephoneNumberRange,
                             one [2] TelephoneNumber }
        ServiceProviderCode ::= IA5String
        TelephoneNumberRange ::= SEQUENCE { start TelephoneNumber, count INTEGER (2..MAX) }
        TelephoneNumber ::= IA5String (SIZE (1..15)) (FROM ("0123456789#*"))

    The module uses EXPLICIT tags (``A0 len 16 len SPC``); the implicit forms (``80 len SPC``,
    ``A1`` holding the range's members, ``82 len TN``) seen from some CAs are read too. Raises
    ValueError when the value is not a TNAuthList.
    """
    top = _der_items(der, 0, len(der))
    if len(top) != 1 or top[0][0] != 0x30:
        raise ValueError("TNAuthList is not a SEQUENCE")
    codes: list[str] = []
    numbers: list[tuple[str, int]] = []
    for tag, s, e in _der_items(der, top[0][1], top[0][2]):
        if tag in (0xA0, 0xA2):
            inner = _der_items(der, s, e)
            if len(inner) != 1 or inner[0][0] != 0x16:
                raise ValueError("TNAuthList entry is not an IA5String")
            s, e = inner[0][1], inner[0][2]
        if tag in (0xA0, 0x80):
            code = der[s:e].decode("ascii", "replace")
            if code:
                codes.append(code)
        elif tag in (0xA2, 0x82):
            numbers.append((_tn(der[s:e]), 1))
        elif tag == 0xA1:
            inner = _der_items(der, s, e)
            if len(inner) == 1 and inner[0][0] == 0x30:  # explicit: the SEQUENCE inside
                inner = _der_items(der, inner[0][1], inner[0][2])
            if len(inner) != 2 or inner[0][0] != 0x16 or inner[1][0] != 0x02:
                raise ValueError("TNAuthList range is not (start, count)")
            raw = der[inner[1][1]:inner[1][2]]
            count = int.from_bytes(raw, "big", signed=True) if 0 < len(raw) <= 8 else 0
            if count < 1:
                raise ValueError("TNAuthList range count out of range")
            numbers.append((_tn(der[inner[0][1]:inner[0][2]]), count))
    return tuple(codes), tuple(numbers)


def _tn(raw: bytes) -> str:
    if not 1 <= len(raw) <= 15 or raw.strip(b"0123456789#*"):
        raise ValueError("TNAuthList telephone number is not 1-15 of 0-9 # *")
    return raw.decode("ascii")


def tn_covered(numbers: tuple[tuple[str, int], ...], tn: str) -> bool:
    """Whether ``tn`` (digits) is one of the numbers, or in one of the ranges (a range counts
    up from its first number, the numbers of its length: RFC 8226 §9)."""
    for start, count in numbers:
        if len(start) != len(tn):
            continue
        if count == 1:
            if tn == start:
                return True
        elif start.isdigit() and tn.isdigit() and 0 <= int(tn) - int(start) < count:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ChainResult:
    """Whether a chain is trusted and, when it is, the leaf's key and the chain's validity."""

    ok: bool
    reason: str  # "" when ok; else untrusted, expired, no_tnauthlist, unsupported_key
    detail: str
    key: ec.EllipticCurvePublicKey | None = None
    spc: str | None = None  # the leaf's service provider code (None: a delegate certificate)
    not_before: float = 0.0  # Unix time from which every certificate in the chain is valid
    not_after: float = 0.0  # ... and until which
    # a delegate certificate's numbers (first, count): the only callers it may sign for
    numbers: tuple[tuple[str, int], ...] = ()

    def covers(self, tn: str) -> bool:
        """The leaf may sign for ``tn``: a code covers every number, numbers themselves."""
        return not self.numbers or tn_covered(self.numbers, tn)


def _window(certs: Iterable[x509.Certificate]) -> tuple[float, float]:
    certs = list(certs)
    return (
        max(c.not_valid_before_utc.timestamp() for c in certs),
        min(c.not_valid_after_utc.timestamp() for c in certs),
    )


def verify_chain(chain: CertChain, anchors: TrustAnchors, wall: float) -> ChainResult:
    """Validate ``chain`` against ``anchors`` at Unix time ``wall`` (CPU only, ~0.2-0.4 ms)."""
    leaf = chain.leaf
    nb, na = _window([leaf])
    if not nb <= wall <= na:
        state = "not yet valid" if wall < nb else "expired"
        return ChainResult(False, "expired", f"leaf certificate {state}")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return ChainResult(False, "unsupported_key", "leaf key is not EC P-256 (ES256)")
    verifier = (
        xv.PolicyBuilder()
        .store(anchors.store)
        .time(dt.datetime.fromtimestamp(wall, dt.UTC))
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(chain.intermediates))
    except xv.VerificationError as exc:
        text = str(exc).split(" (encountered", 1)[0]
        reason = "expired" if "expired" in text or "not yet valid" in text else "untrusted"
        return ChainResult(False, reason, text[:200])
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        signs = usage.digital_signature
    except x509.ExtensionNotFound:
        signs = False
    if not signs:  # RFC 5280 §4.2.1.3; ATIS-1000080 asks for a critical Key Usage with it
        return ChainResult(False, "unsupported_key",
                           "leaf Key Usage does not allow digitalSignature")
    try:
        ext = leaf.extensions.get_extension_for_oid(TNAUTHLIST_OID)
    except x509.ExtensionNotFound:
        return ChainResult(False, "no_tnauthlist", "leaf certificate has no TNAuthList")
    value = ext.value
    try:
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        codes, numbers = tn_auth_list(raw)
    except ValueError as exc:
        return ChainResult(False, "no_tnauthlist", f"TNAuthList unreadable: {exc}")
    if not codes and not numbers:
        return ChainResult(False, "no_tnauthlist", "TNAuthList is empty")
    nb, na = _window(verified.chain)
    # a code authorises every number of its provider; numbers alone only themselves
    return ChainResult(True, "", "", key, codes[0] if codes else None, nb, na,
                       () if codes else numbers)


# ----------------------------------------------------------------------------- the cache


@dataclass(frozen=True, slots=True)
class UrlEntry:
    """What an x5u URL gave last time: a chain, or a failure (reason, detail)."""

    chain: CertChain | None
    reason: str
    detail: str
    expires: float  # on the caller's clock (``now``)
    fetched: float = 0.0  # when it was fetched (``now``)


class CertCache:
    """x5u URL -> chain, and (anchors, chain) -> verdict; bounded, shared across reloads.

    Two tables each: trusted chains (``urls``, ``verdicts``; at most ``max_entries``) and
    failures (``failures``: failed fetches, unreadable or untrusted chains; ``bad_verdicts``;
    at most ``max_failures``). Both are least recently used first out, so unique failing URLs
    only ever evict other failures."""

    def __init__(self, max_entries: int = 10000, max_failures: int = 1000) -> None:
        self.max_entries = max_entries
        self.max_failures = max_failures
        self.urls: OrderedDict[str, UrlEntry] = OrderedDict()
        self.failures: OrderedDict[str, UrlEntry] = OrderedDict()
        self.verdicts: OrderedDict[tuple[bytes, bytes], tuple[ChainResult, float]] = OrderedDict()
        self.bad_verdicts: OrderedDict[tuple[bytes, bytes], tuple[ChainResult, float]] = (
            OrderedDict()
        )
        # URL -> when a chain cached for it was last fetched again (a signature it failed)
        self.renewed: OrderedDict[str, float] = OrderedDict()

    def lookup(self, url: str, now: float) -> UrlEntry | None:
        """The entry for ``url`` until it expires (a hit makes it the most recently used)."""
        for table in (self.urls, self.failures):
            entry = table.get(url)
            if entry is None:
                continue
            if entry.expires <= now:
                del table[url]
                return None
            table.move_to_end(url)
            return entry
        return None

    def store(self, url: str, entry: UrlEntry, now: float, trusted: bool | None = None) -> None:
        """Remember ``entry`` for ``url``: with the trusted chains when ``trusted`` (default:
        whether it holds a chain), else with the failures."""
        if trusted is None:
            trusted = entry.chain is not None
        self.urls.pop(url, None)
        self.failures.pop(url, None)
        table, limit = (
            (self.urls, self.max_entries) if trusted else (self.failures, self.max_failures)
        )
        table[url] = entry
        if len(table) > limit:
            _trim(table, limit, lambda e: e.expires <= now)

    def renewing(self, url: str, now: float) -> None:
        """``url`` is being fetched again: not again before ``cache_min_s`` (bounded like the
        trusted chains)."""
        self.renewed.pop(url, None)
        self.renewed[url] = now
        while len(self.renewed) > self.max_entries:
            self.renewed.popitem(last=False)

    def promote(self, url: str, now: float) -> None:
        """A signature verified with the chain ``url`` gave: it joins the trusted chains. A
        chain fetched for a call waits with the failures until then — anyone can name an
        x5u serving a copy of a real provider's chain, and such URLs (their calls all fail
        the signature) must not push the providers' own out of the trusted table."""
        entry = self.failures.get(url)
        if entry is not None and entry.chain is not None:
            self.store(url, entry, now, True)

    def verdict(
        self, anchors: TrustAnchors, chain: CertChain, wall: float, now: float, retry_s: float
    ) -> ChainResult:
        """The cached verdict on ``chain`` (computed on first use); failures are computed
        again after ``retry_s`` and successes after a day, whatever happens meanwhile."""
        key = (anchors.fingerprint, chain.fingerprint)
        hit = self.verdicts.get(key) or self.bad_verdicts.get(key)
        if hit is not None and hit[1] > now:
            result = hit[0]
            (self.verdicts if result.ok else self.bad_verdicts).move_to_end(key)
        else:
            result = verify_chain(chain, anchors, wall)
            self.verdicts.pop(key, None)
            self.bad_verdicts.pop(key, None)
            if result.ok:
                table, limit, until = self.verdicts, self.max_entries, now + 86400.0
            else:
                table, limit, until = self.bad_verdicts, self.max_failures, now + retry_s
            table[key] = (result, until)
            if len(table) > limit:
                _trim(table, limit, lambda v: v[1] <= now)
        if result.ok and not result.not_before <= wall <= result.not_after:
            state = "not yet valid" if wall < result.not_before else "expired"
            return ChainResult(False, "expired", f"certificate chain {state}")
        return result


def _trim(table: dict[Any, Any], limit: int, expired: Callable[[Any], bool]) -> None:
    """Drop expired entries, then the least recently used (the front), until ``table`` is at
    90% of ``limit``."""
    for key in [k for k, v in table.items() if expired(v)]:
        del table[key]
    excess = len(table) - int(limit * 0.9)
    if excess > 0:
        for key in list(table)[:excess]:
            del table[key]
