"""The edge core: the RFC 3261 proxy and the policy as one sans-I/O state machine.

Theory of operation
-------------------
The shell feeds it bytes and time and drains what it produces — the aioquic shape::

    core.receive(data, flow, now)      # one datagram, or one framed TCP message
    core.handle_timer(now)             # when core.next_deadline() has passed
    core.resolve(call, verdict, now)   # a decision that waited for I/O is in
    core.outbox -> [(Flow, bytes)]     # to send, in order
    core.drain_events() -> [Event]     # to log and count (sipguard.contract)

Inside, one message goes one way: the flood guard looks at the raw bytes; the proxy
(:mod:`sipguard.proxy.core`) parses it and runs the transaction machinery; for an initial
INVITE the proxy asks this core (its :class:`~sipguard.proxy.core.Admission`) for a verdict,
which asks the policy (:mod:`sipguard.policy.engine`). A rule that admits the call *takes*
what it counts — a concurrency lease, rate tokens, dialer window entries — in that same
synchronous step, and the proxy reports, still in that step, whether the call became a dialog
(the lease is handed to it) or was given up (the lease goes back). Dialog ends reach the
policy the same way. So the INVITEs read in one pass of the event loop are counted exactly as
if they had come one by one, and the shell never changes policy state.

A decision that needs I/O (an uncached STIR/SHAKEN certificate; a remote state store) comes
back from the policy as an awaitable. The core leaves the INVITE in its server transaction
(retransmissions absorbed, a CANCEL answered) and reports :class:`DecisionPending`; the shell
awaits it and calls :meth:`EdgeCore.resolve` — the one way back in. Whatever the decision took
before it waited stays taken until the verdict is applied or the call is given up.

Failure stays local: an exception while handling one message or timer rolls back what that
message had queued to send, is reported as :class:`Failed`, and the next message is handled
as usual. Nothing in here reads a clock or touches a socket; ``perf`` (a monotonic counter
the shell passes in) is read only to report how long decisions took.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from sipguard.contract import (
    CallInfo,
    DecisionPending,
    Deferred,
    Dialog,
    Event,
    Failed,
    Flow,
    SourceFlagged,
    Verdict,
)
from sipguard.policy import flood
from sipguard.policy.engine import Policy
from sipguard.proxy.core import Proxy
from sipguard.proxy.settings import ProxySettings
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message


def _no_perf() -> float:
    return 0.0


def overload_verdict(retry_after_s: int) -> Verdict:
    """The answer to a new call while sipguard is overloaded: 503 with Retry-After (RFC 3261
    §21.5.4), its log line sampled."""
    return Verdict(
        "reject", rule="overload", reason="overloaded", status=503,
        phrase="Service Unavailable",
        headers=(f"Retry-After: {retry_after_s}",), sample="overload",
    )


# What a call hears when deciding it raised (a bug in a rule): fails closed.
DECISION_FAILED: Final = Verdict("reject", rule="internal", reason="decision_failed", status=500,
                                 phrase="Server Internal Error")


class EdgeCore:
    """One sipguard instance's protocol and policy logic, with no I/O."""

    def __init__(
        self,
        settings: ProxySettings,
        policy: Policy,
        secret: bytes,
        *,
        overload_retry_after_s: int = 5,
        perf: Callable[[], float] = _no_perf,
    ) -> None:
        self.policy = policy
        self.perf = perf
        # Set by the shell's overload watcher: new calls are answered 503 at once meanwhile.
        self.overloaded = False
        self._overload = overload_verdict(overload_retry_after_s)
        # Set by the shell on SIGTERM: new calls hear 503 while the calls up finish.
        self.draining = False
        self._draining = Verdict(
            "reject", rule="drain", reason="draining", status=503, phrase="Service Unavailable",
            headers=(f"Retry-After: {overload_retry_after_s}",), sample="drain",
        )
        self.proxy = Proxy(settings, self, secret)
        policy.activate()

    # ------------------------------------------------------------------ the shell's side
    @property
    def outbox(self) -> list[tuple[Flow, bytes]]:
        """What to send, in order; the shell empties it (``outbox.clear()``) after sending."""
        return self.proxy.outbox

    def drain_events(self) -> list[Event]:
        """The events since the last drain, oldest first."""
        events = self.proxy.events
        if not events:
            return events
        self.proxy.events = []
        return events

    def next_deadline(self) -> float | None:
        return self.proxy.next_deadline()

    def flood_check(self, data: bytes, flow: Flow, now: float) -> bool:
        """The flood guard alone: False when the message is to be dropped (reported)."""
        guard = self.policy.flood
        if guard is not None and (why := guard.check(flow.addr, data, now)) is not None:
            dropped = not guard.monitor
            new_ban = why == flood.FLOOD or (why == flood.SCANNER and guard.banned(flow.addr))
            self.proxy.events.append(SourceFlagged(why, flow.addr, new_ban, dropped))
            return not dropped
        return True

    def receive(self, data: bytes, flow: Flow, now: float, screened: bool = False) -> None:
        """One received message: flood guard (unless ``screened`` already, by the worker that
        read it and handed it over), then the proxy (and through it the policy)."""
        if not screened and self.policy.flood is not None and not self.flood_check(data, flow, now):
            return
        if flow.transport == "udp" and len(data) <= 4 and not data.strip(b"\r\n"):
            return  # CRLF keep-alive over UDP (RFC 5626 §4.4.1): nothing to answer
        mark = len(self.proxy.outbox)
        try:
            self.proxy.receive(data, flow, now)
        except Exception:  # a bug must cost this one message, never the others or the process
            del self.proxy.outbox[mark:]
            self.proxy.events.append(Failed("receive", traceback.format_exc(limit=8), flow))

    def handle_timer(self, now: float) -> None:
        mark = len(self.proxy.outbox)
        try:
            self.proxy.handle_timer(now)
        except Exception:
            del self.proxy.outbox[mark:]
            self.proxy.events.append(Failed("timer", traceback.format_exc(limit=8), None))

    def resolve(self, call: CallInfo, verdict: Verdict, now: float) -> None:
        """Apply a decision that waited for I/O (or the verdict for its failure)."""
        if call.started_perf:
            call.decision_us = (self.perf() - call.started_perf) * 1e6
        if verdict.action == "accept":
            # a suspension that landed while the decision waited (a certificate fetch, a Redis
            # round trip) holds for this call too: it is no call of the past yet
            try:
                suspended = self.policy.suspension_of(call, now)
            except Exception:  # refused (500) rather than let through unchecked
                self.proxy.events.append(Failed("resolve", traceback.format_exc(limit=8),
                                                call.flow))
                suspended = DECISION_FAILED
            if suspended is not None:
                # what rules in monitor mode said stays counted and logged beside it
                verdict = suspended.with_also((verdict, *verdict.also)) if verdict.monitored \
                    else suspended
        mark = len(self.proxy.outbox)
        try:
            self.proxy.resolve(call, verdict, now)
        except Exception:
            del self.proxy.outbox[mark:]
            self.proxy.events.append(Failed("resolve", traceback.format_exc(limit=8), call.flow))

    def reconfigure(self, settings: ProxySettings, policy: Policy, now: float) -> None:
        """Swap in a new config's settings and policy (reload). Transactions, dialogs and the
        rules' state carry on; a rule the reload turned on starts from the calls up now."""
        previous, self.policy = self.policy, policy
        policy.activate()
        self.proxy.configure(settings)
        # the calls that came in (a call the core places passes no rule and takes no slot)
        inbound = [d for d in self.proxy.dialogs.values() if not d.outbound]
        self._defer(policy.adopt(previous, inbound, now), "resync")

    def end_calls(self, matches: Callable[[str | None], bool], reason: str, now: float) -> int:
        """End at once every call whose caller or called number ``matches`` (see
        :meth:`calls_of`, :meth:`end_these`); how many."""
        return self.end_these(self.calls_of(matches), reason, now)

    def calls_of(self, matches: Callable[[str | None], bool]) -> list[Dialog]:
        """The live calls whose caller or called number ``matches`` (or the number its From
        shows, where the caller is another, asserted one): a suspension's."""
        return [dialog for dialog in self.proxy.dialogs.values()
                if matches(dialog.caller) or matches(dialog.callee) or (
                    dialog.shown is not None and matches(dialog.shown))]

    def end_these(self, dialogs: list[Dialog], reason: str, now: float) -> int:
        """End ``dialogs`` now — as a suspension refuses new calls from or to them: an
        answered one with a BYE to both sides, a ringing one with a CANCEL toward its called
        side (slots freed as each ends; one that ended meanwhile is passed over); how many."""
        ended = 0
        early: list[Dialog] = []
        for dialog in dialogs:
            if self.proxy.end_call(dialog, reason, now):
                ended += 1
            elif dialog.state == "early":
                early.append(dialog)
        if early:
            ended += self.proxy.cancel_early(early, reason, now)
        return ended

    def end_all(self, reason: str, now: float) -> None:
        """Shutting down: every call ends now (see :meth:`Proxy.end_all`); a ringing one's
        caller hears the draining answer, 503 with Retry-After."""
        mark = len(self.proxy.outbox)
        try:
            self.proxy.end_all(reason, now, self._draining.headers)
        except Exception:
            del self.proxy.outbox[mark:]
            self.proxy.events.append(Failed("end_all", traceback.format_exc(limit=8), None))

    def housekeep(self, now: float) -> None:
        """Every few seconds: forget flood bans and subscriptions that have run out."""
        guard = self.policy.flood
        if guard is not None:
            guard.state.sweep(now)
        self.proxy.subscriptions.sweep(now)

    def set_overload_retry_after(self, retry_after_s: int) -> None:
        self._overload = overload_verdict(retry_after_s)

    # ------------------------------------------------------------------ Admission (the proxy's side)
    def decide(self, call: CallInfo, now: float) -> Verdict | None:
        # (Overload is answered earlier, in screen: the same INVITE passed there first, in
        # the same synchronous receive.)
        if self.draining:
            return self._draining
        perf = self.perf
        started = perf()
        call.started_perf = started
        try:
            answer = self.policy.decide(call, now)
        except Exception:  # a rule's bug costs this call (500), never the others in the pass
            self.proxy.events.append(Failed("decide", traceback.format_exc(limit=8), call.flow))
            answer = DECISION_FAILED
        if isinstance(answer, Verdict):
            call.decision_us = (perf() - started) * 1e6
            return answer
        self.proxy.events.append(DecisionPending(call, answer))
        return None

    def dialog_started(self, dialog: Dialog, now: float) -> None:
        self._defer(self.policy.dialog_started(dialog, now), "dialog_started")

    def dialog_ended(self, dialog: Dialog, now: float) -> None:
        self._defer(self.policy.dialog_ended(dialog, now), "dialog_ended")

    def abandoned(self, call: CallInfo, now: float) -> None:
        self._defer(self.policy.abandoned(call, now), "abandoned")

    def screen(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        try:
            verdict = self.policy.screen(msg, flow, now)  # an unknown source first: silence
        except SipParseError:
            raise  # a From / PAI / URI the suspended-number check reads is malformed: a 400
        except Exception:  # fails closed, like a rule that raises
            self.proxy.events.append(Failed("screen", traceback.format_exc(limit=8), flow))
            return DECISION_FAILED
        if self.overloaded and msg.method == "INVITE" and (
            verdict is None or verdict.action == "accept"  # (monitored: shed all the same)
        ):
            # Shed before the proxy keeps anything: a stateless 503 (no transaction, no 100,
            # no timers, not retransmitted — a retransmitted INVITE is answered again), the
            # cheapest answer there is, while sipguard is behind.
            return self._overload
        return verdict

    def screen_transfer(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        return self.policy.screen_transfer(msg, flow, now)

    def silent_to(self, flow: Flow) -> bool:
        return self.policy.silent_to(flow)

    def same_party(self, dialog: Dialog, flow: Flow) -> bool:
        return self.policy.same_party(dialog, flow)

    def same_peer(self, sent: Flow, flow: Flow) -> bool:
        return self.policy.same_peer(sent, flow)

    def asserts_identity(self, flow: Flow) -> bool:
        return self.policy.asserts_identity(flow)

    def asserts_caller(self, dialog: Dialog, msg: Message) -> bool:
        return self.policy.asserts_caller(dialog, msg)

    def _defer(self, pending: Iterable[Awaitable[None]], what: str) -> None:
        for aw in pending:
            self.proxy.events.append(Deferred(aw, what))
