"""Requests sipguard sends inside a call of its own accord: keep-alive OPTIONS, and the BYEs
that end a call at once (a number suspended with ``end_calls``).

Keep-alives: in-dialog OPTIONS toward both sides of a call, so a call whose BYE went around
sipguard (or was lost) ends and frees its slots within minutes, not hours.

Off by default (``sip.dialog_keepalive_s``). Once a call is answered, every interval sipguard
sends an OPTIONS inside the dialog to the core (Request-URI: the core's Contact from the 2xx)
and to the outside party (its Contact from the INVITE, on the flow the call came from), each as
its own client transaction. A re-INVITE or UPDATE answered 2xx (a target refresh) moves those
Contacts (``Proxy._refresh_targets``). Any final answer means the dialog is alive there — most user
agents answer an in-dialog OPTIONS ``200``, some ``405`` or ``500`` (the CSeq sipguard uses is
below the dialog's): all count as alive. ``481 Call/Transaction Does Not Exist``, ``408``, or
no answer at all (Timer F) means that side has forgotten the call: the dialog ends with reason
``keepalive_failed`` and its slots are freed. When the core is the side that forgot, no BYE
is sent — the outside party keeps its own timers (the approach of Kamailio's dialog
keep-alive). When the outside party is, the core gets a BYE (and the party one too): a party
that answers ``481`` cannot free its slots while its call goes on at the core.
"""

from __future__ import annotations

import re

from sipguard.contract import Dialog, Local
from sipguard.proxy import build
from sipguard.proxy.timers import TimerEntry
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import CRLF, Message, decode, raw_value
from sipguard.sip.nameaddr import parse_name_addr_list

# The URI inside a Contact value: "<uri>" or a bare addr-spec before any ";".
_CONTACT_URI = re.compile(r"<([^>]*)>|^([^;,\s<]+)(?=\s*(?:[;,]|$))")
PROBE_CSEQ = 1  # below the dialog's own CSeqs on purpose: a UAS that checks answers 500


def contact_uri(value: str | None) -> str | None:
    """The URI of the first Contact value, or None: ``<uri>``, ``"Sales Queue" <uri>``,
    ``Agent <uri>`` or a bare addr-spec (RFC 3261 §20.10)."""
    if not value:
        return None
    text = value.lstrip()
    if not text.startswith("<") and '"' in text:
        try:  # a quoted display name may hold "<" itself: the grammar decides
            return parse_name_addr_list(value)[0].uri.raw or None
        except (SipParseError, IndexError):
            return None
    m = _CONTACT_URI.search(text)
    if m is None:
        return None
    uri = (m.group(1) or m.group(2) or "").strip()
    return uri or None


class Probe:
    """What sipguard needs to send in-dialog requests for one answered call: both sides'
    tagged From/To, their Contacts, and the highest CSeq each side has used (a BYE sipguard
    sends on a side's behalf uses the next one).

    Made for every answered call, used for few (keep-alives are off by default; ending a call
    at once is rare): it keeps the raw header lines, which the messages hold anyway, and reads
    their values only when a request is built."""

    __slots__ = ("dialog", "caller_from", "callee_to", "caller_contact", "callee_contact",
                 "timer", "rounds", "caller_cseq", "callee_cseq", "invite_rr", "answer_rr",
                 "ours", "after_bye", "leg")

    def __init__(self, dialog: Dialog, caller_from: bytes, callee_to: bytes,
                 caller_contact: bytes | None, callee_contact: bytes | None) -> None:
        self.dialog = dialog
        self.caller_from = caller_from  # From line of the INVITE (caller's tag)
        self.callee_to = callee_to  # To line of the 2xx (callee's tag)
        self.caller_contact = caller_contact  # Contact line of the INVITE (or a refresh)
        self.callee_contact = callee_contact  # Contact line of the 2xx (or a refresh)
        self.timer: TimerEntry | None = None
        self.rounds = 0
        self.caller_cseq = 1  # the INVITE's (set by probe_for)
        self.callee_cseq = 0
        # Record-Route values of the INVITE and of the 2xx (read into route sets only when a
        # request is built: see route()), and sipguard's own host:ports among them
        self.invite_rr: tuple[str, ...] = ()
        self.answer_rr: tuple[str, ...] = ()
        self.ours: tuple[str, ...] = ()
        # an OPTIONS asking the core after the outside party's BYE went unanswered is out
        self.after_bye = False
        # the To tag of the 2xx: which answered leg this is (a forking core's call has one
        # probe per answered leg, see leg_probe)
        self.leg = ""

    def route(self, toward_caller: bool) -> bytes | None:
        """The Route line toward one side: its route set as that side's own requests carry it
        (RFC 3261 §12.1.1, §12.1.2) — toward the caller, the Record-Route entries the INVITE
        brought (its side's proxies), in order; toward the callee, the 2xx's entries above
        sipguard's own (the callee's side), reversed. None without one. A request without it
        would pass a record-routing proxy by."""
        try:
            rrs = self.invite_rr if toward_caller else self.answer_rr
            entries = [str(na) for v in rrs for na in parse_name_addr_list(v)]
        except SipParseError:  # a Record-Route nobody read before: sent without a route set
            return None
        if not toward_caller:
            ours = self.ours
            mine = next((i for i, e in enumerate(entries) if any(h in e for h in ours)),
                        len(entries))
            entries = entries[:mine][::-1]
        if not entries:
            return None
        return ("Route: " + ", ".join(entries)).encode("utf-8", "surrogateescape")


def options(probe: Probe, toward_caller: bool, local: Local, transport: str,
            branch: str) -> bytes | None:
    """The in-dialog OPTIONS toward one side, or None when that side's Contact is unknown."""
    return request("OPTIONS", PROBE_CSEQ, probe, toward_caller, local, transport, branch)


def bye(probe: Probe, toward_caller: bool, local: Local, transport: str,
        branch: str) -> bytes | None:
    """A BYE toward one side on behalf of the other (its next CSeq), or None."""
    cseq = (probe.callee_cseq if toward_caller else probe.caller_cseq) + 1
    return request("BYE", cseq, probe, toward_caller, local, transport, branch,
                   b"Reason: SIP;cause=403;text=\"Call ended by sipguard\"")


def request(method: str, cseq: int, probe: Probe, toward_caller: bool, local: Local,
            transport: str, branch: str, extra: bytes = b"") -> bytes | None:
    """An in-dialog request sipguard itself sends toward one side of the call."""
    if toward_caller:
        contact, frm, to = probe.caller_contact, probe.callee_to, probe.caller_from
    else:
        contact, frm, to = probe.callee_contact, probe.caller_from, probe.callee_to
    route = probe.route(toward_caller)
    uri = contact_uri(decode(raw_value(contact))) if contact is not None else None
    if uri is None:
        return None
    lines = [
        f"{method} {uri} SIP/2.0".encode("utf-8", "surrogateescape"),
        build.our_via(local, transport, branch),
        b"Max-Forwards: 70",
        b"From: " + raw_value(frm),
        b"To: " + raw_value(to),
        f"Call-ID: {probe.dialog.call_id}".encode("utf-8", "surrogateescape"),
        f"CSeq: {cseq} {method}".encode(),
    ]
    if route is not None:
        lines.append(route)
    if extra:
        lines.append(extra)
    lines += [b"Content-Length: 0", b"", b""]
    return CRLF.join(lines)


def _line(msg: Message, name: str) -> bytes | None:
    """The first raw line of header ``name``, or None."""
    idx = msg.indexes(name)
    return msg.lines[idx[0]] if idx else None


def contact_line(msg: Message) -> bytes | None:
    """The first raw Contact line of ``msg`` (a target), or None."""
    return _line(msg, "contact")


def probe_for(dialog: Dialog, invite: Message, answer: Message,
              ours: tuple[str, ...] = ()) -> Probe | None:
    """A probe for a call answered by ``answer`` (a 2xx to ``invite``), or None when the
    headers it needs are missing. ``ours``: sipguard's own host:port, to tell its
    Record-Route entries from the others'."""
    caller_from = _line(invite, "from")
    callee_to = _line(answer, "to")
    if caller_from is None or callee_to is None or answer.to_tag is None:
        return None
    if dialog.anonymise is not None and not dialog.outbound:
        # the core knows the caller as anonymous: so do sipguard's own requests (tags match)
        caller_from = (b'From: "Anonymous" <sip:anonymous@anonymous.invalid>;tag='
                       + (invite.from_tag or "").encode("utf-8", "surrogateescape"))
    probe = Probe(dialog, caller_from, callee_to, contact_line(invite), contact_line(answer))
    probe.leg = answer.to_tag
    probe.caller_cseq = invite.cseq[0]  # a BYE on the caller's behalf goes above it
    if invite.has("record-route"):
        probe.invite_rr = tuple(invite.value_at(i) for i in invite.indexes("record-route"))
    if answer.has("record-route"):
        probe.answer_rr = tuple(answer.value_at(i) for i in answer.indexes("record-route"))
        probe.ours = ours
    return probe


def leg_probe(main: Probe, answer: Message, ours: tuple[str, ...] = ()) -> Probe | None:
    """A probe for another answered leg of ``main``'s call: a forking core's later 2xx to the
    same INVITE (RFC 3261 §13.2.2.4), with its own To tag, Contact and route set, and the
    caller's side of ``main``. None when the 2xx lacks a tagged To."""
    callee_to = _line(answer, "to")
    if callee_to is None or answer.to_tag is None:
        return None
    probe = Probe(main.dialog, main.caller_from, callee_to, main.caller_contact,
                  contact_line(answer))
    probe.leg = answer.to_tag
    probe.caller_cseq, probe.callee_cseq = main.caller_cseq, main.callee_cseq
    probe.invite_rr = main.invite_rr
    if answer.has("record-route"):
        probe.answer_rr = tuple(answer.value_at(i) for i in answer.indexes("record-route"))
        probe.ours = ours
    return probe
