"""Helpers for whole calls through the in-memory edge core with a real Policy: in-dialog
requests (ACK, BYE, re-INVITE, UPDATE, CANCEL) and a Harness around :class:`EdgeCore`."""

from __future__ import annotations

from typing import Any

from sipguard.contract import DialogEnded, Flow, InviteDecided, Verdict
from sipguard.edge import EdgeCore
from sipguard.ops.config_load import parse_config
from sipguard.policy.concurrency import Tracker
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.sip.message import Message
from tests.unit.proxy_helpers import CALLER, CORE, Harness, answer, invite, settings

MINIMAL = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"
ROUTE = "Route: <sip:192.0.2.1:5060;lr>\r\n"


def in_dialog(
    method: str,
    *,
    call_id: str,
    cseq: int,
    branch: str,
    caller: str = "+12125550100",
    callee: str = "+18005550199",
    to_tag: str = "ttag9",
    from_callee: bool = False,
    extra: str = "",
) -> bytes:
    """An in-dialog request from the caller (to the core's Contact) or from the core."""
    if from_callee:
        start = f"{method} sip:{caller}@198.51.100.7:5062 SIP/2.0"
        via = f"SIP/2.0/UDP 10.0.0.10:5080;branch={branch}"
        frm = f"<sip:{callee}@192.0.2.1>;tag={to_tag}"
        to = f"<sip:{caller}@198.51.100.7>;tag=ftag1"
    else:
        start = f"{method} sip:core@10.0.0.10:5080 SIP/2.0"
        via = f"SIP/2.0/UDP 198.51.100.7:5062;branch={branch}"
        frm = f"<sip:{caller}@198.51.100.7>;tag=ftag1"
        to = f"<sip:{callee}@192.0.2.1>;tag={to_tag}"
    return (
        f"{start}\r\nVia: {via}\r\n{ROUTE}Max-Forwards: 70\r\nFrom: {frm}\r\nTo: {to}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def cancel(*, call_id: str, branch: str, caller: str = "+12125550100",
           callee: str = "+18005550199") -> bytes:
    """A CANCEL for the INVITE sent with ``invite(branch=..., call_id=...)``."""
    return (
        f"CANCEL sip:{callee}@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch={branch}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:{caller}@198.51.100.7>;tag=ftag1\r\nTo: <sip:{callee}@192.0.2.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def to(out: list[tuple[Flow, Message]], addr: tuple[str, int]) -> list[Message]:
    return [m for f, m in out if f.addr == addr]


class PolicyHarness(Harness):
    """The in-memory edge core deciding with a Policy built from YAML: dialog starts and ends
    reach the policy inside the core, exactly as in sipguard."""

    def __init__(self, rules_yaml: str = "", *, state: RuleState | None = None,
                 extra_yaml: str = "", **kw: object) -> None:
        self.state = RuleState() if state is None else state
        policy = Policy(parse_config(MINIMAL + extra_yaml + rules_yaml), self.state)
        self.verdicts: list[Verdict] = []
        self.counts_seen: list[int] = []
        self.core = EdgeCore(settings(**kw), policy, b"k" * 32)
        self.admission = None
        self.proxy = self.core.proxy
        self.now = 1000.0
        self.events: list[object] = []

    @property
    def policy(self) -> Policy:
        return self.core.policy

    def reload(self, rules_yaml: str, extra_yaml: str = "") -> None:
        """Build a new Policy on the same state and swap it in, as a reload does."""
        policy = Policy(parse_config(MINIMAL + extra_yaml + rules_yaml), self.state)
        self.core.reconfigure(self.proxy.settings, policy, self.now)

    def feed(self, data: bytes, src: tuple[str, int] = CALLER, transport: str = "udp",
             conn: int | None = None) -> None:
        self.core.receive(data, Flow(transport, src, 0 if transport == "udp" else 1, conn),
                          self.now)

    def fire_timers(self) -> None:
        self.core.handle_timer(self.now)

    def take_events(self) -> list[object]:
        events: list[object] = list(self.core.drain_events())
        for event in events:
            if isinstance(event, InviteDecided):
                self.verdicts.append(event.verdict)
        return events

    @property
    def tracker(self) -> Tracker:
        return self.state.tracker

    def count(self, kind: str, number: str) -> int:
        return self.tracker.counts(kind, number)

    def ended(self) -> list[str]:
        return [e.reason for e in self.events if isinstance(e, DialogEnded)]

    # ------------------------------------------------------------------ call steps
    def call(self, n: int, *, caller: str = "+12125550100", callee: str = "+18005550199",
             extra: str = "", src: tuple[str, int] = CALLER) -> tuple[list[Message], Message | None]:
        """Send INVITE number ``n``; return (what the caller got, the INVITE the core got)."""
        out = self.send(invite(branch=f"z9hG4bK-c{n}", call_id=f"call-{n}", caller=caller,
                               callee=callee, extra=extra), src=src)
        fwd = to(out, CORE)
        return [m for f, m in out if f.addr != CORE], (fwd[0] if fwd else None)

    def answer(self, req: Message, status: int, phrase: str = "X", extra: str = "") -> list[
        Message
    ]:
        return to(self.send(answer(req, status, phrase, extra=extra), src=CORE), CALLER)

    def bye(self, n: int, *, cseq: int = 2, from_callee: bool = False, answered: bool = True,
            **kw: Any) -> list[tuple[Flow, Message]]:
        """A BYE from the caller (or the core); a caller's BYE that reaches the core is
        answered 200 by it unless ``answered`` is False (the call ends on that answer)."""
        data = in_dialog("BYE", call_id=f"call-{n}", cseq=cseq, branch=f"z9hG4bK-bye{n}-{cseq}",
                         from_callee=from_callee, **kw)
        out = self.send(data, src=CORE if from_callee else CALLER)
        byes = [m for m in to(out, CORE) if m.method == "BYE"]
        if answered and byes and not from_callee:
            out += self.send(answer(byes[0], 200, "OK"), src=CORE)
        return out
