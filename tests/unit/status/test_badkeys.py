"""Bad key -> affected policies (the report-field contract in docs/design.md), table-driven."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from netfence.model.compiler import ModelEngine
from netfence.model.peersets import set_key
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s
from netfence.status.aggregate import BadKey, BadKeyHit, NodeReport
from netfence.status.badkeys import affected_policies, bad_key_hits, set_id_of

PolicyKey = tuple[str, str]


class Lookup:
    """A fixed model: set p1 is referenced by ns/a, ns/b and the cluster policy cnp, set n2 by ns/c;
    pod ns/web is selected by ns/a."""

    sets: dict[str, set[PolicyKey]] = {"p1": {("ns", "a"), ("ns", "b"), ("", "cnp")}, "n2": {("ns", "c")}}
    pods: dict[PolicyKey, set[PolicyKey]] = {("ns", "web"): {("ns", "a")}}

    def set_policies(self, set_id: str) -> Iterable[PolicyKey]:
        return self.sets.get(set_id, set())

    def endpoint_policies(self, namespace: str, name: str) -> Iterable[PolicyKey]:
        return self.pods.get((namespace, name), set())


MAPPING = [
    ("policies/ns/a", {("ns", "a")}),
    ("policies/other/unknown", {("other", "unknown")}),  # not in the model: the writer ignores it
    ("policies/ns", set()),
    ("policies/ns/", set()),
    ("policies//a", set()),
    ("policies/ns/a/extra", set()),
    ("cpolicies/deny-all", {("", "deny-all")}),  # a ClusterNetworkPolicy: ("", name) as everywhere
    ("cpolicies/", set()),
    ("cpolicies/a/b", set()),
    ("sets/p1", {("ns", "a"), ("ns", "b"), ("", "cnp")}),
    ("sets/n2", {("ns", "c")}),
    ("sets/unknown", set()),
    ("sets/", set()),
    ("sets/p1/0", set()),  # schema 1 sets have no chunks
    ("sets2/p1", {("ns", "a"), ("ns", "b"), ("", "cnp")}),
    ("sets2/p1/0", {("ns", "a"), ("ns", "b"), ("", "cnp")}),
    ("sets2/n2/15", {("ns", "c")}),
    ("sets2/p1/x", set()),
    ("sets2/p1/0/1", set()),
    ("sets2/", set()),
    ("endpoints/node-0/ns/web", {("ns", "a")}),
    ("endpoints/node-1/ns/web", {("ns", "a")}),  # the policies select the pod wherever the key says it runs
    ("endpoints/node-0/ns/other", set()),
    ("endpoints/node-0/ns", set()),
    ("endpoints//ns/web", set()),
    ("endpoints/node-0/ns/web/x", set()),
    ("meta/schema", set()),
    ("commit", set()),
    ("", set()),
]


@pytest.mark.parametrize(("key", "expected"), MAPPING, ids=[k or "empty" for k, _ in MAPPING])
def test_bad_key_maps_to_policies(key: str, expected: set[PolicyKey]) -> None:
    assert affected_policies(key, Lookup()) == expected


@pytest.mark.parametrize(
    ("key", "sid"),
    [("sets/p1", "p1"), ("sets2/p1", "p1"), ("sets2/p1/3", "p1"), ("sets2/p1/٣", None), ("policies/a/b", None)],
)
def test_set_id_of(key: str, sid: str | None) -> None:
    assert set_id_of(key) == sid


def test_hits_are_grouped_by_policy_in_node_order() -> None:
    reports = {
        "n2": NodeReport("n2", 1, bad_keys=(BadKey("sets2/p1/0", "not JSON"),)),
        "n1": NodeReport("n1", 1, bad_keys=(BadKey("policies/ns/a", "foreign write"), BadKey("meta/x"))),
        "n3": NodeReport("n3", 1),
    }
    assert bad_key_hits(reports, Lookup()) == {
        ("ns", "a"): [BadKeyHit("n1", "policies/ns/a", "foreign write"), BadKeyHit("n2", "sets2/p1/0", "not JSON")],
        ("ns", "b"): [BadKeyHit("n2", "sets2/p1/0", "not JSON")],
        ("", "cnp"): [BadKeyHit("n2", "sets2/p1/0", "not JSON")],
    }


def test_the_model_engine_answers_the_lookups() -> None:
    engine = ModelEngine()
    engine.set_namespace(namespace_from_k8s({"metadata": {"name": "ns", "labels": {}}}))
    engine.set_pod(pod_from_k8s({
        "metadata": {"namespace": "ns", "name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-0"}, "status": {"podIP": "10.0.0.1", "phase": "Running"},
    }))
    engine.set_policy(policy_from_k8s({
        "metadata": {"namespace": "ns", "name": "a"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "x"}}}]}]},
    }))
    engine.set_policy(policy_from_k8s({
        "metadata": {"namespace": "ns", "name": "b"},
        "spec": {"podSelector": {"matchLabels": {"app": "none"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "x"}}}]}]},
    }))
    engine.drain_changes()
    sets = [key.removeprefix("sets/") for key in engine.desired() if key.startswith("sets/")]
    assert len(sets) == 1  # both policies admit role=x: one shared set
    assert affected_policies(set_key(sets[0]), engine) == {("ns", "a"), ("ns", "b")}
    assert affected_policies(f"sets2/{sets[0]}/1", engine) == {("ns", "a"), ("ns", "b")}
    assert affected_policies("endpoints/node-0/ns/web", engine) == {("ns", "a")}
    assert affected_policies("endpoints/node-0/ns/nobody", engine) == set()
    engine.remove_policy("ns", "a")
    assert affected_policies("endpoints/node-0/ns/web", engine) == set()
    assert affected_policies(set_key(sets[0]), engine) == {("ns", "b")}


def test_the_model_engine_answers_the_lookups_for_cluster_policies() -> None:
    from netfence.model.cluster_policy import cluster_policy_from_k8s

    engine = ModelEngine()
    engine.set_namespace(namespace_from_k8s({"metadata": {"name": "ns", "labels": {}}}))
    engine.set_pod(pod_from_k8s({
        "metadata": {"namespace": "ns", "name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-0"}, "status": {"podIP": "10.0.0.1", "phase": "Running"},
    }))
    engine.set_cluster_policy(cluster_policy_from_k8s({
        "metadata": {"name": "deny-x"},
        "spec": {"tier": "Admin", "priority": 1,
                 "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
                 "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {},
                                                                    "podSelector": {"matchLabels": {"role": "x"}}}}]}]},
    }))
    engine.drain_changes()
    sets = [key.removeprefix("sets/") for key in engine.desired() if key.startswith("sets/")]
    assert len(sets) == 1
    assert affected_policies(set_key(sets[0]), engine) == {("", "deny-x")}
    assert affected_policies("endpoints/node-0/ns/web", engine) == {("", "deny-x")}
    assert affected_policies("cpolicies/deny-x", engine) == {("", "deny-x")}
