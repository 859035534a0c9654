"""The runtime distribution (operator/netfence) never imports the test bed (lab/netfence_lab), and
`netfence` finds the test bed's commands only through the ``netfence.commands`` entry points (issue 10)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import netfence
from netfence import cli

RUNTIME = Path(netfence.__file__).parent
REPO = RUNTIME.parents[1]


def lab_imports(path: Path) -> list[str]:
    """``netfence_lab`` imports anywhere in one module (functions and TYPE_CHECKING blocks included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "netfence_lab"]
    return found


def test_no_runtime_module_imports_the_test_bed() -> None:
    offenders = [hit for path in sorted(RUNTIME.rglob("*.py")) for hit in lab_imports(path)]
    assert offenders == []


def test_the_finder_sees_a_lab_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from netfence_lab.cluster import LocalCluster\n")
    tmp_in_repo = REPO / "operator" / "netfence" / "_probe_import.py"
    tmp_in_repo.write_text(module.read_text())
    try:
        assert lab_imports(tmp_in_repo) == ["operator/netfence/_probe_import.py:2 netfence_lab.cluster"]
    finally:
        tmp_in_repo.unlink()


def test_the_runtime_package_list_excludes_the_lab() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"] == {"where": ["operator"], "include": ["netfence*"]}
    assert not (RUNTIME / "testbed").exists() and not (RUNTIME / "conformance").exists()


def test_lab_commands_are_entry_points_the_cli_discovers() -> None:
    lab = tomllib.loads((REPO / "lab" / "pyproject.toml").read_text())
    declared = lab["project"]["entry-points"][cli.COMMAND_GROUP]
    assert set(declared) == {"cluster", "conformance", "demo", "node"}
    loaded = {m.__name__ for m in cli.command_modules()}
    assert set(declared.values()) <= loaded  # installed by `make setup` (pip install -e ./lab)
    assert not any(name.startswith("netfence_lab") for name in cli.COMMAND_MODULES)
    sub = cli.build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    assert {"status", "explain", "cluster", "conformance", "demo", "node"} <= set(sub.choices)


def test_lab_errors_are_reported_as_one_line() -> None:
    from netfence_lab.cluster import ClusterError

    assert ClusterError in cli._known_errors()
