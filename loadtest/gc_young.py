"""What the cyclic collector's young passes examine, per call: objects by type.

sipguard runs a young pass every 50 ms (``sipguard/ops/collector.py``): it examines each object
made since the last pass that is still alive, once (~0.75 µs each under load, cold memory), then
freezes the survivors. This drives the overlapping calls of ``bench_core.run_interleaved``
(every 1 ms a new call, ``--interleave`` calls up at once, ``--config``'s rules) and, every 50
simulated milliseconds, counts the young objects by type (``gc.get_objects(0)``) before running
the pass as sipguard does. Reported per call: fewer is less collector work for the event loop.

    .venv/bin/python loadtest/gc_young.py [--calls 6000] [--interleave 1000] [--config FILE]

The first 3,000 steps warm up (caches and tables fill) and are not counted.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402

from sipguard.edge import EdgeCore  # noqa: E402

EVERY_STEPS = 50  # one step is 1 simulated ms: sipguard's YOUNG_EVERY_S
WARM_STEPS = 3000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=6000)
    ap.add_argument("--interleave", type=int, default=1000, help="calls up at once")
    ap.add_argument("--config", type=Path, default=None,
                    help="a sipguard config whose rules: / peers: to run (listen/core ignored)")
    ap.add_argument("--top", type=int, default=20, help="types to list")
    args = ap.parse_args()
    rules = bench_core.config_rules(args.config)
    by_type: collections.Counter[str] = collections.Counter()
    counted = {"steps": 0, "passes": 0, "objects": 0}
    handle_timer = EdgeCore.handle_timer

    def young_pass(core: EdgeCore, now: float) -> None:
        handle_timer(core, now)
        counted["steps"] += 1
        if counted["steps"] % EVERY_STEPS:
            return
        if counted["steps"] > WARM_STEPS:
            young = gc.get_objects(0)
            counted["passes"] += 1
            counted["objects"] += len(young)
            by_type.update(type(o).__name__ for o in young)
            del young
        gc.collect(1)  # as sipguard's collector: generation 1 is empty between passes
        gc.freeze()

    gc.disable()
    gc.freeze()
    EdgeCore.handle_timer = young_pass  # type: ignore[method-assign]
    try:
        bench_core.run_interleaved(args.calls, rules, args.interleave)
    finally:
        EdgeCore.handle_timer = handle_timer  # type: ignore[method-assign]
        gc.unfreeze()
        gc.enable()
    calls = counted["passes"] * EVERY_STEPS
    if not calls:
        raise SystemExit(f"no pass counted: give more than {WARM_STEPS} calls")
    print(f"young passes counted  {counted['passes']}")
    print(f"young objects per call {counted['objects'] / calls:.1f}")
    for name, n in by_type.most_common(args.top):
        print(f"  {n / calls:6.2f}  {name}")


if __name__ == "__main__":
    main()
