"""Prometheus metrics, made in one place and collected only when scraped.

The shell counts into plain dicts on the hot path (a dict increment per event); this module
turns them into Prometheus metric families at scrape time, so an unscraped sipguard pays
nothing for metrics and a scrape never races the event loop (it runs on the loop).

Exported (all prefixed ``sipguard_``):

- ``invites_total{verdict,rule,peer}`` — initial INVITE decisions; ``verdict`` is accept,
  reject, drop or monitored (a rule in monitor mode objected, the call went on).
- ``decision_seconds`` — histogram of the time an INVITE spent in the rule pipeline.
- ``dialogs_ended_total{reason,peer}`` — why calls ended (bye_caller, bye_callee, cancelled,
  failed, timeout, lifetime, session_expired).
- ``live_dialogs``, ``server_transactions``, ``client_transactions`` — gauges; with the
  other live gauges of ``Server._gauges`` (queues, overload, garbage-collector pauses).
- ``events_total{event}`` — every other counter the shell keeps (parse errors by status,
  drops by kind, flood bans, rule findings, internal errors, reloads, ...).
- ``config_loaded_timestamp_seconds`` — when the running config was loaded.

No number appears as a label: per-number figures stay out of the metrics (cardinality).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Decision-time buckets, seconds: the pipeline usually answers in microseconds; a certificate
# fetch can take up to its timeout.
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 0.5, 1.0, 2.5)


class Metrics:
    """What the shell counts; cheap to update, turned into metrics when scraped."""

    def __init__(self) -> None:
        self.invites: Counter[tuple[str, str, str]] = Counter()  # (verdict, rule, peer)
        self.ended: Counter[tuple[str, str]] = Counter()  # (reason, peer)
        self.events: Counter[str] = Counter()
        self._bucket_counts = [0] * (len(BUCKETS) + 1)
        self._decision_sum = 0.0
        self.config_loaded = 0.0

    def decision(self, seconds: float) -> None:
        self._bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._decision_sum += seconds

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        buckets, total = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self._bucket_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return buckets, self._decision_sum


class MetricsCollector(Collector):
    """Adapts :class:`Metrics` plus live gauges to a Prometheus registry."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], dict[str, float]]) -> None:
        self.metrics = metrics
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        invites = CounterMetricFamily(
            "sipguard_invites", "Initial INVITE decisions.", labels=["verdict", "rule", "peer"]
        )
        for (verdict, rule, peer), n in sorted(m.invites.items()):
            invites.add_metric([verdict, rule, peer], n)
        yield invites
        ended = CounterMetricFamily(
            "sipguard_dialogs_ended", "Calls ended, by reason.", labels=["reason", "peer"]
        )
        for (reason, peer), n in sorted(m.ended.items()):
            ended.add_metric([reason, peer], n)
        yield ended
        events = CounterMetricFamily(
            "sipguard_events", "Other events the proxy counts.", labels=["event"]
        )
        for name, n in sorted(m.events.items()):
            events.add_metric([name], n)
        yield events
        buckets, total = m.histogram()
        yield HistogramMetricFamily(
            "sipguard_decision_seconds",
            "Time an initial INVITE spent in the rule pipeline.",
            buckets=buckets,
            sum_value=total,
        )
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"sipguard_{name}", name.replace("_", " ") + ".", value)
        yield GaugeMetricFamily(
            "sipguard_config_loaded_timestamp_seconds",
            "Unix time the running config was loaded.",
            m.config_loaded,
        )
