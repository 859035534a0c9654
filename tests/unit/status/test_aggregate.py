"""compute_status / with_transition_times: node reports + model facts -> ClusterPolicyStatus.status."""

from __future__ import annotations

from typing import Any

import pytest

from netfence.status.aggregate import (
    MESSAGE_LIMIT,
    READY_MESSAGE_LIMIT,
    BadKey,
    BadKeyHit,
    NodeReport,
    PolicyFacts,
    Unenforceable,
    compute_status,
    reduced_status,
    strip_times,
    with_transition_times,
)


def facts(nodes: tuple[str, ...] = ("n1", "n2"), revision: int = 10, endpoints: int = 3,
          warnings: tuple[str, ...] = (), generation: int = 2, object_generation: int = 5) -> PolicyFacts:
    return PolicyFacts("ns", "pol", generation, frozenset(nodes), endpoints, revision, warnings,
                       object_generation=object_generation)


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
    # kstatus/Flux/Argo CD: observedGeneration is the status object's own generation
    assert status["observedGeneration"] == fact.object_generation == 5
    assert status["policyGeneration"] == fact.generation == 2
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert ready["status"] == ("True" if phase == "Enforced" else "False")
    assert ready["reason"] == reason
    assert degraded["status"] == ("True" if phase == "Degraded" else "False")
    assert degraded["reason"] == (reason if phase == "Degraded" else "AsExpected")
    assert all(c["observedGeneration"] == fact.object_generation for c in status["conditions"])
    assert len(ready["message"]) <= READY_MESSAGE_LIMIT
    for fragment in fragments:
        assert fragment in ready["message"], (fragment, ready["message"])
    if phase == "Degraded":
        assert degraded["message"] == ready["message"]  # short enough to be its own headline
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
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert status["phase"] == "Degraded"
    assert len(degraded["message"]) == MESSAGE_LIMIT and degraded["message"].endswith("...")
    # the Ready message is a headline for `kubectl get -o wide`, pointing at the detail
    assert len(ready["message"]) <= READY_MESSAGE_LIMIT and ready["message"].endswith(" ... (see Degraded)")
    assert degraded["message"].startswith(ready["message"].removesuffix(" ... (see Degraded)"))
    assert all(len(n["message"]) <= 256 for n in status["nodes"])
    assert len(status["nodes"]) <= 64
    assert status["requiredNodes"] == 40 and status["synced"] == "0/40"
    # Many missing nodes: a few are named, the rest counted.
    missing = compute_status(facts(nodes=many), {})
    assert "and 32 more" in condition(missing, "Degraded")["message"]
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


# --- report-field contract: bad keys and unenforceable rules -------------------------------


def test_node_report_decodes_bad_keys_and_unenforceable() -> None:
    report = NodeReport.from_json({
        "appliedRevision": 5,
        "badKeys": [{"key": "policies/ns/a", "reason": "not JSON"}, {"key": "sets/p1"}],
        "badKeysTotal": 40,
        "unenforceable": [{"policy": "ns/a", "feature": "sctp-port-match"}],
    }, "n1")
    assert report.bad_keys == (BadKey("policies/ns/a", "not JSON"), BadKey("sets/p1", ""))
    assert report.bad_keys_total == 40
    assert report.unenforceable == (Unenforceable("ns/a", "sctp-port-match"),)
    assert report.unenforceable_total == 1  # absent total: the list's length


@pytest.mark.parametrize(
    ("body", "bad", "bad_total", "unenforceable", "unenforceable_total"),
    [
        ({}, (), 0, (), 0),
        ({"badKeys": "x", "badKeysTotal": "3", "unenforceable": {"policy": "ns/a"}}, (), 0, (), 0),
        # malformed entries are skipped but counted: the node then has unlisted bad keys
        ({"badKeys": [1, {"key": ""}, {"key": 7}, {"key": "sets/p", "reason": 3}]},
         (BadKey("sets/p", ""),), 4, (), 0),
        ({"badKeysTotal": 2}, (), 2, (), 0),
        ({"badKeysTotal": True, "unenforceableTotal": -1}, (), 0, (), 0),
        ({"unenforceable": [{"policy": "ns/a"}, {"policy": "ns/b", "feature": ""}, {"feature": "f"}]},
         (), 0, (Unenforceable("ns/b", "unknown"),), 3),
    ],
    ids=["absent", "wrong-types", "odd-entries", "total-only", "odd-totals", "odd-unenforceable"],
)
def test_report_fields_decode_leniently(body: dict[str, Any], bad: tuple[BadKey, ...], bad_total: int,
                                        unenforceable: tuple[Unenforceable, ...], unenforceable_total: int) -> None:
    report = NodeReport.from_json({"appliedRevision": 3, **body}, "n1")
    assert report.applied_revision == 3
    assert (report.bad_keys, report.bad_keys_total) == (bad, bad_total)
    assert (report.unenforceable, report.unenforceable_total) == (unenforceable, unenforceable_total)


def with_bad(fact: PolicyFacts, *hits: BadKeyHit) -> PolicyFacts:
    return PolicyFacts(fact.namespace, fact.name, fact.generation, fact.required_nodes, fact.endpoints,
                       fact.revision, fact.warnings, hits, fact.object_generation)


def test_bad_key_on_a_required_node_degrades_naming_node_and_key() -> None:
    fact = with_bad(facts(), BadKeyHit("n2", "policies/ns/pol", "written outside a controller commit"))
    status = compute_status(fact, reports(("n1", 10), ("n2", 10)))
    assert status["phase"] == "Degraded"
    assert status["synced"] == "2/2"  # applied, but not what the controller wrote
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert ready["status"] == "False" and degraded["status"] == "True"
    assert degraded["reason"] == "BadKey"
    assert "n2: policies/ns/pol (written outside a controller commit)" in degraded["message"]
    assert status["nodes"][0] == {"name": "n2", "synced": True,
                                  "message": "bad keys: policies/ns/pol (written outside a controller commit)"}


def test_bad_key_on_a_node_that_need_not_enforce_is_ignored() -> None:
    fact = with_bad(facts(nodes=("n1",)), BadKeyHit("n9", "sets/p1", "not JSON"))
    status = compute_status(fact, reports(("n1", 10), ("n9", 10)))
    assert status["phase"] == "Enforced"


def test_bad_keys_add_to_other_problems() -> None:
    fact = with_bad(facts(nodes=("a", "b", "c")), BadKeyHit("c", "endpoints/c/ns/web", "not JSON"))
    status = compute_status(fact, reports(("b", 1, "boom"), ("c", 10)))
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert ready["reason"] == "NodeReportMissing"
    assert ready["message"].startswith("no agent report from a")
    assert "no agent report from a" in degraded["message"]
    assert "apply failed on b: boom" in degraded["message"]
    assert "bad keys on c: endpoints/c/ns/web (not JSON)" in degraded["message"]
    assert [n["name"] for n in status["nodes"]] == ["a", "b", "c"]


def test_unlisted_bad_keys_degrade_every_policy_of_the_node() -> None:
    """The agent lists at most 32 bad keys: beyond them, any policy of the node may be affected."""
    truncated = NodeReport("n2", 10, bad_keys=tuple(BadKey(f"endpoints/n2/ns/p{i}") for i in range(32)),
                           bad_keys_total=33)
    status = compute_status(facts(), {"n1": NodeReport("n1", 10), "n2": truncated})
    assert status["phase"] == "Degraded"
    assert "n2 reports 33 bad keys but lists only 32" in condition(status, "Degraded")["message"]
    listed = NodeReport("n2", 10, bad_keys=(BadKey("endpoints/n2/ns/other"),), bad_keys_total=1)
    assert compute_status(facts(), {"n1": NodeReport("n1", 10), "n2": listed})["phase"] == "Enforced"


def test_unenforceable_rules_give_a_warning_naming_node_and_feature() -> None:
    n2 = NodeReport("n2", 10, unenforceable=(Unenforceable("ns/pol", "sctp-port-match"),
                                             Unenforceable("ns/other", "x")), unenforceable_total=2)
    status = compute_status(facts(warnings=("selects no pods",)), {"n1": NodeReport("n1", 10), "n2": n2})
    assert status["phase"] == "Enforced"
    warning = condition(status, "Warning")
    assert warning["reason"] == "Unenforceable"
    assert warning["message"].startswith("node n2 cannot enforce sctp-port-match")
    assert "selects no pods" in warning["message"]
    assert status["warnings"][0].startswith("node n2 cannot enforce sctp-port-match")
    assert "x" not in " ".join(status["warnings"]).split()  # ns/other's feature is not ours
    # not a required node: nothing
    assert "Warning" not in [c["type"] for c in compute_status(facts(nodes=("n1",)), {"n2": n2})["conditions"]]


def test_unlisted_unenforceable_entries_warn() -> None:
    n1 = NodeReport("n1", 10, unenforceable=(Unenforceable("ns/other", "f"),), unenforceable_total=50)
    status = compute_status(facts(nodes=("n1",)), {"n1": n1})
    assert "reports 50 unenforceable rules but lists only 1" in condition(status, "Warning")["message"]


def test_long_lists_are_capped_with_a_count() -> None:
    many = tuple(f"node-{i:03d}" for i in range(100))
    status = compute_status(facts(nodes=many, warnings=tuple(f"w{i}" for i in range(70))), {})
    assert len(status["nodes"]) == 64 and status["nodesOmitted"] == 36
    assert len(status["warnings"]) == 64 and status["warningsOmitted"] == 6
    assert condition(status, "Warning")["message"].startswith("70 warnings: w0; w1")
    short = compute_status(facts(), reports(("n1", 10), ("n2", 10)))
    assert "nodesOmitted" not in short and "warningsOmitted" not in short


def test_reduced_status_keeps_the_phase_and_says_why() -> None:
    full = compute_status(facts(warnings=("w",)), reports(("n1", 10)))
    reduced = reduced_status(full, "422 Unprocessable Entity: status.nodes: Too many")
    assert reduced["phase"] == "Degraded" and reduced["synced"] == "1/2"
    assert "nodes" not in reduced and "warnings" not in reduced
    assert [c["type"] for c in reduced["conditions"]] == ["Ready", "Degraded", "Warning", "StatusWriteFailed"]
    failed = condition(reduced, "StatusWriteFailed")
    assert failed["status"] == "True" and failed["reason"] == "Rejected"
    assert "status.nodes: Too many" in failed["message"]
