"""The operator files — the Grafana dashboard and the Prometheus alerts — name only metrics and
counters sipguard really exports.

Metric names come from the real collector (:class:`sipguard.ops.metrics.MetricsCollector`)
rendered in the Prometheus text format, fed the gauge names the shell reports
(``Server._gauges``, read from its source); event counter names from the string literals and
f-string prefixes in sipguard's source (``c[f"dropped_{kind}"]`` gives ``dropped_``).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from sipguard.ops.metrics import Metrics, MetricsCollector, SnapshotCollector

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "config" / "grafana" / "sipguard.json"
ALERTS = REPO / "config" / "prometheus" / "alerts.yml"
SOURCE = REPO / "sipguard"

METRIC = re.compile(r"\bsipguard_[a-z_]+")
EVENT = re.compile(r'event\s*(=~|=|!=|!~)\s*"([^"]*)"')


def _returned_keys(path: Path, function: str) -> list[str]:
    """The constant keys of the dict literals in ``function`` in ``path`` (what it returns)."""
    keys: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for lit in ast.walk(node):
                if isinstance(lit, ast.Dict):
                    keys += [str(k.value) for k in lit.keys if isinstance(k, ast.Constant)]
    assert keys, f"{function} not found in {path}"
    return keys


def _gauge_names() -> list[str]:
    """The keys of the dict ``Server._gauges`` returns, read from sipguard/server.py, those
    of the shared stores' ``stats`` it merges in (state.backend redis / shared_memory, the
    shared lists), and the open-files limit's gauges (``FdLimit.gauges``, added by the CLI)."""
    return [*_returned_keys(SOURCE / "server.py", "_gauges"),
            *_returned_keys(SOURCE / "ops" / "fdlimit.py", "gauges"),
            *_returned_keys(SOURCE / "transport" / "redis_state.py", "stats"),
            *_returned_keys(SOURCE / "state" / "shared_memory.py", "stats"),
            *_returned_keys(SOURCE / "ops" / "shared_lists.py", "stats")]


def exported_names() -> set[str]:
    """Every sample name sipguard's collector exports (histogram _bucket/_sum/_count,
    counters' _total and _created included)."""
    metrics = Metrics()
    metrics.invites[("accept", "", "p")] += 1
    metrics.ended[("bye_caller", "p")] += 1
    metrics.events["parse_errors"] += 1
    metrics.decision(0.001)
    registry = CollectorRegistry()
    registry.register(MetricsCollector(metrics, lambda: dict.fromkeys(_gauge_names(), 0.0)))
    text = generate_latest(registry).decode()
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert "sipguard_invites_total" in names and "sipguard_decision_seconds_bucket" in names
    # several workers: a scrape of one holds every worker's, and whether each answered
    hosts = CollectorRegistry()
    snap = MetricsCollector(metrics, lambda: dict.fromkeys(_gauge_names(), 0.0)).snapshot()
    hosts.register(SnapshotCollector([("0", snap), ("1", snap)], {"0": True, "1": True}))
    names |= {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(hosts).decode().splitlines()
        if line and not line.startswith("#")
    }
    return names


def _source_strings() -> tuple[set[str], set[str]]:
    """(string literals, f-string leading prefixes) in sipguard's source."""
    constants: set[str] = set()
    prefixes: set[str] = set()
    for file in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                constants.add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    prefixes.add(first.value)
    return constants, prefixes


def is_counter_name(name: str, constants: set[str], prefixes: set[str]) -> bool:
    """``name`` is a literal counter name, or an f-string prefix plus a literal
    (``noticed_`` + ``core_without_record_route``); ``prefix_.*`` needs the prefix."""
    if name.endswith(".*"):
        stem = name[:-2]  # flood_dropped_ from f"flood_{'dropped' if d else 'monitored'}_{why}"
        return (
            any(c.startswith(stem) and len(c) > len(stem) for c in constants)
            or any(re.fullmatch(r"[a-z]+_[a-z_]*", p) and stem.startswith(p) for p in prefixes)
        )
    if name in constants:
        return True
    return any(p and name.startswith(p) and name[len(p):] in constants for p in prefixes)


def _dashboard_exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            yield f"variable {var['name']}", var["definition"]


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _event_names(expr: str) -> Iterator[str]:
    for op, value in EVENT.findall(expr):
        if op in ("=", "!="):
            yield value
        else:
            yield from value.split("|")


# ------------------------------------------------------------------ dashboard


def test_dashboard_loads_with_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "sipguard"
    assert any(i["name"] == "DS_PROMETHEUS" for i in dash["__inputs"])
    targets = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert targets
    for t in targets:
        assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_uses_only_exported_metrics() -> None:
    exported = exported_names()
    used = set()
    for title, expr in _dashboard_exprs():
        for name in METRIC.findall(expr):
            used.add(name)
            assert name in exported, f"{title}: {name} is not exported ({sorted(exported)})"
    # every family is on the dashboard somewhere
    families = {n.removesuffix("_total") for n in exported
                if not n.endswith(("_created", "_bucket", "_sum", "_count"))}
    shown = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    assert families <= shown, families - shown


def test_dashboard_events_are_counters() -> None:
    constants, prefixes = _source_strings()
    for title, expr in _dashboard_exprs():
        for name in _event_names(expr):
            assert is_counter_name(name, constants, prefixes), f"{title}: event {name}"


# ------------------------------------------------------------------ alerts


def test_alerts_are_complete() -> None:
    rules = _alert_rules()
    assert rules
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["alert"].startswith("Sipguard"), rule
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alerts_use_only_exported_metrics_and_real_counters() -> None:
    exported = exported_names()
    constants, prefixes = _source_strings()
    for rule in _alert_rules():
        for name in METRIC.findall(rule["expr"]):
            assert name in exported, f"{rule['alert']}: {name}"
        for event in _event_names(rule["expr"]):
            assert is_counter_name(event, constants, prefixes), f"{rule['alert']}: {event}"


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("internal_errors", True),
        ("flood_banned_.*", True),
        ("noticed_core_without_record_route", True),
        ("tcp_refused_per_ip", True),
        ("no_such_counter_xyz", False),
        ("nosuchprefix_.*", False),
    ],
)
def test_counter_name_check(name: str, ok: bool) -> None:
    constants, prefixes = _source_strings()
    assert is_counter_name(name, constants, prefixes) is ok
