"""What the proxy core reports to the shell: calls to decide, decisions, dialog life, errors.

The shell turns these into log lines and metrics in one place each; the core only appends them
to ``Proxy.events``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipguard.policy.verdict import Verdict
from sipguard.proxy.flows import Flow
from sipguard.sip.message import Message


class CallInfo:
    """The facts about an initial INVITE that rules decide on.

    Numbers are normalised by the URI grammar (visual separators removed, leading ``+`` kept)
    and None when the URI carries no telephone number.

    ``labels`` are low-cardinality facts rules report about the call whatever the verdict
    (``identity=passed``, ``identity_attest=A``): the shell adds them to the decision log line
    and counts each ``name_value``; a later rule may read what an earlier one found.
    """

    __slots__ = (
        "msg",
        "flow",
        "call_id",
        "caller",
        "callee",
        "diverters",
        "peer",
        "decision_us",
        "received_at",
        "labels",
    )

    def __init__(self, msg: Message, flow: Flow, now: float) -> None:
        self.msg = msg
        self.flow = flow
        self.call_id = msg.call_id
        pais = msg.p_asserted_identities if msg.has("p-asserted-identity") else []
        caller_uri = pais[0].uri if pais else msg.from_.uri
        self.caller: str | None = caller_uri.number
        self.callee: str | None = msg.request_uri.number or msg.to.uri.number
        self.diverters: tuple[str, ...] = _diverters(msg)
        self.peer: str | None = None
        self.decision_us: float = 0.0
        self.received_at = now
        self.labels: dict[str, str] = {}


def _diverters(msg: Message) -> tuple[str, ...]:
    """Numbers that forwarded this call: Diversion (RFC 5806) and History-Info (RFC 7044)."""
    out: list[str] = []
    if msg.has("diversion"):
        out.extend(n for na in msg.diversions if (n := na.uri.number))
    if msg.has("history-info"):
        from sipguard.sip.history_info import diverting_entries

        out.extend(
            n for e in diverting_entries(msg.history_info) if (n := e.name_addr.uri.number)
        )
    return tuple(dict.fromkeys(out))


@dataclass(slots=True, init=False)
class Dialog:
    """One call through sipguard, from the accepted INVITE to its end."""

    call_id: str
    caller_tag: str
    callee_tag: str | None
    caller: str | None
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
    labels: dict[str, str]
    hard_expires: float  # started + maximum lifetime: no refresh goes past it
    session_interval: float | None  # RFC 4028 Session-Expires of the last 2xx, seconds

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
    ) -> None:
        self.call_id = call_id
        self.caller_tag = caller_tag
        self.callee_tag = callee_tag
        self.caller = caller
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
        self.labels = {}
        self.hard_expires = hard_expires or expires
        self.session_interval = None


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


Event = InviteDecided | DialogStarted | DialogEnded | ParseFailed | Dropped
