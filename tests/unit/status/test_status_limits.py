"""Every status the aggregation produces fits the CRD's openAPIV3Schema limits (property test).

The API server rejects a status that breaks a limit (``status.warnings: Too many``)
and the object's status then freezes; so for arbitrary inputs — many nodes,
long node names, long errors, hundreds of warnings, many bad keys — the status
(with transition times, as written) must validate against the CRD's schema.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.status.crd_limits import load_schema, status_schema, violations

from netfence.status.aggregate import (
    NODE_LIST_LIMIT,
    WARNING_LIMIT,
    BadKey,
    BadKeyHit,
    NodeReport,
    PolicyFacts,
    Unenforceable,
    compute_status,
    reduced_status,
    with_transition_times,
)

T0 = "2024-01-01T00:00:00Z"
SCHEMA = status_schema()

node_names = st.one_of(
    st.from_regex(r"\Anode-[0-9]{1,4}\Z"),
    st.builds(lambda s, n: s * n, st.text(max_size=3), st.integers(0, 100)),  # also longer than 253
)
# Short texts, and long ones (above every maxLength of the schema) built cheaply by repetition.
texts = st.one_of(
    st.text(max_size=20), st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(1, 600))
)
big_ints = st.integers(min_value=-5, max_value=2**70)


@st.composite
def inputs(draw: st.DrawFn) -> tuple[PolicyFacts, dict[str, NodeReport]]:
    ns = draw(st.text(min_size=1, max_size=63))
    name = draw(st.text(min_size=1, max_size=253))
    required = draw(st.frozensets(node_names, max_size=100))  # above the 64 listed
    others = draw(st.frozensets(node_names, max_size=20))
    policy = f"{ns}/{name}"
    reports: dict[str, NodeReport] = {}
    for node in sorted(required | others):
        if draw(st.integers(0, 9)) == 0:
            continue  # no report: agent down
        bad = draw(st.lists(st.builds(BadKey, texts, texts), max_size=40))
        unenforceable = draw(st.lists(
            st.builds(Unenforceable, st.sampled_from([policy, "other/p"]), st.text(max_size=200)), max_size=40))
        reports[node] = NodeReport(
            node,
            draw(big_ints),
            draw(st.one_of(st.none(), texts)),
            bad_keys=tuple(bad),
            bad_keys_total=len(bad) + draw(st.integers(0, 5)),
            unenforceable=tuple(unenforceable),
            unenforceable_total=len(unenforceable) + draw(st.integers(0, 5)),
        )
    hits = draw(st.lists(st.builds(BadKeyHit, st.sampled_from(sorted(required | others) or ["x"]), texts, texts),
                         max_size=60))
    facts = PolicyFacts(
        namespace=ns,
        name=name,
        generation=draw(big_ints),
        required_nodes=required,
        endpoints=draw(big_ints),
        revision=draw(big_ints),
        warnings=tuple(draw(st.lists(texts, max_size=100))),  # above the 64 listed
        bad_keys=tuple(hits),
        object_generation=draw(big_ints),
        hides=draw(st.sampled_from(["", f"cnp/{name}"])),  # a NetworkPolicy whose status object it takes
    )
    return facts, reports


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inputs())
def test_every_status_fits_the_crd(case: tuple[PolicyFacts, dict[str, NodeReport]]) -> None:
    facts, reports = case
    status = compute_status(facts, reports)
    written = with_transition_times(status, None, T0)
    assert violations(written, SCHEMA, ".status") == []
    # What was left out is counted.
    required = len(facts.required_nodes)
    assert len(status["nodes"]) + status.get("nodesOmitted", 0) == min(required, 2**31 - 1)
    assert len(status["nodes"]) <= NODE_LIST_LIMIT
    assert len(status["warnings"]) <= WARNING_LIMIT
    if "warningsOmitted" in status:
        assert len(status["warnings"]) == WARNING_LIMIT
    # The reduced status written when the API server rejects a full one fits as well.
    reduced = with_transition_times(reduced_status(status, "x" * 5000), written, T0)
    assert violations(reduced, SCHEMA, ".status") == []


def test_198_never_matching_rules_fit() -> None:
    """The issue's case: a policy with 198 "selects no pods" warnings."""
    warnings = tuple(f"spec.ingress[{i}].from[0]: selects no pods" for i in range(198))
    facts = PolicyFacts("ns", "many", 1, frozenset({"node-0"}), 1, 5, warnings)
    status = compute_status(facts, {"node-0": NodeReport("node-0", 5)})
    assert violations(with_transition_times(status, None, T0), SCHEMA, ".status") == []
    assert status["warnings"] == list(warnings[:64])
    assert status["warningsOmitted"] == 134
    warning = next(c for c in status["conditions"] if c["type"] == "Warning")
    assert warning["message"].startswith("198 warnings: ")
    assert status["phase"] == "Enforced"


def test_both_served_versions_have_the_same_status_schema() -> None:
    assert status_schema("v1") == status_schema("v1alpha1")
    assert "nodesOmitted" in SCHEMA["properties"] and "warningsOmitted" in SCHEMA["properties"]


# --- the checker itself must catch what the API server rejects -------------------------


def valid() -> dict[str, Any]:
    status = compute_status(PolicyFacts("ns", "p", 1, frozenset({"a"}), 1, 2), {"a": NodeReport("a", 2)})
    return with_transition_times(status, None, T0)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda s: s.update(warnings=["w"] * 65), "maxItems 64"),
        (lambda s: s.update(warnings=["w" * 1025]), "maxLength 1024"),
        (lambda s: s.update(nodes=[{"name": "a", "synced": True}] * 2), "duplicate list-map keys"),
        (lambda s: s.update(nodes=[{"name": "x" * 254, "synced": True}]), "maxLength 253"),
        (lambda s: s.update(nodes=[{"name": "a"}]), "synced: required"),
        (lambda s: s.update(phase="Broken"), "not in"),
        (lambda s: s.update(requiredNodes=2**31), "> 2147483647"),
        (lambda s: s.update(revision=-1), "< 0"),
        (lambda s: s.update(synced="1" * 33), "maxLength 32"),
        (lambda s: s.update(extra=1), "unknown field"),
        (lambda s: s["conditions"][0].update(reason="has space"), "does not match"),
        (lambda s: s["conditions"][0].update(type="Ready\n"), "does not match"),
        (lambda s: s["conditions"][0].update(lastTransitionTime="yesterday"), "date-time"),
        (lambda s: s["conditions"][0].pop("message"), "message: required"),
        (lambda s: s.update(warningsOmitted=True), "is not integer"),
    ],
)
def test_checker_catches_violations(change: Any, fragment: str) -> None:
    status = valid()
    assert violations(status, SCHEMA) == []
    change(status)
    found = violations(status, SCHEMA)
    assert any(fragment in v for v in found), found


def test_checker_refuses_unknown_keywords() -> None:
    with pytest.raises(ValueError, match="oneOf"):
        violations({}, {"type": "object", "oneOf": []})
    assert load_schema()["required"] == ["spec"]
