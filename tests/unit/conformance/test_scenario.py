from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from netfence_lab.conformance.scenario import (
    ScenarioError,
    collect_files,
    load_scenario,
    parse_scenario,
    substitute,
)

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared" / "conformance" / "scenarios"
OWN = REPO / "tests" / "conformance"


def scenario_files() -> list[Path]:
    return collect_files([p for p in (SHARED, OWN) if p.exists()])


@pytest.mark.parametrize("path", scenario_files(), ids=lambda p: p.name)
def test_every_known_scenario_parses(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.steps
    keys = {p.key for p in scenario.pods}
    for step in scenario.steps:
        for expect in step.expect:
            assert set(expect.clients) == set(expect.servers)
    assert keys


def test_e2e_preset_expands_to_nine_pods_with_four_ports() -> None:
    s = parse_scenario({"name": "p", "preset": "e2e", "steps": [{}]}, Path("p.yaml"))
    assert [p.key for p in s.pods] == [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
    assert all(p.ports == ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")) for p in s.pods)
    assert {n.name: n.labels for n in s.namespaces} == {"x": {"ns": "x"}, "y": {"ns": "y"}, "z": {"ns": "z"}}


def test_table_cells_and_diagonal() -> None:
    s = parse_scenario(
        {
            "name": "t",
            "pods": [{"namespace": "a", "name": "p"}, {"namespace": "a", "name": "q"}],
            "steps": [{"expect": [{"port": 80, "protocol": "UDP", "table": "- a/p a/q\na/p . X\na/q ? .\n"}]}],
        },
        Path("t.yaml"),
    )
    cells = s.steps[0].expect[0].cells
    assert cells[("a/p", "a/q")] is False
    assert cells[("a/q", "a/p")] is None
    assert cells[("a/p", "a/p")] is True


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"name": "Bad Name", "pods": [], "steps": []}, "name: expected a kebab-case name"),
        ({"name": "x", "steps": []}, "pods: expected a list of pods"),
        ({"name": "x", "preset": "e2e", "pods": [], "steps": []}, "preset: expected no namespaces/pods"),
        ({"name": "x", "preset": "e3e", "steps": []}, "preset: expected 'e2e'"),
        ({"name": "x", "pods": [{"namespace": "a", "name": "b", "ports": ["80/ICMP"]}], "steps": []},
         "pods[0].ports[0]: expected \"PORT/PROTOCOL\""),
        ({"name": "x", "nodes": 2, "pods": [{"namespace": "a", "name": "b", "node": 5}], "steps": []},
         "pods[0].node: expected an integer from 0 to 1"),
        ({"name": "x", "preset": "e2e", "steps": [{"actions": [{"apply": {}, "delete": {}}]}]},
         "steps[0].actions[0]: expected exactly one of"),
        ({"name": "x", "preset": "e2e", "steps": [{"expect": [{"port": 80, "protocol": "ICMP", "table": "- x/a"}]}]},
         "steps[0].expect[0].protocol: expected one of TCP, UDP, SCTP"),
        ({"name": "x", "preset": "e2e", "steps": [{"expect": [{"port": 80, "table": "- x/a\nx/a Y"}]}]},
         "expected cells '.', 'X' or '?'"),
        ({"name": "x", "preset": "e2e", "steps": [{"actions": [{"label": {"kind": "Service", "name": "a"}}]}]},
         "steps[0].actions[0].label.kind: expected Pod or Namespace"),
        ({"name": "x", "preset": "e2e", "colour": 1, "steps": []}, "top level: expected only the keys"),
    ],
)
def test_malformed_scenarios_name_file_key_and_expectation(doc: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(doc, Path("dir/bad.yaml"))
    assert str(err.value).startswith("dir/bad.yaml: ")
    assert message in str(err.value)


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"broken\.yaml: not valid YAML"):
        load_scenario(bad)


def test_placeholders() -> None:
    ips = {"x/a": "10.244.1.11"}
    doc = yaml.safe_load("cidr: ${cidr:x/a/24}\nlist: ['${ip:x/a}/32', 3]")
    assert substitute(doc, ips) == {"cidr": "10.244.1.0/24", "list": ["10.244.1.11/32", 3]}
    with pytest.raises(ScenarioError, match="no such pod"):
        substitute("${ip:y/b}", ips)
