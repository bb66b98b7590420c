"""Tests for the pure STIR certificate layer: x5u URL policy, Cache-Control, TNAuthList, chain
validation and the certificate cache (no I/O)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from sipguard.policy.stircert import (
    CertCache,
    TrustAnchors,
    UrlEntry,
    X5uRefused,
    cache_ttl,
    check_x5u,
    is_public_address,
    load_trust_anchors,
    parse_chain,
    service_provider_codes,
    tn_auth_list,
    tn_covered,
    verify_chain,
)

from .stir_pki import Pki, make_cert, pem

PORTS = (443, 8443)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def anchors(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> TrustAnchors:
    folder, _ = pki.write(tmp_path_factory.mktemp("anchors"))
    return load_trust_anchors(folder)


def test_plain_https_url_is_accepted() -> None:
    """A public https URL on 443 passes, host lower-cased, default port and path filled in."""
    x = check_x5u("https://Cert.Example.ORG/sp/709J.pem", PORTS, False)
    assert (x.host, x.port, x.path) == ("cert.example.org", 443, "/sp/709J.pem")
    assert check_x5u("https://cert.example.org:8443", PORTS, False).path == "/"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://cert.example.org/a.pem", "only https"),
        ("ftp://cert.example.org/a.pem", "only https"),
        ("https://user:pw@cert.example.org/a.pem", "userinfo"),
        ("https://cert.example.org@10.0.0.1/a.pem", "userinfo"),
        ("https://cert.example.org/a.pem?x=1", "query"),
        ("https://cert.example.org/a.pem#frag", "fragment"),
        ("https://cert.example.org:8080/a.pem", "port 8080"),
        ("https://cert.example.org:99999/a.pem", "port 99999"),
        ("https://cert.example.org/a b.pem", "spaces"),
        ("https://cert.example.org\\@evil/a.pem", "spaces, control"),
        ("https://127.0.0.1/a.pem", "not a public address"),
        ("https://10.1.2.3/a.pem", "not a public address"),
        ("https://169.254.169.254/latest/meta-data", "not a public address"),
        ("https://100.64.0.1/a.pem", "not a public address"),
        ("https://[::1]/a.pem", "not a public address"),
        ("https://[::ffff:127.0.0.1]/a.pem", "not a public address"),
        ("https://[fe80::1]/a.pem", "not a public address"),
        ("https://[64:ff9b::a00:1]/a.pem", "not a public address"),
        ("https://2130706433/a.pem", "canonical IPv4"),
        ("https://127.1/a.pem", "canonical IPv4"),
        ("https://0x7f.0.0.1/a.pem", "canonical IPv4"),
        ("https:///a.pem", "host"),
        ("cert.example.org/a.pem", "absolute URL"),
    ],
)
def test_x5u_policy_refuses(url: str, why: str) -> None:
    """Anything but a plain https URL on an allowed port and a public host is refused."""
    with pytest.raises(X5uRefused, match=why):
        check_x5u(url, PORTS, False)


def test_allow_private_permits_private_literals_only() -> None:
    """allow_private lets loopback through but not http, userinfo or bad ports."""
    assert check_x5u("https://127.0.0.1:8443/a.pem", PORTS, True).host == "127.0.0.1"
    with pytest.raises(X5uRefused):
        check_x5u("http://127.0.0.1:8443/a.pem", PORTS, True)
    with pytest.raises(X5uRefused):
        check_x5u("https://127.0.0.1:22/a.pem", PORTS, True)


@pytest.mark.parametrize(
    ("addr", "public"),
    [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("192.168.1.1", False),
     ("224.0.0.1", False), ("0.0.0.0", False), ("2002:7f00:1::", False),
     ("2002:808:808::", True), ("fc00::1", False)],
)
def test_public_address(addr: str, public: bool) -> None:
    """Special-purpose space, also embedded in IPv6 (6to4), is not public."""
    assert is_public_address(ipaddress.ip_address(addr)) is public


@pytest.mark.parametrize(
    ("header", "ttl"),
    [(None, 86400.0), ("max-age=120", 120.0), ("public, max-age=5", 60.0),
     ("max-age=999999", 86400.0), ("no-store", 60.0), ("no-cache, max-age=600", 60.0),
     ("s-maxage=300, max-age=100", 300.0), ("private", 86400.0), ('max-age="200"', 200.0)],
)
def test_cache_ttl(header: str | None, ttl: float) -> None:
    """Cache-Control is honoured between cache_min_s (60) and cache_max_s (86400)."""
    assert cache_ttl(header, 60.0, 86400.0) == ttl


def test_tnauthlist_explicit_and_implicit_spc() -> None:
    """The SPC is read from the explicit [0] IA5String form and the implicit form; TN
    entries are skipped."""
    assert service_provider_codes(bytes.fromhex("3008a00616043730394a")) == ("709J",)
    assert service_provider_codes(bytes.fromhex("300680043730394a")) == ("709J",)
    inner = b"\x16\x0b" + b"12125550100"  # [2] one TelephoneNumber, no SPC
    entry = b"\xa2" + bytes([len(inner)]) + inner
    assert service_provider_codes(b"\x30" + bytes([len(entry)]) + entry) == ()
    with pytest.raises(ValueError):
        service_provider_codes(bytes.fromhex("3009a00616043730394a"))


def test_chain_verification_results(pki: Pki, anchors: TrustAnchors) -> None:
    """A good chain is trusted with its SPC; rogue, expired and TNAuthList-less ones are not."""
    now = time.time()
    good = verify_chain(parse_chain(pem(pki.leaf, pki.inter)), anchors, now)
    assert good.ok and good.spc == "709J" and good.not_before <= now <= good.not_after
    assert verify_chain(parse_chain(pem(pki.rogue_leaf, pki.rogue_root)), anchors,
                        now).reason == "untrusted"
    assert verify_chain(parse_chain(pem(pki.expired_leaf, pki.inter)), anchors,
                        now).reason == "expired"
    assert verify_chain(parse_chain(pem(pki.notn_leaf, pki.inter)), anchors,
                        now).reason == "no_tnauthlist"
    assert verify_chain(parse_chain(pem(pki.leaf)), anchors, now).reason == "untrusted"
    later = good.not_after + 10
    assert verify_chain(parse_chain(pem(pki.leaf, pki.inter)), anchors,
                        later).reason == "expired"


def test_cache_keeps_verdicts_and_rechecks_validity(pki: Pki, anchors: TrustAnchors) -> None:
    """A cached verdict is reused, yet fails from the moment the chain expires."""
    cache = CertCache(100)
    chain = parse_chain(pem(pki.leaf, pki.inter))
    now = time.time()
    first = cache.verdict(anchors, chain, now, 0.0, 30.0)
    assert first.ok and len(cache.verdicts) == 1
    assert cache.verdict(anchors, chain, now, 1.0, 30.0) is first
    assert cache.verdict(anchors, chain, first.not_after + 1, 2.0, 30.0).reason == "expired"


def test_url_cache_expiry_and_bound() -> None:
    """URL entries expire at their time and the failure table stays within its bound."""
    cache = CertCache(20, max_failures=20)
    for i in range(30):
        cache.store(f"https://x/{i}", UrlEntry(None, "fetch_timeout", "", 10.0 + i), 0.0)
    assert len(cache.failures) <= 20 and not cache.urls
    assert cache.lookup("https://x/29", 5.0) is not None
    assert cache.lookup("https://x/29", 39.0) is None and "https://x/29" not in cache.failures


def _good(pki: Pki, expires: float = 1e9) -> UrlEntry:
    return UrlEntry(parse_chain(pem(pki.leaf, pki.inter)), "", "", expires)


def test_a_thousand_failing_urls_do_not_evict_a_good_chain(pki: Pki) -> None:
    """Failures are kept apart from trusted chains: 1,000 unique failing URLs fill (and
    churn) the failure table, and the good chain is still there."""
    cache = CertCache(16, max_failures=16)
    cache.store("https://cr.carrier.example/709J.pem", _good(pki), 0.0)
    for i in range(1000):
        cache.store(f"https://junk{i}.example/x.pem",
                    UrlEntry(None, "fetch_timeout", "", 100.0), 1.0)
    assert len(cache.failures) <= 16 and "https://junk999.example/x.pem" in cache.failures
    entry = cache.lookup("https://cr.carrier.example/709J.pem", 2.0)
    assert entry is not None and entry.chain is not None


def test_untrusted_chain_is_stored_with_the_failures(pki: Pki) -> None:
    """store(..., trusted=False) keeps a chain with the failures; a later trusted store of the
    same URL moves it (one table holds a URL at a time)."""
    cache = CertCache(16, max_failures=16)
    cache.store("https://a/x.pem", _good(pki), 0.0, trusted=False)
    assert "https://a/x.pem" in cache.failures and not cache.urls
    cache.store("https://a/x.pem", _good(pki), 0.0, trusted=True)
    assert "https://a/x.pem" in cache.urls and not cache.failures


def test_chain_cache_is_least_recently_used(pki: Pki) -> None:
    """A hit refreshes an entry: the carrier looked up all along survives a table full of
    newer chains; the oldest not looked up go first."""
    cache = CertCache(16, max_failures=16)
    for i in range(16):
        cache.store(f"https://c{i}/x.pem", _good(pki), 0.0)
    assert cache.lookup("https://c0/x.pem", 1.0) is not None
    cache.store("https://c16/x.pem", _good(pki), 1.0)  # over the bound: trimmed to 90%
    assert "https://c0/x.pem" in cache.urls
    assert "https://c1/x.pem" not in cache.urls and "https://c16/x.pem" in cache.urls
    assert len(cache.urls) <= 16


def test_failure_cache_is_least_recently_used() -> None:
    """The failure table is bounded and least recently used first out as well."""
    cache = CertCache(16, max_failures=16)
    for i in range(16):
        cache.store(f"https://f{i}/x.pem", UrlEntry(None, "fetch_connect", "", 100.0), 0.0)
    assert cache.lookup("https://f0/x.pem", 1.0) is not None
    cache.store("https://f16/x.pem", UrlEntry(None, "fetch_connect", "", 100.0), 1.0)
    assert "https://f0/x.pem" in cache.failures and "https://f1/x.pem" not in cache.failures


def test_untrusted_verdicts_do_not_evict_a_trusted_one(pki: Pki, anchors: TrustAnchors) -> None:
    """Verdicts on chains that do not verify are kept apart too: 40 distinct rogue chains
    leave the good chain's verdict cached."""
    from .stir_pki import make_cert

    cache = CertCache(16, max_failures=16)
    now = time.time()
    good = parse_chain(pem(pki.leaf, pki.inter))
    first = cache.verdict(anchors, good, now, 0.0, 30.0)
    for i in range(40):
        rogue = make_cert(f"SHAKEN rogue {i}", pki.leaf_key, "Rogue Root", pki.rogue_key,
                          ca=False)
        assert not cache.verdict(anchors, parse_chain(pem(rogue)), now, 1.0, 30.0).ok
    assert len(cache.bad_verdicts) <= 16 and len(cache.verdicts) == 1
    assert cache.verdict(anchors, good, now, 2.0, 30.0) is first



def test_a_leaf_whose_key_usage_does_not_allow_signatures_is_refused(
    pki: Pki, anchors: TrustAnchors
) -> None:
    """RFC 5280 §4.2.1.3, ATIS-1000080: the leaf's Key Usage must allow digitalSignature; a
    leaf with keyAgreement only, or with no Key Usage, signs no PASSporT."""
    now = time.time()
    for usage in ("agreement", "none"):
        leaf = make_cert(f"SHAKEN {usage}", pki.leaf_key, "STI-CA Test Intermediate",
                         pki.inter_key, ca=False, key_usage=usage)
        result = verify_chain(parse_chain(pem(leaf, pki.inter)), anchors, now)
        assert (result.ok, result.reason) == (False, "unsupported_key"), usage
        assert "digitalSignature" in result.detail


# SEQUENCE { [1] SEQUENCE { IA5String "12125550100", INTEGER 100 }, [2] IA5String "18005550199" }
DELEGATE_DER = bytes.fromhex("3023a1123010160b3132313235353530313030020164a20d160b3138303035353530313939")


def test_tnauthlist_numbers_of_a_delegate_certificate() -> None:
    """Telephone numbers and ranges (RFC 8226 §9), explicit and implicit tags; coverage counts
    up from a range's first number among numbers of its length."""
    codes, numbers = tn_auth_list(DELEGATE_DER)
    assert codes == () and numbers == (("12125550100", 100), ("18005550199", 1))
    implicit = bytes.fromhex("301fa110160b3132313235353530313030020102820b3138303035353530313939")
    assert tn_auth_list(implicit) == ((), (("12125550100", 2), ("18005550199", 1)))
    assert tn_covered(numbers, "12125550100") and tn_covered(numbers, "12125550199")
    assert not tn_covered(numbers, "12125550200") and not tn_covered(numbers, "2125550150")
    assert tn_covered(numbers, "18005550199") and not tn_covered(numbers, "18005550198")
    with pytest.raises(ValueError):
        tn_auth_list(bytes.fromhex("3007a1053003160131"))  # a range without its count


def test_a_delegate_certificate_verifies_with_its_numbers(pki: Pki, anchors: TrustAnchors) -> None:
    leaf = make_cert("SHAKEN delegate", pki.leaf_key, "STI-CA Test Intermediate", pki.inter_key,
                     ca=False, tnauthlist=DELEGATE_DER)
    result = verify_chain(parse_chain(pem(leaf, pki.inter)), anchors, time.time())
    assert result.ok and result.spc is None
    assert result.numbers == (("12125550100", 100), ("18005550199", 1))
    good = verify_chain(parse_chain(pem(pki.leaf, pki.inter)), anchors, time.time())
    assert good.ok and good.spc == "709J" and good.numbers == ()


def test_ipv4_compatible_ipv6_addresses_are_judged_by_their_ipv4_address() -> None:
    assert not is_public_address(ipaddress.ip_address("::7f00:1"))  # ::127.0.0.1
    assert not is_public_address(ipaddress.ip_address("::a00:1"))  # ::10.0.0.1
    assert is_public_address(ipaddress.ip_address("::808:808"))  # ::8.8.8.8


def test_a_chain_of_more_certificates_than_a_shaken_chain_needs_is_refused(pki: Pki) -> None:
    """The leaf and up to seven more parse; a ninth certificate makes the body no chain
    (bad_certificate): a padded chain's path building ran in the event loop."""
    assert len(parse_chain(pem(pki.leaf, *[pki.inter] * 7)).intermediates) == 7
    with pytest.raises(ValueError, match="more than 8 certificates"):
        parse_chain(pem(pki.leaf, *[pki.inter] * 8))
