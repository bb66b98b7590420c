"""Micro-benchmark: what rules ``rate`` and ``dialer`` cost per initial INVITE, and the memory
they keep after a million distinct one-off caller numbers.

In memory, no sockets. Measurements:

* ``decide``: µs per INVITE in ``Policy.decide`` (the whole pipeline) plus, for the dialer,
  the call's ``dialog_ended`` — with no rules, with ``rate`` (per_caller, per_callee,
  per_peer, per_source_ip), with ``dialer`` (every analytic on, caller_rotation and pumping
  included) and with both; numbers drawn from a pool of 1 k callers (the same numbers again
  and again) and from an endless supply of one-off numbers (every call a new caller and
  callee). O(1) means the columns are about equal. Limits and thresholds are set so that no
  call is rejected: every call takes the whole path.
* ``memory``: bytes held by the rules' state (``RuleState``, walked object by object) after
  ``--numbers`` one-off callers (default 1 M), each calling once and hanging up, at
  ``--cps`` calls per second of simulated time (default 1,000: 1,000 s), with the default
  ``max_keys`` / ``max_numbers``; and after the same numbers all at one instant (the caps
  hold).
* ``invite``: a whole initial INVITE through ``EdgeCore.receive`` (the proxy: parse, 100
  Trying, decision, forwarding, dialog start delivered to the policy) plus its dialog end,
  without rules and with rate + dialer: the single-core ceiling of calls per second with these
  rules on.

    .venv/bin/python loadtest/rate_cost.py [--numbers 1000000] [--cps 1000] [--n 50000]

Times are CPU time of this process (``time.process_time``) with the cyclic GC paused in the
timed loops. Bounded: every loop has a fixed count; a few minutes with the defaults.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import invite, quiet_gc  # noqa: E402

from sipguard.contract import CallInfo, Dialog, DialogStarted, Flow, InviteDecided, Local  # noqa: E402
from sipguard.edge import EdgeCore  # noqa: E402
from sipguard.ops.config_load import parse_config  # noqa: E402
from sipguard.policy.engine import Policy  # noqa: E402
from sipguard.policy.state import RuleState  # noqa: E402
from sipguard.proxy.settings import ProxySettings  # noqa: E402
from sipguard.sip.parser import parse_message  # noqa: E402

SRC = ("198.51.100.7", 5062)
CORE = ("10.0.0.10", 5080)
BASE = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"
BIG = 10**6
NEVER = 100_000  # dialer thresholds never reached here
RATE = (f"  rate: {{per_caller: {{rate: {BIG}, burst: 3}}, per_callee: {{rate: {BIG}}}, "
        f"per_peer: {{rate: {BIG}}}, per_source_ip: {{rate: {BIG}}}}}\n")
DIALER = (f"  dialer: {{distinct_callees: {{tag: {NEVER}, block: {NEVER}}}, "
          f"sequential: {{tag: {NEVER}, block: {NEVER}}}, "
          f"caller_rotation: {{tag: {NEVER}, block: {NEVER}}}, "
          f"pumping: {{per_callee: {{tag: {NEVER}, block: {NEVER}}}, "
          f"high_cost_prefixes: ['+1900*'], high_cost: {{tag: {NEVER}, block: {NEVER}}}}}}}\n")
# The defaults, as an operator would run them (memory measurement).
DEFAULT_RATE = "  rate: {per_caller: {rate: 1, burst: 3}, per_callee: {rate: 1, burst: 5}}\n"
DEFAULT_DIALER = "  dialer: {pumping: {}}\n"  # caller_rotation is off by default
PLAIN = parse_message(
    b"INVITE sip:+18005550199@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bK1"
    b"\r\nFrom: <sip:+12125550100@198.51.100.7>;tag=1\r\nTo: <sip:+18005550199@192.0.2.1>\r\n"
    b"Call-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
FLOW = Flow("udp", SRC, 0)
BATCH = 10_000


def policy(rules: str) -> Policy:
    p = Policy(parse_config(BASE + ("rules:\n" + rules if rules else "")), RuleState())
    p.activate()
    return p


def make_calls(start: int, n: int, pool: int | None, rng: random.Random, now: float,
               ) -> list[tuple[CallInfo, Dialog]]:
    """``n`` calls (and their ended dialogs): numbers from a pool, or one-off when None."""
    out = []
    for i in range(start, start + n):
        if pool is None:
            caller, callee = f"+1{2_000_000_000 + i:010d}", f"+1{8_000_000_000 + i * 7:010d}"
        else:
            caller = f"+1{2_000_000_000 + rng.randrange(pool):010d}"
            callee = f"+1{8_000_000_000 + rng.randrange(10**9):010d}"
        call = CallInfo(PLAIN, FLOW, now)
        call.caller, call.callee = caller, callee
        d = Dialog(f"{i:x}@bench", "t", "u", caller, callee, (), None, SRC, now, now + 14400)
        d.confirmed_at = now + 5 if i % 3 else None
        d.ended_at = now + 60
        d.state = "terminated"
        out.append((call, d))
    return out


def bench_decide(rules: str, n: int, pool: int | None, seed: int) -> float:
    """µs per INVITE: Policy.decide + dialog_ended, 10 calls/s of simulated time."""
    rng = random.Random(seed)
    p = policy(rules)
    spent = 0.0
    done = 0
    while done < n:
        batch = make_calls(done, min(BATCH, n - done), pool, rng, 0.0)
        with quiet_gc():
            t0 = time.process_time()
            for i, (call, d) in enumerate(batch, done):
                now = i / 10.0
                verdict = p.decide(call, now)
                p.dialog_ended(d, now)
            spent += time.process_time() - t0
        assert getattr(verdict, "action", "accept") == "accept", verdict
        done += len(batch)
    return spent / n * 1e6


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of ``obj`` and everything it holds (dicts, lists, tuples, slotted objects)."""
    seen = set() if seen is None else seen
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type) or callable(o) and not hasattr(o, "__slots__"):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, Policy):
            stack.append(o.__dict__)
        else:
            for klass in type(o).__mro__:
                for name in getattr(klass, "__slots__", ()):
                    value = getattr(o, name, None)
                    if value is not None and not isinstance(value, Policy):
                        stack.append(value)
    return total


def state_size(p: Policy) -> dict[str, int]:
    seen: set[int] = set()
    for rule in (*p.rules,):  # rule objects (settings) are not per-number state
        seen.add(id(rule))
    return {"rate.buckets": deep_size(p.state.buckets, seen),
            "dialer.state": deep_size(p.state.dialer, seen)}


def bench_memory(numbers: int, cps: float | None) -> tuple[dict[str, int], dict[str, int], float]:
    """(state bytes by rule, live keys by table, µs per call) after ``numbers`` one-off callers,
    at ``cps`` calls/s of simulated time (None: all at one instant)."""
    p = policy(DEFAULT_RATE + DEFAULT_DIALER)
    rng = random.Random(1)
    done = 0
    spent = 0.0
    while done < numbers:
        batch = make_calls(done, min(BATCH, numbers - done), None, rng, 0.0)
        with quiet_gc():
            t0 = time.process_time()
            for i, (call, d) in enumerate(batch, done):
                now = 1000.0 + (i / cps if cps else 0.0)
                p.decide(call, now)
                p.dialog_ended(d, now)
            spent += time.process_time() - t0
        done += len(batch)
    keys = {f"rate.{k}": v for k, v in p.state.buckets.size().items() if v}
    dialer = p.state.dialer
    keys |= {"dialer.callers": len(dialer.callers), "dialer.callees": len(dialer.callees),
             "dialer.origins": len(dialer.origins)}
    gc.collect()
    return state_size(p), keys, spent / numbers * 1e6


def bench_invite(n: int, rules: str) -> float:
    """µs per initial INVITE through the proxy (one-off numbers), plus its dialog end."""
    p = policy(rules)
    settings = ProxySettings(locals=(Local(0, "udp", "192.0.2.1", 5060),),
                             core=Flow("udp", CORE, 0))
    core = EdgeCore(settings, p, b"k" * 32)
    data = [invite(i, f"+1{2_000_000_000 + i:010d}", f"+1{8_000_000_000 + 7 * i:010d}")
            for i in range(n)]
    ended = 0
    with quiet_gc():
        t0 = time.process_time()
        for i, raw in enumerate(data):
            now = 1000.0 + i / 100.0
            core.receive(raw, FLOW, now)
            core.outbox.clear()
            for event in core.drain_events():
                if isinstance(event, InviteDecided):
                    assert event.verdict.accepted, event.verdict
                elif isinstance(event, DialogStarted):
                    d = event.dialog
                    d.ended_at = now
                    p.dialog_ended(d, now)
                    ended += 1
        spent = time.process_time() - t0
    assert ended == n, ended
    return spent / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="INVITEs per timing (default 50000)")
    ap.add_argument("--numbers", type=int, default=1_000_000,
                    help="one-off callers for the memory run (default 1000000)")
    ap.add_argument("--cps", type=float, default=1000.0,
                    help="simulated calls/s of the memory run (default 1000)")
    args = ap.parse_args()
    print(f"decide + dialog end, µs per INVITE (CPU time, {args.n} INVITEs)")
    print(f"{'rules':<14} {'1k callers':>11} {'one-off':>9}")
    for name, rules in (("none", ""), ("rate", RATE), ("dialer", DIALER),
                        ("rate+dialer", RATE + DIALER)):
        pooled = bench_decide(rules, args.n, 1000, 7)
        oneoff = bench_decide(rules, args.n, None, 7)
        print(f"{name:<14} {pooled:>11.2f} {oneoff:>9.2f}")
    print()
    for label, cps in ((f"{args.cps:g} calls/s", args.cps), ("one instant", None)):
        sizes, keys, us = bench_memory(args.numbers, cps)
        total = sum(sizes.values())
        print(f"memory after {args.numbers:,} one-off callers, {label} (defaults):"
              f" {total / 2**20:.1f} MiB ({us:.1f} µs/call)")
        for k, v in sizes.items():
            print(f"  {k:<14} {v / 2**20:8.1f} MiB")
        print("  live keys: " + ", ".join(f"{k}={v:,}" for k, v in keys.items()))
    print()
    print(f"whole INVITE through the proxy + dialog end, µs (CPU time, {args.n // 5} INVITEs)")
    base = bench_invite(args.n // 5, "")
    both = bench_invite(args.n // 5, RATE + DIALER)
    print(f"  no rules     {base:8.1f} µs  ({1e6 / base:,.0f} calls/s on one core)")
    print(f"  rate+dialer  {both:8.1f} µs  ({1e6 / both:,.0f} calls/s on one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
