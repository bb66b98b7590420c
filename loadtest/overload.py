"""Overload run: sipguard at twice the rate it can carry, then back under it.

What a network engineer wants to see before putting sipguard inline: when the offered load is
more than it can process, it sheds new calls early and cheaply with ``503`` + ``Retry-After``
(overload protection, ``sip.overload_*``), every call it did accept still completes (its ACK,
BYE and answers are not lost in the overflow), and it is back to normal within seconds when
the load falls.

One run, on 127.0.0.1, with the comparison's sipguard config (``all_rules.yaml``; no Identity):

1. **overload** — a SIPp UAC offers ``--factor`` × ``--rate`` calls/s for ``--duration`` s;
2. **recovery** — as the first one stops generating, a second UAC offers ``--rate`` / 2 calls/s
   for ``--recover-duration`` s.

The UAC scenario is ``scenarios/uac_overload.xml``: a call either completes (200 ... BYE ... 200)
or is shed by a 503 that must carry Retry-After; anything else (a timeout, an unexpected
message) fails the call. Per phase it reports calls attempted, accepted (answered 200),
shed (503), failed, accepted calls that did not complete, retransmissions; from sipguard's log,
when overload protection switched on and off (seconds from the start of the run) and how long
after the load fell it was last on; sipguard's counters at the end (``overload_rejected``,
``udp_receive_dropped``). The pass marks: no accepted call lost (completed = accepted in both
phases, within 0.1 %), some calls shed in phase 1, none failed in phase 2, none shed in phase 2
after its first ``--recover-within`` s (default 5; a 503 then means something other than the
overload still refuses calls, such as a full transaction table), overload off within
``--recover-within`` s of the load falling.

    .venv/bin/python loadtest/overload.py [--rate 1000] [--factor 2] [--duration 15]
                                          [--transport tcp] [--workers 2]

``--workers N``: N sipguard processes sharing their limits in shared memory (``state.backend:
shared_memory``, ``worker_spread: caller``: the worker that reads a datagram hands it to the
caller's), unpinned; each watches its own queues, the hand-over one included, and sheds on its own.

``--transport tcp``: both legs over TCP (the callers on one SIPp connection, the core on
another), so no UDP queue can show the overload: shedding starts on a TCP reader staying behind
(``cause: stream_behind``).

Bounded: each SIPp run by its call count (``-m``) and a hard time limit; every process started
is stopped by its PID. The proxy is pinned to the last CPU like ``run.py`` does (``--no-pin``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadtest.run import (  # noqa: E402
    ALL_RULES,
    NUMBERS,
    RESULTS,
    SCENARIOS,
    proxy_command,
    tree_cpu_seconds,
)
from tests.e2e.harness import HOST, SipguardProcess, SippProcess, free_port, sipp_binary  # noqa: E402

SCENARIO = SCENARIOS / "uac_overload.xml"


def overload_windows(log: Path, t0: float) -> list[tuple[float, float | None]]:
    """(on, off) seconds after ``t0`` (wall clock) of every overload episode in sipguard's log
    (of every worker's, with several: each watches its own queues), in order of start."""
    spans: list[tuple[float, float | None]] = []
    since: dict[Any, float] = {}  # worker -> when its episode under way started
    with log.open() as f:
        for line in f:
            if "overload_" not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event")
            if name not in ("overload_started", "overload_ended"):
                continue
            ts = datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp() - t0
            worker = event.get("worker")
            if name == "overload_started":
                since[worker] = ts
            elif worker in since:
                spans.append((since.pop(worker), ts))
    spans.extend((on, None) for on in since.values())
    return sorted(spans, key=lambda span: span[0])


def final_counters(log: Path) -> dict[str, Any]:
    """sipguard's counters at its stop (summed over the workers, with several)."""
    counters: dict[str, Any] = {}
    with log.open() as f:
        for line in f:
            if '"sipguard_stopped"' in line:
                for name, value in (json.loads(line).get("counters") or {}).items():
                    if isinstance(value, (int, float)):
                        counters[name] = counters.get(name, 0) + value
    return counters


def phase_result(name: str, res: Any, counts: dict[str, int], rate: float) -> dict[str, Any]:
    accepted = counts.get("invite_200", 0)
    completed_bye = counts.get("bye_200", 0)
    shed = counts.get("503_Recv", 0)
    return {
        "phase": name,
        "rate": rate,
        "attempted": res.created,
        "successful": res.successful,
        "failed": res.failed,
        "accepted": accepted,
        "completed": completed_bye,
        "shed": shed,
        "lost": max(accepted - completed_bye, 0),
        "retransmissions": res.retransmissions,
        "timed_out": res.timed_out,
    }


def row_counts(workdir: Path) -> dict[str, int]:
    """Per-row counts of the UAC's ``-trace_counts`` file: 503 received, the INVITE's 200
    and the BYE's 200 (two rows of the same response code) told apart by their position."""
    found = sorted(workdir.glob("*_counts.csv"))
    if not found:
        return {}
    with found[-1].open() as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r]
    if len(rows) < 2:
        return {}
    head, last = rows[0], rows[-1]
    out: dict[str, int] = {}
    ok_rows: list[int] = []
    for col, value in zip(head, last, strict=False):
        parts = col.split("_")
        if len(parts) < 3 or not value.strip().isdigit():
            continue
        code, kind = parts[1], parts[-1]
        if code == "200" and kind == "Recv":
            ok_rows.append(int(value))
        elif code == "503" and kind == "Recv":
            out["503_Recv"] = out.get("503_Recv", 0) + int(value)
    if len(ok_rows) >= 2:
        out["invite_200"], out["bye_200"] = ok_rows[0], ok_rows[1]
    return out


def shed_after(workdir: Path, after_s: float) -> int:
    """Calls the UAC saw shed (503) more than ``after_s`` seconds into its run, from the
    per-second rows of its ``-trace_counts`` file (0 when the run was shorter)."""
    found = sorted(workdir.glob("*_counts.csv"))
    if not found:
        return 0
    with found[-1].open() as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r]
    if len(rows) < 2:
        return 0
    head = rows[0]
    cols = [i for i, col in enumerate(head)
            if col.split("_")[1:2] == ["503"] and col.endswith("_Recv")]
    clock = head.index("ElapsedTime") if "ElapsedTime" in head else 1

    def elapsed(row: list[str]) -> float:
        h, m, sec, us = (int(x) for x in row[clock].split(":"))
        return h * 3600 + m * 60 + sec + us / 1e6

    def shed(row: list[str]) -> int:
        return sum(int(row[i]) for i in cols if i < len(row) and row[i].strip().isdigit())

    later = [r for r in rows[1:] if elapsed(r) >= after_s]
    return shed(rows[-1]) - shed(later[0]) if later else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=1000,
                    help="the highest rate sipguard passes (run.py); phase 1 offers factor x it")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of phase 1")
    ap.add_argument("--recover-duration", type=float, default=15.0, help="seconds of phase 2")
    ap.add_argument("--recover-within", type=float, default=5.0,
                    help="pass mark: overload protection off this many s after the load fell")
    ap.add_argument("--hold-ms", type=int, default=1000, help="call duration (SIPp -d)")
    ap.add_argument("--config", type=Path, default=ALL_RULES)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--proxy-cmd", help="command replacing `python -m sipguard`")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--transport", choices=("udp", "tcp"), default="udp",
                    help="of both legs: callers to sipguard, sipguard to the core")
    ap.add_argument("--workers", type=int, default=1,
                    help="sipguard processes; above 1 they share their limits in shared memory "
                    "(state.backend: shared_memory, as run.py's shm-workers path), unpinned")
    args = ap.parse_args(argv)
    if args.workers > 1:
        args.pin = False
    if sipp_binary() is None:
        print("sipp not on PATH: install SIPp (Debian package sip-tester, `make sipp`)",
              file=sys.stderr)
        return 2
    args.proxy_cpu = None
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        args.proxy_cpu = cpus[-1]
        os.sched_setaffinity(0, set(cpus[:-1]))
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-overload"
    workdir = (args.results_dir / run_id).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = args.config.resolve()
    derived: Path | None = None  # the workers' copy of the config, removed at the end
    if args.workers > 1:
        cfg = yaml.safe_load(config.read_text()) or {}
        cfg["state"] = {"backend": "shared_memory"}
        cfg["workers"] = args.workers
        # next to the given config, as run.py writes its own, so its relative paths resolve
        derived = config.parent / f".loadtest-{run_id}-workers.yaml"
        text = yaml.safe_dump(cfg, sort_keys=False)
        derived.write_text(text)
        (workdir / "sipguard-workers.yaml").write_text(text)  # kept with the run's results
        config = derived
    high = int(args.rate * args.factor)
    low = max(args.rate // 2, 1)
    hold_s = args.hold_ms / 1000
    calls1, calls2 = int(high * args.duration), int(low * args.recover_duration)
    limit = args.duration + args.recover_duration + hold_s + 40
    log_cap = ["-max_log_size", "2000000", "-ringbuffer_files", "1"]
    uas = SippProcess("uas", SCENARIOS / "uas_load.xml", workdir, local_port=free_port(),
                      transport=args.transport,
                      calls=(calls1 + calls2) * 2 + 100, timeout=limit + 40, inf=None,
                      trace_msg=False, extra=log_cap)
    guard: SipguardProcess | None = None
    uacs: list[SippProcess] = []
    results: list[dict[str, Any]] = []
    try:
        uas.start()
        uas.wait_bound()
        port = free_port()
        guard = SipguardProcess(
            workdir, listen=[f"{args.transport}://{HOST}:{port}"],
            core=f"{args.transport}://{HOST}:{uas.local_port}",
            config_path=config, command=proxy_command(args, pin=True),
            stdout_events=False,
        )
        guard.start(ready_timeout=20)
        cpu0 = tree_cpu_seconds(guard.pid)
        t0 = time.time()
        for name, rate, calls, start_at in (
            ("overload", high, calls1, 0.0), ("recovery", low, calls2, args.duration),
        ):
            while time.time() - t0 < start_at:
                time.sleep(0.02)
            phase_dir = workdir / name  # SIPp names its counts file after the scenario
            phase_dir.mkdir(exist_ok=True)
            uac = SippProcess(name, SCENARIO, phase_dir, local_port=free_port(),
                              remote=(HOST, port), transport=args.transport, calls=calls,
                              rate=rate,
                              duration_ms=args.hold_ms, timeout=limit, inf=NUMBERS,
                              trace_msg=False, extra=[*log_cap, "-trace_counts"])
            uac.start()
            uacs.append(uac)
        phases = [(uacs[0], high), (uacs[1], low)]
        outcomes = [(uac, uac.wait(), rate) for uac, rate in phases]
        cpu = tree_cpu_seconds(guard.pid) - cpu0
        for uac, res, rate in outcomes:
            results.append(phase_result(uac.name, res, row_counts(uac.workdir), rate))
        # a recovered sipguard sheds nothing at half the rate: a 503 after the first
        # --recover-within seconds (another limit, a table full) is a recovery that failed
        results[-1]["shed_late"] = shed_after(uacs[-1].workdir, args.recover_within)
    finally:
        for uac in uacs:
            if uac.proc is not None and uac.proc.poll() is None:
                uac.stop(grace=3)
        code = guard.stop(drain=10) if guard is not None else None
        if uas.proc is not None:
            uas.stop(grace=5)
        if derived is not None:
            derived.unlink(missing_ok=True)
    log = workdir / "sipguard_stdout.jsonl"
    spans = overload_windows(log, t0)
    counters = final_counters(log)
    last_off = max((off if off is not None else float("inf")) for _, off in spans) if spans else None
    recovered_after = None if last_off is None else last_off - args.duration
    over, rec = results
    checks = {
        "accepted calls all completed (overload)": over["lost"] <= over["accepted"] // 1000,
        "accepted calls all completed (recovery)": rec["lost"] <= rec["accepted"] // 1000,
        "calls shed with 503 + Retry-After in the overload": over["shed"] > 0,
        "no failed call in the overload": over["failed"] <= over["attempted"] // 1000,
        "no failed call in the recovery": rec["failed"] <= rec["attempted"] // 1000,
        f"no call shed after the recovery's first {args.recover_within:g} s": (
            rec.get("shed_late", 0) <= rec["attempted"] // 1000
        ),
        f"overload off within {args.recover_within:g} s of the load falling": (
            recovered_after is not None and recovered_after <= args.recover_within
        ),
    }
    print(f"sipguard overload run {run_id}: {high} calls/s for {args.duration:g} s, then "
          f"{low} calls/s for {args.recover_duration:g} s over {args.transport}; config "
          f"{args.config.name}; "
          f"proxy {'on CPU ' + str(args.proxy_cpu) if args.proxy_cpu is not None else 'unpinned'}"
          + (f", {args.workers} workers (shared memory)" if args.workers > 1 else ""))
    print(f"  {'phase':9} {'calls/s':>7} {'attempted':>9} {'accepted':>8} {'completed':>9} "
          f"{'shed 503':>8} {'failed':>6} {'lost':>4} {'retrans':>7}")
    for r in results:
        print(f"  {r['phase']:9} {r['rate']:>7} {r['attempted']:>9} {r['accepted']:>8} "
              f"{r['completed']:>9} {r['shed']:>8} {r['failed']:>6} {r['lost']:>4} "
              f"{r['retransmissions']:>7}")
    print("  overload protection on/off (s from the start; the load fell at "
          f"{args.duration:g} s): " + (", ".join(
              f"{a:.2f}-{'still on' if b is None else f'{b:.2f}'}" for a, b in spans) or "never"))
    if recovered_after is not None:
        when = "after" if recovered_after >= 0 else "before"
        print(f"  last off {abs(recovered_after):.2f} s {when} the load fell")
    print(f"  sipguard: exit {code}, CPU {cpu:.1f} s, overload_rejected "
          f"{counters.get('overload_rejected', 0)}, udp_receive_dropped "
          f"{counters.get('udp_receive_dropped', 0)}, overload_started "
          f"{counters.get('overload_started', 0)}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    out = {
        "run_id": run_id, "args": {k: str(v) for k, v in vars(args).items()},
        "phases": results, "overload_spans": spans, "recovered_after_s": recovered_after,
        "counters": {k: v for k, v in counters.items() if "overload" in k or "udp" in k},
        "cpu_s": cpu, "checks": checks,
    }
    (args.results_dir / f"{run_id}.json").write_text(json.dumps(out, indent=2))
    print(f"results: {args.results_dir / (run_id + '.json')} (traces in {workdir})")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
