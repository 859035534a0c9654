"""The store package's import graph: no cycle, nothing from above it, pure protocol module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import netfence.store

STORE = Path(netfence.store.__file__).parent
MODULES = sorted(p.stem for p in STORE.glob("*.py") if p.stem != "__init__")
PACKAGE = "netfence.store"


def imported_modules(module: str) -> set[str]:
    """Every ``netfence.*`` module ``module`` (a store module) imports, wherever the import stands
    (inside functions and ``if TYPE_CHECKING:`` blocks too: those make cycles as well)."""
    tree = ast.parse((STORE / f"{module}.py").read_text(), filename=f"{module}.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("netfence"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the store package
                base = PACKAGE.rsplit(".", node.level - 1)[0] if node.level > 1 else PACKAGE
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("netfence"):
                continue
            if target == PACKAGE:  # from netfence.store import layout: submodules
                found.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
    return found


def store_graph() -> dict[str, set[str]]:
    """store module -> the store modules it imports."""
    prefix = PACKAGE + "."
    return {
        module: {m.removeprefix(prefix) for m in imported_modules(module) if m.startswith(prefix)}
        for module in MODULES
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}, "a": set()}) == ["x", "y", "x"]


def test_the_store_modules_import_no_cycle() -> None:
    graph = store_graph()
    assert {"etcd", "lease", "election", "protocols", "reader", "writer", "reports", "leases"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_store_imports_nothing_from_above_it() -> None:
    for module in MODULES:
        outside = {m for m in imported_modules(module) if not m.startswith(PACKAGE)}
        assert outside == set(), f"store/{module}.py imports {sorted(outside)}"


def test_the_protocols_are_pure() -> None:
    """store/protocols.py: types only (no gRPC, no etcd client, no other store module with I/O)."""
    tree = ast.parse((STORE / "protocols.py").read_text())
    top: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "asyncio", "collections", "types", "typing", "netfence"}
    assert store_graph()["protocols"] <= {"layout", "types", "errors"}


def test_orchestration_depends_on_the_protocols_only() -> None:
    """The agent loop, the syncer and the election name no concrete store class."""
    root = STORE.parent
    for path in (root / "agent" / "loop.py", root / "controller" / "syncer.py", STORE / "election.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in {f"{PACKAGE}.{m}" for m in
                                           ("etcd", "access", "reader", "writer", "reports", "leases")}, path
                assert node.module != f"{PACKAGE}.election" or path.name != "syncer.py", path


@pytest.mark.parametrize("module", MODULES)
def test_every_store_module_imports_on_its_own(module: str) -> None:
    importlib.import_module(f"{PACKAGE}.{module}")
