"""The History-Info header (RFC 7044) and the retargeting cause of its entries (RFC 4458).

Grammar (RFC 7044)::

    History-Info = "History-Info" HCOLON hi-entry *(COMMA hi-entry)
    hi-entry = hi-targeted-to-uri *(SEMI hi-param)
    hi-targeted-to-uri = name-addr
    hi-param = hi-index / hi-target-param / hi-extension
    hi-index = "index" EQUAL index-val
    index-val = number *("." number)
    number = [ %x31-39 *DIGIT ] DIGIT
    hi-target-param = rc-param / mp-param / np-param
    rc-param = "rc" EQUAL index-val
    mp-param = "mp" EQUAL index-val
    np-param = "np" EQUAL index-val
    hi-extension = generic-param

``index`` is mandatory (400 when missing); index values are checked as ``1*DIGIT *("."
1*DIGIT)``, which also admits the leading zeros RFC 4244 allowed. The URI must be in ``< >``.

The ``cause`` of an entry is the RFC 4458 ``cause`` URI parameter of its hi-targeted-to-uri
(``<sip:vm@example.com;cause=486>``), or failing that the SIP cause of a Reason header escaped
into that URI (RFC 7044: ``<sip:bob@example.com?Reason=SIP%3Bcause%3D486>``). A cause
that is not three digits is ignored (None), not an error: it is informational.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote as _pct_unquote

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.nameaddr import NameAddr, parse_name_addr_list, parts
from sipguard.sip.params import (
    CACHE_PARTS_MAX,
    CACHE_TEXT_MAX,
    TOKEN_CHARS,
    get_param,
    remember,
    scan_params,
)
from sipguard.sip.uri import Uri

# index-val = number *("." number)   (leading zeros tolerated, RFC 4244)
_INDEX_VAL = regex.compile(r"[0-9]++(?:\.[0-9]++)*+")
# reason-value = protocol *(SEMI reason-params)       (RFC 3326)
# protocol     = "SIP" / "Q.850" / token
_PROTOCOL = regex.compile(rf"[ \t]*+([{TOKEN_CHARS}]++)")

# RFC 4458 cause values for call forwarding: 404 unknown / not available, 486 user busy,
# 408 no reply, 302 unconditional, 487 deflection during alerting, 480 deflection immediate
# response, 503 mobile subscriber not reachable.
FORWARDING_CAUSES = frozenset({302, 404, 408, 480, 486, 487, 503})


@dataclass(frozen=True, slots=True)
class HistoryInfoEntry:
    """One hi-entry; ``str()`` gives back the original text."""

    name_addr: NameAddr
    index: str
    rc: str | None
    mp: str | None
    np: str | None
    cause: int | None

    @property
    def raw(self) -> str:
        return self.name_addr.raw

    def __str__(self) -> str:
        return self.name_addr.raw


# Memo cache, bounded in size and count (sipguard.sip.params, "Memo caches").
_ENTRIES: dict[str, tuple[HistoryInfoEntry, ...]] = {}
ENTRIES_MAX = 256


def parse_history_info(text: str, stop: int = 0) -> list[HistoryInfoEntry]:
    """Parse one History-Info header value (comma-separated hi-entries).

    ``stop`` > 0 may end the scan once that many entries are parsed, the rest unread: for a
    caller that rejects a list that long (``max_list_entries``). Short results are memoised by
    text; each call returns a new list.
    """
    if len(text) > CACHE_TEXT_MAX:
        return list(_parse_entries(text, stop))
    entries = _ENTRIES.get(text)
    if entries is None:
        entries = _parse_entries(text, 0)
        if sum([parts(e.name_addr) for e in entries]) <= CACHE_PARTS_MAX:
            remember(_ENTRIES, text, entries, ENTRIES_MAX)
    return list(entries)


def _parse_entries(text: str, stop: int) -> tuple[HistoryInfoEntry, ...]:
    out: list[HistoryInfoEntry] = []
    for na in parse_name_addr_list(text, name_addr_only=True, stop=stop):
        index = get_param(na.params, "index")
        if index is None:
            raise SipParseError(400, "History-Info entry without index")
        rc = get_param(na.params, "rc")
        mp = get_param(na.params, "mp")
        np = get_param(na.params, "np")
        for value in (index, rc, mp, np):
            if value is not None and _INDEX_VAL.fullmatch(value) is None:
                raise SipParseError(400, f"malformed History-Info index {value[:20]!r}")
        for key in ("rc", "mp", "np"):
            if na.has_param(key) and get_param(na.params, key) is None:
                raise SipParseError(400, f"History-Info {key} without a value")
        out.append(HistoryInfoEntry(na, index, rc, mp, np, _cause(na.uri)))
    return tuple(out)


def _status(value: str | None) -> int | None:
    if value is None or len(value) != 3 or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def _cause(uri: Uri) -> int | None:
    cause = _status(uri.param("cause"))
    if cause is not None or not uri.headers:
        return cause
    for header in uri.headers.split("&"):
        name, _, value = header.partition("=")
        if _pct_unquote(name, encoding="latin-1").lower() == "reason":
            cause = _reason_cause(_pct_unquote(value, encoding="latin-1"))
            if cause is not None:
                return cause
    return None


# Reason = "Reason" HCOLON reason-value *(COMMA reason-value)
# reason-params = protocol-cause / reason-text / reason-extension
# protocol-cause = "cause" EQUAL cause ; cause = 1*DIGIT
def _reason_cause(text: str) -> int | None:
    """The cause of the first ``SIP`` reason-value of a Reason header value, or None."""
    pos = 0
    n = len(text)
    while pos < n:
        m = _PROTOCOL.match(text, pos)
        if m is None:
            return None
        params, pos = scan_params(text, m.end())
        if m.group(1).upper() == "SIP":
            return _status(get_param(params, "cause"))
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] != ",":
            return None
        pos += 1
    return None


def diverting_entries(entries: Iterable[HistoryInfoEntry]) -> list[HistoryInfoEntry]:
    """The entries whose target forwarded the call: the diverting parties, in header order.

    An entry E marks a retargeting by forwarding when it carries ``mp`` (RFC 7044: retargeted
    from the entry ``mp`` names) or an RFC 4458 ``cause`` URI parameter among
    :data:`FORWARDING_CAUSES`. The diverting entry is then the one ``mp`` names when present
    in the list, else the entry just before E. ``rc`` entries (retargeting to a registered
    contact of the same user) are not diversions; a Reason-derived cause on its own is not
    either, since RFC 7044 puts it on the target that answered, not on the new target.

    Linear in the number of entries: whether an entry is listed already is a set lookup, not
    a search of the entries listed so far.
    """
    listed = list(entries)
    by_index: dict[str, HistoryInfoEntry] = {}
    for entry in listed:
        by_index.setdefault(entry.index, entry)
    out: list[HistoryInfoEntry] = []
    taken: set[int] = set()  # id() of the entries in ``out`` (all alive in ``listed``)
    for i, entry in enumerate(listed):
        if entry.mp is None and (
            _status(entry.name_addr.uri.param("cause")) not in FORWARDING_CAUSES
        ):
            continue
        source = by_index.get(entry.mp) if entry.mp is not None else None
        if source is None and i > 0:
            source = listed[i - 1]
        if source is not None and source is not entry and id(source) not in taken:
            taken.add(id(source))
            out.append(source)
    return out
