"""SIP message model: a parsed message as a frozen view over its original bytes.

Theory of operation
-------------------
A :class:`Message` keeps the start line and the header lines exactly as they arrived:
``lines[i]`` is a raw header line (folded continuation lines attached, byte for byte) and
``names[i]`` its canonical lower-case name, indexed by name; the body is kept as bytes.
:func:`sipguard.sip.parser.parse_message` builds it and checks only what every message needs;
everything else — Via, From, To, Route, Identity, History-Info and the rest — is parsed here on
first access by the grammar modules and cached on the message.

A forwarded message is rebuilt from the original raw lines with a few lines inserted, replaced
or removed (:meth:`Message.serialize`), so every header sipguard does not touch passes through
unchanged, in order.

The accessors raise nothing but :class:`~sipguard.sip.errors.SipParseError`. Stricter than the
bare grammar in one place, about what a proxy may forward: a sip/sips Request-URI with
``?headers`` is a 400 when it is read (RFC 3261 §19.1.1; RFC 4475 escruri).
:meth:`Message.check_request` parses the Request-URI, From and To at once, for the proxy to call
before it creates any state.

The raw-value, text and CSeq helpers at the end belong to the model (its accessors use them);
the parser shares them rather than keeping copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sipguard.sip.errors import SipParseError
from sipguard.sip.history_info import HistoryInfoEntry, parse_history_info
from sipguard.sip.identity import Identity, parse_identity
from sipguard.sip.nameaddr import NameAddr, parse_name_addr, parse_name_addr_list
from sipguard.sip.uri import Uri, parse_uri
from sipguard.sip.via import Via, parse_via_list

WS = b" \t"
CRLF = b"\r\n"
MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5: the sequence number MUST be less than 2**31


def decode(raw: bytes) -> str:
    """Bytes from the wire as text: UTF-8, with undecodable bytes kept as surrogates."""
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
        "_frame",
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
        index: dict[str, list[int]] | None = None,
    ) -> None:
        self.start_line = start_line
        self.names = names
        self.lines = lines
        self.body = body
        self.method = method  # request method (case-sensitive, RFC 3261 §7.1); None on responses
        self.uri_text = uri_text
        self.status = status  # 0 for requests
        self.reason = reason
        self._index = _build_index(names) if index is None else index
        self._cache: dict[str, Any] = {}
        # (received bytes, start line at, first header line at, body at) for a response whose
        # ``lines`` are exactly the received header lines: a line can be cut out of the bytes.
        self._frame: tuple[bytes, int, int, int] | None = None

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
        return decode(raw_value(self.lines[i]))

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
        """(sequence number, method) — validated at parse time (a partial message on a parse
        error may not have it: then SipParseError)."""
        v = self._cache.get("cseq")
        if v is None:
            idx = self._index.get("cseq")
            if not idx:
                raise SipParseError(400, "missing cseq")
            v = self._cache["cseq"] = parse_cseq(self.lines[idx[0]])
        return v

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
        return self._request_uri()

    def _request_uri(self) -> Uri:
        v = self._cached("ruri")
        if v is _MISSING:
            if self.uri_text is None:
                raise SipParseError(400, "responses have no Request-URI")
            v = parse_uri(self.uri_text)
            if v.headers is not None and v.scheme in ("sip", "sips"):
                # RFC 3261 §19.1.1 (Table 1): headers are not allowed in a Request-URI; RFC 4475
                # §3.1.2.11: a proxy may reject it, and must never forward them.
                raise SipParseError(400, "Request-URI with headers")
            self._cache["ruri"] = v
        return v  # type: ignore[no-any-return]

    def check_request(self) -> None:
        """Parse the Request-URI, From and To now; raises :class:`SipParseError` if one is bad.

        The proxy calls this before it creates any state for a request, so a malformed request
        gets one error response and leaves nothing behind (RFC 4475 §3.1.2).
        """
        self._request_uri()
        self._name_addr("from")
        self._name_addr("to")

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

    def without_line(self, i: int) -> bytes:
        """The message with header line ``i`` removed and everything else byte for byte.

        Cut straight out of the received bytes when they are intact (a response losing our
        Via, the case this is for); rebuilt with :meth:`serialize` otherwise (requests too).
        """
        frame = self._frame
        if frame is not None:
            data, start, pos, body_at = frame
            if len(data) - body_at == len(self.body):  # the body was not cut to Content-Length
                lines = self.lines
                for k in range(i):
                    pos += len(lines[k]) + 2
                return data[start:pos] + data[pos + len(lines[i]) + 2 :]
        return self.serialize(replace={i: None})

    def __bytes__(self) -> bytes:
        return self.serialize()

    def __repr__(self) -> str:
        return f"<Message {self.start_line[:80]!r}>"


_MISSING = object()


# The usual methods, raw -> text: one dict lookup instead of a decode (start line, CSeq).
METHODS = {
    m.encode(): m
    for m in (
        "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
        "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
    )
}

# CSeq = "CSeq" HCOLON 1*DIGIT LWS Method (the value is unfolded and stripped first)
_CSEQ = re.compile(rb"([0-9]++)[ \t]++([A-Za-z0-9.!%*_+`'~\-]++)")


def raw_value(line: bytes) -> bytes:
    """The value of a raw header line: after the colon, unfolded, stripped."""
    value = line.partition(b":")[2]
    if b"\r\n" in value:
        value = b" ".join(part.strip(WS) for part in value.split(CRLF))
    return value.strip(WS)


def parse_cseq(line: bytes) -> tuple[int, str]:
    """(sequence number, method) of a raw CSeq header line, folded or not."""
    m = _CSEQ.fullmatch(raw_value(line))
    if m is None:
        raise SipParseError(400, "malformed CSeq")
    num, method = m.groups()
    if len(num) > 10 or (seq := int(num)) > MAX_CSEQ:
        raise SipParseError(400, "CSeq out of range")
    return seq, METHODS.get(method) or method.decode("ascii")


def _build_index(names: list[str]) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        slot = index.get(name)
        if slot is None:
            index[name] = [i]
        else:
            slot.append(i)
    return index


def header_line(name: str, value: str) -> bytes:
    """One raw header line ``Name: value``."""
    return f"{name}: {value}".encode("utf-8", "surrogateescape")
