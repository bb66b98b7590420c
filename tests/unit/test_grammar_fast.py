"""The header grammars' fast path in C (sipguard/sip/_grammar.c) against the Python code.

Where the C module is built (``python -m sipguard.native build``, which ``make test`` runs),
``parse_uri``, ``scan_name_addr`` and ``_scan_via`` try it first; it handles the usual shapes
and declines the rest. Both ways must give the same objects — every field of every Uri,
NameAddr and Via — or the same error, for every input: the header values of the RFC 4475
messages, edge cases, values built from the grammar's parts and those values damaged at random.
The memo caches are emptied before each parse, so each way really parses. Without the build
the comparison cannot be made and these tests are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipguard.sip import nameaddr, uri, via
from sipguard.sip.errors import SipParseError
from sipguard.sip.nameaddr import NameAddr
from sipguard.sip.uri import Uri
from sipguard.sip.via import Via
from tests.unit.test_robustness import SEEDS, SETTINGS

BUILT = uri.FAST_URI is not None and nameaddr.FAST_NAME_ADDR is not None and (
    via.FAST_VIA is not None
)
needs_grammar = pytest.mark.skipif(not BUILT, reason="C grammar not built (sipguard.native)")


@contextmanager
def python_path() -> Iterator[None]:
    saved = uri.FAST_URI, nameaddr.FAST_NAME_ADDR, via.FAST_VIA
    uri.FAST_URI = nameaddr.FAST_NAME_ADDR = via.FAST_VIA = None
    try:
        yield
    finally:
        uri.FAST_URI, nameaddr.FAST_NAME_ADDR, via.FAST_VIA = saved


def clear_caches() -> None:
    for cache in (uri._URIS, uri._HOSTS, nameaddr._ONES, nameaddr._LISTS, via._VIAS):
        cache.clear()


def fields(value: Any) -> Any:
    """A parse result as plain, comparable values (types included)."""
    if isinstance(value, Uri):
        return ("Uri", value.scheme, value.user, value.password, value.host, value.port,
                value.params, value.headers, value.raw, value.number)
    if isinstance(value, NameAddr):
        return ("NameAddr", value.display, fields(value.uri), value.params, value.raw)
    if isinstance(value, Via):
        return ("Via", value.protocol, value.transport, value.host, value.port, value.params,
                value.raw)
    if isinstance(value, (list, tuple)):
        return tuple(fields(v) for v in value)
    return (type(value).__name__, value)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    clear_caches()
    try:
        result = fn(*args)
    except SipParseError as err:
        return ("error", err.status, err.detail)
    return ("ok", fields(result))


PARSERS: dict[str, Callable[[str], Any]] = {
    "uri": uri.parse_uri,
    "name_addr": nameaddr.parse_name_addr,
    "name_addr_list": nameaddr.parse_name_addr_list,
    "scan_name_addr": lambda text: nameaddr.scan_name_addr(text, 0),
    "via_list": via.parse_via_list,
    "scan_via": lambda text: via._scan_via(text, 0),
}


def same_both_ways(text: str) -> None:
    for name, parse in PARSERS.items():
        fast = outcome(parse, text)
        with python_path():
            slow = outcome(parse, text)
        assert fast == slow, (name, text)


def header_values() -> list[str]:
    """The values of every header line of the seed messages (RFC 4475 included)."""
    out: list[str] = []
    for data in SEEDS:
        head = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
        for line in head.split(b"\r\n")[1:]:
            _, colon, value = line.partition(b":")
            if colon:
                out.append(value.decode("utf-8", "surrogateescape").strip(" \t"))
    return sorted(set(out))


VALUES = header_values()

EDGE = [
    "sip:alice@atlanta.com", "SIP:alice@atlanta.com", "sIpS:bob@biloxi.com:5061",
    "sip:+12125550100@127.0.0.1:5061;user=phone", "sip:+12125550100@127.0.0.1;user=PHONE",
    "sip:2125550100@[2001:db8::1]:5060;transport=udp", "sip:[2001:db8::1]", "sip:[::1]:99999",
    "sip:host:65535", "sip:host:65536", "sip:host:123456", "sip:host:", "sip:host:0",
    "sip:alice:secret@host", "sip:@host", "sip:a@", "sip:a@@b", "sip:host;lr", "sip:host;lr=",
    "sip:host;=x", "sip:host;a=b;c;d=e", "sip:host;%6C%72", "sip:al%20ice@host", "sip:host?x=y",
    "sip:host;maddr=239.255.255.1;ttl=15", "sip:-12-34@host;user=phone", "sip:(212)555@host",
    "sip:+@host", "sip:+1a@host", "sip:alice@host.", "sip:alice@-host", "sip:alice@ho_st",
    "sip:alice@999.1.1.1", "sip:alice@HOST.Example.COM", "sip:#123@host", "sip:a;b=c@host",
    "sip:*67+1212@host;user=phone", "sip:phone@host;user=phone", "sip:host;user=phone",
    "sip:host;USER=phone", "sip:1234@host;user=phone;user=ip", "sip:1234@host;user;user=phone",
    "tel:+1-212-555-0100", "mailto:alice@host", "sip:", "sips:", "sip:h", "sip:[", "sip:[]",
    "sip:[1::2", "sip:[g::1]", "sip:a b@host", "sip:host>", "sip:host\x00",
    "<sip:alice@atlanta.com>", '"Alice" <sip:alice@atlanta.com>;tag=1928301774',
    '"Al\\"ice" <sip:alice@host>', '"" <sip:a@host>', '"A\tB" <sip:a@host>', '"A" sip:a@host',
    '"A"<sip:a@host>', '"A\x01" <sip:a@host>', '"A\x7f" <sip:a@host>', '"A\nB" <sip:a@h>',
    '"A\\\\B" <sip:a@host>', '"A\\" <sip:a@host>', '"A" \t <sip:a@host>;tag=x', '"unterminated <sip:a@host>',
    "Alice <sip:alice@host>", "Alice  Smith\t<sip:alice@host>", "Alice<sip:alice@host>",
    "Al@ice <sip:a@host>", "sip:alice@host;tag=1", "sip:alice@host ;tag=1",
    "sip:alice@host; tag=1", "sip:alice@host;tag =1", "sip:alice@host;tag= 1",
    "<sip:a@host>;tag=1 ", "<sip:a@host>;tag=1 x", "<sip:a@host>;tag=1=2", "<sip:a@host>;tag=",
    '<sip:a@host>;tag="q"', "<sip:a@host>;tag=[::1]:5", "<sip:a@host>;;tag=1", "<sip:a@host",
    "<>", "< sip:a@host>", "<sip:a@host >", "<sip:a@host;lr>", "<sip:a@host?subject=x>",
    "sip:a@host?subject=x", "<sip:a@host>,<sip:b@host>", "<sip:a@host> , <sip:b@host>;x",
    "<sip:a@host>;tag=1,", ",<sip:a@host>", "  <sip:a@host>", "", " ", "\t", "<sip:a@h>\x00",
    "<sip:é@host>", '"Zoë" <sip:z@host>', "<sip:a@host>;tag=1;tag=2", "*",
    "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1-0", "SIP/2.0/udp host;branch=z9hG4bK1;rport",
    "SIP/2.0/UDP host;rport=5060;branch=z9hG4bKx", "SIP/2.0/UDP host;rport=65536;branch=x",
    "SIP/2.0/UDP host;rport=;branch=x", "SIP/2.0/UDP host;rport=abc", "SIP/2.0/UDP host;branch",
    "SIP/2.0/UDP host;branch=", "SIP/2.0/UDP host;received=1.2.3.4", "SIP/2.0/UDP h;maddr=x",
    "SIP/2.0/UDP host;ttl=1", "SIP/2.0/UDP host:5060", "SIP/2.0/UDP host:", "SIP/2.0/UDP host:0",
    "SIP/2.0/UDP host:123456", "SIP/2.0/UDP host:99999", "SIP/2.0/UDP [::1]:5060;branch=z9hG4bK",
    "SIP/2.0/UDP [::1;branch=x", "SIP/2.0/UDP  host", "SIP/2.0 /UDP host", "SIP/3.0/UDP host",
    "sip/2.0/UDP host", "SIP/2.0/UDP host, SIP/2.0/TCP other:5070;branch=z9hG4bKb",
    "SIP/2.0/UDP host ,SIP/2.0/UDP h2", "SIP/2.0/UDP host;branch=a ;rport", "SIP/2.0/UDP host x",
    "SIP/2.0/UDP host;branch=a,", "SIP/2.0/UDP host;branch=a;", "SIP/2.0/UDP host.;branch=a",
    "SIP/2.0/UDP -bad-;branch=a", "SIP/2.0/UDP 300.1.1.1", "SIP/2.0/UDP HOST.example;BRANCH=Ab",
    "SIP/2.0/TLS host;branch=a;x=\"q\"", "SIP/2.0/UDP host;branch=a\t", "SIP/2.0/UDP h\x00",
    "SIP/2.0/UDP hést", "SIP/2.0/UDP host;branch=a;rport;received=[::1]",
]


@needs_grammar
def test_the_usual_shapes_take_the_c_path() -> None:
    from sipguard.sip import _grammar

    clear_caches()
    assert _grammar.sip_uri("sip:+12125550100@127.0.0.1:5061;user=phone") is not None
    assert _grammar.sip_uri("sips:alice@Example.COM") is not None
    assert _grammar.scan_name_addr('"Alice" <sip:alice@host>;tag=1', 0) is not None
    assert _grammar.scan_name_addr("<sip:+12125550000@127.0.0.1:5061>;tag=9SIPpTag001", 0)
    assert _grammar.scan_name_addr("sip:alice@host;tag=1", 0) is not None
    assert _grammar.scan_via("SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1;rport", 0)
    found = _grammar.scan_via("SIP/2.0/UDP a;branch=z9hG4bK1 , SIP/2.0/UDP b", 0)
    assert found is not None and found[1] == len("SIP/2.0/UDP a;branch=z9hG4bK1")


@needs_grammar
def test_what_only_python_handles_is_declined() -> None:
    from sipguard.sip import _grammar

    for text in ("sip:alice:pw@host", "sip:host?x=y", "sip:al%41@host", "sip:host;a%41=b",
                 "sip:host:65536", "tel:+12125550100", "sip:hést", "sip:(212)@host"):
        assert _grammar.sip_uri(text) is None, text
    for text in ('"A\\"B" <sip:a@host>', "<sip:a@host> ;tag=1", "<sip:a@host>;tag=\"x\"",
                 "<sip:a@host>;tag =1", "<sip:a@host", "", "<sip:alice:pw@host>"):
        assert _grammar.scan_name_addr(text, 0) is None, text
    for text in ("SIP/2.0/UDP host;received=1.2.3.4", "SIP/2.0/UDP host;branch",
                 "SIP/2.0/UDP  host", "SIP/2.0/UDP host:99999", "SIP/2.0/UDP host;rport=70000",
                 "SIP/2.0/UDP host x"):
        assert _grammar.scan_via(text, 0) is None, text
    with pytest.raises(SipParseError):  # a malformed host raises, as the Python path does
        _grammar.sip_uri("sip:alice@a..b")


@needs_grammar
@pytest.mark.parametrize("text", EDGE)
def test_edge_cases_parse_the_same_in_c_and_python(text: str) -> None:
    same_both_ways(text)


@needs_grammar
def test_rfc4475_header_values_parse_the_same_in_c_and_python() -> None:
    assert len(VALUES) > 300
    for text in VALUES:
        same_both_ways(text)


@needs_grammar
def test_scan_name_addr_from_every_position_is_the_same() -> None:
    text = '"A" <sip:a@h>;tag=1, B <sip:+1@h:5;user=phone>;x , sip:c@h;y=z'
    for pos in range(-1, len(text) + 2):
        fast = outcome(nameaddr.scan_name_addr, text, pos)
        with python_path():
            slow = outcome(nameaddr.scan_name_addr, text, pos)
        assert fast == slow, pos


# Values built from the grammar's parts: most are well-formed, many are nearly so.
_SP = st.sampled_from(["", " ", "\t", "  "])
_TOKEN = st.text("abcXYZ09-.!%*_+`'~", min_size=0, max_size=6)
# Each list starts with what real traffic has, drawn more often (hypothesis shrinks towards the
# first), then what is nearly right.
def _mostly(good: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(good) | st.sampled_from(good) | st.sampled_from(good + odd)


_USER = _mostly(["alice", "+12125550100", "2125550100", "+1", "Bob.Smith-1_x"],
                ["", "+", "-1", "(2)1", "a;b=c", "al%41", "a:pw", "*67", "#1", "a b"])
_HOST = _mostly(["h", "127.0.0.1", "Example.COM", "[::1]", "[2001:db8::1]", "h_1"],
                ["-h", "h.", "a..b", "[g::1]", "[", "", "999.1.1.1"])
_PORT = _mostly(["", ":5060", ":0", ":65535"], [":65536", ":123456", ":", ":5x"])
_URI_PARAMS = st.lists(_mostly([";lr", ";user=phone", ";user=PHONE", ";transport=udp", ";user"],
                               [";x=", ";=y", ";a%41=b", ";maddr=[::1]", ";"]),
                       max_size=3).map("".join)
_HDR_PARAMS = st.lists(_mostly([";tag=1", ";tag=a-b.c", ";tag", ";x=[::1]:5", ";T=Ab"],
                               [";tag=", " ;tag=1", ";tag =1", ";tag= 1", ';x="q"', ";;"]),
                       max_size=3).map("".join)


@st.composite
def sip_uris(draw: st.DrawFn) -> str:
    scheme = draw(_mostly(["sip:", "SIP:", "sips:", "SiPs:"], ["tel:", "sipx:", ""]))
    user = draw(_USER)
    userinfo = f"{user}@" if user or draw(st.booleans()) else ""
    tail = draw(_mostly([""], ["?x=y", ">", " "]))
    return f"{scheme}{userinfo}{draw(_HOST)}{draw(_PORT)}{draw(_URI_PARAMS)}{tail}"


@st.composite
def name_addrs(draw: st.DrawFn) -> str:
    display = draw(_mostly(["", '"Alice" ', '"" ', "Alice ", "Al Ice", "A\t", '"A\tB"'],
                           ['"A\\"B" ', '"unterminated ', "<"]))
    bracketed = draw(st.booleans())
    u = draw(sip_uris())
    core = f"{display}<{u}>" if bracketed else f"{display if display.startswith('<') else ''}{u}"
    return f"{draw(_SP)}{core}{draw(_HDR_PARAMS)}{draw(_SP)}"


@st.composite
def via_parms(draw: st.DrawFn) -> str:
    proto = draw(_mostly(["SIP/2.0/"], ["SIP/2.0 /", "sip/2.0/", "SIP/3.0/"]))
    transport = draw(_mostly(["UDP", "udp", "TLS"], ["", "U+P"]))
    sep = draw(_mostly([" "], ["  ", "\t", ""]))
    params = draw(st.lists(_mostly([";branch=z9hG4bK-1", ";rport", ";rport=5060", ";x=[::1]", ";x"],
                                   [";branch", ";rport=70000", ";rport=", ";received=1.2.3.4",
                                    ";maddr=h", ";ttl=1", " ;x", ";"]),
                           max_size=4))
    rest = draw(_mostly(["", " , SIP/2.0/UDP h2", ", SIP/2.0/TCP h3:1;x"], [" ", ",", "x"]))
    return f"{proto}{transport}{sep}{draw(_HOST)}{draw(_PORT)}{''.join(params)}{rest}"


def damaged(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    chars = st.sampled_from(list(" \t\"<>;=,:@?%[].-+_!~*()/&$#'`\\\x00é") + ["sip:", "SIP/2.0/"])

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = draw(values)
        for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
            pos = draw(st.integers(0, len(text)))
            kind = draw(st.sampled_from(["insert", "delete", "replace"]))
            if kind == "insert":
                text = text[:pos] + draw(chars) + text[pos:]
            elif kind == "delete":
                text = text[:pos] + text[pos + 1:]
            else:
                text = text[:pos] + draw(chars) + text[pos + 1:]
        return text

    return build()


@needs_grammar
@SETTINGS
@given(text=damaged(sip_uris() | name_addrs() | via_parms() | st.sampled_from(VALUES)))
def test_built_and_damaged_values_parse_the_same_in_c_and_python(text: str) -> None:
    same_both_ways(text)


@needs_grammar
@SETTINGS
@given(text=st.text(max_size=80))
def test_random_text_parses_the_same_in_c_and_python(text: str) -> None:
    same_both_ways(text)


@needs_grammar
def test_values_and_memo_entries_are_out_of_the_collectors_view() -> None:
    """A Uri, NameAddr and Via made in C, and the name-addr memo caches' entries, are
    untracked where they are made (they can be in no reference cycle): no young pass of the
    cyclic collector examines them (reference counting frees them as before)."""
    import gc

    nameaddr._ONES.clear()
    nameaddr._LISTS.clear()
    u = uri.parse_uri("sip:+12125550100@192.0.2.1:5060;user=phone")
    na = nameaddr.parse_name_addr('"A" <sip:+12125550100@192.0.2.1>;tag=abc')
    listed = nameaddr.parse_name_addr_list("<sip:a@192.0.2.1;lr>, <sip:b@192.0.2.2;lr>")
    v, _ = via._scan_via("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-1;rport", 0)
    for obj in (u, na, na.uri, *listed, v):
        assert not gc.is_tracked(obj), obj
    entries = [*nameaddr._ONES.values(), *nameaddr._LISTS.values()]
    assert entries and not any(gc.is_tracked(e) for e in entries)
    assert not any(gc.is_tracked(e[0]) for e in nameaddr._LISTS.values())  # type: ignore[index]
    assert nameaddr.parse_name_addr('"A" <sip:+12125550100@192.0.2.1>;tag=abc') is na  # memo
    with python_path():  # the Python path's values stay in view (rare shapes only)
        assert gc.is_tracked(uri._parse_uri("sip:a@192.0.2.1;x=%41"))
