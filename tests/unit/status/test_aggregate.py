"""compute_status / with_transition_times: node reports + model facts -> ClusterPolicyStatus.status."""

from __future__ import annotations

from typing import Any

import pytest

from netfence.status.aggregate import (
    MESSAGE_LIMIT,
    NodeReport,
    PolicyFacts,
    compute_status,
    strip_times,
    with_transition_times,
)


def facts(nodes: tuple[str, ...] = ("n1", "n2"), revision: int = 10, endpoints: int = 3,
          warnings: tuple[str, ...] = (), generation: int = 2) -> PolicyFacts:
    return PolicyFacts("ns", "pol", generation, frozenset(nodes), endpoints, revision, warnings)


def reports(*items: tuple[Any, ...]) -> dict[str, NodeReport]:
    """``("node", applied_revision[, last_error])`` per node."""
    return {item[0]: NodeReport(item[0], item[1], item[2] if len(item) > 2 else None) for item in items}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


# (case, facts, reports, phase, synced, reason, fragments expected in the message)
CASES = [
    ("all synced", facts(), reports(("n1", 10), ("n2", 12)), "Enforced", "2/2", "AllNodesSynced",
     ["enforced on 2/2 nodes"]),
    ("no node must enforce", facts(nodes=()), {}, "Enforced", "0/0", "AllNodesSynced", ["0/0"]),
    ("unrequired nodes ignored", facts(nodes=("n1",)), reports(("n1", 10), ("n9", 1, "boom")),
     "Enforced", "1/1", "AllNodesSynced", []),
    ("one lagging", facts(), reports(("n1", 10), ("n2", 9)), "Pending", "1/2", "WaitingForNodes",
     ["waiting for n2", "revision 10"]),
    ("missing report", facts(), reports(("n1", 10)), "Degraded", "1/2", "NodeReportMissing",
     ["no agent report from n2"]),
    ("failing node", facts(), reports(("n1", 10), ("n2", 7, "iptables-restore failed: line 3")), "Degraded",
     "1/2", "ApplyFailed", ["apply failed on n2: iptables-restore failed: line 3"]),
    ("failing but synced is enforced", facts(), reports(("n1", 10), ("n2", 11, "later apply failed")),
     "Enforced", "2/2", "AllNodesSynced", []),
    ("missing, failing and lagging", facts(nodes=("a", "b", "c")), reports(("b", 1, "err"), ("c", 2)),
     "Degraded", "0/3", "NodeReportMissing", ["no agent report from a", "apply failed on b: err", "waiting for c"]),
]


@pytest.mark.parametrize(("case", "fact", "reps", "phase", "synced", "reason", "fragments"), CASES,
                         ids=[c[0] for c in CASES])
def test_phases(case: str, fact: PolicyFacts, reps: dict[str, NodeReport], phase: str, synced: str,
                reason: str, fragments: list[str]) -> None:
    status = compute_status(fact, reps)
    assert status["phase"] == phase
    assert status["synced"] == synced
    assert status["requiredNodes"] == len(fact.required_nodes)
    assert status["syncedNodes"] == int(synced.split("/", maxsplit=1)[0])
    assert status["endpoints"] == fact.endpoints
    assert status["revision"] == fact.revision
    assert status["observedGeneration"] == fact.generation
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert ready["status"] == ("True" if phase == "Enforced" else "False")
    assert ready["reason"] == reason
    assert degraded["status"] == ("True" if phase == "Degraded" else "False")
    assert degraded["reason"] == (reason if phase == "Degraded" else "AsExpected")
    assert all(c["observedGeneration"] == fact.generation for c in status["conditions"])
    for fragment in fragments:
        assert fragment in ready["message"], (fragment, ready["message"])
    if phase == "Degraded":
        assert degraded["message"] == ready["message"]
    else:
        assert degraded["message"] == ""
    assert {n["name"] for n in status["nodes"]} == set(fact.required_nodes)


def test_node_detail_lists_unsynced_first_and_only_stable_values() -> None:
    status = compute_status(facts(nodes=("a", "b", "c", "d")),
                            reports(("a", 50), ("b", 3, "broken"), ("d", 9)))
    assert status["nodes"] == [
        {"name": "c", "synced": False, "message": "no agent report (agent down?)"},
        {"name": "b", "synced": False, "appliedRevision": 3, "message": "broken"},
        {"name": "d", "synced": False, "message": "applying"},
        {"name": "a", "synced": True},
    ]


def test_commits_elsewhere_do_not_change_the_status() -> None:
    """Agents' applied revisions move with every commit in the cluster; a synced
    policy's status must not (else every commit rewrites every status object)."""
    fact = facts()
    before = compute_status(fact, reports(("n1", 10), ("n2", 11)))
    after = compute_status(fact, reports(("n1", 250), ("n2", 999)))
    assert before == after
    failing = compute_status(fact, reports(("n1", 10), ("n2", 4, "err")))
    assert failing == compute_status(fact, reports(("n1", 300), ("n2", 4, "err")))


def test_messages_are_capped() -> None:
    long_error = "x" * 5000
    many = tuple(f"node-{i:03d}" for i in range(40))
    status = compute_status(facts(nodes=many), {n: NodeReport(n, 1, long_error) for n in many})
    ready = condition(status, "Ready")
    assert status["phase"] == "Degraded"
    assert len(ready["message"]) == MESSAGE_LIMIT and ready["message"].endswith("...")
    assert all(len(n["message"]) <= 256 for n in status["nodes"])
    assert len(status["nodes"]) <= 64
    assert status["requiredNodes"] == 40 and status["synced"] == "0/40"
    # Many missing nodes: a few are named, the rest counted.
    missing = compute_status(facts(nodes=many), {})
    assert "and 32 more" in condition(missing, "Ready")["message"]
    assert "node-000" in condition(missing, "Ready")["message"]


def test_warnings_become_a_condition() -> None:
    status = compute_status(facts(warnings=("selects no pods", "ipBlock covers pods")), reports(("n1", 10), ("n2", 10)))
    warning = condition(status, "Warning")
    assert warning["status"] == "True" and warning["reason"] == "SuspiciousPolicy"
    assert warning["message"] == "selects no pods; ipBlock covers pods"
    assert status["warnings"] == ["selects no pods", "ipBlock covers pods"]
    assert all(c["type"] != "Warning" for c in compute_status(facts(), {})["conditions"])


def test_equal_inputs_give_equal_output() -> None:
    reps = reports(("n1", 10), ("n2", 9))
    assert compute_status(facts(), reps) == compute_status(facts(), dict(reversed(reps.items())))


def test_node_report_from_json() -> None:
    report = NodeReport.from_json({"node": "n1", "appliedRevision": 7, "lastError": "", "version": "0.1.0",
                                   "rules": 12, "sets": 3, "time": "t", "futureField": 1})
    assert report == NodeReport("n1", 7, None, "0.1.0", "t", 12, 3)
    assert NodeReport.from_json({"node": "n2"}).applied_revision == 0


def test_odd_node_reports_decode_leniently() -> None:
    odd = {"appliedRevision": "12", "rules": -1, "sets": True, "lastError": 42, "node": "elsewhere"}
    assert NodeReport.from_json(odd, "n1") == NodeReport("n1", 0, "42", "", "", 0, 0)
    assert NodeReport.from_json({}).node == ""


# --- transition times ---------------------------------------------------------

T0, T1 = "2024-01-01T00:00:00Z", "2024-01-01T00:05:00Z"


def test_first_write_stamps_every_condition() -> None:
    full = with_transition_times(compute_status(facts(), reports(("n1", 10))), None, T0)
    assert {c["lastTransitionTime"] for c in full["conditions"]} == {T0}


@pytest.mark.parametrize(
    ("before", "after", "after_revision", "ready_time", "degraded_time"),
    [
        # same phase, other details changed (a newer relevant revision, applied): times are kept
        (reports(("n1", 10), ("n2", 10)), reports(("n1", 20), ("n2", 20)), 20, T0, T0),
        # Enforced -> Pending: Ready flips, Degraded stays False
        (reports(("n1", 10), ("n2", 10)), reports(("n1", 10), ("n2", 5)), 10, T1, T0),
        # Enforced -> Degraded: both flip
        (reports(("n1", 10), ("n2", 10)), reports(("n1", 10)), 10, T1, T1),
        # Degraded (missing) -> Degraded (failing): reason and message change, neither flips
        (reports(("n1", 10)), reports(("n1", 10), ("n2", 3, "err")), 10, T0, T0),
    ],
    ids=["unchanged", "ready-flips", "both-flip", "reason-change-only"],
)
def test_transition_times_kept_unless_status_flips(
    before: dict[str, NodeReport], after: dict[str, NodeReport], after_revision: int,
    ready_time: str, degraded_time: str,
) -> None:
    old = with_transition_times(compute_status(facts(revision=10), before), None, T0)
    new = with_transition_times(compute_status(facts(revision=after_revision), after), old, T1)
    assert condition(new, "Ready")["lastTransitionTime"] == ready_time
    assert condition(new, "Degraded")["lastTransitionTime"] == degraded_time
    assert strip_times(new) == compute_status(facts(revision=after_revision), after)


def test_strip_times_undoes_with_transition_times() -> None:
    status = compute_status(facts(), reports(("n1", 10)))
    assert strip_times(with_transition_times(status, None, T0)) == status
    assert strip_times(None) is None
