"""The Helm chart's files that must stay in step with the repository (no helm binary needed)."""

from __future__ import annotations

import json
import py_compile
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "netfence"


def pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# files/clusterpolicystatus.yaml is generated from crds/ (tests/unit/test_crd.py checks it).


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == pyproject_version()


def test_values_schema_is_valid_json_and_covers_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])
    assert schema["properties"]["etcd"]["properties"]["replicas"]["enum"] == [1, 3]


def test_helm_test_script_compiles(tmp_path: Path) -> None:
    py_compile.compile(str(CHART / "files" / "helm-test.py"), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_templates_never_hardcode_a_namespace() -> None:
    for path in (CHART / "templates").rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if re.match(r"\s+namespace:", line):
                assert ".Release.Namespace" in line, f"{path.name}: {line.strip()}"
