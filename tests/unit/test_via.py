"""Tests for the Via grammar (RFC 3261 §20.42, RFC 3581) including RFC 4475 torture values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.sip import via as via_module
from sipguard.sip.errors import SipParseError
from sipguard.sip.via import REST_AFTER_FIRST_VIA, Via, after_first_via, parse_via_list


def vias(text: str, parts: list[str]) -> list[Via]:
    """Parse and check each via-parm round-trips to its original slice."""
    items = parse_via_list(text)
    assert [str(v) for v in items] == parts
    assert [v.raw for v in items] == parts
    return items


def via(text: str) -> Via:
    (v,) = vias(text, [text])
    return v


def test_rfc3261_basic_via() -> None:
    """Protocol, transport, host, port and branch are read from a plain Via."""
    v = via("SIP/2.0/UDP erlang.bell-telephone.com:5060;branch=z9hG4bK87asdks7")
    assert (v.protocol, v.transport, v.host, v.port) == (
        "SIP/2.0",
        "UDP",
        "erlang.bell-telephone.com",
        5060,
    )
    assert v.branch == "z9hG4bK87asdks7" and v.params == (("branch", "z9hG4bK87asdks7"),)


def test_rfc3261_received_and_space_before_semicolon() -> None:
    """SWS before ';' is allowed; received is read."""
    v = via("SIP/2.0/UDP 192.0.2.1:5060 ;received=192.0.2.207;branch=z9hG4bK77asjd")
    assert v.received == "192.0.2.207" and v.branch == "z9hG4bK77asjd"


def test_rfc3261_lws_everywhere_with_ttl_and_maddr() -> None:
    """RFC 3261 §20.42 example: LWS around '/', ':' and ';', with ttl and maddr."""
    v = via(
        "SIP / 2.0 / UDP first.example.com: 4000;ttl=16 ;maddr=224.2.0.1 ;branch=z9hG4bKa7c6a8dlze.1"
    )
    assert v.protocol == "SIP/2.0" and v.transport == "UDP"
    assert v.host == "first.example.com" and v.port == 4000
    assert v.ttl == 16 and v.maddr == "224.2.0.1" and v.branch == "z9hG4bKa7c6a8dlze.1"


def test_rfc3581_rport_with_value_and_bare() -> None:
    """rport with a value gives an int; bare rport sets has_rport with rport None."""
    v = via("SIP/2.0/UDP 10.1.1.1:4540;received=192.0.2.1;rport=9988;branch=z9hG4bKkjshdyff")
    assert v.has_rport and v.rport == 9988 and v.received == "192.0.2.1"
    v = via("SIP/2.0/UDP 10.1.1.1:4540;rport;branch=z9hG4bKkjshdyff")
    assert v.has_rport and v.rport is None
    v = via("SIP/2.0/UDP 10.1.1.1:4540;branch=z9hG4bKkjshdyff")
    assert not v.has_rport and v.rport is None and v.received is None and v.ttl is None


def test_ipv6_sent_by_and_received() -> None:
    """An IPv6 sent-by keeps its brackets; received may be a bare IPv6 address."""
    v = via("SIP/2.0/TCP [2001:DB8::9:1]:5060;branch=z9hG4bK1;received=2001:db8::1")
    assert v.host == "[2001:db8::9:1]" and v.port == 5060 and v.received == "2001:db8::1"


def test_transport_upper_cased_and_protocol_name_case_insensitive() -> None:
    """The transport is upper-cased; 'sip' as protocol name is accepted."""
    v = via("sip/2.0/tls Host.Example.COM;branch=z9hG4bKx")
    assert v.transport == "TLS" and v.host == "host.example.com" and v.protocol == "SIP/2.0"


def test_websocket_transport_and_param_lookup() -> None:
    """WS/WSS transports and extension params are kept; param() is case-insensitive."""
    v = via("SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bKasudf;Alias;keep=30")
    assert v.transport == "WSS" and v.params[1] == ("alias", None) and v.param("KEEP") == "30"


def test_multiple_vias_in_one_line() -> None:
    """Comma-separated via-parms split into separate Vias, top first."""
    items = vias(
        "SIP/2.0/UDP a.example.com;branch=z9hG4bK1, SIP/2.0/TCP b.example.com:5070;branch=z9hG4bK2",
        [
            "SIP/2.0/UDP a.example.com;branch=z9hG4bK1",
            "SIP/2.0/TCP b.example.com:5070;branch=z9hG4bK2",
        ],
    )
    assert [v.host for v in items] == ["a.example.com", "b.example.com"]


def test_quoted_extension_value_with_comma() -> None:
    """A comma inside a quoted via-extension value does not split the list."""
    v = via('SIP/2.0/UDP a.example.com;branch=z9hG4bK1;x="a,b;c"')
    assert v.param("x") == '"a,b;c"'


# ------------------------------------------------------------------ RFC 4475 torture values


def test_torture_wsinv_via() -> None:
    """RFC 4475 wsinv Via (unfolded): LWS around '/' and before the host."""
    v = via("SIP  /   2.0 /UDP    192.0.2.2;branch=390skdjuw")
    assert (v.protocol, v.transport, v.host, v.branch) == (
        "SIP/2.0",
        "UDP",
        "192.0.2.2",
        "390skdjuw",
    )


def test_torture_wsinv_v_two_vias() -> None:
    """RFC 4475 wsinv v: two vias with LWS around every separator (unfolded)."""
    text = (
        "SIP  / 2.0  / TCP     spindle.example.com   ;  branch  =   z9hG4bK9ikj8  , "
        "SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239"
    )
    items = vias(
        text,
        [
            "SIP  / 2.0  / TCP     spindle.example.com   ;  branch  =   z9hG4bK9ikj8",
            "SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239",
        ],
    )
    assert [(v.transport, v.host, v.branch) for v in items] == [
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]


def test_torture_intmeth_and_esc02_branches() -> None:
    """RFC 4475 intmeth / esc02: branches made of unusual token characters, '%' included."""
    assert via("SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~").branch == (
        "z9hG4bK-.!%66*_+`'~"
    )
    assert via("SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234").branch == (
        "z9hG4bK209%fzsnel234"
    )


def test_torture_mpart01_rport() -> None:
    """RFC 4475 mpart01: a bare rport after a long branch."""
    v = via("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport")
    assert v.has_rport and v.rport is None and v.port == 5070


def test_torture_transports() -> None:
    """RFC 4475 transports: SCTP, TLS and an unknown transport are all accepted."""
    assert via("SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf").transport == "SCTP"
    assert via("SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj").transport == "TLS"
    assert via("SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en").transport == "UNKNOWN"


def test_torture_no_branch_and_broadcast() -> None:
    """RFC 4475 inv2543 / bcast / badbranch: no branch, broadcast host, bare magic cookie."""
    v = via("SIP/2.0/UDP iftgw.example.com")
    assert v.branch is None and v.params == () and v.port is None
    assert via("SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23").host == "255.255.255.255"
    assert via("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK").branch == "z9hG4bK"


def test_torture_scalarlg_received() -> None:
    """RFC 4475 scalarlg: received after branch."""
    v = via("SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129")
    assert v.received == "192.0.2.129"


def test_torture_badvers_via_keeps_version() -> None:
    """RFC 4475 badvers: SIP/7.0 parses; the version is in protocol for the caller to check."""
    assert via("SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw").protocol == "SIP/7.0"


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP 192.0.2.15;;,;,,",  # badinv01
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP/2.0 UDP host",
        "SIP/2.0/UDPhost",
        "HTTP/1.1/TCP host",
        "SIP/2.0/UDP host:",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP host:50a",
        "SIP/2.0/UDP 2001:db8::1",
        "SIP/2.0/UDP [2001:db8::1",
        "SIP/2.0/UDP [zz]",
        "SIP/2.0/UDP ho\x00st",
        "SIP/2.0/UDP host;branch",
        "SIP/2.0/UDP host;branch=",
        "SIP/2.0/UDP host;received=example.com",
        "SIP/2.0/UDP host;rport=abc",
        "SIP/2.0/UDP host;rport=70000",
        "SIP/2.0/UDP host;ttl=256",
        "SIP/2.0/UDP host;ttl",
        "SIP/2.0/UDP host;maddr=a..b",
        "SIP/2.0/UDP host;",
        "SIP/2.0/UDP host,",
        "SIP/2.0/UDP host extra",
        "SIP/2.0/UDP a.com;branch=1,,SIP/2.0/UDP b.com",
    ],
)
def test_malformed_vias_are_400(text: str) -> None:
    """Missing or invalid sent-by, bad port, non-SIP protocol and bad params are 400."""
    with pytest.raises(SipParseError) as caught:
        parse_via_list(text)
    assert caught.value.status == 400


def test_returned_list_is_fresh() -> None:
    """Memoisation never hands out the same list twice (callers may mutate it)."""
    text = "SIP/2.0/UDP a.example.com;branch=z9hG4bK1"
    first = parse_via_list(text)
    first.append(first[0])
    assert [str(v) for v in parse_via_list(text)] == [text]


# ------------------------------------------------------------------ fuzzing

_FRAGMENTS = st.sampled_from(
    [
        "SIP",
        "/",
        "2.0",
        "UDP",
        " ",
        "\t",
        "host.example.com",
        "[::1]",
        "[",
        ":",
        "5060",
        ";",
        "branch",
        "=",
        "z9hG4bK1",
        "rport",
        "received",
        "1.2.3.4",
        "ttl",
        "300",
        ",",
        '"',
        "é",
    ]
)


def _check(text: str) -> None:
    try:
        items = parse_via_list(text)
    except SipParseError as err:
        assert err.status == 400
    else:
        assert all(str(v) in text for v in items)
        for v in items:
            _ = (v.rport, v.ttl, v.branch, v.received, v.maddr, v.has_rport)


@settings(max_examples=300)
@given(st.text())
def test_fuzz_random_text(text: str) -> None:
    """Random text either parses or raises SipParseError, nothing else."""
    _check(text)


@settings(max_examples=600)
@given(st.lists(_FRAGMENTS, max_size=14).map("".join))
def test_fuzz_via_like_text(text: str) -> None:
    """Via-shaped text either parses (and every property reads) or raises SipParseError."""
    _check(text)


@settings(max_examples=300)
@given(
    st.lists(_FRAGMENTS, max_size=8).map(
        lambda parts: "SIP/2.0/UDP host.example.com" + "".join(parts)
    )
)
def test_fuzz_via_params(text: str) -> None:
    """Arbitrary parameter tails on a valid sent-by parse or raise SipParseError."""
    _check(text)


@settings(max_examples=500)
@given(st.lists(_FRAGMENTS, max_size=10).map(lambda parts: "SIP/2.0/UDP " + "".join(parts)))
def test_fast_and_general_paths_agree(text: str) -> None:
    """The one-regex fast path and the general Via grammar give identical results."""
    fast = via_module._VIA_FAST.match(text)
    if fast is None:
        return
    try:
        quick: tuple[Via, int] | None = via_module._scan_via(text, 0)
    except SipParseError:
        quick = None
    try:
        general: tuple[Via, int] | None = via_module._scan_via(text, 0, fast=False)
    except SipParseError:
        general = None
    assert quick == general


@pytest.mark.parametrize(("text", "rest"), [
    ("SIP/2.0/UDP a.example;branch=z9hG4bK1", ""),
    ("SIP/2.0/UDP a.example;branch=z9hG4bK1  ", ""),
    ("SIP/2.0/UDP a.example;branch=z9hG4bK1, SIP/2.0/TCP b:5061", "SIP/2.0/TCP b:5061"),
    ("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1 ,\t x , y", "x , y"),  # rest unparsed
    ("SIP/2.0/UDP a;x=\"p, q\";branch=z, b", "b"),  # a quoted comma is no separator
])
def test_after_first_via_is_the_rest_as_written(text: str, rest: str) -> None:
    assert after_first_via(text) == rest
    if REST_AFTER_FIRST_VIA is not None:  # the C scan of the raw line agrees
        for name in ("Via: ", "v:"):
            line = (name + text).encode()
            at = REST_AFTER_FIRST_VIA(line)
            assert (line[at:].decode() if at > 0 else "") == rest


@pytest.mark.skipif(REST_AFTER_FIRST_VIA is None, reason="the C extensions are not built")
@pytest.mark.parametrize("line", [
    b"Via: SIP/2.0/UDP a;x=\"p, q;branch=z, b",  # an unclosed quote
    b"Via: SIP/2.0/UDP [2001:db8::1;branch=z, b",  # an unclosed bracket
    b"Via: SIP/2.0/UDP a;branch=z,  ",  # nothing after the comma
    b"Via: SIP/2.0/UDP a;branch=z,\r\n b",  # folded
    b"SIP/2.0/UDP a;branch=z, b",  # no colon
])
def test_rest_after_first_via_leaves_the_unusual_to_python(line: bytes) -> None:
    assert REST_AFTER_FIRST_VIA is not None
    assert REST_AFTER_FIRST_VIA(line) == -1


@pytest.mark.parametrize("text", ["SIP/2.0/UDP a;branch=z junk", "SIP/2.0 a", ""])
def test_after_first_via_refuses_a_malformed_first(text: str) -> None:
    with pytest.raises(SipParseError):
        after_first_via(text)
