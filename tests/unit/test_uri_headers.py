"""Headers embedded in URIs from outside (sip/uri_headers.py): what a receiver must not take
from them is removed, everything else is kept byte for byte."""

from __future__ import annotations

import pytest

from sipguard.sip.uri_headers import without_unsafe_headers

OWNED = frozenset({"x-sipguard-verdict", "x-trusted-caller"})


@pytest.mark.parametrize(("line", "expected", "removed"), [
    # RFC 3261 §19.1.5's dangerous headers and the identities, in any spelling
    (b"Refer-To: <sip:a@b?From=sip:x@y>", b"Refer-To: <sip:a@b>", 1),
    (b"Refer-To: <sip:a@b?f=sip:x@y&i=1&v=x&m=y>", b"Refer-To: <sip:a@b>", 4),
    (b"Refer-To: <sip:a@b?P%2dAsserted-Identity=x>", b"Refer-To: <sip:a@b>", 1),
    (b"Refer-To: <sip:a@b?p-asserted-IDENTITY=x&Identity=y&y=z>", b"Refer-To: <sip:a@b>", 3),
    (b"Refer-To: <sip:a@b?Remote-Party-ID=x&Diversion=y&History-Info=z>",
     b"Refer-To: <sip:a@b>", 3),
    (b"Refer-To: <sip:a@b?Route=%3Csip:evil%3E&Record-Route=x&CSeq=1&Call-ID=2>",
     b"Refer-To: <sip:a@b>", 4),
    # sipguard's own headers and sip.strip_headers
    (b"Refer-To: <sip:a@b?X-Sipguard-Verdict=passed&X-Trusted-Caller=1>",
     b"Refer-To: <sip:a@b>", 2),
    # a value that becomes a header line of its own once decoded; a name that is no token
    (b"Refer-To: <sip:a@b?Subject=hi%0d%0aP-Asserted-Identity:x>", b"Refer-To: <sip:a@b>", 1),
    (b"Refer-To: <sip:a@b?Sub%0Aject=hi>", b"Refer-To: <sip:a@b>", 1),
    (b"Refer-To: <sip:a@b?=x>", b"Refer-To: <sip:a@b>", 1),
    # what stays: Replaces (attended transfer), Subject, body, and the parameters after '>'
    (b"Refer-To: <sip:a@b?Replaces=c%40h%3Bto-tag%3D1&From=x>;method=INVITE",
     b"Refer-To: <sip:a@b?Replaces=c%40h%3Bto-tag%3D1>;method=INVITE", 1),
    (b"Refer-To: <sip:a@b?Subject=hi&body=x>", b"Refer-To: <sip:a@b?Subject=hi&body=x>", 0),
    # the URI written without angle brackets: its headers end at ';' or ','
    (b"r: sip:a@b?From=x;p=1", b"r: sip:a@b;p=1", 1),
    # each entry of a list; a '?' in a quoted display name is text
    (b'Contact: "who?From=x" <sip:a@b?From=y>, <sip:c@d?Subject=s&Via=v>',
     b'Contact: "who?From=x" <sip:a@b>, <sip:c@d?Subject=s>', 2),
    (b'Contact: "a\\"?From=x" <sip:a@b>', b'Contact: "a\\"?From=x" <sip:a@b>', 0),
    (b"Contact: <sip:a@b>;expires=60", b"Contact: <sip:a@b>;expires=60", 0),
])
def test_unsafe_embedded_headers_are_removed(line: bytes, expected: bytes, removed: int) -> None:
    assert without_unsafe_headers(line, OWNED) == (expected, removed)


def test_a_line_without_change_is_the_same_object() -> None:
    line = b"Refer-To: <sip:a@b?Replaces=x>"
    assert without_unsafe_headers(line)[0] is line


def test_a_question_mark_in_the_user_part_is_not_a_header() -> None:
    """sipguard's URI parser ends the userinfo at the first '@': a '?' before it is part of
    the user (invalid, but read leniently), not the start of headers."""
    for line in (b"From: <sip:us?er@example.com>;tag=1", b"From: sip:us?er@example.com;tag=1",
                 b"Contact: <sip:a@b>, sip:us?er@h"):
        assert without_unsafe_headers(line) == (line, 0)
    assert without_unsafe_headers(b"From: <sip:us?er@h?From=x>;tag=1") == \
        (b"From: <sip:us?er@h>;tag=1", 1)
