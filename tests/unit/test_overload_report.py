"""loadtest/overload.py's reading of sipguard's log: overload episodes and the counters at the
stop, of one process and of several workers whose lines interleave."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from loadtest.overload import final_counters, overload_windows

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def _line(event: str, at: float, worker: int | None = None, **fields: object) -> str:
    ts = datetime.fromtimestamp(T0 + at, tz=UTC).isoformat().replace("+00:00", "Z")
    body: dict[str, object] = {"event": event, "ts": ts, **fields}
    if worker is not None:
        body["worker"] = worker
    return json.dumps(body) + "\n"


def test_episodes_of_one_process(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(_line("overload_started", 1.0) + _line("overload_ended", 2.5)
                   + _line("overload_started", 4.0)
                   + _line("sipguard_stopped", 9.0, counters={"overload_rejected": 7}))
    assert overload_windows(log, T0) == [(1.0, 2.5), (4.0, None)]
    assert final_counters(log) == {"overload_rejected": 7}


def test_episodes_and_counters_of_interleaved_workers(tmp_path: Path) -> None:
    """Worker 1 starts while worker 0 is on: each episode ends with its own worker's line,
    and the counters of both stops are summed."""
    log = tmp_path / "log.jsonl"
    log.write_text(
        _line("overload_started", 1.0, 0) + _line("overload_started", 1.5, 1)
        + _line("overload_ended", 2.0, 0) + _line("overload_ended", 6.0, 1)
        + _line("sipguard_stopped", 9.0, 0, counters={"overload_rejected": 3, "x": "text"})
        + _line("sipguard_stopped", 9.0, 1, counters={"overload_rejected": 4,
                                                      "udp_receive_dropped": 1}))
    assert overload_windows(log, T0) == [(1.0, 2.0), (1.5, 6.0)]
    assert final_counters(log) == {"overload_rejected": 7, "udp_receive_dropped": 1}
