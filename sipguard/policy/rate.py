"""Rule ``rate``: call-rate limits per caller, called number, peer and source address (GCRA).

Parameters (``rules.rate``; each limit optional — absent or ``null`` is no limit — and each
overridable per peer, key by key):

- ``per_caller``: initial INVITEs per caller number (P-Asserted-Identity, else From): one
  number dialing in bursts (a dialer, a looping PBX).
- ``per_callee``: initial INVITEs per called number: one DID flooded (telephony denial of
  service).
- ``per_peer``: initial INVITEs per peer (with no peers configured, all traffic is one peer,
  ``-``).
- ``per_source_ip``: initial INVITEs per source IP address; an IPv6 one from no configured
  peer is counted with its network of ``sip.ipv6_prefix`` bits (64), :mod:`sipguard.addresses`.

  Each limit is ``{rate: R, burst: B, per_s: P}``: on average R calls every P seconds (``per_s``
  default 1, so ``rate`` is calls per second), and up to B calls at once after a quiet spell
  (``burst`` default 1). ``{rate: 1, burst: 3}`` lets 3 calls through at once, then one a second.
- ``answer`` (``503 Service Unavailable``): what a limited call hears.
- ``retry_after_s`` (``null``): the ``Retry-After`` value; ``null`` computes it — the seconds
  until this call would have passed, rounded up, at least 1; ``0`` sends no Retry-After.
- ``max_keys`` (100000): the most numbers (addresses, peers) remembered per limit.

Why 503 and not silence
    RFC 3261 §21.5.4: 503 means the server is temporarily unable to take the request, and
    ``Retry-After`` says when to try again — exactly the state of a number over its rate.
    Dropping an INVITE over UDP instead makes the caller retransmit it (Timer A: 7 copies over
    32 s), multiplying the load it was meant to shed and holding the caller's transaction and
    ours; RFC 6357 §4-5 (SIP overload control) describes rejecting with 503 + Retry-After as the
    cheap, explicit signal and silent drops as the ones that amplify. A 503 is answered once
    and retransmitted only until the ACK. The catch (RFC 6357 §5): a proxy upstream may take a
    503 + Retry-After as "this whole server is down" and stop sending *anything* for that long;
    RFC 3261 §16.7 also tells it not to pass a 503 on upstream (it becomes a 500). So keep
    Retry-After short (the computed default is the real wait, usually 1 s), or answer a peer
    that reacts that way with ``answer: {status: 486, phrase: Busy Here}`` or ``480``.

The algorithm (GCRA, the generic cell rate algorithm of ATM, ITU-T I.371)
    Each key keeps one number, its theoretical arrival time (TAT). With emission interval
    ``T = per_s / rate`` and tolerance ``tau = (burst - 1) * T``, a call at ``now`` passes when
    ``max(TAT, now) - now <= tau``, and then ``TAT = max(TAT, now) + T``. Exact (no windows, no
    rounding), one float per key, no timer: a key whose TAT is in the past is the same as an
    absent key, so keys expire by themselves (see :mod:`sipguard.policy.windows`, which drops
    them in bulk once they cannot matter any more). A limited call consumes nothing, and a call
    consumes from each limit only when it passes all of them. Monitor mode decides the same
    way and, since the call is forwarded, counts it like a passed one only when it passed.

Fails open: a call without a caller (callee) number is not limited per caller (callee); a
table over ``max_keys`` forgets its older half (counted as ``dropped``).

Cost: one dict lookup and one float write per configured limit per INVITE; memory about 150
bytes per key active within its ``burst * per_s / rate`` seconds (``loadtest/rate_cost.py``).

Shared across instances (``state.backend: redis``)
    Each key's TAT is a Redis string (``sipguard:{+12125550100}:rate.per_caller``, in
    microseconds of Redis's clock, with a TTL of its drain time); :meth:`Rate.plan` adds the
    limits to the pipeline's one round trip, where the same GCRA runs as Lua. There a call
    consumes only when the whole call is admitted (no later shared check refused it).

Known limitations
    * A call counts against its rates once it passes this rule, even if a later rule rejects
      it (put ``rate`` after the rules that reject for cheap reasons).
    * Anonymous callers (no number) share no per-caller limit; use ``per_source_ip`` or
      ``per_peer`` for them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

from sipguard.addresses import source_key
from sipguard.contract import Verdict
from sipguard.policy.windows import Generations

if TYPE_CHECKING:
    from sipguard.contract import CallInfo
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.peers import Peer
    from sipguard.policy.pipeline import Plan
    from sipguard.policy.rate_settings import Limit, Settings

PER_CALLER, PER_CALLEE, PER_PEER, PER_SOURCE_IP = LIMITS = (
    "per_caller", "per_callee", "per_peer", "per_source_ip")
NO_PEER: Final = "-"  # the per_peer key of traffic from no configured peer
EPSILON: Final = 1e-9  # float slack: a call exactly on schedule always passes


class Buckets:
    """The GCRA state of every limit, shared by every peer's rule and kept over reloads."""

    __slots__ = ("tables",)

    def __init__(self) -> None:
        self.tables: dict[str, Generations[float]] = {
            name: Generations(1.0, 100_000) for name in LIMITS
        }

    def size(self) -> dict[str, int]:
        return {name: len(t) for name, t in self.tables.items()}


class Rate:
    """The built rule for one peer (or for traffic from no configured peer)."""

    __slots__ = ("name", "mode", "limits", "answer", "retry_after", "headers", "max_keys",
                 "ipv6_prefix")

    def __init__(self, settings: Settings, mode: str, buckets: Buckets) -> None:
        self.name = "rate"
        self.mode = mode
        # (limit name, table, T, tau) for each configured limit, in LIMITS order
        self.limits: list[tuple[str, Generations[float], float, float]] = []
        for name in LIMITS:  # (the names are the LIMITS constants: compared by identity)
            limit: Limit | None = getattr(settings, name)
            if limit is None:
                continue
            table = buckets.tables[name]
            self.limits.append((name, table, limit.interval, limit.tolerance))
        self.max_keys = settings.max_keys
        self.answer = settings.answer
        self.retry_after = settings.retry_after_s
        self.headers = settings.answer.headers
        self.ipv6_prefix = 64  # sip.ipv6_prefix: an IPv6 source is counted with its network

    def claim(self) -> None:
        """When the policy is activated (not at build): a bucket drains completely within
        tau + T of its last pass — then it is the same as an absent one and may be
        forgotten — so each table keeps keys that long, up to ``max_keys``."""
        for _, table, interval, tau in self.limits:
            table.need(tau + interval, self.max_keys)

    def decide(self, call: CallInfo, now: float) -> Verdict | None:
        passed: list[tuple[Generations[float], str, float]] = []
        worst = 0.0
        limited: tuple[str, str] | None = None
        for name, table, interval, tau in self.limits:
            key = _key_of(name, call, self.ipv6_prefix)
            if key is None:
                continue
            tat = table.cur.get(key)
            if tat is None and table.prev:
                tat = table.prev.get(key)
            start = now if tat is None or tat < now else tat
            ahead = start - now - tau
            if ahead > EPSILON:
                if limited is None or ahead > worst:
                    worst, limited = ahead, (name, key)
                continue
            passed.append((table, key, start + interval))
        if limited is None:
            for table, key, tat in passed:
                table.put(key, tat, now)
            return None
        return self._limited(limited[0], limited[1], worst)

    def plan(self, call: CallInfo, now: float, plan: Plan) -> Verdict | None:
        """The shared-store form of :meth:`decide` (see :mod:`sipguard.policy.pipeline`)."""
        monitor = self.mode == "monitor"
        for name, _, interval, tau in self.limits:
            key = _key_of(name, call, self.ipv6_prefix)
            if key is None:
                continue
            plan.add(("r", f"rate.{name}:{key}", interval, tau, monitor, ""), self, (name, key))
        return None

    def refused(self, info: tuple[str, str], ahead_us: int, call: CallInfo, now: float) -> \
            Verdict:
        name, key = info
        return self._limited(name, key, ahead_us / 1e6)

    def _limited(self, name: str, key: str, wait: float) -> Verdict:
        retry = self.retry_after
        if retry is None:
            retry = max(1, math.ceil(wait - EPSILON))
        headers = (f"Retry-After: {retry}", *self.headers) if retry else self.headers
        answer = self.answer
        return Verdict(
            "reject",
            rule=self.name,
            reason=name,
            status=answer.status,
            phrase=answer.phrase or "",
            headers=headers,
            detail={"limit": name, "key": key, "retry_after": retry or None},
            sample=f"rate:{name}:{key}",
        )


def _key_of(name: str, call: CallInfo, ipv6_prefix: int) -> str | None:
    """What limit ``name`` counts the call under (None: not counted, e.g. no caller number);
    an IPv6 source address with its network of ``ipv6_prefix`` bits."""
    if name is PER_CALLER:
        return call.caller
    if name is PER_CALLEE:
        return call.callee
    if name is PER_PEER:
        return call.peer or NO_PEER
    ip = call.flow.addr[0]
    # a configured peer's address on its own: it must not share its rate with its neighbours
    return source_key(ip, ipv6_prefix) if ":" in ip and call.peer is None else ip


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> Rate | None:
    """The rule for one pipeline, or None when no limit is set."""
    if not any(getattr(settings, name) is not None for name in LIMITS):
        return None
    rule = Rate(settings, ctx.mode_of(settings), ctx.state.buckets)
    rule.max_keys = ctx.largest("rate", "max_keys", settings.max_keys)  # the tables are shared
    rule.ipv6_prefix = ctx.cfg.ipv6_prefix
    ctx.on_activate(rule.claim)
    return rule
