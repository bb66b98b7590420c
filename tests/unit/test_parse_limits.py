"""Bounded, linear parsing: the parse limits (ParseLimits), the size-capped memo caches, linear
unfolding and History-Info de-duplication, and parse errors that leave no reference cycle."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from sipguard.contract import ParseFailed
from sipguard.ops.config_load import parse_config
from sipguard.server import proxy_settings
from sipguard.sip import history_info, identity, nameaddr, params, parser, uri, via
from sipguard.sip.errors import SipParseError
from sipguard.sip.framing import StreamFramer
from sipguard.sip.history_info import diverting_entries, parse_history_info
from sipguard.sip.message import Message
from sipguard.sip.parser import DEFAULT_LIMITS, UNLIMITED, ParseLimits, parse_message

from .proxy_helpers import CALLER, Harness, invite

BASE = [
    "Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-limits",
    "From: <sip:+12125550100@example.com>;tag=f1",
    "To: <sip:+18005550199@example.com>",
    "Call-ID: limits-1",
    "CSeq: 1 INVITE",
    "Max-Forwards: 70",
    "Content-Length: 0",
]


def request(*extra: str, start: str = "INVITE sip:+18005550199@example.com SIP/2.0",
            base: list[str] | None = None) -> bytes:
    """An INVITE with the BASE headers (7) and ``extra`` header lines after them."""
    lines = [start, *(BASE if base is None else base), *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_error(data: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> SipParseError:
    with pytest.raises(SipParseError) as caught:
        parse_message(data, max_size=1 << 20, limits=limits)
    return caught.value


# ------------------------------------------------------------------------------ the limits


def test_defaults_are_the_documented_ones() -> None:
    """The module default is 256 headers, 16 KiB lines, 64 continuations, 100 list entries,
    512 parameters per header."""
    assert ParseLimits(256, 16384, 64, 100, 512) == DEFAULT_LIMITS
    assert (DEFAULT_LIMITS.max_headers, DEFAULT_LIMITS.max_header_line,
            DEFAULT_LIMITS.max_continuation_lines, DEFAULT_LIMITS.max_list_entries,
            DEFAULT_LIMITS.max_header_params) == (256, 16384, 64, 100, 512)


def test_limits_are_frozen_valued_and_checked() -> None:
    """ParseLimits cannot be changed, compares by value, and refuses a limit below 1."""
    limits = ParseLimits(max_headers=40)
    with pytest.raises(AttributeError):
        limits.max_headers = 41
    assert limits == ParseLimits(40, 16384, 64, 100, 512) and limits != DEFAULT_LIMITS
    assert hash(limits) == hash(ParseLimits(40))
    assert "max_headers=40" in repr(limits)
    with pytest.raises(ValueError):
        ParseLimits(max_list_entries=0)


def test_max_headers_at_and_over() -> None:
    """256 header lines parse; the 257th is 400 naming max_headers, the partial keeps Via."""
    pad = [f"X-Pad-{i}: v" for i in range(256 - len(BASE))]
    msg = parse_message(request(*pad))
    assert len(msg.names) == 256
    err = parse_error(request(*pad, "X-One-More: v"))
    assert (err.status, err.detail) == (400, "too many headers (max_headers 256)")
    assert err.partial is not None and err.partial.has("via") and len(err.partial.names) == 256


def test_a_folded_header_counts_once_toward_max_headers() -> None:
    """Continuation lines are part of their header, not headers of their own."""
    pad = [f"X-Pad-{i}: v\r\n more" for i in range(256 - len(BASE))]
    assert len(parse_message(request(*pad)).names) == 256


def test_custom_max_headers() -> None:
    """A smaller limit passed to parse_message is the one enforced and named."""
    limits = ParseLimits(max_headers=40)
    pad = [f"X-Pad-{i}: v" for i in range(40 - len(BASE))]
    parse_message(request(*pad), limits=limits)
    err = parse_error(request(*pad, "X-More: v"), limits)
    assert (err.status, err.detail) == (400, "too many headers (max_headers 40)")


def test_max_header_line_at_and_over() -> None:
    """A 16384-byte header line parses; 16385 bytes is 513 naming max_header_line, and the line
    is left out of the partial message (its Via still there, so it can be answered)."""
    at = "X-Long: " + "a" * (16384 - 8)
    assert len(parse_message(request(at)).lines[-1]) == 16384
    err = parse_error(request(at + "a"))
    assert (err.status, err.detail) == (513, "x-long line of 16385 bytes (max_header_line 16384)")
    assert err.partial is not None and err.partial.has("via") and not err.partial.has("x-long")


def test_max_header_line_counts_the_folds() -> None:
    """A folded header's length is its lines plus the CRLFs between them."""
    first = "Subject: " + "s" * 991  # 1000 bytes
    folds = [" " + "c" * 999] * 15  # 15 * (2 + 1000) = 15030
    last = " " + "e" * (16384 - 1000 - 15030 - 2 - 1)
    at = "\r\n".join([first, *folds, last])
    assert len(at.encode()) == 16384
    assert parse_message(request(at)).get("subject") is not None
    err = parse_error(request(at + "e"))
    assert (err.status, err.detail) == (513, "subject line of 16385 bytes (max_header_line 16384)")


def test_request_line_over_max_header_line_is_414() -> None:
    """A request line over the limit is 414 Request-URI Too Long; a status line is 513."""
    prefix, suffix = "INVITE sip:", "@example.com SIP/2.0"
    user = "1" * (16384 - len(prefix) - len(suffix))
    parse_message(request(start=prefix + user + suffix))
    err = parse_error(request(start=prefix + user + "1" + suffix))
    assert (err.status, err.detail) == (414, "request line of 16385 bytes (max_header_line 16384)")
    assert err.reason == "Request-URI Too Long"
    assert err.partial is not None and err.partial.has("via")
    status = "SIP/2.0 200 " + "O" * (16384 - 12)
    response = request(start=status, base=[*BASE[:4], "CSeq: 1 INVITE", "Content-Length: 0"])
    parse_message(response)
    err = parse_error(response.replace(b"SIP/2.0 200 ", b"SIP/2.0 200 O", 1))
    assert (err.status, err.detail) == (513, "status line of 16385 bytes (max_header_line 16384)")


def test_max_continuation_lines_at_and_over() -> None:
    """64 continuation lines parse (unfolded into one value); 65 is 400 naming the limit."""
    at = "Subject: s" + "\r\n x" * 64
    assert parse_message(request(at)).get("subject") == "s" + " x" * 64
    err = parse_error(request(at + "\r\n x"))
    assert (err.status, err.detail) == (
        400, "too many continuation lines in subject: 65 (max_continuation_lines 64)")
    assert err.partial is not None and not err.partial.has("subject")


def _vias(n: int, tag: str = "v") -> str:
    return ", ".join(f"SIP/2.0/UDP h{i}.example.com;branch=z9hG4bK{tag}{i}" for i in range(n))


def test_via_entries_at_and_over() -> None:
    """100 Via entries are read; 101 are 400 naming max_list_entries, from vias and top_via."""
    at = parse_message(request(base=[f"Via: {_vias(100)}", *BASE[1:]]))
    assert len(at.vias) == 100 and at.top_via.host == "h0.example.com"
    over = parse_message(request(base=[f"Via: {_vias(101)}", *BASE[1:]]))
    for read in (lambda m: m.vias, lambda m: m.top_via):
        with pytest.raises(SipParseError) as caught:
            read(over)
        assert (caught.value.status, caught.value.detail) == (
            400, "too many Via entries (max_list_entries 100)")


def test_via_entries_are_counted_over_all_lines() -> None:
    """The limit is for the header, not per line: 60 + 41 Vias are too many."""
    msg = parse_message(request(base=[f"Via: {_vias(60)}", f"Via: {_vias(41, 'w')}", *BASE[1:]]))
    assert msg.top_via.branch == "z9hG4bKv0"  # the first line alone is within the limit
    with pytest.raises(SipParseError, match="max_list_entries 100"):
        _ = msg.vias


def test_a_list_over_the_limit_is_not_scanned_to_its_end() -> None:
    """The grammar stops one entry past the limit: a malformed entry after it is never read,
    so a hostile list costs no more than the limit."""
    text = _vias(101) + ", NOT A VIA"
    msg = parse_message(request(base=["Via: " + text + ";x=" + "y" * 400, *BASE[1:]]))
    with pytest.raises(SipParseError, match="too many Via entries"):
        _ = msg.vias
    with pytest.raises(SipParseError, match="malformed Via"):
        via.parse_via_list(text + ";x=" + "y" * 400)  # read to the end without a stop


LISTS: list[tuple[str, str, Callable[[Message], list[Any]]]] = [
    ("Route", "<sip:p{i}.example.com;lr>", lambda m: m.routes),
    ("Record-Route", "<sip:p{i}.example.com;lr>", lambda m: m.record_routes),
    ("Contact", "<sip:u{i}@example.com>", lambda m: m.contacts),
    ("P-Asserted-Identity", "<sip:+1212555{i:04d}@example.com>",
     lambda m: m.p_asserted_identities),
    ("Diversion", "<sip:+1212555{i:04d}@example.com>;reason=unconditional",
     lambda m: m.diversions),
    ("History-Info", "<sip:+1212555{i:04d}@example.com>;index=1.{i}", lambda m: m.history_info),
]


@pytest.mark.parametrize(("name", "entry", "read"), LISTS, ids=[n for n, _, _ in LISTS])
def test_list_entries_at_and_over(name: str, entry: str,
                                  read: Callable[[Message], list[Any]]) -> None:
    """Each list header reads 100 entries and refuses 101 with 400 naming the header and limit."""
    def value(n: int) -> str:
        return ", ".join(entry.format(i=i) for i in range(n))

    assert len(read(parse_message(request(f"{name}: {value(100)}")))) == 100
    split = parse_message(request(f"{name}: {value(50)}", f"{name}: {value(51)}"))
    with pytest.raises(SipParseError) as caught:
        read(split)
    assert (caught.value.status, caught.value.detail) == (
        400, f"too many {name} entries (max_list_entries 100)")


@pytest.mark.parametrize("name", ["Via", "Contact", "Route", "Record-Route"])
def test_a_request_with_more_list_lines_than_the_limit_is_refused_before_it_is_read(
        name: str) -> None:
    """Lists sipguard forwards without reading every entry (a request's Via below the top,
    its Contact, Record-Route) are refused by ``check_request`` when they have more lines than
    ``max_list_entries``: the core never gets 101 of them."""
    entry = "SIP/2.0/UDP h{i}.example.com;branch=z9hG4bKx{i}" if name == "Via" else \
        "<sip:p{i}.example.com;lr>"
    lines = [f"{name}: {entry.format(i=i)}" for i in range(101)]
    msg = parse_message(request(*lines))
    with pytest.raises(SipParseError) as caught:
        msg.check_request()
    assert (caught.value.status, caught.value.detail) == (
        400, f"too many {name} entries (max_list_entries 100)")
    parse_message(request(*lines[:99])).check_request()  # 99 more: within the limit


def _params(n: int) -> str:
    return "".join(f";p{i}" for i in range(n))


def test_header_params_at_and_over() -> None:
    """512 parameters in one header are read; 513 are 400 naming max_header_params, counted
    over all entries and their URIs (branch and ;lr included)."""
    at = parse_message(request(base=[f"Via: SIP/2.0/UDP h;branch=z9hG4bK1{_params(511)}",
                                     *BASE[1:]]))
    assert len(at.top_via.params) == 512 and len(at.vias) == 1
    over = parse_message(request(base=[f"Via: SIP/2.0/UDP h;branch=z9hG4bK1{_params(512)}",
                                       *BASE[1:]]))
    for read in (lambda m: m.vias, lambda m: m.top_via):
        with pytest.raises(SipParseError) as caught:
            read(over)
        assert (caught.value.status, caught.value.detail) == (
            400, "too many Via parameters (max_header_params 512)")
    many = ParseLimits(max_list_entries=300)
    route = ", ".join(f"<sip:p{i}.example.com;lr;a;b>;x" for i in range(64))  # 256 parameters
    two = parse_message(request(f"Route: {route}", f"Route: {route}"), limits=many)
    assert len(two.routes) == 128
    three = parse_message(request(*[f"Route: {route}"] * 3), limits=many)
    with pytest.raises(SipParseError, match=r"too many Route parameters \(max_header_params 512"):
        _ = three.routes


@pytest.mark.parametrize(("header", "read"), [
    ("From", lambda m: m.from_),
    ("To", lambda m: m.to),
    ("History-Info", lambda m: m.history_info),
    ("Contact", lambda m: m.contacts),
])
def test_header_params_of_single_and_list_headers(header: str,
                                                  read: Callable[[Message], object]) -> None:
    """From, To and every list header count their header and URI parameters together."""
    def value(n: int) -> str:
        return f"<sip:a@example.com{_params(n // 2)}>;index=1{_params(n - n // 2 - 1)}"

    base = [line for line in BASE if not line.startswith(f"{header}:")]
    read(parse_message(request(f"{header}: {value(512)}", base=base)))
    with pytest.raises(SipParseError) as caught:
        read(parse_message(request(f"{header}: {value(513)}", base=base)))
    assert (caught.value.status, caught.value.detail) == (
        400, f"too many {header} parameters (max_header_params 512)")


def test_request_uri_params_at_and_over() -> None:
    """The Request-URI's parameters count too (it is read by check_request)."""
    parse_message(request(start=f"INVITE sip:a@example.com{_params(512)} SIP/2.0")).check_request()
    msg = parse_message(request(start=f"INVITE sip:a@example.com{_params(513)} SIP/2.0"))
    with pytest.raises(SipParseError, match=r"too many Request-URI parameters"):
        msg.check_request()


def test_the_message_keeps_the_limits_it_was_parsed_under() -> None:
    """A custom max_list_entries applies to the list accessors of that message."""
    limits = ParseLimits(max_list_entries=8)
    msg = parse_message(request(base=[f"Via: {_vias(9)}", *BASE[1:]]), limits=limits)
    assert msg.limits is limits
    with pytest.raises(SipParseError, match=r"too many Via entries \(max_list_entries 8\)"):
        _ = msg.vias


def test_the_proxy_answers_a_limit_with_its_status_and_reports_the_detail() -> None:
    """Over a configured limit the proxy answers 400 statelessly and its ParseFailed event
    (counted as parse_errors, logged as parse_error) names the limit."""
    h = Harness(parse_limits=ParseLimits(max_headers=32))
    extra = "".join(f"X-Pad-{i}: v\r\n" for i in range(30))
    out = h.send(invite(extra=extra))
    assert [(flow.addr, m.status, m.reason) for flow, m in out] == [(CALLER, 400, "Bad Request")]
    failed = [e for e in h.events if isinstance(e, ParseFailed)]
    assert [(e.status, e.detail, e.answered) for e in failed] == [
        (400, "too many headers (max_headers 32)", True)]
    assert not h.proxy.servers  # no state kept for it


def test_config_keys_reach_the_proxy() -> None:
    """sip.max_headers & co. become the proxy's parse_limits; their defaults are the module's."""
    base = "listen:\n  - udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\n"
    assert proxy_settings(parse_config(base)).parse_limits == DEFAULT_LIMITS
    cfg = parse_config(base + "sip:\n  max_headers: 40\n  max_header_line: 2048\n"
                       "  max_continuation_lines: 3\n  max_list_entries: 10\n"
                       "  max_header_params: 64\n")
    assert proxy_settings(cfg).parse_limits == ParseLimits(40, 2048, 3, 10, 64)


# ------------------------------------------------------------------------------ linear time


def _cpu(fn: Callable[[], object], reps: int = 9, inner: int = 3) -> float:
    """Least CPU time of ``inner`` calls of ``fn`` over ``reps`` tries (process_time), with
    the cyclic collector off meanwhile: its passes cost what the whole heap holds, not what
    ``fn`` does, and would make a linear cost look quadratic."""
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            start = time.process_time()
            for _ in range(inner):
                fn()
            best = min(best, time.process_time() - start)
    finally:
        if enabled:
            gc.enable()
    return max(best, 1e-6)


def _folded(size: int) -> bytes:
    return request("Subject: s" + "\r\n x" * (size // 4))  # one 4-byte continuation per 4 bytes


def test_unfolding_is_linear() -> None:
    """A folded header 4x longer (64 KB vs 16 KB of 4-byte continuation lines) costs about 4x,
    not 16x: the folds are joined once (before, each was copied again per continuation line:
    10.6x measured)."""
    small, big = _folded(16384), _folded(65536)
    assert parse_message(big, max_size=1 << 20, limits=UNLIMITED).get("subject")
    ratio = (_cpu(lambda: parse_message(big, max_size=1 << 20, limits=UNLIMITED))
             / _cpu(lambda: parse_message(small, max_size=1 << 20, limits=UNLIMITED)))
    assert ratio < 8, ratio


def _operations(fn: Callable[[], object]) -> int:
    """How many Python-level calls, returns and generator resumes ``fn`` makes (a
    deterministic count of its work, where timing would depend on the machine)."""
    count = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal count
        count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_history_info_dedup_is_linear() -> None:
    """Finding the diverting entries of 8,000 History-Info entries costs about 8x 1,000, not
    64x (each entry forwarded the call on, so every one is listed; before, each was searched
    for among those listed: 15.9x as many operations at 4x the entries). Counted in operations
    when the module runs as Python, timed when it is compiled: the sizes 8x apart keep a
    linear cost (8x, up to ~12x with another process on the CPU's caches) far from a
    quadratic one (64x)."""
    def chain(n: int) -> list[history_info.HistoryInfoEntry]:
        parts = [f"<sip:+1{i:010d}@example.com>;index=1.{i}" + (f";mp=1.{i - 1}" if i else "")
                 for i in range(n)]
        return parse_history_info(", ".join(parts))

    small, big = chain(1000), chain(8000)
    assert len(diverting_entries(big)) == 7999
    if history_info.__file__.endswith(".py"):
        ratio = (_operations(lambda: diverting_entries(big))
                 / _operations(lambda: diverting_entries(small)))
    else:
        # the least of three rounds: another process can only make a round look worse
        ratio = min(_cpu(lambda: diverting_entries(big)) / _cpu(lambda: diverting_entries(small))
                    for _ in range(3))
    assert ratio < 24, ratio


def test_history_info_dedup_lists_each_diverting_entry_once() -> None:
    """An entry named by several mp parameters is listed once, in header order."""
    entries = parse_history_info(
        "<sip:a@x>;index=1, <sip:b@x>;index=1.1;mp=1, <sip:c@x>;index=1.2;mp=1, "
        "<sip:d@x>;index=1.3;mp=1.2")
    assert [e.index for e in diverting_entries(entries)] == ["1", "1.2"]


def test_framer_joins_a_folded_content_length_once() -> None:
    """A Content-Length folded over many continuation lines is read, in time linear in them."""
    def stream(folds: int) -> bytes:
        return (b"INVITE sip:a@b SIP/2.0\r\nContent-Length:" + b"\r\n " * folds + b"\r\n 4"
                b"\r\n\r\nbody")

    def frame(data: bytes) -> list[bytes | object]:
        return StreamFramer(max_size=1 << 20).feed(data)

    small, big = stream(16384), stream(65536)
    assert frame(big) == [big]
    ratio = _cpu(lambda: frame(big)) / _cpu(lambda: frame(small))
    assert ratio < 8, ratio


# ------------------------------------------------------------------------------ memo caches

CacheCase = tuple[str, dict[str, Any], int, Callable[[str], object], Callable[[int], str]]
CACHES: list[CacheCase] = [
    ("uri", uri._URIS, uri.URIS_MAX, uri.parse_uri, lambda i: f"sip:u{i}@example.com"),
    ("host", uri._HOSTS, uri.HOSTS_MAX, uri.check_host, lambda i: f"h{i}.example.com"),
    ("via", via._VIAS, via.VIAS_MAX, via.parse_via_list,
     lambda i: f"SIP/2.0/UDP h.example.com;branch=z9hG4bK{i}"),
    ("name-addr", nameaddr._ONES, nameaddr.ONES_MAX, nameaddr.parse_name_addr,
     lambda i: f"<sip:a@example.com>;tag={i}"),
    ("name-addr list", nameaddr._LISTS, nameaddr.LISTS_MAX, nameaddr.parse_name_addr_list,
     lambda i: f"<sip:p{i}.example.com;lr>, <sip:q.example.com;lr>"),
    ("history-info", history_info._ENTRIES, history_info.ENTRIES_MAX, parse_history_info,
     lambda i: f"<sip:a@example.com>;index=1, <sip:b@example.com>;index=1.{i}"),
    ("identity", identity._IDENTITIES, identity.IDENTITIES_MAX, identity.parse_identity,
     lambda i: f"eyJh.eyJi{i}.c2ln;info=<https://cert.example.com/a.pem>;alg=ES256;ppt=shaken"),
]
IDS = [c[0] for c in CACHES]


@pytest.mark.parametrize("case", CACHES, ids=IDS)
def test_caches_stay_within_their_count(case: CacheCase) -> None:
    """Unique small values fill a cache to its count and no further; a full cache starts
    again empty (no per-entry eviction scan)."""
    _, cache, count, parse, text = case
    cache.clear()
    for i in range(count):
        parse(text(i))
    assert len(cache) == count
    for i in range(count, count + 50):
        parse(text(i))
    assert len(cache) == 50
    assert text(0) not in cache and text(count + 49) in cache


def _long(case: CacheCase, size: int) -> str:
    """A valid value of ``case`` that is ``size`` characters long and has few parts."""
    name = case[0]
    pad = "p" * size
    return {
        "uri": f"sip:{pad}@example.com",
        "host": f"{pad[:60]}." * (size // 61) + "com",
        "via": f"SIP/2.0/UDP h.example.com;branch=z9hG4bK{pad}",
        "name-addr": f"<sip:{pad}@example.com>",
        "name-addr list": f"<sip:{pad}@example.com>, <sip:b@example.com>",
        "history-info": f"<sip:{pad}@example.com>;index=1",
        "identity": f"eyJh.eyJ{pad}.c2ln;info=<https://cert.example.com/a.pem>",
    }[name]


@pytest.mark.parametrize("case", CACHES, ids=IDS)
def test_caches_never_keep_a_long_value(case: CacheCase) -> None:
    """A value longer than the cache's text cap is parsed, correct, and not kept; a 60 KB one
    costs the cache nothing."""
    name, cache, _, parse, _ = case
    cap = identity.IDENTITY_TEXT_MAX if name == "identity" else params.CACHE_TEXT_MAX
    cache.clear()
    for size in (cap + 300, 60000):
        text = _long(case, size)
        assert len(text) > cap
        assert parse(text) == parse(text)  # parsed, twice, the same
    assert not cache
    assert all(len(key) <= cap for key in cache)


# One part more than CACHE_PARTS_MAX (12): a value, its parameters, its URI's parameters.
MANY_PARTS = {
    "uri": "sip:a@example.com" + "".join(f";p{i}" for i in range(13)),
    "via": "SIP/2.0/UDP h.example.com;branch=z9hG4bK1" + "".join(f";p{i}" for i in range(11)),
    "name-addr": "<sip:a@example.com>;tag=1" + "".join(f";p{i}" for i in range(11)),
    "name-addr list": ", ".join(f"<sip:p{i}.x>" for i in range(13)),
    "history-info": ", ".join(f"<sip:a@x>;index=1.{i}" for i in range(7)),
    "identity": "eyJh.eyJi.c2ln;info=<https://x.example.com/>" + "".join(
        f";p{i}" for i in range(12)),
}


@pytest.mark.parametrize("case", [c for c in CACHES if c[0] in MANY_PARTS],
                         ids=[n for n in IDS if n in MANY_PARTS])
def test_caches_never_keep_a_value_of_many_parts(case: CacheCase) -> None:
    """A short value whose parse has more than CACHE_PARTS_MAX parts (each costs ~130 bytes:
    40 times its text) is not kept; one at the cap is."""
    name, cache, _, parse, _ = case
    text = MANY_PARTS[name]
    assert len(text) <= params.CACHE_TEXT_MAX
    cache.clear()
    parse(text)
    assert text not in cache
    fewer = text.rsplit(",", 1)[0] if "," in text else text.rsplit(";", 1)[0]
    parse(fewer)
    assert fewer in cache


def test_header_name_cache_keeps_no_long_names() -> None:
    """A header name longer than 64 bytes is accepted but never kept by the name cache, and the
    cache never holds more than its count."""
    long_name = "X-" + "n" * 100
    msg = parse_message(request(f"{long_name}: v"))
    assert msg.get(long_name.lower()) == "v"
    assert long_name.encode() not in parser._NAME_CACHE
    for i in range(parser._NAME_CACHE_MAX):
        parse_message(request(f"X-Unique-{i}: v"))
    assert len(parser._NAME_CACHE) <= parser._NAME_CACHE_MAX
    assert all(len(key) <= parser._NAME_KEY_MAX for key in parser._NAME_CACHE)


# ------------------------------------------------------------------------------ no cycles

REJECTED = [
    request(*[f"X-Pad-{i}: v" for i in range(300)]),  # too many headers
    request("X-Long: " + "a" * 20000),  # line too long
    request("Subject: s" + "\r\n x" * 100),  # too many continuation lines
    request("Bad Name: v"),  # malformed header name
    request(" leading continuation"),  # continuation before the first header (as a header)
    request(start="INVITE sip:a@b SIP/3.0"),  # unsupported version
    request(start="INVITE " + "u" * 20000 + " SIP/2.0"),  # request line too long
    b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n",  # no empty line
    request("CSeq: 2 INVITE"),  # repeated CSeq (_validate)
]


def test_parse_errors_leave_no_reference_cycle() -> None:
    """A rejected message is freed at once: no exception is held by a frame of its own
    traceback (a cycle that outlives a young pass waits hours for a full one)."""
    gc.collect()
    gc.disable()
    try:
        for data in REJECTED:
            with pytest.raises(SipParseError):
                parse_message(data, max_size=1 << 20)
        msg = parse_message(request(base=[f"Via: {_vias(101)}", *BASE[1:]]))
        with pytest.raises(SipParseError):
            _ = msg.vias
        del msg
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_an_invite_at_the_header_limit_can_still_be_cancelled() -> None:
    """An INVITE with exactly max_headers headers is forwarded with more (our Via and
    Record-Route): its CANCEL still reaches the core, since sipguard re-reads its own bytes
    without limits."""
    from sipguard.contract import Flow
    from tests.unit.dialog_helpers import cancel
    from tests.unit.proxy_helpers import CALLER, CORE, Harness, invite

    def sent() -> list[tuple[Flow, bytes]]:
        out = list(h.proxy.outbox)
        h.proxy.outbox.clear()
        return out

    h = Harness()
    base = invite()
    count = base.split(b"\r\n\r\n", 1)[0].count(b"\r\n")  # header lines
    h.feed(invite(extra="".join(f"X-Pad-{i}: {i}\r\n" for i in range(256 - count))))
    fwd = [d for f, d in sent() if f.addr == CORE]
    assert len(fwd) == 1
    via = next(ln for ln in fwd[0].split(b"\r\n") if ln.startswith(b"Via: "))
    ringing = (b"SIP/2.0 180 Ringing\r\n" + via + b"\r\nVia: SIP/2.0/UDP "
               b"198.51.100.7:5062;branch=z9hG4bK-caller-1\r\nFrom: <sip:a@b>;tag=ftag1\r\n"
               b"To: <sip:c@d>;tag=t\r\nCall-ID: call-1@caller\r\nCSeq: 1 INVITE\r\n"
               b"Content-Length: 0\r\n\r\n")
    h.feed(ringing, src=CORE)
    sent()
    h.feed(cancel(call_id="call-1@caller", branch="z9hG4bK-caller-1"))
    out = sent()
    assert [d.split(b" ", 1)[0] for f, d in out if f.addr == CORE] == [b"CANCEL"]
    assert [d[:11] for f, d in out if f.addr == CALLER] == [b"SIP/2.0 200"]
