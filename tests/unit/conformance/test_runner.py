"""Pure parts of the runner: judging probes against a table, result statuses, the summary line, the JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from netfence_lab.conformance.runner import (
    ExpectResult,
    ScenarioResult,
    ScenarioRun,
    StepResult,
    judge,
    scenario_ports,
    summary_line,
    write_json,
)
from netfence_lab.conformance.scenario import ScenarioError, parse_scenario

PAIRS = [("n/a", "n/b"), ("n/b", "n/a")]


def expect(observed: list[bool | None], wanted: list[bool | None], protocol: str = "TCP") -> ExpectResult:
    """The runner's own judgement of ``observed`` probes against a ``wanted`` table (cells in PAIRS order)."""
    return judge(80, protocol, dict(zip(PAIRS, wanted, strict=True)), dict(zip(PAIRS, observed, strict=True)))


def test_judge_names_exactly_the_cells_that_differ() -> None:
    assert expect([True, False], [True, False]).wrong == []
    assert expect([False, False], [True, False]).wrong == [("n/a", "n/b")]
    assert expect([False, True], [True, False]).wrong == PAIRS
    assert not expect([False, True], [True, False]).passed
    # An unknown on either side ("?" in the table, or no SCTP to probe with) is never wrong.
    either = expect([None, True], [True, None], "SCTP")
    assert either.wrong == [] and either.passed and either.skipped
    assert either.expected == dict(zip(PAIRS, [True, None], strict=True))
    assert either.observed == dict(zip(PAIRS, [None, True], strict=True))


TWO_PODS = {
    "name": "two-pods",
    "nodes": 1,
    "pods": [{"namespace": "n", "name": n, "ports": ["80/TCP"]} for n in ("a", "b")],
    "steps": [{"expect": [{"port": 80, "protocol": "TCP", "table": "-   n/a n/b\nn/a .   X\nn/b .   .\n"}]}],
}


class AnsweringProber:
    """Answers each probe from a table by (source netns, destination IP); records what it was asked."""

    def __init__(self, answers: dict[tuple[str, str], bool | None]) -> None:
        self.answers = answers
        self.asked: list[Any] = []

    def probe_many(self, probes: Any, timeout: float = 1.0, **_: Any) -> dict[Any, bool | None]:
        todo = list(probes)
        self.asked += todo
        return {p: self.answers[(p.src_netns, p.dst_ip)] for p in todo}


def test_probe_step_judges_every_cell_the_prober_answered() -> None:
    scenario = parse_scenario(TWO_PODS, Path("two-pods.yaml"))
    pods = {"n/a": SimpleNamespace(netns="ns-a", ip="10.0.0.1", ips=("10.0.0.1",)),
            "n/b": SimpleNamespace(netns="ns-b", ip="10.0.0.2", ips=("10.0.0.2",))}
    env: Any = SimpleNamespace(kubelet=SimpleNamespace(pods=pods))
    # n/a -> n/b must be denied but connects; n/b -> n/a is allowed and connects.
    prober = AnsweringProber({("ns-a", "10.0.0.2"): True, ("ns-b", "10.0.0.1"): True})
    run = ScenarioRun(scenario, env, prober, 1.0, lambda _: None, Path("unused"))  # type: ignore[arg-type]
    [result] = run.probe_step(list(scenario.steps[0].expect))
    assert sorted((p.src_netns, p.dst_ip, p.port) for p in prober.asked) == [
        ("ns-a", "10.0.0.2", 80), ("ns-b", "10.0.0.1", 80)]
    assert result.wrong == [("n/a", "n/b")] and result.status == "failed"
    assert result.observed == {("n/a", "n/b"): True, ("n/b", "n/a"): True}
    prober.answers[("ns-a", "10.0.0.2")] = False
    [again] = run.probe_step(list(scenario.steps[0].expect))
    assert again.wrong == [] and again.status == "passed"


def test_expect_status_never_calls_unprobed_cells_passed() -> None:
    assert expect([True, False], [True, False]).status == "passed"
    assert expect([True, True], [True, False]).status == "failed"
    assert expect([None, None], [True, False], "SCTP").status == "skipped"
    assert expect([True, True], [True, None]).status == "passed"


def test_step_status() -> None:
    ok, skipped = expect([True, False], [True, False]), expect([None, None], [True, True], "SCTP")
    assert StepResult(0, True, 0.1, [ok, skipped]).status == "passed"
    assert StepResult(0, True, 0.1, [skipped, skipped]).status == "skipped"
    assert StepResult(0, True, 0.1, []).status == "passed"  # no expectations: nothing to skip
    assert StepResult(0, False, None, [], error="not enforced").status == "failed"


def test_summary_line_counts_scenarios() -> None:
    results = [ScenarioResult("a", "a.yaml", s) for s in ("passed", "failed", "error", "passed")]
    assert summary_line(results) == "2 passed, 2 failed"
    assert summary_line([*results, ScenarioResult("s", "s.yaml", "skipped")]) == "2 passed, 2 failed, 1 skipped"


def test_json_report_rounds_and_aggregates(tmp_path: Path) -> None:
    steps = [StepResult(i, True, secs, [expect([True, False], [True, False])]) for i, secs in
             enumerate([0.123456, 2.000049, 0.5])]
    results = [
        ScenarioResult("one", "one.yaml", "passed", steps, seconds=3.21111),
        ScenarioResult("bad", "bad.yaml", "error", error="bad.yaml: name: expected a kebab-case name"),
    ]
    write_json(results, tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"] == "1 passed, 1 failed"
    assert report["steps"] == 3
    assert report["enforceSeconds"] == {"p50": 0.5, "max": 2.0}
    one = report["scenarios"][0]
    assert one["seconds"] == 3.211
    assert [s["enforceSeconds"] for s in one["steps"]] == [0.1235, 2.0, 0.5]
    assert one["steps"][0]["expect"][0] == {
        "port": 80, "protocol": "TCP", "status": "passed", "passed": True, "skipped": False, "wrong": [],
        "families": ["ipv4"],
    }
    assert report["scenarios"][1]["steps"] == []


def test_json_report_without_steps(tmp_path: Path) -> None:
    write_json([], tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == {"summary": "0 passed, 0 failed", "scenarios": [], "steps": 0,
                      "enforceSeconds": {"p50": None, "max": None}}


CREATES_A_POD = {
    "name": "creates-a-pod",
    "nodes": 1,
    "pods": [{"namespace": "n", "name": "a", "ports": ["8080/TCP", "53/UDP"]}],
    "steps": [
        {
            "actions": [{"create-pod": {"namespace": "n", "name": "b", "ports": ["9999/SCTP"]}}],
            "expect": [{"port": 7000, "protocol": "UDP", "table": "-   n/a n/b\nn/a .   .\nn/b .   .\n"}],
        }
    ],
}


def test_scenario_ports_are_every_served_and_probed_port() -> None:
    """The run never uses these as source ports (a later probe from one could be an earlier one's reply)."""
    scenario = parse_scenario(CREATES_A_POD, Path("creates-a-pod.yaml"))
    assert scenario_ports([scenario, ScenarioError("x.yaml: broken")]) == {8080, 53, 9999, 7000}
