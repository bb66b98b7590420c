"""Bytes the proxy writes itself: local responses, hop-by-hop ACK and CANCEL, Via edits, ids.

Everything here splices into the original raw header lines (see ``Message.serialize``), so
headers sipguard does not own pass through byte for byte.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

from sipguard.contract import Local
from sipguard.sip.errors import REASONS
from sipguard.sip.message import CRLF, Message, header_line
from sipguard.sip.via import Via

MAGIC: Final = "z9hG4bK"
OUR_PREFIX: Final = "z9hG4bKsg"  # every branch sipguard creates starts with this
OUR_PREFIX_BYTES: Final = OUR_PREFIX.encode()  # the same, as it appears in raw lines

PHRASES: Final[dict[int, str]] = {
    100: "Trying",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    428: "Use Identity Header",
    433: "Anonymity Disallowed",
    436: "Bad Identity Info",
    437: "Unsupported Credential",
    438: "Invalid Identity Header",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    500: "Server Internal Error",
    503: "Service Unavailable",
    505: "Version Not Supported",
    513: "Message Too Large",
    603: "Decline",
    608: "Rejected",
}
PHRASES.update({k: v for k, v in REASONS.items() if k not in PHRASES})

_RPORT_BARE: Final = re.compile(r";[ \t]*rport(?=[ \t]*(?:;|$))", re.IGNORECASE)
_RPORT_ANY: Final = re.compile(r";[ \t]*rport(?:[ \t]*=[ \t]*[^; \t]*)?[ \t]*(?=;|$)",
                               re.IGNORECASE)
_RECEIVED: Final = re.compile(r";[ \t]*received[ \t]*=[ \t]*[^; \t]*[ \t]*", re.IGNORECASE)


class Ids:
    """Keyed hashes for branches and tags: unique per transaction, reproducible per input."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        # Keyed once: a copy of the keyed state is half the cost of keying BLAKE2b anew (the
        # key is a whole compressed block), and every forwarded request takes one or two.
        self._keyed = hashlib.blake2b(digest_size=10, key=secret[:64])

    def digest(self, *parts: str) -> str:
        h = self._keyed.copy()
        h.update("\x00".join(parts).encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def branch(self, txn_key: str, loop: str) -> str:
        """RFC 3261 §16.6 step 8: magic cookie, a transaction part and a loop-detection part."""
        return f"{OUR_PREFIX}{self.digest('b', txn_key)}.{loop}"

    def to_tag(self, msg: Message) -> str:
        return "sg" + self.digest("t", msg.call_id, msg.from_tag or "", msg.top_via.branch or "")


def loop_hash(ids: Ids, msg: Message) -> str:
    """The loop-detection part of a branch (RFC 3261 §16.6 step 8, §16.3 step 4)."""
    return ids.digest(
        "l",
        msg.uri_text or "",
        msg.from_tag or "",
        msg.to_tag or "",
        msg.call_id,
        str(msg.cseq[0]),
        ",".join(msg.values("proxy-require")) if msg.has("proxy-require") else "",
        ",".join(msg.values("route")) if msg.has("route") else "",
    )[:8]


def txn_id(msg: Message) -> str:
    """Identity of the server transaction a request belongs to (RFC 3261 §17.2.3).

    A magic-cookie branch plus sent-by identifies it; older clients are matched on the RFC 2543
    fields. ACK and CANCEL map onto the INVITE they belong to by the method part of the key.
    """
    via = msg.top_via
    branch = via.branch
    if branch and branch.startswith(MAGIC) and len(branch) > len(MAGIC):
        return f"{branch}|{via.host}:{via.port or ''}"
    return "2543|" + "|".join(
        (
            msg.uri_text or "",
            msg.from_tag or "",
            msg.to_tag or "" if msg.method != "ACK" else "",
            msg.call_id,
            str(msg.cseq[0]),
            str(via),
        )
    )


def our_via(local: Local, transport: str, branch: str) -> bytes:
    """Our Via, with ``rport`` so the next hop answers to the port we sent from."""
    return f"Via: SIP/2.0/{transport.upper()} {local.hostport};branch={branch};rport".encode()


def record_route(local: Local, transport: str) -> bytes:
    """A Record-Route entry for one of our listeners (loose routing, RFC 3261 §16.6 step 4)."""
    tp = f";transport={transport}" if transport in ("tcp", "tls") else ""
    return f"Record-Route: <sip:{local.hostport}{tp};lr>".encode()


def stamped_via(via: Via, src: tuple[str, int]) -> str:
    """The top Via with RFC 3261 §18.2.1 ``received`` and RFC 3581 ``rport`` filled in.

    They name the address and port the request came from, never what the sender wrote: any
    ``received`` or ``rport`` value of its own (every one of them, a repeated parameter
    included) is replaced (a core that reads the Via for NAT handling, access lists or call
    records is not told an address the sender chose)."""
    text = str(via)
    written = [name for name, _ in via.params if name == "received" or name == "rport"]
    if not written:  # the usual request: received only where sent-by is not the source
        if via.host.strip("[]") != src[0]:
            text += f";received={src[0]}"
        return text
    if written == ["rport"] and via.param("rport") is None:  # a bare rport (RFC 3581)
        return _RPORT_BARE.sub(f";rport={src[1]}", text, count=1) + f";received={src[0]}"
    rport = "rport" in written
    text = _RPORT_ANY.sub("", _RECEIVED.sub("", text))
    if rport:
        text += f";rport={src[1]}"
    # received: when sent-by is not the source, and always with rport (RFC 3581 §4: "even if
    # it is identical to the value of the sent-by component")
    if rport or via.host.strip("[]") != src[0]:
        text += f";received={src[0]}"
    return text


def replace_first_value(msg: Message, name: str, first: str | None, rest: Iterable[str]) -> bytes | None:
    """A header line for ``name`` with its first value replaced (or removed when None)."""
    values = ([first] if first is not None else []) + list(rest)
    if not values:
        return None
    canonical = {"via": "Via", "route": "Route"}.get(name, name.title())
    return header_line(canonical, ", ".join(values))


def response(
    msg: Message,
    status: int,
    phrase: str | None = None,
    *,
    to_tag: str | None = None,
    top_via: str | None = None,
    extra: Iterable[str] = (),
) -> bytes:
    """A response to ``msg`` built by sipguard (RFC 3261 §8.2.6).

    Via lines, From, Call-ID and CSeq are copied verbatim; To gets ``to_tag`` when it has none;
    ``top_via`` (with received/rport) replaces the first Via value when given.
    """
    lines = [f"SIP/2.0 {status} {phrase or PHRASES.get(status, 'Unknown')}".encode()]
    first_via = True
    copied: set[str] = set()  # one of each: a malformed request may repeat them
    for i, name in enumerate(msg.names):
        if name in copied:
            continue
        if name == "via":
            if first_via and top_via is not None:
                rest = [str(v) for v in _vias_of_line(msg, i)[1:]]
                lines.append(header_line("Via", ", ".join([top_via, *rest])))
            else:
                lines.append(msg.lines[i])
            first_via = False
        elif name in ("from", "call-id", "cseq"):
            lines.append(msg.lines[i])
            copied.add(name)
        elif name == "timestamp" and status == 100:
            lines.append(msg.lines[i])  # RFC 3261 §8.2.6.1: a 100 Trying copies it
            copied.add(name)
        elif name == "to":
            copied.add(name)
            if to_tag and status > 100 and msg.to_tag is None:
                lines.append(msg.lines[i] + f";tag={to_tag}".encode())
            else:
                lines.append(msg.lines[i])
    lines.extend(e.encode("utf-8", "surrogateescape") for e in extra)
    lines.append(b"Content-Length: 0")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)


def _vias_of_line(msg: Message, i: int) -> list[Via]:
    from sipguard.sip.via import parse_via_list

    return parse_via_list(msg.value_at(i))


def ack_for(inv: Message, resp: Message) -> bytes:
    """The hop-by-hop ACK for a non-2xx final response (RFC 3261 §17.1.1.3).

    ``inv`` is the INVITE as sipguard sent it (top Via is ours). Same Request-URI, Call-ID,
    From, CSeq number and top Via as that INVITE; To from the response; Route copied.
    """
    uri = inv.uri_text or ""
    lines = [f"ACK {uri} SIP/2.0".encode()]
    lines.append(inv.lines[inv.indexes("via")[0]])
    for i, name in enumerate(inv.names):
        if name in ("from", "call-id", "route", "max-forwards"):
            lines.append(inv.lines[i])
    to_idx = resp.indexes("to")
    lines.append(resp.lines[to_idx[0]])
    lines.append(f"CSeq: {inv.cseq[0]} ACK".encode())
    lines.append(b"Content-Length: 0")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)


def cancel_for(inv: Message, reason: tuple[bytes, ...] = ()) -> bytes:
    """A CANCEL for an INVITE we forwarded (RFC 3261 §9.1): same top Via, R-URI, Route; with
    ``reason``, the Reason lines of the CANCEL it relays (RFC 3326: why the caller gave up,
    such as a call completed elsewhere)."""
    uri = inv.uri_text or ""
    lines = [f"CANCEL {uri} SIP/2.0".encode()]
    lines.append(inv.lines[inv.indexes("via")[0]])
    for i, name in enumerate(inv.names):
        if name in ("from", "to", "call-id", "route", "max-forwards"):
            lines.append(inv.lines[i])
    lines.extend(reason)
    lines.append(f"CSeq: {inv.cseq[0]} CANCEL".encode())
    lines.append(b"Content-Length: 0")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)
