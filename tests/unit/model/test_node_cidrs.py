"""``nodes/<node>``: the controller publishes each Node's pod CIDRs (agents with ``--pod-cidrs=auto``
read their own), and the key matters to that node only (model/relevance.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.enforcement import ModelDecodeError, NodeNetwork
from netfence.model.relevance import (
    NodeUses,
    classify,
    commit_relevant,
    key_relevant,
    needed_revisions,
    node_revisions,
)
from netfence.model.world import Node, Pod, node_from_k8s


def node_body(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": "1"}, "spec": spec or {}}


# --- parsing -----------------------------------------------------------------------------------


def test_node_parsing_takes_pod_cidrs_then_pod_cidr() -> None:
    dual = node_from_k8s(node_body("n1", {"podCIDR": "10.244.1.0/24",
                                          "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]}))
    assert dual == Node("n1", ("10.244.1.0/24", "fd00:10:244:1::/64"))
    assert node_from_k8s(node_body("n1", {"podCIDR": "10.244.1.0/24"})).pod_cidrs == ("10.244.1.0/24",)
    assert node_from_k8s(node_body("n1", {"podCIDRs": []})).pod_cidrs == ()
    assert node_from_k8s(node_body("n1")) == Node("n1")
    assert node_from_k8s({"metadata": {"name": "n1"}, "spec": None}) == Node("n1")
    # canonical form, duplicates once
    assert node_from_k8s(node_body("n1", {"podCIDRs": ["fd00:0:0:0::/64", "fd00::/64"]})).pod_cidrs == ("fd00::/64",)


def test_a_malformed_pod_cidr_is_skipped_never_widened() -> None:
    node = node_from_k8s(node_body("n1", {"podCIDRs": ["10.244.1.0/24", "10.244.2.7/16", "bogus", 7, "10.9.9.9"]}))
    assert node.pod_cidrs == ("10.244.1.0/24",)  # a host-bits value is not read as 10.244.0.0/16
    assert node.invalid == ("10.244.2.7/16", "bogus", "7", "10.9.9.9")


def test_node_network_value_round_trips_and_rejects_bad_values() -> None:
    value = NodeNetwork(("10.244.1.0/24", "fd00::/64"))
    assert value.to_json() == {"schema": 1, "podCIDRs": ["10.244.1.0/24", "fd00::/64"]}
    assert NodeNetwork.from_json(json.loads(json.dumps(value.to_json()))) == value
    for bad in ({"schema": 1}, {"schema": 1, "podCIDRs": []}, {"schema": 1, "podCIDRs": "10.0.0.0/8"},
                {"schema": 1, "podCIDRs": ["10.0.0.1/8"]}, {"schema": 1, "podCIDRs": [None]}, ["x"], None):
        with pytest.raises(ModelDecodeError):
            NodeNetwork.from_json(bad)


# --- the engine ----------------------------------------------------------------------------------


def test_engine_writes_one_key_per_node_with_cidrs_and_deletes_it_when_they_go() -> None:
    engine = ModelEngine()
    engine.set_node(Node("n1", ("10.244.1.0/24",)))
    engine.set_node(Node("n2"))  # no CIDRs: no key
    assert engine.drain_changes() == {"nodes/n1": {"schema": 1, "podCIDRs": ["10.244.1.0/24"]}}
    assert dict(engine.desired()) == {"nodes/n1": {"schema": 1, "podCIDRs": ["10.244.1.0/24"]}}

    engine.set_node(Node("n1", ("10.244.1.0/24",)))  # another change of the Node (its status): nothing
    assert engine.drain_changes() == {}

    engine.set_node(Node("n2", ("10.244.2.0/24", "fd00:2::/64")))
    engine.set_node(Node("n1", ("10.244.9.0/24",)))
    assert engine.drain_changes() == {
        "nodes/n1": {"schema": 1, "podCIDRs": ["10.244.9.0/24"]},
        "nodes/n2": {"schema": 1, "podCIDRs": ["10.244.2.0/24", "fd00:2::/64"]},
    }

    engine.set_node(Node("n1"))  # lost its CIDRs
    engine.remove_node("n2")  # the Node went
    engine.remove_node("n3")  # never known: nothing
    assert engine.drain_changes() == {"nodes/n1": None, "nodes/n2": None}
    assert dict(engine.desired()) == {}

    engine.set_node(Node("n1", ("10.244.1.0/24",)))
    engine.remove_node("n1")  # undone before the drain: nothing to write
    assert engine.drain_changes() == {}


def test_engine_equals_the_full_compile_with_nodes() -> None:
    nodes = [Node("n1", ("10.244.1.0/24",)), Node("n2"), Node("n3", ("fd00:3::/64",))]
    pods = [Pod("app", "web", node="n1", ips=("10.244.1.5",))]
    engine = ModelEngine()
    for node in nodes:
        engine.set_node(node)
    for pod in pods:
        engine.set_pod(pod)
    assert dict(engine.desired()) == compile_world(pods, [], [], nodes=nodes)
    assert "nodes/n1" in engine.desired() and "nodes/n2" not in engine.desired()
    # node keys affect no policy's status
    assert engine.policies_affected_by(["nodes/n1"]) == set()


# --- relevance -------------------------------------------------------------------------------------


def test_a_node_key_matters_to_its_own_node_only() -> None:
    assert classify("nodes/node-1") == ("node", "node-1")
    assert classify("nodes/") == ("node", None) and classify("nodes/a/b") == ("node", None)
    mine, other = NodeUses("node-1"), NodeUses("node-2")
    assert key_relevant("nodes/node-1", mine)
    assert not key_relevant("nodes/node-1", other)
    assert not key_relevant("nodes/node-10", mine)
    assert commit_relevant(["nodes/node-1", "meta/observed"], mine, mine)
    assert not commit_relevant(["nodes/node-2", "meta/observed"], mine, mine)


def test_node_keys_count_for_their_node_in_revisions() -> None:
    revisions = {"policies/ns/p": 3, "endpoints/n1/ns/a": 4, "nodes/n1": 9, "nodes/n2": 2}
    got = node_revisions(revisions, revisions.__getitem__, ["n1", "n2", "n3"])
    assert got == {"n1": 9, "n2": 3, "n3": 3}
    values = {"nodes/n1": b'{"schema":1,"podCIDRs":["10.244.1.0/24"]}', "nodes/n2": b"corrupt",
              "meta/observed": b'{"schema":1}'}
    mods = {"nodes/n1": 5, "nodes/n2": 8, "meta/observed": 20}
    assert needed_revisions(values, mods, ["n1", "n2", "n3"]) == {"n1": 5, "n2": 8, "n3": 0}
