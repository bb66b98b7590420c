"""What suspending many numbers one by one through the admin API costs, with ``state_dir``.

Starts sipguard (no call load: its admin API is the probe) with ``state_dir`` set, sends
``--count`` ``POST /suspensions`` one after the other (each waits for its answer: saved to
disk), and reports the total, the time per suspension for the first and the last tenth (a
cost that grows with the number held shows as a ratio above 1), and the slowest
``GET /healthz`` answer meanwhile (answered on the event loop) against the slowest of the same
time with nothing happening, measured in the same run.

    .venv/bin/python loadtest/suspend_many.py [--count 10000] [--source DIR]

``--source``: a checkout (built with ``make native``) to run instead of this one, for the
build before a change. On 127.0.0.1 only; sipguard is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from demo import HOST, free_port  # noqa: E402
from reload_stall import Poller, wait_ready  # noqa: E402


def _suspend(admin: str, number: str) -> float:
    start = time.perf_counter()
    req = urllib.request.Request(
        admin + "/suspensions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"number": number, "reason": "bulk"}).encode())
    with urllib.request.urlopen(req, timeout=60) as answer:
        if not json.loads(answer.read())["saved"]:
            raise RuntimeError(f"{number} not saved")
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--source", type=Path, default=REPO, help="the checkout to run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sipguard-suspend-"))
    sip_port, core_port, admin_port = free_port(), free_port(), free_port()
    config = work / "sipguard.yaml"
    config.write_text(
        f"listen: [udp://{HOST}:{sip_port}]\ncore: udp://{HOST}:{core_port}\n"
        f"admin: {{listen: {HOST}:{admin_port}}}\nstate_dir: {work / 'state'}\n")
    admin = f"http://{HOST}:{admin_port}"
    env = dict(os.environ, PYTHONPATH=str(args.source.resolve()))
    proc = subprocess.Popen([sys.executable, "-P", "-m", "sipguard", "run", "--config",
                             str(config)], cwd=args.source, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_ready(admin, proc):
            print("sipguard did not start", file=sys.stderr)
            return 1
        poller = Poller(admin + "/healthz")
        time.sleep(1.0)
        began = time.perf_counter()
        took = [_suspend(admin, f"+3120{n:07d}") for n in range(args.count)]
        ended = time.perf_counter()
        time.sleep(1.0 + (ended - began))  # then as long again with nothing happening
        poller.stop.set()
        poller.thread.join(12)
        busy = poller.worst(began, ended)
        baseline = poller.worst(ended + 1.0, ended + 1.0 + (ended - began))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    tenth = max(1, args.count // 10)
    first, last = sum(took[:tenth]) / tenth, sum(took[-tenth:]) / tenth
    print(f"{args.count:,} suspensions one by one: {ended - began:.1f} s; "
          f"{first * 1000:.2f} ms each in the first tenth, {last * 1000:.2f} ms in the last "
          f"({last / first:.1f}x)")
    print(f"slowest /healthz answer: {baseline * 1000:.1f} ms idle, {busy * 1000:.1f} ms "
          f"while suspending ({busy / baseline if baseline else float('inf'):.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
