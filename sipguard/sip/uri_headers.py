"""Headers embedded in URIs (RFC 3261 §19.1.1): ``<sip:agent@example.com?Replaces=...>``.

A party that acts on such a URI — the target of a REFER's ``Refer-To`` (RFC 3515 §2.1), a
``3xx``'s ``Contact`` — may copy its headers into the request it then sends. From outside that is
a way to have the core place a call that says what only the policy may say: ``?P-Asserted-
Identity=<sip:+18005550100@...>``, ``?From=...``, sipguard's own verdict header, or a value whose
``%0D%0A`` becomes a header line of its own once decoded. RFC 3261 §19.1.5 says an implementation
SHOULD NOT honour From, Call-ID, CSeq, Via, Record-Route nor Route there, nor headers that
advertise a false location (Contact); a core is not always that careful, so sipguard takes them
out at the edge.

:func:`without_unsafe_headers` removes, from the URIs of one header line, each embedded header
that is one of :data:`UNSAFE` (also in compact form or percent-encoded), one of ``owned`` (the
headers only sipguard may put on a request: its verdict headers, ``sip.strip_headers``), or one
whose name is not a token or whose value holds a control character once decoded. Every other
embedded header (``Replaces``, ``Subject``, ``body`` ...) stays as it was sent, byte for byte.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_to_bytes

from sipguard.sip.parser import COMPACT

# RFC 3261 §19.1.5's "obviously dangerous" headers and Route, the dialog Contact, what frames or
# counts a message, and every header that asserts who calls, who was called, who diverted or
# referred the call, or whether the caller is shown (the referee takes Referred-By from the
# REFER itself, RFC 3892 §3: one from the party's URI would name whom it likes).
UNSAFE: Final = frozenset({
    "from", "call-id", "cseq", "via", "record-route", "route", "contact", "max-forwards",
    "content-length", "p-asserted-identity", "p-preferred-identity", "remote-party-id",
    "identity", "identity-info", "diversion", "history-info", "p-charge-info",
    "p-called-party-id", "privacy", "referred-by",
})

# Headers whose URIs sipguard reads for embedded headers, on every request and answer from
# outside: the URIs a receiver may turn into a request of its own (a REFER's target, a 3xx's
# Contacts, RFC 3261 §8.1.3.4), and those RFC 3261 §19.1.1 allows none in at all, which a core
# may still build a request from (a callback to From, a transfer's Referred-By, the remote
# target). Contact is left alone in a REGISTER only: the party may register what it likes for
# calls to itself (RFC 4475 §3.1.2.8 has one that must pass as it is).
CARRIERS: Final = ("refer-to", "referred-by", "reply-to", "from", "to", "p-asserted-identity",
                   "route")
WITH_CONTACT: Final = (*CARRIERS, "contact")

_TOKEN: Final = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")
_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")


def _unsafe(item: bytes, owned: frozenset[str]) -> bool:
    """Whether one embedded ``hname=hvalue`` is to be removed."""
    name, _, value = item.partition(b"=")
    if not _TOKEN.fullmatch(name):
        return bool(name or value)  # (an empty "&&" is left as it is)
    decoded = unquote_to_bytes(name)
    if not _TOKEN.fullmatch(decoded) or _CONTROL.search(unquote_to_bytes(value)):
        return True
    text = decoded.decode("ascii").lower()
    text = COMPACT.get(text, text)
    return text in UNSAFE or text in owned


def _section_end(line: bytes, start: int, in_angle: bool) -> int:
    """Where the headers part starting at ``start`` (after its ``?``) ends: at the ``>`` that
    closes the URI, or — a URI written without angle brackets — at the next ``;``, ``,`` or
    ``>``, or the line's end."""
    ends = (b">",) if in_angle else (b";", b",", b">")
    found = [i for i in (line.find(e, start) for e in ends) if i >= 0]
    return min(found) if found else len(line)


def without_unsafe_headers(line: bytes, owned: frozenset[str] = frozenset()) -> tuple[bytes, int]:
    """``line`` (a whole header line) with the unsafe headers embedded in its URIs removed,
    and how many were; quoted strings (display names, quoted parameters) are left alone."""
    if b"?" not in line:
        return line, 0
    out: list[bytes] = []
    at, i, n, removed = 0, line.find(b":") + 1, len(line), 0
    in_quote = in_angle = False
    uri_start = i  # where the URI being read starts (a '?' before its first '@' is userinfo)
    while i < n:
        c = line[i]
        if in_quote:
            if c == 0x5C:  # a backslash escapes the next byte
                i += 2
                continue
            in_quote = c != 0x22
        elif c == 0x22:  # '"'
            in_quote = True
        elif c == 0x3C:  # '<'
            in_angle, uri_start = True, i + 1
        elif c == 0x3E:  # '>'
            in_angle = False
        elif c == 0x2C and not in_angle:  # ',': the next entry of a list
            uri_start = i + 1
        elif c == 0x3F:  # '?'
            end = _section_end(line, i + 1, in_angle)
            first_at = line.find(b"@", uri_start, end)
            if first_at > i:  # (as sipguard's URI parser reads it: the first '@' ends the user)
                i += 1
                continue
            items = line[i + 1:end].split(b"&")
            kept = [item for item in items if not _unsafe(item, owned)]
            if len(kept) != len(items):
                removed += len(items) - len(kept)
                out.append(line[at:i])
                if kept:
                    out.append(b"?" + b"&".join(kept))
                at = end
            i = end
            continue
        i += 1
    if not removed:
        return line, 0
    out.append(line[at:])
    return b"".join(out), removed
