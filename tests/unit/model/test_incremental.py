"""The engine's cost model: one label/IP change touches only what depends on it.

300 policies each use their own label keys (``role<i>`` to select pods,
``peer<i>`` for their ingress peers, ``team<i>`` for a namespace selector).
A single change must produce exactly the affected keys and evaluate only the
selectors that reference a changed key.
"""

from __future__ import annotations

import dataclasses

import pytest

from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.enforcement import PeerSet
from netfence.model.selectors import LabelSelector
from netfence.model.world import Namespace, Pod, policy_from_k8s

POLICIES = 300
PODS = 60


def pod(i: int, **labels: str) -> Pod:
    return Pod(
        "apps", f"p{i}", f"n{i % 2}", (f"10.244.{i % 2}.{10 + i}",), {f"role{i}": "x", f"peer{i}": "x", **labels}
    )


def peer_set_id(i: int) -> str:
    definition = {
        "namespace": "apps",
        "namespaceSelector": None,
        "podSelector": LabelSelector.from_labels({f"peer{i}": "x"}).canonical(),
    }
    return PeerSet.make_id("pods", definition)


def team_set_id(i: int) -> str:
    definition = {
        "namespace": None,
        "namespaceSelector": LabelSelector.from_labels({f"team{i}": "x"}).canonical(),
        "podSelector": LabelSelector().canonical(),
    }
    return PeerSet.make_id("pods", definition)


def policy_body(i: int) -> dict[str, object]:
    return {
        "metadata": {"namespace": "apps", "name": f"pol{i}", "uid": f"u{i}"},
        "spec": {
            "podSelector": {"matchLabels": {f"role{i}": "x"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {f"peer{i}": "x"}}}]},
                {"from": [{"namespaceSelector": {"matchLabels": {f"team{i}": "x"}}}]},
            ],
        },
    }


@pytest.fixture
def engine() -> ModelEngine:
    engine = ModelEngine()
    engine.set_namespace(Namespace("apps", {"kubernetes.io/metadata.name": "apps"}))
    engine.set_namespace(Namespace("other", {"kubernetes.io/metadata.name": "other"}))
    for i in range(PODS):
        engine.set_pod(pod(i))
    engine.set_pod(Pod("other", "o", "n0", ("10.244.0.200",), {"app": "o"}))
    for i in range(POLICIES):
        engine.set_policy(policy_from_k8s(policy_body(i)))
    engine.drain_changes()
    engine.selector_evaluations = 0
    return engine


def endpoint_value(i: int, policies: list[str]) -> dict[str, object]:
    return {
        "schema": 1,
        "node": f"n{i % 2}",
        "namespace": "apps",
        "name": f"p{i}",
        "ips": [f"10.244.{i % 2}.{10 + i}"],
        "ingress": policies,
        "egress": [],
    }


def test_setup_is_a_large_world(engine: ModelEngine) -> None:
    desired = engine.desired()
    assert sum(k.startswith("policies/") for k in desired) == POLICIES
    assert sum(k.startswith("sets/") for k in desired) == 2 * POLICIES
    assert desired["endpoints/n1/apps/p7"] == endpoint_value(7, ["apps/pol7"])


def test_pod_selector_label_change_touches_only_its_endpoint(engine: ModelEngine) -> None:
    # p7 stops matching pol7 (role7 removed) and starts matching pol8 (role8 added)
    engine.set_pod(Pod("apps", "p7", "n1", ("10.244.1.17",), {"role8": "x", "peer7": "x"}))
    changes = engine.drain_changes()
    assert changes == {"endpoints/n1/apps/p7": endpoint_value(7, ["apps/pol8"])}
    # only pol7's and pol8's podSelector reference role7/role8
    assert engine.selector_evaluations == 2
    assert engine.policies_affected_by(changes) == {("apps", "pol7"), ("apps", "pol8")}


def test_peer_label_change_touches_only_the_two_peer_sets(engine: ModelEngine) -> None:
    engine.set_pod(Pod("apps", "p7", "n1", ("10.244.1.17",), {"role7": "x", "peer9": "x"}))
    changes = engine.drain_changes()
    assert set(changes) == {f"sets/{peer_set_id(7)}", f"sets/{peer_set_id(9)}"}
    assert changes[f"sets/{peer_set_id(7)}"]["members"] == []  # type: ignore[index]
    assert changes[f"sets/{peer_set_id(9)}"]["members"] == ["10.244.1.17", "10.244.1.19"]  # type: ignore[index]
    assert engine.selector_evaluations == 2
    assert engine.policies_affected_by(changes) == {("apps", "pol7"), ("apps", "pol9")}


def test_unrelated_label_change_evaluates_nothing(engine: ModelEngine) -> None:
    engine.set_pod(dataclasses.replace(pod(3), labels={**pod(3).labels, "unrelated": "y"}))
    assert engine.drain_changes() == {}
    assert engine.selector_evaluations == 0


def test_namespace_label_change_touches_only_the_matching_namespace_selector_set(engine: ModelEngine) -> None:
    engine.set_namespace(Namespace("other", {"kubernetes.io/metadata.name": "other", "team5": "x"}))
    changes = engine.drain_changes()
    assert changes == {
        f"sets/{team_set_id(5)}": {
            "schema": 1,
            "id": team_set_id(5),
            "kind": "pods",
            "definition": {
                "namespace": None,
                "namespaceSelector": {"matchLabels": {"team5": "x"}, "matchExpressions": []},
                "podSelector": {"matchLabels": {}, "matchExpressions": []},
            },
            "members": ["10.244.0.200"],
        }
    }
    # one namespace selector, then the pod selector for the one pod in that namespace
    assert engine.selector_evaluations == 2
    assert engine.policies_affected_by(changes) == {("apps", "pol5")}


def test_ip_change_touches_only_sets_containing_the_pod_and_its_endpoint(engine: ModelEngine) -> None:
    engine.set_pod(dataclasses.replace(pod(4), ips=("10.244.0.99",)))
    changes = engine.drain_changes()
    assert set(changes) == {f"sets/{peer_set_id(4)}", "endpoints/n0/apps/p4"}
    assert changes[f"sets/{peer_set_id(4)}"]["members"] == ["10.244.0.99"]  # type: ignore[index]
    assert engine.selector_evaluations == 0


def test_change_and_change_back_is_not_reported(engine: ModelEngine) -> None:
    engine.set_pod(Pod("apps", "p7", "n1", ("10.244.1.17",), {"role8": "x"}))
    engine.set_pod(pod(7))
    assert engine.drain_changes() == {}


def test_incremental_state_still_equals_full_compile(engine: ModelEngine) -> None:
    pods = [pod(i) for i in range(PODS)]
    pods[7] = Pod("apps", "p7", "n1", ("10.244.1.17",), {"role8": "x", "peer9": "x"})
    engine.set_pod(pods[7])
    namespaces = [
        Namespace("apps", {"kubernetes.io/metadata.name": "apps"}),
        Namespace("other", {"kubernetes.io/metadata.name": "other", "team5": "x"}),
    ]
    engine.set_namespace(namespaces[1])
    pods.append(Pod("other", "o", "n0", ("10.244.0.200",), {"app": "o"}))
    expected = compile_world(pods, namespaces, [policy_from_k8s(policy_body(i)) for i in range(POLICIES)])
    assert dict(engine.desired()) == expected
