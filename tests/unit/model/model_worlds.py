"""Hypothesis strategies for small random clusters, as raw Kubernetes dicts."""

from __future__ import annotations

from typing import Any, Literal

from hypothesis import strategies as st

Obj = dict[str, Any]

NAMESPACE_NAMES = ["x", "y", "z"]
LABEL_KEYS = ["a", "b", "c"]
LABEL_VALUES = ["1", "2"]
NODES = ["n0", "n1"]
# (name, port, protocol); a pod declares each name at most once
CONTAINER_PORTS: list[tuple[str, int, Literal["TCP", "UDP"]]] = [
    ("http", 80, "TCP"),
    ("http", 81, "TCP"),
    ("alt", 81, "TCP"),
    ("dns", 80, "UDP"),
    ("http", 80, "UDP"),
]
PROBE_PORTS = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (53, "UDP")]
EXTERNAL_ADDRESSES = ["10.244.0.200", "192.168.1.1", "fd00::ff"]
# cidr -> excepts that are strict subsets of it
IP_BLOCKS: dict[str, list[str]] = {
    "10.244.0.0/16": ["10.244.1.0/24", "10.244.0.8/29", "10.244.0.12/32", "10.244.0.0/24"],
    "10.244.0.0/24": ["10.244.0.8/29", "10.244.0.10/31"],
    "10.244.1.8/29": ["10.244.1.10/32", "10.244.1.12/30"],
    "0.0.0.0/0": ["10.244.0.0/16", "192.168.0.0/16"],
    "10.244.0.11/32": [],
    "fd00::/64": ["fd00::/126", "fd00::8/125"],
}

labels_st = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=3)


@st.composite
def expression_st(draw: st.DrawFn) -> Obj:
    key = draw(st.sampled_from(LABEL_KEYS))
    operator = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    out: Obj = {"key": key, "operator": operator}
    if operator in ("In", "NotIn"):
        out["values"] = draw(st.lists(st.sampled_from(LABEL_VALUES), min_size=1, max_size=2))
    return out


@st.composite
def selector_st(draw: st.DrawFn) -> Obj:
    out: Obj = {}
    if draw(st.booleans()):
        out["matchLabels"] = draw(
            st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=2)
        )
    if draw(st.booleans()):
        out["matchExpressions"] = draw(st.lists(expression_st(), max_size=2))
    return out


@st.composite
def peer_st(draw: st.DrawFn) -> Obj:
    kind = draw(st.sampled_from(["pod", "namespace", "both", "both", "ipBlock"]))
    if kind == "pod":
        return {"podSelector": draw(selector_st())}
    if kind == "namespace":
        return {"namespaceSelector": draw(selector_st())}
    if kind == "both":
        return {"podSelector": draw(selector_st()), "namespaceSelector": draw(selector_st())}
    cidr = draw(st.sampled_from(sorted(IP_BLOCKS)))
    block: Obj = {"cidr": cidr}
    excepts = draw(st.lists(st.sampled_from(IP_BLOCKS[cidr]), max_size=2)) if IP_BLOCKS[cidr] else []
    if excepts:
        block["except"] = excepts
    return {"ipBlock": block}


@st.composite
def port_st(draw: st.DrawFn) -> Obj:
    out: Obj = {}
    protocol = draw(st.sampled_from([None, "TCP", "UDP"]))
    if protocol is not None:
        out["protocol"] = protocol
    kind = draw(st.sampled_from(["none", "number", "range", "named", "named"]))
    if kind == "number":
        out["port"] = draw(st.sampled_from([53, 80, 81]))
    elif kind == "range":
        out["port"] = draw(st.sampled_from([53, 80]))
        out["endPort"] = out["port"] + draw(st.sampled_from([0, 1, 30]))
    elif kind == "named":
        out["port"] = draw(st.sampled_from(["http", "alt", "dns", "nope"]))
    return out


@st.composite
def _optional_list(draw: st.DrawFn, elements: st.SearchStrategy[Obj], max_size: int) -> list[Obj] | None:
    """Absent, empty, or (most often) a non-empty list."""
    kind = draw(st.sampled_from(["absent", "empty", "list", "list", "list"]))
    if kind == "absent":
        return None
    return [] if kind == "empty" else draw(st.lists(elements, min_size=1, max_size=max_size))


@st.composite
def rule_st(draw: st.DrawFn, peers_key: str) -> Obj:
    rule: Obj = {}
    peers = draw(_optional_list(peer_st(), 2))
    ports = draw(_optional_list(port_st(), 2))
    if peers is not None:
        rule[peers_key] = peers
    if ports is not None:
        rule["ports"] = ports
    return rule


@st.composite
def policy_st(draw: st.DrawFn, name: str, namespaces: list[str] = NAMESPACE_NAMES) -> Obj:
    spec: Obj = {"podSelector": draw(selector_st())}
    types = draw(st.sampled_from([None, [], ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types is not None:
        spec["policyTypes"] = types
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        rules = draw(st.one_of(st.none(), st.just([]), st.lists(rule_st(peers_key), min_size=1, max_size=2)))
        if rules is not None:
            spec[direction] = rules
    namespace = draw(st.sampled_from(namespaces))
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}"}, "spec": spec}


def namespace_body(name: str, labels: dict[str, str]) -> Obj:
    return {"metadata": {"name": name, "labels": {**labels, "kubernetes.io/metadata.name": name}}}


@st.composite
def pod_st(draw: st.DrawFn, index: int, namespaces: list[str] = NAMESPACE_NAMES) -> Obj:
    node = draw(st.sampled_from(NODES))
    ips = [f"10.244.{NODES.index(node)}.{10 + index}"]
    if draw(st.booleans()):
        ips.append(f"fd00::{10 + index:x}")
    kind = draw(st.sampled_from(["running"] * 6 + ["succeeded", "hostNetwork", "pending"]))
    status: Obj = {"phase": "Succeeded" if kind == "succeeded" else "Running"}
    if kind == "pending":
        status = {"phase": "Pending"}
    else:
        status["podIPs"] = [{"ip": ip} for ip in ips]
    ports = draw(st.lists(st.sampled_from(CONTAINER_PORTS), max_size=3, unique_by=lambda p: p[0]))
    spec: Obj = {
        "nodeName": node,
        "containers": [
            {"name": "main", "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}
        ],
    }
    if kind == "hostNetwork":
        spec["hostNetwork"] = True
    return {
        "metadata": {"namespace": draw(st.sampled_from(namespaces)), "name": f"p{index}", "labels": draw(labels_st)},
        "spec": spec,
        "status": status,
    }


@st.composite
def cluster_st(draw: st.DrawFn) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """(namespaces, pods, policies): 2-3 namespaces, 3-6 pods, 1-4 policies."""
    names = draw(st.sampled_from([["x", "y"], ["x", "y", "z"]]))
    namespaces = [namespace_body(n, draw(labels_st)) for n in names]
    pods = [draw(pod_st(i, names)) for i in range(draw(st.integers(3, 6)))]
    policies = [draw(policy_st(f"np{i}", names)) for i in range(draw(st.integers(1, 4)))]
    return namespaces, pods, policies
