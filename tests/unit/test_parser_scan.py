"""The parser's fast path in C (sipguard/sip/_scan.c) against the same path in Python.

``parse_message`` uses the C scan and check when they are built (``python -m sipguard.native build``, which
``make test`` runs) and the Python loop otherwise; both must give the same message — start
line, header names and lines, index, body, validated fields — or the same error, for every
input: the RFC 4475 messages, messages with random damage, and random bytes. Without the build
the comparison cannot be made and these tests are skipped; the scan's direct tests then still
run on the Python side of each pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipguard.sip import message, parser
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import ParseLimits
from sipguard.sip.parser import parse_message
from tests.unit.test_robustness import SEEDS, SETTINGS, any_bytes, mutated

BUILT = parser.SCAN
CHECK = parser.CHECK
VALUE_TEXT = message.VALUE_TEXT
needs_scan = pytest.mark.skipif(BUILT is None, reason="C scan not built (sipguard.native)")


@contextmanager
def python_path() -> Iterator[None]:
    saved = parser.SCAN, parser.CHECK, parser.START_LINE, message.VALUE_TEXT
    parser.SCAN = parser.CHECK = parser.START_LINE = message.VALUE_TEXT = None
    try:
        yield
    finally:
        parser.SCAN, parser.CHECK, parser.START_LINE, message.VALUE_TEXT = saved


def outcome(data: bytes, **kw: Any) -> tuple[Any, ...]:
    """What parsing ``data`` gives, as comparable values."""
    try:
        msg = parse_message(data, **kw)
    except SipParseError as err:
        partial = err.partial
        return ("error", err.status, err.detail,
                None if partial is None else (partial.names, partial.lines))
    return ("message", msg.start_line, msg.method, msg.uri_text, msg.status, msg.reason,
            msg.names, msg.lines, msg._index, msg.body, dict(msg._cache), msg._frame,
            [msg.value_at(i) for i in range(len(msg.lines))])


def same_both_ways(data: bytes, **kw: Any) -> None:
    # A name seen for the first time is learnt by the general path (the header-name cache),
    # and the next parse of the same bytes takes the fast path: parse once before comparing.
    outcome(data, **kw)
    fast = outcome(data, **kw)
    with python_path():
        slow = outcome(data, **kw)
    assert fast == slow, data


@needs_scan
@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_rfc4475_and_seed_messages_parse_the_same_in_c_and_python(seed: int) -> None:
    for datagram in (True, False):
        same_both_ways(SEEDS[seed], datagram=datagram)


@needs_scan
@SETTINGS
@given(data=mutated())
def test_damaged_messages_parse_the_same_in_c_and_python(data: bytes) -> None:
    same_both_ways(data)


@needs_scan
@SETTINGS
@given(data=any_bytes)
def test_random_bytes_parse_the_same_in_c_and_python(data: bytes) -> None:
    same_both_ways(data, datagram=False)


BASE = (b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c1\r\n"
        b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")


# Start lines: the usual ones (the C start_line), and what it leaves to the Python code.
START_LINES = [
    b"SIP/2.0 180 Ringing", b"SIP/2.0 200", b"SIP/2.0 200 ", b"SIP/2.0 699 x", b"SIP/2.0 700 x",
    b"SIP/2.0 099 x", b"SIP/2.0 20 OK", b"SIP/2.0 2000 OK", b"SIP/2.0 20x OK", b"SIP/2.0  200 OK",
    b"sip/2.0 200 OK", b"SIP/3.0 200 OK", b"SIP/2.0 200 D\xc3\xa9j\xc3\xa0", b"SIP/2.0 200 \xff",
    b"SIP/2.0 200 OK\tand more  words", b"SIP/2.0", b"SIP/2.0 ", b"SIP/",
    b"OPTIONS sip:a@example.com sip/2.0", b"OPTIONS sip:a@example.com SIP/2.1",
    b"OPTIONS sip:a@example.com SIP/2.0 ", b"OPTIONS  sip:a@example.com SIP/2.0",
    b"OPTIONS sip:a@example.com  SIP/2.0", b"OPTIONS sip:a\t@example.com SIP/2.0",
    b"OPTIONS sip:\xc3\xa9@example.com SIP/2.0", b"FOO sip:a@example.com SIP/2.0",
    b"options sip:a@example.com SIP/2.0", b"OPT<IONS sip:a@example.com SIP/2.0",
    b" OPTIONS sip:a@example.com SIP/2.0", b"OPTIONS", b"OPTIONS sip:a@example.com", b"",
]


@needs_scan
@pytest.mark.parametrize("line", START_LINES)
def test_start_line_in_c_is_the_python_one_or_declines(line: bytes) -> None:
    from sipguard.sip import _scan

    fast = _scan.start_line(line, message.METHODS)
    with python_path():
        try:
            slow: Any = parser._parse_start_line(line)
        except SipParseError as err:
            slow = err
    if fast is not None:
        assert fast == slow, line
    assert _scan.start_line(b"SIP/2.0 180 Ringing", message.METHODS) == (None, None, 180,
                                                                          "Ringing")
    assert _scan.start_line(b"ACK sip:a@h SIP/2.0", message.METHODS) == ("ACK", "sip:a@h", 0, "")


@needs_scan
@pytest.mark.parametrize("data", [
    BASE,
    BASE.replace(b"Call-ID: c1\r\n", b"Call-ID: c\r1\r\n"),  # a bare CR in a header
    BASE.replace(b"Call-ID: c1\r\n", b"Call-ID: c\n1\r\n"),  # a bare LF in a header
    BASE.replace(b"OPTIONS sip:a@", b"OPTIONS sip:\ra@"),  # a bare CR in the start line
    BASE.replace(b"OPTIONS sip:a@", b"OPTIONS sip:\na@"),  # a bare LF in the start line
    BASE.replace(b"Content-Length: 0\r\n", b"Content-Length: 0\r\n\r"),  # a CR before the end
    BASE.replace(b"CSeq: 1 OPTIONS\r\n", b"CSeq: 1\r\n OPTIONS\r\n"),  # folded: Python path
    BASE.replace(b"Call-ID: c1\r\n", b"Call-ID: c1\r\nX-New-Name-Here: 1\r\n"),  # unknown name
    BASE.replace(b"Call-ID: c1\r\n", b"Call-ID: c1\r\nno colon here\r\n"),
    BASE.replace(b"Call-ID: c1\r\n", b"Call-ID: c1\r\nv: SIP/2.0/UDP h2;branch=z9hG4bK2\r\n"),
    b"\r\n\r\n" + BASE,  # CRLFs before the start line
    BASE.replace(b"\r\n\r\n", b"\r\n\r\nbody\r\n\r\nmore"),
    BASE.replace(b"Content-Length: 0", b"Content-Length: 4") + b"body and more",  # cut
    BASE.replace(b"Content-Length: 0", b"Content-Length: 40") + b"short",
    BASE.replace(b"Content-Length: 0", b"Content-Length: 2147483648") + b"x",
    BASE.replace(b"Content-Length: 0", b"Content-Length: 12345678901"),
    BASE.replace(b"Content-Length: 0\r\n", b""),  # none: fine on UDP, an error on TCP
    BASE.replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 0"),  # twice
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 2147483647 OPTIONS"),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 2147483648 OPTIONS"),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 12345678901 OPTIONS"),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE"),  # not the request's method
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq:1\tOPTIONS \t"),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1OPTIONS"),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 OPT/IONS"),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 "),
    BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 OPTIONS\r\nCSeq: 2 OPTIONS"),
    BASE.replace(b"Call-ID: c1", b"Call-ID:  \t"),  # empty
    BASE.replace(b"Call-ID: c1", b"Call-ID: \xff\xfe@h"),  # kept as surrogates
    BASE.replace(b"To: <sip:b@example.com>\r\n", b""),
    BASE.replace(b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n", b""),
    BASE.replace(b"Call-ID: c1", b"Call-ID: c1\r\nMax-Forwards: 70"),
    BASE.replace(b"Call-ID: c1", b"Call-ID: c1\r\nMax-Forwards: 0070"),  # the Python path
    BASE.replace(b"Call-ID: c1", b"Call-ID: c1\r\nMax-Forwards: 256"),
    BASE.replace(b"Call-ID: c1", b"Call-ID: c1\r\nMax-Forwards: 7 0"),
    BASE.replace(b"Call-ID: c1", b"Call-ID: c1\r\nMax-Forwards: 1\r\nMax-Forwards: 2"),
    b"SIP/2.0 200 OK\r\n" + BASE.split(b"\r\n", 1)[1],  # a response
    b"SIP/2.0 200 OK\r\nMax-Forwards: 999\r\n" + BASE.split(b"\r\n", 1)[1],
    *(line + b"\r\n" + BASE.split(b"\r\n", 1)[1] for line in START_LINES),
])
def test_edge_cases_parse_the_same_in_c_and_python(data: bytes) -> None:
    same_both_ways(data)
    same_both_ways(data, datagram=False)


@needs_scan
def test_limits_send_the_block_to_the_python_path_with_the_same_result() -> None:
    """Over max_headers or max_header_line the C scan declines and the general path reports
    the limit exactly as without the scan."""
    for limits in (ParseLimits(max_headers=6), ParseLimits(max_header_line=30),
                   ParseLimits(max_headers=7, max_header_line=40),
                   ParseLimits(max_headers=10**30, max_header_line=2**64)):  # no bound
        same_both_ways(BASE, limits=limits)


@needs_scan
def test_the_scan_declines_what_only_the_general_path_handles() -> None:
    """None (the general path) for a bare CR or LF, an unknown name, a line over the limit or
    too many lines; the split and index otherwise."""
    assert BUILT is not None
    eol = BASE.find(b"\r\n")
    end = BASE.find(b"\r\n\r\n")
    lines, names, index = BUILT(BASE, 0, eol, end, parser._NAME_CACHE, 100, 1000) or ((), (), {})
    assert lines == BASE[eol + 2 : end].split(b"\r\n")
    assert names == ["via", "from", "to", "call-id", "cseq", "content-length"]
    assert index == {name: [i] for i, name in enumerate(names)}
    assert BUILT(BASE, 0, eol, end, parser._NAME_CACHE, 5, 1000) is None  # 6 lines
    assert BUILT(BASE, 0, eol, end, parser._NAME_CACHE, 100, 20) is None  # a line of 30+
    assert BUILT(BASE, 0, eol, end, {}, 100, 1000) is None  # no name known
    bad = BASE.replace(b"c1", b"c\r")
    assert BUILT(bad, 0, eol, bad.find(b"\r\n\r\n"), parser._NAME_CACHE, 100, 1000) is None
    with pytest.raises(ValueError):
        BUILT(BASE, 0, eol, len(BASE), parser._NAME_CACHE, 100, 1000)  # past the end


@needs_scan
def test_the_names_memo_answers_what_the_dict_passed_says() -> None:
    """The scan remembers raw spellings it looked up (sipguard/sip/_scan.c: the names memo);
    a scan with another dict gets that dict's answers, never the memo's, and spellings that
    share a memo slot each get their own name."""
    assert BUILT is not None
    eol = BASE.find(b"\r\n")
    end = BASE.find(b"\r\n\r\n")
    known = dict(parser._NAME_CACHE)
    first = BUILT(BASE, 0, eol, end, parser._NAME_CACHE, 100, 1000)
    assert first is not None and first[1][0] == "via"
    renamed = {key: "x-" + name for key, name in known.items()}
    other = BUILT(BASE, 0, eol, end, renamed, 100, 1000)
    assert other is not None and other[1] == ["x-" + n for n in first[1]]
    without_via = {key: name for key, name in known.items() if key != b"Via"}
    assert BUILT(BASE, 0, eol, end, without_via, 100, 1000) is None
    again = BUILT(BASE, 0, eol, end, parser._NAME_CACHE, 100, 1000)
    assert again is not None and again[1] == first[1]
    # 600 spellings (more than the memo's 256 slots), each its own name, twice over.
    spellings = {f"X-H{i}".encode(): f"x-h{i}" for i in range(600)}
    block = b"\r\n".join(key + b": v" for key in spellings)
    data = b"OPTIONS sip:a@b SIP/2.0\r\n" + block + b"\r\n\r\n"
    for _ in range(2):
        got = BUILT(data, 0, data.find(b"\r\n"), data.find(b"\r\n\r\n"), spellings, 1000, 1000)
        assert got is not None and got[1] == list(spellings.values())


@needs_scan
def test_the_check_gives_the_validated_fields_or_declines() -> None:
    """check() returns the CSeq, Max-Forwards (requests only), Content-Length and Call-ID of
    the usual message, and None wherever parser._validate has an error to report."""
    assert CHECK is not None
    eol = BASE.find(b"\r\n")

    def checked(data: bytes, request: bool = True, datagram: bool = True,
                body: int = 0) -> Any:
        scanned = BUILT(data, 0, eol, data.find(b"\r\n\r\n"), parser._NAME_CACHE, 100, 1000)
        assert scanned is not None
        return CHECK(scanned[0], scanned[2], parser.METHODS, request, datagram, body)

    assert checked(BASE) == ((1, "OPTIONS"), None, 0, "c1")
    with_mf = BASE.replace(b"Call-ID: c1", b"Call-ID: c1\r\nMax-Forwards: 69")
    assert checked(with_mf) == ((1, "OPTIONS"), 69, 0, "c1")
    assert checked(with_mf, request=False) == ((1, "OPTIONS"), None, 0, "c1")
    assert checked(BASE.replace(b"CSeq: 1 OPTIONS", b"CSeq: 7 FOO")) == ((7, "FOO"), None, 0,
                                                                          "c1")
    assert checked(BASE.replace(b"Content-Length: 0", b"Content-Length: 3"), body=2) is None
    assert checked(BASE.replace(b"Content-Length: 0\r\n", b""), datagram=False) is None
    assert checked(BASE.replace(b"Call-ID: c1", b"Call-ID: ")) is None



# Header lines as they come: a name, a colon or not, values with SP/HT, folds (CRLF + SP/HT),
# bare CRs and LFs, bytes that are not UTF-8.
line_parts = st.lists(st.sampled_from([b"Subject", b":", b" ", b"\t", b"\r\n", b"\r\n ",
                                       b"\r\n\t", b"\r", b"\n", b"a", b"b c", b"\xff", b"\xc3\xa9",
                                       b";tag=1", b","]), max_size=12)


@needs_scan
@SETTINGS
@given(parts=line_parts)
def test_value_text_is_raw_value_decoded(parts: list[bytes]) -> None:
    """value_text(line) is decode(raw_value(line)) for any line: folded or not, with or without
    a colon, whitespace anywhere, bytes that are not UTF-8."""
    assert VALUE_TEXT is not None
    line = b"".join(parts)
    assert VALUE_TEXT(line) == message.decode(message.raw_value(line)), line


@needs_scan
@pytest.mark.parametrize("line", [
    b"", b":", b"Via", b"Via:", b"Via: ", b"Via:\t x \t", b"Subject: a\r\n b", b"Subject: a \r\n\t b ",
    b"Subject: a\r\n \r\n b", b"Subject:\r\n x", b"Subject: x\r\n", b"Subject: a\r\r\n b",
    b"Subject: a: b", b"Subject: \xff\xfe", b"X: \r\n",
])
def test_value_text_on_edge_cases(line: bytes) -> None:
    assert VALUE_TEXT is not None
    assert VALUE_TEXT(line) == message.decode(message.raw_value(line))
