"""Helpers for driving the sans-I/O proxy in memory: bytes in, bytes out, a fake clock."""

from __future__ import annotations

from collections.abc import Callable

from sipguard.contract import CallInfo, Dialog, Flow, Local, Verdict
from sipguard.proxy.core import Proxy
from sipguard.proxy.settings import ProxySettings
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message

Decide = Callable[[CallInfo, float], Verdict | None]

PROXY = ("192.0.2.1", 5060)
CORE = ("10.0.0.10", 5080)
CALLER = ("198.51.100.7", 5062)

LOCALS = (Local(0, "udp", "192.0.2.1", 5060), Local(1, "tcp", "192.0.2.1", 5060))


def settings(**kw: object) -> ProxySettings:
    base: dict[str, object] = {"locals": LOCALS, "core": Flow("udp", CORE, 0)}
    base.update(kw)
    return ProxySettings(**base)  # type: ignore[arg-type]


class DecideOnly:
    """An admission that asks one function for verdicts and keeps no state (proxy tests)."""

    def __init__(self, decide: Decide) -> None:
        self.decide = decide
        self.started: list[Dialog] = []
        self.ended: list[Dialog] = []
        self.abandoned_calls: list[CallInfo] = []

    def dialog_started(self, dialog: Dialog, now: float) -> None:
        self.started.append(dialog)

    def dialog_ended(self, dialog: Dialog, now: float) -> None:
        self.ended.append(dialog)

    def abandoned(self, call: CallInfo, now: float) -> None:
        self.abandoned_calls.append(call)

    def screen(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        return None

    def same_party(self, dialog: Dialog, flow: Flow) -> bool:
        return False

    def same_peer(self, sent: Flow, flow: Flow) -> bool:
        return False

    def screen_transfer(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        return None

    def silent_to(self, flow: Flow) -> bool:
        return False

    def asserts_identity(self, flow: Flow) -> bool:
        return True

    def asserts_caller(self, dialog: Dialog, msg: Message) -> bool:
        return True


class Harness:
    """A proxy plus a clock; ``send`` feeds bytes and returns what the proxy sent."""

    def __init__(self, decide: Decide | None = None, **kw: object) -> None:
        self.admission = DecideOnly(decide) if decide is not None else None
        self.proxy = Proxy(settings(**kw), self.admission, b"k" * 32)
        self.now = 1000.0
        self.events: list[object] = []

    def send(self, data: bytes, src: tuple[str, int] = CALLER, transport: str = "udp",
             conn: int | None = None) -> list[tuple[Flow, Message]]:
        self.feed(data, src, transport, conn)
        return self._drain()

    def feed(self, data: bytes, src: tuple[str, int] = CALLER, transport: str = "udp",
             conn: int | None = None) -> None:
        """Hand one message to the core without draining what it sends (a burst)."""
        self.proxy.receive(data, Flow(transport, src, 0 if transport == "udp" else 1, conn),
                           self.now)

    def fire_timers(self) -> None:
        self.proxy.handle_timer(self.now)

    def advance(self, seconds: float) -> list[tuple[Flow, Message]]:
        """Move the clock forward, firing every timer on the way in order."""
        end = self.now + seconds
        out: list[tuple[Flow, Message]] = []
        while True:
            deadline = self.proxy.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self.fire_timers()
            out.extend(self._drain())
        self.now = end
        return out

    def _drain(self) -> list[tuple[Flow, Message]]:
        out = [(flow, parse_message(data)) for flow, data in self.proxy.outbox]
        self.raw = [data for _, data in self.proxy.outbox]
        self.proxy.outbox.clear()
        self.events.extend(self.take_events())
        return out

    def take_events(self) -> list[object]:
        events = list(self.proxy.events)
        self.proxy.events.clear()
        return events


def invite(
    *,
    branch: str = "z9hG4bK-caller-1",
    call_id: str = "call-1@caller",
    caller: str = "+12125550100",
    callee: str = "+18005550199",
    extra: str = "",
    max_forwards: int | None = 70,
    uri: str | None = None,
    via_host: str = "198.51.100.7:5062",
    cseq: int = 1,
    to_tag: bool = False,
) -> bytes:
    body = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    mf = f"Max-Forwards: {max_forwards}\r\n" if max_forwards is not None else ""
    ruri = uri or f"sip:{callee}@192.0.2.1:5060;user=phone"
    return (
        f"INVITE {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via_host};branch={branch}\r\n"
        f"{mf}"
        f"From: <sip:{caller}@198.51.100.7>;tag=ftag1\r\n"
        f"To: <sip:{callee}@192.0.2.1>{';tag=ttag9' if to_tag else ''}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} INVITE\r\n"
        f"Contact: <sip:{caller}@198.51.100.7:5062>\r\n"
        f"X-Custom:   kept   exactly\r\n"
        f"{extra}"
        f"Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def answer(req: Message, status: int, phrase: str, *, to_tag: str | None = "ttag9",
           extra: str = "") -> bytes:
    """A response from the core to the request the proxy forwarded (all Vias copied)."""
    vias = "".join(f"Via: {v}\r\n" for v in req.values("via"))
    rr = "".join(f"Record-Route: {v}\r\n" for v in req.values("record-route"))
    to = req.get("to") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    return (
        f"SIP/2.0 {status} {phrase}\r\n{vias}{rr}"
        f"From: {req.get('from')}\r\nTo: {to}\r\nCall-ID: {req.call_id}\r\n"
        f"CSeq: {req.get('cseq')}\r\nContact: <sip:core@10.0.0.10:5080>\r\n{extra}"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def reject_all(status: int) -> Decide:
    def decide(call: CallInfo, now: float) -> Verdict:
        return Verdict("reject", rule="test", reason="test", status=status)

    return decide
