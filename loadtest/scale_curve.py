"""Scale curve: per-INVITE cost and memory as the rules' state grows (in process, no sockets).

Every call goes through ``EdgeCore.receive`` (flood guard, proxy, policy — as sipguard runs
them, with the cyclic GC off) under a policy with every rule that keeps per-number state on:
``callerid`` (plausibility, neighbor spoofing tagged; its number cache), ``concurrency``
(per_caller, per_callee, per_peer), ``rate`` (per_caller, per_callee, per_source_ip and
per_peer), ``dialer`` (every analytic, caller_rotation and pumping included, 1 h windows) and
``flood``. Limits and thresholds are out of reach: every call is admitted and takes the whole
path. Rate limits have a long horizon (a day) and the dialer a 1 h window, so the tables keep
every number that called during the run.

Three measurements:

1. ``tracked``: µs of CPU per call after the state has seen N distinct caller numbers
   (default 1 k, 100 k, 1 M). A fresh policy is warmed with N callers, one call each
   (``Policy.decide``, dialog start and end — what the edge core calls; the proxy keeps nothing
   per number once a call is over, so it is skipped there). Then batches of ``--batch`` whole
   calls (INVITE -> 100 + forward, 200, ACK, BYE, 200: five messages in) from callers drawn at
   random from the N, to 1 k called numbers (a contact center's DIDs), from 16 source
   addresses. The tables' sizes are printed to show they hold N numbers. The defaults cap
   rate tables at 100 k keys (``max_keys``) and the dialer's at 200 k (``max_numbers``):
   points above 100 k run with both raised to 2 N (and say so). The caller-ID number cache
   (``sipguard.policy.numbers``, 65,536 entries, one per process) has no setting; before each
   batch it is brought to what that point's callers keep in it (untimed).
2. ``live``: the same batches with L answered dialogs up and never ended (INVITE, 200, ACK
   through the proxy; default 1 k and 100 k, each a distinct caller), the measured calls from
   1 k of those callers (so the number cache is not what differs). ``max_dialogs`` and
   ``max_transactions`` are raised to hold them.
3. ``memory``: bytes per live dialog — RSS growth while the largest live point is set up
   (transactions expired: what sipguard keeps for an answered call, dialog table, leases and
   every rule's per-number state) and tracemalloc over ``--mem-dialogs`` more dialogs on a
   fresh core, by allocating file; and RSS growth per tracked number at the largest
   ``tracked`` point.

Every point is set up first and kept; then ``--repeat`` rounds time one batch of each point in
turn (the order rotated each round), so load that drifts hits every point alike, and each
point's figure is its best round. Ratios are against the 1 k tracked point of the same run.
Times are CPU time of this process (``time.process_time``) in ``EdgeCore.receive`` and
``handle_timer``; building messages is not counted. The cyclic GC is off throughout (as
sipguard runs; the state set up is frozen out of it). Bounded: every loop has a fixed count;
about 3-5 minutes with the defaults, ~30 s with ``--quick`` (1 k / 10 k / 50 k callers, 1 k /
10 k dialogs, batches of 1,500).

    .venv/bin/python loadtest/scale_curve.py [--quick] [--batch 10000] [--repeat 3]
        [--tracked 1000,100000,1000000] [--live 1000,100000] [--mem-dialogs 20000]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import SDP  # noqa: E402

from sipguard import native  # noqa: E402
from sipguard.contract import CallInfo, Dialog, Flow, Local  # noqa: E402
from sipguard.edge import EdgeCore  # noqa: E402
from sipguard.ops.config_load import parse_config  # noqa: E402
from sipguard.policy import numbers  # noqa: E402
from sipguard.policy.engine import Policy  # noqa: E402
from sipguard.policy.state import RuleState  # noqa: E402
from sipguard.proxy.settings import ProxySettings  # noqa: E402
from sipguard.sip.parser import parse_message  # noqa: E402

CORE = Flow("udp", ("10.0.0.10", 5080), 0)
SOURCES = [Flow("udp", (f"198.51.100.{10 + s}", 5062), 0) for s in range(16)]
DIDS = 1000  # called numbers: the contact center's
BIG = 10**9
NEVER = 100_000  # dialer count thresholds (their maximum)
DT = 0.001  # simulated seconds between calls: 1,000 calls/s
LIVE_DT = 0.01  # ... while the live dialogs are set up (fewer transactions up at once)
CACHE_TAIL = 70_000  # lookups that bring the number cache (65,536 entries) to a pool's
BASE = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"
DEFAULT_RATE_KEYS, DEFAULT_DIALER_NUMBERS = 100_000, 200_000


def rules(cap: int | None) -> str:
    """Every per-number rule on, nothing reachable; ``cap``: max_keys / max_numbers (None:
    the defaults)."""
    long = "{rate: 1000, per_s: 86400, burst: 1000000}"  # a day's horizon, never limiting
    rate_cap = f", max_keys: {cap}" if cap else ""
    dialer_cap = f", max_numbers: {cap}" if cap else ""
    return (
        "rules:\n"
        "  callerid: {neighbor_spoofing: {enabled: true, action: tag}}\n"
        f"  concurrency: {{per_caller: {BIG}, per_callee: {BIG}, per_peer: {BIG}}}\n"
        f"  rate: {{per_caller: {long}, per_callee: {long}, per_source_ip: {long}, "
        f"per_peer: {{rate: {BIG}}}{rate_cap}}}\n"
        f"  dialer: {{window_s: 3600, distinct_callees: {{tag: {NEVER}, block: {NEVER}}}, "
        f"short_calls: {{tag: 1, block: 1}}, asr: {{tag: 0, block: 0}}, "
        f"sequential: {{tag: {NEVER}, block: {NEVER}}}, "
        f"caller_rotation: {{tag: {NEVER}, block: {NEVER}}}, "
        f"pumping: {{per_callee: {{tag: {BIG // 100}, block: {BIG // 100}}}, "
        f"high_cost_prefixes: ['+1900*'], "
        f"high_cost: {{tag: {BIG // 100}, block: {BIG // 100}}}}}{dialer_cap}}}\n"
        "  flood: {density: 10000000}\n"
    )


def caller(k: int) -> str:
    return f"+1212{2_000_000 + k:07d}"  # valid NANP numbers, 8 M of them


def callee(j: int) -> str:
    return f"+1646{2_000_000 + j:07d}"


# ------------------------------------------------------------------ messages
def invite(i: int, src: Flow, frm: str, to: str) -> bytes:
    host, port = src.addr
    return (
        f"INVITE sip:{to}@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-{i}-a;rport\r\nMax-Forwards: 70\r\n"
        f"From: <sip:{frm}@{host}>;tag=f{i}\r\nTo: <sip:{to}@192.0.2.1>\r\n"
        f"Call-ID: {i}-scale@{host}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{frm}@{host}:{port}>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()


def in_dialog(method: str, i: int, src: Flow, frm: str, to: str, cseq: int) -> bytes:
    host, port = src.addr
    return (
        f"{method} sip:core@10.0.0.10:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-{i}-{method};rport\r\n"
        f"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        f"From: <sip:{frm}@{host}>;tag=f{i}\r\nTo: <sip:{to}@192.0.2.1>;tag=core1\r\n"
        f"Call-ID: {i}-scale@{host}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def response(req: bytes, status: int, phrase: str) -> bytes:
    """The core's answer to a request sipguard forwarded (its Vias and Record-Routes)."""
    msg = parse_message(req)
    vias = "".join(f"Via: {v}\r\n" for v in msg.values("via"))
    rr = "".join(f"Record-Route: {v}\r\n" for v in msg.values("record-route"))
    to = msg.get("to") or ""
    if msg.method == "INVITE":
        to += ";tag=core1"
    return (
        f"SIP/2.0 {status} {phrase}\r\n{vias}{rr}From: {msg.get('from')}\r\nTo: {to}\r\n"
        f"Call-ID: {msg.call_id}\r\nCSeq: {msg.get('cseq')}\r\n"
        f"Contact: <sip:core@10.0.0.10:5080>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


# ------------------------------------------------------------------ the edge core under test
@dataclass
class Bench:
    """One edge core and its simulated clock; ``seq`` numbers the calls it has seen."""

    core: EdgeCore
    policy: Policy
    now: float = 1000.0
    seq: int = 0
    cap: int | None = None
    failed: int = 0
    info: dict[str, int] = field(default_factory=dict)

    def tick(self, step: float = DT) -> float:
        """Advance the clock one call; run the timers when due (CPU seconds spent)."""
        self.now += step
        deadline = self.core.next_deadline()
        if deadline is None or deadline > self.now:
            return 0.0
        t0 = time.process_time()
        self.core.handle_timer(self.now)
        spent = time.process_time() - t0
        self.core.outbox.clear()
        self.core.drain_events()
        return spent

    def _in(self, data: bytes, flow: Flow) -> float:
        t0 = time.process_time()
        self.core.receive(data, flow, self.now)
        return time.process_time() - t0

    def call(self, frm: str, to: str, src: Flow, end: bool = True,
             step: float = DT) -> tuple[float, float]:
        """One call through the core: (CPU s of its INVITE, CPU s of the whole call)."""
        i = self.seq = self.seq + 1
        core = self.core
        t_invite = self._in(invite(i, src, frm, to), src)
        out = core.outbox
        if not out or out[-1][0] != CORE or not out[-1][1].startswith(b"INVITE"):
            raise RuntimeError(f"INVITE not forwarded: {core.drain_events()!r}")
        fwd = out[-1][1]
        out.clear()
        core.drain_events()
        spent = t_invite + self._in(response(fwd, 200, "OK"), CORE)
        spent += self._in(in_dialog("ACK", i, src, frm, to, 1), src)
        if end:
            spent += self._in(in_dialog("BYE", i, src, frm, to, 2), src)
            if not out or not out[-1][1].startswith(b"BYE"):
                raise RuntimeError(f"BYE not forwarded: {core.drain_events()!r}")
            bye = out[-1][1]
            out.clear()
            spent += self._in(response(bye, 200, "OK"), CORE)
        out.clear()
        self.failed += sum(1 for e in core.drain_events() if type(e).__name__ == "Failed")
        return t_invite, spent + self.tick(step)

    def batch(self, n: int, pool: int, rng: random.Random) -> tuple[float, float]:
        """(µs per INVITE, µs per whole call) over ``n`` calls from callers 0..pool-1."""
        plan = [(caller(rng.randrange(pool)), callee(rng.randrange(DIDS)),
                 SOURCES[rng.randrange(len(SOURCES))]) for _ in range(n)]
        inv = whole = 0.0
        for frm, to, src in plan:
            a, b = self.call(frm, to, src)
            inv += a
            whole += b
        if self.failed:
            raise RuntimeError(f"{self.failed} messages failed in the core")
        return inv / n * 1e6, whole / n * 1e6


def new_bench(cap: int | None) -> Bench:
    settings = ProxySettings(locals=(Local(0, "udp", "192.0.2.1", 5060),), core=CORE,
                             max_dialogs=1_000_000, max_transactions=1_000_000)
    policy = Policy(parse_config(BASE + rules(cap)), RuleState(), trusted=[CORE.addr])
    return Bench(EdgeCore(settings, policy, b"k" * 32), policy, cap=cap)


PLAIN = parse_message(
    b"INVITE sip:+16462000000@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.10;branch=z9hG4"
    b"bK1\r\nFrom: <sip:+12122000000@198.51.100.10>;tag=1\r\nTo: <sip:+16462000000@192.0.2.1>"
    b"\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


def warm(bench: Bench, n: int) -> None:
    """``n`` distinct callers, one call each, answered and ended, through the policy."""
    p = bench.policy
    rng = random.Random(n)
    for k in range(n):
        now = bench.now = bench.now + DT
        src = SOURCES[k % len(SOURCES)]
        c = CallInfo(PLAIN, src, now, lease=f"w{k}")
        c.caller, c.callee = caller(k), callee(rng.randrange(DIDS))
        verdict = p.decide(c, now)
        if not getattr(verdict, "accepted", False):
            raise RuntimeError(f"warm-up call rejected: {verdict!r}")
        d = Dialog(f"w{k}", "t", None, c.caller, c.callee, (), None, src.addr, now,
                   now + 14400.0, lease=c.lease)
        c.settled = True
        p.dialog_started(d, now)
        d.confirmed_at, d.ended_at, d.state = now, now, "terminated"
        p.dialog_ended(d, now)
    bench.core.handle_timer(bench.now)


def make_live(bench: Bench, n: int) -> None:
    """``n`` answered calls that stay up (no BYE), callers n distinct numbers; then the
    transactions they left expire."""
    rng = random.Random(n + 1)
    for k in range(n):
        bench.call(caller(k), callee(rng.randrange(DIDS)), SOURCES[k % len(SOURCES)],
                   end=False, step=LIVE_DT)
    bench.now += 65.0  # past Timer J/K and the INVITE transactions' ends
    bench.tick()
    if len(bench.core.proxy.dialogs) != n or bench.failed:
        raise RuntimeError(f"{len(bench.core.proxy.dialogs)} live dialogs, wanted {n}")


def sizes(bench: Bench) -> dict[str, int]:
    """How many keys each per-number table holds now."""
    st = bench.policy.state
    out = {f"rate.{k}": v for k, v in st.buckets.size().items()}
    out |= {"dialer.callers": len(st.dialer.callers), "dialer.callees": len(st.dialer.callees),
            "dialer.origins": len(st.dialer.origins)}
    conc = st.tracker.stats()
    out |= {"conc.callers": conc["numbers_caller"], "conc.callees": conc["numbers_callee"],
            "conc.live": conc["live_calls"]}
    out["flood.sources"] = len(st.flood.cur) + len(st.flood.prev)
    out["numbers.cache"] = numbers._lookup.cache_info().currsize
    out["proxy.dialogs"] = len(bench.core.proxy.dialogs)
    out["proxy.txns"] = len(bench.core.proxy.servers) + len(bench.core.proxy.clients)
    dropped = sum(t.dropped for t in st.buckets.tables.values()) + st.dialer.callers.dropped
    out["dropped"] = dropped
    return out


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def refill(pool: int, rng: random.Random) -> None:
    """Bring the caller-ID number cache (one per process, 65,536 entries) to what a core whose
    callers are drawn from ``pool`` keeps in it (untimed: the cores take turns)."""
    for _ in range(min(pool, CACHE_TAIL)):
        numbers.lookup(caller(rng.randrange(pool)))
    for j in range(DIDS):
        numbers.lookup(callee(j))


def fmt(n: int) -> str:
    return f"{n // 1_000_000} M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000} k" if n >= 1000 and n % 1000 == 0 else str(n))


@dataclass
class Point:
    kind: str  # tracked | live
    size: int
    bench: Bench
    pool: int  # callers of the timed calls: 0..pool-1
    cap: int | None  # max_keys / max_numbers when raised
    rss_each: float  # RSS growth per tracked number / live dialog while set up, bytes
    setup_s: float
    runs: list[tuple[float, float]] = field(default_factory=list)  # (µs/INVITE, µs/call)
    tables: dict[str, int] = field(default_factory=dict)

    @property
    def inv(self) -> float:
        return min(r[0] for r in self.runs)

    @property
    def whole(self) -> float:
        return min(r[1] for r in self.runs)

    @property
    def label(self) -> str:
        return f"{fmt(self.size)} {'tracked callers' if self.kind == 'tracked' else 'live dialogs'}"


def setup(kind: str, size: int) -> Point:
    r0 = rss()
    t0 = time.perf_counter()
    cap = 2 * size if kind == "tracked" and size > DEFAULT_RATE_KEYS else None
    bench = new_bench(cap)
    if kind == "tracked":
        warm(bench, size)
    else:
        make_live(bench, size)
    spent = time.perf_counter() - t0
    return Point(kind, size, bench, size if kind == "tracked" else min(size, 1000), cap,
                 (rss() - r0) / size, spent)


def traced_dialogs(count: int) -> tuple[float, dict[str, float]]:
    """tracemalloc bytes per live dialog: all, and by the source file that allocated them (a
    compiled module's allocations are counted where Python called into it)."""
    bench = new_bench(None)
    make_live(bench, 100)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    rng = random.Random(3)
    for k in range(100, 100 + count):
        bench.call(caller(k), callee(rng.randrange(DIDS)), SOURCES[k % len(SOURCES)],
                   end=False, step=LIVE_DT)
    bench.now += 65.0
    bench.tick()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = 0
    by_file: dict[str, float] = {}
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    for stat in after.compare_to(before, "filename"):
        total += stat.size_diff
        name = stat.traceback[0].filename.removeprefix(root)
        by_file[name] = by_file.get(name, 0) + stat.size_diff / count
    return total / count, by_file


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s version (smaller points)")
    ap.add_argument("--batch", type=int, default=None, help="calls per timed batch (10000)")
    ap.add_argument("--repeat", type=int, default=None, help="rounds, best of them (3)")
    ap.add_argument("--tracked", default=None, help="distinct callers (1000,100000,1000000)")
    ap.add_argument("--live", default=None, help="live dialogs (1000,100000)")
    ap.add_argument("--mem-dialogs", type=int, default=None, help="tracemalloc dialogs (20000)")
    args = ap.parse_args()
    q = args.quick
    n = args.batch or (1500 if q else 10_000)
    repeat = args.repeat or 3
    tracked = [int(x) for x in (args.tracked or ("1000,10000,50000" if q else
                                                 "1000,100000,1000000")).split(",")]
    lives = [int(x) for x in (args.live or ("1000,10000" if q else "1000,100000")).split(",")]
    mem_n = args.mem_dialogs or (2000 if q else 20_000)
    started = time.perf_counter()
    compiled = bool(native.status()[0])
    print(f"sipguard scale curve — {'compiled (mypyc)' if compiled else 'sources'}; "
          f"{n} calls per batch, best of {repeat} rounds; CPU µs per whole call (5 messages "
          "in) and per INVITE (decision + forward)", flush=True)
    # as sipguard runs: no automatic GC passes (the state set up below is frozen out of them)
    gc.collect()
    gc.disable()

    points: list[Point] = []
    for kind, sizes_ in (("tracked", tracked), ("live", lives)):
        for size in sizes_:
            points.append(setup(kind, size))
            print(f"  set up {points[-1].label:<22} {points[-1].setup_s:5.1f} s", flush=True)
    gc.freeze()
    # rounds: every point once per round (order rotated), so drifting load hits all alike
    for r in range(repeat):
        order = points[r % len(points):] + points[:r % len(points)]
        for p in order:
            rng = random.Random(100 * r + p.size)
            refill(p.pool, rng)
            p.bench.batch(max(n // 10, 200), p.pool, rng)  # untimed: the core's own caches
            p.runs.append(p.bench.batch(n, p.pool, rng))
            p.tables = sizes(p.bench)  # the number cache is the process's: read it now
        print(f"  round {r + 1}: " + "  ".join(f"{p.label} {p.runs[-1][1]:.0f}"
                                               for p in points)
              + f" µs/call  (at {time.perf_counter() - started:.0f} s)", flush=True)
    base = points[0]
    b_inv, b_whole = base.inv, base.whole
    rss_live = [p for p in points if p.kind == "live"]
    big_live = max(rss_live, key=lambda p: p.size) if rss_live else None
    big_tracked = max((p for p in points if p.kind == "tracked"), key=lambda p: p.size)
    for p in points:  # what the measurement no longer needs
        p.bench = None  # type: ignore[assignment]
    gc.unfreeze()
    gc.collect()
    traced, by_file = traced_dialogs(mem_n)
    traced_policy = sum(v for k, v in by_file.items() if k.startswith(f"sipguard{os.sep}policy"))
    top = sorted(by_file.items(), key=lambda kv: -kv[1])[:6]

    # report
    print()
    print(f"{'state':<22} {'µs/INVITE':>10} {'×1k':>5} {'µs/call':>8} {'×1k':>5}  "
          "tables (keys)")
    for p in points:
        t = p.tables
        print(f"{p.label:<22} {p.inv:10.1f} {p.inv / b_inv:5.2f} {p.whole:8.1f} "
              f"{p.whole / b_whole:5.2f}  rate.per_caller={t['rate.per_caller']:,} "
              f"dialer.callers={t['dialer.callers']:,} conc.callers={t['conc.callers']:,} "
              f"numbers.cache={t['numbers.cache']:,} dialogs={t['proxy.dialogs']:,}"
              + (f"  [max_keys/max_numbers {fmt(p.cap)}]" if p.cap else ""))
    print(f"baseline {base.label}: every round " + ", ".join(f"{a:.1f}/{b:.1f}"
                                                              for a, b in base.runs)
          + " µs/INVITE / µs/call")
    print("every table at each point (after the timed batches):")
    for p in points:
        print(f"  {p.label}: " + ", ".join(f"{k}={v:,}" for k, v in p.tables.items()))
    print("memory:")
    if big_live is not None:
        print(f"  per live dialog    {big_live.rss_each:7,.0f} B RSS growth ({big_live.label}, "
              "distinct callers, transactions expired)")
    # tracemalloc names the Python line that allocated; compiled modules have none, so what
    # the compiled rules and proxy allocate is counted at the (Python) caller that led there
    where = ("compiled: allocations of compiled modules are filed under their Python caller"
             if compiled else f"{traced_policy:,.0f} B of it allocated in sipguard/policy")
    print(f"  per live dialog    {traced:7,.0f} B tracemalloc ({fmt(mem_n)} dialogs; {where})")
    print("    by allocating file: " + ", ".join(f"{k} {v:,.0f}" for k, v in top))
    print(f"  per tracked number {big_tracked.rss_each:7,.0f} B RSS growth "
          f"({big_tracked.label}, after their calls ended)")
    print(f"({time.perf_counter() - started:.0f} s wall)")

    print()
    print(f"Scale curve ({'compiled' if compiled else 'sources'}; CPU µs, batches of {n}, "
          f"best of {repeat} interleaved rounds; ratios against {base.label} in the same run):")
    print()
    print("| state | µs/INVITE | × 1 k | µs/call | × 1 k | tables hold |")
    print("|---|---:|---:|---:|---:|---|")
    for p in points:
        t = p.tables
        note = f"; max_keys/max_numbers raised to {fmt(p.cap)}" if p.cap else ""
        print(f"| {p.label} | {p.inv:.1f} | {p.inv / b_inv:.2f} | {p.whole:.1f} | "
              f"{p.whole / b_whole:.2f} | rate.per_caller {t['rate.per_caller']:,}, "
              f"dialer.callers {t['dialer.callers']:,}, concurrency callers "
              f"{t['conc.callers']:,}, number cache {t['numbers.cache']:,}, dialogs "
              f"{t['proxy.dialogs']:,}{note} |")
    print()
    live_note = (f"{big_live.rss_each:,.0f} B RSS at {big_live.label}, "
                 if big_live is not None else "")
    rules_share = "" if compiled else f" ({traced_policy:,.0f} B in the rules' state)"
    print(f"Memory per live dialog: {live_note}{traced:,.0f} B tracemalloc"
          f"{rules_share}; per tracked number "
          f"{big_tracked.rss_each:,.0f} B RSS at {fmt(big_tracked.size)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
