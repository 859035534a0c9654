"""Small worlds for the explain tests: compiled as the controller does, decoded per node as agents do."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from netfence.agent.node_state import NodeState
from netfence.explain.trace import Connection, Party
from netfence.model.compiler import compile_world
from netfence.model.enforcement import NodeModel, Protocol
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s

Obj = dict[str, Any]

NAMESPACES: dict[str, dict[str, str]] = {
    "x": {"ns": "x", "kubernetes.io/metadata.name": "x"},
    "y": {"ns": "y", "team": "red", "kubernetes.io/metadata.name": "y"},
}
# namespace, name, node, ip, labels, declared ports (name, port, protocol)
PODS: list[tuple[str, str, str, str, dict[str, str], list[tuple[str, int, str]]]] = [
    ("x", "a", "n0", "10.244.0.10", {"pod": "a"}, [("http", 80, "TCP")]),
    ("x", "b", "n0", "10.244.0.11", {"pod": "b"}, []),
    ("y", "a", "n1", "10.244.1.10", {"pod": "a"}, [("http", 8080, "TCP")]),
]


def namespace_body(name: str, labels: dict[str, str]) -> Obj:
    return {"metadata": {"name": name, "labels": labels}}


def pod_body(ns: str, name: str, node: str, ip: str, labels: dict[str, str],
             ports: list[tuple[str, int, str]]) -> Obj:
    return {
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [
            {"name": "c", "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    }


def policy(ns: str, name: str, spec: Obj) -> Obj:
    return {"metadata": {"namespace": ns, "name": name, "uid": f"uid-{name}", "generation": 1}, "spec": spec}


def encoded(desired: dict[str, Obj]) -> dict[str, bytes]:
    return {key: json.dumps(value).encode() for key, value in desired.items()}


def node_models(policies: Iterable[Obj], nodes: Iterable[str] = ("n0", "n1")) -> dict[str, NodeModel]:
    """Every node's model from the default world plus ``policies``, via the agent's NodeState."""
    desired = compile_world(
        [pod_from_k8s(pod_body(*p)) for p in PODS],
        [namespace_from_k8s(namespace_body(n, labels)) for n, labels in NAMESPACES.items()],
        [policy_from_k8s(p) for p in policies],
    )
    values = encoded(desired)
    out = {}
    for node in nodes:
        state = NodeState(node)
        state.reset(values)
        out[node] = state.model()
    return out


def party(key: str) -> Party:
    """A pod of the default world by ``ns/name``, or an address."""
    for ns, name, node, ip, labels, _ in PODS:
        if f"{ns}/{name}" == key:
            return Party(ip, ns, name, node, labels, NAMESPACES[ns])
    return Party(key)


def connection(src: str, dst: str, port: int = 80, protocol: Protocol = "TCP") -> Connection:
    return Connection(party(src), party(dst), port, protocol)
