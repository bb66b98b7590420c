"""Stream framing for SIP over TCP/TLS (RFC 3261 §18.3), apart from parsing.

Bytes from a connection go in with :meth:`StreamFramer.feed`; whole messages (header block plus
exactly Content-Length body bytes) come out, ready for ``parse_message(..., datagram=False)``.
CRLF keep-alives between messages (RFC 5626 §3.5.1: a client sends CRLFCRLF "ping", the server
answers CRLF "pong") are reported so the shell can answer them — once per run of pings in a
read, however long: a stream of nothing but pings costs a scan per read, not a loop pass and
a pong per four bytes.

A stream that cannot be framed — a header block larger than the maximum message size, a
missing or malformed Content-Length, a body above the limit — sets :attr:`StreamFramer.error`
(a :class:`SipParseError` with the status to report); the connection must then be closed, since
there is no way to find where the next message starts. The messages cut before that point in the
same read are still returned: whether a whole message and the garbage behind it arrive in one
read or two is up to TCP segmenting, and it must not decide whether the message is delivered.

Work per :meth:`~StreamFramer.feed` is proportional to the bytes fed, not to the bytes buffered:
the search for the end of the header block resumes where it stopped, and the Content-Length of a
message whose body is still arriving is read once (a folded one joined once, not copied again
for each continuation line). A peer trickling a message byte by byte therefore costs linear
time, and never more than ``max_size`` bytes are held. The per-line limits (number of headers,
line length, folding: :class:`~sipguard.sip.message.ParseLimits`) are the parser's, checked on
each framed message; the framer needs none, since what it holds is bounded by ``max_size``.
"""

from __future__ import annotations

import re
from typing import Final

from sipguard.sip.errors import SipParseError

PING = object()  # marker yielded for a CRLFCRLF keep-alive
_PINGS: Final = re.compile(rb"(?:\r\n\r\n)+")  # a run of keep-alives, matched in C


def _content_length(head: bytes) -> int:
    """Find Content-Length (or its compact form ``l``) in a raw header block.

    ``Content-Length = ( "Content-Length" / "l" ) HCOLON 1*DIGIT``; the value may be folded onto
    a continuation line (HCOLON ends in SWS, which may hold a CRLF).
    """
    found: int | None = None
    lines = head.split(b"\r\n")[1:]
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line or line[0] in b" \t":
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.rstrip(b" \t").lower()
        if name != b"content-length" and name != b"l":
            continue
        first = i
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
        if i > first:  # folded value: one join
            value = b" ".join([value, *lines[first:i]])
        value = value.strip(b" \t")
        if value.isdigit():
            value = value.lstrip(b"0") or b"0"  # 1*DIGIT: "0042" is 42, as over UDP
        if not value.isdigit() or len(value) > 10:
            raise SipParseError(400, "malformed Content-Length on a stream")
        if found is not None and found != int(value):
            raise SipParseError(400, "conflicting Content-Length on a stream")
        found = int(value)
    if found is None:
        raise SipParseError(400, "missing Content-Length on a stream transport")
    return found


class StreamFramer:
    """Cuts a byte stream into SIP messages; one instance per connection."""

    __slots__ = ("_buf", "_scanned", "_total", "error", "error_head", "max_size")

    def __init__(self, max_size: int = 65535) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for CRLFCRLF without success
        self._total = 0  # size of the message at the head of _buf once its headers are in
        self.max_size = max_size
        # Set once the stream cannot be framed; from then on nothing is buffered or returned.
        self.error: SipParseError | None = None
        # with it, the header block of the message that could not be framed when it came
        # whole (too large, its Content-Length missing or bad): what its answer is built from
        self.error_head: bytes | None = None

    def feed(self, data: bytes) -> list[bytes | object]:
        """Add received bytes; return complete messages (bytes) and PING markers, in order.

        When the rest of the stream cannot be framed, what was cut before it is returned and
        :attr:`error` is set (check it after handling the items, then close the connection)."""
        out: list[bytes | object] = []
        if self.error is not None:
            return out
        try:
            self._frame(data, out)
        except SipParseError as err:
            self.error = err
            self._buf.clear()
            self._total = self._scanned = 0
        return out

    def _frame(self, data: bytes, out: list[bytes | object]) -> None:
        buf = self._buf
        buf += data
        while buf:
            total = self._total
            if not total:
                # Leading CRLFs: keep-alive pings (CRLFCRLF) or stray line ends before a message.
                if buf[0] in b"\r\n":
                    pings = _PINGS.match(buf)
                    if pings is not None:
                        del buf[:pings.end()]
                        out.append(PING)  # one pong answers a run of pings
                        continue
                    if buf == b"\r\n" or buf == b"\r" or buf == b"\r\n\r":
                        break  # maybe the start of a ping; wait for more
                    del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
                    continue
                end = buf.find(b"\r\n\r\n", max(self._scanned - 3, 0))
                if end < 0:
                    if len(buf) > self.max_size:
                        raise SipParseError(513, "header block exceeds the maximum message size")
                    self._scanned = len(buf)
                    break
                self._scanned = 0
                head = bytes(buf[:end])
                try:
                    total = end + 4 + _content_length(head)
                    if total > self.max_size:
                        raise SipParseError(513, f"message of {total} bytes exceeds "
                                                 f"{self.max_size}")
                except SipParseError:
                    self.error_head = head
                    raise
                self._total = total
            if len(buf) < total:
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
            self._total = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)
