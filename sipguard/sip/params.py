"""Header parameters, ``*( SEMI generic-param )``, shared by every header grammar.

A parameter list is scanned from a position in the header value: one regex match finds the run
of well-formed ``; name[=value]`` parameters (quoted-strings included) and the scan stops where
no further parameter starts. The caller then decides what may follow (the end of the value, or
a comma before the next list element), so a comma or semicolon inside a quoted-string value
never splits anything. The run is then split with ``str.split`` when it holds no whitespace or
quotes (the common case), else by ``findall`` with the per-parameter regex.

Names are lower-cased (they are tokens, compared case-insensitively); values are kept exactly
as written, quoted-strings with their quotes (use :func:`unquote` to get the text inside).

Memo caches
-----------
The grammar modules memoise their parses by text: a response repeats the Via, From and To of
its request, and URIs and hosts repeat across calls. Input is hostile, so every such cache is
bounded twice, and checks both with a ``len()`` before it stores anything:

* by size: only a text of at most :data:`CACHE_TEXT_MAX` characters whose parse has at most
  :data:`CACHE_PARTS_MAX` parts (list elements plus parameters) is kept. A parse holds a few
  times its text as strings, plus some 130 bytes per part (a ``;ab`` costs a tuple and a
  string: 40 times its 3 characters), so the parts are capped as well as the characters.
  A larger value is parsed every time it comes, and freed with its message.
* by count: each cache holds at most its own number of entries (:func:`remember` drops the
  oldest first).

An entry therefore costs at most about 5 KiB, and all the SIP caches together (these and the
parser's header-name cache) about 19 MiB when every one is full of the costliest texts that
still qualify (measured with 2,048-entry Via and name-addr caches, smaller now; real entries
are a fifth of that). Before, the caches were bounded
by count only: 300 INVITEs with a 60 KB Via kept 300 MB.

Counts follow what repeats. Texts that repeat across calls (URIs, hosts, Route and
Record-Route lists) get large caches. Texts made for one transaction or one call (Via: its
branch; From and To: their tags) repeat within moments — a Via parsed again while its request is
forwarded, a To tag in the 180 and the 200 — so their caches are small (64 Vias, 256
name-addrs): an entry that is still held when the garbage collector's next young pass comes
(every 50 ms, ``sipguard/ops/collector.py``) is examined once, at about 0.75 µs per object under
load, more than parsing it again costs. With 2,048 entries each, about 40 % of the objects
those passes examined at 1,500 calls/s were these caches' (measured with a ``gc.callbacks``
probe: ~3,700 young objects per pass, ~2,300 with the small caches; the in-process benchmark,
garbage collector off, did not change).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeVar

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError

Params = tuple[tuple[str, str | None], ...]
V = TypeVar("V")

# Memo caches (see the module docstring): the longest text kept, the most parts its parse may
# have. Real values are far below: a Via is about 100 characters with 3 parameters, a From
# about 80 with 1, a Record-Route pair 120 with 4.
CACHE_TEXT_MAX: Final = 256
CACHE_PARTS_MAX: Final = 12


def _keep(obj: object) -> None:
    """Without the C extension: the object stays in the cyclic collector's view."""


def _load_untrack() -> Callable[[object], None]:
    """``untrack(obj)``: take an object that can be in no reference cycle — a parsed value, a
    tuple of such values, a record of numbers — out of the cyclic collector's view where it
    is made, so that no young pass examines it (~0.75 µs each under load; see
    ``sipguard/ops/collector.py``). Reference counting frees it as before. Never for an
    object that holds, or may later be given, a container that could reach back to it."""
    try:
        from sipguard.sip import _grammar
    except ImportError:
        return _keep
    return _grammar.untrack


untrack: Final = _load_untrack()


def remember(cache: dict[str, V], key: str, value: V, max_entries: int) -> None:
    """Store ``value`` under ``key`` in a memo cache of at most ``max_entries`` entries.

    A full cache is emptied and starts again: the values that matter (the core's and
    sipguard's own addresses, a busy peer's) are back after one miss each. Evicting the
    oldest entry instead (``del cache[next(iter(cache))]``) looks cheaper but is not: a dict
    keeps deleted slots at its front until it is resized, so finding the first live entry
    scans them — 1–8 µs per eviction at these sizes, on every message whose Via branch or
    tag is new (that is, nearly every one). The caller has checked the size caps
    (:data:`CACHE_TEXT_MAX`, :data:`CACHE_PARTS_MAX`).
    """
    if len(cache) >= max_entries:
        cache.clear()
    cache[key] = value


# token       =  1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" )
TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
# gen-value   =  token / host / quoted-string      (host adds "[" ":" "]" for IPv6 references;
#                                                    Via received= carries a bare IPv6address)
VALUE_CHARS = TOKEN_CHARS + r"\[\]:"
# quoted-string  =  SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# qdtext         =  LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
# quoted-pair    =  "\" (%x00-09 / %x0B-0C / %x0E-7F)
_QDTEXT = r"[^\"\\\x00-\x08\x0a-\x1f\x7f]"
QUOTED = rf'"{_QDTEXT}*+(?:\\[\x00-\x09\x0b\x0c\x0e-\x7f]{_QDTEXT}*+)*+"'
QUOTED_RE: Final = regex.compile(QUOTED)

# SEMI           =  SWS ";" SWS
# EQUAL          =  SWS "=" SWS
# generic-param  =  token [ EQUAL gen-value ]
_PARAM: Final = regex.compile(
    rf"[ \t]*+;[ \t]*+([{TOKEN_CHARS}]++)(?:[ \t]*+=[ \t]*+([{VALUE_CHARS}]++|{QUOTED}))?+"
)
# The same, where a value may also be an angle-bracketed URI (RFC 8224 ident-info-uri =
# LAQUOT absoluteURI RAQUOT).
_PARAM_ANGLE: Final = regex.compile(
    rf"[ \t]*+;[ \t]*+([{TOKEN_CHARS}]++)"
    rf"(?:[ \t]*+=[ \t]*+([{VALUE_CHARS}]++|{QUOTED}|<[^<>\"\x00-\x20\x7f]*+>))?+"
)
_RUN: Final = regex.compile(rf"(?:{_PARAM.pattern})*+")
_RUN_ANGLE: Final = regex.compile(rf"(?:{_PARAM_ANGLE.pattern})*+")
_QUOTED_PAIR: Final = regex.compile(r"\\(.)", re.DOTALL)


def scan_params(text: str, pos: int, *, angle: bool = False) -> tuple[Params, int]:
    """Scan ``*( SEMI generic-param )`` from ``pos``; return the params and the end position.

    The end position is just after the last parameter (trailing whitespace not consumed). An
    empty or malformed parameter stops the scan where it starts; the caller reports it.
    """
    if pos == len(text):
        return (), pos
    one, run = (_PARAM_ANGLE, _RUN_ANGLE) if angle else (_PARAM, _RUN)
    m = run.match(text, pos)
    end = m.end() if m is not None else pos
    if end == pos:
        return (), pos
    run_text = text[pos:end]
    if angle or '"' in run_text or " " in run_text or "\t" in run_text:
        # An empty group from findall is an absent value: a gen-value is never empty.
        found = one.findall(text, pos, end)
        return tuple([(name.lower(), value or None) for name, value in found]), end
    return split_plain(run_text), end


def split_plain(run: str) -> Params:
    """Split an already validated ``;a=b;c`` run that has no whitespace and no quoted-string."""
    out: list[tuple[str, str | None]] = []
    for item in run[1:].split(";"):
        name, eq, value = item.partition("=")
        out.append((name.lower(), value if eq else None))
    return tuple(out)


def expect_end(text: str, pos: int, what: str) -> None:
    """Raise 400 unless only whitespace remains after ``pos``."""
    if pos != len(text) and text[pos:].strip(" \t"):
        raise SipParseError(400, f"malformed {what} near {text[pos : pos + 20]!r}")


def parse_params(text: str) -> Params:
    """Parse a whole string of ``*( SEMI generic-param )`` (possibly empty)."""
    params, end = scan_params(text, 0)
    expect_end(text, end, "parameters")
    return params


def get_param(params: Params, name: str) -> str | None:
    """The value of the first parameter ``name`` (lower-case), None if absent or valueless."""
    for key, value in params:
        if key == name:
            return value
    return None


def has_param(params: Params, name: str) -> bool:
    """True when parameter ``name`` (lower-case) is present, with or without a value."""
    return any(key == name for key, _ in params)


def unquote(value: str) -> str:
    """The text of a quoted-string (quotes removed, quoted-pairs resolved); others as-is."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        body = value[1:-1]
        return _QUOTED_PAIR.sub(r"\1", body) if "\\" in body else body
    return value
