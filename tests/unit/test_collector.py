"""When the garbage collector's full pass runs (sipguard/ops/collector.py): due an hour after
the last one, then at the first lull, or a day after the last one without a lull."""

from __future__ import annotations

from collections import Counter

from sipguard.ops.collector import FULL_AT_LATEST_S, FULL_EVERY_S, Collector


def test_full_pass_waits_for_its_hour_then_for_a_lull() -> None:
    c = Collector(Counter(), now=0.0)
    assert not c.full_due(10.0, 0)
    assert not c.full_due(600.0, 80_000)  # busy, and not due yet: the peak is noted
    assert not c.full_due(FULL_EVERY_S, 60_000)  # due, but still busy (over a quarter of 80,000)
    assert not c.full_due(FULL_EVERY_S + 60, 20_001)
    assert c.full_due(FULL_EVERY_S + 120, 20_000)  # a quarter of the peak: a lull


def test_full_pass_runs_without_a_lull_a_day_after_the_last() -> None:
    c = Collector(Counter(), now=0.0)
    assert not c.full_due(60.0, 50_000)
    assert not c.full_due(FULL_AT_LATEST_S - 1, 50_000)
    assert c.full_due(FULL_AT_LATEST_S, 50_000)


def test_an_idle_proxy_is_a_lull() -> None:
    c = Collector(Counter(), now=100.0)
    assert c.full_due(100.0 + FULL_EVERY_S, 0)
