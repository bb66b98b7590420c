"""name-addr / addr-spec headers: From, To, Contact, Route, Record-Route, P-Asserted-Identity,
Diversion, History-Info entries (RFC 3261 §20, §25.1; RFC 3325; RFC 5806; RFC 7044).

Grammar (RFC 3261 §25.1)::

    ( name-addr / addr-spec ) *( SEMI generic-param )
    name-addr      =  [ display-name ] LAQUOT addr-spec RAQUOT
    addr-spec      =  SIP-URI / SIPS-URI / absoluteURI
    display-name   =  *(token LWS)/ quoted-string
    LAQUOT         =  SWS "<"
    RAQUOT         =  ">" SWS

RFC 3261 §20.10: without angle brackets, parameters after the URI belong to the header, not the
URI, and a URI containing a comma, question mark or semicolon MUST be enclosed in angle
brackets. So a bare addr-spec ends at the first ``;``, ``,`` or whitespace, and a ``?`` in it is
a 400. Whitespace inside ``< >`` is a 400 too (RFC 4475 badaspec allows rejecting it).

``str(na)`` gives back the element exactly as received (without surrounding whitespace or the
separating comma of a list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.params import (
    CACHE_PARTS_MAX,
    CACHE_TEXT_MAX,
    QUOTED_RE,
    TOKEN_CHARS,
    Params,
    expect_end,
    get_param,
    has_param,
    remember,
    scan_params,
    unquote,
    untrack,
)
from sipguard.sip.uri import Uri, parse_uri

# display-name  =  *(token LWS) / quoted-string ; LAQUOT = SWS "<"
# RFC 4475 lwsdisp: no whitespace is needed between the last token and "<".
_DISPLAY_TOKENS: Final = regex.compile(rf"([{TOKEN_CHARS}]++(?:[ \t]++[{TOKEN_CHARS}]++)*+)[ \t]*+<")
# A bare addr-spec runs to the first ";", "," or whitespace (RFC 3261 §20.10).
_BARE_URI: Final = regex.compile(r"[^;, \t]++")


@dataclass(slots=True, init=False, unsafe_hash=True)
class NameAddr:
    """One ``(name-addr / addr-spec) *(SEMI generic-param)`` value; ``str()`` is the original."""

    display: str | None
    uri: Uri
    params: Params
    raw: str

    # A hand-written __init__: mypyc compiles it, where a dataclass-made one runs as Python.
    def __init__(self, display: str | None, uri: Uri, params: Params, raw: str) -> None:
        self.display = display
        self.uri = uri
        self.params = params
        self.raw = raw

    @property
    def tag(self) -> str | None:
        """The ``tag`` header parameter (From / To)."""
        return get_param(self.params, "tag")

    def param(self, name: str) -> str | None:
        """The value of header parameter ``name``; None when absent or valueless."""
        return get_param(self.params, name.lower())

    def has_param(self, name: str) -> bool:
        """True when header parameter ``name`` is present, with or without a value."""
        return has_param(self.params, name.lower())

    def __str__(self) -> str:
        return self.raw


def scan_name_addr(text: str, pos: int) -> tuple[NameAddr, int, bool]:
    """Scan one value from ``pos``; return it, the end position and whether it had ``< >``."""
    fast = FAST_NAME_ADDR
    if fast is not None:
        found = fast(text, pos)
        if found is not None:
            return found
    n = len(text)
    while pos < n and text[pos] in " \t":
        pos += 1
    start = pos
    if pos >= n:
        raise SipParseError(400, "empty name-addr")
    first = text[pos]
    display: str | None = None
    if first == '"':
        m = QUOTED_RE.match(text, pos)
        if m is None:
            raise SipParseError(400, "unterminated or malformed quoted display name")
        display = unquote(m.group())
        pos = m.end()
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos >= n or text[pos] != "<":
            raise SipParseError(400, "quoted display name not followed by <URI>")
    elif first != "<":
        m = _DISPLAY_TOKENS.match(text, pos)
        if m is not None:
            display = m.group(1)
            pos = m.end() - 1
    bracketed = pos < n and text[pos] == "<"
    if bracketed:
        close = text.find(">", pos + 1)
        if close < 0:
            raise SipParseError(400, "unbalanced < in name-addr")
        uri = parse_uri(text[pos + 1 : close])
        pos = close + 1
    else:
        m = _BARE_URI.match(text, pos)
        if m is None:
            raise SipParseError(400, f"malformed name-addr near {text[pos : pos + 20]!r}")
        if "?" in m.group():
            raise SipParseError(400, "addr-spec with headers must be enclosed in <>")
        uri = parse_uri(m.group())
        pos = m.end()
    params, pos = scan_params(text, pos)
    raw = text[start:pos]
    return NameAddr(display, uri, params, raw), pos, bracketed


def _load_fast() -> Callable[[str, int], tuple[NameAddr, int, bool] | None] | None:
    """The usual name-addr scanned in C (sipguard/sip/_grammar.c), where it is built; None:
    the Python code alone (tests/unit/test_grammar_fast.py checks both agree)."""
    try:
        from sipguard.sip import _grammar
    except ImportError:
        return None
    _grammar.register("NameAddr", NameAddr)
    return _grammar.scan_name_addr


FAST_NAME_ADDR = _load_fast()


# Memo caches, bounded in size and count (sipguard.sip.params, "Memo caches").
# Their entries are (value(s), bracketed) tuples, held as objects: the tuple the cache holds
# is made once and taken out of the cyclic collector's view (params.untrack). (Typed as
# tuples, compiled code would keep them unboxed and make a new tuple for each store.)
_ONES: Final[dict[str, object]] = {}  # text -> tuple[NameAddr, bool]
ONES_MAX: Final = 256  # small on purpose: see sipguard.sip.params, "Memo caches"
_LISTS: Final[dict[str, object]] = {}  # text -> tuple[tuple[NameAddr, ...], bool]
LISTS_MAX: Final = 512


def parts(na: NameAddr) -> int:
    """How many parts a parsed value holds (itself and its header and URI parameters): what
    the memo caches count (sipguard.sip.params, "Memo caches")."""
    return 1 + len(na.params) + len(na.uri.params)


def parse_name_addr(text: str, *, name_addr_only: bool = False) -> NameAddr:
    """Parse exactly one value (From, To, P-Asserted-Identity element, ...).

    With ``name_addr_only`` a bare addr-spec is a 400 (Route, Record-Route, History-Info).
    Short results are memoised by text: the same From / To comes back in every message of a
    dialog.
    """
    if len(text) > CACHE_TEXT_MAX:
        one = _parse_one(text)
    else:
        cached = _ONES.get(text)
        if cached is None:
            one = _parse_one(text)
            if parts(one[0]) <= CACHE_PARTS_MAX:
                entry: object = one
                untrack(entry)  # a value and a bool
                remember(_ONES, text, entry, ONES_MAX)
        else:
            one = cast("tuple[NameAddr, bool]", cached)
    if name_addr_only and not one[1]:
        raise SipParseError(400, "URI must be enclosed in <>")
    return one[0]


def _parse_one(text: str) -> tuple[NameAddr, bool]:
    na, end, bracketed = scan_name_addr(text, 0)
    expect_end(text, end, "name-addr")
    return na, bracketed


def parse_name_addr_list(
    text: str, *, name_addr_only: bool = False, stop: int = 0
) -> list[NameAddr]:
    """Parse a comma-separated list (Contact, Route, Record-Route, PAI, Diversion, ...).

    Commas inside quoted display names, quoted parameter values and ``< >`` do not split.
    ``Contact: *`` is for the caller to recognise; here it is a 400 like any other non-URI.
    ``stop`` > 0 may end the scan once that many values are parsed, the rest unread: for a
    caller that rejects a list that long (``max_list_entries``). Short results are memoised
    by text; each call returns a new list.
    """
    if len(text) > CACHE_TEXT_MAX:
        items, all_bracketed = _parse_list(text, stop)
    else:
        cached = _LISTS.get(text)
        if cached is None:
            listed = _parse_list(text, 0)
            if sum([parts(na) for na in listed[0]]) <= CACHE_PARTS_MAX:
                untrack(listed[0])  # values
                entry: object = listed
                untrack(entry)  # values and a bool
                remember(_LISTS, text, entry, LISTS_MAX)
        else:
            listed = cast("tuple[tuple[NameAddr, ...], bool]", cached)
        items, all_bracketed = listed
    if name_addr_only and not all_bracketed:
        raise SipParseError(400, "URI must be enclosed in <>")
    return list(items)


def _parse_list(text: str, stop: int) -> tuple[tuple[NameAddr, ...], bool]:
    out: list[NameAddr] = []
    all_bracketed = True
    n = len(text)
    pos = 0
    while True:
        na, pos, bracketed = scan_name_addr(text, pos)
        all_bracketed = all_bracketed and bracketed
        out.append(na)
        while pos < n and text[pos] in " \t":
            pos += 1
        if len(out) == stop or pos >= n:
            return tuple(out), all_bracketed
        if text[pos] != ",":
            raise SipParseError(400, f"malformed name-addr list near {text[pos : pos + 20]!r}")
        pos += 1


# diversion-counter  = "counter" EQUAL 1*2DIGIT          (RFC 5806)
def diversion_counter(na: NameAddr) -> int:
    """The Diversion ``counter`` parameter: 1 when absent, 400 when not a number."""
    value = get_param(na.params, "counter")
    if value is None:
        if has_param(na.params, "counter"):
            raise SipParseError(400, "Diversion counter without a value")
        return 1
    if not 0 < len(value) <= 3 or not value.isascii() or not value.isdigit():
        raise SipParseError(400, f"malformed Diversion counter {value[:20]!r}")
    return int(value)
