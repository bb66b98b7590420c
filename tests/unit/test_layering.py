"""The sans-I/O rule: sip/, proxy/, policy/ and state/ import no I/O, clock or observability."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sipguard"
CORE_PACKAGES = ("sip", "proxy", "policy", "state")
FORBIDDEN = {
    "asyncio", "socket", "ssl", "selectors", "uvloop", "aiohttp", "redis", "structlog",
    "logging", "prometheus_client", "time", "threading", "subprocess", "urllib.request",
    "http", "requests",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    # "urllib.parse" is pure; "urllib.request" is I/O: match whole dotted prefixes.
    return {
        bad for name in names for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")
    }


@pytest.mark.parametrize(
    "path",
    [p for pkg in CORE_PACKAGES for p in sorted((PACKAGE / pkg).glob("*.py"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_core_module_imports_no_io(path: Path) -> None:
    """A module of the sans-I/O core imports no sockets, event loop, clock or logging."""
    assert not _imports(path), f"{path} imports {_imports(path)}"
