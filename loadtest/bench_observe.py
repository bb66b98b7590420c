"""Micro-benchmark of the observer: the events of real calls turned into log lines and counters.

Drives N complete calls through the edge core (as ``bench_core.py`` does, with ``--config``'s
rules), keeps the events they raise (``invite_decided``, dialog start and end), then times
``Observer.observe`` over them with the JSON log lines going to /dev/null as sipguard writes
them (batched, flushed after each round). The baseline, in the same run, is ``json.dumps`` of
the same two lines as dicts: the ratio says what the observer costs against the standard
library's encoder writing only the lines. Machines are noisy, so compare ratios.

    .venv/bin/python loadtest/bench_observe.py [--calls 3000] [--repeat 7] [--config FILE]

Against another build: copy it into that checkout's ``loadtest/`` and run it there (it imports
sipguard and ``bench_core`` from the checkout it sits in).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import CALLER, CORE, in_dialog, invite, new_core, response  # noqa: E402
from benchutil import quiet_gc  # noqa: E402

from sipguard.contract import DialogEnded, Event, Flow, InviteDecided  # noqa: E402
from sipguard.ops.calllog import CallLogger  # noqa: E402
from sipguard.ops.config import LogSettings  # noqa: E402
from sipguard.ops.logging import SampledLogger, configure_logging, flush_logs, get_logger  # noqa: E402
from sipguard.ops.metrics import Metrics  # noqa: E402
from sipguard.ops.observe import Observer  # noqa: E402

# the two lines' fields, as sipguard.ops.observe writes them (named here, so that the benchmark
# runs against older builds too, from another checkout)
DECIDED = ("call_id", "source", "transport", "peer", "caller", "callee", "diverters", "verdict",
           "monitored", "rule", "reason", "status", "detail", "decision_us")
ENDED = ("call_id", "caller", "callee", "peer", "reason", "status", "duration_s",
         "lifetime_s")


def call_events(calls: int, rules: str) -> list[Event]:
    """The events ``calls`` whole calls raise in the edge core (each caller its own callee)."""
    core = new_core(rules)
    src, core_flow = Flow("udp", CALLER, 0), Flow("udp", CORE, 0)
    events: list[Event] = []
    now = 1000.0
    for i in range(calls):
        core.receive(invite(i, f"+1646555{(i * 7919) % 10000:04d}"), src, now)
        fwd = core.outbox[-1][1]
        for status, phrase in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
            core.receive(response(fwd, status, phrase), core_flow, now)
        core.receive(in_dialog("ACK", i, 1), src, now)
        core.receive(in_dialog("BYE", i, 2), src, now)
        bye = core.outbox[-1][1]
        core.receive(response(bye, 200, "OK"), core_flow, now)
        core.outbox.clear()
        events.extend(core.drain_events())
        now += 0.001
    return events


def line_dicts(events: list[Event]) -> list[dict[str, Any]]:
    """The baseline's input: each call's two lines as the dicts json.dumps would take."""
    out: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, InviteDecided):
            c, v = e.call, e.verdict
            values = (c.call_id, f"{c.flow.addr[0]}:{c.flow.addr[1]}", c.flow.transport, c.peer,
                      c.caller, c.callee, None, v.action, None, v.rule or None,
                      v.reason or None, v.status or None, None, round(c.decision_us, 1))
            out.append({"logger_name": "sipguard",
                        **{k: x for k, x in zip(DECIDED, values, strict=True)
                           if x is not None}, **c.labels,
                        "event": "invite_decided", "level": "info", "ts": "2026-01-01T00:00:00Z"})
        elif isinstance(e, DialogEnded):
            d = e.dialog
            values = (d.call_id, d.caller, d.callee, d.peer, e.reason, d.status or None, 1.0, 1.0)
            out.append({"logger_name": "sipguard",
                        **{k: x for k, x in zip(ENDED, values, strict=True)
                           if x is not None},
                        "event": "dialog_ended", "level": "info", "ts": "2026-01-01T00:00:00Z"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--config", type=Path, default=None,
                    help="a sipguard config whose rules: / peers: to run (listen/core ignored)")
    args = ap.parse_args()
    rules = ""
    if args.config is not None:
        rules = "\n".join(ln for ln in args.config.read_text().splitlines()
                          if not ln.startswith(("listen:", "core:")))
    events = call_events(args.calls, rules)
    dicts = line_dicts(events)
    with open("/dev/null", "w") as sink, quiet_gc():
        configure_logging(LogSettings(), sink, batch=True)
        log = get_logger("sipguard")
        observer = Observer(Metrics(), log, CallLogger("sipguard"), SampledLogger(log, 10.0))
        kinds: dict[str, list[Event]] = {}
        for e in events:
            kinds.setdefault(type(e).__name__, []).append(e)
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, some in [("all", events), *kinds.items()]:
                t0 = time.perf_counter()
                for e in some:
                    observer.observe(e)
                took = time.perf_counter() - t0
                flush_logs()
                best[name] = min(best.get(name, took), took)
            t0 = time.perf_counter()
            for d in dicts:
                json.dumps(d)
            took = time.perf_counter() - t0
            best["json.dumps"] = min(best.get("json.dumps", took), took)
    n = args.calls
    print(f"calls                     {n}")
    print(f"observer µs per call      {1e6 * best['all'] / n:8.2f}   ({len(events) / n:.1f} events)")
    for name, some in kinds.items():
        print(f"  {name:22s}  {1e6 * best[name] / len(some):8.2f} µs per event")
    print(f"json.dumps µs per call    {1e6 * best['json.dumps'] / n:8.2f}   (baseline: the two "
          "lines alone)")
    print(f"observer / baseline       {best['all'] / best['json.dumps']:8.2f}")


if __name__ == "__main__":
    main()
