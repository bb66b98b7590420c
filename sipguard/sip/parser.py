"""SIP parser: bytes in, a :class:`~sipguard.sip.message.Message` out, or a SipParseError.

Theory of operation
-------------------
``parse_message(data)`` does the minimum every message needs and nothing more: it splits the
start line and the header block into raw lines (a folded header joined into one line, each
fold one space: RFC 3261 §7.3.1; every other line byte for byte), maps each header name to its canonical lower-case long form (compact
forms expanded), indexes them by name, checks the handful of things a proxy must check on every
message (start line, version, mandatory single-instance headers, Content-Length, CSeq) and
slices the body, cut to Content-Length over UDP. Everything else is left to the message's typed
accessors (:mod:`sipguard.sip.message`), which parse on first access.

Only :class:`~sipguard.sip.errors.SipParseError` ever escapes. When the error concerns a
request — even one whose start line is malformed (400, 505) or whose empty line is missing — the
header lines that could be split ride on the error as a partial message (``err.partial``), so
the proxy can still answer with the caller's Via, From, To, Call-ID and CSeq copied (RFC 4475
§3.1.2). Responses are never answered, so they carry no partial.

Stricter than the bare grammar in one place, about what a proxy may forward: a CR or LF in the
header part other than a CRLF line end is a 400 (a lenient next hop would see a header sipguard
did not).

Bounded and linear: ``limits`` (:class:`~sipguard.sip.message.ParseLimits`, see there for the
statuses) caps the number of headers, the length of a line with its folds, and the number of
continuation lines of a header, all checked while the lines are split; the splitter stops at the
first header over ``max_headers`` and drops a line over a limit from the partial message, so no
work or memory is spent on what will be refused. A folded header is joined once, whatever the
number of its continuation lines. A limit error is raised like any other, and no parse error
leaves a reference cycle behind (an exception held by a local of a frame in its own traceback):
the cyclic garbage collector's passes freeze what outlives them (``sipguard/ops/collector.py``),
and a cycle would keep the message's bytes until the next full pass, hours later.

Speed: ``parse_message`` is on the hot path. Header names are looked up in a bounded cache keyed
by the raw name (one dict lookup per line, seeded with the usual names; names up to 64 bytes);
a line the cache does not know — folding, a new name, junk — or a block that may break a limit
sends the whole block through the general splitter. The limits cost the fast path two ``len()``
comparisons. On bytes, ``x in data`` is avoided: CPython 3.11 first tries ``x`` as an integer
and raises and clears a formatted TypeError before it searches (~0.3 µs); ``find()`` does not.
Where it is built (``python -m sipguard.native``), the fast path runs in C
(``sipguard/sip/_scan.c``: one pass splits, checks for bare CR/LF, looks the names up and
indexes them, without a Python method call per line); a block it declines takes the Python
path below, which is the reference. The parser fills in the message's index and parsed-value
cache itself (``Message._index``, ``_cache``, ``_frame``) rather than going through accessors:
the two modules are one unit, split for reading, and compiled together
(``sipguard/native.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NoReturn

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import (
    CRLF,
    DEFAULT_LIMITS,
    MAX_CSEQ,
    METHODS,
    UNLIMITED,
    WS,
    Message,
    ParseLimits,
    decode,
    parse_cseq,
    raw_value,
)

__all__ = ["DEFAULT_LIMITS", "UNLIMITED", "ParseLimits", "SipParseError", "parse_message"]

# RFC 3261 §7.3.3 and the registry of compact forms (RFC 3262, 3515, 3840, 3841, 4028, 8224, ...)
COMPACT: Final[dict[str, str]] = {
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
REQUIRED_ONCE: Final = ("from", "to", "call-id", "cseq")
AT_MOST_ONCE: Final = ("max-forwards", "content-length")

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"

# Raw header name, everything before the colon (as it appeared, e.g. b"Via", b"v", b"CALL-ID "),
# -> canonical name. Names repeat across messages, so a bounded cache turns validation and
# lower-casing into one lookup. Only valid names are ever stored: a name that is not in the cache
# (a new name, a continuation line, junk) takes the slow path. Bounded in count and, since a
# token may be as long as the line, in size: a name longer than _NAME_KEY_MAX is never stored
# (the longest registered header name has 30 characters). At most 2048 * ~250 bytes. An entry
# is never changed or removed: the C scan keeps a memo of the entries it looked up (_scan.c).
_NAME_CACHE: Final[dict[bytes, str]] = {}
_NAME_CACHE_MAX: Final = 2048
_NAME_KEY_MAX: Final = 64
# Seeded with the usual spellings, so a flood of made-up names cannot keep them out.
_COMMON_NAMES = (
    "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Max-Forwards", "Content-Length",
    "Content-Type", "Route", "Record-Route", "Allow", "Supported", "Require", "Proxy-Require",
    "Unsupported", "User-Agent", "Server", "Expires", "Session-Expires", "Min-SE", "Accept",
    "Allow-Events", "Event", "Subscription-State", "Refer-To", "Referred-By", "Replaces",
    "P-Asserted-Identity", "P-Preferred-Identity", "Privacy", "Diversion", "History-Info",
    "Identity", "Reason", "RSeq", "RAck", "Date", "Timestamp", "Authorization",
    "Proxy-Authorization", "WWW-Authenticate", "Proxy-Authenticate", "Warning", "Organization",
    "Subject", "Content-Disposition", "Content-Encoding", "Retry-After", "Call-Id", "Cseq",
)


# The fast path's header scan in C (sipguard/sip/_scan.c, built with the compiled modules):
# scan(data, start, eol, end, _NAME_CACHE, max_headers, max_line) -> (lines, names, index),
# or None for the general path. Without it the same fast path runs in Python (parse_message);
# the tests check that both give the same messages and errors.
Scan = Callable[
    [bytes, int, int, int, dict[bytes, str], int, int],
    "tuple[list[bytes], list[str], dict[str, list[int]]] | None",
]


# check(lines, index, METHODS, is a request, datagram, len(body)) ->
# ((cseq number, method), max-forwards, content-length, call-id): _validate's checks for the
# usual message, in C, or None for _validate.
Check = Callable[
    [list[bytes], dict[str, list[int]], dict[bytes, str], bool, bool, int],
    "tuple[tuple[int, str], int | None, int | None, str] | None",
]


# start_line(line, METHODS) -> (method, uri, status, reason): _parse_start_line for the usual
# line, in C, or None for the Python code.
StartLine = Callable[[bytes, dict[bytes, str]], "tuple[str | None, str | None, int, str] | None"]


def _load_scan() -> tuple[Scan | None, Check | None, StartLine | None]:
    try:
        from sipguard.sip._scan import check, scan, start_line
    except ImportError:
        return None, None, None
    return scan, check, start_line


SCAN, CHECK, START_LINE = _load_scan()


def is_token(data: bytes) -> bool:
    """True when ``data`` is a non-empty RFC 3261 token."""
    return bool(data) and not data.translate(None, _TOKEN_BYTES)


def _canonical_name(key: bytes) -> str | None:
    """Canonical name for ``key`` (a raw header name: everything before the colon); None when
    it is no token."""
    name = key.rstrip(b" \t")
    if not is_token(name):
        return None
    text = name.decode("ascii").lower()
    text = COMPACT.get(text, text)
    if len(key) <= _NAME_KEY_MAX and len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[key] = text
    return text


for _name in (*_COMMON_NAMES, *(c.upper() for c in COMPACT), *COMPACT):
    _canonical_name(_name.encode())


def _parse_start_line(line: bytes) -> tuple[str | None, str | None, int, str]:
    """Parse the start line: (method, uri, 0, "") for requests, (None, None, code, reason)."""
    fast = START_LINE
    if fast is not None:
        found = fast(line, METHODS)
        if found is not None:
            return found
    parts = line.split(b" ", 2)
    first = parts[0]
    # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF  (a "/" never is in a method)
    if len(first) > 3 and first[3] == 47 and first[:3].upper() == b"SIP":
        if len(parts) < 2:
            raise SipParseError(400, "malformed status line")
        if first != b"SIP/2.0" and first.upper() != b"SIP/2.0":
            raise SipParseError(505, "unsupported SIP version in response")
        code = parts[1]
        if len(code) != 3 or not code.isdigit() or code[0] not in b"123456":
            raise SipParseError(400, "malformed status code")
        return None, None, int(code), decode(parts[2]) if len(parts) == 3 else ""
    # Request-Line = Method SP Request-URI SP SIP-Version CRLF  (single SP, RFC 3261 §7.1)
    if len(parts) != 3:
        raise SipParseError(400, "malformed request line")
    uri, version = parts[1], parts[2]
    if version != b"SIP/2.0":
        if version.find(b" ") >= 0:
            raise SipParseError(400, "malformed request line")
        if version.upper() != b"SIP/2.0":
            if version[:4].upper() == b"SIP/":
                raise SipParseError(505, "unsupported SIP version")
            raise SipParseError(400, "malformed SIP version")
    method = METHODS.get(first)
    if method is None:
        if not is_token(first):
            raise SipParseError(400, "malformed method")
        method = first.decode("ascii")
    if not uri or uri.find(b"\t") >= 0:
        raise SipParseError(400, "malformed Request-URI")
    return method, decode(uri), 0, ""


# The CSeq grammar over a whole unfolded header line, in one regex call (the usual case);
# sipguard.sip.message.parse_cseq is the general form.
_CSEQ_LINE: Final = regex.compile(rb"[^:]++:[ \t]*+([0-9]{1,10}+)[ \t]++([A-Za-z0-9.!%*_+`'~\-]++)[ \t]*+")


def _digits(value: bytes, what: str, limit: int) -> int:
    # bytes.isdigit() is ASCII-only and False for b"".
    if not value.isdigit():
        raise SipParseError(400, f"malformed {what}")
    value = value.lstrip(b"0") or b"0"  # 1*DIGIT: leading zeros are allowed ("0070" is 70)
    if len(value) > 10 or (n := int(value)) > limit:
        raise SipParseError(400, f"{what} out of range")
    return n


def _split_headers(
    raw_lines: list[bytes], limits: ParseLimits
) -> tuple[list[str], list[bytes], SipParseError | None]:
    """The general header splitter: folded lines, new names, malformed lines, limits.

    Returns (names, lines, first error). A malformed line, or one over a limit, is left out
    with its continuation lines and its error returned, so that the caller can still attach
    what it could split to the error; past ``max_headers`` headers it stops. A folded header
    is one join of its lines (linear, however many there are).
    """
    names: list[str] = []
    lines: list[bytes] = []
    error: SipParseError | None = None
    cache = _NAME_CACHE
    max_line = limits.max_header_line
    max_folds = limits.max_continuation_lines
    left = limits.max_headers
    n = len(raw_lines)
    i = 0
    while i < n:
        line = raw_lines[i]
        i += 1
        if not line:
            continue
        if line[0] == 32 or line[0] == 9:  # continuation line (LWS) with no header above it
            if error is None:
                error = SipParseError(400, "continuation line before the first header")
            continue
        start = i - 1
        while i < n and (nxt := raw_lines[i]) and (nxt[0] == 32 or nxt[0] == 9):
            i += 1  # continuation lines of this header
        if not left:
            if error is None:
                error = SipParseError(400, f"too many headers (max_headers {limits.max_headers})")
            break
        left -= 1
        colon = line.find(b":")
        if colon <= 0:
            if error is None:
                error = SipParseError(400, f"header line without a name: {line[:40]!r}")
            continue
        key = line[:colon]
        name = cache.get(key)
        if name is None:
            name = _canonical_name(key)
            if name is None:
                if error is None:
                    bad = key.rstrip(WS)[:40]
                    error = SipParseError(400, f"malformed header name {bad!r}")
                continue
        folds = i - start - 1
        size = len(line)
        if folds:
            if folds > max_folds:
                if error is None:
                    error = SipParseError(
                        400,
                        f"too many continuation lines in {name}: {folds} "
                        f"(max_continuation_lines {max_folds})",
                    )
                continue
            # unfolded: each CRLF and the whitespace around it one space (RFC 3261 §7.3.1).
            # Forwarded folded, a line is read by the next hop's own stream framer, which may
            # take " Content-Length: 0" under another header for the message's length and
            # the body for a second request nobody checked.
            parts = raw_lines[start:i]
            size = sum(map(len, parts)) + 2 * folds  # as received: CRLFs included
            line = b" ".join([parts[0].rstrip(WS), *(part.strip(WS) for part in parts[1:])])
        if size > max_line:
            if error is None:
                error = SipParseError(
                    513, f"{name} line of {size} bytes (max_header_line {max_line})"
                )
            continue
        names.append(name)
        lines.append(line)
    return names, lines, error


def _nuls_quoted(data: bytes, nul: int, end: int) -> bool:
    """Every NUL from ``nul`` up to ``end`` is the second byte of a quoted-pair inside a
    quoted string of its own line (read from the line's start: quotes and backslashes in
    order). Only called for a header part that holds a NUL at all."""
    while nul >= 0:
        line = data.rfind(b"\r\n", 0, nul) + 2
        quoted = escaped = False
        for i in range(line, nul):
            c = data[i]
            if escaped:
                escaped = False
            elif quoted and c == 0x5C:
                escaped = True
            elif c == 0x22:
                quoted = not quoted
        if not (quoted and escaped):
            return False
        nul = data.find(b"\x00", nul + 1, end)
    return True


def _fail(
    err: SipParseError, start_line: bytes, raw_lines: list[bytes], body: bytes,
    limits: ParseLimits,
) -> NoReturn:
    """Raise ``err`` with whatever could be split attached as ``err.partial``.

    The partial message lets the proxy answer a request it cannot accept (400, 505) with the
    caller's Via, From, To, Call-ID and CSeq copied. It is only built when the start line is
    not a status line (responses are never answered); its method is the first word as written.
    """
    if start_line[:4].upper() != b"SIP/":
        parts = start_line.split(b" ")
        if parts[0]:
            names, lines, _ = _split_headers(raw_lines, limits)
            uri = decode(parts[1]) if len(parts) > 1 and parts[1] else None
            _attach(err, Message(start_line, names, lines, body, decode(parts[0]), uri, 0, "",
                                 None, limits))
    # A frame whose local holds the exception it raises is in that exception's traceback: a
    # cycle, which only the cyclic collector's full pass (hours apart) would free, message
    # and all. So no local of this frame, nor of parse_message (which passes the error in, or
    # holds it only as an ``except ... as`` name, cleared on the way out), holds it once it is
    # raised.
    try:
        raise err
    finally:
        del err


def _attach(err: SipParseError, msg: Message) -> None:
    err.partial = msg


def _start_line_error(start_line: bytes, limit: int) -> SipParseError:
    """A start line over ``max_header_line``: 414 for a request (its Request-URI is the only
    part without a bound, RFC 3261 §21.4.12), 513 for a status line."""
    if start_line[:4].upper() == b"SIP/":
        return SipParseError(
            513, f"status line of {len(start_line)} bytes (max_header_line {limit})"
        )
    return SipParseError(414, f"request line of {len(start_line)} bytes (max_header_line {limit})")


def parse_message(
    data: bytes,
    *,
    max_size: int = 65535,
    datagram: bool = True,
    limits: ParseLimits = DEFAULT_LIMITS,
) -> Message:
    """Parse one SIP message from ``data``.

    Over UDP (``datagram=True``) the body is what follows the header block, cut to
    Content-Length (RFC 3261 §18.3: extra bytes are discarded, missing bytes are an error).
    Over a stream the framer has already cut exactly one message, and Content-Length is required.
    ``limits`` bound what one message may hold (:class:`~sipguard.sip.message.ParseLimits`);
    the message keeps them for its list accessors. ``UNLIMITED`` is for bytes sipguard built.
    """
    if len(data) > max_size:
        raise SipParseError(513, f"message of {len(data)} bytes exceeds {max_size}")
    # RFC 3261 §7.5: implementations SHOULD ignore CRLFs preceding the start line.
    start = 0
    while data.startswith(CRLF, start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        # RFC 3261 §7: the empty line MUST be present even without a body (RFC 4475 baddn).
        head = data[start:].split(CRLF)
        if len(head[0]) > limits.max_header_line:
            _fail(_start_line_error(head[0], limits.max_header_line), head[0], head[1:], b"",
                  limits)
        try:
            _parse_start_line(head[0])
        except SipParseError as err:
            _fail(err, head[0], head[1:], b"", limits)
        _fail(SipParseError(400, "no empty line after the headers"), head[0], head[1:], b"",
              limits)
    eol = data.find(CRLF, start)  # <= end: the empty line's CRLF at the latest
    start_line = data[start:eol]
    if len(start_line) > limits.max_header_line:
        _fail(_start_line_error(start_line, limits.max_header_line), start_line,
              data[eol + 2 : end].split(CRLF) if eol < end else [], data[end + 4 :], limits)
    try:
        method, uri_text, status, reason = _parse_start_line(start_line)
    except SipParseError as err:
        _fail(err, start_line, data[eol + 2 : end].split(CRLF) if eol < end else [],
              data[end + 4 :], limits)

    # Fast path: every line is "known-name: value" (one dict lookup per line; the name cache is
    # keyed by everything before the colon), and the block is within the limits (two len()
    # checks; a line can only be too long when the block is). Anything else — folding, a new
    # name, junk, a block that may break a limit — takes _split_headers.
    body = data[end + 4 :]
    nul = data.find(b"\x00", start, end)
    if nul >= 0 and not _nuls_quoted(data, nul, end):
        # RFC 3261 §25.1: a NUL in the header part only as a quoted-pair inside a quoted
        # string ("\" NUL, RFC 4475 intmeth); anywhere else a core written in C that stops at
        # it would read another message than the one sipguard checked.
        _fail(SipParseError(400, "NUL in the header part"), start_line,
              data[eol + 2 : end].split(CRLF) if eol < end else [], body, limits)
    scan = SCAN
    if scan is not None and eol < end:  # the same fast path in C, CR/LF check included
        scanned = scan(data, start, eol, end, _NAME_CACHE, limits.max_headers,
                       limits.max_header_line)
        if scanned is not None:
            return _indexed(data, start, eol, end, start_line, scanned[0], scanned[1],
                            scanned[2], body, method, uri_text, status, reason, limits, datagram)
    raw_lines = data[eol + 2 : end].split(CRLF) if eol < end else []
    crlfs = len(raw_lines) + 1 if eol < end else 1  # the line ends of data[start : end + 2]
    if data.count(b"\r", start, end + 2) != crlfs or data.count(b"\n", start, end + 2) != crlfs:
        # RFC 3261 §7, §25.1: CR and LF appear in the header part only as CRLF line ends (and in
        # LWS folding). A bare one would end a line for some parsers and not for others, so a
        # forwarded message could smuggle headers past sipguard; reject it. (As many CRs and as
        # many LFs as CRLFs: every CR and every LF is part of one.)
        _fail(SipParseError(400, "bare CR or LF in the header part"), start_line, raw_lines, body,
              limits)
    max_line = limits.max_header_line
    if len(raw_lines) <= limits.max_headers and (
        end - eol - 2 <= max_line or max(map(len, raw_lines)) <= max_line
    ):
        get = _NAME_CACHE.get
        names: list[str] = []
        index: dict[str, list[int]] = {}
        append = names.append
        for i, line in enumerate(raw_lines):
            colon = line.find(b":")
            if colon < 0:
                break
            name = get(line[:colon])
            if name is None:
                break
            append(name)
            slot = index.get(name)
            if slot is None:
                index[name] = [i]
            else:
                slot.append(i)
        else:
            return _indexed(data, start, eol, end, start_line, raw_lines, names, index, body,
                            method, uri_text, status, reason, limits, datagram)
    names, lines, error = _split_headers(raw_lines, limits)
    msg = Message(start_line, names, lines, body, method, uri_text, status, reason, None, limits)
    if error is None:
        return _validated(msg, datagram)
    _attach(error, msg)
    try:
        raise error
    finally:
        error = None  # no cycle (see _fail)


def _indexed(
    data: bytes, start: int, eol: int, end: int, start_line: bytes, raw_lines: list[bytes],
    names: list[str], index: dict[str, list[int]], body: bytes, method: str | None,
    uri_text: str | None, status: int, reason: str, limits: ParseLimits, datagram: bool,
) -> Message:
    """The fast path's message, validated."""
    msg = Message(start_line, names, raw_lines, body, method, uri_text, status, reason, index,
                  limits)
    if raw_lines and status:
        # Responses only: they pass through at once, where a request is kept by its
        # transaction (for 32 s), and keeping its whole datagram too would cost memory.
        msg._frame = (data, start, eol + 2, end + 4)
    check = CHECK
    if check is not None:
        checked = check(raw_lines, index, METHODS, method is not None, datagram, len(body))
        if checked is not None and (method is None or checked[0][1] == method):
            cache = msg._cache
            cache["cseq"] = checked[0]
            if checked[1] is not None:
                cache["max-forwards"] = checked[1]
            length = checked[2]
            if length is not None:
                cache["content-length"] = length
                if len(body) != length:
                    msg.body = body[:length]  # RFC 3261 §18.3: discard the excess (UDP)
            cache["call-id"] = checked[3]
            return msg
    return _validated(msg, datagram)


def _validated(msg: Message, datagram: bool) -> Message:
    """``msg`` once :func:`_validate` passed it; its error carries ``msg`` as the partial."""
    try:
        _validate(msg, datagram)
    except SipParseError as err:
        _attach(err, msg)
        raise
    return msg


def _validate(msg: Message, datagram: bool) -> None:
    """The checks every message passes before the proxy looks at it."""
    index = msg._index
    get = index.get
    for name in REQUIRED_ONCE:
        slot = get(name)
        if slot is None or len(slot) != 1:
            raise SipParseError(400, f"{'missing' if slot is None else 'repeated'} {name}")
    if "via" not in index:
        raise SipParseError(400, "missing Via")
    mf = get("max-forwards")
    cl = get("content-length")
    if mf is not None and len(mf) > 1:
        raise SipParseError(400, "repeated max-forwards")
    if cl is not None and len(cl) > 1:
        raise SipParseError(400, "repeated content-length")
    lines = msg.lines
    cache = msg._cache
    line = lines[index["cseq"][0]]
    m = _CSEQ_LINE.fullmatch(line)
    if m is not None and int(m[1]) <= MAX_CSEQ:
        cseq = (int(m[1]), METHODS.get(m[2]) or m[2].decode("ascii"))
    else:
        cseq = parse_cseq(line)  # folded, or an error to report
    if msg.method is not None and cseq[1] != msg.method:
        raise SipParseError(400, "CSeq method does not match the request method")
    cache["cseq"] = cseq
    if mf is not None and msg.method is not None:
        line = lines[mf[0]]
        value = line[line.find(b":") + 1 :].strip(WS)
        if not value.isdigit() or len(value) > 3 or (hops := int(value)) > 255:
            hops = _digits(raw_value(lines[mf[0]]), "Max-Forwards", 255)
        cache["max-forwards"] = hops
    if cl is not None:
        line = lines[cl[0]]
        value = line[line.find(b":") + 1 :].strip(WS)
        if not value.isdigit() or len(value) > 10 or (length := int(value)) > 2**31:
            length = _digits(raw_value(lines[cl[0]]), "Content-Length", 2**31)
        cache["content-length"] = length
        body = msg.body
        if len(body) != length:
            if len(body) < length:
                raise SipParseError(400, "body shorter than Content-Length")
            msg.body = body[:length]  # RFC 3261 §18.3: discard the excess (UDP)
    elif not datagram:
        raise SipParseError(400, "missing Content-Length on a stream transport")
    line = lines[index["call-id"][0]]
    call_id = line[line.find(b":") + 1 :].strip(WS)
    if call_id.find(b"\r") >= 0:
        call_id = raw_value(lines[index["call-id"][0]])
    if not call_id:
        raise SipParseError(400, "empty Call-ID")
    cache["call-id"] = decode(call_id)
