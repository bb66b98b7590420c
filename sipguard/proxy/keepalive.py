"""Requests sipguard sends inside a call of its own accord: keep-alive OPTIONS, and the BYEs
that end a call at once (a number suspended with ``end_calls``).

Keep-alives: in-dialog OPTIONS toward both sides of a call, so a call whose BYE went around
sipguard (or was lost) ends and frees its slots within minutes, not hours.

Off by default (``sip.dialog_keepalive_s``). Once a call is answered, every interval sipguard
sends an OPTIONS inside the dialog to the core (Request-URI: the core's Contact from the 2xx)
and to the outside party (its Contact from the INVITE, on the flow the call came from), each as
its own client transaction. Any final answer means the dialog is alive there — most user
agents answer an in-dialog OPTIONS ``200``, some ``405`` or ``500`` (the CSeq sipguard uses is
below the dialog's): all count as alive. ``481 Call/Transaction Does Not Exist``, ``408``, or
no answer at all (Timer F) means that side has forgotten the call: the dialog ends with reason
``keepalive_failed`` and its slots are freed. No BYE is sent — the side that still knows the
call keeps its own timers. This is the approach of Kamailio's dialog keep-alive.
"""

from __future__ import annotations

import re

from sipguard.contract import Dialog, Local
from sipguard.proxy import build
from sipguard.proxy.timers import TimerEntry
from sipguard.sip.message import CRLF, Message

# The URI inside a Contact value: "<uri>" or a bare addr-spec before any ";".
_CONTACT_URI = re.compile(r"<([^>]*)>|^\s*([^;,\s]+)")
PROBE_CSEQ = 1  # below the dialog's own CSeqs on purpose: a UAS that checks answers 500


def contact_uri(value: str | None) -> str | None:
    """The URI of the first Contact value, or None."""
    if not value:
        return None
    m = _CONTACT_URI.search(value)
    if m is None:
        return None
    uri = (m.group(1) or m.group(2) or "").strip()
    return uri or None


class Probe:
    """What sipguard needs to send in-dialog requests for one answered call: both sides'
    tagged From/To, their Contacts, and the highest CSeq each side has used (a BYE sipguard
    sends on a side's behalf uses the next one)."""

    __slots__ = ("dialog", "caller_from", "callee_to", "caller_contact", "callee_contact",
                 "timer", "rounds", "caller_cseq", "callee_cseq")

    def __init__(self, dialog: Dialog, caller_from: str, callee_to: str,
                 caller_contact: str | None, callee_contact: str | None) -> None:
        self.dialog = dialog
        self.caller_from = caller_from  # From of the INVITE (caller's tag)
        self.callee_to = callee_to  # To of the 2xx (callee's tag)
        self.caller_contact = caller_contact
        self.callee_contact = callee_contact
        self.timer: TimerEntry | None = None
        self.rounds = 0
        self.caller_cseq = 1  # the INVITE's
        self.callee_cseq = 0


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
        uri, frm, to = probe.caller_contact, probe.callee_to, probe.caller_from
    else:
        uri, frm, to = probe.callee_contact, probe.caller_from, probe.callee_to
    if uri is None:
        return None
    lines = [
        f"{method} {uri} SIP/2.0".encode(),
        build.our_via(local, transport, branch),
        b"Max-Forwards: 70",
        f"From: {frm}".encode("utf-8", "surrogateescape"),
        f"To: {to}".encode("utf-8", "surrogateescape"),
        f"Call-ID: {probe.dialog.call_id}".encode("utf-8", "surrogateescape"),
        f"CSeq: {cseq} {method}".encode(),
    ]
    if extra:
        lines.append(extra)
    lines += [b"Content-Length: 0", b"", b""]
    return CRLF.join(lines)


def probe_for(dialog: Dialog, invite: Message, answer: Message) -> Probe | None:
    """A probe for a call answered by ``answer`` (a 2xx to ``invite``), or None when the
    headers it needs are missing."""
    caller_from = invite.get("from")
    callee_to = answer.get("to")
    if not caller_from or not callee_to or answer.to_tag is None:
        return None
    if dialog.anonymise is not None and not dialog.outbound:
        # the core knows the caller as anonymous: so do sipguard's own requests (tags match)
        caller_from = f'"Anonymous" <sip:anonymous@anonymous.invalid>;tag={invite.from_tag}'

    return Probe(dialog, caller_from, callee_to, contact_uri(invite.get("contact")),
                 contact_uri(answer.get("contact")))
