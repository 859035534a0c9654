"""ClusterNetworkPolicy: parsing (fail closed), compilation, and the incremental engine.

The property test drives the engine through random sequences of pod,
namespace, NetworkPolicy and ClusterNetworkPolicy changes and checks it equals
the from-scratch compiler; the cost test checks a label change re-evaluates
only the cluster-policy selectors that reference the changed key.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from model_worlds import NAMESPACE_NAMES, cluster_st, labels_st, namespace_body, pod_st, selector_st
from test_equivalence import World, apply_changes, step

from netfence.model.cluster_policy import (
    ClusterPolicy,
    cluster_policy_from_k8s,
    compile_cluster_policy,
)
from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.enforcement import CompiledClusterPolicy, Endpoint
from netfence.model.selectors import PolicyError
from netfence.model.world import Namespace, Pod, namespace_from_k8s, pod_from_k8s, policy_from_k8s

Obj = dict[str, Any]


def cnp(name: str, tier: str = "Admin", priority: int = 10, subject: Obj | None = None, **spec: Any) -> Obj:
    body: Obj = {"tier": tier, "priority": priority, "subject": subject or {"namespaces": {}}}
    body.update(spec)
    return {"metadata": {"name": name, "uid": f"u-{name}", "generation": 1}, "spec": body}


# ---- parsing: table-driven ------------------------------------------------------------

ACCEPTED = [
    (
        "namespaces peer, tcp port",
        {"ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}],
                      "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]},
        "ingress",
        {"action": "Deny", "ports": [{"protocol": "TCP", "port": 80}]},
    ),
    (
        "pods peer, udp range",
        {"ingress": [{"action": "Accept", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}],
                      "protocols": [{"udp": {"destinationPort": {"range": {"start": 80, "end": 81}}}}]}]},
        "ingress",
        {"action": "Accept", "ports": [{"protocol": "UDP", "port": 80, "endPort": 81}]},
    ),
    (
        "egress networks, no protocols",
        {"egress": [{"action": "Pass", "to": [{"networks": ["10.244.1.0/24", "10.244.0.0/24"]}]}]},
        "egress",
        {"action": "Pass", "ports": None},
    ),
]


@pytest.mark.parametrize(("what", "spec", "direction", "expected"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_supported_rules_compile_without_notes(what: str, spec: Obj, direction: str, expected: Obj) -> None:
    policy = cluster_policy_from_k8s(cnp("p", **spec))
    assert policy.notes == ()
    compiled = compile_cluster_policy(policy).compiled
    (rule,) = compiled.rules(direction)
    out = rule.to_json()
    assert out["action"] == expected["action"]
    assert out["ports"] == expected["ports"]
    assert out["peers"] and len(out["peers"]) >= 1


def test_networks_compile_to_one_net_set_per_cidr() -> None:
    policy = cluster_policy_from_k8s(
        cnp("p", egress=[{"action": "Deny", "to": [{"networks": ["10.244.1.0/24", "10.244.0.0/24"]}]}])
    )
    compilation = compile_cluster_policy(policy)
    assert sorted(spec.definition()["cidr"] for spec in compilation.sets.values()) == [
        "10.244.0.0/24",
        "10.244.1.0/24",
    ]


FAIL_CLOSED = [
    # (what, rule, direction, expected action, expected peers None?, expected peers empty?, note fragment)
    ("deny with nodes peer", {"action": "Deny", "to": [{"nodes": {}}]}, "egress", "Deny", True, False, "nodes"),
    ("pass with domainNames", {"action": "Pass", "to": [{"domainNames": ["a.example"]}]}, "egress", "Deny",
     True, False, "domainNames"),
    ("accept with nodes peer", {"action": "Accept", "to": [{"nodes": {}}]}, "egress", "Accept", False, True,
     "does not match"),
    ("accept with empty peer", {"action": "Accept", "from": [{}]}, "ingress", "Accept", False, True,
     "exactly one"),
    ("deny with empty peer", {"action": "Deny", "from": [{}]}, "ingress", "Deny", True, False, "Deny all"),
    ("networks in ingress", {"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}, "ingress", "Deny",
     True, False, "not supported"),
    ("unknown action", {"action": "Allow", "from": [{"namespaces": {}}]}, "ingress", "Deny", True, False,
     "not Accept"),
    ("deny with unknown protocol", {"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"icmp": {}}]},
     "ingress", "Deny", True, False, "icmp"),
]


@pytest.mark.parametrize(
    ("what", "rule", "direction", "action", "any_peer", "no_peer", "note"),
    FAIL_CLOSED,
    ids=[f[0] for f in FAIL_CLOSED],
)
def test_unsupported_parts_fail_closed(
    what: str, rule: Obj, direction: str, action: str, any_peer: bool, no_peer: bool, note: str
) -> None:
    policy = cluster_policy_from_k8s(cnp("p", ingress=[rule]) if direction == "ingress" else cnp("p", egress=[rule]))
    (compiled,) = compile_cluster_policy(policy).compiled.rules(direction)
    assert compiled.action == action
    assert (compiled.match.peers is None) == any_peer
    assert (compiled.match.peers == ()) == no_peer
    if any_peer:
        assert compiled.match.ports is None  # Deny all: never narrower than written
    assert len(policy.notes) == 1 and note in policy.notes[0]


def test_accept_keeps_supported_peers_next_to_an_unsupported_one() -> None:
    policy = cluster_policy_from_k8s(
        cnp("p", egress=[{"action": "Accept", "to": [{"nodes": {}}, {"namespaces": {"matchLabels": {"ns": "y"}}}]}])
    )
    (rule,) = compile_cluster_policy(policy).compiled.egress
    assert rule.match.peers is not None and len(rule.match.peers) == 1
    assert len(policy.notes) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"tier": "Other", "priority": 1, "subject": {"namespaces": {}}}, "spec.tier"),
        ({"tier": "Admin", "priority": 1001, "subject": {"namespaces": {}}}, "spec.priority"),
        ({"tier": "Admin", "priority": 1, "subject": {}}, "spec.subject"),
        ({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"a": "b c"}}}}, "subject"),
    ],
)
def test_policies_that_cannot_be_understood_raise_naming_the_field(spec: Obj, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        cluster_policy_from_k8s({"metadata": {"name": "p"}, "spec": spec})


def test_compiled_policy_round_trips_through_json() -> None:
    policy = cluster_policy_from_k8s(
        cnp(
            "p",
            tier="Baseline",
            priority=3,
            ingress=[{"name": "r1", "action": "Deny", "from": [{"namespaces": {}}]}],
            egress=[{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}],
                     "protocols": [{"sctp": {"destinationPort": {"number": 9}}}]}],
        )
    )
    compiled = compile_cluster_policy(policy).compiled
    assert CompiledClusterPolicy.from_json(compiled.to_json()) == compiled


def test_endpoint_json_without_cluster_policies_is_unchanged() -> None:
    endpoint = Endpoint("n0", "x", "a", ("10.0.0.1",), ("x/p",), ())
    assert set(endpoint.to_json()) == {"schema", "node", "namespace", "name", "ips", "ingress", "egress"}
    tiered = Endpoint("n0", "x", "a", ("10.0.0.1",), (), (), admin_ingress=("c1", "c2"), baseline_egress=("b",))
    assert Endpoint.from_json(tiered.to_json()) == tiered


# ---- the engine -----------------------------------------------------------------------


def test_endpoint_lists_admin_policies_by_priority_then_name() -> None:
    engine = ModelEngine()
    engine.set_namespace(Namespace("x", {"kubernetes.io/metadata.name": "x"}))
    engine.set_pod(Pod("x", "a", "n0", ("10.244.0.10",), {"pod": "a"}))
    deny = [{"action": "Deny", "from": [{"namespaces": {}}]}]
    for name, priority in (("zz", 1), ("aa", 5), ("bb", 1)):
        engine.set_cluster_policy(cluster_policy_from_k8s(cnp(name, priority=priority, ingress=deny)))
    engine.set_cluster_policy(cluster_policy_from_k8s(cnp("base", tier="Baseline", priority=0, egress=deny)))
    value = engine.desired()["endpoints/n0/x/a"]
    assert value["adminIngress"] == ["bb", "zz", "aa"]
    assert value["baselineEgress"] == ["base"]
    assert "adminEgress" not in value and value["ingress"] == []


def test_subject_only_set_is_not_written() -> None:
    engine = ModelEngine()
    engine.set_namespace(Namespace("x", {"kubernetes.io/metadata.name": "x"}))
    engine.set_pod(Pod("x", "a", "n0", ("10.244.0.10",), {"pod": "a"}))
    engine.set_cluster_policy(
        cluster_policy_from_k8s(
            cnp("c", subject={"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
                egress=[{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}]}])
        )
    )
    keys = sorted(engine.desired())
    assert [k for k in keys if k.startswith("sets/")] and all(
        engine.desired()[k]["kind"] == "net" for k in keys if k.startswith("sets/")
    )
    engine.remove_cluster_policy("c")
    # only the pod's own (unselected) endpoint record remains: no set, no policy
    assert list(engine.desired()) == ["endpoints/n0/x/a"]
    assert engine.desired()["endpoints/n0/x/a"]["egress"] == []


CLUSTER_COUNT = 200


def test_label_change_reevaluates_only_cluster_selectors_that_reference_the_key() -> None:
    engine = ModelEngine()
    engine.set_namespace(Namespace("apps", {"kubernetes.io/metadata.name": "apps"}))
    for i in range(20):
        engine.set_pod(Pod("apps", f"p{i}", "n0", (f"10.244.0.{10 + i}",), {"app": "x"}))
    for i in range(CLUSTER_COUNT):
        engine.set_cluster_policy(
            cluster_policy_from_k8s(
                cnp(f"c{i}", priority=i % 1000,
                    subject={"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {f"role{i}": "x"}}}},
                    ingress=[{"action": "Deny",
                              "from": [{"pods": {"namespaceSelector": {},
                                                 "podSelector": {"matchLabels": {f"peer{i}": "x"}}}}]}])
            )
        )
    engine.drain_changes()
    engine.selector_evaluations = 0
    engine.set_pod(Pod("apps", "p3", "n0", ("10.244.0.13",), {"app": "x", "role7": "x"}))
    changes = engine.drain_changes()
    assert engine.selector_evaluations == 1  # the subject selector of c7, nothing else
    assert set(changes) == {"endpoints/n0/apps/p3"}
    assert changes["endpoints/n0/apps/p3"]["adminIngress"] == ["c7"]  # type: ignore[index]


# ---- property: the engine equals the full compiler ------------------------------------


@st.composite
def cnp_peer_st(draw: st.DrawFn, egress: bool) -> Obj:
    kinds = ["namespaces", "pods", "pods"] + (["networks"] if egress else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "namespaces":
        return {"namespaces": draw(selector_st())}
    if kind == "pods":
        return {"pods": {"namespaceSelector": draw(selector_st()), "podSelector": draw(selector_st())}}
    return {"networks": draw(st.lists(st.sampled_from(["10.244.0.0/24", "10.244.1.8/29", "fd00::/64"]),
                                      min_size=1, max_size=2, unique=True))}


@st.composite
def cnp_rule_st(draw: st.DrawFn, egress: bool) -> Obj:
    rule: Obj = {
        "action": draw(st.sampled_from(["Accept", "Deny", "Pass"])),
        "to" if egress else "from": draw(st.lists(cnp_peer_st(egress), min_size=1, max_size=2)),
    }
    if draw(st.booleans()):
        rule["protocols"] = draw(
            st.lists(
                st.sampled_from([
                    {"tcp": {"destinationPort": {"number": 80}}},
                    {"udp": {"destinationPort": {"range": {"start": 53, "end": 81}}}},
                    {"destinationNamedPort": "http"},
                ]),
                min_size=1,
                max_size=2,
            )
        )
    return rule


@st.composite
def cnp_st(draw: st.DrawFn, name: str) -> Obj:
    subject: Obj
    if draw(st.booleans()):
        subject = {"namespaces": draw(selector_st())}
    else:
        subject = {"pods": {"namespaceSelector": draw(selector_st()), "podSelector": draw(selector_st())}}
    return cnp(
        name,
        tier=draw(st.sampled_from(["Admin", "Baseline"])),
        priority=draw(st.integers(0, 3)),
        subject=subject,
        ingress=draw(st.lists(cnp_rule_st(False), max_size=2)),
        egress=draw(st.lists(cnp_rule_st(True), max_size=2)),
    )


class ClusterWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.cluster: dict[str, ClusterPolicy] = {}

    def compile(self) -> dict[str, dict[str, Any]]:
        return compile_world(
            self.pods.values(), self.namespaces.values(), self.policies.values(), self.cluster.values()
        )


def cluster_step(data: st.DataObject, engine: ModelEngine, world: ClusterWorld) -> None:
    operation = data.draw(st.sampled_from(["set_cnp", "set_cnp", "remove_cnp", "relabel_ns", "other"]))
    if operation == "set_cnp":
        policy = cluster_policy_from_k8s(data.draw(cnp_st(data.draw(st.sampled_from(["c0", "c1", "c2"])))))
        engine.set_cluster_policy(policy)
        world.cluster[policy.name] = policy
    elif operation == "remove_cnp" and world.cluster:
        name = data.draw(st.sampled_from(sorted(world.cluster)))
        engine.remove_cluster_policy(name)
        del world.cluster[name]
    elif operation == "relabel_ns":
        namespace = namespace_from_k8s(namespace_body(data.draw(st.sampled_from(NAMESPACE_NAMES)),
                                                      data.draw(labels_st)))
        engine.set_namespace(namespace)
        world.namespaces[namespace.name] = namespace
    else:
        step(data, engine, world)


@settings(max_examples=50, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_engine_with_cluster_policies_equals_full_compile(data: st.DataObject) -> None:
    engine = ModelEngine()
    world = ClusterWorld()
    namespaces, pods, policies = data.draw(cluster_st())
    for body in namespaces:
        ns = namespace_from_k8s(body)
        engine.set_namespace(ns)
        world.namespaces[ns.name] = ns
    for body in pods:
        pod = pod_from_k8s(body)
        engine.set_pod(pod)
        world.pods[pod.key] = pod
    for body in policies:
        policy = policy_from_k8s(body)
        engine.set_policy(policy)
        world.policies[policy.key] = policy
    applied: dict[str, dict[str, Any]] = {}
    for _ in range(data.draw(st.integers(1, 16))):
        cluster_step(data, engine, world)
        if data.draw(st.booleans()):
            apply_changes(applied, engine.drain_changes())
            assert applied == world.compile()
    if data.draw(st.booleans()):
        extra = pod_from_k8s(data.draw(pod_st(9)))
        engine.set_pod(extra)
        world.pods[extra.key] = extra
    expected = world.compile()
    assert dict(engine.desired()) == expected
    apply_changes(applied, engine.drain_changes())
    assert applied == expected
    for name in world.cluster:
        view = engine.cluster_policy_view(name)
        assert view is not None
        assert all(k in expected for k in view.relevant_keys if not k.startswith("sets/") or k in expected)
