"""The SIP message model: parse_message, raw header access, typed accessors, serialization."""

from __future__ import annotations

import pytest

from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message
from sipguard.sip.parser import COMPACT, parse_message

BODY = b"v=0\r\no=- 1 1 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def request(*, extra: bytes = b"", body: bytes = BODY, cl: bytes | None = None,
            method: bytes = b"INVITE", cseq: bytes = b"1 INVITE") -> bytes:
    length = str(len(body)).encode() if cl is None else cl
    return (
        method + b" sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-abc;rport\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: \"Alice\" <sip:+12125550100@192.0.2.7>;tag=f1\r\n"
        b"To: <sip:+18005550199@192.0.2.1>\r\n"
        b"Call-ID: call-1@192.0.2.7\r\n"
        b"CSeq: " + cseq + b"\r\n"
        b"Contact: <sip:alice@192.0.2.7:5062>\r\n"
        + extra
        + b"Content-Type: application/sdp\r\n"
        b"Content-Length: " + length + b"\r\n\r\n" + body
    )


RESPONSE = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsg1.2;rport=5060\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-abc;rport=5062;received=192.0.2.7\r\n"
    b"Record-Route: <sip:192.0.2.1:5060;lr>\r\n"
    b"From: \"Alice\" <sip:+12125550100@192.0.2.7>;tag=f1\r\n"
    b"To: <sip:+18005550199@192.0.2.1>;tag=t9\r\n"
    b"Call-ID: call-1@192.0.2.7\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:core@10.0.0.10:5080>\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def status_of(data: bytes, **kw: bool | int) -> int:
    with pytest.raises(SipParseError) as info:
        parse_message(data, **kw)  # type: ignore[arg-type]
    return info.value.status


# ------------------------------------------------------------------ parse and round trip
def test_request_parses_and_round_trips() -> None:
    """A well-formed request keeps its start line, headers and body, and serializes back exactly."""
    data = request()
    msg = parse_message(data)
    assert msg.is_request and msg.method == "INVITE" and msg.status == 0
    assert msg.uri_text == "sip:+18005550199@192.0.2.1:5060;user=phone"
    assert msg.names[:3] == ["via", "max-forwards", "from"]
    assert msg.body == BODY
    assert msg.serialize() == data
    assert bytes(msg) == data


def test_response_parses_and_round_trips() -> None:
    """A well-formed response has status and reason, no method, and serializes back exactly."""
    msg = parse_message(RESPONSE)
    assert not msg.is_request and msg.method is None
    assert (msg.status, msg.reason) == (180, "Ringing")
    assert msg.cseq == (1, "INVITE")
    assert msg.max_forwards is None and msg.content_length == 0
    assert msg.serialize() == RESPONSE


def test_response_reason_phrase_may_be_empty_or_utf8() -> None:
    """RFC 4475 noreason / unreason: an empty or UTF-8 reason phrase is fine."""
    empty = RESPONSE.replace(b"180 Ringing", b"100 ")
    assert parse_message(empty).reason == ""
    utf8 = RESPONSE.replace(b"Ringing", "Звонок".encode())
    assert parse_message(utf8).reason == "Звонок"


def test_message_without_body_and_with_binary_body_round_trip() -> None:
    """A body may be empty or binary (NULs, lone CR/LF); it is kept as is."""
    empty = request(body=b"")
    assert parse_message(empty).serialize() == empty
    binary = bytes(range(256)) * 2
    data = request(body=binary)
    msg = parse_message(data)
    assert msg.body == binary and msg.serialize() == data


# ------------------------------------------------------------------ header names
@pytest.mark.parametrize(
    ("short", "long"),
    [
        ("v", "via"), ("f", "from"), ("t", "to"), ("i", "call-id"), ("m", "contact"),
        ("l", "content-length"), ("c", "content-type"), ("k", "supported"), ("s", "subject"),
        ("e", "content-encoding"), ("o", "event"), ("r", "refer-to"), ("u", "allow-events"),
        ("y", "identity"), ("x", "session-expires"),
    ],
)
def test_compact_names_map_to_long_names(short: str, long: str) -> None:
    """Every compact form (RFC 3261 §7.3.3 and later RFCs) maps to its long name."""
    assert COMPACT[short] == long
    own = {"v": b"Via: ", "f": b"From: ", "t": b"To: ", "i": b"Call-ID: ", "l": b"Content-Length: ",
           "m": b"Contact: ", "c": b"Content-Type: "}
    if short in own:  # a header the request already has: rewrite that one
        data = request().replace(b"\r\n" + own[short], f"\r\n{short}: ".encode(), 1)
    else:
        data = request(extra=f"{short}: compact-value\r\n".encode())
    msg = parse_message(data)
    i = next(i for i, line in enumerate(msg.lines) if line.startswith(f"{short}: ".encode()))
    assert msg.names[i] == long
    assert msg.indexes(long) == [i]
    assert msg.serialize() == data
    upper = data.replace(f"\r\n{short}: ".encode(), f"\r\n{short.upper()}: ".encode(), 1)
    assert parse_message(upper).names[i] == long


def test_compact_headers_read_like_long_ones() -> None:
    """A message written entirely in compact form reads like its long-form twin."""
    data = (
        b"INVITE sip:bob@192.0.2.1 SIP/2.0\r\n"
        b"v: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK-1\r\n"
        b"f: <sip:alice@192.0.2.7>;tag=a\r\nt: <sip:bob@192.0.2.1>\r\ni: c1\r\n"
        b"CSeq: 1 INVITE\r\nm: <sip:alice@192.0.2.7>\r\nk: timer\r\nc: text/plain\r\nl: 2\r\n\r\nhi"
    )
    msg = parse_message(data)
    assert msg.top_via.branch == "z9hG4bK-1"
    assert (msg.from_tag, msg.to_tag, msg.call_id) == ("a", None, "c1")
    assert msg.contacts[0].uri.user == "alice"
    assert msg.option_tags("supported") == ["timer"]
    assert (msg.get("content-type"), msg.content_length, msg.body) == ("text/plain", 2, b"hi")


def test_header_names_are_case_insensitive() -> None:
    """VIA, via, ViA and CALL-ID are the same headers; the raw spelling is kept."""
    data = (request()
            .replace(b"Via:", b"vIA:", 1)
            .replace(b"Call-ID:", b"CALL-ID:", 1)
            .replace(b"Max-Forwards:", b"mAX-fORWARDS:", 1))
    msg = parse_message(data)
    assert msg.top_via.branch == "z9hG4bK-abc"
    assert msg.call_id == "call-1@192.0.2.7"
    assert msg.max_forwards == 70
    assert msg.lines[0].startswith(b"vIA:")
    assert msg.serialize() == data


def test_whitespace_around_the_colon_and_lws() -> None:
    """HCOLON allows SP/HTAB before the colon and LWS after it (RFC 4475 wsinv)."""
    data = (request()
            .replace(b"Via: ", b"Via  :\t ", 1)
            .replace(b"CSeq: 1 INVITE", b"CSeq :  1\t INVITE  ", 1)
            .replace(b"Max-Forwards: 70", b"Max-Forwards\t:70", 1))
    msg = parse_message(data)
    assert msg.names[0] == "via" and msg.top_via.host == "192.0.2.7"
    assert msg.cseq == (1, "INVITE")
    assert msg.max_forwards == 70
    assert msg.serialize() == data


def test_folded_header_lines_are_unfolded_in_values_and_kept_raw() -> None:
    """A continuation line belongs to the header above it: the value is unfolded, and so is
    the line kept for forwarding (RFC 3261 §7.3.1: one space for each fold) — a next hop's
    stream framer never meets a fold."""
    folded = (b"Subject: first part\r\n  second part\r\n\tthird\r\n"
              b"CSeq: 0009\r\n  INVITE\r\n")
    data = request(extra=folded).replace(b"CSeq: 1 INVITE\r\n", b"", 1)
    msg = parse_message(data)
    i = msg.indexes("subject")[0]
    assert msg.value_at(i) == "first part second part third"
    assert msg.lines[i] == b"Subject: first part second part third"
    assert msg.cseq == (9, "INVITE")
    assert msg.serialize() == data.replace(b"part\r\n  second part\r\n\tthird",
                                           b"part second part third").replace(
        b"0009\r\n  INVITE", b"0009 INVITE")


def test_folded_via_and_contact_parse() -> None:
    """Folding inside structured values (RFC 4475 wsinv) reads like one line."""
    data = request(extra=b"").replace(
        b"Via: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-abc;rport",
        b"Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.7:5062;branch=z9hG4bK-abc;rport", 1,
    ).replace(b"Contact: <sip:alice@192.0.2.7:5062>",
              b"Contact:\r\n  <sip:alice@192.0.2.7:5062> ;\r\n q = 0.5", 1)
    msg = parse_message(data)
    assert (msg.top_via.host, msg.top_via.port, msg.top_via.branch) == (
        "192.0.2.7", 5062, "z9hG4bK-abc")
    assert msg.contacts[0].uri.host == "192.0.2.7"
    assert b"\r\n " not in msg.serialize() and b"Via  : SIP  /   2.0 /UDP 192.0.2.7:5062;" in \
        msg.serialize()


def test_continuation_before_any_header_is_400() -> None:
    """A header block cannot start with a continuation line."""
    data = request().replace(b"SIP/2.0\r\nVia:", b"SIP/2.0\r\n folded\r\nVia:", 1)
    assert status_of(data) == 400


@pytest.mark.parametrize("line", [b"NoColonHere", b"Via", b": empty name", b"Bad Name: x",
                                  b"Bad\x00Name: x", "Ünï: x".encode()])
def test_malformed_header_lines_are_400(line: bytes) -> None:
    """A header line without a name, without a colon, or with a non-token name is a 400."""
    assert status_of(request(extra=line + b"\r\n")) == 400


@pytest.mark.parametrize("junk", [b"X-A: a\nVia: SIP/2.0/UDP evil", b"X-A: a\rb", b"X-A: \n"])
def test_bare_cr_or_lf_in_the_headers_is_400(junk: bytes) -> None:
    """CR and LF only appear as CRLF: a bare one could smuggle a header past a lenient parser."""
    assert status_of(request(extra=junk + b"\r\n")) == 400
    start = request().replace(b"SIP/2.0\r\n", b"SIP/2.0\nX: y\r\n", 1)
    assert status_of(start) == 400


@pytest.mark.parametrize("junk", [b"X-A: a\x00b", b"From: <sip:a\x00@192.0.2.7>;tag=9",
                                  b"X-B: \x00", b"X-C: a\\\x00b", b'X-D: "a\\\\\x00b"'])
def test_a_nul_in_the_headers_is_400(junk: bytes) -> None:
    """RFC 3261 §25.1: no NUL in a header value; a core in C that stops at it would read a
    message other than the one checked. (A NUL in the body is the body's business.)"""
    assert status_of(request(extra=junk + b"\r\n")) == 400
    assert parse_message(request(body=b"v=0\x00\r\n")).body == b"v=0\x00\r\n"
    quoted = parse_message(request(extra=b'X-E: "a\\\x00b" x\r\n'))  # a quoted-pair
    assert quoted.get("x-e") is not None


def test_several_values_in_one_header_line() -> None:
    """Via, Route and Contact lists read value by value through the typed accessors."""
    extra = (b"Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
             b"Route: <sip:p3.example.com;lr>\r\n")
    data = request(extra=extra).replace(
        b"Via: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-abc;rport\r\n",
        b"Via: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK-top, SIP/2.0/TCP 192.0.2.8:5070;branch=z9hG4bK-2\r\n"
        b"v: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-abc;rport\r\n", 1,
    ).replace(b"Contact: <sip:alice@192.0.2.7:5062>",
              b"Contact: <sip:a@192.0.2.7>;q=0.7, \"B\" <sip:b@192.0.2.8>;q=0.3", 1)
    msg = parse_message(data)
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.9", "z9hG4bK-top"),
        ("TCP", "192.0.2.8", "z9hG4bK-2"),
        ("UDP", "192.0.2.7", "z9hG4bK-abc"),
    ]
    assert msg.top_via.branch == "z9hG4bK-top"
    assert [r.uri.host for r in msg.routes] == ["p1.example.com", "p2.example.com", "p3.example.com"]
    assert [(c.uri.user, c.display) for c in msg.contacts] == [("a", None), ("b", "B")]
    assert msg.values("route") == [
        "<sip:p1.example.com;lr>, <sip:p2.example.com;lr>", "<sip:p3.example.com;lr>"
    ]
    assert msg.count("via") == 2 and msg.count("route") == 2 and msg.count("x-none") == 0


def test_leading_crlfs_before_the_start_line_are_ignored() -> None:
    """RFC 3261 §7.5: CRLFs before the start line are skipped (and not serialized back)."""
    data = request()
    msg = parse_message(b"\r\n\r\n\r\n" + data)
    assert msg.method == "INVITE"
    assert msg.serialize() == data


# ------------------------------------------------------------------ Content-Length and size
def test_udp_body_beyond_content_length_is_discarded() -> None:
    """RFC 3261 §18.3: over UDP, octets past Content-Length are dropped (RFC 4475 dblreq)."""
    data = request(body=BODY)
    msg = parse_message(data + b"garbage after the body")
    assert msg.body == BODY
    assert msg.serialize() == data


def test_udp_body_without_content_length_runs_to_the_end() -> None:
    """Over UDP, Content-Length is optional: the body is the rest of the datagram."""
    data = request().replace(f"Content-Length: {len(BODY)}\r\n".encode(), b"", 1)
    msg = parse_message(data)
    assert msg.content_length is None and msg.body == BODY


def test_body_shorter_than_content_length_is_400() -> None:
    """RFC 3261 §18.3: fewer octets than Content-Length is an error (RFC 4475 clerr)."""
    assert status_of(request(cl=b"9999")) == 400


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1.5", b"", b"99999999999", b"\xd9\xa1"])
def test_malformed_content_length_is_400(value: bytes) -> None:
    """Content-Length is 1*DIGIT within range (RFC 4475 ncl)."""
    assert status_of(request(cl=value)) == 400


def test_duplicated_content_length_is_400() -> None:
    """Two Content-Length headers cannot be trusted (RFC 4475 mcl01)."""
    data = request(extra=b"l: 5\r\n")
    assert status_of(data) == 400


def test_missing_content_length_on_a_stream_is_400() -> None:
    """Over TCP the message must say how long its body is (RFC 3261 §18.3, §20.14)."""
    data = request().replace(f"Content-Length: {len(BODY)}\r\n".encode(), b"", 1)
    assert status_of(data, datagram=False) == 400
    assert parse_message(request(), datagram=False).body == BODY


def test_message_above_max_size_is_513() -> None:
    """A message larger than the limit is refused with 513 before parsing (RFC 3261 §21.5.11)."""
    data = request()
    assert status_of(data, max_size=len(data) - 1) == 513
    assert parse_message(data, max_size=len(data)).body == BODY


def test_no_empty_line_after_the_headers_is_400_with_a_partial() -> None:
    """RFC 3261 §7: the empty line is mandatory (RFC 4475 baddn); the error still carries what
    could be split so the request can be answered."""
    data = request(body=b"").replace(b"\r\n\r\n", b"\r\n")
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status == 400
    partial = info.value.partial
    assert partial.method == "INVITE" and partial.top_via.branch == "z9hG4bK-abc"


# ------------------------------------------------------------------ mandatory headers
@pytest.mark.parametrize("name", [b"From", b"To", b"Call-ID", b"CSeq", b"Via"])
def test_missing_mandatory_header_is_400(name: bytes) -> None:
    """From, To, Call-ID, CSeq and Via are required (RFC 3261 §8.1.1, RFC 4475 insuf)."""
    lines = request().split(b"\r\n")
    data = b"\r\n".join(line for line in lines if not line.startswith(name + b":"))
    assert status_of(data) == 400


@pytest.mark.parametrize("line", [
    b"From: <sip:x@192.0.2.9>;tag=2", b"To: <sip:y@192.0.2.9>", b"Call-ID: other",
    b"CSeq: 2 INVITE", b"Max-Forwards: 5", b"i: other",
])
def test_duplicated_single_value_header_is_400(line: bytes) -> None:
    """From, To, Call-ID, CSeq, Max-Forwards may appear once only (RFC 4475 multi01)."""
    assert status_of(request(extra=line + b"\r\n")) == 400


def test_errors_on_requests_carry_the_partial_message() -> None:
    """A request refused after splitting keeps its parsed headers on the error (``partial``)."""
    with pytest.raises(SipParseError) as info:
        parse_message(request(extra=b"CSeq: 2 INVITE\r\n"))
    partial = info.value.partial
    assert isinstance(partial, Message) and partial.call_id == "call-1@192.0.2.7"


def test_empty_call_id_is_400() -> None:
    """Call-ID = callid: it cannot be empty."""
    assert status_of(request().replace(b"Call-ID: call-1@192.0.2.7", b"Call-ID:  ", 1)) == 400


# ------------------------------------------------------------------ CSeq and Max-Forwards
def test_cseq_method_must_match_the_request_method() -> None:
    """RFC 3261 §8.1.1.5 (RFC 4475 mismatch01/02)."""
    assert status_of(request(cseq=b"1 OPTIONS")) == 400
    assert status_of(request(method=b"NEWMETHOD")) == 400
    assert parse_message(request(method=b"NEWMETHOD", cseq=b"1 NEWMETHOD")).method == "NEWMETHOD"


@pytest.mark.parametrize(("value", "ok"), [
    (b"0 INVITE", True), (b"2147483647 INVITE", True), (b"2147483648 INVITE", False),
    (b"36893488147419103232 INVITE", False), (b"00000000001 INVITE", False), (b"1\tINVITE", True),
    (b"-1 INVITE", False), (b"1 INV ITE", False), (b"1", False), (b"INVITE", False),
    (b"1 INVITE;x", False), (b"\xd9\xa1 INVITE", False),
])
def test_cseq_number_and_method(value: bytes, ok: bool) -> None:
    """CSeq = 1*DIGIT LWS Method, the number below 2**31 (RFC 3261 §8.1.1.5, RFC 4475 scalar02)."""
    data = request(cseq=value)
    if ok:
        assert parse_message(data).cseq[1] == "INVITE"
    else:
        assert status_of(data) == 400


@pytest.mark.parametrize(("value", "expected"), [
    (b"0", 0), (b"70", 70), (b"0068", 68), (b"255", 255), (b"256", None), (b"300", None),
    (b"abc", None), (b"-1", None), (b"", None), (b"7 0", None),
])
def test_max_forwards(value: bytes, expected: int | None) -> None:
    """Max-Forwards is 1*DIGIT, 0 to 255; anything else is a 400."""
    data = request().replace(b"Max-Forwards: 70", b"Max-Forwards: " + value, 1)
    if expected is None:
        assert status_of(data) == 400
    else:
        assert parse_message(data).max_forwards == expected


# ------------------------------------------------------------------ start line
@pytest.mark.parametrize(("line", "status"), [
    (b"INVITE sip:bob@192.0.2.1 SIP/3.0", 505),
    (b"OPTIONS sip:bob@192.0.2.1 SIP/7.0", 505),
    (b"INVITE sip:bob@192.0.2.1 HTTP/1.1", 400),
    (b"INVITE  sip:bob@192.0.2.1 SIP/2.0", 400),
    (b"INVITE sip:bob@192.0.2.1 SIP/2.0 ", 400),
    (b"INVITE sip:bob@192.0.2.1", 400),
    (b"INV@TE sip:bob@192.0.2.1 SIP/2.0", 400),
    (b"INVITE sip:bob@192.0.2.1; lr SIP/2.0", 400),
])
def test_bad_request_lines(line: bytes, status: int) -> None:
    """Request-Line = Method SP Request-URI SP SIP-Version (RFC 4475 badvers, lwsstart, trws)."""
    data = request().replace(b"INVITE sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0", line, 1)
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status == status
    # The request can still be answered: its headers ride on the error.
    assert info.value.partial is not None and info.value.partial.top_via.branch == "z9hG4bK-abc"


def test_sip_version_is_case_insensitive() -> None:
    """SIP-Version is an ABNF string, so case-insensitive."""
    msg = parse_message(request().replace(b"SIP/2.0\r\nVia", b"sip/2.0\r\nVia", 1))
    assert msg.method == "INVITE"
    assert parse_message(RESPONSE.replace(b"SIP/2.0 180", b"sip/2.0 180", 1)).status == 180


@pytest.mark.parametrize("line", [
    b"SIP/2.0 4294967301 better not break the receiver", b"SIP/2.0 18 Ringing",
    b"SIP/2.0 180Ringing", b"SIP/2.0 700 Nope", b"SIP/2.0 099 Nope", b"SIP/2.0",
    b"SIP/2.0 1a0 Ringing",
])
def test_bad_status_lines_are_400(line: bytes) -> None:
    """Status-Code = 3DIGIT, 100 to 699 (RFC 4475 bigcode); responses carry no partial."""
    data = RESPONSE.replace(b"SIP/2.0 180 Ringing", line, 1)
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status == 400
    assert getattr(info.value, "partial", None) is None


def test_response_with_another_version_is_505() -> None:
    """A response in another SIP version is refused (and, being a response, never answered)."""
    assert status_of(RESPONSE.replace(b"SIP/2.0 180", b"SIP/3.0 180", 1)) == 505


def test_request_uri_with_headers_is_400() -> None:
    """RFC 3261 §19.1.1: no headers in a SIP Request-URI (RFC 4475 escruri)."""
    msg = parse_message(request().replace(
        b"INVITE sip:+18005550199@192.0.2.1:5060;user=phone",
        b"INVITE sip:user@example.com?Route=%3Csip:example.com%3E", 1))
    with pytest.raises(SipParseError) as info:
        msg.check_request()
    assert info.value.status == 400


def test_check_request_parses_uri_from_and_to() -> None:
    """check_request raises for a malformed Request-URI, From or To (RFC 4475 quotbal)."""
    parse_message(request()).check_request()
    bad_to = request().replace(b"To: <sip:", b"To: \"Mr. J. User <sip:", 1)
    with pytest.raises(SipParseError):
        parse_message(bad_to).check_request()
    bad_uri = request().replace(b"INVITE sip:+18005550199@192.0.2.1:5060;user=phone",
                                b"INVITE <sip:user@example.com>", 1)
    with pytest.raises(SipParseError):
        parse_message(bad_uri).check_request()


# ------------------------------------------------------------------ typed accessors
def test_typed_accessors() -> None:
    """Each accessor parses its header on first use and returns the structured value."""
    extra = (
        b"Record-Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>\r\n"
        b"Route: <sip:192.0.2.1:5060;lr>\r\n"
        b"P-Asserted-Identity: \"Alice\" <sip:+12125550100@example.com;user=phone>\r\n"
        b"P-Asserted-Identity: <tel:+12125550100>\r\n"
        b"Diversion: <sip:+18005550111@example.com>;reason=unconditional\r\n"
        b"History-Info: <sip:bob@example.com>;index=1, <sip:vm@example.com;cause=486>;index=1.1\r\n"
        b"Identity: eyJhbGciOiJFUzI1NiJ9.eyJ4IjoxfQ.c2ln;info=<https://cert.example.org/c.pem>;alg=ES256;ppt=shaken\r\n"
        b"Supported: timer, 100rel\r\nSupported: replaces\r\nProxy-Require: foo\r\n"
    )
    msg = parse_message(request(extra=extra))
    assert msg.top_via.branch == "z9hG4bK-abc" and msg.top_via.has_rport
    assert [v.port for v in msg.vias] == [5062]
    assert msg.from_.tag == "f1" and msg.from_tag == "f1" and msg.from_.display == "Alice"
    assert msg.to_tag is None and msg.to.uri.user == "+18005550199"
    assert [c.uri.port for c in msg.contacts] == [5062]
    assert [str(r.uri) for r in msg.record_routes] == [
        "sip:p2.example.com;lr", "sip:p1.example.com;lr"]
    assert [r.uri.has_param("lr") for r in msg.routes] == [True]
    assert [p.uri.scheme for p in msg.p_asserted_identities] == ["sip", "tel"]
    assert msg.diversions[0].params and msg.diversions[0].uri.user == "+18005550111"
    assert [(e.index, e.cause) for e in msg.history_info] == [("1", None), ("1.1", 486)]
    ident = msg.identities[0]
    assert (ident.info, ident.alg, ident.ppt) == ("https://cert.example.org/c.pem", "ES256", "shaken")
    assert msg.request_uri.number == "+18005550199"
    assert msg.request_uri.param("user") == "phone"
    assert msg.cseq == (1, "INVITE") and msg.max_forwards == 70
    assert msg.content_length == len(BODY) and msg.call_id == "call-1@192.0.2.7"
    assert msg.option_tags("supported") == ["timer", "100rel", "replaces"]
    assert msg.option_tags("proxy-require") == ["foo"] and msg.option_tags("require") == []
    # Cached: the same object comes back.
    assert msg.vias is msg.vias and msg.request_uri is msg.request_uri


def test_contact_star() -> None:
    """``Contact: *`` (REGISTER remove-all) reads as no contacts."""
    data = request(method=b"REGISTER", cseq=b"1 REGISTER").replace(
        b"Contact: <sip:alice@192.0.2.7:5062>", b"Contact: *", 1)
    msg = parse_message(data)
    assert msg.contacts == [] and msg.get("contact") == "*"


def test_absent_optional_headers_read_empty() -> None:
    """Accessors of absent list headers give empty lists; get() gives None."""
    msg = parse_message(RESPONSE)
    assert msg.routes == [] and msg.p_asserted_identities == [] and msg.diversions == []
    assert msg.history_info == [] and msg.identities == []
    assert msg.get("subject") is None and msg.values("subject") == [] and msg.indexes("x") == []
    with pytest.raises(SipParseError):
        _ = msg.request_uri


def test_typed_accessor_errors_are_sip_parse_errors() -> None:
    """A malformed structured header raises SipParseError (400) on access, nothing else."""
    msg = parse_message(request().replace(
        b"Via: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-abc;rport",
        b"Via: SIP/2.0/UDP 192.0.2.15;;,;,,", 1))
    with pytest.raises(SipParseError) as info:
        _ = msg.vias
    assert info.value.status == 400


# ------------------------------------------------------------------ raw access and serialization
def test_unknown_headers_are_kept_byte_for_byte() -> None:
    """Headers sipguard does not know keep spacing, case and bytes (even non-UTF-8) exactly."""
    extra = (b"X-Weird-Header:   spaced   value  \r\n"
             b"extensionHeader-!.%*+_`'~:\xef\xbb\xbf\xe5\xa4\xa7\xe5\x81\x9c\xe9\x9b\xbb\r\n"
             b"X-Latin1: caf\xe9\r\n")
    data = request(extra=extra)
    msg = parse_message(data)
    i = msg.indexes("x-weird-header")[0]
    assert msg.lines[i] == b"X-Weird-Header:   spaced   value  "
    assert msg.value_at(i) == "spaced   value"
    assert msg.get("x-latin1") == "caf\udce9"  # surrogateescape: bytes survive a round trip
    assert msg.has("extensionheader-!.%*+_`'~")
    assert msg.serialize() == data


def test_serialize_with_prepend_replace_and_append() -> None:
    """Edits splice into the raw lines: prepend on top, replace or remove by index, append at
    the end; untouched lines and the body are copied."""
    msg = parse_message(request())
    mf = msg.indexes("max-forwards")[0]
    contact = msg.indexes("contact")[0]
    out = msg.serialize(
        prepend=[b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsg1"],
        replace={mf: b"Max-Forwards: 69", contact: None},
        append=[b"X-Added: 1"],
    )
    again = parse_message(out)
    assert again.names[0] == "via" and again.top_via.host == "192.0.2.1"
    assert [v.branch for v in again.vias] == ["z9hG4bKsg1", "z9hG4bK-abc"]
    assert again.max_forwards == 69
    assert not again.has("contact")
    assert again.names[-1] == "x-added" and again.body == BODY
    unchanged = [line for i, line in enumerate(msg.lines) if i not in (mf, contact)]
    assert [line for line in again.lines[1:-1] if line != b"Max-Forwards: 69"] == unchanged
    # A new start line and body.
    out = msg.serialize(start_line=b"ACK sip:bob@192.0.2.1 SIP/2.0", body=b"")
    assert out.startswith(b"ACK sip:bob@192.0.2.1 SIP/2.0\r\nVia:") and out.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    "data",
    [
        RESPONSE,
        request(),
        b"\r\n\r\n" + RESPONSE,  # CRLFs before the start line are not kept
        request(body=BODY + b"excess after Content-Length"),  # UDP: the excess is cut
        RESPONSE.replace(b"CSeq: 1 INVITE\r\n", b"CSeq: 1\r\n INVITE\r\n"),  # folded line
    ],
    ids=["response", "request", "leading-crlf", "udp-excess", "folded"],
)
def test_without_line_equals_serialize_without_that_line(data: bytes) -> None:
    """Cutting a header line out of the received bytes gives exactly what rebuilding the
    message without that line gives, for every line."""
    msg = parse_message(data)
    for i in range(len(msg.lines)):
        assert msg.without_line(i) == msg.serialize(replace={i: None})
    if msg.count("via") > 1:  # a response losing its top Via, as the proxy sends it on
        assert parse_message(msg.without_line(0)).count("via") == msg.count("via") - 1
