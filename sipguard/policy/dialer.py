"""Rule ``dialer``: dialer analytics over sliding windows, with a tag and a block threshold each.

What it looks for (each analytic its own section; ``null`` turns it off; each overridable per
peer). A *tag* threshold marks the call for the core (``verdict_header``) and the decision log;
a *block* threshold answers ``603 Network Blocked`` with the ATIS-1000099 ("603+") Reason header
of the ``callerid`` rule (``redress``) and puts the number, peer/source or called number on a
cooldown of ``block_s`` seconds, during which its INVITEs are answered at once without being
evaluated again. Like OpenSIPS fraud_detection's warning / critical pairs, and the traffic
patterns the FCC lists as reasonable analytics.

Per caller number (P-Asserted-Identity, else From):

- ``distinct_callees`` ({tag: 30, block: 60}): distinct called numbers in the window — one
  number dialing many destinations, a predictive dialer or bulk calling. Blocks the caller.
- ``short_calls`` ({tag: 0.2, block: 0.35, min_calls: 10}): share of answered calls shorter
  than ``short_call_s`` (6 s) among the answered calls that ended in the window, once there are
  ``min_calls`` of them (industry filters flag above ~20 %). Blocks the caller.
- ``asr`` ({tag: 0.2, block: 0.1, min_calls: 30}): answer-seizure ratio — answered calls over
  calls that ended in the window — *below* the floors, once ``min_calls`` ended. Blocks the
  caller.
- ``sequential`` ({tag: 5, block: 10, per_origin: true}): a run of called numbers each one
  higher than the last (+12125550100, …0101, …0102: number scanning). Runs are tracked per
  caller and, with ``per_origin``, per peer/source as well (a scan that rotates caller numbers;
  up to 8 interleaved runs per peer). Blocks the caller, or the peer/source.

Per peer (with no peers configured: per source IP address), off unless configured:

- ``caller_rotation`` ({tag: 50, block: 100, max_uses: 2}): distinct caller numbers used at
  most ``max_uses`` times each in the window — snowshoe dialing, circumventing per-number
  limits. A carrier delivering calls from the public looks exactly like this: enable it for
  dialer / PBX peers only (``peers[].rules.dialer.caller_rotation: {}``). Blocks the peer.
- ``pumping``: targeted traffic pumping. ``per_callee`` ({tag: 30, block: 60}): calls to one
  called number in the window, from anywhere (``exempt``: your own DIDs, numbers or ``prefix*``);
  blocks calls to that number. ``high_cost`` ({tag: 10, block: 20}) with ``high_cost_prefixes``
  (``["+1900*", "+882*"]``): calls from one peer/source to those prefixes in the window; blocks
  that peer/source's calls to them.

General: ``window_s`` (60; each analytic may set its own), ``short_call_s`` (6), ``block_s``
(300), ``answer`` (603 Network Blocked), ``redress`` (the 603+ Reason contact, as in rule
``callerid``), ``verdict_header`` (``X-Sipguard-Verdict``; values ``dialer.<analytic>``, with
``;monitored`` for a block in monitor mode; copies a peer sent are removed), ``max_numbers``
(200000 callers and called numbers each), ``max_origins`` (10000).

Decision log reasons: the analytic (``distinct_callees``, ``short_calls``, ``asr``,
``sequential``, ``sequential_origin``, ``caller_rotation``, ``pumping``, ``high_cost``) for the
call that crossed a block threshold, ``<analytic>_cooldown`` during the cooldown; ``detail``
has the scope, key and measured value. Tags go to ``CallInfo.labels["dialer"]``.

Monitor mode decides, tags and starts cooldowns the same way but forwards the call; a cooldown
started in monitor mode is honoured only by pipelines in monitor mode.

How it stays O(1) and bounded
    Per caller: the called numbers of the window in a small OrderedDict (once there are two; one
    inline otherwise), capped at the block threshold; one sequential run; two
    sliding-window counters (:class:`~sipguard.policy.windows.Pair`) fed at dialog end. Per
    peer/source: up to 8 runs, a dict of caller numbers capped at twice the rotation block
    threshold, a counter. Per called number: one counter. All of them live in
    :class:`~sipguard.policy.windows.Generations` tables that drop a number a window or two
    after its last call, capped at ``max_numbers`` / ``max_origins``; cooldowns likewise, with
    a ``block_s`` horizon. Each INVITE costs a handful of dict operations whatever the number
    of numbers seen (``loadtest/rate_cost.py``). The state is kept in the policy's ``shared``
    dict, so it survives reloads.

Fails open: a call without a caller (called) number skips the per-caller (per-callee)
analytics; a number forgotten because a table was full, or silent for a whole window, starts
from zero.

Known limitations
    * Counted on this instance only. Short-call ratio and ASR count calls when they *end*, so a
      number's first answered calls count only after they hang up.
    * ``sequential`` sees only exact +1 steps (a scan with step 2, or in random order, is caught
      by ``distinct_callees`` instead); a single repeated number neither breaks nor extends a
      run.
    * Sliding windows are approximated from two fixed windows (exact for evenly spread calls).
    * A reload that shortens a window keeps the longer table horizon (more memory, never less
      detection) until restart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, model_validator

from sipguard.contract import Verdict
from sipguard.policy.callerid import Redress
from sipguard.policy.peers import NUMBER_PATTERN, NumberSet
from sipguard.policy.settings import FROZEN, Answer, RuleSettings
from sipguard.policy.windows import Count, Generations, Pair

if TYPE_CHECKING:
    from sipguard.contract import CallInfo, Dialog
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.peers import Peer

ORIGIN_RUNS = 8  # interleaved sequential runs tracked per peer/source
SCOPES = ("caller", "origin", "callee", "high_cost")

# ------------------------------------------------------------------------------- settings


class _Counted(BaseModel):
    model_config = FROZEN

    window_s: float | None = Field(
        default=None, gt=0, le=86400, description="Window, seconds; null: the rule's window_s."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Any:
        tag, block = getattr(self, "tag", None), getattr(self, "block", None)
        if tag is not None and block is not None and tag > block:
            raise ValueError(f"tag ({tag}) must not be above block ({block})")
        return self


class DistinctCallees(_Counted):
    """Distinct called numbers per caller in the window."""

    tag: int | None = Field(
        default=30, ge=1, le=100_000, description="Tag at this many callees; null: no tag."
    )
    block: int | None = Field(
        default=60, ge=1, le=100_000, description="Block at this many; null: no block."
    )


class Sequential(_Counted):
    """Runs of called numbers each one higher than the one before."""

    tag: int | None = Field(
        default=5, ge=2, le=100_000, description="Tag at a run this long; null: no tag."
    )
    block: int | None = Field(
        default=10, ge=2, le=100_000, description="Block at a run this long; null: no block."
    )
    per_origin: bool = Field(
        default=True,
        description="Also track runs per peer/source: a scan that rotates caller numbers. Up "
        "to 8 interleaved runs per peer/source."
    )


class ShortCalls(_Counted):
    """Share of answered calls shorter than short_call_s."""

    tag: float | None = Field(
        default=0.2, ge=0, le=1, description="Tag above this share; null: no tag."
    )
    block: float | None = Field(
        default=0.35, ge=0, le=1, description="Block above this share; null: no block."
    )
    min_calls: int = Field(
        default=10, ge=1, le=100_000,
        description="Answered calls ended in the window before the share counts.",
    )


class Asr(BaseModel):
    """Answer-seizure ratio floors (answered / ended calls)."""

    model_config = FROZEN

    tag: float | None = Field(
        default=0.2, ge=0, le=1, description="Tag below this ratio; null: no tag."
    )
    block: float | None = Field(
        default=0.1, ge=0, le=1,
        description="Block below this ratio (not above tag); null: no block.",
    )
    min_calls: int = Field(
        default=30, ge=1, le=100_000,
        description="Calls ended in the window before the ratio counts.",
    )
    window_s: float | None = Field(
        default=None, gt=0, le=86400, description="Window, seconds; null: the rule's window_s."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Asr:
        if self.tag is not None and self.block is not None and self.block > self.tag:
            raise ValueError(f"block ({self.block}) must not be above tag ({self.tag}): "
                             "both are floors")
        return self


class CallerRotation(_Counted):
    """Distinct caller numbers used at most max_uses times, per peer/source, in the window."""

    tag: int | None = Field(
        default=50, ge=1, le=100_000, description="Tag at this many one-off numbers; null: no tag."
    )
    block: int | None = Field(
        default=100, ge=1, le=100_000, description="Block at this many; null: no block."
    )
    max_uses: int = Field(
        default=2, ge=1, le=1000,
        description="A caller number presented at most this often in the window is one-off.",
    )


class Threshold(BaseModel):
    model_config = FROZEN

    tag: int | None = Field(default=None, ge=1, le=10_000_000, description="Tag at this many.")
    block: int | None = Field(default=None, ge=1, le=10_000_000, description="Block at this.")

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.tag is not None and self.block is not None and self.tag > self.block:
            raise ValueError(f"tag ({self.tag}) must not be above block ({self.block})")
        return self


def _patterns(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        if NUMBER_PATTERN.fullmatch(item.strip()) is None:
            raise ValueError(f"{item!r} is not a number or a prefix pattern like '+1900*'")
    return value


class Pumping(BaseModel):
    """Calls concentrated on one called number, or on high-cost prefixes."""

    model_config = FROZEN

    window_s: float | None = Field(
        default=None, gt=0, le=86400, description="Window, seconds; null: the rule's window_s."
    )
    per_callee: Threshold | None = Field(
        default=Threshold(tag=30, block=60),
        description="Calls to one called number from anywhere, `{tag, block}`; null: off.",
    )
    exempt: tuple[str, ...] = Field(
        default=(), description="Called numbers / `prefix*` never counted (list your own DIDs)."
    )
    high_cost_prefixes: tuple[str, ...] = Field(
        default=(), description="High-cost destinations, numbers or `prefix*`, e.g. `'+1900*'`."
    )
    high_cost: Threshold | None = Field(
        default=Threshold(tag=10, block=20),
        description="Calls from one peer/source to `high_cost_prefixes`, `{tag, block}`; null: "
        "off.",
    )

    @model_validator(mode="after")
    def _check(self) -> Pumping:
        _patterns(self.exempt)
        _patterns(self.high_cost_prefixes)
        return self


class Settings(RuleSettings):
    """Parameters of rule ``dialer`` (``rules.dialer`` in the config)."""

    window_s: float = Field(
        default=60, gt=0, le=86400,
        description="Sliding window of every analytic, seconds (each may set its own `window_s`).",
    )
    short_call_s: float = Field(
        default=6, gt=0, le=3600,
        description="An answered call shorter than this is short, seconds.",
    )
    block_s: float = Field(
        default=300, gt=0, le=30 * 86400,
        description="Cooldown after a block, seconds. The blocked number, peer/source or called "
        "number is answered at once this long.",
    )
    distinct_callees: DistinctCallees | None = Field(
        default=DistinctCallees(),
        description="Distinct numbers one caller dials in the window (bulk calling); null: off. "
        "A predictive dialer's pattern; a block cools down the caller.",
    )
    short_calls: ShortCalls | None = Field(
        default=ShortCalls(),
        description="Share of a caller's answered calls shorter than `short_call_s`; null: off. "
        "Industry filters flag above ~20 %; a block cools down the caller.",
    )
    asr: Asr | None = Field(
        default=Asr(),
        description="A caller's answer-seizure ratio (answered / ended calls) below the floors; "
        "null: off. A block cools down the caller.",
    )
    sequential: Sequential | None = Field(
        default=Sequential(),
        description="Runs of called numbers each one higher than the last (number scanning); "
        "null: off. Per caller and, with `per_origin`, per peer/source; a block cools down the "
        "caller or the peer/source.",
    )
    caller_rotation: CallerRotation | None = Field(
        default=None,
        description="One peer/source presenting many one-off caller numbers (snowshoe "
        "dialing); null: off. Enable it for dialer peers only: a carrier delivering calls from "
        "the public looks exactly like rotation.",
    )
    pumping: Pumping | None = Field(
        default=None,
        description="Traffic pumping: calls concentrated on one number or on high-cost "
        "prefixes; null: off. A contact center's own DIDs receive concentrated calls: list "
        "them in `exempt`.",
    )
    answer: Answer = Field(
        default=Answer(status=603, phrase="Network Blocked"),
        description="What a blocked call hears; 603 Network Blocked is sent as 603+. The 603+ "
        "Reason is added unless the answer brings its own Reason.",
    )
    redress: Redress = Field(
        default=Redress(),
        description="The 603+ redress contact, as in rule `callerid`: set `url`, `tel` or "
        "`email` in production.",
    )
    verdict_header: str | None = Field(
        default="X-Sipguard-Verdict",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]*$",
        description="Header listing tags for the core (dialer.sequential, …); null: none. "
        "Shared with rule `callerid`; copies a peer sent are removed.",
    )
    max_numbers: int = Field(
        default=200_000, ge=100, le=100_000_000,
        description="Caller and called numbers remembered (each table): bounds memory.",
    )
    max_origins: int = Field(
        default=10_000, ge=10, le=10_000_000, description="Peers / source addresses remembered."
    )


# ------------------------------------------------------------------------------- state


class CallerStats:
    """What the rule remembers about one caller number."""

    __slots__ = ("callees", "callee_t", "seq_next", "seq_run", "seq_t", "short", "asr", "rule")

    def __init__(self) -> None:
        # one inline, then an OrderedDict (least recent first; O(1) at the front, unlike a dict)
        self.callees: str | OrderedDict[str, float] | None = None
        self.callee_t = 0.0
        self.seq_next = -1
        self.seq_run = 0
        self.seq_t = 0.0
        self.short: Pair | None = None  # (short, answered) calls ended in the window
        self.asr: Pair | None = None  # (answered, ended) calls in the window
        self.rule: Dialer | None = None  # the rule that saw its last call (for dialog ends)

    def add_callee(self, callee: str, now: float, window: float, cap: int) -> int:
        """Record a call to ``callee``; the distinct called numbers in the window."""
        c = self.callees
        if c is None or isinstance(c, str):
            if c is None or c == callee or now - self.callee_t > window:
                self.callees, self.callee_t = callee, now
                return 1
            self.callees = OrderedDict(((c, self.callee_t), (callee, now)))
            return 2
        _expire_front(c, now - window)
        if callee in c:
            c.move_to_end(callee)
        c[callee] = now
        if len(c) > cap:
            c.popitem(last=False)
        return len(c)

    def step(self, value: int, now: float, window: float) -> int:
        """Record a call to the number ``value``; the length of the +1 run it is part of."""
        if now - self.seq_t <= window:
            if value == self.seq_next:
                self.seq_next, self.seq_t = value + 1, now
                self.seq_run += 1
                return self.seq_run
            if value == self.seq_next - 1:  # the same number again
                self.seq_t = now
                return self.seq_run
        self.seq_next, self.seq_run, self.seq_t = value + 1, 1, now
        return 1


class OriginStats:
    """What the rule remembers about one peer (or source address)."""

    __slots__ = ("runs", "callers", "one_offs", "high_cost")

    def __init__(self) -> None:
        self.runs: dict[int, list[float]] = {}  # next number -> [run length, last time]
        # caller -> [uses, last time], least recently used first
        self.callers: OrderedDict[str, list[float]] | None = None
        self.one_offs = 0  # callers in ``callers`` used at most max_uses times
        self.high_cost: Count | None = None

    def step(self, value: int, now: float, window: float) -> int:
        """Like :meth:`CallerStats.step`, with up to ORIGIN_RUNS interleaved runs, each kept
        under the number that would continue it."""
        runs = self.runs
        run = runs.pop(value, None)
        if run is not None and now - run[1] <= window:
            run[0] += 1
            run[1] = now
            runs[value + 1] = run
            return int(run[0])
        same = runs.get(value + 1)  # the last number of a run, again
        if same is not None and now - same[1] <= window:
            same[1] = now
            return int(same[0])
        runs[value + 1] = [1.0, now]
        if len(runs) > ORIGIN_RUNS:
            del runs[next(iter(runs))]  # the run that went longest without a step
        return 1

    def rotate(self, caller: str, now: float, window: float, max_uses: int, cap: int) -> int:
        """Record a call from ``caller``; the callers used at most ``max_uses`` times."""
        d = self.callers
        if d is None:
            d = self.callers = OrderedDict()
        horizon = now - window
        for _ in range(4):  # expire a few of the least recently used
            if not d:
                break
            first = next(iter(d))
            entry = d[first]
            if entry[1] >= horizon:
                break
            d.popitem(last=False)
            if entry[0] <= max_uses:
                self.one_offs -= 1
        known = d.get(caller)
        if known is None:
            d[caller] = [1.0, now]
            self.one_offs += 1
        else:
            d.move_to_end(caller)
            known[0] += 1
            known[1] = now
            if known[0] == max_uses + 1:
                self.one_offs -= 1
        if len(d) > cap:
            old = d.popitem(last=False)[1]
            if old[0] <= max_uses:
                self.one_offs -= 1
        return self.one_offs


class Block:
    __slots__ = ("until", "reason", "monitor", "since")

    def __init__(self, since: float, until: float, reason: str, monitor: bool) -> None:
        self.since = since
        self.until = until
        self.reason = reason
        self.monitor = monitor


class DialerState:
    """Every table of the rule; shared by every peer's rule, kept over reloads, and told about
    dialog ends (it is a policy observer)."""

    def __init__(self) -> None:
        self.callers: Generations[CallerStats] = Generations(1.0, 200_000)
        self.origins: Generations[OriginStats] = Generations(1.0, 10_000)
        self.callees: Generations[Count] = Generations(1.0, 200_000)
        self.blocks: dict[str, Generations[Block]] = {
            scope: Generations(1.0, 200_000) for scope in SCOPES
        }

    # -------------------------------------------------------------- policy observer
    def dialog_started(self, dialog: Dialog, now: float) -> None:
        return None

    def dialog_ended(self, dialog: Dialog, now: float) -> None:
        """Feed short-call ratio and ASR of the caller (when the rule saw its calls)."""
        if dialog.caller is None:
            return None
        stats = self.callers.get(dialog.caller, now)
        if stats is None or stats.rule is None:
            return None
        rule = stats.rule
        answered = dialog.confirmed_at is not None
        if rule.short_w and answered and dialog.confirmed_at is not None:
            duration = (dialog.ended_at or now) - dialog.confirmed_at
            if stats.short is None:
                stats.short = Pair()
            stats.short.add(now, rule.short_w, 1 if duration < rule.short_call_s else 0, 1)
        if rule.asr_w:
            if stats.asr is None:
                stats.asr = Pair()
            stats.asr.add(now, rule.asr_w, 1 if answered else 0, 1)
        return None

    # -------------------------------------------------------------- operations
    def list_blocks(self, now: float) -> list[dict[str, Any]]:
        """Cooldowns in force: scope, key, reason, seconds left (for the admin API)."""
        out = []
        for scope, table in self.blocks.items():
            for key, block in table.items():
                if block.until > now:
                    out.append({"scope": scope, "key": key, "reason": block.reason,
                                "monitor": block.monitor, "left_s": round(block.until - now, 1)})
        return out

    def lift(self, scope: str, key: str) -> bool:
        """End a cooldown early and forget what was counted for ``key`` (a fresh start, or the
        next call would block again); False when there was no cooldown."""
        table = self.blocks.get(scope)
        if table is None or table.pop(key) is None:
            return False
        stats: Generations[Any] = (
            self.callers if scope == "caller" else self.callees if scope == "callee"
            else self.origins
        )
        stats.pop(key)
        return True


def _expire_front(d: OrderedDict[str, float], horizon: float) -> None:
    """Drop up to four entries older than ``horizon`` from the front (least recent first)."""
    for _ in range(4):
        if not d:
            return
        first = next(iter(d))
        if d[first] >= horizon:
            return
        d.popitem(last=False)


def _as_int(number: str | None) -> int | None:
    """The number as an integer (for +1 steps); None when it has ``*``, ``#`` or is absent."""
    if number is None or len(number) > 19:
        return None
    try:
        return int(number)  # normalised numbers: digits with an optional leading "+"
    except ValueError:
        return None


# ------------------------------------------------------------------------------- the rule

# A finding: (analytic, scope, key, value, threshold)
_Finding = tuple[str, str, str, str, str]


class Dialer:
    """The built rule for one peer (or for traffic from no configured peer)."""

    __slots__ = (
        "_settings",
        "name", "mode", "monitor", "state", "block_s", "short_call_s", "short_w", "asr_w",
        "distinct", "distinct_w", "seq", "seq_w", "short", "asr", "rotation", "rotation_w",
        "pumping", "pumping_w", "exempt", "high_cost", "status", "phrase", "headers",
        "header", "strip", "plain", "per_caller", "d_on", "d_tag", "d_block", "d_lo", "d_cap",
        "seq_on", "seq_origin", "s_tag", "s_block", "s_lo", "r_on", "r_tag", "r_block", "r_lo",
        "r_uses", "r_cap", "p_on", "pc_on", "pc_tag", "pc_block", "pc_lo", "h_on", "h_tag",
        "h_block", "h_lo", "b_caller", "b_origin", "b_callee", "b_high_cost",
    )

    def __init__(self, settings: Settings, mode: str, state: DialerState) -> None:
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
            headers = (*headers, s.redress.reason_header())
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

    def claim(self) -> None:
        """When the policy is activated: make the shared tables keep entries as long as this
        rule's windows need and cap them at its ``max_*`` (not at build: a build that is
        never swapped in must change nothing)."""
        s, state = self._settings, self.state
        caller_h = max(self.distinct_w, self.seq_w, self.short_w, self.asr_w)
        state.callers.need(caller_h, s.max_numbers)
        state.origins.need(max(self.seq_w, self.rotation_w, self.pumping_w), s.max_origins)
        state.callees.need(self.pumping_w, s.max_numbers)
        for table in state.blocks.values():
            table.need(s.block_s, s.max_numbers)

    # ------------------------------------------------------------------ decide
    def decide(self, call: CallInfo, now: float) -> Verdict | None:
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
        # 2. Record this call and measure; a finding only when a count reaches a threshold.
        tags: list[_Finding] = []
        block: _Finding | None = None
        value = _as_int(callee) if self.seq_on else None
        if caller is not None and self.per_caller:
            stats = state.callers.obtain(caller, CallerStats, now)
            stats.rule = self
            if self.d_on and callee is not None:
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
            if high_cost and self.h_on:
                if ostats.high_cost is None:
                    ostats.high_cost = Count()
                n = int(ostats.high_cost.add(now, self.pumping_w) + 1e-9)
                if n >= self.h_lo:
                    block = _count("high_cost", "high_cost", origin, n, self.h_tag,
                                   self.h_block, tags, block)
        if counted and callee is not None and self.pc_on:
            count = state.callees.obtain(callee, Count, now)
            n = int(count.add(now, self.pumping_w) + 1e-9)
            if n >= self.pc_lo:
                block = _count("pumping", "callee", callee, n, self.pc_tag, self.pc_block, tags,
                               block)
        # 3. Verdict.
        if block is not None:
            analytic, scope, key, _, _ = block
            state.blocks[scope].put(key, Block(now, now + self.block_s, analytic, self.monitor),
                                    now)
            return self._blocked(call, analytic, scope, key, block, tags)
        if not tags:
            # Nothing to say: no verdict at all, unless a peer sent a verdict header to strip.
            return self.plain if self.strip and call.msg.has(self.strip[0][0]) else None
        names = [f"dialer.{t[0]}" for t in tags]
        call.labels["dialer"] = tags[0][0]
        forward = (f"{self.header}: {', '.join(names)}",) if self.header else ()
        return Verdict("accept", rule=self.name, forward_headers=forward,
                       replace_headers=self.strip)

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
    rule = Dialer(settings, ctx.mode_of(settings), state)
    ctx.on_activate(rule.claim)
    return rule
