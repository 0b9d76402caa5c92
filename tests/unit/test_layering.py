"""The import graph stays as the design says: one edge from pbt_server to workers (the pool),
no cycle inside workers, and the client and the web bridge never pull in the broker side."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(child) for child in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


GRAPH = {
    _module(path): _imports(path)
    for package in ("pbt_server", "workers")
    for path in (REPO / package).rglob("*.py")
}


def _imports_package(imports: set[str], package: str) -> bool:
    return any(name == package or name.startswith(package + ".") for name in imports)


def test_the_pool_is_the_only_pbt_server_module_that_imports_workers() -> None:
    importers = {
        module
        for module, imports in GRAPH.items()
        if module.startswith("pbt_server") and _imports_package(imports, "workers")
    }
    # and the test harness, which runs one child session in a worker the way the pool does
    assert importers == {"pbt_server.pool", "pbt_server.testing"}


def test_no_import_cycle_inside_workers() -> None:
    edges = {
        module: {name for name in imports if name in GRAPH and name.startswith("workers")}
        for module, imports in GRAPH.items()
        if module.startswith("workers")
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, set()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cyclic = sorted(module for module in edges if reaches(module, module, {module}))
    assert cyclic == []


def test_the_clients_and_the_web_bridge_do_not_import_the_broker_side() -> None:
    broker_side = (
        "pbt_server.broker",
        "pbt_server.pool",
        "pbt_server.watchdog",
        "pbt_server.server",
        "pbt_server.sessions",
    )
    for module, imports in GRAPH.items():
        if module.startswith(("pbt_server.client", "pbt_server.web")):
            assert not {name for name in imports if name.startswith(broker_side)}, module


def test_the_broker_does_not_import_the_web_extra() -> None:
    for module, imports in GRAPH.items():
        if module.startswith("pbt_server") and not module.startswith("pbt_server.web"):
            assert not _imports_package(imports, "starlette"), module
            assert not _imports_package(imports, "uvicorn"), module
