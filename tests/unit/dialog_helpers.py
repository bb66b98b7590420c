"""Helpers for whole calls through the in-memory proxy with a real Policy: in-dialog requests
(ACK, BYE, re-INVITE, UPDATE, CANCEL) and a Harness that delivers dialog events to the policy
the way the asyncio shell does."""

from __future__ import annotations

from typing import Any

from sipguard.ops.config import parse_config
from sipguard.policy.concurrency import SHARED_KEY, Tracker
from sipguard.policy.engine import Policy
from sipguard.policy.verdict import Verdict
from sipguard.proxy.events import CallInfo, DialogEnded, DialogStarted, InviteDecided
from sipguard.proxy.flows import Flow
from sipguard.sip.message import Message
from tests.unit.proxy_helpers import CALLER, CORE, Harness, answer, invite

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
    """The in-memory proxy deciding with a Policy built from YAML, and dialog starts / ends
    delivered to it after every message and timer, as the shell does."""

    def __init__(self, rules_yaml: str = "", *, shared: dict[str, Any] | None = None,
                 extra_yaml: str = "", **kw: object) -> None:
        self.shared: dict[str, Any] = {} if shared is None else shared
        self.policy = Policy(parse_config(MINIMAL + extra_yaml + rules_yaml), self.shared)
        self.verdicts: list[Verdict] = []
        self.counts_seen: list[int] = []
        super().__init__(decide=self._decide, **kw)

    def reload(self, rules_yaml: str, extra_yaml: str = "") -> None:
        """Build a new Policy on the same shared state and swap it in, as a reload does."""
        previous = self.policy
        self.policy = Policy(parse_config(MINIMAL + extra_yaml + rules_yaml), self.shared)
        assert not self.policy.adopt(previous, self.proxy.dialogs.values(), self.now)

    def _decide(self, call: CallInfo, now: float) -> Verdict:
        verdict = self.policy.decide(call, now)
        assert isinstance(verdict, Verdict)
        return verdict

    def _drain(self) -> list[tuple[Flow, Message]]:
        for event in self.proxy.events:
            if isinstance(event, DialogStarted):
                assert not self.policy.dialog_started(event.dialog, self.now)
            elif isinstance(event, DialogEnded):
                assert not self.policy.dialog_ended(event.dialog, self.now)
            elif isinstance(event, InviteDecided):
                self.verdicts.append(event.verdict)
        return super()._drain()

    @property
    def tracker(self) -> Tracker:
        tracker = self.shared[SHARED_KEY]
        assert isinstance(tracker, Tracker)
        return tracker

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

    def bye(self, n: int, *, cseq: int = 2, from_callee: bool = False, **kw: Any) -> list[
        tuple[Flow, Message]
    ]:
        data = in_dialog("BYE", call_id=f"call-{n}", cseq=cseq, branch=f"z9hG4bK-bye{n}-{cseq}",
                         from_callee=from_callee, **kw)
        return self.send(data, src=CORE if from_callee else CALLER)
