"""What the proxy core reports to the shell: calls to decide, decisions, dialog life, errors.

The shell turns these into log lines and metrics in one place each; the core only appends them
to ``Proxy.events``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sipguard.policy.verdict import Verdict
from sipguard.proxy.flows import Flow
from sipguard.sip.message import Message


class CallInfo:
    """The facts about an initial INVITE that rules decide on.

    Numbers are normalised by the URI grammar (visual separators removed, leading ``+`` kept)
    and None when the URI carries no telephone number.
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


@dataclass(slots=True)
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
    expires: float
    state: str = "early"  # early -> confirmed -> terminated
    confirmed_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class InviteDecided:
    call: CallInfo
    verdict: Verdict


@dataclass(slots=True)
class DialogStarted:
    dialog: Dialog


@dataclass(slots=True)
class DialogEnded:
    dialog: Dialog
    reason: str  # bye_caller, bye_callee, rejected, cancelled, failed, timeout, lifetime


@dataclass(slots=True)
class ParseFailed:
    status: int
    detail: str
    flow: Flow
    answered: bool


@dataclass(slots=True)
class Dropped:
    """A message the proxy discarded on purpose (stray response, unroutable, ...)."""

    kind: str
    detail: str
    flow: Flow


Event = InviteDecided | DialogStarted | DialogEnded | ParseFailed | Dropped
