"""The ClusterPolicyStatus CRD: its shape, its printer columns, and the packaged copy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from hack.gen_crds import TARGET_DIRS, generated, header, read_sources

from netfence_lab.cluster import crd_names, packaged_crd_dir

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "clusterpolicystatus.yaml"


def load() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text())
    assert isinstance(doc, dict)
    return doc


def schema_at(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    """The schema of the field a printer column's JSONPath names (``a.b[?(...)].c``: c of b's items)."""
    node = schema
    for part in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).strip(".").split("."):
        name, array, _ = part.partition("[]")
        node = node["properties"][name]
        if array:
            node = node["items"]
    return node


def test_generated_copies_are_what_the_generator_writes() -> None:
    """The chart's and the package's copies are exactly hack/gen_crds.py's output (`make crds`)."""
    wanted = generated(read_sources(REPO))
    assert sorted(wanted) == sorted(f"{d}/{p.name}" for d in TARGET_DIRS for p in (REPO / "crds").glob("*.yaml"))
    for rel, text in wanted.items():
        assert (REPO / rel).read_text() == text, f"{rel} differs from the generated copy: run `make crds`"
    for target in TARGET_DIRS:
        extra = {f"{target}/{p.name}" for p in (REPO / target).glob("*.yaml")} - wanted.keys()
        assert not extra, f"copies without a source in crds/: {sorted(extra)}"
    packaged = sorted(p.name for p in packaged_crd_dir().glob("*.yaml"))
    assert packaged == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))


def test_generated_copy_is_the_same_yaml_under_a_do_not_edit_comment() -> None:
    source = {"crds/x.yaml": "# about x\napiVersion: v1\nkind: X\n"}
    copies = generated(source)
    assert sorted(copies) == sorted(f"{d}/x.yaml" for d in TARGET_DIRS)
    for text in copies.values():
        assert text == header("crds/x.yaml") + source["crds/x.yaml"]
        assert all(line.startswith("# ") for line in header("crds/x.yaml").splitlines())
        assert "do not edit" in text.splitlines()[0]
        assert yaml.safe_load(text) == yaml.safe_load(source["crds/x.yaml"])
    assert generated({}) == {}


def test_names_scope_and_version() -> None:
    crd = load()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "clusterpolicystatuses.netfence.dev"
    spec = crd["spec"]
    assert spec["group"] == "netfence.dev"
    assert spec["scope"] == "Cluster"
    assert spec["names"] == {
        "kind": "ClusterPolicyStatus",
        "listKind": "ClusterPolicyStatusList",
        "plural": "clusterpolicystatuses",
        "singular": "clusterpolicystatus",
        "shortNames": ["policystatus", "cps"],
        "categories": ["netfence"],
    }
    versions = {v["name"]: v for v in spec["versions"]}
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        ("v1", True, True), ("v1alpha1", True, False),
    ]
    # Same schema, columns and subresources: the API server converts with no webhook.
    assert "conversion" not in spec or spec["conversion"] == {"strategy": "None"}
    v1, v1alpha1 = versions["v1"], versions["v1alpha1"]
    assert {k: v for k, v in v1.items() if k not in ("name", "storage")} == {
        k: v for k, v in v1alpha1.items() if k not in ("name", "storage")
    }
    assert v1["subresources"] == {"status": {}}
    assert crd_names(REPO / "crds") == [("clusterpolicystatuses.netfence.dev", "policystatus")]


def test_printer_columns_point_at_schema_fields() -> None:
    version = load()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c] == [
        "Kind", "Policy", "Phase", "Synced", "Endpoints", "Age",
    ]
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    for name, column in columns.items():
        if name == "Age":
            continue
        field = schema_at(schema, column["jsonPath"])
        assert field["type"] == column["type"], name
    # -o wide: the Ready condition's reason and headline, not an internal revision
    assert [(c["name"], c["priority"]) for c in version["additionalPrinterColumns"] if "priority" in c] == [
        ("Reason", 1), ("Message", 1),
    ]
    assert columns["Reason"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["Message"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].message'


def test_status_schema() -> None:
    schema = load()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert set(spec["properties"]) == {"kind", "policy", "policyRef", "generation"}
    assert set(spec["properties"]["policy"]["properties"]) == {"namespace", "name", "uid"}
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Enforced", "Degraded"]
    for name in ("requiredNodes", "syncedNodes", "endpoints", "revision", "observedGeneration", "policyGeneration"):
        assert status[name]["type"] == "integer", name
    assert "ClusterPolicyStatus" in status["observedGeneration"]["description"]
    assert "NetworkPolicy" in status["policyGeneration"]["description"]
    assert status["synced"]["type"] == "string"
    node = status["nodes"]["items"]
    assert set(node["properties"]) == {"name", "synced", "appliedRevision", "message"}
    assert node["properties"]["synced"]["type"] == "boolean"
    assert status["nodes"]["x-kubernetes-list-map-keys"] == ["name"]
    cond = status["conditions"]["items"]
    assert set(cond["properties"]) == {
        "type", "status", "reason", "message", "lastTransitionTime", "observedGeneration",
    }
    assert cond["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert cond["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert status["warnings"]["items"]["type"] == "string"
