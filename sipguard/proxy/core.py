"""The RFC 3261 transaction-stateful proxy, sans-I/O.

Theory of operation
-------------------
The edge core (:mod:`sipguard.edge`) hands every received message to :meth:`Proxy.receive`
with its :class:`Flow` and the current time, calls :meth:`Proxy.handle_timer` when
:meth:`Proxy.next_deadline` passes, and drains ``proxy.outbox`` (``(Flow, bytes)`` pairs to
send) and ``proxy.events`` (decisions, dialog starts and ends, parse errors, drops). The
policy is reached through the :class:`Admission` the core is built with. Nothing in here
touches a socket or reads a clock.

The proxy is split by job: this module drives requests, responses, CANCEL/ACK, forwarding
and timers; :mod:`~sipguard.proxy.transactions` holds the transaction records and their
states, :mod:`~sipguard.proxy.routing` validation and next-hop choice,
:mod:`~sipguard.proxy.dialogs` the dialog table, :mod:`~sipguard.proxy.build` the bytes
sipguard writes itself (Via, Record-Route, responses, ACK, CANCEL).

Requests (RFC 3261 §16):

* A request that matches a live server transaction is a retransmission: the last response is
  sent again, or it is absorbed. A retransmitted INVITE therefore never reaches the core twice,
  even while its policy decision is still pending.
* A new request is validated (§16.3: scheme 416, Max-Forwards 483, loop 482, Proxy-Require
  420), its Route pre-processed (§16.4: our own Route entries removed, strict routing undone),
  and its target chosen: the next Route, else — for an initial request from a peer — the core,
  else the Request-URI.
* An initial INVITE gets ``100 Trying`` at once and goes through the policy hook. A reject is
  answered from our own server transaction; an accept creates the dialog and a client
  transaction toward the core, with our Via on top, Record-Route (``;lr``; two entries when the
  call changes listener or transport, RFC 5658), Max-Forwards decremented.
* CANCEL is answered 200 and, once the branch has a provisional response, forwarded with the
  INVITE's branch (§9.1, §16.10). ACK for a non-2xx is absorbed by the server transaction it
  belongs to; ACK for a 2xx is routed end to end.

Responses (§16.7) match client transactions by our branch; 100 stops there, other responses go
upstream on the server transaction with our Via removed. A non-2xx final response is ACKed
hop-by-hop. Timers A/B/C/D/E/F/G/H/I/J/K (§17) and L/M (RFC 6026) run over UDP; over TCP the
retransmission timers do not.

Dialogs are created when an initial INVITE is accepted and end on BYE, CANCEL, a final non-2xx,
a transaction timeout, session-timer expiry or their maximum lifetime — whichever comes first,
exactly once.

Session timers (RFC 4028): a 2xx to the initial INVITE, or to a re-INVITE / UPDATE in the
dialog (a refresh), that carries ``Session-Expires`` sets the dialog's expiry to that many
seconds later (at least 90, the RFC's floor for Min-SE); a 2xx refresh without it turns the
timer off. A dialog whose session interval passes with no refresh ends (``session_expired``;
a call sipguard is on the path of gets a BYE to each side). The maximum lifetime, counted from
the INVITE, caps every expiry; so does, until the first ACK, 64*T1 after the 2xx. Expiry
times therefore move and come in any order: they live in a one-second
:class:`~sipguard.state.expiry.ExpiryWheel`, swept once a second while dialogs exist.
"""

from __future__ import annotations

import ipaddress
import re
import traceback
from collections.abc import Callable
from typing import Any, Final, Protocol
from urllib.parse import unquote

from sipguard.addresses import unmapped
from sipguard.contract import (
    ACCEPT,
    Anonymise,
    CallInfo,
    Dialog,
    DialogEnded,
    DialogStarted,
    Dropped,
    Event,
    Failed,
    Flow,
    InviteDecided,
    Noticed,
    ParseFailed,
    Screened,
    Verdict,
    national_tail,
    one_identity,
)
from sipguard.proxy import build, keepalive
from sipguard.proxy.dialogs import DialogTable, dialog_key, key_of, session_interval
from sipguard.proxy.routing import Router, flow_is_core, remember
from sipguard.proxy.settings import ProxySettings
from sipguard.proxy.subscriptions import (
    GRACE_S,
    Subscription,
    Subscriptions,
    granted,
    lasts,
    notified,
    subscriber,
)
from sipguard.proxy.timers import TimerEntry, TimerQueue
from sipguard.proxy.transactions import (
    ACCEPTED,
    CALLING,
    COMPLETED,
    CONFIRMED,
    DECIDING,
    PROCEEDING,
    TERMINATED,
    ClientTxn,
    ServerTxn,
    table_key,
)
from sipguard.sip import uri_headers
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message, decode, header_line, raw_value
from sipguard.sip.nameaddr import NameAddr, parse_name_addr_list
from sipguard.sip.parser import parse_message
from sipguard.sip.uri import Uri, display_number, hidden_number, hidden_numbers, parse_uri
from sipguard.sip.via import REST_AFTER_FIRST_VIA, after_first_via, parse_via_list


class Admission(Protocol):
    """What the proxy asks of the policy side (the edge core, :mod:`sipguard.edge`).

    Every initial INVITE is handed to :meth:`decide`; for each call decided, exactly one of
    :meth:`dialog_started` (it was accepted and forwarded) or :meth:`abandoned` (rejected,
    dropped, cancelled while deciding, unroutable) follows, in the same synchronous step as
    the verdict when the verdict came at once. :meth:`dialog_ended` follows a started dialog
    exactly once. So whatever a decision takes from the limits is either handed to the dialog
    or given back before the next message is read.
    """

    def decide(self, call: CallInfo, now: float) -> Verdict | None:
        """The verdict, or None when it needs I/O (the proxy waits for :meth:`Proxy.resolve`)."""
        ...

    def dialog_started(self, dialog: Dialog, now: float) -> None: ...

    def dialog_ended(self, dialog: Dialog, now: float) -> None: ...

    def abandoned(self, call: CallInfo, now: float) -> None: ...

    def screen(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        """An out-of-dialog request from outside, before anything is sent or kept: None to go
        on, or the verdict (reject: one stateless answer; drop: silence)."""
        ...

    def screen_transfer(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        """A REFER from outside: None to go on, or the verdict on its ``Refer-To`` target
        (reject: answered on its transaction; accept: monitored, logged)."""
        ...

    def same_party(self, dialog: Dialog, flow: Flow) -> bool:
        """Whether ``flow`` may speak for ``dialog``'s outside party although it is not the
        exact address the call came from (e.g. another address of the same peer)."""
        ...

    def same_peer(self, sent: Flow, flow: Flow) -> bool:
        """Whether an answer from ``flow`` may come for a request sent to ``sent``, another
        address: both are addresses of one configured peer (a carrier's second SBC)."""
        ...

    def silent_to(self, flow: Flow) -> bool:
        """Whether ``flow``'s source hears nothing from sipguard (an unknown source with
        ``unknown_source: drop``): not even the answer to a request that does not parse."""
        ...

    def asserts_identity(self, flow: Flow) -> bool:
        """Whether a P-Asserted-Identity from ``flow`` (not the core) is an identity: it comes
        from a peer with ``trust_pai: true``, or no peers are configured (RFC 3325 §5)."""
        ...

    def asserts_caller(self, dialog: Dialog, msg: Message) -> bool:
        """Whether the P-Asserted-Identity of the caller's later request or answer in
        ``dialog`` (a call that came in) asserts the caller the call was checked as."""
        ...


class AcceptAll:
    """An :class:`Admission` with no policy: every call is accepted, nothing is counted."""

    def decide(self, call: CallInfo, now: float) -> Verdict | None:
        return ACCEPT

    def dialog_started(self, dialog: Dialog, now: float) -> None:
        return None

    def dialog_ended(self, dialog: Dialog, now: float) -> None:
        return None

    def abandoned(self, call: CallInfo, now: float) -> None:
        return None

    def screen(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        return None

    def screen_transfer(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        return None

    def same_party(self, dialog: Dialog, flow: Flow) -> bool:
        return False

    def same_peer(self, sent: Flow, flow: Flow) -> bool:
        return False

    def silent_to(self, flow: Flow) -> bool:
        return False

    def asserts_identity(self, flow: Flow) -> bool:
        return True

    def asserts_caller(self, dialog: Dialog, msg: Message) -> bool:
        return True

# ";branch=z9hG4bKsg..." in a raw Via line: the first one is the top value's.
_OUR_BRANCH: Final = re.compile(rb";[ \t]*branch[ \t]*=[ \t]*(" + build.OUR_PREFIX_BYTES + rb"[0-9a-z.]+)")


def _via_sent(line: bytes, branch_at: int) -> bytes:
    """The protocol and sent-by of the Via value that ends at ``branch_at`` (its ";branch")
    in a raw Via line: lower-case, without the header name, parameters or whitespace (LWS may
    stand around "/" and ":", RFC 3261 §25.1). b"" when a comma comes first: then the branch
    is a later value's, and the line's top value is someone else's."""
    value = line[line.find(b":") + 1:branch_at]
    if b"," in value:
        return b""
    semi = value.find(b";")
    if semi >= 0:
        value = value[:semi]  # parameters before the branch (a next hop that reordered them)
    return b"".join(value.split()).lower()


def _our_via_sent(data: bytes) -> bytes:
    """What :func:`_via_sent` reads from the Via sipguard put on its own request ``data``."""
    m = _OUR_BRANCH.search(data, data.find(b"\n") + 1)
    if m is None:
        return b"-"  # equal to no response's
    start = data.rfind(b"\n", 0, m.start()) + 1
    return _via_sent(data[start:m.start()], m.start() - start)


# A verstat parameter (3GPP TS 24.229 §7.2A.20) anywhere in a From or P-Asserted-Identity line,
# however written: in the user part, as a URI parameter after the host, as a URI header
# (?verstat= / &verstat=), as a header parameter; any case, %-escaped letters (the parser
# reads ver%73tat as verstat), an escaped ";" or "=" in a user part (which the number reader
# un-escapes), folded onto the next line. Its value ends at the "@" of a user part: the host
# stays. A "?verstat=" followed by another URI header keeps the "?" (group 1).
_VERSTAT_PLAIN: Final = re.compile(
    rb"(?:[;&]|(\?))[ \t]*verstat[ \t]*=[ \t]*[^;>,\s@?&\"]*(?(1)&?)", re.IGNORECASE)
_VERSTAT: Final = re.compile(
    rb"(?:;|%3b|&|(\?))\s*"
    + b"".join(b"(?:%c|%%%02x|%%%02x)" % (c, c, c - 32) for c in b"verstat")
    + rb"\s*(?:=|%3d)\s*(?:[^;>,\s%@?&\"]|%(?!3b))*(?(1)&?)",
    re.IGNORECASE)


def _keep_question_mark(m: re.Match[bytes]) -> bytes:
    """A verstat removed: "?verstat=X&a=b" leaves "?a=b"; any other form leaves nothing."""
    return b"?" if m.group(1) and m.group(0).endswith(b"&") else b""


def _quoted_spans(line: bytes) -> list[tuple[int, int]]:
    """Where ``line``'s quoted strings are (display names, quoted parameter values): (start
    of the opening quote, end after the closing one, or the line's end), escapes read."""
    spans: list[tuple[int, int]] = []
    i = line.find(b'"', line.find(b":") + 1)
    n = len(line)
    while i >= 0:
        j = i + 1
        while j < n and line[j] != 0x22:  # '"'
            j += 2 if line[j] == 0x5C else 1  # a backslash escapes the next byte
        spans.append((i, min(j + 1, n)))
        i = line.find(b'"', j + 1) if j + 1 < n else -1
    return spans


def _without_verstat(line: bytes, pattern: re.Pattern[bytes]) -> bytes:
    """``line`` with each ``verstat`` parameter ``pattern`` finds removed, quotes kept whole:
    one inside a quoted string (a display name, a quoted value) loses its text up to the
    closing quote, never the quote; one outside whose value is a quoted string loses that
    value with it. So the header keeps the structure sipguard read it with (a display name
    ``"a;verstat="`` cannot take its closing quote along and turn what followed it into the
    URI a receiver reads)."""
    m = pattern.search(line)
    if m is None:
        return line
    spans = _quoted_spans(line) if b'"' in line else []
    parts: list[bytes] = []
    at = 0
    while m is not None:
        start, end = m.span()
        inside = any(a < start < b for a, b in spans)
        if not inside and line[end:end + 1] == b'"':
            end = next((b for a, b in spans if a == end), len(line))
        parts.append(line[at:start])
        parts.append(_keep_question_mark(m))
        at = end
        m = pattern.search(line, end)
    parts.append(line[at:])
    return b"".join(parts)


# The key of an answer's edits (Proxy._answer_edits) whose line is added after its headers.
APPEND: Final = -1

# Headers only the proxy edits; a verdict's replace_headers cannot touch them.
PROXY_OWNED: Final = frozenset(
    {"via", "route", "record-route", "max-forwards", "from", "to", "call-id", "cseq",
     "content-length"}
)


ANONYMOUS_FROM: Final = 'From: "Anonymous" <sip:anonymous@anonymous.invalid>'
# Headers that name the caller, removed when a verdict anonymises (PAI: unless keep_pai).
_IDENTITY_HEADERS: Final = ("p-preferred-identity", "remote-party-id", "referred-by")
# what sipguard passes within a call whatever sip.allow_methods says (OPTIONS' Allow)
_IN_CALLS: Final = ("ACK", "BYE", "CANCEL", "INFO", "INVITE", "NOTIFY", "PRACK", "REFER", "UPDATE")
# what an in-dialog request from outside may be: a call's methods, and what a call carries
# besides (RFC 3428 MESSAGE, an OPTIONS probe, RFC 6665 SUBSCRIBE in a REFER's dialog); any
# method sip.allow_methods lets in out of dialog too, but for these two, never in a dialog
_IN_DIALOG: Final = frozenset((*_IN_CALLS, "MESSAGE", "OPTIONS", "SUBSCRIBE"))
_NEVER_IN_DIALOG: Final = frozenset(("REGISTER", "PUBLISH"))
# the core side's answers with distinct To tags a call keeps (forks of a forking core): of
# ringing ones this many, of answered ones four times as many
MAX_PINS: Final = 8
# a Contact URI with nothing to check: scheme, user@host:port, plain parameters
_PLAIN_URI: Final = re.compile(r"sips?:[A-Za-z0-9+._~!$&'()*,;=:%@\[\]-]+")
_NO_PAI: Final[tuple[tuple[str, str | None], ...]] = (("p-asserted-identity", None),)
# A retransmission timer waits for the receive queue only when it is at least this far behind
HOLD_MIN_S: Final = 0.02
# The largest UDP payload over IPv4 (65,535 less the IP and UDP headers)
MAX_DATAGRAM: Final = 65_507
# calls the once-a-second sweep ends a pass when many fall due in one second (a burst of
# calls reaching its maximum lifetime together): the rest go in passes SWEEP_PAUSE_S apart,
# so ending them neither holds the loop nor sends every BYE (and its retransmissions) at once
SWEEP_BATCH: Final = 500
SWEEP_PAUSE_S: Final = 0.01
# Addresses of cores a reload replaced, whose calls may still be up (see Proxy._is_core)
MAX_FORMER_CORES: Final = 16


def _same_host(a: str, b: str) -> bool:
    """Two address literals of one host: equal text, or the same address written another
    way (IPv6 spelling, brackets, an IPv4-mapped IPv6 address); host names only as equal."""
    if a == b:
        return True
    try:
        return unmapped(ipaddress.ip_address(a.strip("[]"))) == \
            unmapped(ipaddress.ip_address(b.strip("[]")))
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    """True for an IPv4 or IPv6 address literal, False for a host name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


_SHARED_NAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT


def _behind_nat(msg: Message, flow: Flow) -> bool:
    """A UDP caller that cannot be reached at its Contact: the Contact is an RFC 5626 outbound
    URI (``ob``: "send to the flow I registered over"), or names a private, loopback,
    link-local or carrier-grade-NAT address while it sends from a public one (the test of
    Kamailio's nathelper; a peer on a private network, an SBC pair whose Contact names the
    pair's shared address, is not behind NAT). A Contact with a public address or a host name
    is taken as it is,
    as is a different port alone (SBCs that send from one port and listen on another), and
    a call whose INVITE carries a Record-Route (a proxy before sipguard: the core's requests
    follow the route set to it)."""
    if flow.transport != "udp" or not msg.has("contact") or msg.has("record-route"):
        return False
    try:
        contacts = msg.contacts
    except SipParseError:
        return False
    if not contacts:
        return False
    uri = contacts[0].uri
    if any(name.lower() == "ob" for name, _ in uri.params):
        return True
    host = uri.host.strip("[]")
    if host == flow.addr[0]:
        return False
    try:
        ip = ipaddress.ip_address(host)
        source = ipaddress.ip_address(flow.addr[0])
    except ValueError:
        return False
    return ip != source and _inside(ip) and not _inside(source)


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A private, loopback, link-local or carrier-grade-NAT address."""
    return ip.is_private or ip.is_loopback or ip.is_link_local or (
        ip.version == 4 and ip in _SHARED_NAT)


# Record-routed: the core's requests within them (a NOTIFY) reach a party behind NAT through
# sipguard. Dialogs are kept for calls only, so a subscription's own refreshes from outside
# are refused (481) and its subscriber subscribes anew (RFC 6665 §4.1.2.2).
DIALOG_CREATING: Final = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
SUBSCRIPTION_CREATING: Final = frozenset({"SUBSCRIBE", "REFER"})


def _names(dialog: Dialog, side: str, msg: Message) -> bool:
    """An in-dialog request names the answered call itself: its tags are the dialog's own
    pair. A BYE with another fork's To tag (RFC 3261 §13.2.2.4: the caller hangs up the extra
    dialogs of a forking core) is still passed on, but does not end the call nor free its
    slots (a To tag the core side never answered with is refused before: ``_not_party``); neither does one before the answer (the INVITE's own final
    answer ends the call then); nor does another fork's re-INVITE move the call's targets."""
    if dialog.state != CONFIRMED:
        return False
    sent, got = msg.from_tag or "", msg.to_tag or ""  # no tag: "" (RFC 2543), as dialogs keep it
    tags = (sent, got) if side == "caller" else (got, sent)
    return tags == (dialog.caller_tag, dialog.callee_tag or "")


def _answered_leg(dialog: Dialog, side: str, msg: Message) -> str | None:
    """The core side's tag when an in-dialog request names one of the answered legs of a
    confirmed call: the call's own (its tags are the dialog's pair, as :func:`_names`), or,
    for a call that came in, another fork a 2xx pinned (a forking core's ring group with more
    than one answer: the caller ACKs each and hangs up the ones it does not keep, RFC 3261
    §13.2.2.4). None for anything else (before the answer, the INVITE's final answer ends
    the call; a ringing fork has no leg to end)."""
    if dialog.state != CONFIRMED:
        return None
    sent, got = msg.from_tag or "", msg.to_tag or ""
    caller, leg = (sent, got) if side == "caller" else (got, sent)
    if caller != dialog.caller_tag:
        return None
    if leg == (dialog.callee_tag or ""):
        return leg
    forks = dialog.forks
    if forks is None or dialog.outbound:
        return None
    if leg == dialog.pin_tag:
        return leg if dialog.pin_final else None
    pin = forks.get(leg)
    return leg if pin is not None and pin[2] else None


def _bye_leg(st: ServerTxn | None) -> str:
    """The leg an outside party's BYE (a transaction with ``ends``) names: its To tag, the
    core side's (a call that came in; ``_leg_ended`` reads no leg of one the core placed)."""
    msg = st.msg if st is not None else None
    return (msg.to_tag or "") if msg is not None else ""


def _request(st: ServerTxn) -> Message:
    """The request of a transaction still being worked on (not yet answered finally)."""
    msg = st.msg
    if msg is None:
        raise RuntimeError(f"{st!r} has its final answer: its request is gone")
    return msg


def _sent_there(flow: Flow, sent: Flow) -> bool:
    """An answer comes from where its request went: the address and port — over TCP or TLS
    its host (a core may answer over a connection of its own, RFC 3261 §18.2.2)."""
    return flow.addr == sent.addr or (flow.transport != "udp" and flow.addr[0] == sent.addr[0])


def _shown_number(uri: Uri) -> str | None:
    """The number ``uri`` shows — read, or hidden where a receiver may read one — or None
    (also for one that does not parse: the request was screened before)."""
    try:
        return uri.number or hidden_number(uri)
    except SipParseError:
        return None


def _number_key(number: str) -> str:
    """A number as :func:`_from_key` keeps it: ``#+`` and its digits when it is written
    internationally (``+``, or ``00`` ahead), else ``#`` and its digits without a trunk 0."""
    digits = "".join(c for c in number if c.isdigit())
    if number.startswith("+"):
        return "#+" + digits
    if digits.startswith("00"):
        return "#+" + digits[2:]
    return "#" + digits.lstrip("0")


def _from_key(uri: Uri) -> str:
    """What a caller's From must keep within a call: its number (:func:`_number_key`:
    ``+1212…``, ``%2B1-212…;user=phone`` and ``tel:+1-212…`` are one), or the numbers a
    receiver may read in its user (``~`` and each of them: a decoy and what follows it must
    stay as they were), else its user."""
    try:
        number = uri.number
        hidden = hidden_numbers(uri) if number is None else []
    except SipParseError:  # (screened before: not reached)
        number, hidden = None, []
    if number is not None:
        return _number_key(number)
    if hidden:
        return "~" + ",".join(hidden)
    user = uri.user or ""
    return unquote(user).lower() if "%" in user else user.lower()


def _same_from(shown: str, checked: str) -> bool:
    """Two keys of :func:`_from_key` are one caller: the same, or one number written
    internationally and the other nationally — the national one the international one's last
    six digits or more, with at most a country code's three ahead of them (``2125550100`` for
    ``+12125550100``, ``0201234567`` for ``+31201234567``). Two international spellings are
    one number only when equal: ``+4412125550100`` is not ``+12125550100``."""
    if shown == checked:
        return True
    if not (shown.startswith("#") and checked.startswith("#")):
        return False
    shown_intl = shown.startswith("#+")
    if shown_intl == checked.startswith("#+"):
        return False
    intl, national = (shown[2:], checked[1:]) if shown_intl else (checked[2:], shown[1:])
    return national_tail(national, intl)


def _checked_from(msg: Message, dialog: Dialog) -> str:
    """The key of the From an INVITE was checked with (:func:`_from_key`): a national number
    there is kept as the international one the rules read it as (the call's caller, or the
    number its From showed beside an asserted caller), so that a later request cannot show
    another country's number ending the same way."""
    key = _from_key(msg.from_.uri)
    if key.startswith("#") and not key.startswith("#+"):
        for e164 in (dialog.shown, dialog.caller):
            if e164 is not None and e164.startswith("+"):
                full = _number_key(e164)
                if _same_from(key, full):
                    return full
    return key


def _display_key(name: str | None) -> str | None:
    """The number a display name shows, as :func:`_number_key` keeps it; None for a name."""
    number = display_number(name)
    return None if number is None else _number_key(number)


def _shows_another(msg: Message, dialog: Dialog) -> bool:
    """A caller's later request whose From shows another caller than its INVITE was checked
    with: another number (or user) in the URI, or a display name showing a number that is
    neither the INVITE's display number, nor From's, nor the checked caller's (a new name is
    fine: RFC 3261 §12.2.1.1 fixes the URI only)."""
    checked = dialog.from_user or ""
    if not _same_from(_from_key(msg.from_.uri), checked):
        return True
    shown = _display_key(msg.from_.display)
    if shown is None or shown == dialog.from_display or _same_from(shown, checked):
        return False
    caller = dialog.caller
    return caller is None or not caller.startswith("+") or \
        not _same_from(shown, _number_key(caller))


def _checked_identity(dialog: Dialog | None) -> Dialog | None:
    """Of a call that came in, only who its caller was checked as — the number, From's key
    and display number, its peer, whether its PAI counts, its anonymisation — in a new
    Dialog holding nothing else (none of the INVITE's strings, routes or state), to be kept
    beyond the call's end; None for a call the core placed, or no call."""
    if dialog is None or dialog.outbound:
        return None
    kept = Dialog("", "", None, dialog.caller, None, (), dialog.peer, dialog.source,
                  dialog.started, dialog.started, shown=dialog.shown)
    kept.from_user, kept.from_display = dialog.from_user, dialog.from_display
    kept.anonymise, kept.pai_untrusted = dialog.anonymise, dialog.pai_untrusted
    kept.state = TERMINATED
    return kept


def _contact_target(msg: Message) -> str | None:
    """The URI of ``msg``'s first Contact (a remote target), or None without one that parses
    as a sip, sips or tel URI (``*``, ``sip:a@b c``)."""
    line = keepalive.contact_line(msg)
    uri = keepalive.contact_uri(decode(raw_value(line))) if line is not None else None
    if uri is None:
        return None
    if uri.startswith(("sip:", "sips:")) and _PLAIN_URI.fullmatch(uri) is not None:
        return uri  # the usual sip:user@host:port;params, read as it is
    try:
        parsed = parse_uri(uri)
    except SipParseError:
        return None
    return uri if parsed.scheme in ("sip", "sips", "tel") else None


def _core_uri(core: Flow) -> str:
    """A URI naming the core's address, the target of a call whose 2xx named none."""
    host, port = core.addr[0], core.addr[1]
    host = f"[{host}]" if ":" in host else host
    return f"sip:{host}:{port}" + ("" if core.transport == "udp" else
                                   f";transport={core.transport}")


def _rr_entries(msg: Message) -> int:
    """How many Record-Route entries ``msg`` carries (SipParseError for one that does not
    parse)."""
    return len(_record_routes(msg)) if msg.has("record-route") else 0


def _record_routes(msg: Message) -> list[NameAddr]:
    """``msg``'s Record-Route entries, top first (SipParseError for one that does not parse)."""
    return [na for i in msg.indexes("record-route") for na in parse_name_addr_list(msg.value_at(i))]


def _anonymised_edits(
    msg: Message, edits: tuple[tuple[str, str | None], ...], anonymise: Anonymise
) -> tuple[tuple[str, str | None], ...]:
    """``edits`` with the caller's identity withheld on top (RFC 3323 §4.1.1.3, RFC 3325):
    the only edit of From a verdict can make, and it keeps From's tag."""
    out = dict(edits)
    out.pop("from", None)
    tag = msg.from_tag
    out["from"] = ANONYMOUS_FROM + (f";tag={tag}" if tag else "")
    if msg.has("contact"):
        digits = _caller_digits(msg)
        out["contact"] = "Contact: " + ", ".join(
            _anonymous_contact(na, digits) for na in msg.contacts)
    if not anonymise.keep_pai:
        out["p-asserted-identity"] = None
        out["identity"] = None  # a STIR/SHAKEN PASSporT names the caller (orig.tn) in clear
    for name in _IDENTITY_HEADERS:
        out[name] = None
    out["privacy"] = "Privacy: id"
    return tuple(out.items())


def _anonymous_contact(na: NameAddr, digits: tuple[str, ...]) -> str:
    """A Contact value with no display name and ``anonymous`` as the URI's user part (host,
    port and parameters kept, so requests still reach the caller), without URI headers (not
    allowed in a dialog's Contact, RFC 3261 §19.1.1; ``?P-Asserted-Identity=…``) nor a URI or
    header parameter whose value holds one of the caller's numbers (``digits``: the last seven
    digits of each) — nor, when the parameters together spell one, any with a digit."""
    raw = na.uri.raw
    start = raw.find(":") + 1
    at = raw.find("@", start)
    if na.uri.scheme in ("sip", "sips") and at > 0:
        raw = raw[:start] + "anonymous" + raw[at:]
    raw = raw.partition("?")[0]
    base, *uparams = raw.split(";")
    params = [k if v is None else f"{k}={v}" for k, v in na.params]
    if digits:
        uparams = [p for p in uparams if not _names_number(p, digits)]
        params = [p for p in params if not _names_number(p, digits)]
        if _names_number("".join(uparams + params), digits):
            # the number split over parameters (;a=212555;b=0100): none with a digit stays
            uparams = [p for p in uparams if not any(c.isdigit() for c in p)]
            params = [p for p in params if not any(c.isdigit() for c in p)]
    return "<" + ";".join([base, *uparams]) + ">" + "".join(";" + p for p in params)


def _names_number(value: str, digits: tuple[str, ...]) -> bool:
    """A parameter's value holds one of ``digits`` once separators and escapes are gone."""
    if "%" in value:
        value = unquote(value, errors="replace")
    run = "".join(c for c in value if c.isdigit())
    return any(d in run for d in digits)


def _caller_digits(msg: Message) -> tuple[str, ...]:
    """The last seven digits of each number a withheld caller's message names (From, To,
    P-Asserted-Identity), for :func:`_anonymous_contact`."""
    found: list[str] = []
    try:
        uris = [msg.from_.uri, msg.to.uri]
        if msg.has("p-asserted-identity"):
            uris.extend(na.uri for na in msg.p_asserted_identities)
    except SipParseError:
        return ()  # screened before: nothing to read here is no reason to fail the message
    for uri in uris:
        number = _shown_number(uri)
        if number is not None:
            run = "".join(c for c in number if c.isdigit())
            if len(run) >= 7 and run[-7:] not in found:
                found.append(run[-7:])
    return tuple(found)


class Proxy:
    """One proxy instance: transactions, dialogs and the admission hook."""

    def __init__(self, settings: ProxySettings, admission: Admission | None, secret: bytes) -> None:
        self.settings = settings
        self.admission: Admission = admission if admission is not None else AcceptAll()
        self.ids = build.Ids(secret)
        self.timers = TimerQueue()
        self.outbox: list[tuple[Flow, bytes]] = []
        self.events: list[Event] = []
        self.servers: dict[str, ServerTxn] = {}  # by table_key()
        self.clients: dict[str, ClientTxn] = {}  # by table_key()
        self.table = DialogTable()
        self.dialogs = self.table.by_id  # dialog_key(Call-ID, caller tag) -> live dialog
        # subscriptions (SUBSCRIBE, REFER) through sipguard: their in-dialog requests from
        # outside are let through while they last
        self.subscriptions = Subscriptions(settings.max_subscriptions)
        self.pending: dict[int, ServerTxn] = {}
        # the bytes of the requests the transaction table and the live calls hold (see
        # sip.max_transaction_bytes, sip.max_dialog_bytes), and of the message in hand
        self.held_bytes = 0
        self.dialog_bytes = 0
        self.received = 0
        # (Call-ID, From tag) of every initial INVITE being decided: a second one with the same
        # dialog id is a merged request (482), never a second slot under one lease
        self.deciding: set[str] = set()  # dialog_key()s of the INVITEs being decided
        self._sweep: TimerEntry | None = None
        self._sweep_backlog: list[Dialog] = []  # due, not yet ended (SWEEP_BATCH)
        self.probes: dict[str, keepalive.Probe] = {}  # dialogs kept alive
        # a forking core's call answered more than once: the probes of its other answered
        # legs (at most 4*MAX_PINS a call), so that sipguard can end every leg
        self.leg_probes: dict[str, list[keepalive.Probe]] = {}
        # ... and the core side's tags of its legs that have ended: a 2xx of one resent (its
        # ACK lost) does not bring it back (at most 8*MAX_PINS a call)
        self.ended_legs: dict[str, set[str]] = {}
        # ... and the tags of its answered legs whose 2xx the caller has ACKed (at most
        # 8*MAX_PINS a call): a call kept on a leg never ACKed ends 64*T1 on (ack_timeout)
        self.acked_legs: dict[str, set[str]] = {}
        # the addresses of the cores reloads replaced (insertion-ordered, at most
        # MAX_FORMER_CORES): their in-dialog requests may still belong to calls up
        self.former_cores: dict[str, None] = {}
        # before the 2xx (no probe yet): the highest CSeq each side used (PRACK, UPDATE), so a
        # BYE sipguard sends later goes above them; one entry per early dialog at most
        self.early_cseqs: dict[str, tuple[int, int]] = {}
        # answered calls to end at their ACK (a CANCEL of sipguard's crossed the core's 2xx):
        # dialog key -> reason; one entry per such call, gone when it ends
        self.doomed: dict[str, str] = {}
        # an INVITE from an unknown source let through in mode: monitor: reported with its
        # decision (the policy names it there), or — refused before one — when receive ends
        self.screen_note: Screened | None = None
        self.router = Router(settings, self.ids)
        # How far behind the shell is in reading what arrived, seconds: the overload watcher's
        # measured wait in the receive queues (0.0 when it saw none). See _wait_for_queue.
        self.lag = 0.0
        self.held_retransmissions = 0  # retransmissions that waited for the queue (a count)
        # Timer callbacks, bound once: ``self._timer_a`` makes a new bound method each time it
        # is read — one more object per timer for the garbage collector's young passes
        # (proxy/timers.py). The Proxy lives as long as the process, so the reference cycles
        # these make (Proxy -> bound method -> Proxy) cost nothing.
        self._on_timer_a = self._timer_a
        self._on_timer_b = self._timer_b
        self._on_timer_c = self._timer_c
        self._on_timer_e = self._timer_e
        self._on_timer_f = self._timer_f
        self._on_timer_g = self._timer_g
        self._on_timer_terminate_server = self._timer_terminate_server
        self._on_timer_drop_client = self._timer_drop_client
        self._on_keepalive = self._keepalive
        self._on_sweep_dialogs = self._sweep_dialogs

    # ------------------------------------------------------------------ configuration
    def configure(self, settings: ProxySettings) -> None:
        """Apply new settings (reload): transactions and dialogs carry on untouched — a call
        up keeps the core it went to (``Dialog.core``) when the reload names another."""
        old = self.settings.core
        if settings.core != old:
            # (kept when the new core shares the old one's address: its calls come from the
            # old port)
            remember(self.former_cores, old.addr[0], MAX_FORMER_CORES)
        self.settings = settings
        self.router.configure(settings)
        self.subscriptions.most = settings.max_subscriptions

    def _is_core(self, msg: Message, flow: Flow) -> bool:
        """``flow`` is the core's: the configured one, or — for an in-dialog request — the
        core the call went to before a reload named another (``Dialog.core``). The second
        test costs a dialog lookup only for a request from an address a former core had."""
        if self.router.is_core(flow):
            return True
        if flow.addr[0] not in self.former_cores or msg.to_tag is None:
            return False
        dialog, _ = self.table.of(msg, True)
        core = dialog.core if dialog is not None else None
        return core is not None and flow_is_core(flow, core, self.settings.core_tcp_any_port)

    # ------------------------------------------------------------------ entry points
    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        for callback, arg in self.timers.pop_due(now):
            callback(arg, now)

    def receive(self, data: bytes, flow: Flow, now: float) -> None:
        """Process one received message (a UDP datagram or one framed TCP message)."""
        self.received = len(data)
        try:
            msg = parse_message(
                data, max_size=self.settings.max_message_size, datagram=flow.transport == "udp",
                limits=self.settings.parse_limits,
            )
        except SipParseError as err:
            self._parse_failed(err, err.partial, flow)
            return
        try:
            if msg.method is not None:
                self.screen_note = None
                self._on_request(msg, flow, now)
            else:
                self._on_response(msg, flow, now)
        except SipParseError as err:
            self._parse_failed(err, msg, flow)
        note = self.screen_note
        if note is not None:  # an INVITE answered before its decision (481, 482, 503 ...)
            self.screen_note = None
            self.events.append(note)

    def resolve(self, call: CallInfo, verdict: Verdict, now: float) -> None:
        """Deliver a policy decision that ``decide`` left pending (returned None)."""
        st = self.pending.pop(id(call), None)
        if st is None or st.state != DECIDING:
            self._abandon(call, now)  # cancelled or failed meanwhile (a no-op when done)
            return
        st.next_hop = None  # worked out again, under the settings in force now
        try:
            self._apply_verdict(st, call, verdict, now)
        except SipParseError as err:
            self._found_bad(st, err, now)

    def _abandon(self, call: CallInfo, now: float) -> None:
        """A decided (or deciding) call that will not become a dialog: give back what its
        decision took, exactly once."""
        self.deciding.discard(dialog_key(call.call_id, call.msg.from_tag or ""))
        if call.settled:
            return
        call.settled = True
        self.admission.abandoned(call, now)

    def _forget_pending(self, st: ServerTxn, now: float) -> None:
        """``st`` will get no verdict applied (cancelled, failed): its decision is abandoned."""
        if st.call is not None:
            self.pending.pop(id(st.call), None)
            self._abandon(st.call, now)

    # ------------------------------------------------------------------ errors
    def stream_failed(self, err: SipParseError, head: bytes, flow: Flow) -> None:
        """A message on a TCP/TLS stream that could not be framed (larger than
        ``max_message_size``, its Content-Length missing or bad) and whose header block
        ``head`` came whole: answered ``err`` as a message that does not parse is; the
        connection closes after it (the rest of the stream cannot be read)."""
        msg: Message | None
        try:
            msg = parse_message(head + b"\r\n\r\n", max_size=len(head) + 4, datagram=True,
                                limits=self.settings.parse_limits)
        except SipParseError as bad:
            msg = bad.partial
        self._parse_failed(err, msg, flow)

    def _parse_failed(self, err: SipParseError, msg: Message | None, flow: Flow) -> None:
        answered = False
        if msg is not None and msg.method not in (None, "ACK") and msg.has("via") and not (
            self.admission.silent_to(flow)  # a silent sipguard is not found out by a bad request
        ):
            # Answer what can be answered (RFC 4475 §3.1.2): a From or To that does not parse is
            # echoed without a tag added; a top Via that does not parse is echoed and the answer
            # goes to the source address.
            top_via: str | None
            to_tag: str | None
            try:
                top_via = build.stamped_via(msg.top_via, flow.addr)
                reply = self.router.reply_flow(msg, flow)
            except SipParseError:
                top_via, reply = None, flow
            try:
                to_tag = self.ids.to_tag(msg) if msg.to_tag is None else None
            except SipParseError:
                to_tag = None
            try:
                extra = ("Unsupported: " + ", ".join(msg.option_tags("proxy-require")),) if (
                    err.status == 420
                ) else ()
                data = build.response(
                    msg, err.status, err.reason, to_tag=to_tag, top_via=top_via, extra=extra
                )
                self.outbox.append((reply, data))
                answered = True
            except SipParseError:
                answered = False
        self.events.append(ParseFailed(err.status, err.detail, flow, answered))

    # ------------------------------------------------------------------ requests
    def _on_request(self, msg: Message, flow: Flow, now: float) -> None:
        method = msg.method or ""
        key = build.txn_id(msg)
        if method == "ACK":
            st = self.servers.get(table_key(key, "INVITE"))
            if st is not None and st.state in (COMPLETED, CONFIRMED):
                self._ack_absorbed(st, now)
                return
            self._route_ack(msg, flow, key, now)
            return
        st = self.servers.get(table_key(key, method))
        if st is not None:
            if st.last is not None:
                self.outbox.append((st.reply_to, st.last))
            return  # retransmission: answered again or absorbed
        msg.check_request()  # a malformed R-URI, From or To: 400 before any state exists
        from_core = self._is_core(msg, flow)
        if method == "CANCEL":
            self._on_cancel(msg, flow, key, now, from_core)
            return
        if not from_core and not (
            self._admitted(msg, flow, now) if msg.to_tag is None
            else self._in_dialog_admitted(msg, flow, now)
        ):
            return  # refused before any transaction: nothing kept, nothing retransmitted
        s = self.settings
        size = self.received
        kind = ""
        charged: Dialog | None = None
        held = self.held_bytes + size
        if (len(self.servers) >= s.max_transactions or held > s.max_transaction_bytes) and (
                # a request within a call in progress goes on, up to a quarter more bytes
                held > s.max_transaction_bytes + (s.max_transaction_bytes >> 2)
                or not self._in_progress(msg, flow, from_core)):
            kind = "limit_transactions" if len(self.servers) >= s.max_transactions \
                else "limit_transaction_bytes"
        elif msg.to_tag is None:
            if method == "INVITE":
                if len(self.dialogs) >= s.max_dialogs:
                    kind = "limit_dialogs"
                elif self.dialog_bytes + size > s.max_dialog_bytes:
                    kind = "limit_dialog_bytes"
        elif not from_core and method != "BYE":
            # a request within a call from its outside party: the call's own allowance, so
            # that one call's large re-INVITEs or INFOs cannot fill the table for all calls
            charged = self.table.of(msg, False)[0]
            if charged is not None:
                if charged.request_bytes + size > s.max_call_request_bytes:
                    kind = "limit_call_bytes"
                else:
                    charged.request_bytes += size
        if kind:
            self._busy(msg, flow, kind)
            return
        st = ServerTxn(key, method, msg, flow, self.router.reply_flow(msg, flow))
        st.size = size
        st.charged = charged
        self.held_bytes += size
        self.servers[table_key(key, method)] = st
        if method == "INVITE":
            self._respond(st, 100, now)
        try:
            self._on_new_request(st, msg, flow, now)
        except SipParseError as err:
            self._found_bad(st, err, now)

    def _found_bad(self, st: ServerTxn, err: SipParseError, now: float) -> None:
        """A request found bad only while it was decided or forwarded (a Route, a Diversion,
        a Contact to anonymise, ...), at once or when a decision that waited comes back:
        answer on the transaction, so its timers clean it up like any other, and end the
        call it had started (its slots freed), or give back what its decision took."""
        if st.state in (PROCEEDING, DECIDING) and st.client is None:
            if st.dialog is not None:
                st.dialog.status = err.status
                self._end_dialog(st.dialog, "failed", now)
            elif st.call is not None:
                self._forget_pending(st, now)
            self._respond(st, err.status, now, err.reason)
        self.events.append(ParseFailed(err.status, err.detail, st.flow, True))

    def _on_new_request(self, st: ServerTxn, msg: Message, flow: Flow, now: float) -> None:
        """A request that opened a new server transaction: validate, route, decide, forward."""
        method = st.method
        status = self.router.validate(msg)
        if status:
            if status == 200:  # OPTIONS to sipguard itself (RFC 3261 §11.2)
                self._respond(st, 200, now,
                              extra=("Accept: application/sdp", self._allow_in_calls))
            else:
                extra: tuple[str, ...] = ()
                if status == 420:
                    extra = ("Unsupported: " + ", ".join(msg.option_tags("proxy-require")),)
                self._respond(st, status, now, extra=extra)
            return
        initial = msg.to_tag is None
        from_core = self._is_core(msg, flow)
        dialog: Dialog | None = None
        side = ""
        if not initial:
            # from outside, _in_dialog_admitted has checked it is the call's outside party's
            dialog, side = self.table.of(msg, from_core)
            if dialog is not None:
                self._saw_cseq(dialog, side, msg)
                if not from_core:
                    self._follow_nat(dialog, side, msg, flow)
                elif method == "BYE":
                    leg = _answered_leg(dialog, side, msg)
                    if leg is not None:
                        # the core has ended its side already: so does sipguard, before
                        # routing the BYE on (a party's Contact that cannot be reached holds
                        # no slot)
                        self._leg_ended(dialog, leg, f"bye_{side}", now)
        target, start_line, route_line = self.router.preprocess_route(msg, flow, initial,
                                                                      from_core)
        if dialog is not None and not from_core:
            start_line, route_line = self._pinned_route(dialog, msg, start_line, route_line,
                                                        flow)
        elif not initial and not from_core:  # a subscription's (see _in_dialog_admitted)
            start_line, route_line = self._subscription_route(msg, start_line, route_line,
                                                              flow)
        if target is None:
            self._respond(st, 404, now)
            return
        if dialog is not None and dialog.core is not None and target is self.settings.core:
            target = dialog.core  # the core the call went to, whatever a reload says now
        if initial and start_line is not None and not from_core:
            # sipguard's own (Record-Route) URI as the target of a new request, the real one
            # in the last Route: only a dialog's strict routing does that (RFC 3261 §16.4). A
            # new call would steer the core to a number the policy never saw as the callee.
            self._respond(st, 400, now, "Strict-Routed Initial Request")
            self.events.append(Dropped("strict_routed_initial", msg.call_id, flow))
            return
        if from_core and dialog is not None and dialog.party is not None:
            target = self._toward_party(dialog, dialog.party, target)
        if method == "INVITE" and initial and from_core:
            # A call the core places: no policy, no limits; the dialog is kept so that the
            # outside party's in-dialog requests are recognised. A proxy core may send a call
            # that came in back out, with its Call-ID and From tag: a dialog of its own
            # (dialog_key's outbound), beside the first. Twice while that one is up: merged.
            if dialog_key(msg.call_id, msg.from_tag or "", True) in self.dialogs:
                self._respond(st, 482, now, "Loop Detected")
                self.events.append(Dropped("merged_request", msg.call_id, flow))
                return
            self._start_dialog(st, CallInfo(msg, flow, now), now, target, outbound=True)
            if st.dialog is not None:  # the party's requests go to the core's Contact
                self._pin(st.dialog, msg.from_tag or "", msg, True)
            self._forward(st, target, start_line, route_line, now, record_route=True)
            return
        if method == "INVITE" and initial:
            dialog_id = dialog_key(msg.call_id, msg.from_tag or "")
            if dialog_id in self.dialogs or dialog_id in self.deciding:
                # RFC 3261 §8.2.2.2: the same Call-ID and From tag as a call that came in and
                # is in progress, on another transaction — a merged request, not a second
                # call; also when it carries a Via of sipguard's (a spiral back in from
                # outside would be a second dialog under the same key, whose in-dialog
                # requests could not be told from the first's).
                self._respond(st, 482, now, "Loop Detected")
                self.events.append(Dropped("merged_request", msg.call_id, flow))
                return
            st.next_hop = (target, start_line, route_line)
            _rr_entries(msg)  # a Record-Route that does not parse: 400 before any decision
            # The id its limits are held under (with state.backend redis / shared_memory, in
            # every counter key it takes): of fixed size, however long the Call-ID, tag and
            # branch the caller chose, and keyed by this process's secret, so the same INVITE
            # sent to two instances (or two workers) is two calls there, never one slot.
            call = CallInfo(msg, flow, now, self.ids.digest("lease", dialog_id, st.key))
            st.call = call
            st.state = DECIDING
            self.pending[id(call)] = st
            self.deciding.add(dialog_id)
            self.screen_note = None  # the decision reports it
            verdict = self.admission.decide(call, now)
            if verdict is not None:
                self.pending.pop(id(call), None)
                self._apply_verdict(st, call, verdict, now)
            return
        if method == "BYE" and dialog is not None and not from_core and \
                _answered_leg(dialog, side, msg) is not None:
            # The outside party's BYE ends the call (or one leg of a forked one) once the
            # core has answered it: a BYE the core never takes frees no slot while the call
            # is still up there.
            st.ends, st.end_reason = dialog, f"bye_{side}"
        if method == "NOTIFY" and not initial and self.subscriptions.table:
            # a NOTIFY of the core's subscription, or the core's of a party's: its
            # Subscription-State moves its end
            self.subscriptions.extend(notified(msg, from_core), lasts(msg, now),
                                      longer=from_core)
        if method == "REFER" and not from_core:
            # RFC 3515 §2.4.1: exactly one Refer-To value, or 400 — a second one (or one that
            # does not parse) would be a target the check below never read
            lines = msg.indexes("refer-to")
            try:
                targets = len(parse_name_addr_list(msg.value_at(lines[0]))) \
                    if len(lines) == 1 else 0
            except SipParseError:
                targets = 0
            if targets != 1:
                self._respond(st, 400, now, "Bad Refer-To")
                self.events.append(Dropped("bad_refer_to", msg.call_id, flow))
                return
            # the core would call its Refer-To target on the party's word: not a suspended one
            verdict = self.admission.screen_transfer(msg, flow, now)
            if verdict is not None:
                self.events.append(Screened(method, flow, verdict))
                if verdict.action != "accept":
                    self._respond(st, verdict.status or 403, now, verdict.phrase,
                                  extra=verdict.headers)
                    return
        if (initial and method in SUBSCRIPTION_CREATING) or method == "REFER":
            self._subscribing(msg, from_core, target, flow, now, dialog)
        if dialog is None and not initial and not from_core:
            # a NOTIFY of the core's subscription made within a call, maybe after the call
            # ended: the caller as that call checked it (_in_dialog_admitted refused another)
            dialog, side = self._subscription_call(msg), "caller"
        self._forward(st, target, start_line, route_line, now, record_route=initial
                      and method in DIALOG_CREATING,
                      edits=self._pai_edits(msg, flow, dialog, from_core, side),
                      anonymise=self._withheld(dialog, side, from_core))
        if from_core and dialog is not None and not dialog.outbound and st.client is not None:
            st.client.answered_by = dialog  # the caller answers it: see _answer_edits

    def _pai_edits(self, msg: Message, flow: Flow, dialog: Dialog | None,
                   from_core: bool, side: str) -> tuple[tuple[str, str | None], ...]:
        """RFC 3325 §5: a P-Asserted-Identity from outside the trust domain — a peer with
        ``trust_pai: false``, an unknown source, a call whose caller's peer was one — is
        removed from a request before it goes on (an INVITE's own: see _apply_verdict); and
        from the caller's later requests in a call (a re-INVITE, an UPDATE) one that asserts
        another number than the caller its INVITE was checked as — nobody checked that one."""
        if from_core or not msg.has("p-asserted-identity"):
            return ()
        if (dialog is not None and dialog.pai_untrusted) or \
                not self.admission.asserts_identity(flow):
            return _NO_PAI
        if dialog is not None and not dialog.outbound and side == "caller" and \
                not self.admission.asserts_caller(dialog, msg):
            return _NO_PAI
        return ()

    def _answer_edits(self, msg: Message, flow: Flow, ct: ClientTxn
                      ) -> dict[int, bytes | None] | None:
        """The header lines of a response from outside to replace or remove before it goes
        on: a P-Asserted-Identity whose source asserts no identity (RFC 3325 §5), or — from
        the caller of a call that came in, answering the core's re-INVITE, UPDATE, BYE … —
        one that is not the caller the call was checked as, whatever tags the answer carries
        (a core may update the caller's shown identity from it); for a call whose caller is
        withheld, its identity (Contact, PAI, RPID) as on its requests; and all that is taken
        off every request from outside (_strip_owned: sipguard's own headers,
        ``sip.strip_headers``, PAI values of another number or none readable, verstat)."""
        if self.router.is_core(flow) or flow.addr[0] in self.former_cores:
            return None
        dialog = ct.answered_by
        anonymise = dialog.anonymise if dialog is not None else None
        out: dict[int, bytes | None] = {}
        # as on requests: sipguard's own headers, sip.strip_headers, one identity, no verstat
        self._strip_owned(msg, out, flow)
        if ct.route_tail is not None and 100 < msg.status < 300:
            self._route_tail(msg, ct.route_tail, out, flow)
        if not msg.has("p-asserted-identity") and anonymise is None:
            return out
        pai = msg.indexes("p-asserted-identity")
        if anonymise is not None:
            for name, line in _anonymised_edits(msg, (), anonymise):
                if name in ("from", "privacy"):
                    continue  # a response's From is the core's side; To is what the core sent
                idx = msg.indexes(name)
                for i in idx:
                    out[i] = None
                if idx and line is not None:
                    out[idx[0]] = line.encode("utf-8", "surrogateescape")
            if not anonymise.keep_pai:
                return out
        if not pai or out.get(pai[0], b"") is None:
            return out  # none, or removed already (sip.strip_headers names it)
        if not self.admission.asserts_identity(flow) or (
                dialog is not None and not self.admission.asserts_caller(dialog, msg)):
            out.update(dict.fromkeys(pai))
        return out

    def _route_tail(self, msg: Message, tail: tuple[str, ...], out: dict[int, bytes | None],
                    flow: Flow) -> None:
        """An answer from outside that makes a dialog for a request of the core's: its
        Record-Route must end with the entries that request left with (``tail``: sipguard's
        own, then the core side's; RFC 3261 §16.6 step 4, §12.1.2). The core's route set is
        that list reversed, so an entry written below sipguard's — or sipguard's left out —
        would send the core's ACK, re-INVITE and BYE of the call to a host the outside party
        chose, around sipguard. Otherwise the list is rewritten: what the outside side put
        above sipguard's first entry, then ``tail`` (counted ``noticed_record_route_repaired``)."""
        try:
            entries = msg.record_routes
        except SipParseError:
            entries = []
        raws = [na.raw.strip() for na in entries]
        n = len(tail)
        if len(raws) >= n and tuple(raws[len(raws) - n:]) == tail:
            return
        is_ours = self.router.is_ours
        top = next((i for i, na in enumerate(entries) if is_ours(na.uri)), None)
        above = raws[:top] if top is not None else \
            [raw for na, raw in zip(entries, raws, strict=True) if not is_ours(na.uri)]
        line = header_line("Record-Route", ", ".join([*above, *tail]))
        indexes = msg.indexes("record-route")
        for i in indexes:
            out[i] = None
        if indexes:
            out[indexes[0]] = line
        else:
            out[APPEND] = line
        self.events.append(Noticed("record_route_repaired", msg.call_id, flow))

    @staticmethod
    def _withheld(dialog: Dialog | None, side: str, from_core: bool) -> Anonymise | None:
        """The anonymisation of a call whose caller's identity is withheld from the core,
        for an in-dialog request of the caller's (ACK, BYE, re-INVITE ...): as on its INVITE."""
        if dialog is None or from_core or dialog.anonymise is None:
            return None
        return dialog.anonymise if side == ("callee" if dialog.outbound else "caller") else None

    def _admitted(self, msg: Message, flow: Flow, now: float, methods: bool = True) -> bool:
        """Screen an out-of-dialog request from outside before it gets a transaction: the
        policy first (unknown source, suspended number), then the allowed methods (unless
        ``methods`` is False: a CANCEL or an in-dialog request that matched nothing). A refusal
        is one stateless answer (or none), never retransmitted: a spoofed source gets at
        most one message back, about the size of the one it sent."""
        method = msg.method or ""
        verdict = self.admission.screen(msg, flow, now)
        allowed = self.settings.allow_methods
        if verdict is None and methods and method not in allowed and "*" not in allowed:
            verdict = Verdict("reject", rule="methods", reason="method_not_allowed",
                              status=405, phrase="Method Not Allowed",
                              headers=(self._allow,), sample=f"methods:{flow.addr[0]}")
        if verdict is None or verdict.action == "accept":
            if verdict is not None:  # monitored
                if method == "INVITE":
                    self.screen_note = Screened(method, flow, verdict)  # see receive
                else:
                    self.events.append(Screened(method, flow, verdict))
            return True
        self.events.append(Screened(method, flow, verdict))
        if verdict.action == "reject":
            self._stateless(msg, flow, verdict.status or 403, verdict.phrase or None,
                            verdict.headers)
        return False

    @property
    def _hostports(self) -> tuple[str, ...]:
        """sipguard's own host:port, as its Record-Route entries name them."""
        return tuple(local.hostport for local in self.settings.locals)

    @property
    def _allow(self) -> str:
        """The Allow header of sipguard's own answers: what it takes out of dialog."""
        allowed = self.settings.allow_methods
        if "*" in allowed:
            return "Allow: ACK, BYE, CANCEL, INFO, INVITE, MESSAGE, NOTIFY, OPTIONS, PRACK, " \
                   "REFER, SUBSCRIBE, UPDATE"
        return "Allow: " + ", ".join(sorted({*allowed, "ACK", "CANCEL"}))

    @property
    def _allow_in_calls(self) -> str:
        """The Allow header of the answer to an OPTIONS for sipguard itself: what it takes out
        of dialog, and the requests it passes within a call (a trunk's capability probe reads
        UPDATE and PRACK there)."""
        allowed = self.settings.allow_methods
        if "*" in allowed:
            return self._allow
        return "Allow: " + ", ".join(sorted({*allowed, *_IN_CALLS}))

    def _in_dialog_admitted(self, msg: Message, flow: Flow, now: float) -> bool:
        """A request from outside with a To tag may open a transaction only when it belongs
        to a live call and comes from that call's outside party. Else it is refused like an
        out-of-dialog request: screened (an unknown source hears what the policy says, or
        nothing), then one stateless 481 (no such call) or 403 (not its party) — no
        transaction, so a stream of made-up dialogs fills no table."""
        dialog, side = self.table.of(msg, False)
        refusal = self._not_party(dialog, side, flow, msg)
        if not refusal:
            method = msg.method or ""
            allowed = self.settings.allow_methods
            if method in _IN_DIALOG or "*" in allowed or (
                    method in allowed and method not in _NEVER_IN_DIALOG):
                return True
            # a REGISTER, PUBLISH or unknown method riding a call's tags (RFC 3261 §10,
            # RFC 3903): no method of a call, refused as out of dialog
            self._stateless(msg, flow, 405, "Method Not Allowed", (self._allow_in_calls,))
            self.events.append(Dropped("in_dialog_method", f"{method} {msg.call_id}", flow))
            return False
        sub = self._in_subscription(msg, flow, now) if dialog is None and \
            self.subscriptions.table else None
        if sub is not None:
            if sub.call is None or not _shows_another(msg, sub.call):
                return self._admitted(msg, flow, now, methods=False)
            refusal = 403  # the call's caller showing another number, after the call too
        if not self._admitted(msg, flow, now, methods=False):
            return False  # an unknown source learns nothing, not even that the call exists
        self._stateless(msg, flow, refusal, None)
        self.events.append(Dropped("in_dialog_refused", f"{refusal} {msg.call_id}", flow))
        return False

    def _in_subscription(self, msg: Message, flow: Flow, now: float) -> Subscription | None:
        """The subscription sipguard forwarded the initial request of that an in-dialog
        request from outside belongs to, from its outside party's host: a NOTIFY for the
        core's, a refresh of a party's own; None for none."""
        if msg.method == "NOTIFY":
            key = notified(msg)
        elif msg.method == "SUBSCRIBE" and ({"SUBSCRIBE", "*"} & self.settings.allow_methods):
            key = ("party", msg.call_id, msg.from_tag or "")
        else:
            return None
        return self.subscriptions.match(key, flow.addr[0], now)

    def _subscription_call(self, msg: Message) -> Dialog | None:
        """For a NOTIFY from outside of the core's subscription made within a call that came
        in: who that call's caller was checked as (Subscription.call), for its identity
        edits; else None."""
        if msg.method != "NOTIFY" or not self.subscriptions.table:
            return None
        sub = self.subscriptions.table.get(notified(msg))
        return sub.call if sub is not None else None

    def _subscribing(self, msg: Message, from_core: bool, target: Flow, flow: Flow,
                     now: float, dialog: Dialog | None) -> None:
        """A SUBSCRIBE or REFER forwarded: a subscription for GRACE_S until its answer — a
        notifier may send its first NOTIFY before its 2xx (RFC 6665 §4.1.2.4), and a lost
        2xx comes again later; its 2xx makes it last (:meth:`_subscribed`), a refusal ends
        it. An existing one (a refresh) is left as it is."""
        subs = self.subscriptions
        key = subscriber(msg, from_core)
        if key in subs.table:
            return
        host = (target if from_core else flow).addr[0]
        if not _is_ip(host):
            host = ""  # a host name: any address until one answers (a NOTIFY may overtake it)
        pin_target, pin_routes = self._sub_pin(msg, from_core, dialog)
        if subs.add(key, host, now + GRACE_S, now, True, pin_target, pin_routes,
                    _checked_identity(dialog) if from_core else None):
            self.events.append(Noticed("subscription_forgotten", f"{len(subs)} subscriptions",
                                       flow))

    def _sub_pin(self, msg: Message, from_core: bool, dialog: Dialog | None
                 ) -> tuple[str, tuple[NameAddr, ...]]:
        """Where the party's NOTIFYs of the core's SUBSCRIBE or REFER go: the request's Contact
        and the call's route set (a REFER within a call) or the request's Record-Route
        entries (a new one: all of them are the core side's); ("", ()) for a party's."""
        if not from_core:
            return "", ()
        target = _contact_target(msg)
        if dialog is not None:
            tag = msg.from_tag or ""
            if tag == dialog.pin_tag:
                return target or dialog.pin_target, dialog.pin_routes
            pin = dialog.forks.get(tag) if dialog.forks is not None else None
            if pin is not None:
                return target or pin[0], pin[1]
        routes: tuple[NameAddr, ...] = ()
        if msg.has("record-route"):
            try:
                routes = tuple(_record_routes(msg))
            except SipParseError:
                routes = ()
        return target or _core_uri(self.settings.core), routes

    def _refused_subscription(self, st: ServerTxn) -> None:
        """A new SUBSCRIBE or REFER refused: its provisional subscription goes."""
        msg = st.msg
        if msg is None or (msg.to_tag is not None and msg.method != "REFER"):
            return
        self.subscriptions.drop_provisional(subscriber(msg, self._is_core(msg, st.flow)))

    def _subscribed(self, st: ServerTxn, now: float, answer: bytes) -> None:
        """A SUBSCRIBE or REFER answered 2xx (``answer``: the far end took it): a new
        subscription — the outside party's host is where the core's request went, or where a
        party's came from; a REFER within a call too, whose NOTIFYs may outlive the call (RFC
        3515 §2.4.4) — or a refresh moving one's end, for as long as the 2xx granted. Nothing
        for a request the far end refused."""
        msg, ct = st.msg, st.client
        if msg is None or ct is None:
            return
        from_core = self._is_core(msg, st.flow)
        subs = self.subscriptions
        key = subscriber(msg, from_core)
        if msg.to_tag is None or msg.method == "REFER":
            host = (ct.flow if from_core else st.flow).addr[0]
            dialog = self.table.of(msg, from_core)[0] if msg.to_tag is not None else None
            pin_target, pin_routes = self._sub_pin(msg, from_core, dialog)
            if subs.add(key, host, granted(answer, lasts(msg, now), now), now, False,
                        pin_target, pin_routes, _checked_identity(dialog) if from_core else None):
                self.events.append(Noticed("subscription_forgotten",
                                           f"{len(subs)} subscriptions", st.flow))
        else:  # a refresh (Expires: 0 — an un-SUBSCRIBE — leaves GRACE_S)
            subs.extend(key, granted(answer, lasts(msg, now), now))

    def _in_progress(self, msg: Message, flow: Flow, from_core: bool) -> bool:
        """True for a request within a live call from one of its sides while the transaction
        table is full: up to ``max_dialogs`` transactions more, it goes on. A full table then
        refuses new calls and out-of-dialog requests, and the calls in progress can still end
        — a BYE refused would leave the call up at the core and its slots held. An answered
        transaction is held 64*T1 (32 s), so a burst of calls fills the table well before
        ``max_dialogs`` calls are up; the headroom fits one BYE for each of those."""
        s = self.settings
        if msg.to_tag is None or len(self.servers) >= s.max_transactions + s.max_dialogs:
            return False
        dialog, side = self.table.of(msg, from_core)
        if dialog is None:
            return False
        return from_core or not self._not_party(dialog, side, flow, msg)

    def _stateless(self, msg: Message, flow: Flow, status: int, phrase: str | None,
                   extra: tuple[str, ...] = ()) -> None:
        """One response, sent once, with no transaction behind it."""
        data = build.response(msg, status, phrase, to_tag=self.ids.to_tag(msg),
                              top_via=build.stamped_via(msg.top_via, flow.addr), extra=extra)
        self.outbox.append((self.router.reply_flow(msg, flow), data))

    def _busy(self, msg: Message, flow: Flow, kind: str) -> None:
        """A table is full (``kind``: ``limit_transactions``, ``limit_dialogs``): the new
        request hears 503 + Retry-After; calls in progress go on."""
        self.events.append(Dropped(kind, msg.call_id, flow))
        self._stateless(msg, flow, 503, "Service Unavailable",
                        (f"Retry-After: {self.settings.busy_retry_after_s}",))

    def _not_party(self, dialog: Dialog | None, side: str, flow: Flow, msg: Message) -> int:
        """0 when an in-dialog request from outside may go on; else the status to refuse it
        with: 481 for a dialog sipguard did not set up, 403 when it does not come from that
        dialog's outside party (its address and port over UDP; over TCP or TLS its host,
        whatever transport the call came in on — connections are renewed, and a UA sends a
        request too big for UDP over TCP, RFC 3261 §18.1.1 — but a call that came over TLS
        only over TLS). A UDP party behind NAT (``Dialog.behind_nat``) may also send from
        another port of its address — its NAT re-mapped it — with the call's own tags (see
        :meth:`_follow_nat`)."""
        if dialog is None:
            return 481
        refusal = self._not_from_party(dialog, side, flow, msg)
        if refusal:
            return refusal
        if not dialog.outbound and msg.method not in ("ACK", "BYE") and \
                _shows_another(msg, dialog):
            # a caller showing another number (or user) in From than its INVITE was checked
            # with — From does not change within a dialog (RFC 3261 §12.2.1.1; RFC 4916's
            # change is the called side's), and a core may read the caller from a re-INVITE;
            # the call's ACK and BYE pass whatever they show (refused, the call stays up)
            return 403
        # tags the core side never answered with (made up, or before any answer): no dialog
        tag = msg.to_tag or ""
        forks = dialog.forks
        return 0 if tag == dialog.pin_tag or (forks is not None and tag in forks) else 481

    def _not_from_party(self, dialog: Dialog, side: str, flow: Flow, msg: Message) -> int:
        """:meth:`_not_party`'s check of the sender: 0, or 403."""
        outside = "callee" if dialog.outbound else "caller"
        if side != outside:
            return 403  # speaks as the core's side, but from outside
        party = dialog.party
        if party is None:
            return 0
        if party.transport == "tls" and flow.transport != "tls":
            return 403  # no downgrade, not even from another address of the same peer
        if (flow.addr == party.addr and flow.transport == party.transport) or (
            flow.transport != "udp" and flow.addr[0] == party.addr[0]
        ):
            if party.transport == "tls" and flow.conn != party.conn and \
                    dialog.peer is not None and not self.admission.same_party(dialog, flow):
                # another TLS connection of the host, which is not its peer's — a peer bound
                # to its certificate (tls_subject) is that peer only with it
                return 403
            return 0
        if dialog.behind_nat and flow.transport == "udp" and flow.addr[0] == party.addr[0] \
                and _names(dialog, side, msg):
            return 0
        return 0 if self.admission.same_party(dialog, flow) else 403

    def _follow_nat(self, dialog: Dialog | None, side: str, msg: Message, flow: Flow) -> None:
        """A UDP party behind NAT that now sends from another port of its address, with the
        call's own tags: its NAT re-mapped the call's flow (a binding that timed out during
        a long call). The core's requests follow it there, as they followed the first one
        (:meth:`_toward_party`); a request with other tags moves nothing."""
        if dialog is None or not dialog.behind_nat or flow.transport != "udp":
            return
        party = dialog.party
        if party is None or party.transport != "udp" or flow.addr == party.addr \
                or flow.addr[0] != party.addr[0] or not _names(dialog, side, msg):
            return
        dialog.party = Flow("udp", flow.addr, flow.local, None)
        self.events.append(Noticed("nat_rebound", f"{msg.call_id} from port {party.addr[1]}",
                                   flow))

    @staticmethod
    def _toward_party(dialog: Dialog, party: Flow, target: Flow) -> Flow:
        """A request from the core to a party that came in over TCP reuses that party's own
        connection while it is open (a phone or PBX behind NAT accepts nothing else); the
        pool falls back to ``target`` when it has closed. Over UDP, a party behind NAT
        (``Dialog.behind_nat``) gets it at the address and port it sends from, through the
        socket it sent to; any other at its Contact (``target``)."""
        if party.transport == "udp":
            if dialog.behind_nat:
                return Flow("udp", party.addr, party.local, None)
            return target
        if party.conn is None:
            return target
        return Flow(party.transport, target.addr, party.local, party.conn)

    def _apply_verdict(self, st: ServerTxn, call: CallInfo, verdict: Verdict, now: float) -> None:
        self.events.append(InviteDecided(call, verdict))
        if verdict.action != "accept":
            self._abandon(call, now)
            if verdict.action == "reject":
                self._respond(st, verdict.status or 403, now, verdict.phrase or None,
                              verdict.headers)
            else:
                self._terminate_server(st, now)
            return
        msg = _request(st)
        hop = st.next_hop
        st.next_hop = None
        if hop is None:
            hop = self.router.preprocess_route(msg, st.flow, True)
        target, start_line, routes = hop
        if target is None:
            self._abandon(call, now)
            self._respond(st, 404, now)
            return
        key = dialog_key(call.call_id, msg.from_tag or "")
        if key in self.dialogs:  # kept out by the merged-request check; a call never replaces one
            self._abandon(call, now)
            self._respond(st, 482, now, "Loop Detected")
            return
        st.state = PROCEEDING
        self.deciding.discard(key)
        call.settled = True
        self._start_dialog(st, call, now, st.flow, outbound=False)
        if st.dialog is not None:
            st.dialog.anonymise = verdict.anonymise  # every later request of the caller too
        edits = verdict.replace_headers
        if msg.has("p-asserted-identity") and all(name != "p-asserted-identity" for name, _ in edits) \
                and (call.pai_untrusted or not self.admission.asserts_identity(st.flow)):
            edits = (*edits, *_NO_PAI)  # RFC 3325 §5, whatever rules run (monitored ones too)
        self._forward(st, target, start_line, routes, now, record_route=True,
                      extra=verdict.forward_headers, edits=edits,
                      anonymise=verdict.anonymise)

    def _core_side(self, ct: ClientTxn) -> bool:
        """A keep-alive's client transaction went to the call's core (not its outside party)."""
        probe = ct.probe
        core = probe.dialog.core if probe is not None else None
        return flow_is_core(ct.flow, core or self.settings.core)

    def _start_dialog(self, st: ServerTxn, call: CallInfo, now: float, party: Flow,
                      outbound: bool) -> None:
        msg = _request(st)
        dialog = Dialog(
            call_id=call.call_id,
            caller_tag=msg.from_tag or "",
            callee_tag=None,
            caller=call.caller,
            callee=call.callee,
            diverters=call.diverters,
            peer=call.peer,
            source=st.flow.addr,
            started=now,
            expires=now + self.settings.max_dialog_lifetime,
            lease=call.lease,
            party=party,
            outbound=outbound,
            shown=None if outbound else call.shown,
        )
        dialog.core = self.settings.core
        dialog.pai_untrusted = call.pai_untrusted
        if not outbound and party.transport == "udp":
            dialog.behind_nat = _behind_nat(msg, party)
        if not self.table.add(dialog):
            return  # not reached: the callers refuse a request whose dialog is live (482)
        dialog.size = st.size
        self.dialog_bytes += st.size
        if not outbound:
            dialog.from_user = _checked_from(msg, dialog)
            dialog.from_display = _display_key(msg.from_.display)
            dialog.caller_rr = _rr_entries(msg)  # (read before: see _on_new_request)
        st.dialog = dialog
        if not outbound:
            self.admission.dialog_started(dialog, now)
        self.events.append(DialogStarted(dialog))
        self._arm_sweep(now)

    # ------------------------------------------------------------------ forwarding
    def _forward(
        self,
        st: ServerTxn,
        target: Flow,
        start_line: bytes | None,
        routes: list[NameAddr] | None,
        now: float,
        *,
        record_route: bool,
        extra: tuple[str, ...] = (),
        edits: tuple[tuple[str, str | None], ...] = (),
        anonymise: Anonymise | None = None,
    ) -> None:
        msg = _request(st)
        branch = self.ids.branch(st.key + "|" + st.method, build.loop_hash(self.ids, msg))
        data = self._forwarded_bytes(msg, st.flow, self._stamped(st), target, branch, start_line,
                                     routes, record_route, extra, edits, anonymise)
        if len(data) > MAX_DATAGRAM and target.transport == "udp":
            # grown past one datagram by sipguard's Via and Record-Route (a request near the
            # size limit): no UDP send can carry it (RFC 3261 §18.1.1's switch to TCP is not
            # made: the core's transport is configured)
            raise SipParseError(513, f"{len(data)} bytes once forwarded: too large for UDP")
        ct = ClientTxn(branch, st.method, data, target, st)
        st.client = ct
        self.clients[table_key(branch, st.method)] = ct
        self.outbox.append((target, data))
        s = self.settings
        if record_route and s.record_route and msg.to_tag is None and \
                (st.method == "INVITE" or st.method in SUBSCRIPTION_CREATING) and \
                self._is_core(msg, st.flow):
            ct.route_tail = tuple(na.raw.strip() for na in ct.sent_msg().record_routes)
        if st.method == "INVITE":
            if target.transport == "udp":
                ct.interval = s.t1
                ct.timer = self.timers.add(now + s.t1, self._on_timer_a, ct)
            ct.timeout = self.timers.add(now + 64 * s.t1, self._on_timer_b, ct)
        else:
            self._arm_non_invite(ct, now)

    def _arm_non_invite(self, ct: ClientTxn, now: float) -> None:
        """A non-INVITE client transaction just sent: Timer E (UDP) and Timer F (RFC 3261
        §17.1.2)."""
        s = self.settings
        if ct.flow.transport == "udp":
            ct.interval = s.t1
            ct.timer = self.timers.add(now + s.t1, self._on_timer_e, ct)
        ct.timeout = self.timers.add(now + 64 * s.t1, self._on_timer_f, ct)

    def _forwarded_bytes(
        self,
        msg: Message,
        source: Flow,
        stamped: str,
        target: Flow,
        branch: str,
        start_line: bytes | None,
        routes: list[NameAddr] | None,
        record_route: bool,
        extra: tuple[str, ...],
        edits: tuple[tuple[str, str | None], ...] = (),
        anonymise: Anonymise | None = None,
    ) -> bytes:
        """The request as it leaves: RFC 3261 §16.6 steps 3–8 spliced into the raw lines,
        then a verdict's header edits (``edits`` replaced or removed, ``extra`` appended), then
        ``anonymise`` (the caller's identity withheld; see :mod:`sipguard.contract`).
        ``stamped`` is the top Via with received/rport filled in."""
        if anonymise is not None:
            edits = _anonymised_edits(msg, edits, anonymise)
        locals_ = self.settings.locals
        out_local = locals_[target.local] if target.local < len(locals_) else locals_[0]
        if out_local.transport != target.transport:
            out_local = self.router.local_for(target.transport, target.addr[0])
        prepend = [build.our_via(out_local, target.transport, branch)]
        if record_route and self.settings.record_route:
            in_local = self.settings.locals[source.local]
            # RFC 5658 double Record-Route when the call changes listener or transport: the
            # entry on top faces the callee, the one below faces the caller.
            inward = build.record_route(in_local, source.transport)
            if (out_local.index, target.transport) != (in_local.index, source.transport):
                outward = build.record_route(out_local, target.transport)
                if outward != inward:  # (one sip.advertise name for both: one entry)
                    prepend.append(outward)
            prepend.append(inward)
        replace: dict[int, bytes | None] = {}
        append: list[bytes] = []
        # Top Via: received / rport (RFC 3261 §18.2.1, RFC 3581 §4).
        via_idx = msg.indexes("via")[0]
        if stamped != msg.top_via.raw:
            rest = [str(v) for v in parse_via_list(msg.value_at(via_idx))[1:]]
            replace[via_idx] = header_line("Via", ", ".join([stamped, *rest]))
        mf = msg.max_forwards
        if mf is None:
            append.append(b"Max-Forwards: 70")
        else:
            replace[msg.indexes("max-forwards")[0]] = f"Max-Forwards: {mf - 1}".encode()
        if routes is not None:
            route_idx = msg.indexes("route")
            route = header_line("Route", ", ".join(str(r) for r in routes)) if routes else None
            for i in route_idx[1:]:
                replace[i] = None
            if route_idx:
                replace[route_idx[0]] = route
            elif route is not None:
                append.append(route)  # a route set the request left out (Dialog.pin_routes)
        if msg.content_length is None:
            append.append(f"Content-Length: {len(msg.body)}".encode())
        outside = not self._is_core(msg, source)
        if outside:
            self._strip_owned(msg, replace, source)
        for name, line in edits:
            if name in PROXY_OWNED and (anonymise is None or name != "from"):
                continue
            new = None if line is None else line.encode("utf-8", "surrogateescape")
            if outside and new is not None and b"?" in new and name in uri_headers.WITH_CONTACT:
                # a rule's rewrite (verstat on P-Asserted-Identity) is made from the URI as
                # the party wrote it: what _strip_owned took off that header must stay off
                new = uri_headers.without_unsafe_headers(new, self.settings.strip_headers)[0]
            idx = msg.indexes(name)
            if idx:
                replace[idx[0]] = new
                for i in idx[1:]:
                    replace[i] = None
            elif new is not None:
                append.append(new)
        append.extend(e.encode("utf-8", "surrogateescape") for e in extra)
        if start_line is None and not msg.start_line.endswith(b" SIP/2.0"):
            # "sip/2.0" is read (any case) but sent upper-case only (RFC 3261 §7.1)
            start_line = msg.start_line[: msg.start_line.rfind(b" ") + 1] + b"SIP/2.0"
        return msg.serialize(prepend=prepend, replace=replace, append=append,
                             start_line=start_line)

    def _strip_owned(self, msg: Message, replace: dict[int, bytes | None], flow: Flow) -> None:
        """What only sipguard may say, removed from a request from outside whatever rules are
        on: its verdict headers (and ``sip.strip_headers``), the same and what else a receiver
        must not take from outside embedded as headers in the URIs of Refer-To, Contact ...
        (:mod:`sipguard.sip.uri_headers`), any ``verstat`` parameter in
        From or P-Asserted-Identity (a rule that vouches for the caller puts its own), and
        P-Asserted-Identity values asserting another number than the first (the caller the
        rules check; RFC 3325 §9.1: two values are one identity, a SIP and a tel URI) or one
        it cannot read (see :func:`one_identity`), the checked one put first."""
        for name in self.settings.strip_headers:
            for i in msg.indexes(name):
                replace[i] = None
        pai = msg.indexes("p-asserted-identity")
        if pai and replace.get(pai[0], b"") is not None:  # (not when strip_headers has it)
            one = one_identity(msg)
            if one is not None:
                replace[pai[0]] = one.encode("utf-8", "surrogateescape") if one else None
                for i in pai[1:]:
                    replace[i] = None
        for name in ("from", "p-asserted-identity"):
            for i in msg.indexes(name):
                line = replace.get(i, msg.lines[i])
                if line is None:
                    continue
                # the plain form's pattern is three times faster; escapes and folds are rare
                full = b"%" in line or b"\n" in line
                if not full and b"verstat" not in line.lower():
                    continue  # what the plain pattern needs (ASCII case-insensitive) is absent
                pattern = _VERSTAT if full else _VERSTAT_PLAIN
                new = _without_verstat(line, pattern)
                for _ in range(8 if new != line else 0):  # "?verstat=a&verstat=b": one pass
                    again = _without_verstat(new, pattern)  # takes the first only
                    if again == new:
                        break
                    new = again
                if new != line:
                    replace[i] = new
        carriers = uri_headers.CARRIERS if msg.method == "REGISTER" else \
            uri_headers.WITH_CONTACT
        for name in carriers:
            for i in msg.indexes(name):
                line = replace.get(i, msg.lines[i])
                if line is None or b"?" not in line:
                    continue
                new, removed = uri_headers.without_unsafe_headers(line, self.settings.strip_headers)
                if removed:
                    replace[i] = new
                    self.events.append(Noticed("uri_headers_removed",
                                               f"{removed} from {name} {msg.call_id}", flow))

    def _route_ack(self, msg: Message, flow: Flow, key: str, now: float) -> None:
        """ACK for a 2xx: its own end-to-end transaction, forwarded statelessly (§16.11)."""
        if msg.max_forwards == 0:
            self.events.append(Dropped("ack_too_many_hops", msg.call_id, flow))
            return
        from_core = self._is_core(msg, flow)
        dialog, side = self.table.of(msg, from_core)
        if dialog is None and msg.to_tag == self.ids.to_tag(msg):
            return  # the ACK of a stateless answer of sipguard's (403, 503): done
        if not from_core:
            if self._not_party(dialog, side, flow, msg):
                self.events.append(Dropped("ack_refused", msg.call_id, flow))
                return
            self._follow_nat(dialog, side, msg, flow)
        target, start_line, routes = self.router.preprocess_route(msg, flow, False, from_core)
        if target is None:
            self.events.append(Dropped("ack_unroutable", msg.call_id, flow))
            return
        if dialog is not None and not from_core:
            start_line, routes = self._pinned_route(dialog, msg, start_line, routes, flow)
        if from_core and dialog is not None and dialog.party is not None:
            target = self._toward_party(dialog, dialog.party, target)
        elif dialog is not None and dialog.core is not None and target is self.settings.core:
            target = dialog.core
        # An ACK gets no response, so a loop of ACKs is cut by Max-Forwards alone: its branch
        # needs no loop-detection part.
        branch = self.ids.branch(key + "|ACK", "ack")
        stamped = build.stamped_via(msg.top_via, flow.addr)
        data = self._forwarded_bytes(msg, flow, stamped, target, branch, start_line, routes, False,
                                     (), self._pai_edits(msg, flow, dialog, from_core, side),
                                     anonymise=self._withheld(dialog, side, from_core))
        self.outbox.append((target, data))
        if dialog is not None and from_core == dialog.outbound and (
                not dialog.acked or dialog.forks is not None):
            leg = _answered_leg(dialog, side, msg)
            if leg is not None:
                # the ACK of an answered leg of the call: its tags, from the side that sent
                # the INVITE (of a forked call: which legs, see _leg_ended)
                if dialog.forks is not None:
                    self._acked_leg(dialog, leg)
                if not dialog.acked:
                    self._acked(dialog)
        if self.doomed and dialog is not None and not from_core:
            reason = self.doomed.pop(key_of(dialog), None)
            if reason is not None:
                self.end_call(dialog, reason, now)

    # ------------------------------------------------------------------ CANCEL and ACK
    def _on_cancel(self, msg: Message, flow: Flow, key: str, now: float,
                   from_core: bool) -> None:
        invite = self.servers.get(table_key(key, "INVITE"))
        if invite is not None and not (
            flow.addr == invite.flow.addr
            or (flow.transport != "udp" and flow.addr[0] == invite.flow.addr[0])
        ):
            invite = None  # RFC 3261 §9.2: a CANCEL comes from the INVITE's sender
        if invite is None:
            # Nothing to cancel: one stateless 481 (after the screen, for an outside source),
            # no transaction — a CANCEL gets one only beside the INVITE transaction it ends,
            # so CANCELs can never hold more of the table than the INVITEs do.
            if from_core or self._admitted(msg, flow, now, methods=False):
                self._stateless(msg, flow, 481, None)
                self.events.append(Dropped("cancel_unmatched", msg.call_id, flow))
            return
        cst = ServerTxn(key, "CANCEL", msg, flow, self.router.reply_flow(msg, flow))
        self.servers[table_key(key, "CANCEL")] = cst
        self._respond(cst, 200, now)
        if invite.state == DECIDING:
            self._forget_pending(invite, now)
            self._respond(invite, 487, now)
            return
        ct = invite.client
        if invite.state != PROCEEDING or ct is None or ct.state not in (CALLING, PROCEEDING):
            return  # already answered: nothing to cancel
        reasons = msg.indexes("reason")
        if reasons and "reason" not in self.settings.strip_headers:
            lines = msg.lines
            ct.cancel_reason = tuple(lines[i] for i in reasons)
        if ct.provisional:
            self._send_cancel(ct, now)
        else:
            ct.cancel_wanted = True  # RFC 3261 §9.1: wait for a provisional response

    def _send_cancel(self, ct: ClientTxn, now: float) -> None:
        if ct.cancel_sent:
            return
        ct.cancel_sent = True
        data = build.cancel_for(ct.sent_msg(), ct.cancel_reason)
        cancel = ClientTxn(ct.branch, "CANCEL", data, ct.flow, None)
        self.clients[table_key(ct.branch, "CANCEL")] = cancel
        self.outbox.append((ct.flow, data))
        self._arm_non_invite(cancel, now)
        # A called side that answers neither the CANCEL nor the INVITE: the INVITE is given
        # up 64*T1 later (RFC 3261 §9.1), not at a Timer C minutes away (no provisional
        # starts Timer C again once the CANCEL has gone)
        TimerQueue.cancel(ct.timeout)
        ct.timeout = self.timers.add(now + 64 * self.settings.t1, self._on_timer_b, ct)

    def _ack_absorbed(self, st: ServerTxn, now: float) -> None:
        if st.state == CONFIRMED:
            return
        st.state = CONFIRMED
        TimerQueue.cancel(st.timer)
        TimerQueue.cancel(st.timeout)
        st.timer = None
        wait = self.settings.t4 if st.flow.transport == "udp" else 0.0
        st.timeout = self.timers.add(now + wait, self._on_timer_terminate_server, st)

    # ------------------------------------------------------------------ responses
    def _respond(
        self,
        st: ServerTxn,
        status: int,
        now: float,
        phrase: str | None = None,
        extra: tuple[str, ...] | list[str] = (),
    ) -> None:
        """Answer ``st`` with a response sipguard builds itself."""
        msg = _request(st)
        if not st.to_tag and status > 100:
            st.to_tag = self.ids.to_tag(msg)
        data = build.response(
            msg,
            status,
            phrase,
            to_tag=st.to_tag or None,
            top_via=self._stamped(st),
            extra=extra,
        )
        self._send_upstream(st, status, data, now)

    @staticmethod
    def _stamped(st: ServerTxn) -> str:
        """The request's top Via with received/rport filled in (made once per transaction)."""
        if not st.stamped:
            st.stamped = build.stamped_via(_request(st).top_via, st.flow.addr)
        return st.stamped

    def _send_upstream(self, st: ServerTxn, status: int, data: bytes, now: float) -> None:
        """Send a response on a server transaction and move it along (RFC 3261 §17.2)."""
        self.outbox.append((st.reply_to, data))
        st.last = data
        if status < 200:
            return
        s = self.settings
        udp = st.flow.transport == "udp"
        TimerQueue.cancel(st.timeout)
        if st.method == "INVITE":
            if status < 300:
                st.state = ACCEPTED  # RFC 6026: absorb INVITE retransmissions for 64*T1
                st.last = None
                st.timeout = self.timers.add(now + 64 * s.t1, self._on_timer_terminate_server, st)
            else:
                st.state = COMPLETED
                if udp:
                    st.interval = s.t1
                    st.timer = self.timers.add(now + s.t1, self._on_timer_g, st)
                st.timeout = self.timers.add(now + 64 * s.t1, self._on_timer_terminate_server, st)
                if st.dialog is not None:
                    st.dialog.status = status
                    self._end_dialog(st.dialog, st.end_reason
                                     or ("cancelled" if status == 487 else "failed"), now)
        else:
            st.state = COMPLETED
            wait = 64 * s.t1 if udp else 0.0
            st.timeout = self.timers.add(now + wait, self._on_timer_terminate_server, st)
            if st.method in SUBSCRIPTION_CREATING:
                if status < 300:
                    self._subscribed(st, now, data)
                else:
                    self._refused_subscription(st)
        self._settle(st, now)

    def _settle(self, st: ServerTxn, now: float) -> None:
        """``st`` has its final answer: until its timer ends it (up to 64*T1 = 32 s later) it
        only absorbs retransmissions and resends ``last``, which takes its key, flows and
        answer. The request, the call and the dialog are let go now: at 1,000 calls/s that is
        some 30,000 parsed requests and ended calls fewer held, and objects the garbage
        collector no longer has to trace (see ``sipguard.ops.collector``). One that forwarded
        nothing (refused, answered by sipguard) is charged from now on for its answer only:
        refused INVITEs, however large, then hold the byte budgets for what they keep."""
        if st.client is None and st.state != TERMINATED:
            kept = len(st.last) if st.last is not None else 0
            if kept < st.size:
                freed = st.size - kept
                self.held_bytes -= freed
                if st.charged is not None:
                    st.charged.request_bytes -= freed
                st.size = kept
        call = st.call
        if call is not None:
            self.pending.pop(id(call), None)
            if st.dialog is None:  # (a no-op unless its decision never settled)
                self._abandon(call, now)
        st.msg = None
        st.call = None
        st.dialog = None
        st.next_hop = None
        st.ends = None

    def _on_response(self, msg: Message, flow: Flow, now: float) -> None:
        # The top Via of a response for us is the one sipguard wrote: read its branch straight
        # from the raw line (a response whose top Via is not ours is stray either way).
        line = msg.lines[msg.indexes("via")[0]]
        m = _OUR_BRANCH.search(line)
        branch = m.group(1).decode("ascii") if m is not None else ""
        ours_end = m.end() if m is not None else 0
        method = msg.cseq[1]
        ct = self.clients.get(table_key(branch, method)) if branch.startswith(build.OUR_PREFIX) else None
        if ct is not None and m is not None:
            ours = ct.sent_by
            if not ours:
                ours = ct.sent_by = _our_via_sent(ct.data)
            if _via_sent(line, m.start()) != ours:
                ct = None
        if ct is None:
            # RFC 3261 §18.1.2: a top Via whose sent-by sipguard did not write — our branch
            # under another address — is discarded, however its branch matches
            self.events.append(Dropped("stray_response", f"{msg.status} {msg.call_id}", flow))
            return
        sent = ct.flow
        if not _same_host(flow.addr[0], sent.addr[0]) and _is_ip(sent.addr[0]) and \
                not self.admission.same_peer(sent, flow):
            # an answer comes from the host its request went to (or another address of that
            # peer): one from elsewhere with the right branch saw the request on its way —
            # a 200 with its own Contact would take the call (RFC 3261 §18.2.2 sends answers
            # from where the request was taken)
            self.events.append(Dropped("response_source", f"{msg.status} {msg.call_id}", flow))
            return
        if ct.method in SUBSCRIPTION_CREATING and not _is_ip(ct.flow.addr[0]):
            # a SUBSCRIBE / REFER the core sent to a host name (the shell resolved it): its
            # party is the address that answers, where its NOTIFYs come from (_subscribed)
            ct.flow = Flow(ct.flow.transport, flow.addr, ct.flow.local, ct.flow.conn)
        # A To that does not parse fails an INVITE's answer here, before any state changes (a
        # client transaction accepted, its server transaction never answered) and before it
        # is passed on: a parse error, dropped. (Its 1xx and 2xx read the tag anyway.)
        if ct.method == "INVITE" and msg.status > 100:
            _ = msg.to_tag
        status = msg.status
        if ct.state in (COMPLETED, TERMINATED):
            if ct.method == "INVITE" and status >= 300 and ct.state == COMPLETED:
                self.outbox.append((ct.flow, build.ack_for(ct.sent_msg(), msg)))
            return  # retransmitted final response: absorbed
        # A 100 is hop by hop (RFC 3261 §16.7 step 5): absorbed, so not rebuilt for upstream.
        upstream = self._strip_via(msg, ours_end, self._answer_edits(msg, flow, ct)) \
            if status != 100 else None
        if upstream is not None and not upstream.startswith(b"SIP/2.0 "):
            upstream = b"SIP/2.0" + upstream[7:]  # "sip/2.0" read, sent upper-case (§7.1)
        if upstream is None and ct.server is not None and status != 100:
            # RFC 3261 §16.7 step 3: no Via left once ours is gone — nothing to send it to.
            self.events.append(Dropped("no_via_left", f"{status} {msg.call_id}", flow))
        if ct.state == ACCEPTED:
            if 200 <= status < 300 and ct.server is not None and upstream is not None:
                self.outbox.append((ct.server.reply_to, upstream))
                # another fork's 2xx to the call's own INVITE, from the core it went to
                dialog = ct.pins_for
                if dialog is not None and dialog.state == CONFIRMED and \
                        _sent_there(flow, ct.flow) and msg.call_id == dialog.call_id and \
                        (msg.from_tag or "") == dialog.caller_tag and not (
                            self.ended_legs and (msg.to_tag or "") in
                            self.ended_legs.get(key_of(dialog), ())):
                    self._pin(dialog, msg.to_tag or "", msg, True)
                    self._add_leg(dialog, msg)
            return
        TimerQueue.cancel(ct.timer)
        ct.timer = None
        if status < 200:
            if ct.method == "INVITE":
                if (status > 100 or not ct.provisional) and not ct.cancel_sent:
                    # Timer C starts at the first provisional and starts again at every
                    # 101-199 (RFC 3261 §16.7 step 2): a call held ringing or in early media
                    # (a queue) lives while the core keeps saying so
                    ct.provisional = True
                    TimerQueue.cancel(ct.timeout)
                    ct.timeout = self.timers.add(now + self.settings.timer_c, self._on_timer_c, ct)
                ct.state = PROCEEDING
                if ct.cancel_wanted:
                    self._send_cancel(ct, now)
            elif ct.state == CALLING and flow.transport == "udp":
                ct.state = PROCEEDING
                ct.interval = self.settings.t2
                ct.timer = self.timers.add(now + ct.interval, self._on_timer_e, ct)
            if status == 100 or ct.server is None:
                return
            st = ct.server
            tag = msg.to_tag
            if st.dialog is not None and tag:
                if st.dialog.callee_tag is None:
                    st.dialog.callee_tag = tag
                if not st.dialog.outbound and _sent_there(flow, ct.flow):
                    self._pin(st.dialog, tag, msg, False)  # an early dialog (RFC 3261 §12.1)
            if upstream is not None:
                self.outbox.append((st.reply_to, upstream))
                st.last = upstream
            return
        # Final response.
        TimerQueue.cancel(ct.timeout)
        s = self.settings
        if ct.method == "INVITE":
            if status < 300:
                ct.state = ACCEPTED
                ct.data, ct.sent = b"", None  # only 2xx retransmissions come now: no ACK to build
                ct.timeout = self.timers.add(now + 64 * s.t1, self._on_timer_drop_client, ct)
                dialog = ct.server.dialog if ct.server is not None else None
                if dialog is not None and not dialog.outbound and _sent_there(flow, ct.flow):
                    self._pin(dialog, msg.to_tag or "", msg, True)  # the 2xx's route set
                    ct.pins_for = dialog
                if dialog is not None and dialog.state == "early":
                    dialog.state = CONFIRMED
                    dialog.confirmed_at = now
                    dialog.status = status
                    dialog.callee_tag = msg.to_tag or dialog.callee_tag
                    party = dialog.party
                    if party is not None and dialog.outbound and not _is_ip(party.addr[0]):
                        # A call the core placed to a host name: its party's requests come
                        # from an address, the one that answered (see _not_party).
                        dialog.party = Flow(party.transport, flow.addr, party.local, party.conn)
                    invite = ct.server.msg if ct.server is not None else None
                    if invite is not None:
                        self._start_keepalive(dialog, invite, msg, now)
                    # (an answer from outside to the core's INVITE carries sipguard's entry
                    # as it reaches the core, whatever it carried: _route_tail)
                    dialog.routed = self.settings.record_route and (
                        ct.route_tail is not None or self._recorded(msg))
                    if self.settings.record_route and not dialog.routed:
                        # The core dropped our Record-Route: its in-dialog requests (the BYE)
                        # will go around sipguard and the call's slots stay held until a
                        # timer frees them. A deployment error worth a warning.
                        self.events.append(Noticed("core_without_record_route",
                                                   msg.call_id, flow))
            else:
                ct.state = COMPLETED
                self.outbox.append((ct.flow, build.ack_for(ct.sent_msg(), msg)))
                wait = 32.0 if ct.flow.transport == "udp" else 0.0
                ct.timeout = self.timers.add(now + wait, self._on_timer_drop_client, ct)
        else:
            ct.state = COMPLETED
            ct.data, ct.sent = b"", None  # only retransmitted finals come now, absorbed
            wait = s.t4 if ct.flow.transport == "udp" else 0.0
            ct.timeout = self.timers.add(now + wait, self._on_timer_drop_client, ct)
        if status < 300 and ct.method in ("INVITE", "UPDATE") and ct.server is not None:
            self._session_timer(ct.server, msg, now)
        if ct.probe is not None:
            self._probe_answered(ct.probe, status, now, self._core_side(ct))
        server = ct.server
        if server is not None and server.ends is not None and (
                status < 300 or status in (408, 481)):  # §15.1.1: the dialog is over
            self._leg_ended(server.ends, _bye_leg(server), server.end_reason, now)
            server.ends = None
        if server is None or server.state not in (PROCEEDING, DECIDING):
            return  # CANCEL's own answer, or the upstream side already has a final answer
        if upstream is None:
            self._respond(server, 502, now, "Bad Gateway")
            return
        # a call sipguard cancelled (its number suspended) that the core answered meanwhile:
        # the 2xx goes to the caller, and once the caller's ACK has passed to the core, a BYE
        # each way ends it (a caller that never ACKs hears the core's own BYE, §13.3.1.4)
        if server.end_reason and status < 300 and server.method == "INVITE" and \
                server.dialog is not None:
            self.doomed[key_of(server.dialog)] = server.end_reason
        if status == 503 and not self.settings.relay_core_503 and self._core_side(ct):
            # RFC 3261 §16.7 step 6: a 503 upstream says sipguard serves no request at all; the
            # core's refused only this one (sip.relay_core_503: pass it as it is)
            upstream = b"SIP/2.0 500 Server Internal Error" + upstream[upstream.find(b"\r\n"):]
            status = 500
        self._send_upstream(server, status, upstream, now)

    def _recorded(self, msg: Message) -> bool:
        """The response carries a Record-Route naming one of sipguard's own addresses."""
        for i in msg.indexes("record-route"):
            line = msg.lines[i]
            for local in self.settings.locals:
                if line.find(local.hostport.encode()) >= 0:
                    return True
        return False

    def _strip_via(self, msg: Message, ours_end: int,
                   edits: dict[int, bytes | None] | None = None) -> bytes | None:
        """The response with our (top) Via value removed (RFC 3261 §16.7 step 3); None when
        no Via would be left. ``ours_end``: where our branch ends in the top Via line;
        ``edits``: header lines replaced or removed too (see _answer_edits)."""
        indexes = msg.indexes("via")
        idx = indexes[0]
        line = msg.lines[idx]
        if edits:
            rest = after_first_via(msg.value_at(idx))
            if not rest and len(indexes) == 1:
                return None
            replace = dict(edits)
            replace[idx] = header_line("Via", rest) if rest else None
            added = replace.pop(APPEND, None)
            length = [] if msg.content_length is not None else \
                [f"Content-Length: {len(msg.body)}".encode()]
            if added is not None:
                length.insert(0, added)
            return msg.serialize(replace=replace, append=length)
        if msg.content_length is None:
            # A datagram may leave Content-Length out (RFC 3261 §18.3: its body is the rest of
            # it); the next hop may be a stream, where a message without one would end at its
            # header and its body read as the next message. So it is said.
            rest = after_first_via(msg.value_at(idx)) if line.find(b",") >= 0 else ""
            if not rest and len(indexes) == 1:
                return None
            return msg.serialize(replace={idx: header_line("Via", rest) if rest else None},
                                 append=(f"Content-Length: {len(msg.body)}".encode(),))
        if line.find(b",") < 0:
            return msg.without_line(idx) if len(indexes) > 1 else None
        rest_at = REST_AFTER_FIRST_VIA(line) if REST_AFTER_FIRST_VIA is not None else -1
        if rest_at > ours_end:
            # the usual line of several values, our branch before the first comma: the others
            # go on byte for byte, spliced into the received bytes (anything else: the Python
            # scan below, which also checks the first value's syntax)
            return msg.with_line(idx, b"Via: " + line[rest_at:])
        rest = after_first_via(msg.value_at(idx))  # the others go on as the core sent them
        if not rest and len(indexes) == 1:
            return None
        new = header_line("Via", rest) if rest else None
        return msg.serialize(replace={idx: new})

    # ------------------------------------------------------------------ timers
    def _wait_for_queue(self, txn: ClientTxn | ServerTxn, now: float,
                        fire: Callable[[Any, float], None]) -> bool:
        """Whether a retransmission timer (A, E, G) that fires now for ``txn`` waits instead
        of retransmitting: it is then armed again (``fire``) for the wait.

        RFC 3261's timers assume a transaction layer that has read what arrived. When the shell
        is ``lag`` seconds behind in reading its receive queues (overload: the watcher measures
        the wait), the answer (or ACK) whose absence fires the timer may be in the queue
        already, unread: retransmitting then only adds load at both ends, and a strict peer
        may take an INVITE repeated after its 200 for an error. So the timer waits the lag, and
        again while the shell is still behind, T2 (4 s) at most in all (``txn.held``); then, if
        the transaction is still waiting, it retransmits as usual (Timer B / F still end it on
        time). Below ``HOLD_MIN_S`` of lag (normal running) nothing changes."""
        lag = self.lag
        cap = self.settings.t2
        held = txn.held
        if lag < HOLD_MIN_S or held >= cap:
            txn.held = 0.0
            return False
        if not held:
            self.held_retransmissions += 1
        wait = min(lag, cap - held)
        txn.held = held + wait
        txn.timer = self.timers.add(now + wait, fire, txn)
        return True

    def _timer_a(self, ct: ClientTxn, now: float) -> None:
        """Timer A: retransmit the INVITE over UDP until a response arrives."""
        if ct.state != CALLING:
            return
        if self._wait_for_queue(ct, now, self._on_timer_a):
            return
        self.outbox.append((ct.flow, ct.data))
        ct.interval *= 2
        ct.timer = self.timers.add(now + ct.interval, self._on_timer_a, ct)

    def _timer_e(self, ct: ClientTxn, now: float) -> None:
        """Timer E: retransmit a non-INVITE request (capped at T2)."""
        if ct.state not in (CALLING, PROCEEDING):
            return
        if self._wait_for_queue(ct, now, self._on_timer_e):
            return
        self.outbox.append((ct.flow, ct.data))
        ct.interval = min(ct.interval * 2, self.settings.t2)
        ct.timer = self.timers.add(now + ct.interval, self._on_timer_e, ct)

    def _timer_b(self, ct: ClientTxn, now: float) -> None:
        """Timer B: no answer to the INVITE at all — 408 upstream."""
        self._client_timed_out(ct, now)

    def _timer_c(self, ct: ClientTxn, now: float) -> None:
        """Timer C (RFC 3261 §16.8): ringing too long — CANCEL, then give up after 64*T1."""
        if ct.state not in (CALLING, PROCEEDING):
            return
        # (never after a CANCEL: sending one cancels Timer C and arms Timer B in its place)
        st = ct.server
        if st is not None and not st.end_reason:
            st.end_reason = "timeout"  # the core's 487 ends it so, not as "cancelled"
        self._send_cancel(ct, now)  # and Timer B, 64*T1 on

    def _timer_f(self, ct: ClientTxn, now: float) -> None:
        """Timer F: a non-INVITE got no final answer (RFC 4320: no 408 upstream)."""
        if ct.state in (CALLING, PROCEEDING):
            TimerQueue.cancel(ct.timer)
            ct.state = TERMINATED
            # the call the outside party's BYE would end (let go when the server ends)
            ends = ct.server.ends if ct.server is not None else None
            leg = _bye_leg(ct.server) if ends is not None else ""
            if ct.method in SUBSCRIPTION_CREATING and ct.server is not None:
                self._refused_subscription(ct.server)  # never answered: as refused
            self._drop_client(ct)
            server = ct.server
            if server is not None:
                # said and counted (noticed_no_answer): the sender hears nothing (RFC 4320),
                # so a next hop that never answers a method (OPTIONS pings) shows here only
                request = server.msg
                detail = f"{ct.method} {request.call_id}" if request is not None else ct.method
                self._terminate_server(server, now)
                self.events.append(Noticed("no_answer", detail, ct.flow))
            if ends is not None:
                # that BYE got no answer: its sender takes the call as over (§15.1.1);
                # whether the core still has it, an OPTIONS of sipguard's asks
                self._ask_core(ends, leg, now)
            if ct.probe is not None:
                # no answer at all
                self._probe_answered(ct.probe, 408, now, self._core_side(ct))

    def undelivered(self, dropped: list[bytes], now: float) -> int:
        """Messages the transport could not deliver at all (an outbound TCP/TLS connect that
        failed): each request of sipguard's that has had no answer yet is treated as if the
        next hop had answered ``503`` (RFC 3261 §16.9, §18.4) — its sender hears now what
        that means, not ``408`` after Timer B's 32 s: ``503`` when the core is unreachable
        (sipguard can serve no call: RFC 3261 §16.7 step 6 lets that 503 through), ``500``
        when an outside party is (a 503 would tell the core that sipguard is down). How many
        were answered."""
        answered = 0
        for data in dropped:
            if data.startswith(b"SIP/2.0 "):
                continue  # a response: nothing waits for it
            # sipguard's branch in the top Via: past the start line (a Request-URI may carry
            # any text), within the header block
            m = _OUR_BRANCH.search(data, data.find(b"\n") + 1, data.find(b"\r\n\r\n"))
            if m is None:
                continue
            method = data[:data.find(b" ")].decode("ascii", "replace")
            ct = self.clients.get(table_key(m.group(1).decode("ascii"), method))
            if ct is not None and ct.state == CALLING and ct.probe is None:
                core = ct.server.dialog.core if ct.server is not None and \
                    ct.server.dialog is not None else None
                to_core = flow_is_core(ct.flow, core or self.settings.core)
                self._client_failed(ct, 503 if to_core else 500, now)
                answered += 1
        return answered

    def _client_failed(self, ct: ClientTxn, status: int, now: float) -> None:
        """A request that will get no answer from its next hop: ``status`` upstream at once,
        and what its answer would have ended ends (the call it set up, the call a BYE ends)."""
        ct.state = TERMINATED
        self._drop_client(ct)
        st = ct.server
        if st is None or st.state != PROCEEDING:
            return
        if st.dialog is not None and ct.method == "INVITE":
            st.dialog.status = status
            self._end_dialog(st.dialog, st.end_reason or "failed", now)
        ends = st.ends
        leg = _bye_leg(st) if ends is not None else ""
        self._respond(st, status, now)
        if ends is not None:
            self._ask_core(ends, leg, now)  # the BYE never reached the core: has it the call?

    def _client_timed_out(self, ct: ClientTxn, now: float) -> None:
        if ct.state not in (CALLING, PROCEEDING):
            return
        TimerQueue.cancel(ct.timer)
        ct.state = TERMINATED
        self._drop_client(ct)
        st = ct.server
        if st is not None and st.state == PROCEEDING:
            if st.dialog is not None:
                st.dialog.status = 408
                # a call end_calls CANCELled whose called side never answered: still its reason
                self._end_dialog(st.dialog, st.end_reason or "timeout", now)
            self._respond(st, 408, now)

    def _timer_g(self, st: ServerTxn, now: float) -> None:
        """Timer G: retransmit our final non-2xx answer until the ACK arrives."""
        if st.state != COMPLETED or st.last is None:
            return
        if self._wait_for_queue(st, now, self._on_timer_g):
            return
        self.outbox.append((st.reply_to, st.last))
        st.interval = min(st.interval * 2, self.settings.t2)
        st.timer = self.timers.add(now + st.interval, self._on_timer_g, st)

    def _timer_terminate_server(self, st: ServerTxn, now: float) -> None:
        self._terminate_server(st, now)

    def _timer_drop_client(self, ct: ClientTxn, now: float) -> None:
        ct.state = TERMINATED
        self._drop_client(ct)

    def _terminate_server(self, st: ServerTxn, now: float) -> None:
        st.state = TERMINATED
        TimerQueue.cancel(st.timer)
        TimerQueue.cancel(st.timeout)
        if st.client is not None:  # break the server <-> client cycle: freed by refcount
            st.client.server = None
            st.client = None
        key = table_key(st.key, st.method)
        if self.servers.get(key) is st:
            del self.servers[key]
            self.held_bytes -= st.size
            if st.charged is not None:
                st.charged.request_bytes -= st.size
                st.charged = None
        self._settle(st, now)  # (a no-op for one that had its final answer)

    def _drop_client(self, ct: ClientTxn) -> None:
        TimerQueue.cancel(ct.timer)
        TimerQueue.cancel(ct.timeout)
        if ct.server is not None and ct.server.state == TERMINATED:
            ct.server.client = None
            ct.server = None
        key = table_key(ct.branch, ct.method)
        if self.clients.get(key) is ct:
            del self.clients[key]

    # ------------------------------------------------------------------ dialogs
    def _session_timer(self, st: ServerTxn, response: Message, now: float) -> None:
        """A 2xx to an INVITE or UPDATE: (re)start or stop the dialog's session timer."""
        dialog = st.dialog
        if dialog is None:
            request = st.msg
            if request is None or request.to_tag is None:
                return  # answered already, or an initial request that is not a call of ours
            dialog, side = self.table.of(request, self._is_core(request, st.flow))
            if dialog is None or dialog.state == TERMINATED:
                return
            if _answered_leg(dialog, side, request) is not None:  # a leg's own re-INVITE
                self._refresh_targets(dialog, side, request, response)
            elif dialog.state == "early" and request.method == "UPDATE":
                # an early dialog's UPDATE is a target refresh too (RFC 3311 §5.1)
                self._refresh_targets(dialog, side, request, response)
        if dialog.state == TERMINATED:
            return
        interval = session_interval(response)
        dialog.session_interval = interval
        expires = dialog.hard_expires
        if interval is not None:
            expires = min(now + interval, expires)
        dialog.session_ends = expires
        if st.dialog is dialog and dialog.routed and not dialog.acked:
            # The call's own 2xx (``routed``: set as it confirmed the call): until its ACK
            # passes the call ends 64*T1 on (ack_timeout). The called side gives up
            # retransmitting an un-ACKed 2xx then and SHOULD end the session (RFC 3261
            # §13.3.1.4); a core that does not — or a caller that never ACKs, to hold a
            # number's slots — would keep the call counted for hours. (Not armed when the ACK
            # does not come through sipguard: no Record-Route.)
            expires = min(expires, now + 64 * self.settings.t1)
        self.table.expire_at(dialog, expires)

    def _acked_leg(self, dialog: Dialog, leg: str) -> None:
        """A forked call's answered leg ``leg`` has had its ACK (see ``acked_legs``)."""
        key = key_of(dialog)
        acked = self.acked_legs.get(key)
        if acked is None:
            acked = self.acked_legs[key] = set()
        if len(acked) < 8 * MAX_PINS:
            acked.add(leg)

    def _acked(self, dialog: Dialog) -> None:
        """The first ACK of a call has passed: its expiry is the session timer's or the
        maximum lifetime again (``session_ends``, see ``_session_timer``)."""
        dialog.acked = True
        if dialog.state == CONFIRMED and dialog.expires != dialog.session_ends:
            self.table.expire_at(dialog, dialog.session_ends)

    def _pin(self, dialog: Dialog, tag: str, msg: Message, final: bool) -> None:
        """Remember where the outside party's in-dialog requests naming the core side's
        ``tag`` go (``Dialog.pin_tag`` …, ``forks``): ``msg``'s Contact and its Record-Route
        entries of the core side — an answer's above sipguard's own, reversed; the core's
        INVITE's all, in order (RFC 3261 §12.1.1, §12.1.2). A later 1xx of a tag moves its
        target; a 2xx pins over a 1xx and its route set is the dialog's for good
        (§12.2.1.2); at most MAX_PINS ringing tags besides the first, 4*MAX_PINS answered."""
        first = dialog.pin_tag is None or dialog.pin_tag == tag
        forks = dialog.forks
        old = None if first or forks is None else forks.get(tag)
        if (first and dialog.pin_final) or (old is not None and old[2]):
            return
        target = _contact_target(msg)
        if not final and (dialog.pin_tag == tag or old is not None):
            if target is not None:  # a later 1xx of one early dialog: its Contact is followed
                if old is None:
                    dialog.pin_target = target
                elif forks is not None:
                    forks[tag] = (target, old[1], False)
            return
        if target is None:
            if not final:
                return  # a 1xx naming no target sets up no dialog (§12.1.1: Contact, a MUST)
            target = _core_uri(dialog.core or self.settings.core)
        if not first:
            if forks is None:
                forks = dialog.forks = {}
            elif old is None and len(forks) >= MAX_PINS:
                if not final:
                    return
                # a 2xx gets its tag: a ringing fork's pin makes room, or up to 4*MAX_PINS
                early = next((t for t, p in forks.items() if not p[2]), None)
                if early is not None:
                    del forks[early]
                elif len(forks) >= 4 * MAX_PINS:
                    return  # answered by more forks than any ring group has
        routes: tuple[NameAddr, ...] = ()
        if msg.has("record-route") and not (msg.status and self._only_ours(msg, dialog)):
            try:
                entries = _record_routes(msg)
            except SipParseError:
                entries = []  # the core's own header: nothing to keep of it
            if msg.status:  # an answer: the core side's entries, as the caller's requests name them
                entries = self._core_side_routes(entries, dialog.caller_rr)
            routes = tuple(entries) if entries else ()
        if first:
            dialog.pin_tag, dialog.pin_target = tag, target
            dialog.pin_routes, dialog.pin_final = routes, final
        elif forks is not None:
            forks[tag] = (target, routes, final)

    def _only_ours(self, msg: Message, dialog: Dialog) -> bool:
        """The usual answer: one Record-Route value, sipguard's own, and none from the caller's
        side — no core-side route set, read without parsing a URI."""
        idx = msg.indexes("record-route")
        if len(idx) != 1 or dialog.caller_rr:
            return False
        line = msg.lines[idx[0]]
        return line.find(b",") < 0 and self._recorded(msg)

    def _core_side_routes(self, routes: list[NameAddr], caller_rr: int) -> list[NameAddr]:
        """Of an answer's Record-Route entries (top first), the core side's, reversed: what is
        left of the caller's route set once its side's proxies and sipguard have taken theirs.
        Counted from the bottom — the ``caller_rr`` entries the INVITE brought, then
        sipguard's own (one, or RFC 5658's pair of two different URIs; the same URI again is
        another pass's, a spiral) — so an entry the caller wrote to look like sipguard's is
        never taken for it."""
        end = max(len(routes) - caller_rr, 0)
        is_ours = self.router.is_ours
        if end and is_ours(routes[end - 1].uri):
            first = routes[end - 1].uri.raw
            end -= 1
            if end and is_ours(routes[end - 1].uri) and routes[end - 1].uri.raw != first:
                end -= 1
        return routes[:end][::-1]

    def _pinned_route(self, dialog: Dialog, msg: Message, start_line: bytes | None,
                      routes: list[NameAddr] | None, flow: Flow
                      ) -> tuple[bytes | None, list[NameAddr] | None]:
        """An in-dialog request from outside leaves with the Request-URI and route set the
        core side gave its dialog (``Dialog.pin_tag``), whatever it carries: a core that routes
        in-dialog requests on by them would relay it wherever the party chose (RFC 3261
        §12.2.1.1 has the UA use the dialog's). Counted when it carried others."""
        tag = msg.to_tag or ""
        if tag == dialog.pin_tag:
            target, route_set = dialog.pin_target, dialog.pin_routes
        else:
            forks = dialog.forks
            pin = forks.get(tag) if forks is not None else None
            if pin is None:
                return start_line, routes
            target, route_set = pin[0], pin[1]
        return self._repin(msg, start_line, routes, target, route_set, flow)

    def _subscription_route(self, msg: Message, start_line: bytes | None,
                            routes: list[NameAddr] | None, flow: Flow
                            ) -> tuple[bytes | None, list[NameAddr] | None]:
        """An in-dialog request from outside of a subscription (a NOTIFY of the core's, a
        party's refresh): the core's subscription's target and route set, as a call's are
        pinned; a party's keeps only the Route entries naming the core."""
        key = notified(msg) if msg.method == "NOTIFY" else \
            ("party", msg.call_id, msg.from_tag or "")
        sub = self.subscriptions.table.get(key)
        if sub is not None and sub.target:
            return self._repin(msg, start_line, routes, sub.target, sub.routes, flow)
        remaining = routes if routes is not None else (msg.routes if msg.has("route") else [])
        kept = [r for r in remaining if self.router.names_core(r.uri)]
        return start_line, (kept if len(kept) != len(remaining) else routes)

    def _repin(self, msg: Message, start_line: bytes | None, routes: list[NameAddr] | None,
               target: str, route_set: tuple[NameAddr, ...], flow: Flow
               ) -> tuple[bytes | None, list[NameAddr] | None]:
        """``msg`` with ``target`` as Request-URI and ``route_set`` past sipguard's own
        entries (counted when it carried others)."""
        moved = ""
        if start_line is not None or msg.request_uri.raw != target:
            start_line = f"{msg.method} {target} SIP/2.0".encode("utf-8", "surrogateescape")
            moved = "request_uri"
        remaining = routes if routes is not None else (msg.routes if msg.has("route") else [])
        if len(remaining) != len(route_set) or any(
                a.uri.raw != b.uri.raw for a, b in zip(remaining, route_set, strict=True)):
            routes = list(route_set)
            moved = moved or "route"
        if moved:
            self.events.append(Noticed("in_dialog_rerouted", f"{moved} {msg.call_id}", flow))
        return start_line, routes

    def _refresh_targets(self, dialog: Dialog, side: str, request: Message,
                         response: Message) -> None:
        """A re-INVITE or UPDATE answered 2xx is a target refresh (RFC 3261 §12.2.1.2,
        RFC 3311 §5.1): the Contact of the request is its sender's new target, the 2xx's
        the other side's. The in-dialog requests sipguard sends itself (the BYE that ends a
        suspended number's call, keep-alives) go there from now on. Only the Request-URI
        follows: where such a request is sent does not (the outside party's flow, the core).
        The outside party's own in-dialog requests follow the core side's new target too
        (``Dialog.pin_tag``)."""
        # the core side's tag: for a call that came in, the To tag of the caller's requests
        # (the From tag of the core's); for a call the core placed, the caller's own
        tag = dialog.caller_tag if dialog.outbound else (
            (request.to_tag if side == "caller" else request.from_tag) or "")
        forks = dialog.forks
        if tag == dialog.pin_tag or (forks is not None and tag in forks):
            from_party = side == ("callee" if dialog.outbound else "caller")
            moved = _contact_target(response if from_party else request)
            if moved is not None:
                if tag == dialog.pin_tag:
                    dialog.pin_target = moved
                elif forks is not None:
                    forks[tag] = (moved, forks[tag][1], forks[tag][2])
        probe = self._probe_of(dialog, tag)
        if probe is None:
            return
        sent, answered = keepalive.contact_line(request), keepalive.contact_line(response)
        if side == "caller":
            probe.caller_contact = sent or probe.caller_contact
            probe.callee_contact = answered or probe.callee_contact
        else:
            probe.callee_contact = sent or probe.callee_contact
            probe.caller_contact = answered or probe.caller_contact

    def _leg_ended(self, dialog: Dialog, leg: str, reason: str, now: float) -> None:
        """A BYE for the answered leg ``leg`` of a call has been answered (the caller's) or has
        come (the core's): the call ends — unless a forking core had more than one of its
        legs answer and another is still up. Then only the ended leg's pin goes and the call
        carries on, its slots held, as that other leg (its tag the call's own from now on: a
        caller that hung up the first answer and kept a later one frees nothing while it
        talks). The keep-alive, which speaks with the first leg's tags, stops then."""
        forks = dialog.forks
        own = leg == (dialog.callee_tag or "")
        if (own and forks is None) or dialog.outbound or dialog.state != CONFIRMED:
            self._end_dialog(dialog, reason, now)  # the usual call: one leg
            return
        key = key_of(dialog)
        legs = self.leg_probes.get(key)
        if legs is not None:  # the ended leg's probe goes: nothing sipguard sends names it
            legs[:] = [p for p in legs if p.leg != leg]
        ended = self.ended_legs.get(key)
        if ended is None:
            ended = self.ended_legs[key] = set()
        if len(ended) < 8 * MAX_PINS:
            ended.add(leg)
        if forks:
            if leg == dialog.pin_tag:  # its fields take another leg's pin, answered first
                other = next((t for t, p in forks.items() if p[2]), None)
                if other is None:
                    other = next(iter(forks))
                target, routes, final = forks.pop(other)
                dialog.pin_tag, dialog.pin_target = other, target
                dialog.pin_routes, dialog.pin_final = routes, final
            else:
                forks.pop(leg, None)
        if not own:
            # another leg than the call's own (or one a keep-alive ended before its BYE was
            # answered): the call is as it was
            return
        kept = dialog.pin_tag if dialog.pin_final and dialog.pin_tag != leg else next(
            (t for t, p in forks.items() if p[2]), None) if forks else None
        if kept is None:
            self._end_dialog(dialog, reason, now)
            return
        dialog.callee_tag = kept
        if kept not in self.acked_legs.get(key, ()):
            # kept on a leg whose 2xx the caller never ACKed: as for the call's own 2xx, it
            # ends 64*T1 on unless that ACK comes (a caller that took one answer and hung it
            # up frees its slots though the core never ends the other)
            dialog.acked = False
            self.table.expire_at(dialog, min(dialog.session_ends, now + 64 * self.settings.t1))
        # the kept leg's probe is the call's now (keep-alives, its BYEs, asking the core)
        main = self.probes.pop(key, None)
        new = next((p for p in legs if p.leg == kept), None) if legs else None
        if main is not None:
            TimerQueue.cancel(main.timer)
        if new is not None and legs is not None:
            legs.remove(new)
            if main is not None:  # its branches go on from the old one's (no clash)
                new.rounds = main.rounds
                new.caller_cseq = max(new.caller_cseq, main.caller_cseq)
                new.callee_cseq = max(new.callee_cseq, main.callee_cseq)
            self.probes[key] = new
            interval = self.settings.dialog_keepalive
            if interval:
                new.timer = self.timers.add(now + interval, self._on_keepalive, new)
        self.events.append(Noticed("call_kept_on_fork", f"{dialog.call_id} tag {kept}",
                                   dialog.party or dialog.core or self.settings.core))

    def _add_leg(self, dialog: Dialog, answer: Message) -> None:
        """Another fork's 2xx to a call answered already (from the core its INVITE went to):
        a probe for that leg, so that sipguard can end it too when it ends the call at once,
        and speak in it once the call is kept on it (:meth:`_leg_ended`)."""
        key = key_of(dialog)
        if dialog.acked and key not in self.acked_legs and dialog.callee_tag is not None:
            # its own leg's ACK passed before the call forked: that leg's
            self._acked_leg(dialog, dialog.callee_tag)
        main = self.probes.get(key)
        tag = answer.to_tag
        if main is None or tag is None or tag == main.leg:
            return
        legs = self.leg_probes.get(key)
        if legs is None:
            legs = self.leg_probes[key] = []
        elif len(legs) >= 4 * MAX_PINS or any(p.leg == tag for p in legs):
            return  # a retransmission, or more legs than any ring group answers with
        probe = keepalive.leg_probe(main, answer, self._hostports)
        if probe is not None:
            legs.append(probe)

    def _probe_of(self, dialog: Dialog, leg: str) -> keepalive.Probe | None:
        """The probe of the answered leg ``leg`` (the core side's tag) of a call that came in:
        the call's own, or another answered leg's of a forked call; None for a leg without
        one. A call the core placed has one (its outside party's forks are not followed)."""
        key = key_of(dialog)
        main = self.probes.get(key)
        if dialog.outbound or (main is not None and main.leg == leg):
            return main
        legs = self.leg_probes.get(key) if self.leg_probes else None
        if legs:
            for probe in legs:
                if probe.leg == leg:
                    return probe
        return None

    def _end_dialog(self, dialog: Dialog, reason: str, now: float) -> None:
        """End a dialog exactly once, whatever ends it."""
        if dialog.state == TERMINATED:
            return
        dialog.state = TERMINATED
        dialog.ended_at = now
        dialog.end_reason = reason
        self.table.remove(dialog)
        self.dialog_bytes -= dialog.size
        key = key_of(dialog)
        self.early_cseqs.pop(key, None)
        if self.doomed:
            self.doomed.pop(key, None)
        probe = self.probes.pop(key, None)
        if probe is not None:
            TimerQueue.cancel(probe.timer)
        if self.leg_probes:
            self.leg_probes.pop(key, None)
        if self.ended_legs:
            self.ended_legs.pop(key, None)
        if self.acked_legs:
            self.acked_legs.pop(key, None)
        if not dialog.outbound:  # as dialog_started: a call the core placed took no slot
            self.admission.dialog_ended(dialog, now)
        self.events.append(DialogEnded(dialog, reason))

    # ------------------------------------------------------------------ keep-alives
    def _start_keepalive(self, dialog: Dialog, invite: Message, answer: Message,
                         now: float) -> None:
        """Remember what sipguard needs to speak in this answered call (keep-alives, ending it
        at once), and arm the keep-alive when on."""
        key = key_of(dialog)
        early = self.early_cseqs.pop(key, None)
        probe = keepalive.probe_for(dialog, invite, answer, self._hostports)
        if probe is None:
            return
        if early is not None:
            probe.caller_cseq = max(probe.caller_cseq, early[0])
            probe.callee_cseq = max(probe.callee_cseq, early[1])
        self.probes[key] = probe
        interval = self.settings.dialog_keepalive
        if interval:
            probe.timer = self.timers.add(now + interval, self._on_keepalive, probe)

    def _keepalive(self, probe: keepalive.Probe, now: float) -> None:
        """Every interval: an in-dialog OPTIONS to each side (see proxy/keepalive.py)."""
        dialog = probe.dialog
        interval = self.settings.dialog_keepalive
        if dialog.state == TERMINATED or not interval:
            return
        probe.rounds += 1
        self._send_both_ways(probe, "OPTIONS", f"ka{probe.rounds}", now)
        probe.timer = self.timers.add(now + interval, self._on_keepalive, probe)

    def _ask_core(self, dialog: Dialog, leg: str, now: float) -> None:
        """The outside party's BYE (of ``leg``) got no answer at all: one in-dialog OPTIONS to
        the core in that leg. An answer means the core still has the call (its slots stay
        held: a BYE the core drops must not free them); 481, 408 or silence ends it
        (``bye_unanswered``; a forked call's leg only, while another is up). A call sipguard
        cannot speak in (no Probe) stays until its lifetime or keep-alive ends it."""
        probe = self._probe_of(dialog, leg)
        if probe is None or dialog.state == TERMINATED:
            return
        probe.after_bye = True
        probe.rounds += 1
        self._send_both_ways(probe, "OPTIONS", f"ka{probe.rounds}", now, core_only=True)

    def _send_both_ways(self, probe: keepalive.Probe, method: str, tag: str,
                        now: float, core_only: bool = False) -> None:
        """An in-dialog request of sipguard's own toward each side of the call (or the core's
        only), each its own client transaction (OPTIONS answers feed the keep-alive; BYE
        answers are only absorbed)."""
        dialog = probe.dialog
        core = dialog.core or self.settings.core
        outside = dialog.party
        # (toward the caller?, where it goes): the core's side and the outside party's side
        sides = ((True, outside), (False, core)) if not dialog.outbound else (
            (False, outside), (True, core))
        for toward_caller, flow in sides:
            if flow is None or (core_only and flow is not core):
                continue
            local = self.settings.locals[flow.local] if flow.local < len(
                self.settings.locals) else self.router.local_for(flow.transport, flow.addr[0])
            branch = self.ids.branch(
                f"{dialog.call_id}|{dialog.caller_tag}|{tag}|{int(toward_caller)}", tag)
            if method == "BYE":
                data = keepalive.bye(probe, toward_caller, local, flow.transport, branch)
            else:
                data = keepalive.options(probe, toward_caller, local, flow.transport, branch)
            if data is None:
                continue
            ct = ClientTxn(branch, method, data, flow, None)
            if method == "OPTIONS":
                ct.probe = probe
            self.clients[table_key(branch, method)] = ct
            self.outbox.append((flow, data))
            self._arm_non_invite(ct, now)

    def _saw_cseq(self, dialog: Dialog, side: str, msg: Message) -> None:
        """Remember the highest CSeq each side used: a BYE sipguard sends for it goes above."""
        probe = self.probes.get(key_of(dialog))
        n = msg.cseq[0]
        if probe is None:
            if dialog.state == "early":
                key = key_of(dialog)
                caller, callee = self.early_cseqs.get(key, (0, 0))
                self.early_cseqs[key] = (max(caller, n), callee) if side == "caller" \
                    else (caller, max(callee, n))
            return
        if side == "caller":
            probe.caller_cseq = max(probe.caller_cseq, n)
        else:
            probe.callee_cseq = max(probe.callee_cseq, n)

    def end_call(self, dialog: Dialog, reason: str, now: float) -> bool:
        """End an answered call at once (a suspended number, an expiry): a BYE to each side,
        then the dialog ends (``reason``) and its slots are freed. False for a call not
        answered yet (a ringing call goes on; the suspension stops the next INVITE)."""
        key = key_of(dialog)
        probe = self.probes.get(key)
        if probe is None or dialog.state == TERMINATED:
            return False
        self._send_both_ways(probe, "BYE", "end", now)
        legs = self.leg_probes.get(key) if self.leg_probes else None
        for n, leg in enumerate(legs or ()):  # a forked call's other answered legs
            leg.caller_cseq = max(leg.caller_cseq, probe.caller_cseq)
            leg.callee_cseq = max(leg.callee_cseq, probe.callee_cseq)
            self._send_both_ways(leg, "BYE", f"end{n + 1}", now)
        self._end_dialog(dialog, reason, now)
        return True

    def cancel_early(self, dialogs: list[Dialog], reason: str, now: float) -> int:
        """End calls not answered yet (a suspended number's ringing calls, with
        ``end_calls``): each INVITE is CANCELled toward its called side (the core, for a
        call that came in) as its caller would (RFC 3261 §16.10: at once after a
        provisional, else when one comes), the caller hears the 487, and the call ends with
        ``reason``; one answered meanwhile gets its 2xx through, then, once the caller's ACK
        has passed, a BYE each way. How many were cancelled. One
        pass over the transactions per call of ``end_calls`` (an operator's action)."""
        wanted = {id(d) for d in dialogs}
        cancelled = 0
        for st in list(self.servers.values()):
            d = st.dialog
            if d is None or id(d) not in wanted or st.method != "INVITE" \
                    or st.state != PROCEEDING:
                continue
            st.end_reason = reason
            ct = st.client
            if ct is not None and ct.state in (CALLING, PROCEEDING):
                if ct.provisional:
                    self._send_cancel(ct, now)
                else:
                    ct.cancel_wanted = True
            cancelled += 1
        return cancelled

    def end_all(self, reason: str, now: float, headers: tuple[str, ...] = ()) -> None:
        """Shutting down: every call ends now, each with its DialogEnded (``reason``) and its
        slots freed. An answered one with a BYE to each side (as :meth:`end_call`). One still
        ringing: its INVITE is CANCELled toward the called side once a provisional has come
        (RFC 3261 §9.1: none may go before one, and this process will not be there when it
        comes), and its sender hears ``503`` with ``headers`` (``Retry-After``) from sipguard
        itself — the call did not fail, this instance is going away: a caller or a load
        balancer may place it elsewhere (RFC 3261 §21.5.4) — rather than nothing, ringing on
        until its own timer gives up."""
        for st in list(self.servers.values()):
            if st.method != "INVITE" or st.state != PROCEEDING or st.dialog is None:
                continue
            mark = len(self.outbox)
            try:
                st.end_reason = reason
                ct = st.client
                if ct is not None and ct.state in (CALLING, PROCEEDING) and ct.provisional:
                    self._send_cancel(ct, now)
                self._respond(st, 503, now, extra=headers)  # ends its dialog (``reason``)
            except Exception:  # a bug costs this call's answers, not the others'
                del self.outbox[mark:]
                self.events.append(Failed("end_all", traceback.format_exc(limit=8), None))
        for dialog in list(self.dialogs.values()):
            mark = len(self.outbox)
            try:
                if not self.end_call(dialog, reason, now):
                    self._end_dialog(dialog, reason, now)
            except Exception:  # a bug costs this call's BYEs, not the others'
                del self.outbox[mark:]
                self._end_dialog(dialog, reason, now)
                self.events.append(Failed("end_all", traceback.format_exc(limit=8), None))

    def _probe_answered(self, probe: keepalive.Probe, status: int, now: float,
                        toward_core: bool) -> None:
        """A keep-alive's final answer: 481 or 408 (or none) ends the call; anything else is
        a side that still knows it. When the outside party is the side that says it does not
        know the call, the core gets a BYE too (``end_call``): the outside party cannot
        free its slots with a 481 while its call goes on at the core."""
        reason = "bye_unanswered" if probe.after_bye and toward_core else "keepalive_failed"
        dialog = probe.dialog
        key = key_of(dialog)
        legs = self.leg_probes.get(key) if self.leg_probes else None
        if self.probes.get(key) is not probe and (legs is None or probe not in legs):
            return  # a leg that has ended meanwhile (or the call): its answer ends nothing
        # the probe is the call's own or one of ``legs``: another leg is up when ``legs`` has one
        if status in (408, 481) and dialog.state != TERMINATED and legs:
            # one leg of a forked call that another answered leg keeps up: that leg ends
            # (the core's side of it too when the outside party has forgotten it)
            if not toward_core:
                probe.rounds += 1
                self._send_both_ways(probe, "BYE", f"leg{probe.rounds}", now, core_only=True)
            self._leg_ended(dialog, probe.leg, reason, now)
            return
        if status in (408, 481) and (
                toward_core or not self.end_call(probe.dialog, reason, now)):
            self._end_dialog(probe.dialog, reason, now)
        elif toward_core:
            probe.after_bye = False  # the core still has the call

    def _arm_sweep(self, now: float) -> None:
        if self._sweep is None:
            self._sweep = self.timers.add(now + 1.0, self._on_sweep_dialogs)

    def _sweep_dialogs(self, _: object, now: float) -> None:
        """End dialogs whose session timer or maximum lifetime has passed, SWEEP_BATCH a pass
        (a timer callback: its argument is None). An answered call is ended with a BYE to each side, as
        ``end_call`` does: forgetting it alone would leave both ends up, and the caller's own
        BYE or refresh later would hear 481 and never reach the core."""
        self._sweep = None
        backlog = self._sweep_backlog
        backlog.extend(self.table.due(now))
        batch = backlog[:SWEEP_BATCH]
        del backlog[:SWEEP_BATCH]
        for dialog in batch:
            if dialog.state == TERMINATED or dialog.expires > now:
                continue  # ended, or its session refreshed, while it waited in the backlog
            if dialog.expires >= dialog.hard_expires:
                reason = "lifetime"
            elif not dialog.acked and dialog.routed and dialog.state == CONFIRMED:
                reason = "ack_timeout"
            else:
                reason = "session_expired"
            try:
                ended = dialog.routed and self.end_call(dialog, reason, now)
            except Exception:  # noqa: BLE001 - the other due calls must still end
                self.events.append(Failed("sweep", traceback.format_exc(limit=8), None))
                ended = False
            if not ended:
                self._end_dialog(dialog, reason, now)
        if backlog:
            self._sweep = self.timers.add(now + SWEEP_PAUSE_S, self._on_sweep_dialogs)
        elif self.dialogs:
            self._arm_sweep(now)

    def live_dialogs(self) -> int:
        return len(self.dialogs)
