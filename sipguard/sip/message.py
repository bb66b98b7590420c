"""SIP message model: bytes in, a frozen view over the original bytes out.

Theory of operation
-------------------
``parse_message(data)`` does the minimum every message needs and nothing more: it splits the
start line and the header block into raw lines (folded continuation lines stay attached to their
header, byte for byte), maps each header name to its canonical lower-case long form (compact
forms expanded), indexes them by name, checks the handful of things a proxy must check on every
message (start line, version, mandatory single-instance headers, Content-Length, CSeq) and
slices the body. Everything else — Via, From, To, Route, Identity, History-Info and the rest —
is parsed on first access by the grammar modules and cached on the message.

A forwarded message is rebuilt from the original raw lines with a few lines inserted, replaced
or removed (:meth:`Message.serialize`), so every header sipguard does not touch passes through
unchanged, in order.

Only :class:`~sipguard.sip.errors.SipParseError` ever escapes. When the error concerns a
request whose headers could be split, the partially parsed message rides on the error
(``err.partial``) so the proxy can still answer 400 with the caller's Via, From, To, Call-ID and
CSeq copied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sipguard.sip.errors import SipParseError
from sipguard.sip.history_info import HistoryInfoEntry, parse_history_info
from sipguard.sip.identity import Identity, parse_identity
from sipguard.sip.nameaddr import NameAddr, parse_name_addr, parse_name_addr_list
from sipguard.sip.uri import Uri, parse_uri
from sipguard.sip.via import Via, parse_via_list

# RFC 3261 §7.3.3 and the registry of compact forms (RFC 3262, 3515, 3840, 3841, 4028, 8224, ...)
COMPACT: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Headers that a request must carry exactly once (RFC 3261 §8.1.1, §20); Max-Forwards and
# Content-Length may be absent but not repeated.
REQUIRED_ONCE = ("from", "to", "call-id", "cseq")
AT_MOST_ONCE = ("max-forwards", "content-length")

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
_DIGITS = frozenset(b"0123456789")
_WS = b" \t"
CRLF = b"\r\n"
MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5: the sequence number MUST be less than 2**31

# Raw header name (as it appeared, e.g. b"Via", b"v", b"CALL-ID ") -> canonical name. Names
# repeat across messages, so a bounded cache turns validation and lower-casing into one lookup.
_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 2048


def is_token(data: bytes) -> bool:
    """True when ``data`` is a non-empty RFC 3261 token."""
    return bool(data) and not data.translate(None, _TOKEN_BYTES)


def _canonical_name(raw: bytes) -> str:
    name = raw.rstrip(b" \t")
    if not is_token(name):
        raise SipParseError(400, f"malformed header name {name[:40]!r}")
    text = name.decode("ascii").lower()
    text = COMPACT.get(text, text)
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[raw] = text
    return text


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Message:
    """A parsed SIP request or response over its original bytes.

    ``names[i]`` is the canonical lower-case name of header line ``lines[i]``; ``lines[i]`` is
    the raw header line (folded continuation lines included, CRLF between them, no trailing
    CRLF). Typed accessors parse on first use and cache the result.
    """

    __slots__ = (
        "start_line",
        "names",
        "lines",
        "body",
        "method",
        "uri_text",
        "status",
        "reason",
        "_index",
        "_cache",
    )

    def __init__(
        self,
        start_line: bytes,
        names: list[str],
        lines: list[bytes],
        body: bytes,
        method: str | None,
        uri_text: str | None,
        status: int,
        reason: str,
    ) -> None:
        self.start_line = start_line
        self.names = names
        self.lines = lines
        self.body = body
        self.method = method  # request method (case-sensitive, RFC 3261 §7.1); None on responses
        self.uri_text = uri_text
        self.status = status  # 0 for requests
        self.reason = reason
        index: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            slot = index.get(name)
            if slot is None:
                index[name] = [i]
            else:
                slot.append(i)
        self._index = index
        self._cache: dict[str, Any] = {}

    # ----------------------------------------------------------------- raw header access
    @property
    def is_request(self) -> bool:
        return self.method is not None

    def has(self, name: str) -> bool:
        return name in self._index

    def count(self, name: str) -> int:
        return len(self._index.get(name, ()))

    def value_at(self, i: int) -> str:
        """The value of header line ``i``: after the colon, unfolded, stripped."""
        line = self.lines[i]
        value = line[line.index(b":") + 1 :]
        if b"\r\n" in value:
            value = b" ".join(part.strip(_WS) for part in value.split(CRLF))
        return _decode(value.strip(b" \t"))

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (canonical lower-case), one per header line."""
        return [self.value_at(i) for i in self._index.get(name, ())]

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` or None."""
        idx = self._index.get(name)
        return self.value_at(idx[0]) if idx else None

    def indexes(self, name: str) -> list[int]:
        return self._index.get(name, [])

    # ----------------------------------------------------------------- typed accessors
    def _cached(self, key: str) -> Any:
        return self._cache.get(key, _MISSING)

    @property
    def call_id(self) -> str:
        v = self._cache.get("call-id")
        if v is None:
            v = self.get("call-id") or ""
            self._cache["call-id"] = v
        return v

    @property
    def cseq(self) -> tuple[int, str]:
        """(sequence number, method) — validated at parse time."""
        return self._cache["cseq"]  # type: ignore[no-any-return]

    @property
    def max_forwards(self) -> int | None:
        return self._cache.get("max-forwards")

    @property
    def content_length(self) -> int | None:
        return self._cache.get("content-length")

    @property
    def vias(self) -> list[Via]:
        """Every Via value, top first, across all Via header lines."""
        v = self._cached("via")
        if v is _MISSING:
            v = [via for text in self.values("via") for via in parse_via_list(text)]
            self._cache["via"] = v
        return v  # type: ignore[no-any-return]

    @property
    def top_via(self) -> Via:
        v = self._cached("top-via")
        if v is _MISSING:
            idx = self._index.get("via")
            if not idx:
                raise SipParseError(400, "missing Via")
            v = parse_via_list(self.value_at(idx[0]))[0]
            self._cache["top-via"] = v
        return v  # type: ignore[no-any-return]

    def _name_addr(self, name: str) -> NameAddr:
        v = self._cached(name)
        if v is _MISSING:
            text = self.get(name)
            if text is None:
                raise SipParseError(400, f"missing {name}")
            v = parse_name_addr(text)
            self._cache[name] = v
        return v  # type: ignore[no-any-return]

    def _name_addr_list(self, name: str) -> list[NameAddr]:
        v = self._cached(name)
        if v is _MISSING:
            v = [na for text in self.values(name) for na in parse_name_addr_list(text)]
            self._cache[name] = v
        return v  # type: ignore[no-any-return]

    @property
    def from_(self) -> NameAddr:
        return self._name_addr("from")

    @property
    def to(self) -> NameAddr:
        return self._name_addr("to")

    @property
    def from_tag(self) -> str | None:
        return self.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.to.tag

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values (an empty list for ``Contact: *``)."""
        if self.get("contact") == "*":
            return []
        return self._name_addr_list("contact")

    @property
    def routes(self) -> list[NameAddr]:
        return self._name_addr_list("route")

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._name_addr_list("record-route")

    @property
    def p_asserted_identities(self) -> list[NameAddr]:
        return self._name_addr_list("p-asserted-identity")

    @property
    def diversions(self) -> list[NameAddr]:
        return self._name_addr_list("diversion")

    @property
    def history_info(self) -> list[HistoryInfoEntry]:
        v = self._cached("history-info")
        if v is _MISSING:
            v = [e for text in self.values("history-info") for e in parse_history_info(text)]
            self._cache["history-info"] = v
        return v  # type: ignore[no-any-return]

    @property
    def identities(self) -> list[Identity]:
        v = self._cached("identity")
        if v is _MISSING:
            v = [parse_identity(text) for text in self.values("identity")]
            self._cache["identity"] = v
        return v  # type: ignore[no-any-return]

    @property
    def request_uri(self) -> Uri:
        v = self._cached("ruri")
        if v is _MISSING:
            if self.uri_text is None:
                raise SipParseError(400, "responses have no Request-URI")
            v = parse_uri(self.uri_text)
            self._cache["ruri"] = v
        return v  # type: ignore[no-any-return]

    def option_tags(self, name: str) -> list[str]:
        """Option tags of Require / Proxy-Require / Supported / Unsupported (comma lists)."""
        return [t.strip() for text in self.values(name) for t in text.split(",") if t.strip()]

    # ----------------------------------------------------------------- serialization
    def serialize(
        self,
        *,
        prepend: Iterable[bytes] = (),
        replace: dict[int, bytes | None] | None = None,
        append: Iterable[bytes] = (),
        start_line: bytes | None = None,
        body: bytes | None = None,
    ) -> bytes:
        """Rebuild the message from its raw lines with edits spliced in.

        ``prepend`` lines go before the first header (a new Via or Record-Route goes on top),
        ``replace`` maps a header line index to its new raw line (None removes the line),
        ``append`` lines go after the last header. Untouched lines are copied byte for byte.
        """
        out = [start_line if start_line is not None else self.start_line]
        out.extend(prepend)
        if replace:
            for i, line in enumerate(self.lines):
                if i in replace:
                    new = replace[i]
                    if new is not None:
                        out.append(new)
                else:
                    out.append(line)
        else:
            out.extend(self.lines)
        out.extend(append)
        out.append(b"")
        out.append(self.body if body is None else body)
        return CRLF.join(out)

    def __bytes__(self) -> bytes:
        return self.serialize()

    def __repr__(self) -> str:
        return f"<Message {self.start_line[:80]!r}>"


_MISSING = object()


def _parse_start_line(line: bytes) -> tuple[str | None, str | None, int, str]:
    """Parse the start line: (method, uri, 0, "") for requests, (None, None, code, reason)."""
    # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF
    if line[:4].upper() == b"SIP/":
        version, sp, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not sp:
            raise SipParseError(400, "malformed status line")
        if version.upper() != b"SIP/2.0":
            raise SipParseError(505, "unsupported SIP version in response")
        if len(code) != 3 or not all(c in _DIGITS for c in code) or code[0] not in b"123456":
            raise SipParseError(400, "malformed status code")
        return None, None, int(code), _decode(reason)
    # Request-Line = Method SP Request-URI SP SIP-Version CRLF
    parts = line.split(b" ")
    if len(parts) != 3:
        raise SipParseError(400, "malformed request line")
    method, uri, version = parts
    if not is_token(method):
        raise SipParseError(400, "malformed method")
    if not uri or b"\t" in uri:
        raise SipParseError(400, "malformed Request-URI")
    if version.upper() != b"SIP/2.0":
        if version[:4].upper() == b"SIP/":
            raise SipParseError(505, "unsupported SIP version")
        raise SipParseError(400, "malformed SIP version")
    return _decode(method), _decode(uri), 0, ""


def _digits(value: str, what: str, limit: int) -> int:
    if not value or not value.isdigit() or not value.isascii():
        raise SipParseError(400, f"malformed {what}")
    if len(value) > 10 or int(value) > limit:
        raise SipParseError(400, f"{what} out of range")
    return int(value)


def parse_message(data: bytes, *, max_size: int = 65535, datagram: bool = True) -> Message:
    """Parse one SIP message from ``data``.

    Over UDP (``datagram=True``) the body is what follows the header block, cut to
    Content-Length (RFC 3261 §18.3: extra bytes are discarded, missing bytes are an error).
    Over a stream the framer has already cut exactly one message, and Content-Length is required.
    """
    if len(data) > max_size:
        raise SipParseError(513, f"message of {len(data)} bytes exceeds {max_size}")
    # RFC 3261 §7.5: implementations SHOULD ignore CRLFs preceding the start line.
    start = 0
    while data.startswith(CRLF, start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise SipParseError(400, "no empty line after the headers")
    head = data[start:end].split(CRLF)
    start_line = head[0]
    method, uri_text, status, reason = _parse_start_line(start_line)

    names: list[str] = []
    lines: list[bytes] = []
    cache = _NAME_CACHE
    for line in head[1:]:
        colon = line.find(b":")
        if colon > 0 and line[0] not in (32, 9):
            key = line[:colon]
            name = cache.get(key)
            if name is None:
                name = _canonical_name(key)
            names.append(name)
            lines.append(line)
        elif not line:
            continue
        elif line[0] in (32, 9):
            if not lines:
                raise SipParseError(400, "continuation line before the first header")
            lines[-1] = lines[-1] + CRLF + line
        else:
            raise SipParseError(400, f"header line without a name: {line[:40]!r}")
    body = data[end + 4 :]
    msg = Message(start_line, names, lines, body, method, uri_text, status, reason)
    try:
        _validate(msg, datagram)
    except SipParseError as err:
        err.partial = msg  # type: ignore[attr-defined]
        raise
    return msg


def _validate(msg: Message, datagram: bool) -> None:
    """The checks every message passes before the proxy looks at it."""
    index = msg._index
    for name in REQUIRED_ONCE:
        n = len(index.get(name, ()))
        if n != 1:
            raise SipParseError(400, f"{'missing' if n == 0 else 'repeated'} {name}")
    if "via" not in index:
        raise SipParseError(400, "missing Via")
    for name in AT_MOST_ONCE:
        if len(index.get(name, ())) > 1:
            raise SipParseError(400, f"repeated {name}")
    cache = msg._cache
    # CSeq = "CSeq" HCOLON 1*DIGIT LWS Method
    num, _, cmethod = msg.value_at(index["cseq"][0]).partition(" ")
    cmethod = cmethod.strip()
    seq = _digits(num, "CSeq", MAX_CSEQ)
    if not cmethod or not is_token(cmethod.encode("utf-8", "surrogateescape")):
        raise SipParseError(400, "malformed CSeq method")
    if msg.method is not None and cmethod != msg.method:
        raise SipParseError(400, "CSeq method does not match the request method")
    cache["cseq"] = (seq, cmethod)
    if msg.method is not None and "max-forwards" in index:
        cache["max-forwards"] = _digits(
            msg.value_at(index["max-forwards"][0]), "Max-Forwards", 255
        )
    if "content-length" in index:
        length = _digits(msg.value_at(index["content-length"][0]), "Content-Length", 2**31)
        cache["content-length"] = length
        if len(msg.body) < length:
            raise SipParseError(400, "body shorter than Content-Length")
        if len(msg.body) > length:
            msg.body = msg.body[:length]  # RFC 3261 §18.3: discard the excess (UDP)
    elif not datagram:
        raise SipParseError(400, "missing Content-Length on a stream transport")
    if not msg.call_id:
        raise SipParseError(400, "empty Call-ID")


def header_line(name: str, value: str) -> bytes:
    """One raw header line ``Name: value``."""
    return f"{name}: {value}".encode("utf-8", "surrogateescape")
