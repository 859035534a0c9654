"""ModelEngine: change draining, policy views, warnings, affected policies."""

from __future__ import annotations

from typing import Any

from netfence.model.compiler import ModelEngine
from netfence.model.world import ContainerPort, Namespace, Pod, policy_from_k8s

HTTP = ContainerPort("http", "TCP", 80)


def policy(name: str, spec: dict[str, Any], namespace: str = "x") -> Any:
    return policy_from_k8s({"metadata": {"namespace": namespace, "name": name, "uid": name}, "spec": spec})


def make_engine() -> ModelEngine:
    engine = ModelEngine()
    engine.set_namespace(Namespace("x", {"team": "red"}))
    engine.set_namespace(Namespace("y", {"team": "blue"}))
    engine.set_pod(Pod("x", "a", "n0", ("10.244.0.10",), {"pod": "a"}, (HTTP,)))
    engine.set_pod(Pod("x", "b", "n1", ("10.244.1.10",), {"pod": "b"}))
    engine.set_pod(Pod("y", "c", "n1", ("10.244.1.11",), {"pod": "c"}))
    return engine


def test_drain_reports_creations_updates_and_deletions() -> None:
    engine = make_engine()
    # no policy: every scheduled endpoint pod is known, none is isolated
    known = engine.drain_changes()
    assert set(known) == {"endpoints/n0/x/a", "endpoints/n1/x/b", "endpoints/n1/y/c"}
    assert all(v is not None and v["ingress"] == v["egress"] == [] for v in known.values())
    engine.set_policy(policy("deny", {"podSelector": {"matchLabels": {"pod": "a"}}}))
    first = engine.drain_changes()
    assert set(first) == {"policies/x/deny", "endpoints/n0/x/a"}
    assert engine.drain_changes() == {}
    engine.remove_policy("x", "deny")
    assert engine.drain_changes() == {"policies/x/deny": None, "endpoints/n0/x/a": known["endpoints/n0/x/a"]}
    assert dict(engine.desired()) == known


def test_sets_live_while_referenced_and_are_shared() -> None:
    engine = make_engine()
    peer = {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}
    engine.set_policy(policy("p1", {"podSelector": {}, "ingress": [peer]}))
    engine.set_policy(policy("p2", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [peer]}))
    sets = [k for k in engine.desired() if k.startswith("sets/")]
    assert len(sets) == 1
    assert engine.desired()[sets[0]]["members"] == ["10.244.1.11"]
    engine.remove_policy("x", "p1")
    assert sets[0] in engine.desired()
    engine.remove_policy("x", "p2")
    assert sets[0] not in engine.desired()


def test_namespace_changes_move_pods_in_and_out_of_namespace_selector_sets() -> None:
    engine = make_engine()
    engine.set_policy(
        policy(
            "p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]}
        )
    )
    (set_key,) = (k for k in engine.desired() if k.startswith("sets/"))
    assert engine.desired()[set_key]["members"] == ["10.244.0.10", "10.244.1.10"]
    engine.set_namespace(Namespace("y", {"team": "red"}))
    assert engine.desired()[set_key]["members"] == ["10.244.0.10", "10.244.1.10", "10.244.1.11"]
    engine.remove_namespace("x")  # pods of an unknown namespace match no namespace selector
    assert engine.desired()[set_key]["members"] == ["10.244.1.11"]
    engine.set_namespace(Namespace("x", {"team": "red"}))
    assert engine.desired()[set_key]["members"] == ["10.244.0.10", "10.244.1.10", "10.244.1.11"]


def test_pod_lifecycle_updates_endpoints() -> None:
    engine = make_engine()
    engine.set_policy(policy("deny", {"podSelector": {}}))
    engine.drain_changes()
    engine.set_pod(Pod("x", "a", "n0", ("10.244.0.10",), {"pod": "a"}, (HTTP,), phase="Succeeded"))
    assert engine.drain_changes() == {"endpoints/n0/x/a": None}
    engine.set_pod(Pod("x", "a", "n2", ("10.244.2.10",), {"pod": "a"}, (HTTP,)))
    changes = engine.drain_changes()
    assert set(changes) == {"endpoints/n2/x/a"}
    engine.set_pod(Pod("x", "a", "n3", ("10.244.2.10",), {"pod": "a"}, (HTTP,)))
    assert set(engine.drain_changes()) == {"endpoints/n2/x/a", "endpoints/n3/x/a"}
    engine.remove_pod("x", "a")
    assert engine.drain_changes() == {"endpoints/n3/x/a": None}
    engine.remove_pod("x", "nonexistent")
    engine.remove_policy("x", "nonexistent")
    engine.remove_namespace("nonexistent")
    assert engine.drain_changes() == {}


def test_policy_view_lists_endpoints_nodes_and_relevant_keys() -> None:
    engine = make_engine()
    engine.set_policy(
        policy(
            "p",
            {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]},
        )
    )
    view = engine.policy_view("x", "p")
    assert view is not None
    assert [(e.namespace, e.name) for e in view.endpoints] == [("x", "a"), ("x", "b")]
    assert view.nodes == {"n0", "n1"}
    (set_key,) = (k for k in engine.desired() if k.startswith("sets/"))
    assert view.relevant_keys == {"policies/x/p", set_key, "endpoints/n0/x/a", "endpoints/n1/x/b"}
    assert view.warnings == ()
    assert engine.policy_view("x", "missing") is None


def test_policies_affected_by_includes_policies_that_stopped_selecting_a_pod() -> None:
    engine = make_engine()
    engine.set_policy(policy("pa", {"podSelector": {"matchLabels": {"pod": "a"}}}))
    engine.set_policy(policy("all", {"podSelector": {}}))
    engine.drain_changes()
    engine.set_pod(Pod("x", "a", "n0", ("10.244.0.10",), {"pod": "z"}, (HTTP,)))
    changes = engine.drain_changes()
    assert set(changes) == {"endpoints/n0/x/a"}
    assert engine.policies_affected_by(changes) == {("x", "pa"), ("x", "all")}
    assert engine.policies_affected_by(["policies/x/gone"]) == {("x", "gone")}


def test_warnings_point_at_likely_mistakes() -> None:
    engine = make_engine()
    engine.set_pod(Pod("x", "web", "n0", ("10.244.0.20",), {"app": "web"}, (HTTP,)))
    engine.set_policy(
        policy(
            "odd",
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"pod": "nobody"}}}]},
                    {"ports": [{"port": "metrics"}]},
                    {"from": [{"podSelector": {"matchLabels": {"pod": "nobody"}}}]},
                    {"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.0.0/24"]}}]},
                ],
                "egress": [
                    {"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "http"}]},
                    {"to": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]},
                ],
            },
        )
    )
    view = engine.policy_view("x", "odd")
    assert view is not None
    assert view.warnings == (
        "spec.ingress[0].from[0]: selects no pods",
        "spec.ingress[1].ports[0]: named port metrics/TCP is not declared by any selected pod",
        "spec.ingress[2] duplicates spec.ingress[0]",
        "spec.ingress[2].from[0]: selects no pods",
        "spec.ingress[3].from[0].ipBlock 10.244.0.0/16 covers pod addresses (e.g. x/b 10.244.1.10); "
        "it is enforced as written, by address",
        "spec.egress[0].ports[0]: named port http/TCP is not declared by any peer pod",
    )


def test_warnings_for_empty_selection_and_ignored_rules() -> None:
    engine = make_engine()
    engine.set_policy(
        policy(
            "none",
            {"podSelector": {"matchLabels": {"pod": "ghost"}}, "policyTypes": ["Egress"], "ingress": [{}]},
        )
    )
    view = engine.policy_view("x", "none")
    assert view is not None
    assert view.endpoints == () and view.nodes == frozenset()
    assert view.warnings == (
        "spec.ingress is ignored: policyTypes does not include Ingress",
        "spec.podSelector selects no pods",
    )
    quiet = engine.policy_view("x", "none", with_warnings=False)
    assert quiet is not None and quiet.warnings == ()
