"""The contract between the proxy and the policy: the types both sides speak.

Neither ``sipguard.proxy`` nor ``sipguard.policy`` imports the other; both import this module.
It holds where messages come from and go to (:class:`Local`, :class:`Flow`), what the policy is
asked about (:class:`CallInfo`) and what it answers (:class:`Verdict`), the live call
(:class:`Dialog`), and the events the edge core reports to the shell (decisions, dialog life,
parse errors, drops, work that needs I/O).

Verdicts
--------
What a rule says about a call, and what the proxy does with it.

A rule never answers a call itself: it returns a :class:`Verdict`, and the proxy turns a
``reject`` into a SIP response from its own server transaction (retransmitted over UDP until
ACKed), an ``accept`` into forwarding to the core, and a ``drop`` into silence.

On the forwarded INVITE, ``replace_headers`` are applied first: each ``(name, line)`` removes
every received line of header ``name`` (canonical lower-case long name, e.g.
``p-asserted-identity``) and puts ``line`` in the place of the first one — appended when the
header was absent; ``None`` only removes. That is how a rule strips headers a peer must not be
able to forge and rewrites P-Asserted-Identity. Then ``forward_headers`` are appended. Headers
the proxy itself owns (Via, Route, Record-Route, Max-Forwards, From, To, Call-ID, CSeq,
Content-Length) cannot be replaced; such entries are ignored. When several rules replace the
same header, the later rule in the pipeline wins.

The one way a verdict changes From is ``anonymise`` (an :class:`Anonymise`, rule
``national_cli``): withhold the caller's identity (RFC 3323 §4.1.1.3, RFC 3325 §9.3). The proxy
applies it after every other edit, so no rule later in the pipeline can put a number back:
From becomes ``"Anonymous" <sip:anonymous@anonymous.invalid>`` with the received ``tag`` kept
(the dialog is still identified by it), the user part of every Contact URI becomes
``anonymous`` (host, port and parameters kept: the core's in-dialog requests still reach the
caller, with ``anonymous`` as the Request-URI user), P-Asserted-Identity is removed unless
``keep_pai`` (then the edited PAI stays, for a core inside the trust domain),
P-Preferred-Identity and Remote-Party-ID are removed, and every Privacy line is replaced by
``Privacy: id``. The original number may still appear in headers the proxy does not know
(a peer's own X- headers), in Call-ID, and in the SDP (``o=`` user name).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message
from sipguard.sip.nameaddr import NameAddr
from sipguard.sip.uri import plain_identity

# ---------------------------------------------------------------------- flows

@dataclass(slots=True, init=False, unsafe_hash=True)
class Local:
    """One listening endpoint of sipguard, as the proxy core sees it."""

    index: int
    transport: str  # "udp" | "tcp" | "tls"
    host: str  # address written into Via and Record-Route (advertised)
    port: int
    hostport: str  # "host:port" as written in Via and Record-Route (IPv6 in brackets)
    family: int  # 4 or 6: the addresses its socket reaches (of the address it is bound to)

    def __init__(self, index: int, transport: str, host: str, port: int,
                 family: int = 0) -> None:
        self.index = index
        self.transport = transport
        self.host = host
        self.port = port
        self.family = family or (6 if ":" in host else 4)
        bracketed = ":" in host and not host.startswith("[")
        self.hostport = f"[{host}]:{port}" if bracketed else f"{host}:{port}"


class Flow(NamedTuple):
    """A remote peer on one transport: the source of a received message or a send target.

    ``conn`` identifies a TCP connection (responses go back on the connection the request
    came on); None means "any connection to ``addr``, opened if needed". ``local`` is the index
    of the listener the message arrived on / should leave from.
    """

    transport: str
    addr: tuple[str, int]
    local: int
    conn: int | None = None


class Target(NamedTuple):
    """A next hop named by a URI: the shell resolves ``host`` when it is not an IP literal."""

    transport: str
    host: str
    port: int


# ---------------------------------------------------------------------- verdicts

Action = Literal["accept", "reject", "drop"]


@dataclass(frozen=True, slots=True)
class Anonymise:
    """Withhold the caller's identity on the forwarded INVITE (see the module docstring)."""

    keep_pai: bool = False  # keep P-Asserted-Identity toward the core (with Privacy: id)


@dataclass(slots=True, init=False)
class Verdict:
    """A rule's answer about one call. Treat it as immutable: rules hand out shared instances
    (``ACCEPT``, a rule's own pre-built verdicts). Not a frozen dataclass because a frozen one's
    generated ``__init__`` runs as Python, one ``object.__setattr__`` per field, and verdicts are
    made for every call: the hand-written ``__init__`` below is compiled (sipguard/native.py)."""

    action: Action
    rule: str = ""  # the rule that decided ("" for the default accept)
    reason: str = ""  # machine-readable reason code, e.g. "caller_not_owned"
    status: int = 0  # SIP status for a reject
    phrase: str = ""  # reason phrase for a reject
    headers: tuple[str, ...] = ()  # extra header lines on the reject ("Retry-After: 5")
    forward_headers: tuple[str, ...] = ()  # extra header lines on the forwarded INVITE
    # (lower-case header name, new line or None): replaces / removes received headers on the
    # forwarded INVITE (see the module docstring)
    replace_headers: tuple[tuple[str, str | None], ...] = ()
    # withhold the caller's identity on the forwarded INVITE (rule national_cli)
    anonymise: Anonymise | None = None
    monitored: bool = False  # decided as reject/drop by a rule in monitor mode, but forwarded
    # facts for the decision log line, e.g. {"limit": "per_caller", "number": ..., "count": 2}
    detail: Mapping[str, str | int | None] | None = None
    # log this decision sampled under this key (one line per key per log.parse_error_sample_s,
    # the rest counted): for verdicts that come in floods, e.g. "rate:per_caller:+1212..."
    sample: str = ""
    # what the other rules in monitor mode said of the same call (each would have refused it),
    # beside the one this verdict names: counted and logged too (one per rule: the first)
    also: tuple[Verdict, ...] = ()

    def __init__(
        self,
        action: Action,
        rule: str = "",
        reason: str = "",
        status: int = 0,
        phrase: str = "",
        headers: tuple[str, ...] = (),
        forward_headers: tuple[str, ...] = (),
        replace_headers: tuple[tuple[str, str | None], ...] = (),
        anonymise: Anonymise | None = None,
        monitored: bool = False,
        detail: Mapping[str, str | int | None] | None = None,
        sample: str = "",
        also: tuple[Verdict, ...] = (),
    ) -> None:
        self.action = action
        self.rule = rule
        self.reason = reason
        self.status = status
        self.phrase = phrase
        self.headers = headers
        self.forward_headers = forward_headers
        self.replace_headers = replace_headers
        self.anonymise = anonymise
        self.monitored = monitored
        self.detail = detail
        self.sample = sample
        self.also = also

    @property
    def accepted(self) -> bool:
        return self.action == "accept"

    def with_also(self, also: tuple[Verdict, ...]) -> Verdict:
        """This verdict with what rules in monitor mode said before it (a copy: verdicts are
        shared)."""
        return Verdict(self.action, self.rule, self.reason, self.status, self.phrase,
                       self.headers, self.forward_headers, self.replace_headers,
                       self.anonymise, self.monitored, self.detail, self.sample, also)


ACCEPT: Final = Verdict("accept")


# ---------------------------------------------------------------------- calls, dialogs, events

class CallInfo:
    """The facts about an initial INVITE that rules decide on.

    Numbers are normalised by the URI grammar (visual separators removed, leading ``+`` kept)
    and None when the URI carries no telephone number.

    ``labels`` are low-cardinality facts rules report about the call whatever the verdict
    (``identity=passed``, ``identity_attest=A``): the shell adds them to the decision log line
    and counts each ``name_value``; a later rule may read what an earlier one found.

    ``lease`` names what the decision takes from the limits for this call attempt (a
    concurrency slot is taken under this id the moment the rule admits the call) and the
    dialog carries it on. ``held`` says a rule took something under it; ``settled`` that it
    was handed on to a dialog or given back, which happens exactly once.
    """

    __slots__ = (
        "msg",
        "flow",
        "call_id",
        "caller",
        "shown",
        "callee",
        "diverters",
        "peer",
        "decision_us",
        "received_at",
        "labels",
        "lease",
        "held",
        "settled",
        "started_perf",
        "pai_untrusted",
    )

    def __init__(self, msg: Message, flow: Flow, now: float, lease: str = "") -> None:
        self.msg = msg
        self.flow = flow
        self.call_id = msg.call_id
        # the number of the first P-Asserted-Identity that carries one, else From's: a first
        # value without a number (sip:gw@carrier) must not leave the call without a caller
        caller: str | None = None
        if msg.has("p-asserted-identity"):
            for na in msg.p_asserted_identities:
                caller = na.uri.number
                if caller is not None:
                    break
        # From's number when the caller is an asserted one that differs: a suspension of the
        # number the caller's From shows holds too (Policy._suspended, EdgeCore.end_calls)
        self.shown: str | None = None
        if caller is None:
            caller = msg.from_.uri.number
        else:
            shown = msg.from_.uri.number
            if shown != caller:
                self.shown = shown
        self.caller: str | None = caller
        # the Request-URI's number: what the core routes on. To's only when the Request-URI
        # has no user part at all; a user part that is no number (sip:+1900…#@, sip:*67…@)
        # is no number to check, not a reason to check To's, which the caller writes freely
        uri = msg.request_uri
        self.callee: str | None = uri.number if uri.user else msg.to.uri.number
        self.diverters: tuple[str, ...] = _diverters(msg)
        self.peer: str | None = None
        self.decision_us: float = 0.0
        self.received_at = now
        self.labels: dict[str, str] = {}
        # Unique per attempt (Call-ID, From tag and the server transaction), so that two
        # INVITEs with one Call-ID never share or free each other's slots.
        self.lease = lease or f"{self.call_id}\n{msg.from_tag or ''}"
        self.held = False
        self.settled = False
        self.started_perf = 0.0
        # from a peer whose P-Asserted-Identity is no identity (trust_pai: false): it is not
        # forwarded, whatever rules run (RFC 3325 §5), unless a rule puts its own
        self.pai_untrusted = False


def one_identity(msg: Message) -> str | None:
    """The P-Asserted-Identity line with only the values of the caller's number — the first
    number among them, the one every rule checks — put first (a receiver reads the first
    value), then SIP URIs whose user is a name (``sip:gw1@carrier``); any other value
    (``*67+1312…``, ``skp:+1312…``, ``sip:+13125=50123@…``: a receiver may read a number
    there that none was read as here) goes. "": none is left; None when nothing
    changes (or the values do not parse: left to the rules). The same digits with another
    international spelling (``+``, ``00``, separators) are the same number."""
    try:
        values = msg.p_asserted_identities
    except SipParseError:
        return None
    if len(values) == 1:  # the usual case, at once
        uri = values[0].uri
        return None if uri.number is not None or plain_identity(uri) else ""
    kept = identity_values(values)
    if kept == values:
        return None
    return "P-Asserted-Identity: " + ", ".join(na.raw for na in kept) if kept else ""


def identity_values(values: list[NameAddr]) -> list[NameAddr]:
    """The P-Asserted-Identity values that go on (see :func:`one_identity`): those of the
    first number, first, then SIP URIs whose user is a name."""
    first = next((n for na in values if (n := na.uri.number) is not None), None)
    kept = [na for na in values if (n := na.uri.number) is not None and first is not None
            and same_number(n, first)]
    kept += [na for na in values if na.uri.number is None and plain_identity(na.uri)]
    return kept


def same_number(a: str, b: str) -> bool:
    """One number in two spellings: the same digits once separators, a leading ``+`` and
    an international ``00`` are dropped (+4930123456, 004930123456, 4930123456). A national
    spelling (030123456) is not taken for the international one: without the peer's plan a
    country code cannot be told apart (0301234567 and +33301234567)."""
    da, db = "".join(c for c in a if c.isdigit()), "".join(c for c in b if c.isdigit())
    if da.startswith("00"):
        da = da[2:]
    if db.startswith("00"):
        db = db[2:]
    return da == db


def national_tail(national: str, international: str) -> bool:
    """A number written nationally is the one written internationally — both as digits, the
    national one without its trunk 0: it is the international one's last six digits or more,
    with at most a country code's three ahead of them (``2125550100`` and ``12125550100``,
    ``201234567`` and ``31201234567``). Without the numbering plan this cannot be exact; the
    within-a-call From check and rule callerid's display-name check both read it so."""
    return len(national) >= 6 and len(international) - len(national) <= 3 \
        and international.endswith(national)


# Distinct diverting numbers a call is counted under (per_diverter): one INVITE must take a
# bounded number of counters (a key each; the shared-memory backend takes at most 64 per call)
MAX_DIVERTERS: Final = 16


def _diverters(msg: Message) -> tuple[str, ...]:
    """Numbers that forwarded this call: Diversion (RFC 5806) and History-Info (RFC 7044);
    the first :data:`MAX_DIVERTERS` distinct ones."""
    out: list[str] = []
    if msg.has("diversion"):
        out.extend(n for na in msg.diversions if (n := na.uri.number))
    if msg.has("history-info"):
        from sipguard.sip.history_info import diverting_entries

        out.extend(
            n for e in diverting_entries(msg.history_info) if (n := e.name_addr.uri.number)
        )
    distinct = tuple(dict.fromkeys(out))
    return distinct[:MAX_DIVERTERS] if len(distinct) > MAX_DIVERTERS else distinct


@dataclass(slots=True, init=False)
class Dialog:
    """One call through sipguard, from the accepted INVITE to its end."""

    call_id: str
    caller_tag: str
    callee_tag: str | None
    caller: str | None
    shown: str | None  # From's number where the caller is another, asserted one (CallInfo)
    callee: str | None
    diverters: tuple[str, ...]
    peer: str | None
    source: tuple[str, int]
    started: float
    expires: float  # when it ends unless a BYE/CANCEL/failure comes first (session timer or cap)
    state: str  # early -> confirmed -> terminated
    confirmed_at: float | None
    ended_at: float | None
    end_reason: str
    # the final answer its INVITE got (the 2xx that confirmed it, or what the caller heard
    # when it failed: the core's 486, a 407 challenge, sipguard's own 408 ...); 0 until then
    status: int
    labels: dict[str, str]
    hard_expires: float  # started + maximum lifetime: no refresh goes past it
    session_interval: float | None  # RFC 4028 Session-Expires of the last 2xx, seconds
    lease: str  # the id its limits are held under (the accepted CallInfo's lease)
    # The outside party: where its in-dialog requests must come from (and, over TCP, the
    # connection requests toward it reuse). For a call the core placed (``outbound``), the
    # party the INVITE was sent to.
    party: Flow | None
    outbound: bool  # the core placed the call: no policy, no limits
    # the caller's identity is withheld from the core for the whole call (rule national_cli)
    anonymise: Anonymise | None
    # a UDP caller whose Contact is not where it sends from (behind NAT, or RFC 5626 ``ob``):
    # the core's requests toward it go to the address and port it sends from
    behind_nat: bool
    acked: bool  # an ACK for the 2xx has passed (a call whose 2xx is never ACKed is ended)
    # sipguard is on the call's path (its Record-Route in the 2xx): only then do its end by
    # expiry and a missing ACK mean anything, and only then does it send BYEs to end it
    routed: bool
    # when the session timer or the lifetime ends the call: ``expires`` but for the cap of a
    # missing ACK, which the call's ACK lifts again
    session_ends: float
    # the core the call went to (or came from): its in-dialog requests go on to, and come
    # from, that core even after a reload named another (None: the configured one)
    core: Flow | None
    # the caller's peer asserts no identity (trust_pai: false): P-Asserted-Identity in its
    # in-dialog requests is not forwarded either
    pai_untrusted: bool
    # Where the outside party's in-dialog requests go, by the core side's tag they name (its
    # To tag: the core's answers with a tag, forks included; for a call the core placed, the
    # core's From tag): the core side's target (its Contact, moved by target refreshes) and
    # route set (its Record-Route entries), RFC 3261 §12.1.2, §12.2.1.1. Its requests leave
    # with those, whatever Request-URI and Route they carry; another tag is no dialog (481).
    # The first tag in fields of its own (no object made for it: a call has one), ``pin_tag``
    # None until the core side has answered with a tag; more tags (forks) in ``forks``, each
    # (target, route set, from a 2xx).
    pin_tag: str | None
    pin_target: str
    pin_routes: tuple[NameAddr, ...]
    pin_final: bool  # pinned by a 2xx: its route set is the dialog's for good
    forks: dict[str, tuple[str, tuple[NameAddr, ...], bool]] | None
    # Record-Route entries its INVITE brought from the caller's side: in the core's answers,
    # the bottom ones (the core side's are above sipguard's own)
    caller_rr: int
    size: int  # its INVITE's bytes, counted against sip.max_dialog_bytes
    # the bytes its outside party's requests in live transactions hold (their ServerTxn.charged),
    # counted against sip.max_call_request_bytes
    request_bytes: int
    # what its INVITE's From showed (a call that came in: its number as the rules read it,
    # else its user; and the number its display name showed, if any): the caller's later
    # requests show the same or are refused (RFC 3261 §12.2.1.1: From does not change in a
    # dialog), but for its ACK and BYE (proxy/core.py, _shows_another)
    from_user: str | None
    from_display: str | None

    # Hand-written __init__s in this module: mypyc compiles them, where dataclass-made ones run
    # as Python (these objects are made for every call).
    def __init__(
        self,
        call_id: str,
        caller_tag: str,
        callee_tag: str | None,
        caller: str | None,
        callee: str | None,
        diverters: tuple[str, ...],
        peer: str | None,
        source: tuple[str, int],
        started: float,
        expires: float,
        state: str = "early",
        hard_expires: float = 0.0,
        lease: str = "",
        party: Flow | None = None,
        outbound: bool = False,
        shown: str | None = None,
    ) -> None:
        self.call_id = call_id
        self.caller_tag = caller_tag
        self.callee_tag = callee_tag
        self.caller = caller
        self.shown = shown
        self.callee = callee
        self.diverters = diverters
        self.peer = peer
        self.source = source
        self.started = started
        self.expires = expires
        self.state = state
        self.confirmed_at = None
        self.ended_at = None
        self.end_reason = ""
        self.status = 0
        self.labels = {}
        self.hard_expires = hard_expires or expires
        self.session_interval = None
        self.lease = lease or f"{call_id}\n{caller_tag}"
        self.party = party
        self.outbound = outbound
        self.core = None
        self.anonymise: Anonymise | None = None
        self.behind_nat = False
        self.acked = False
        self.routed = False
        self.session_ends = self.expires
        self.pai_untrusted = False
        self.pin_tag = None
        self.pin_target = ""
        self.pin_routes = ()
        self.pin_final = False
        self.forks = None
        self.caller_rr = 0
        self.size = 0
        self.request_bytes = 0
        self.from_user = None
        self.from_display = None


@dataclass(slots=True, init=False)
class InviteDecided:
    call: CallInfo
    verdict: Verdict

    def __init__(self, call: CallInfo, verdict: Verdict) -> None:
        self.call = call
        self.verdict = verdict


@dataclass(slots=True, init=False)
class DialogStarted:
    dialog: Dialog

    def __init__(self, dialog: Dialog) -> None:
        self.dialog = dialog


@dataclass(slots=True, init=False)
class DialogEnded:
    dialog: Dialog
    # bye_caller, bye_callee, cancelled, failed, timeout, session_expired, lifetime
    reason: str

    def __init__(self, dialog: Dialog, reason: str) -> None:
        self.dialog = dialog
        self.reason = reason


@dataclass(slots=True, init=False)
class ParseFailed:
    status: int
    detail: str
    flow: Flow
    answered: bool

    def __init__(self, status: int, detail: str, flow: Flow, answered: bool) -> None:
        self.status = status
        self.detail = detail
        self.flow = flow
        self.answered = answered


@dataclass(slots=True, init=False)
class Dropped:
    """A message the proxy discarded on purpose (stray response, unroutable, ...)."""

    kind: str
    detail: str
    flow: Flow

    def __init__(self, kind: str, detail: str, flow: Flow) -> None:
        self.kind = kind
        self.detail = detail
        self.flow = flow


@dataclass(slots=True, init=False)
class Screened:
    """An out-of-dialog request from outside refused before any transaction (unknown source,
    method not allowed, suspended number): answered once, statelessly, or dropped."""

    method: str
    flow: Flow
    verdict: Verdict

    def __init__(self, method: str, flow: Flow, verdict: Verdict) -> None:
        self.method = method
        self.flow = flow
        self.verdict = verdict


@dataclass(slots=True, init=False)
class Noticed:
    """Something the operator should know that is not an error of this message (e.g. the
    core's 2xx lacks sipguard's Record-Route: its BYE will go around sipguard)."""

    kind: str
    detail: str
    flow: Flow

    def __init__(self, kind: str, detail: str, flow: Flow) -> None:
        self.kind = kind
        self.detail = detail
        self.flow = flow


@dataclass(slots=True, init=False)
class DecisionPending:
    """A decision that needs I/O (a certificate fetch, a remote store): the shell awaits
    ``pending`` and hands the verdict to the edge core's ``resolve`` (an exception too)."""

    call: CallInfo
    pending: Awaitable[Verdict]

    def __init__(self, call: CallInfo, pending: Awaitable[Verdict]) -> None:
        self.call = call
        self.pending = pending


@dataclass(slots=True, init=False)
class Deferred:
    """State work the policy could not do at once (a remote backend): the shell runs it."""

    pending: Awaitable[None]
    what: str

    def __init__(self, pending: Awaitable[None], what: str) -> None:
        self.pending = pending
        self.what = what


@dataclass(slots=True, init=False)
class SourceFlagged:
    """The flood guard objected to a message from ``addr`` before it was parsed.

    ``reason`` is ``flood`` / ``scanner`` / ``banned``; ``new_ban`` when this message started a
    ban; ``dropped`` is False in monitor mode (the message was processed anyway)."""

    reason: str
    addr: tuple[str, int]
    new_ban: bool
    dropped: bool

    def __init__(self, reason: str, addr: tuple[str, int], new_ban: bool, dropped: bool) -> None:
        self.reason = reason
        self.addr = addr
        self.new_ban = new_ban
        self.dropped = dropped


@dataclass(slots=True, init=False)
class Failed:
    """Handling one message or timer raised (a bug): only that message was lost."""

    where: str
    detail: str
    flow: Flow | None

    def __init__(self, where: str, detail: str, flow: Flow | None) -> None:
        self.where = where
        self.detail = detail
        self.flow = flow


Event = (
    InviteDecided | DialogStarted | DialogEnded | ParseFailed | Dropped | DecisionPending
    | Deferred | SourceFlagged | Failed | Screened | Noticed
)
