"""The load kit itself runs: loadtest/run.py at a small rate, direct and through sipguard.

Not a performance test (that is loadtest/, by hand): it checks that the runner, its SIPp
scenarios, the latency probe and the CPU accounting work end to end, so the figures in the
README can be reproduced with the command given there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

RUNNER = Path(__file__).resolve().parents[2] / "loadtest" / "run.py"


def test_runner_measures_both_paths(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--rates", "20", "--duration", "2", "--hold-ms", "200",
         "--probe-rate", "5", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob("*.json")
    steps = json.loads(report.read_text())["steps"]
    assert [s["path"] for s in steps] == ["direct", "sipguard"], done.stdout
    for step in steps:
        assert step["attempted"] == 40 and step["success_pct"] == 100.0, step
        assert step["probe"]["completed"] == step["probe"]["calls"] > 0, step["probe"]
        assert 0 < step["p50_ms"] <= step["p99_ms"] < 1000, step
    guard = steps[1]
    assert guard["cpu_ms_per_call"] > 0 and guard["sipguard_returncode"] == 0, guard
    assert "sipguard" in done.stdout and "100.00" in done.stdout
