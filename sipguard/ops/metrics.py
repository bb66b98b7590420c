"""Prometheus metrics, made in one place and collected only when scraped.

The shell counts into plain dicts on the hot path (a dict increment per event); this module
turns them into Prometheus metric families at scrape time, so an unscraped sipguard pays
nothing for metrics and a scrape never races the event loop (it runs on the loop).

Exported (all prefixed ``sipguard_``):

- ``invites_total{verdict,rule,peer}`` — initial INVITE decisions; ``verdict`` is accept,
  reject, drop or monitored (a rule in monitor mode objected, the call went on).
- ``decision_seconds`` — histogram of the time an INVITE spent in the rule pipeline.
- ``dialogs_ended_total{reason,peer}`` — why calls ended (bye_caller, bye_callee, cancelled,
  failed, timeout, lifetime, session_expired, keepalive_failed, bye_unanswered, ack_timeout,
  suspended, shutdown).
- ``live_dialogs``, ``server_transactions``, ``client_transactions`` — gauges; with the
  other live gauges of ``Server._gauges`` (queues, overload, garbage-collector pauses).
- ``events_total{event}`` — every other counter the shell keeps (parse errors by status,
  drops by kind, flood bans, rule findings, internal errors, reloads, ...).
- ``config_loaded_timestamp_seconds`` — when the running config was loaded.
- ``fd_limit``, ``fd_needed``, ``fd_open``, ``tcp_connections_limit`` — gauges: the
  open-files soft limit, what the running config needs, descriptors open now, the cap on TCP
  connections from parties (:mod:`sipguard.ops.fdlimit`; ``Metrics.gauge_sources``).
- with several workers (``GET /metrics`` on any one of them): every worker's samples, each
  labelled ``worker``, and ``worker_up{worker}`` (0: that worker did not answer the scrape).

No number appears as a label: per-number figures stay out of the metrics (cardinality).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

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
        # gauges of the process besides the shell's (the open-files limit: sipguard.cli),
        # each read when scraped
        self.gauge_sources: list[Callable[[], dict[str, float]]] = []

    def decision(self, seconds: float) -> None:
        self._bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._decision_sum += seconds

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        buckets, total = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self._bucket_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return buckets, self._decision_sum


Snapshot = dict[str, Any]  # what one process counted, as JSON (see snapshot())


def snapshot(metrics: Metrics, gauges: dict[str, float]) -> Snapshot:
    """Everything :func:`families` exports, as plain JSON: what a worker answers to
    ``GET /metrics?scope=worker&format=json`` for the worker that serves the whole host."""
    buckets, total = metrics.histogram()
    if metrics.gauge_sources:
        gauges = dict(gauges)
        for source in metrics.gauge_sources:
            gauges.update(source())
    return {
        "invites": [[*key, n] for key, n in sorted(metrics.invites.items())],
        "ended": [[*key, n] for key, n in sorted(metrics.ended.items())],
        "events": sorted(metrics.events.items()),
        "decision_buckets": buckets,
        "decision_sum": total,
        "gauges": gauges,
        "config_loaded": metrics.config_loaded,
    }


# HELP texts of the gauges (README "Metrics" says more); a gauge not named here is described by
# its name
GAUGE_HELP: dict[str, str] = {
    "live_dialogs": "Calls up (dialogs held).",
    "subscriptions": "SUBSCRIBE / REFER dialogs held.",
    "server_transactions": "Server transactions held.",
    "server_transaction_bytes": "Bytes the held requests take (sip.max_transaction_bytes_mib).",
    "live_dialog_bytes": "Bytes the live calls' INVITEs take (sip.max_dialog_bytes_mib).",
    "client_transactions": "Client transactions held.",
    "tcp_connections": "TCP/TLS connections open.",
    "tcp_accept_queue_ratio": "Fullest TCP accept queue, share of its backlog.",
    "kernel_tcp_listen_overflows": "The kernel's TCP listen queue overflows (host-wide).",
    "udp_receive_queue_ratio": "Fullest UDP receive queue, share of its buffer.",
    "udp_receive_queue_delay_seconds": "Longest wait measured in a UDP receive queue.",
    "tcp_reader_behind_seconds": "Longest a TCP/TLS connection has had bytes waiting.",
    "overloaded": "1 while overload protection sheds new calls with 503.",
    "gc_young_pause_max_seconds": "Longest young collector pass since the last scrape.",
    "gc_full_pause_seconds": "The last full collector pass's pause.",
    "identity_verify_waiting": "Signature checks handed to the threads, not yet answered.",
    "event_loop_busy_ratio": "The event loop's busy share over the last 50 ms (1: the limit).",
    "udp_send_waiting": "Datagrams queued for the send thread.",
    "log_queue_bytes": "Bytes of log lines waiting for the log writer.",
    "concurrency_unmatched_ends": "Call ends that found no slot to free (must stay 0).",
    "concurrency_leases_expired": "Slots that lapsed on their own (must stay 0).",
    "concurrency_underflows": "Counts that would have gone below zero (must stay 0).",
    "state_available": "1 while the shared state (Redis) answers.",
    "state_pending_releases": "Slot releases waiting for the shared state.",
}


def families(snaps: list[tuple[str | None, Snapshot]]) -> Iterator[Metric]:
    """The metric families of one process (``[(None, snap)]``), or of several worker
    processes, each sample labelled with its ``worker``: one family per name, as the
    exposition format wants."""
    labelled = any(worker is not None for worker, _ in snaps)
    extra = ["worker"] if labelled else []

    def lv(worker: str | None, *values: str) -> list[str]:
        return [*values, worker or ""] if labelled else list(values)

    invites = CounterMetricFamily(
        "sipguard_invites", "Initial INVITE decisions.", labels=["verdict", "rule", "peer", *extra]
    )
    ended = CounterMetricFamily(
        "sipguard_dialogs_ended", "Calls ended, by reason.", labels=["reason", "peer", *extra]
    )
    events = CounterMetricFamily(
        "sipguard_events", "Other events the proxy counts.", labels=["event", *extra]
    )
    decision = HistogramMetricFamily(
        "sipguard_decision_seconds", "Time an initial INVITE spent in the rule pipeline.",
        labels=extra,
    )
    loaded = GaugeMetricFamily(
        "sipguard_config_loaded_timestamp_seconds", "Unix time the running config was loaded.",
        labels=extra,
    )
    gauges: dict[str, GaugeMetricFamily] = {}
    for worker, snap in snaps:
        for verdict, rule, peer, n in snap["invites"]:
            invites.add_metric(lv(worker, verdict, rule, peer), n)
        for reason, peer, n in snap["ended"]:
            ended.add_metric(lv(worker, reason, peer), n)
        for name, n in snap["events"]:
            events.add_metric(lv(worker, name), n)
        decision.add_metric(lv(worker), [(str(b), float(c)) for b, c in snap["decision_buckets"]],
                            float(snap["decision_sum"]))
        for name, value in snap["gauges"].items():
            family = gauges.get(name)
            if family is None:
                family = gauges[name] = GaugeMetricFamily(
                    f"sipguard_{name}", GAUGE_HELP.get(name) or name.replace("_", " ") + ".",
                    labels=extra)
            family.add_metric(lv(worker), float(value))
        loaded.add_metric(lv(worker), float(snap["config_loaded"]))
    yield from (invites, ended, events, decision, *gauges.values(), loaded)


class MetricsCollector(Collector):
    """Adapts :class:`Metrics` plus live gauges to a Prometheus registry."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], dict[str, float]]) -> None:
        self.metrics = metrics
        self.gauges = gauges

    def snapshot(self) -> Snapshot:
        return snapshot(self.metrics, self.gauges())

    def collect(self) -> Iterator[Metric]:
        return families([(None, self.snapshot())])


class SnapshotCollector(Collector):
    """Several workers' snapshots, gathered for one scrape, as a registry's collector; with
    ``sipguard_worker_up{worker}``: 1 for a worker whose snapshot is here, 0 for one that did
    not answer (``up`` maps every worker to whether it did)."""

    def __init__(self, snaps: list[tuple[str | None, Snapshot]], up: dict[str, bool]) -> None:
        self.snaps = snaps
        self.up = up

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snaps)
        family = GaugeMetricFamily(
            "sipguard_worker_up", "1: the worker answered for this scrape; 0: it did not.",
            labels=["worker"])
        for worker, answered in self.up.items():
            family.add_metric([worker], 1.0 if answered else 0.0)
        yield family
