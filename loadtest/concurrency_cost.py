"""Micro-benchmark: what rule ``concurrency`` costs per initial INVITE and per live call.

In memory, no sockets. Three measurements:

* ``rule``: per INVITE, ``decide`` (every limit on: per_caller, per_callee, per_diverter,
  per_peer, max_diversions; an admitted call takes its slot there) plus the dialog's start
  (the slot handed to it) and, for an older dialog, its end — with
  ``--live`` dialogs up all the time, and caller / callee / diverter numbers drawn from a pool
  of 1 k and of 1 M distinct numbers. O(1) means the two columns are about equal.
* ``invite``: a whole initial INVITE through ``EdgeCore.receive`` (the proxy: parse, 100
  Trying, decision, forwarding, dialog start delivered to the policy) with no rules and with
  ``concurrency``.
* ``memory``: bytes per live dialog (tracemalloc) held by the concurrency tracker (its lease,
  keys, counts and expiry entry) and by the proxy's dialog table (the Dialog, its lease id —
  shared with the tracker —, its table entry and its expiry entry) — transactions, which live
  ~32 s, are not counted.

    .venv/bin/python loadtest/concurrency_cost.py [--live 100000] [--n 100000] [--repeat 2]

Times are CPU time of this process (``time.process_time``, so other load on the machine does
not count) with the cyclic GC paused in the timed loops. Bounded: about a minute with the
defaults.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import invite, quiet_gc  # noqa: E402

from sipguard.contract import Dialog, Flow, Local  # noqa: E402
from sipguard.edge import EdgeCore  # noqa: E402
from sipguard.ops.config_load import parse_config  # noqa: E402
from sipguard.policy.concurrency import Concurrency, Tracker  # noqa: E402
from sipguard.policy.concurrency_settings import Settings  # noqa: E402
from sipguard.policy.engine import Policy  # noqa: E402
from sipguard.policy.state import RuleState  # noqa: E402
from sipguard.proxy.settings import ProxySettings  # noqa: E402
from sipguard.sip.parser import parse_message  # noqa: E402
from sipguard.state.expiry import ExpiryWheel  # noqa: E402

SRC = ("198.51.100.7", 5062)
CORE = ("10.0.0.10", 5080)
BIG = 10**9  # limits that are checked but never reached, so every call goes the whole path
BASE = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"
RULES = (f"rules:\n  concurrency: {{per_caller: {BIG}, per_callee: {BIG}, per_diverter: {BIG}, "
         f"per_peer: {BIG}, max_diversions: 5}}\n")


def number(pool: int, rng: random.Random, base: int) -> str:
    return f"+1{base + rng.randrange(pool):010d}"


class Call:
    """What ``Concurrency.decide`` reads from (and writes to) a CallInfo (no parsing in the
    timed loop); ``lease`` is the id the call's slot is taken under."""

    __slots__ = ("caller", "callee", "diverters", "peer", "msg", "lease", "held")

    def __init__(self, caller: str, callee: str, diverters: tuple[str, ...], lease: str) -> None:
        self.caller, self.callee, self.diverters, self.peer = caller, callee, diverters, None
        self.msg = PLAIN
        self.lease = lease
        self.held = False


PLAIN = parse_message(
    b"INVITE sip:+18005550199@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bK1"
    b"\r\nFrom: <sip:+12125550100@198.51.100.7>;tag=1\r\nTo: <sip:+18005550199@192.0.2.1>\r\n"
    b"Call-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


def lease_of(i: int) -> str:
    """The lease id the proxy gives call number ``i``: Call-ID, From tag, transaction key."""
    return f"{i:x}-bench@198.51.100.7\nf{i:x}\nz9hG4bK-{i}-a|198.51.100.7:5062"


def dialog(i: int, call: Call, now: float) -> Dialog:
    """Call number ``i`` as a dialog, holding the call's lease (as the proxy hands it on)."""
    return Dialog(f"{i:x}-bench@198.51.100.7", f"f{i:x}", None, call.caller, call.callee,
                  call.diverters, None, SRC, now, now + 14400.0, lease=call.lease)


def calls(n: int, pool: int, rng: random.Random, first: int = 0) -> list[Call]:
    """``n`` calls numbered from ``first``, each with a lease id as the proxy makes it (Call-ID,
    From tag and server transaction)."""
    out = []
    for i in range(first, first + n):
        diverters = (number(pool, rng, 3_000_000_000),) if rng.random() < 0.1 else ()
        out.append(Call(number(pool, rng, 2_000_000_000), number(pool, rng, 8_000_000_000),
                        diverters, lease_of(i)))
    return out


def bench_rule(live: int, n: int, pool: int, seed: int) -> tuple[float, float]:
    """(µs per INVITE for decide + start + end, µs for decide alone) at ``live`` dialogs."""
    rng = random.Random(seed)
    tracker = Tracker()
    rule = Concurrency(Settings(per_caller=BIG, per_callee=BIG, per_diverter=BIG, per_peer=BIG,
                                max_diversions=5), "enforce", tracker)
    now = 1000.0
    up: deque[Dialog] = deque()
    for i, c in enumerate(calls(live, pool, rng)):
        d = dialog(i, c, now)
        tracker.dialog_started(d, now)
        up.append(d)
    todo = calls(n, pool, rng, live)
    fresh = [dialog(live + i, c, now) for i, c in enumerate(todo)]
    again = calls(n, pool, rng, live + n)  # new attempts: decide alone takes their slots
    with quiet_gc():
        t0 = time.process_time()
        for c, d in zip(todo, fresh, strict=True):
            verdict = rule.decide(c, now)  # type: ignore[arg-type]
            assert verdict is None and c.held
            tracker.dialog_started(d, now)
            tracker.dialog_ended(up.popleft(), now)
            up.append(d)
        whole = (time.process_time() - t0) / n * 1e6
        t0 = time.process_time()
        for c in again:
            rule.decide(c, now)  # type: ignore[arg-type]
        alone = (time.process_time() - t0) / n * 1e6
    assert tracker.stats()["live_calls"] == live + n
    for c in again:  # none became a dialog: their slots go back
        assert c.held
        tracker.call_abandoned(c, now)  # type: ignore[arg-type]
    stats = tracker.stats()
    assert stats["live_calls"] == live and stats["unmatched_ends"] == 0
    return whole, alone


def bench_invite(n: int, rules: str, seed: int) -> float:
    """µs per initial INVITE through the proxy with a Policy built from ``rules``."""
    rng = random.Random(seed)
    policy = Policy(parse_config(BASE + rules), RuleState())
    settings = ProxySettings(locals=(Local(0, "udp", "192.0.2.1", 5060),),
                             core=Flow("udp", CORE, 0))
    core = EdgeCore(settings, policy, b"k" * 32)  # delivers dialog starts to the policy
    data = [invite(i, number(1_000_000, rng, 2_000_000_000), number(1_000_000, rng, 8_000_000_000))
            for i in range(n)]
    src = Flow("udp", SRC, 0)
    now = 1000.0
    with quiet_gc():
        t0 = time.process_time()
        for raw in data:
            core.receive(raw, src, now)
            core.drain_events()
            core.outbox.clear()
        spent = time.process_time() - t0
    assert len(core.proxy.dialogs) == n  # every INVITE accepted and forwarded
    if rules:
        assert policy.state.tracker.stats()["live_calls"] == n
    return spent / n * 1e6


def bench_memory(live: int, pool: int, seed: int) -> tuple[float, float]:
    """(tracker bytes per live dialog, proxy dialog-table bytes per live dialog)."""
    rng = random.Random(seed)
    now = 1000.0
    cs = calls(live, pool, rng)
    dialogs_ = [dialog(i, c, now) for i, c in enumerate(cs)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracker = Tracker()
    for d in dialogs_:
        tracker.dialog_started(d, now)
    tracker_bytes = (tracemalloc.get_traced_memory()[0] - before) / live
    tracemalloc.stop()
    del tracker
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table: dict[tuple[str, str], Dialog] = {}
    wheel: ExpiryWheel[tuple[str, str]] = ExpiryWheel()
    for i, c in enumerate(cs):  # what Proxy._apply_verdict keeps per dialog
        # its lease id (made per call by the proxy, shared with the tracker) is counted here
        d = Dialog(f"{i:x}-bench@198.51.100.7", f"f{i:x}", None, c.caller, c.callee,
                   c.diverters, None, SRC, now + i * 0.01, now + i * 0.01 + 14400.0,
                   lease=lease_of(i))
        d.hard_expires = d.expires
        key = (d.call_id, d.caller_tag)
        table[key] = d
        wheel.set(key, d.expires)
    table_bytes = (tracemalloc.get_traced_memory()[0] - before) / live
    tracemalloc.stop()
    return tracker_bytes, table_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--live", type=int, default=100_000, help="live dialogs held throughout")
    ap.add_argument("--n", type=int, default=100_000, help="INVITEs timed per pool size")
    ap.add_argument("--invites", type=int, default=5_000, help="INVITEs through the proxy")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    args = ap.parse_args()
    started = time.perf_counter()
    print(f"rule: decide (5 limits) + dialog start + end, {args.live} live dialogs, best of "
          f"{args.repeat}")
    print("  distinct numbers   µs/INVITE   decide µs   INVITEs/s/core")
    for pool in (1_000, 1_000_000):
        whole, alone = min(bench_rule(args.live, args.n, pool, seed) for seed in
                           range(args.repeat))
        print(f"  {pool:>16,}   {whole:9.2f}   {alone:9.2f}   {1e6 / whole:14,.0f}")
    offs, ons = [], []
    for seed in range(2 * args.repeat + 1):  # interleaved, so drifting load hits both alike
        offs.append(bench_invite(args.invites, "", seed))
        ons.append(bench_invite(args.invites, RULES, seed))
    off, on = min(offs), min(ons)
    print(f"invite: whole initial INVITE through EdgeCore.receive, {args.invites} INVITEs, "
          "1 M distinct numbers")
    print(f"  no rules           {off:9.1f} µs")
    print(f"  concurrency on     {on:9.1f} µs   (+{on - off:.1f} µs, {on / off - 1:+.1%})")
    print(f"memory per live dialog ({args.live} live, tracemalloc)")
    print("  distinct numbers   tracker B   proxy dialog table B")
    for pool in (1_000, 1_000_000):
        tracker_b, table_b = bench_memory(args.live, pool, 7)
        print(f"  {pool:>16,}   {tracker_b:9.0f}   {table_b:20.0f}")
    print(f"({time.perf_counter() - started:.0f} s wall)")


if __name__ == "__main__":
    main()
