"""The longest event-loop pass the proxy's timer queue costs: N timers due within one second,
all added long before (as the ends of completed transactions are: ~4 per call, 5–32 s after
its last message), and ``pop_due`` called every millisecond across that second as the shell
would. Prints the largest single call, best and worst of ``--rounds``.

    .venv/bin/python loadtest/timer_stall.py [--timers 4000] [--rounds 5]

4,000 is a second's worth at 1,000 calls/s. Machines are noisy: compare two builds in the
same minute (see loadtest/README.md, "The in-dialog path, and where the tail comes from").
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipguard.proxy.timers import TimerQueue  # noqa: E402


def largest_pass(timers: int, seed: int) -> float:
    """Seconds of the longest ``pop_due`` over the second holding ``timers``."""
    q = TimerQueue()
    q.pop_due(1000.0)
    rng = random.Random(seed)
    for _ in range(timers):
        q.add(1032.0 + rng.random(), lambda arg, now: None, None)
    worst, now = 0.0, 1031.999
    while now < 1033.0:
        t0 = time.perf_counter()
        q.pop_due(now)
        worst = max(worst, time.perf_counter() - t0)
        now += 0.001
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timers", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    passes = sorted(largest_pass(args.timers, seed) * 1e3 for seed in range(args.rounds))
    print(f"{args.timers} timers in one second: largest pop_due {passes[0]:.3f} ms "
          f"(best of {args.rounds}), {passes[-1]:.3f} ms (worst)")


if __name__ == "__main__":
    main()
