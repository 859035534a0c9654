"""Pure parts of the runner: result statuses, the summary line, the JSON report."""

from __future__ import annotations

import json
from pathlib import Path

from netfence.conformance.runner import ExpectResult, ScenarioResult, StepResult, summary_line, write_json

PAIRS = [("n/a", "n/b"), ("n/b", "n/a")]


def expect(observed: list[bool | None], wanted: list[bool | None], protocol: str = "TCP") -> ExpectResult:
    exp = dict(zip(PAIRS, wanted, strict=True))
    obs = dict(zip(PAIRS, observed, strict=True))
    wrong = [p for p in PAIRS if exp[p] is not None and obs[p] is not None and obs[p] != exp[p]]
    return ExpectResult(80, protocol, not wrong, any(v is None for v in observed), exp, obs, wrong)


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
    }
    assert report["scenarios"][1]["steps"] == []


def test_json_report_without_steps(tmp_path: Path) -> None:
    write_json([], tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == {"summary": "0 passed, 0 failed", "scenarios": [], "steps": 0,
                      "enforceSeconds": {"p50": None, "max": None}}
