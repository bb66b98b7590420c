"""Layering rules, checked on the source (ast) so that TYPE_CHECKING imports count too.

- The sans-I/O rule: sip/, proxy/, policy/ and state/ import no I/O, clock or observability.
- Package direction: sip/ imports nothing else of sipguard; policy/ and state/ never import
  ops/, transport/, the server or the CLI; ops/ never imports transport/, the server or the
  CLI; and no two packages import each other, directly or round a longer loop.
"""

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
    [p for pkg in CORE_PACKAGES for p in sorted((PACKAGE / pkg).glob("*.py"))]
    + [PACKAGE / "edge.py", PACKAGE / "contract.py"],
    ids=lambda p: f"{p.parent.name}/{p.name}" if p.parent != PACKAGE else p.name,
)
def test_core_module_imports_no_io(path: Path) -> None:
    """A module of the sans-I/O core imports no sockets, event loop, clock or logging."""
    assert not _imports(path), f"{path} imports {_imports(path)}"


# --------------------------------------------------------------------------- package direction
#
# The layers import downwards only. A "unit" is a subpackage (sipguard.policy) or a top-level
# module (sipguard.server, sipguard.cli); imports inside one unit are not edges.

def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sipguard_imports(path: Path) -> set[str]:
    """Every sipguard module ``path`` imports, at run time or under TYPE_CHECKING alike."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # "from sipguard import server" / "from sipguard.policy import rate" name modules
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "sipguard" or name.startswith("sipguard.")}


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _package_graph() -> dict[str, dict[str, set[str]]]:
    """unit -> {unit it imports -> files that do}; only units that exist are edges."""
    modules = {p: _module_name(p) for p in sorted(PACKAGE.rglob("*.py"))}
    units = {_unit(m) for m in modules.values()}
    graph: dict[str, dict[str, set[str]]] = {u: {} for u in units}
    for path, module in modules.items():
        source = _unit(module)
        for name in _sipguard_imports(path):
            # "from sipguard.policy import rate" adds sipguard.policy.rate: still sipguard.policy
            target = _unit(name)
            if target != source and target in units and target != "sipguard":
                graph[source].setdefault(target, set()).add(str(path.relative_to(PACKAGE)))
    return graph


def _cycles(graph: dict[str, dict[str, set[str]]]) -> list[set[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


GRAPH = _package_graph()
SHELL = ("sipguard.ops", "sipguard.transport", "sipguard.server", "sipguard.cli")
MUST_NOT_IMPORT = [
    (importer, imported)
    for importers, forbidden in (
        # the contract is what proxy and policy share: it stands on sip/ alone
        (("sipguard.contract",),
         ("sipguard.proxy", "sipguard.policy", "sipguard.state", "sipguard.edge", *SHELL)),
        # proxy and policy meet only inside the edge core, through the contract types
        (("sipguard.proxy",), ("sipguard.policy", "sipguard.edge", *SHELL)),
        (("sipguard.policy", "sipguard.state"), ("sipguard.proxy", "sipguard.edge", *SHELL)),
        (("sipguard.edge",), SHELL),
        (("sipguard.ops",), ("sipguard.server", "sipguard.cli", "sipguard.transport")),
    )
    for importer in importers
    for imported in forbidden
]


def test_package_graph_sees_the_layers() -> None:
    """The graph is built from real imports (guards the tests below against passing vacuously)."""
    assert {"sipguard.sip", "sipguard.policy", "sipguard.ops", "sipguard.server"} <= set(GRAPH)
    assert "sipguard.sip" in GRAPH["sipguard.policy"]
    assert "sipguard.edge" in GRAPH["sipguard.server"]
    assert {"sipguard.proxy", "sipguard.policy"} <= set(GRAPH["sipguard.edge"])


def test_sip_imports_nothing_else_of_sipguard() -> None:
    """sip/ is the bottom layer: the SIP grammars and message model stand on their own."""
    assert GRAPH["sipguard.sip"] == {}, GRAPH["sipguard.sip"]


@pytest.mark.parametrize(
    ("importer", "imported"),
    MUST_NOT_IMPORT,
    ids=[f"{a.removeprefix('sipguard.')}-x-{b.removeprefix('sipguard.')}" for a, b in MUST_NOT_IMPORT],
)
def test_lower_layer_does_not_import_higher(importer: str, imported: str) -> None:
    """Data flows shell -> edge core -> (proxy, policy) -> contract -> sip, never back up."""
    files = GRAPH.get(importer, {}).get(imported, set())
    assert not files, f"{importer} imports {imported} in {sorted(files)}"


def test_no_cycle_between_packages() -> None:
    """The units import each other in one direction only (TYPE_CHECKING imports included)."""
    assert _cycles(GRAPH) == []
