"""SIP message model: a parsed message as a frozen view over its original bytes.

Theory of operation
-------------------
A :class:`Message` keeps the start line and the header lines exactly as they arrived:
``lines[i]`` is a raw header line (byte for byte; a folded one unfolded, each fold one space) and
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

Input is hostile, so what one message may hold is bounded (:class:`ParseLimits`): the parser
checks the number of headers and the length and folding of each line while it splits them, and
the accessors here the number of entries of a list header and the parameters of a header when
they first parse it.
:meth:`Message.check_request` parses the Request-URI, From and To at once, for the proxy to call
before it creates any state.

The raw-value, text and CSeq helpers at the end belong to the model (its accessors use them);
the parser shares them rather than keeping copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.history_info import HistoryInfoEntry, parse_history_info
from sipguard.sip.identity import Identity, parse_identity
from sipguard.sip.nameaddr import NameAddr, parse_name_addr, parse_name_addr_list, parts
from sipguard.sip.uri import Uri, parse_uri
from sipguard.sip.via import Via, parse_via_list

WS: Final = b" \t"
CRLF: Final = b"\r\n"
MAX_CSEQ: Final = 2**31 - 1  # RFC 3261 §8.1.1.5: the sequence number MUST be less than 2**31


def decode(raw: bytes) -> str:
    """Bytes from the wire as text: UTF-8, with undecodable bytes kept as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def _load_value_text() -> Callable[[bytes], str] | None:
    """``decode(raw_value(line))`` in C (sipguard/sip/_scan.c), where it is built; the tests
    check both agree."""
    try:
        from sipguard.sip._scan import value_text
    except ImportError:
        return None
    return value_text


VALUE_TEXT = _load_value_text()


class ParseLimits:
    """How much one message may hold before sipguard refuses it; frozen.

    Every default is far above what a real carrier or PBX sends, and every check is a
    ``len()`` where the parser already is (config keys of the same names under ``sip:``):

    ``max_headers`` (256)
        Header lines in one message, a folded header counted once; checked while the header
        block is split, which stops there. A large INVITE has 30 to 40.
    ``max_header_line`` (16384 bytes)
        One header line with its continuation lines (CRLFs included), and the start line;
        checked while the header block is split. The longest real ones are an Identity
        (about 900 bytes) or a long Contact with feature tags (a few hundred).
    ``max_continuation_lines`` (64)
        Continuation lines of one folded header (RFC 3261 §7.3.1 folding is rare and was
        deprecated by RFC 7230 for HTTP; a folded header has one or two); checked while
        splitting.
    ``max_list_entries`` (100)
        Entries of one list header over all its lines: Via, Route, Record-Route, Contact,
        P-Asserted-Identity, Diversion, History-Info; checked by the message's accessor
        when it first parses the header, whose grammar stops scanning one entry past the
        limit. 100, not 64: a request gains one Via per hop and Max-Forwards starts at 70
        (RFC 3261 §8.1.1.6), so a request that obeys it may carry 71 Vias (and its response
        as many), and a Record-Route has at most one entry per proxy on that path; real
        paths have fewer than 15 hops and a call is forwarded a handful of times.
    ``max_header_params`` (512)
        Parameters of one header over all its entries, their URIs' included (``;lr``,
        ``;tag=``, ``;branch=``...), and of the Request-URI; checked by the accessors when
        they first parse it. A parsed parameter costs some 130 bytes where ``;ab`` takes 3,
        and the parse of a Via or From lives as long as its transaction: without this, a
        60 KB Via of ``;p1;p2...`` kept 1.4 MB for each INVITE. 512: 100 Vias of 5
        parameters fit; real headers have 1 to 20.

    What a message over a limit is answered (requests; responses are dropped), always with
    a detail that names the limit, as in ``too many headers (max_headers 256)``, which the
    ``parse_error`` log line carries:

    * counts (headers, continuation lines, list entries, parameters): ``400 Bad Request``.
      RFC 3261 has no status for "too many"; ``513 Message Too Large`` is about length
      (§21.5.14) and would tell the sender that fewer bytes would do, when it is the count
      that is wrong.
    * a header line too long: ``513 Message Too Large``: it is a length the server cannot
      process (§21.5.14), and the remedy, a shorter message, is the sender's.
    * a request line too long: ``414 Request-URI Too Long`` (§21.4.12): the Request-URI is
      the only part of it without a bound.

    A hand-written class with ``__slots__`` (mypyc compiles this module); assigning to an
    attribute raises ``AttributeError``.
    """

    __slots__ = ("max_headers", "max_header_line", "max_continuation_lines", "max_list_entries",
                 "max_header_params")

    max_headers: int
    max_header_line: int
    max_continuation_lines: int
    max_list_entries: int
    max_header_params: int

    def __init__(
        self,
        max_headers: int = 256,
        max_header_line: int = 16384,
        max_continuation_lines: int = 64,
        max_list_entries: int = 100,
        max_header_params: int = 512,
    ) -> None:
        if min(max_headers, max_header_line, max_continuation_lines, max_list_entries,
               max_header_params) < 1:
            raise ValueError("every parse limit must be at least 1")
        object.__setattr__(self, "max_headers", max_headers)
        object.__setattr__(self, "max_header_line", max_header_line)
        object.__setattr__(self, "max_continuation_lines", max_continuation_lines)
        object.__setattr__(self, "max_list_entries", max_list_entries)
        object.__setattr__(self, "max_header_params", max_header_params)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ParseLimits is frozen: cannot set {name}")

    def _key(self) -> tuple[int, int, int, int, int]:
        return (self.max_headers, self.max_header_line, self.max_continuation_lines,
                self.max_list_entries, self.max_header_params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParseLimits) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"ParseLimits(max_headers={self.max_headers}, "
            f"max_header_line={self.max_header_line}, "
            f"max_continuation_lines={self.max_continuation_lines}, "
            f"max_list_entries={self.max_list_entries}, "
            f"max_header_params={self.max_header_params})"
        )


DEFAULT_LIMITS: Final = ParseLimits()
# For re-parsing what sipguard itself built (a forwarded INVITE, to make its CANCEL or ACK):
# our own Via and Record-Route lines may take a message that was just within the limits past
# them.
UNLIMITED: Final = ParseLimits(1 << 30, 1 << 30, 1 << 30, 1 << 30, 1 << 30)

# Header names as written in details ("too many Via entries (max_list_entries 100)").
_TITLES: Final = {
    "via": "Via",
    "route": "Route",
    "record-route": "Record-Route",
    "contact": "Contact",
    "p-asserted-identity": "P-Asserted-Identity",
    "diversion": "Diversion",
    "history-info": "History-Info",
    "from": "From",
    "to": "To",
    "identity": "Identity",
    "ruri": "Request-URI",
}


_FORWARDED_LISTS: Final = ("via", "contact", "route", "record-route")


def _too_many(name: str, limit: int) -> SipParseError:
    return SipParseError(
        400, f"too many {_TITLES.get(name, name)} entries (max_list_entries {limit})"
    )


def _too_many_params(name: str, limit: int) -> SipParseError:
    return SipParseError(
        400, f"too many {_TITLES.get(name, name)} parameters (max_header_params {limit})"
    )


class Message:
    """A parsed SIP request or response over its original bytes.

    ``names[i]`` is the canonical lower-case name of header line ``lines[i]``; ``lines[i]`` is
    the raw header line (a folded one joined, one space for each fold; no trailing CRLF). Typed accessors parse on first use and cache the result; ``limits`` are those it
    was parsed under (the list accessors check ``max_list_entries``).
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
        "limits",
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
        limits: ParseLimits = DEFAULT_LIMITS,
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
        self.limits = limits

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
        text = VALUE_TEXT
        if text is not None:
            return text(self.lines[i])
        return decode(raw_value(self.lines[i]))

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (canonical lower-case), one per header line."""
        return [self.value_at(i) for i in self._index.get(name, ())]

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` or None."""
        idx = self._index.get(name)
        return self.value_at(idx[0]) if idx else None

    def indexes(self, name: str) -> list[int]:
        """The line numbers of header ``name``: the message's own list, never to be changed
        (as ``lines``, ``names`` and the index: the parser's C scan leaves them untracked by
        the cyclic collector, since they hold only numbers, bytes and text)."""
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
        """Every Via value, top first, across all Via header lines (at most
        ``limits.max_list_entries``, else SipParseError 400)."""
        v = self._cached("via")
        if v is _MISSING:
            limit = self.limits.max_list_entries
            budget = self.limits.max_header_params
            vias: list[Via] = []
            for i in self._index.get("via", ()):
                more = parse_via_list(self.value_at(i), limit + 1 - len(vias))
                vias.extend(more)
                if len(vias) > limit:
                    raise _too_many("via", limit)
                for via in more:
                    budget -= len(via.params)
                if budget < 0:
                    raise _too_many_params("via", self.limits.max_header_params)
            self._cache["via"] = v = vias
        return v  # type: ignore[no-any-return]

    @property
    def top_via(self) -> Via:
        """The first Via value; its header line is checked against
        ``limits.max_list_entries`` and ``max_header_params`` as well."""
        v = self._cached("top-via")
        if v is _MISSING:
            idx = self._index.get("via")
            if not idx:
                raise SipParseError(400, "missing Via")
            limit = self.limits.max_list_entries
            first = parse_via_list(self.value_at(idx[0]), limit + 1)
            if len(first) > limit:
                raise _too_many("via", limit)
            budget = self.limits.max_header_params
            for via in first:
                budget -= len(via.params)
            if budget < 0:
                raise _too_many_params("via", self.limits.max_header_params)
            v = first[0]
            self._cache["top-via"] = v
        return v  # type: ignore[no-any-return]

    def _name_addr(self, name: str) -> NameAddr:
        v = self._cached(name)
        if v is _MISSING:
            text = self.get(name)
            if text is None:
                raise SipParseError(400, f"missing {name}")
            v = parse_name_addr(text)
            if parts(v) - 1 > self.limits.max_header_params:
                raise _too_many_params(name, self.limits.max_header_params)
            self._cache[name] = v
        return v  # type: ignore[no-any-return]

    def _name_addr_list(self, name: str) -> list[NameAddr]:
        v = self._cached(name)
        if v is _MISSING:
            limit = self.limits.max_list_entries
            budget = self.limits.max_header_params
            items: list[NameAddr] = []
            for i in self._index.get(name, ()):
                more = parse_name_addr_list(self.value_at(i), stop=limit + 1 - len(items))
                items.extend(more)
                if len(items) > limit:
                    raise _too_many(name, limit)
                for na in more:
                    budget -= parts(na) - 1
                if budget < 0:
                    raise _too_many_params(name, self.limits.max_header_params)
            self._cache[name] = v = items
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
            limit = self.limits.max_list_entries
            budget = self.limits.max_header_params
            entries: list[HistoryInfoEntry] = []
            for i in self._index.get("history-info", ()):
                more = parse_history_info(self.value_at(i), limit + 1 - len(entries))
                entries.extend(more)
                if len(entries) > limit:
                    raise _too_many("history-info", limit)
                for entry in more:
                    budget -= parts(entry.name_addr) - 1
                if budget < 0:
                    raise _too_many_params("history-info", self.limits.max_header_params)
            self._cache["history-info"] = v = entries
        return v  # type: ignore[no-any-return]

    @property
    def identities(self) -> list[Identity]:
        v = self._cached("identity")
        if v is _MISSING:
            v = [parse_identity(text) for text in self.values("identity")]
            for identity in v:
                if len(identity.params) > self.limits.max_header_params:
                    raise _too_many_params("identity", self.limits.max_header_params)
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
            if len(v.params) > self.limits.max_header_params:
                raise _too_many_params("ruri", self.limits.max_header_params)
            if v.headers is not None and v.scheme in ("sip", "sips"):
                # RFC 3261 §19.1.1 (Table 1): headers are not allowed in a Request-URI; RFC 4475
                # §3.1.2.11: a proxy may reject it, and must never forward them.
                raise SipParseError(400, "Request-URI with headers")
            self._cache["ruri"] = v
        return v  # type: ignore[no-any-return]

    def check_request(self) -> None:
        """Parse the Request-URI, From and To now; raises :class:`SipParseError` if one is bad.

        The proxy calls this before it creates any state for a request, so a malformed request
        gets one error response and leaves nothing behind (RFC 4475 §3.1.2). Also the lists
        sipguard forwards without reading them all: more Via, Contact, Route or Record-Route
        lines than ``max_list_entries`` are refused here (entries within one line are counted
        when the list is read).
        """
        limit = self.limits.max_list_entries
        index = self._index
        for name in _FORWARDED_LISTS:
            at = index.get(name)
            if at is not None and len(at) > limit:
                raise _too_many(name, limit)
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
        return self.with_line(i, None)

    def with_line(self, i: int, new: bytes | None) -> bytes:
        """The message with header line ``i`` replaced by ``new`` (a whole raw line without
        its CRLF; None: removed), everything else byte for byte; spliced into the received
        bytes as :meth:`without_line` is."""
        frame = self._frame
        if frame is not None:
            data, start, pos, body_at = frame
            if len(data) - body_at == len(self.body):  # the body was not cut to Content-Length
                lines = self.lines
                for k in range(i):
                    pos += len(lines[k]) + 2
                after = data[pos + len(lines[i]) + 2 :]
                if new is None:
                    return data[start:pos] + after
                return b"".join((data[start:pos], new, b"\r\n", after))
        return self.serialize(replace={i: new})

    def __bytes__(self) -> bytes:
        return self.serialize()

    def __repr__(self) -> str:
        return f"<Message {self.start_line[:80]!r}>"


_MISSING: Final = object()


# The usual methods, raw -> text: one dict lookup instead of a decode (start line, CSeq).
METHODS: Final = {
    m.encode(): m
    for m in (
        "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
        "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
    )
}

# CSeq = "CSeq" HCOLON 1*DIGIT LWS Method (the value is unfolded and stripped first)
_CSEQ: Final = regex.compile(rb"([0-9]++)[ \t]++([A-Za-z0-9.!%*_+`'~\-]++)")


def raw_value(line: bytes) -> bytes:
    """The value of a raw header line: after the colon, unfolded, stripped."""
    colon = line.find(b":")
    value = line[colon + 1 :] if colon >= 0 else b""
    if value.find(b"\r\n") >= 0:  # (not ``in``: see the parser's docstring, "Speed")
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
