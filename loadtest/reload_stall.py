"""How long a reload holds sipguard's event loop, with a large ``numbers_file``.

A reload builds the new policy in a thread; the event loop must go on answering calls
meanwhile. This starts sipguard (no load: its admin API is the probe) with one peer owning a
``--lines``-line number list, polls ``GET /healthz`` every 20 ms (answered on the event loop,
so its latency is how long the loop was held), and compares the slowest answer while nothing
happens (the baseline, measured in the same run for as long as the reloads take) with the
slowest while ``--reloads`` reloads run: with ``--changed`` (the default) the list is rewritten
before each one (a new line: read and built anew), with ``--unchanged`` it is not (the list
is reused).

    .venv/bin/python loadtest/reload_stall.py [--lines 1000000] [--reloads 3] [--unchanged]

Reports each reload's time, the slowest /healthz answer of each phase and their ratio. On
127.0.0.1 only; sipguard is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from demo import HOST, free_port  # noqa: E402


def _get(url: str, method: str = "GET", timeout: float = 120.0) -> float:
    """Seconds one request took (its answer read)."""
    start = time.perf_counter()
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as answer:
        answer.read()
    return time.perf_counter() - start


def wait_ready(admin: str, proc: subprocess.Popen[bytes], limit_s: float = 120.0) -> bool:
    """Wait until sipguard's admin API answers /readyz; False if it exits or takes longer."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            _get(admin + "/readyz", timeout=1.0)
            return True
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                return False
            time.sleep(0.2)


class Poller:
    """GET /healthz every 20 ms in a thread, each answer's start and latency kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.polls: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            with contextlib.suppress(OSError):
                self.polls.append((start, _get(self.url, timeout=10.0)))
            time.sleep(0.02)

    def worst(self, since: float, until: float) -> float:
        """The slowest answer to a request sent between ``since`` and ``until``."""
        return max((took for start, took in self.polls if since <= start < until), default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--unchanged", action="store_true",
                    help="reload without changing the list (it is reused)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sipguard-reload-"))
    numbers = work / "numbers.txt"
    numbers.write_text("".join(f"+1212{i:07d}\n" for i in range(args.lines)))
    sip_port, core_port, admin_port = free_port(), free_port(), free_port()
    config = work / "sipguard.yaml"
    config.write_text(
        f"listen: [udp://{HOST}:{sip_port}]\ncore: udp://{HOST}:{core_port}\n"
        f"admin: {{listen: {HOST}:{admin_port}}}\n"
        f"peers:\n  - {{name: load, networks: [{HOST}/32], numbers_file: {numbers}}}\n")
    admin = f"http://{HOST}:{admin_port}"
    proc = subprocess.Popen([sys.executable, "-m", "sipguard", "run", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_ready(admin, proc):
            print("sipguard did not start", file=sys.stderr)
            return 1
        poller = Poller(admin + "/healthz")
        time.sleep(1.0)
        took = []
        began = time.perf_counter()
        for n in range(args.reloads):
            if not args.unchanged:
                with numbers.open("a") as f:
                    f.write(f"+1313{n:07d}\n")
            took.append(_get(admin + "/reload", "POST"))
        ended = time.perf_counter()
        time.sleep(1.0 + (ended - began))  # then as long again with nothing happening
        poller.stop.set()
        poller.thread.join(12)
        reloading = poller.worst(began, ended)
        baseline = poller.worst(ended + 1.0, ended + 1.0 + (ended - began))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for path in (numbers, config):
            path.unlink(missing_ok=True)
        os.rmdir(work)
    kind = "unchanged" if args.unchanged else "changed"
    print(f"{args.reloads} reloads, {args.lines:,}-line numbers_file {kind}: "
          + ", ".join(f"{t:.2f} s" for t in took))
    print(f"slowest /healthz answer: {baseline * 1000:.1f} ms idle, "
          f"{reloading * 1000:.1f} ms while reloading "
          f"({reloading / baseline if baseline else float('inf'):.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
