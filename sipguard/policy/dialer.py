"""Rule ``dialer``: dialer analytics over sliding windows, with a tag and a block threshold each.

This module is the rule: :class:`Dialer` decides each initial INVITE, :func:`build` makes it
for a peer. Its parameters — every analytic with its thresholds and defaults — are
:class:`~sipguard.policy.dialer_settings.Settings`; what it counts and remembers is
:class:`~sipguard.policy.dialer_state.DialerState`.

What it looks for (each analytic its own section; ``null`` turns it off; each overridable per
peer): per caller number, the distinct numbers it calls (``distinct_callees``), its share of
short answered calls (``short_calls``), its answer-seizure ratio (``asr``) and runs of called
numbers each one higher than the last (``sequential``, also per peer/source); per peer (with no
peers configured: per source IP address), one-off caller numbers (``caller_rotation``) and
calls concentrated on one called number or on high-cost prefixes (``pumping``). A *tag*
threshold marks the call for the core (``verdict_header``) and the decision log; a *block*
threshold answers ``603 Network Blocked`` with the ATIS-1000099 ("603+") Reason header of the
``callerid`` rule (``redress``) and puts the number, peer/source or called number on a cooldown
of ``block_s`` seconds, during which its INVITEs are answered at once without being evaluated
again. Like OpenSIPS fraud_detection's warning / critical pairs, and the traffic patterns the
FCC lists as reasonable analytics. An operator lists and lifts cooldowns through the admin API
(``GET /dialer/cooldowns``, ``DELETE /dialer/cooldowns/{key}``:
:meth:`~sipguard.policy.dialer_state.DialerState.lift`).

Decision log reasons: the analytic (``distinct_callees``, ``short_calls``, ``asr``,
``sequential``, ``sequential_origin``, ``caller_rotation``, ``pumping``, ``high_cost``) for the
call that crossed a block threshold, ``<analytic>_cooldown`` during the cooldown; ``detail``
has the scope, key and measured value. Tags go to ``CallInfo.labels["dialer"]``.

Monitor mode decides, tags and starts cooldowns the same way but forwards the call; a cooldown
started in monitor mode is honoured only by pipelines in monitor mode.

Cost: a handful of dict operations per INVITE, whatever the number of numbers seen; how the
tables stay O(1) and bounded is told in :mod:`sipguard.policy.dialer_state`.

Fails open: a call without a caller (called) number skips the per-caller (per-callee)
analytics; a number forgotten because a table was full, or silent for a whole window, starts
from zero.

Shared across instances (``state.backend: redis``)
    ``distinct_callees`` (a HyperLogLog per caller), ``pumping.per_callee`` and
    ``pumping.high_cost`` (counters) are counted in Redis, in time buckets of a quarter window
    that expire by themselves (the count covers the last 1 to 1.25 windows), within the call's
    one round trip (:mod:`sipguard.transport.redis_state`); so are the cooldowns an enforcing
    rule starts (a key with ``block_s`` TTL): a caller blocked on one instance is blocked on
    all, the others keeping a local copy for the time left. ``sequential``, ``caller_rotation``,
    ``short_calls`` and ``asr`` stay per instance (they follow one caller's or peer's calls in
    order, which a single instance mostly sees anyway); a cooldown started in monitor mode
    stays local.

Known limitations
    * With the memory backend counted on this instance only. Short-call ratio and ASR count
      calls when they *end*, so a number's first answered calls count only after they hang up.
    * ``sequential`` sees only exact +1 steps (a scan with step 2, or in random order, is caught
      by ``distinct_callees`` instead); a single repeated number neither breaks nor extends a
      run.
    * Sliding windows are approximated from two fixed windows (exact for evenly spread calls).
    * A reload that shortens a window keeps the longer table horizon (more memory, never less
      detection) until restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from sipguard.contract import Verdict
from sipguard.policy.callerid_settings import Redress
from sipguard.policy.dialer_state import Block, CallerStats, OriginStats
from sipguard.policy.peers import NumberSet
from sipguard.policy.windows import Count

if TYPE_CHECKING:
    from sipguard.contract import CallInfo
    from sipguard.policy.dialer_settings import Settings
    from sipguard.policy.dialer_state import DialerState
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.peers import Peer
    from sipguard.policy.pipeline import Plan
    from sipguard.policy.windows import Generations


def _as_int(number: str | None) -> int | None:
    """The number as an integer (for +1 steps); None when it has ``*``, ``#`` or is absent."""
    if number is None or len(number) > 19:
        return None
    try:
        return int(number)  # normalised numbers: digits with an optional leading "+"
    except ValueError:
        return None


# A finding: (analytic, scope, key, value, threshold)
_Finding = tuple[str, str, str, str, str]
# Analytics by the code a shared cooldown carries in Redis.
ANALYTICS: Final = ("distinct_callees", "sequential", "sequential_origin", "short_calls", "asr",
                    "caller_rotation", "pumping", "high_cost")


class Dialer:
    """The built rule for one peer (or for traffic from no configured peer)."""

    __slots__ = (
        "_settings", "max_numbers", "max_origins",
        "name", "mode", "monitor", "state", "block_s", "short_call_s", "short_w", "asr_w",
        "distinct", "distinct_w", "seq", "seq_w", "short", "asr", "rotation", "rotation_w",
        "pumping", "pumping_w", "exempt", "high_cost", "status", "phrase", "headers",
        "header", "strip", "plain", "per_caller", "d_on", "d_tag", "d_block", "d_lo", "d_cap",
        "seq_on", "seq_origin", "s_tag", "s_block", "s_lo", "r_on", "r_tag", "r_block", "r_lo",
        "r_uses", "r_cap", "p_on", "pc_on", "pc_tag", "pc_block", "pc_lo", "h_on", "h_tag",
        "h_block", "h_lo", "b_caller", "b_origin", "b_callee", "b_high_cost",
    )

    def __init__(self, settings: Settings, mode: str, state: DialerState,
                 redress: Redress) -> None:
        s = settings
        self.name = "dialer"
        self.mode = mode
        self.monitor = mode == "monitor"
        self.state = state
        self.block_s = s.block_s
        self.short_call_s = s.short_call_s
        w = s.window_s
        self.distinct = s.distinct_callees
        self.distinct_w = (s.distinct_callees.window_s or w) if s.distinct_callees else 0.0
        self.seq = s.sequential
        self.seq_w = (s.sequential.window_s or w) if s.sequential else 0.0
        self.short = s.short_calls
        self.short_w = (s.short_calls.window_s or w) if s.short_calls else 0.0
        self.asr = s.asr
        self.asr_w = (s.asr.window_s or w) if s.asr else 0.0
        self.rotation = s.caller_rotation
        self.rotation_w = (s.caller_rotation.window_s or w) if s.caller_rotation else 0.0
        p = s.pumping
        self.pumping = p
        self.pumping_w = (p.window_s or w) if p else 0.0
        self.exempt = NumberSet(p.exempt) if p and p.exempt else None
        self.high_cost = (
            NumberSet(p.high_cost_prefixes) if p and p.high_cost and p.high_cost_prefixes
            else None
        )
        answer = s.answer
        self.status, self.phrase = answer.status, answer.phrase or ""
        headers = answer.headers
        if (
            answer.status == 603
            and self.phrase.lower() == "network blocked"
            and not any(h.split(":", 1)[0].strip().lower() == "reason" for h in headers)
        ):
            headers = (*headers, redress.reason_header())
        self.headers = headers
        self.header = s.verdict_header
        self.strip: tuple[tuple[str, str | None], ...] = (
            ((s.verdict_header.lower(), None),) if s.verdict_header else ()
        )
        self.plain = Verdict("accept", rule=self.name, replace_headers=self.strip)
        self.per_caller = any(x is not None for x in (self.distinct, self.seq, self.short,
                                                      self.asr))
        # Thresholds unpacked (hot path): *_lo is the lowest count that means anything.
        d = s.distinct_callees
        self.d_on = d is not None
        self.d_tag, self.d_block = (d.tag, d.block) if d else (None, None)
        self.d_lo = _lowest(self.d_tag, self.d_block)
        self.d_cap = (self.d_block or self.d_tag or 1) + 1
        q = s.sequential
        self.seq_on = q is not None
        self.seq_origin = q is not None and q.per_origin
        self.s_tag, self.s_block = (q.tag, q.block) if q else (None, None)
        self.s_lo = _lowest(self.s_tag, self.s_block)
        r = s.caller_rotation
        self.r_on = r is not None
        self.r_tag, self.r_block = (r.tag, r.block) if r else (None, None)
        self.r_lo = _lowest(self.r_tag, self.r_block)
        self.r_uses = r.max_uses if r else 2
        self.r_cap = 2 * (self.r_block or self.r_tag or 1)
        self.p_on = p is not None
        pc = p.per_callee if p else None
        self.pc_on = pc is not None
        self.pc_tag, self.pc_block = (pc.tag, pc.block) if pc else (None, None)
        self.pc_lo = _lowest(self.pc_tag, self.pc_block)
        hc = p.high_cost if p else None
        self.h_on = hc is not None
        self.h_tag, self.h_block = (hc.tag, hc.block) if hc else (None, None)
        self.h_lo = _lowest(self.h_tag, self.h_block)
        self.b_caller = state.blocks["caller"]
        self.b_origin = state.blocks["origin"]
        self.b_callee = state.blocks["callee"]
        self.b_high_cost = state.blocks["high_cost"]
        self._settings = s
        self.max_numbers = s.max_numbers  # build() sets the largest among peers
        self.max_origins = s.max_origins

    def claim(self) -> None:
        """When the policy is activated: make the shared tables keep entries as long as this
        rule's windows need and cap them at its ``max_*`` (not at build: a build that is
        never swapped in must change nothing)."""
        s, state = self._settings, self.state
        max_numbers, max_origins = self.max_numbers, self.max_origins
        caller_h = max(self.distinct_w, self.seq_w, self.short_w, self.asr_w)
        state.callers.need(caller_h, max_numbers)
        state.origins.need(max(self.seq_w, self.rotation_w, self.pumping_w), max_origins)
        state.callees.need(self.pumping_w, max_numbers)
        for table in state.blocks.values():
            table.need(s.block_s, max_numbers)

    # ------------------------------------------------------------------ decide
    def decide(self, call: CallInfo, now: float) -> Verdict | None:
        return self._evaluate(call, now, None)

    def plan(self, call: CallInfo, now: float, plan: Plan) -> Verdict | None:
        """The shared-store form (``state.backend: redis``): cooldowns, distinct called
        numbers, calls per called number and high-cost calls are counted in Redis within the
        pipeline's one round trip; the other analytics here. The verdict comes in
        :meth:`settle`, once the shared counts are back."""
        return self._evaluate(call, now, plan)

    def _evaluate(self, call: CallInfo, now: float, plan: Plan | None) -> Verdict | None:
        state = self.state
        caller, callee = call.caller, call.callee
        origin = call.peer or call.flow.addr[0]
        # 1. Cooldowns: answered at once (one truthiness test each while nothing is blocked).
        blocks = self.b_caller
        if caller is not None and (blocks.cur or blocks.prev):
            hit = self._cooldown(blocks, caller, now)
            if hit is not None:
                return self._blocked(call, hit.reason + "_cooldown", "caller", caller, None)
        blocks = self.b_origin
        if blocks.cur or blocks.prev:
            hit = self._cooldown(blocks, origin, now)
            if hit is not None:
                return self._blocked(call, hit.reason + "_cooldown", "origin", origin, None)
        counted = callee is not None and self.p_on and (
            self.exempt is None or callee not in self.exempt
        )
        high_cost = callee is not None and self.high_cost is not None and callee in self.high_cost
        blocks = self.b_callee
        if counted and callee is not None and (blocks.cur or blocks.prev):
            hit = self._cooldown(blocks, callee, now)
            if hit is not None:
                return self._blocked(call, hit.reason + "_cooldown", "callee", callee, None)
        blocks = self.b_high_cost
        if high_cost and (blocks.cur or blocks.prev):
            hit = self._cooldown(blocks, origin, now)
            if hit is not None:
                return self._blocked(call, hit.reason + "_cooldown", "high_cost", origin, None)
        if plan is not None:  # the cooldowns other instances started
            self._shared_cooldowns(plan, caller, origin, callee if counted else None,
                                   high_cost)
        # 2. Record this call and measure; a finding only when a count reaches a threshold.
        tags: list[_Finding] = []
        block: _Finding | None = None
        value = _as_int(callee) if self.seq_on else None
        if caller is not None and self.per_caller:
            stats = state.callers.obtain(caller, CallerStats, now)
            stats.rule = self
            if plan is not None and self.d_on and callee is not None:
                plan.add(("h", f"dialer.callees:{caller}", self.distinct_w * 1000, 0,
                          self.monitor, callee), self, ("distinct_callees", "caller", caller))
            elif self.d_on and callee is not None:
                n = stats.add_callee(callee, now, self.distinct_w, self.d_cap)
                if n >= self.d_lo:
                    block = _count("distinct_callees", "caller", caller, n, self.d_tag,
                                   self.d_block, tags, block)
            if value is not None:
                n = stats.step(value, now, self.seq_w)
                if n >= self.s_lo:
                    block = _count("sequential", "caller", caller, n, self.s_tag, self.s_block,
                                   tags, block)
            sc = self.short
            if sc is not None and stats.short is not None:
                short, answered = stats.short.values(now, self.short_w)
                if answered >= sc.min_calls:
                    block = _ratio("short_calls", "caller", caller, short / answered, sc.tag,
                                   sc.block, True, tags, block)
            asr = self.asr
            if asr is not None and stats.asr is not None:
                answered, ended = stats.asr.values(now, self.asr_w)
                if ended >= asr.min_calls:
                    block = _ratio("asr", "caller", caller, answered / ended, asr.tag,
                                   asr.block, False, tags, block)
        seq_origin = value is not None and self.seq_origin
        if seq_origin or self.r_on or high_cost:
            ostats = state.origins.obtain(origin, OriginStats, now)
            if seq_origin and value is not None:
                n = ostats.step(value, now, self.seq_w)
                if n >= self.s_lo:
                    block = _count("sequential_origin", "origin", origin, n, self.s_tag,
                                   self.s_block, tags, block)
            if self.r_on and caller is not None:
                n = ostats.rotate(caller, now, self.rotation_w, self.r_uses, self.r_cap)
                if n >= self.r_lo:
                    block = _count("caller_rotation", "origin", origin, n, self.r_tag,
                                   self.r_block, tags, block)
            if high_cost and self.h_on and plan is not None:
                plan.add(("n", f"dialer.high_cost:{origin}", self.pumping_w * 1000, 0,
                          self.monitor, ""), self, ("high_cost", "high_cost", origin))
            elif high_cost and self.h_on:
                if ostats.high_cost is None:
                    ostats.high_cost = Count()
                n = int(ostats.high_cost.add(now, self.pumping_w) + 1e-9)
                if n >= self.h_lo:
                    block = _count("high_cost", "high_cost", origin, n, self.h_tag,
                                   self.h_block, tags, block)
        if counted and callee is not None and self.pc_on and plan is not None:
            plan.add(("n", f"dialer.calls:{callee}", self.pumping_w * 1000, 0, self.monitor, ""),
                     self, ("pumping", "callee", callee))
        elif counted and callee is not None and self.pc_on:
            count = state.callees.obtain(callee, Count, now)
            n = int(count.add(now, self.pumping_w) + 1e-9)
            if n >= self.pc_lo:
                block = _count("pumping", "callee", callee, n, self.pc_tag, self.pc_block, tags,
                               block)
        if plan is not None:
            plan.later(self, (tags, block))
            return None
        return self._verdict(call, tags, block, now)

    def _verdict(
        self, call: CallInfo, tags: list[_Finding], block: _Finding | None, now: float
    ) -> Verdict | None:
        # 3. Verdict.
        if block is not None:
            analytic, scope, key, _, _ = block
            self.state.blocks[scope].put(
                key, Block(now, now + self.block_s, analytic, self.monitor), now
            )
            return self._blocked(call, analytic, scope, key, block, tags)
        if not tags:
            # Nothing to say: no verdict at all, unless a peer sent a verdict header to strip.
            return self.plain if self.strip and call.msg.has(self.strip[0][0]) else None
        names = [f"dialer.{t[0]}" for t in tags]
        call.labels["dialer"] = tags[0][0]
        forward = (f"{self.header}: {', '.join(names)}",) if self.header else ()
        return Verdict("accept", rule=self.name, forward_headers=forward,
                       replace_headers=self.strip)

    # ------------------------------------------------------------------ shared store
    def _shared_cooldowns(self, plan: Plan, caller: str | None, origin: str,
                          callee: str | None, high_cost: bool) -> None:
        """Checks of the cooldowns started on any instance, for the scopes this rule
        blocks."""
        monitor = self.monitor
        if caller is not None and self.per_caller:
            plan.add(("b", f"dialer.block.caller:{caller}", 0, 0, monitor, ""), self,
                     ("caller", caller))
        if self.seq_origin or self.r_on:
            plan.add(("b", f"dialer.block.origin:{origin}", 0, 0, monitor, ""), self,
                     ("origin", origin))
        if callee is not None and self.pc_on:
            plan.add(("b", f"dialer.block.callee:{callee}", 0, 0, monitor, ""), self,
                     ("callee", callee))
        if high_cost and self.h_on:
            plan.add(("b", f"dialer.block.high_cost:{origin}", 0, 0, monitor, ""), self,
                     ("high_cost", origin))

    def refused(self, info: tuple[str, str], value: int, call: CallInfo, now: float) -> Verdict:
        """A cooldown another instance (or this one) started is in force in Redis: kept
        locally for the time it has left, so the next calls need not ask."""
        scope, key = info
        left_ms, code = divmod(value, 16)
        analytic = ANALYTICS[code] if code < len(ANALYTICS) else "dialer"
        until = now + left_ms / 1000
        self.state.blocks[scope].put(
            key, Block(min(now, until - self.block_s), until, analytic, False, True), now)
        return self._blocked(call, analytic + "_cooldown", scope, key, None)

    def settle(
        self, call: CallInfo, found: tuple[list[_Finding], _Finding | None],
        measured: Sequence[tuple[tuple[str, str, str], int]], now: float,
    ) -> tuple[Verdict | None, tuple[str, int, float] | None]:
        """The verdict once the shared counts are in: ``measured`` is ((analytic, scope, key),
        count) per shared measure. Also what to mark in Redis when this call starts an
        enforced cooldown (counter, value, seconds) so every instance honours it."""
        tags, block = found
        for (analytic, scope, key), n in measured:
            if analytic == "distinct_callees":
                block = _count(analytic, scope, key, n, self.d_tag, self.d_block, tags, block)
            elif analytic == "pumping":
                block = _count(analytic, scope, key, n, self.pc_tag, self.pc_block, tags,
                               block)
            else:
                block = _count(analytic, scope, key, n, self.h_tag, self.h_block, tags, block)
        mark = None
        if block is not None and not self.monitor:
            analytic, scope, key, _, _ = block
            code = ANALYTICS.index(analytic) if analytic in ANALYTICS else 0
            mark = (f"dialer.block.{scope}:{key}", code, self.block_s)
        return self._verdict(call, tags, block, now), mark

    def _cooldown(self, table: Generations[Block], key: str, now: float) -> Block | None:
        if not table.cur and not table.prev:
            return None
        block = table.peek(key)
        if block is None or block.until <= now or (block.monitor and not self.monitor):
            return None
        return block

    def _blocked(
        self, call: CallInfo, reason: str, scope: str, key: str, finding: _Finding | None,
        tags: Sequence[_Finding] = (),
    ) -> Verdict:
        detail: dict[str, str | int | None] = {"scope": scope, "key": key}
        if finding is not None:
            detail["value"], detail["block"] = finding[3], finding[4]
        call.labels["dialer"] = "blocked"
        forward: tuple[str, ...] = ()
        if self.monitor and self.header:
            names = [f"dialer.{t[0]}" for t in tags if t[0] != reason]
            forward = (f"{self.header}: {', '.join([*names, f'dialer.{reason};monitored'])}",)
        return Verdict(
            "reject",
            rule=self.name,
            reason=reason,
            status=self.status,
            phrase=self.phrase,
            headers=self.headers,
            forward_headers=forward,
            replace_headers=self.strip if self.monitor else (),
            detail=detail,
            sample=f"dialer:{scope}:{key}" if finding is None else "",
        )


def _lowest(tag: int | None, block: int | None) -> int:
    """The lowest count at which a tag or block threshold is reached (huge: none set)."""
    return min(x for x in (tag, block, 1 << 62) if x is not None)


def _count(
    analytic: str, scope: str, key: str, n: int, tag: int | None, block: int | None,
    tags: list[_Finding], first: _Finding | None,
) -> _Finding | None:
    """Compare a count with its thresholds: a block finding is returned (the first one wins),
    a tag finding appended to ``tags``."""
    if block is not None and n >= block:
        return first or (analytic, scope, key, str(n), str(block))
    if tag is not None and n >= tag:
        tags.append((analytic, scope, key, str(n), str(tag)))
    return first


def _ratio(
    analytic: str, scope: str, key: str, ratio: float, tag: float | None, block: float | None,
    above: bool, tags: list[_Finding], first: _Finding | None,
) -> _Finding | None:
    """Like :func:`_count` for a ratio: over the thresholds (``above``) or under them."""
    def crossed(limit: float | None) -> bool:
        return limit is not None and (ratio > limit if above else ratio < limit)

    if crossed(block):
        return first or (analytic, scope, key, f"{ratio:.3f}", str(block))
    if crossed(tag):
        tags.append((analytic, scope, key, f"{ratio:.3f}", str(tag)))
    return first


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> Dialer:
    """The rule for ``peer`` (None: traffic from no configured peer); one state for all."""
    state = ctx.state.dialer
    ctx.observe(state)
    redress = settings.redress
    if redress is None:  # rule callerid's, where it is configured (as rule national_cli)
        cid = ctx.rules.callerid if ctx.rules is not None else None
        redress = cid.redress if cid is not None else Redress()
    rule = Dialer(settings, ctx.mode_of(settings), state, redress)
    # the tables are shared by every peer: sized for the largest cap among them
    rule.max_numbers = ctx.largest("dialer", "max_numbers", settings.max_numbers)
    rule.max_origins = ctx.largest("dialer", "max_origins", settings.max_origins)
    ctx.on_activate(rule.claim)
    return rule
