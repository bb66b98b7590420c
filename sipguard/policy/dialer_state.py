"""What rule ``dialer`` remembers: its tables per number and per peer, and its cooldowns.

:class:`DialerState` holds every table. The process has one (``RuleState.dialer``), shared by
every peer's :class:`~sipguard.policy.dialer.Dialer` and kept over reloads; it is a policy
observer, told about dialog ends, which feed a caller's short-call ratio and ASR.
:class:`CallerStats` is what it keeps about one caller number, :class:`OriginStats` about one
peer (or source address), :class:`Block` one cooldown. The rule's parameters are in
:mod:`sipguard.policy.dialer_settings`.

How it stays O(1) and bounded
    Per caller: the called numbers of the window in a small OrderedDict (once there are two; one
    inline otherwise), capped at the block threshold; one sequential run; two
    sliding-window counters (:class:`~sipguard.policy.windows.Pair`) fed at dialog end. Per
    peer/source: up to 8 runs, a dict of caller numbers capped at twice the rotation block
    threshold, a counter. Per called number: one counter. All of them live in
    :class:`~sipguard.policy.windows.Generations` tables that drop a number a window or two
    after its last call, capped at ``max_numbers`` / ``max_origins``; cooldowns likewise, with
    a ``block_s`` horizon. Each INVITE costs a handful of dict operations whatever the number
    of numbers seen (``loadtest/rate_cost.py``). The state is kept in ``RuleState.dialer``, so
    it survives reloads.

A number forgotten because a table was full, or silent for a whole window, starts from zero.

Lifting a cooldown (the admin API's ``DELETE /dialer/cooldowns/{key}``: :meth:`DialerState.lift`)
ends it and forgets what was counted for the key in its scope — a caller's called numbers, run,
short calls and ASR; a called number's calls; a peer/source's runs and caller rotation, or its
high-cost calls — so its next call starts afresh instead of crossing the threshold again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Final

from sipguard.policy.windows import Count, Generations, Pair

if TYPE_CHECKING:
    from sipguard.contract import Dialog
    from sipguard.policy.dialer import Dialer

ORIGIN_RUNS: Final = 8  # interleaved sequential runs tracked per peer/source
SCOPES: Final = ("caller", "origin", "callee", "high_cost")
# Final answers after which the caller sends the INVITE again: with credentials (401, 407:
# RFC 3261 §22), without or with an extension (420, 421: §8.1.3.5), with a longer session
# interval (422: RFC 4028 §7.4), after a security agreement (494: RFC 3329), or to another
# target (3xx). The call is not over, so such an attempt is no seizure for the ASR.
RETRIED: Final = frozenset({401, 407, 420, 421, 422, 494})


def retried(status: int) -> bool:
    """Whether an INVITE that ended with ``status`` is normally sent again (see RETRIED)."""
    return 300 <= status < 400 or status in RETRIED


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
    """One cooldown: from ``since`` to ``until`` (loop time), started by the analytic
    ``reason``; ``monitor``: started in monitor mode; ``copy``: a local copy of a cooldown
    another instance or worker started (found in the shared store; ``since`` estimated from
    this rule's ``block_s``)."""

    __slots__ = ("until", "reason", "monitor", "since", "copy")

    def __init__(self, since: float, until: float, reason: str, monitor: bool,
                 copy: bool = False) -> None:
        self.since = since
        self.until = until
        self.reason = reason
        self.monitor = monitor
        self.copy = copy


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
        # a 2xx the caller never ACKed (ended ack_timeout, 64*T1 on) set up no session: no
        # answered call of that length, or a dialer could pad both ratios with them
        answered = dialog.confirmed_at is not None and dialog.end_reason != "ack_timeout"
        if rule.short_w and answered and dialog.confirmed_at is not None:
            duration = (dialog.ended_at or now) - dialog.confirmed_at
            if stats.short is None:
                stats.short = Pair()
            stats.short.add(now, rule.short_w, 1 if duration < rule.short_call_s else 0, 1)
        if rule.asr_w and not retried(dialog.status):
            if stats.asr is None:
                stats.asr = Pair()
            stats.asr.add(now, rule.asr_w, 1 if answered else 0, 1)
        return None

    # -------------------------------------------------------------- operations
    def cooldowns(self, now: float, scope: str | None = None, key: str | None = None,
                  limit: int = 1000) -> tuple[list[tuple[str, str, Block]], int]:
        """Cooldowns in force (for the admin API): up to ``limit`` of them as (scope, key,
        block), and how many there are in all; only ``scope`` and / or ``key`` when given
        (a key is looked up, not searched for)."""
        out: list[tuple[str, str, Block]] = []
        total = 0
        for name, table in self.blocks.items():
            if scope is not None and name != scope:
                continue
            if key is not None:
                block = table.peek(key)
                found = [] if block is None else [(key, block)]
            else:
                found = list(table.items())
            for k, b in found:
                if b.until > now:
                    total += 1
                    if len(out) < limit:
                        out.append((name, k, b))
        return out, total

    def lift(self, scope: str, key: str, now: float, reset: bool = False) -> Block | None:
        """End the cooldown of ``key`` in ``scope`` early (the cooldown, or None when there was
        none in force) and forget what was counted for it in that scope — the analytics that
        trip there start afresh, or the next call would block again at once. ``reset``: forget
        the counts even without a cooldown here (one found in the shared store, or on
        another worker)."""
        table = self.blocks.get(scope)
        if table is None:
            return None
        block = table.pop(key)
        if block is not None and block.until <= now:  # it ran out: none in force
            block = None
        if block is None and not reset:
            return None
        if scope == "caller":  # distinct callees, sequential run, short calls, ASR
            self.callers.pop(key)
        elif scope == "callee":  # calls to it (pumping)
            self.callees.pop(key)
        elif scope == "origin":  # its sequential runs and caller rotation
            self.origins.pop(key)
        else:  # high_cost: its calls to the high-cost prefixes only
            origin = self.origins.peek(key)
            if origin is not None:
                origin.high_cost = None
        return block


def _expire_front(d: OrderedDict[str, float], horizon: float) -> None:
    """Drop up to four entries older than ``horizon`` from the front (least recent first)."""
    for _ in range(4):
        if not d:
            return
        first = next(iter(d))
        if d[first] >= horizon:
            return
        d.popitem(last=False)
