"""Observability: the edge core's events turned into log lines and counters, in one place.

The edge core (:mod:`sipguard.edge`) reports what happened as events
(:mod:`sipguard.contract`); :class:`Observer` is the only code that turns them into the
decision log (``invite_decided``, ``dialog_ended``; numbers per ``log.numbers``,
:mod:`sipguard.ops.privacy`), the sampled warnings (``parse_error``,
``message_dropped``, ``source_banned``, ``message_failed``) and the counters behind
``/metrics``. Events that ask for work (``DecisionPending``, ``Deferred``) are the shell's, not
this module's.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from sipguard.contract import (
    DialogEnded,
    DialogStarted,
    Dropped,
    Event,
    Failed,
    InviteDecided,
    Noticed,
    ParseFailed,
    Screened,
    SourceFlagged,
)
from sipguard.ops.calllog import CallLogger, LineKeys
from sipguard.ops.logging import SampledLogger
from sipguard.ops.metrics import Metrics
from sipguard.ops.privacy import NumberPrivacy
from sipguard.policy.flood import FloodGuard

# The fields of the two lines every call writes, in the order their values are passed.
DECIDED: Final = LineKeys("call_id", "source", "transport", "peer", "caller", "callee",
                          "diverters", "verdict", "monitored", "rule", "reason", "status",
                          "detail", "decision_us")
ENDED: Final = LineKeys("call_id", "caller", "callee", "peer", "reason", "status",
                        "duration_s", "lifetime_s")


class Observer:
    """Log lines and counters from events."""

    def __init__(
        self, metrics: Metrics, log: Any, call_log: CallLogger, sampled: SampledLogger
    ) -> None:
        self.metrics = metrics
        self.counters: Counter[str] = metrics.events  # every counter is exported too
        self.log = log
        self.call_log = call_log
        self.sampled = sampled
        self.flood: FloodGuard | None = None  # for the ban length in source_banned lines
        # log.numbers masked / hashed: numbers go through it; None (full): written as they are
        self.privacy: NumberPrivacy | None = None

    def observe(self, event: Event) -> None:
        c = self.counters
        if isinstance(event, InviteDecided):
            self._decided(event)
        elif isinstance(event, DialogStarted):
            c["dialogs_started"] += 1
        elif isinstance(event, DialogEnded):
            d = event.dialog
            c["dialogs_ended"] += 1
            c[f"dialogs_ended_{event.reason}"] += 1
            self.metrics.ended[(event.reason, d.peer or "")] += 1
            end = d.ended_at or d.started
            caller, callee, p = d.caller, d.callee, self.privacy
            if p is not None:
                caller, callee = p(caller), p(callee)
            self.call_log.line("dialog_ended", ENDED, (
                d.call_id, caller, callee, d.peer, event.reason, d.status or None,
                round(end - (d.confirmed_at or end), 3), round(end - d.started, 3),
            ))
        elif isinstance(event, ParseFailed):
            c["parse_errors"] += 1
            self.sampled.log(
                "warning",
                "parse_error",
                key=f"parse:{event.flow.addr[0]}:{event.status}",
                source=event.flow.addr[0],
                status=event.status,
                detail=event.detail,
                answered=event.answered,
            )
        elif isinstance(event, Dropped):
            c[f"dropped_{event.kind}"] += 1
            self.sampled.log(
                "info",
                "message_dropped",
                key=f"drop:{event.kind}",
                kind=event.kind,
                source=event.flow.addr[0],
                detail=event.detail,
            )
        elif isinstance(event, SourceFlagged):
            self._flagged(event)
        elif isinstance(event, Screened):
            self._screened(event)
        elif isinstance(event, Noticed):
            c[f"noticed_{event.kind}"] += 1
            self.sampled.log("warning", event.kind, key=f"noticed:{event.kind}",
                             source=event.flow.addr[0], detail=event.detail)
        elif isinstance(event, Failed):
            c["internal_errors"] += 1
            source = event.flow.addr[0] if event.flow is not None else None
            self.sampled.log("error", "message_failed", key=f"failed:{event.where}",
                             where=event.where, source=source, traceback=event.detail)

    def _decided(self, event: InviteDecided) -> None:
        c = self.counters
        call, v = event.call, event.verdict
        c[f"invites_{v.action}"] += 1
        verdict = "monitored" if v.monitored else v.action
        self.metrics.invites[(verdict, v.rule, call.peer or "")] += 1
        self.metrics.decision(call.decision_us / 1e6)
        for label, value in call.labels.items():
            c[f"{label}_{value}"] += 1
        if v.monitored:
            c["invites_monitored"] += 1
        if v.reason:
            c[f"rule_{v.rule}_{v.reason}"] += 1
        labels = call.labels or None
        if v.also:  # the other rules in monitor mode that would have refused the call
            for a in v.also:
                c[f"rule_{a.rule}_{a.reason}"] += 1
            labels = {**call.labels,
                      "also_monitored": ",".join(f"{a.rule}:{a.reason}" for a in v.also)}
        caller, callee = call.caller, call.callee
        diverters: list[str] | None = list(call.diverters) or None
        detail = dict(v.detail) if v.detail else None
        p = self.privacy
        if p is not None:
            caller, callee = p(caller), p(callee)
            diverters = p.many(diverters) if diverters else None
            detail = p.detail(detail) if detail else None
        values: tuple[Any, ...] = (
            call.call_id, f"{call.flow.addr[0]}:{call.flow.addr[1]}", call.flow.transport,
            call.peer, caller, callee, diverters, v.action, v.monitored or None,
            v.rule or None, v.reason or None, v.status or None, detail,
            round(call.decision_us, 1),
        )
        if v.sample:  # a verdict that comes in floods: one line per key and interval
            self.sampled.log("info", "invite_decided", key=v.sample,
                             **dict(zip(DECIDED.names, values, strict=True)), **(labels or {}))
            return
        self.call_log.line("invite_decided", DECIDED, values, labels)

    def _screened(self, event: Screened) -> None:
        """An out-of-dialog request refused (or, monitored, let through) before it got a
        transaction. INVITEs are logged as ``invite_decided`` like every other call decision,
        other methods as ``request_screened``; both sampled per source and reason."""
        c = self.counters
        v, flow = event.verdict, event.flow
        verdict = "monitored" if v.monitored else v.action
        c[f"rule_{v.rule}_{v.reason}"] += 1
        if v.rule == "overload":
            c["overload_rejected"] += 1
        source = f"{flow.addr[0]}:{flow.addr[1]}"
        key = f"screen:{v.rule}:{v.reason}:{flow.addr[0]}"
        if event.method == "INVITE":
            c[f"invites_{v.action}"] += 1
            self.metrics.invites[(verdict, v.rule, "")] += 1
            self.sampled.log("info", "invite_decided", key=key, source=source,
                             transport=flow.transport, verdict=v.action,
                             monitored=v.monitored or None, rule=v.rule, reason=v.reason,
                             status=v.status or None)
            return
        c[f"requests_{verdict}"] += 1
        self.sampled.log("info", "request_screened", key=key, method=event.method,
                         source=source, transport=flow.transport, verdict=v.action,
                         monitored=v.monitored or None, rule=v.rule, reason=v.reason,
                         status=v.status or None)

    def _flagged(self, event: SourceFlagged) -> None:
        """A message the flood guard objected to: counted; a new ban is logged (sampled)."""
        why, addr = event.reason, event.addr
        self.counters[f"flood_{'dropped' if event.dropped else 'monitored'}_{why}"] += 1
        if not event.new_ban:
            return
        self.counters[f"flood_banned_{why}"] += 1
        guard = self.flood
        by_ip = guard.by_ip if guard is not None else True
        key = addr[0] if by_ip else f"{addr[0]}:{addr[1]}"
        self.sampled.log("warning", "source_banned", key=f"ban:{key}", source=addr[0],
                         port=addr[1], reason=why,
                         ban_s=guard.ban_s if guard is not None else None,
                         monitored=(not event.dropped) or None)
