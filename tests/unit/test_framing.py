"""TCP framing: StreamFramer cuts a byte stream into whole SIP messages and keep-alive pings."""

from __future__ import annotations

import time

import pytest

from sipguard.sip.errors import SipParseError
from sipguard.sip.framing import PING, StreamFramer
from sipguard.sip.parser import parse_message


def msg(n: int = 1, body: bytes = b"hello", *, cl: bytes | None = None) -> bytes:
    length = str(len(body)).encode() if cl is None else cl
    return (
        b"MESSAGE sip:bob@192.0.2.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 192.0.2.7:5062;branch=z9hG4bK-" + str(n).encode() + b"\r\n"
        b"From: <sip:alice@192.0.2.7>;tag=a\r\nTo: <sip:bob@192.0.2.1>\r\n"
        b"Call-ID: c" + str(n).encode() + b"\r\nCSeq: 1 MESSAGE\r\n"
        b"Content-Type: text/plain\r\nContent-Length: " + length + b"\r\n\r\n" + body
    )


def test_two_messages_in_one_feed() -> None:
    """Two back-to-back messages in one read come out as two messages, in order."""
    f = StreamFramer()
    a, b = msg(1, b"first\r\n\r\nwith CRLFCRLF inside"), msg(2, b"")
    assert f.feed(a + b) == [a, b]
    assert f.buffered == 0
    assert [parse_message(m, datagram=False).call_id for m in (a, b)] == ["c1", "c2"]


def test_one_message_split_byte_by_byte() -> None:
    """A message trickled one byte at a time comes out once, when its last byte arrives."""
    f = StreamFramer()
    data = msg(1, b"body\r\n\r\nbody")
    got: list[bytes | object] = []
    for i in range(len(data)):
        out = f.feed(data[i : i + 1])
        assert out == [] or i == len(data) - 1
        got.extend(out)
    assert got == [data]
    assert f.buffered == 0


def test_message_split_in_the_middle_of_the_crlfcrlf_and_body() -> None:
    """Any split point gives the same messages."""
    data = msg(1) + msg(2)
    for cut in range(1, len(data)):
        f = StreamFramer()
        assert f.feed(data[:cut]) + f.feed(data[cut:]) == [msg(1), msg(2)], cut


def test_a_read_full_of_pings_is_one_ping() -> None:
    """16,384 pings in one read, then a message: one PING (one pong answers the run), then
    the message — a ping flood costs a scan per read, not a pong per four bytes."""
    f = StreamFramer()
    assert f.feed(b"\r\n\r\n" * 16384 + msg(1)) == [PING, msg(1)]
    assert f.feed(b"\r\n\r\n" * 3 + b"\r\n") == [PING]  # the last CRLF may start another
    assert f.feed(b"\r\n") == [PING]


def test_crlfcrlf_ping_is_reported_and_a_lone_crlf_is_skipped() -> None:
    """RFC 5626 §3.5.1: CRLFCRLF between messages is a ping; a stray CRLF is ignored."""
    f = StreamFramer()
    assert f.feed(b"\r\n\r\n") == [PING]
    assert f.feed(b"\r\n" + msg(1)) == [msg(1)]
    assert f.feed(msg(2) + b"\r\n\r\n" + msg(3)) == [msg(2), PING, msg(3)]
    # A ping split across reads is still one ping.
    assert f.feed(b"\r\n") == []
    assert f.feed(b"\r") == []
    assert f.feed(b"\n") == [PING]
    assert f.buffered == 0


def test_compact_content_length() -> None:
    """``l:`` is Content-Length (RFC 3261 §7.3.3), whatever its case and spacing."""
    for header in (b"l: ", b"L:", b"l :  "):
        data = msg(1, b"xyz").replace(b"Content-Length: ", header, 1)
        assert StreamFramer().feed(data + b"tail") == [data]


def test_folded_content_length() -> None:
    """HCOLON may end in a folded LWS: the value is on the continuation line."""
    data = msg(1, b"xyz").replace(b"Content-Length: 3", b"Content-Length:\r\n 3", 1)
    assert StreamFramer().feed(data) == [data]
    assert parse_message(data, datagram=False).body == b"xyz"


def error_of(data: bytes, max_size: int = 65535) -> SipParseError:
    """The error one read of ``data`` leaves on a new framer (which returns nothing)."""
    f = StreamFramer(max_size)
    assert f.feed(data) == []
    assert f.error is not None
    return f.error


def test_missing_content_length_is_an_error() -> None:
    """RFC 3261 §18.3: without Content-Length a stream cannot be framed; the connection closes."""
    data = msg(1, b"").replace(b"Content-Length: 0\r\n", b"", 1)
    assert error_of(data).status == 400


@pytest.mark.parametrize("value", [b"-1", b"abc", b"12345678901", b""])
def test_malformed_content_length_is_an_error(value: bytes) -> None:
    """Content-Length must be 1*DIGIT (RFC 4475 ncl) to frame."""
    assert error_of(msg(1, b"", cl=value)).status == 400


def test_conflicting_content_lengths_are_an_error() -> None:
    """Two different lengths: no way to know where the message ends (RFC 4475 mcl01)."""
    data = msg(1, b"abc").replace(b"Content-Type", b"l: 7\r\nContent-Type", 1)
    assert error_of(data).status == 400


def test_header_block_over_max_size_is_513() -> None:
    """A header block that never ends within max_size is refused."""
    f = StreamFramer(max_size=1024)
    head = msg(1).split(b"\r\n\r\n")[0] + b"\r\n"
    assert f.feed(head) == []
    assert f.feed(b"X-Pad: " + b"a" * 1100 + b"\r\n") == []
    assert f.error is not None and f.error.status == 513
    assert f.buffered == 0


def test_body_over_max_size_is_513() -> None:
    """A Content-Length taking the message past max_size is refused before the body arrives."""
    assert error_of(msg(1, b"", cl=b"2000"), max_size=1024).status == 513
    # Exactly at the limit is fine.
    body = b"x" * (1024 - len(msg(1, b"", cl=b"0000")))
    data = msg(1, body, cl=str(len(body)).zfill(4).encode())
    assert len(data) == 1024
    assert StreamFramer(max_size=1024).feed(data) == [data]


def test_garbage_without_crlfcrlf_raises_once_beyond_max_size() -> None:
    """1 MB of junk with no CRLFCRLF: the framer waits up to max_size, then gives up — it never
    holds more than max_size plus one read, and nothing after that."""
    f = StreamFramer(max_size=65535)
    junk = bytes((i * 7 + 3) % 256 for i in range(4096)).replace(b"\r", b"\x00")
    fed = 0
    while f.error is None and fed < 1 << 20:
        assert f.feed(junk) == []
        fed += len(junk)
        assert f.buffered <= 65535 + len(junk)
    assert f.error is not None and f.error.status == 513
    assert fed <= 65535 + len(junk)
    assert f.feed(msg(1)) == [] and f.buffered == 0


def test_garbage_in_one_feed_raises() -> None:
    """1 MB of junk in a single read is an error at once."""
    assert error_of(b"\x00\x01garbage" * (1 << 17)).status == 513


def test_binary_garbage_with_crlfcrlf_is_an_error() -> None:
    """Junk that happens to hold CRLFCRLF has no Content-Length: an error, not a message."""
    assert error_of(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").status == 400


def test_messages_before_garbage_in_the_same_read_are_returned() -> None:
    """Two whole messages and a ping, then an unframeable header block, in one read: the three
    come out, the error is set, the rest is dropped — as if they had arrived in separate reads."""
    f = StreamFramer()
    out = f.feed(msg(1) + b"\r\n\r\n" + msg(2) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + msg(3))
    assert out == [msg(1), PING, msg(2)]
    assert f.error is not None and f.error.status == 400
    assert f.buffered == 0 and f.feed(msg(4)) == []


def test_trickled_large_message_takes_linear_time() -> None:
    """Feeding a 60 KB message a few bytes at a time does not rescan the whole buffer on every
    read (which would be quadratic)."""
    body = b"x" * 60000
    data = msg(1, body).replace(b"Content-Type: text/plain", b"X-Pad: " + b"p" * 3000, 1)
    f = StreamFramer()
    start = time.perf_counter()
    out: list[bytes | object] = []
    for i in range(0, len(data), 7):
        out.extend(f.feed(data[i : i + 7]))
    assert out == [data]
    assert time.perf_counter() - start < 2.0


def test_content_length_with_leading_zeros_frames_as_its_number() -> None:
    """Content-Length is 1*DIGIT: "000000000005" on a stream frames five bytes of body, as
    the same message over UDP parses."""
    f = StreamFramer()
    m = msg(1, b"hello", cl=b"000000000005")
    assert f.feed(m + msg(2)) == [m, msg(2)]
    assert parse_message(m, datagram=False).content_length == 5
