"""Parsing Kubernetes bodies into world values, and NetworkPolicy validation errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from netfence.model.selectors import EVERYTHING, LabelSelector
from netfence.model.world import (
    ContainerPort,
    IPBlock,
    Labels,
    Namespace,
    Peer,
    Pod,
    PolicyError,
    PortSpec,
    Rule,
    is_endpoint,
    namespace_from_k8s,
    pod_from_k8s,
    policy_from_k8s,
)


def pod_body(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
        "spec": {
            "nodeName": "node-0",
            "containers": [
                {"name": "c1", "ports": [{"name": "http", "containerPort": 80}, {"containerPort": 9000}]},
                {"name": "c2", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            ],
        },
        "status": {"phase": "Running", **status},
    }


def test_pod_from_k8s_reads_everything() -> None:
    pod = pod_from_k8s(pod_body(podIPs=[{"ip": "10.244.0.10"}, {"ip": "fd00:0::a"}], podIP="10.244.0.10"))
    assert pod == Pod(
        namespace="x",
        name="a",
        node="node-0",
        ips=("10.244.0.10", "fd00::a"),
        labels={"pod": "a"},
        ports=(
            ContainerPort("http", "TCP", 80),
            ContainerPort(None, "TCP", 9000),
            ContainerPort("dns", "UDP", 53),
        ),
        host_network=False,
        phase="Running",
    )
    assert pod.named_ports() == {("http", "TCP"), ("dns", "UDP")}
    assert is_endpoint(pod)


def test_pod_ip_falls_back_to_pod_ip() -> None:
    assert pod_from_k8s(pod_body(podIP="10.244.0.11")).ips == ("10.244.0.11",)


def test_pod_without_status_is_pending_and_not_an_endpoint() -> None:
    body = pod_body()
    del body["status"]
    pod = pod_from_k8s(body)
    assert pod.ips == () and pod.phase == "Pending"
    assert not is_endpoint(pod)


def test_host_network_and_finished_pods_are_not_endpoints() -> None:
    body = pod_body(podIP="10.0.0.1")
    body["spec"]["hostNetwork"] = True
    assert not is_endpoint(pod_from_k8s(body))
    for phase in ("Succeeded", "Failed"):
        assert not is_endpoint(pod_from_k8s(pod_body(podIP="10.244.0.1", phase=phase)))
    assert is_endpoint(pod_from_k8s(pod_body(podIP="10.244.0.1", phase="Pending")))


def test_pod_labels_are_immutable_and_hashable() -> None:
    pod = Pod("x", "a", labels={"k": "v"})
    assert isinstance(pod.labels, Labels)
    assert pod.labels == {"k": "v"}
    assert hash(pod) == hash(Pod("x", "a", labels={"k": "v"}))
    with pytest.raises(TypeError):
        pod.labels["k"] = "w"  # type: ignore[index]


def test_namespace_from_k8s() -> None:
    ns = namespace_from_k8s({"metadata": {"name": "y", "labels": {"kubernetes.io/metadata.name": "y"}}})
    assert ns == Namespace("y", {"kubernetes.io/metadata.name": "y"})
    assert namespace_from_k8s({"metadata": {"name": "z"}}).labels == {}


def policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "x", "name": "p", "uid": "u-1", "generation": 3},
        "spec": spec,
    }


def test_policy_metadata_and_default_policy_types() -> None:
    parsed = policy_from_k8s(policy({"podSelector": {}}))
    assert (parsed.namespace, parsed.name, parsed.uid, parsed.generation) == ("x", "p", "u-1", 3)
    assert parsed.pod_selector == EVERYTHING
    assert parsed.policy_types == {"Ingress"}
    assert parsed.ingress == ()  # deny all ingress
    assert parsed.egress is None


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ({"egress": [{}]}, {"Ingress", "Egress"}),
        ({"egress": []}, {"Ingress"}),  # API defaulting: only a non-empty egress adds Egress
        ({"policyTypes": [], "egress": [{}]}, {"Ingress", "Egress"}),
        ({"policyTypes": ["Egress"]}, {"Egress"}),
        ({"policyTypes": ["Egress", "Ingress"]}, {"Ingress", "Egress"}),
        ({"ingress": [{}]}, {"Ingress"}),
    ],
)
def test_policy_types_defaulting(spec: dict[str, Any], types: set[str]) -> None:
    parsed = policy_from_k8s(policy({"podSelector": {}, **spec}))
    assert parsed.policy_types == types
    assert (parsed.ingress is not None) == ("Ingress" in types)
    assert (parsed.egress is not None) == ("Egress" in types)


def test_uncovered_direction_is_ignored_with_a_note() -> None:
    parsed = policy_from_k8s(policy({"policyTypes": ["Ingress"], "egress": [{"to": [{"podSelector": {}}]}]}))
    assert parsed.egress is None
    assert parsed.notes == ("spec.egress is ignored: policyTypes does not include Egress",)


def test_rules_peers_and_ports() -> None:
    parsed = policy_from_k8s(
        policy(
            {
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {},
                    {"from": [], "ports": []},
                    {
                        "from": [
                            {"podSelector": {}},
                            {"namespaceSelector": {}},
                            {"namespaceSelector": {"matchLabels": {"t": "1"}}, "podSelector": {}},
                            {"ipBlock": {"cidr": "10.0.0.1/8", "except": ["10.1.0.0/16", "10.1.0.0/16"]}},
                        ],
                        "ports": [
                            {"port": 80},
                            {"protocol": "UDP"},
                            {"port": "http"},
                            {"port": 1000, "endPort": 2000, "protocol": "SCTP"},
                        ],
                    },
                ],
                "egress": [{"to": [{"ipBlock": {"cidr": "fd00::/64"}}]}],
            }
        )
    )
    assert parsed.pod_selector == LabelSelector.from_labels({"app": "db"})
    assert parsed.ingress is not None
    assert parsed.ingress[0] == Rule(peers=None, ports=None)
    assert parsed.ingress[1] == Rule(peers=None, ports=None)
    assert parsed.ingress[2] == Rule(
        peers=(
            Peer(pod_selector=EVERYTHING),
            Peer(namespace_selector=EVERYTHING),
            Peer(pod_selector=EVERYTHING, namespace_selector=LabelSelector.from_labels({"t": "1"})),
            Peer(ip_block=IPBlock("10.0.0.0/8", ("10.1.0.0/16",))),
        ),
        ports=(
            PortSpec("TCP", 80),
            PortSpec("UDP"),
            PortSpec("TCP", "http"),
            PortSpec("SCTP", 1000, 2000),
        ),
    )
    assert parsed.egress == (Rule(peers=(Peer(ip_block=IPBlock("fd00::/64")),)),)


def _set(body: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


BASE = policy(
    {
        "podSelector": {},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]}],
    }
)
PEER = ["spec", "ingress", 0, "from", 0]
PORT = ["spec", "ingress", 0, "ports", 0]

MALFORMED: list[tuple[dict[str, Any], str]] = [
    (_set(BASE, [*PEER, "ipBlock", "cidr"], "10.0.0.0/33"), "spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR"),
    (_set(BASE, [*PEER, "ipBlock", "cidr"], "10.0.0.1"), "spec.ingress[0].from[0].ipBlock.cidr: must be a CIDR"),
    (_set(BASE, [*PEER, "ipBlock", "cidr"], "banana/8"), "ipBlock.cidr: invalid CIDR"),
    (_set(BASE, [*PEER, "ipBlock"], {}), "spec.ingress[0].from[0].ipBlock.cidr: required"),
    (
        _set(BASE, [*PEER, "ipBlock", "except"], ["11.0.0.0/16"]),
        "spec.ingress[0].from[0].ipBlock.except[0]: '11.0.0.0/16' must be a strict subset of cidr",
    ),
    (_set(BASE, [*PEER, "ipBlock", "except"], ["10.0.0.0/8"]), "except[0]: '10.0.0.0/8' must be a strict subset"),
    (_set(BASE, [*PEER, "ipBlock", "except"], ["fd00::/64"]), "except[0]: 'fd00::/64' must be a strict subset"),
    (_set(BASE, [*PEER, "ipBlock", "except"], ["10.1.0.0"]), "except[0]: must be a CIDR"),
    (_set(BASE, [*PEER, "podSelector"], {}), "spec.ingress[0].from[0]: may not specify both ipBlock"),
    (_set(BASE, PEER, {}), "spec.ingress[0].from[0]: must specify a peer"),
    (_set(BASE, [*PORT, "port"], 0), "spec.ingress[0].ports[0].port: must be a port number"),
    (_set(BASE, [*PORT, "port"], 65536), "spec.ingress[0].ports[0].port: must be a port number"),
    (_set(BASE, [*PORT, "port"], True), "spec.ingress[0].ports[0].port: must be a port number"),
    (_set(BASE, [*PORT, "port"], "80"), "spec.ingress[0].ports[0].port: invalid port name '80'"),
    (_set(BASE, [*PORT, "port"], "Http"), "ports[0].port: invalid port name 'Http'"),
    (_set(BASE, [*PORT, "port"], "a--b"), "ports[0].port: invalid port name"),
    (_set(BASE, [*PORT, "port"], "much-too-long-name"), "ports[0].port: invalid port name"),
    (
        _set(BASE, [*PORT, "endPort"], 79),
        "spec.ingress[0].ports[0].endPort: 79 must be greater than or equal to port 80",
    ),
    (_set(BASE, [*PORT, "endPort"], 70000), "ports[0].endPort: must be a port number"),
    (_set(BASE, PORT, {"port": "http", "endPort": 90}), "ports[0].endPort: may not be specified when port is a named"),
    (_set(BASE, PORT, {"endPort": 90}), "ports[0].endPort: may not be specified when port is not specified"),
    (_set(BASE, [*PORT, "protocol"], "ICMP"), "spec.ingress[0].ports[0].protocol: unsupported protocol 'ICMP'"),
    (_set(BASE, [*PORT, "protocol"], "tcp"), "ports[0].protocol: unsupported protocol 'tcp'"),
    (
        _set(BASE, ["spec", "podSelector"], {"matchExpressions": [{"key": "a", "operator": "In"}]}),
        "spec.podSelector.matchExpressions[0].values: must be non-empty",
    ),
    (
        _set(BASE, [*PEER], {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}),
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator: unknown operator 'Is'",
    ),
    (_set(BASE, ["spec", "policyTypes"], ["Ingress", "Sideways"]), "spec.policyTypes[1]: unsupported value"),
    (_set(BASE, ["spec", "policyTypes"], ["Ingress", "Egress", "Ingress"]), "spec.policyTypes: may not specify"),
    (_set(BASE, ["spec", "ingress"], {"from": []}), "spec.ingress: must be a list"),
    (_set(BASE, ["spec", "ingress", 0, "from"], {}), "spec.ingress[0].from: must be a list"),
    (_set(BASE, ["metadata"], {"name": "p"}), "metadata.namespace: required"),
    (_set(BASE, ["metadata"], {"namespace": "x"}), "metadata.name: required"),
    (
        _set(BASE, ["spec", "egress"], [{"to": [{"ipBlock": {"cidr": "1.2.3.4/40"}}]}]),
        "spec.egress[0].to[0].ipBlock.cidr: invalid CIDR",
    ),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_malformed_policies_raise_policy_error_with_path(body: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_k8s(body)
    assert message in str(err.value)


def test_policy_invariants_checked_on_construction() -> None:
    from netfence.model.world import Policy

    with pytest.raises(ValueError, match="ingress"):
        Policy("x", "p", policy_types=frozenset({"Egress"}), ingress=(), egress=())
    with pytest.raises(ValueError, match="egress"):
        Policy("x", "p", policy_types=frozenset({"Ingress", "Egress"}), ingress=(), egress=None)
