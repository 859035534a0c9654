"""compile_world on representative policies: exact keys and values."""

from __future__ import annotations

from typing import Any

from netfence.model.compiler import compile_world
from netfence.model.enforcement import PeerSet
from netfence.model.selectors import LabelSelector
from netfence.model.world import ContainerPort, Namespace, Pod, policy_from_k8s

HTTP = ContainerPort("http", "TCP", 80)
NAMESPACES = [
    Namespace("x", {"kubernetes.io/metadata.name": "x", "team": "red"}),
    Namespace("y", {"kubernetes.io/metadata.name": "y", "team": "blue"}),
]
PODS = [
    Pod("x", "a", "n0", ("10.244.0.10",), {"pod": "a", "app": "web"}, (HTTP,)),
    Pod("x", "b", "n1", ("10.244.1.10",), {"pod": "b"}, (ContainerPort("http", "TCP", 8080),)),
    Pod("y", "a", "n0", ("10.244.0.11", "fd00::b"), {"pod": "a", "app": "web"}, (HTTP,)),
    Pod("y", "b", "n1", ("10.244.1.11",), {"pod": "b", "app": "web"}),
]


def body(name: str, spec: dict[str, Any], namespace: str = "x") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}"}, "spec": spec}


def compile_specs(*bodies: dict[str, Any], pods: list[Pod] | None = None) -> dict[str, dict[str, Any]]:
    return compile_world(PODS if pods is None else pods, NAMESPACES, [policy_from_k8s(b) for b in bodies])


def pods_set_id(namespace: str | None, ns_sel: dict[str, Any] | None, pod_sel: dict[str, Any]) -> str:
    definition = {
        "namespace": namespace,
        "namespaceSelector": None if ns_sel is None else LabelSelector.from_k8s(ns_sel).canonical(),
        "podSelector": LabelSelector.from_k8s(pod_sel).canonical(),
    }
    return PeerSet.make_id("pods", definition)


def endpoint(ns: str, name: str, node: str, ips: list[str], ingress: list[str], egress: list[str]) -> dict[str, Any]:
    return {"schema": 1, "node": node, "namespace": ns, "name": name, "ips": ips, "ingress": ingress, "egress": egress}


#: every scheduled endpoint pod has an endpoint key, also when no policy selects it (empty lists)
UNSELECTED_Y = {
    "endpoints/n0/y/a": endpoint("y", "a", "n0", ["10.244.0.11", "fd00::b"], [], []),
    "endpoints/n1/y/b": endpoint("y", "b", "n1", ["10.244.1.11"], [], []),
}


def policy_json(name: str, ingress: Any, egress: Any, namespace: str = "x") -> dict[str, Any]:
    return {
        "schema": 1,
        "namespace": namespace,
        "name": name,
        "uid": f"uid-{name}",
        "ingress": ingress,
        "egress": egress,
    }


def test_default_deny_ingress() -> None:
    out = compile_specs(body("deny", {"podSelector": {}}))
    assert out == {
        "policies/x/deny": policy_json("deny", [], None),
        "endpoints/n0/x/a": endpoint("x", "a", "n0", ["10.244.0.10"], ["x/deny"], []),
        "endpoints/n1/x/b": endpoint("x", "b", "n1", ["10.244.1.10"], ["x/deny"], []),
        **UNSELECTED_Y,
    }


def test_default_deny_egress() -> None:
    out = compile_specs(body("deny", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}))
    assert out == {
        "policies/x/deny": policy_json("deny", None, []),
        "endpoints/n0/x/a": endpoint("x", "a", "n0", ["10.244.0.10"], [], ["x/deny"]),
        "endpoints/n1/x/b": endpoint("x", "b", "n1", ["10.244.1.10"], [], []),
        **UNSELECTED_Y,
    }


def test_allow_all_ingress_and_egress() -> None:
    out = compile_specs(
        body("all", {"podSelector": {}, "ingress": [{}], "egress": [{"to": [], "ports": []}]}),
    )
    any_rule = {"peers": None, "ports": None}
    assert out["policies/x/all"] == policy_json("all", [any_rule], [any_rule])
    assert out["endpoints/n0/x/a"]["ingress"] == ["x/all"]
    assert out["endpoints/n0/x/a"]["egress"] == ["x/all"]
    assert not any(k.startswith("sets/") for k in out)


def test_pod_selector_peer_is_scoped_to_policy_namespace() -> None:
    out = compile_specs(
        body("p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})
    )
    sid = pods_set_id("x", None, {"matchLabels": {"app": "web"}})
    assert out["policies/x/p"]["ingress"] == [{"peers": [sid], "ports": None}]
    assert out[f"sets/{sid}"] == {
        "schema": 1,
        "id": sid,
        "kind": "pods",
        "definition": {
            "namespace": "x",
            "namespaceSelector": None,
            "podSelector": {"matchLabels": {"app": "web"}, "matchExpressions": []},
        },
        "members": ["10.244.0.10"],
    }


def test_namespace_and_pod_selector_combo() -> None:
    ns_sel = {"matchLabels": {"team": "blue"}}
    pod_sel = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}
    out = compile_specs(
        body(
            "p",
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {"from": [{"namespaceSelector": ns_sel, "podSelector": pod_sel}]},
                    {"from": [{"namespaceSelector": {}}]},
                ],
            },
        )
    )
    combo = pods_set_id(None, ns_sel, pod_sel)
    all_ns = pods_set_id(None, {}, {})
    assert out["policies/x/p"]["ingress"] == [{"peers": [combo], "ports": None}, {"peers": [all_ns], "ports": None}]
    assert out[f"sets/{combo}"]["members"] == ["10.244.0.11", "10.244.1.11", "fd00::b"]
    assert out[f"sets/{combo}"]["definition"]["namespaceSelector"] == {
        "matchLabels": {"team": "blue"},
        "matchExpressions": [],
    }
    assert out[f"sets/{all_ns}"]["members"] == ["10.244.0.10", "10.244.0.11", "10.244.1.10", "10.244.1.11", "fd00::b"]
    # every scheduled endpoint pod has its key; only x/a is selected
    assert set(out) == {"policies/x/p", f"sets/{combo}", f"sets/{all_ns}", "endpoints/n0/x/a", "endpoints/n1/x/b",
                        *UNSELECTED_Y}
    assert [k for k, v in out.items() if k.startswith("endpoints/") and v["ingress"]] == ["endpoints/n0/x/a"]


def test_ip_block_with_except_is_a_net_set_with_nomatch_members() -> None:
    out = compile_specs(
        body(
            "p",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.1/16", "except": ["10.244.1.0/24"]}}]}],
            },
        )
    )
    definition = {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}
    sid = PeerSet.make_id("net", definition)
    assert out[f"sets/{sid}"] == {
        "schema": 1,
        "id": sid,
        "kind": "net",
        "definition": definition,
        "members": ["!10.244.1.0/24", "10.244.0.0/16"],
    }
    assert out["policies/x/p"]["egress"] == [{"peers": [sid], "ports": None}]


def test_named_ports_resolve_over_every_pod_in_both_directions() -> None:
    out = compile_specs(
        body(
            "p",
            {
                "podSelector": {"matchLabels": {"pod": "b"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"ports": [{"port": "http"}]}],
                "egress": [{"ports": [{"port": "http", "protocol": "TCP"}, {"port": "http", "protocol": "UDP"}]}],
            },
        )
    )
    tcp = PeerSet.make_id("ports", {"name": "http", "protocol": "TCP"})
    udp = PeerSet.make_id("ports", {"name": "http", "protocol": "UDP"})
    assert out["policies/x/p"]["ingress"] == [{"peers": None, "ports": [{"protocol": "TCP", "namedSet": tcp}]}]
    egress_ports = out["policies/x/p"]["egress"][0]["ports"]
    assert egress_ports == [{"protocol": "TCP", "namedSet": tcp}, {"protocol": "UDP", "namedSet": udp}]
    assert out[f"sets/{tcp}"]["kind"] == "ports"
    assert out[f"sets/{tcp}"]["definition"] == {"name": "http", "protocol": "TCP"}
    assert out[f"sets/{tcp}"]["members"] == [
        "10.244.0.10,tcp:80",
        "10.244.0.11,tcp:80",
        "10.244.1.10,tcp:8080",
        "fd00::b,tcp:80",
    ]
    assert out[f"sets/{udp}"]["members"] == []


def test_numeric_ports_end_port_and_protocol_only() -> None:
    out = compile_specs(
        body(
            "p",
            {
                "podSelector": {},
                "ingress": [
                    {"ports": [{"port": 1000, "endPort": 2000}, {"protocol": "UDP"}, {"port": 53, "protocol": "UDP"}]}
                ],
            },
        )
    )
    assert out["policies/x/p"]["ingress"] == [
        {
            "peers": None,
            "ports": [
                {"protocol": "TCP", "port": 1000, "endPort": 2000},
                {"protocol": "UDP"},
                {"protocol": "UDP", "port": 53},
            ],
        }
    ]


def test_ipv6_pod_endpoint_keeps_all_addresses() -> None:
    out = compile_specs(body("p", {"podSelector": {"matchLabels": {"pod": "a"}}}, namespace="y"))
    assert out["endpoints/n0/y/a"] == endpoint("y", "a", "n0", ["10.244.0.11", "fd00::b"], ["y/p"], [])


def test_non_endpoint_pods_are_excluded_everywhere() -> None:
    pods = [
        *PODS,
        Pod("x", "host", "n0", ("192.168.0.1",), {"app": "web"}, (HTTP,), host_network=True),
        Pod("x", "done", "n0", ("10.244.0.50",), {"app": "web"}, (HTTP,), phase="Succeeded"),
        Pod("x", "failed", "n0", ("10.244.0.51",), {"app": "web"}, (HTTP,), phase="Failed"),
        Pod("x", "new", "n0", (), {"app": "web"}, (HTTP,), phase="Pending"),
        Pod("x", "unscheduled", None, ("10.244.0.60",), {"app": "web"}, (HTTP,)),
    ]
    out = compile_specs(
        body(
            "p",
            {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]}],
            },
        ),
        pods=pods,
    )
    web = pods_set_id("x", None, {"matchLabels": {"app": "web"}})
    http = PeerSet.make_id("ports", {"name": "http", "protocol": "TCP"})
    # the unscheduled pod has an IP, so it is a peer, but without a node it has no endpoint key
    assert out[f"sets/{web}"]["members"] == ["10.244.0.10", "10.244.0.60"]
    assert "10.244.0.60,tcp:80" in out[f"sets/{http}"]["members"]
    assert not any(m.startswith(("192.168.0.1", "10.244.0.5")) for m in out[f"sets/{http}"]["members"])
    assert sorted(k for k in out if k.startswith("endpoints/")) == [
        "endpoints/n0/x/a", "endpoints/n0/y/a", "endpoints/n1/x/b", "endpoints/n1/y/b"]
    assert [k for k, v in out.items() if k.startswith("endpoints/") and v["ingress"]] == ["endpoints/n0/x/a"]


def test_sets_are_shared_and_only_referenced_sets_exist() -> None:
    peer = {"podSelector": {"matchLabels": {"pod": "b"}}}
    out = compile_specs(
        body("p1", {"podSelector": {}, "ingress": [{"from": [peer]}]}),
        body("p2", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [peer, peer]}]}),
    )
    sid = pods_set_id("x", None, peer["podSelector"])
    assert [k for k in out if k.startswith("sets/")] == [f"sets/{sid}"]
    assert out["policies/x/p2"]["ingress"] == [{"peers": [sid], "ports": None}]
    assert out["endpoints/n0/x/a"]["ingress"] == ["x/p1", "x/p2"]


def test_pods_in_unknown_namespaces_match_no_namespace_selector() -> None:
    pods = [*PODS, Pod("ghost", "a", "n0", ("10.244.0.99",), {"app": "web"})]
    out = compile_specs(body("p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}), pods=pods)
    sid = pods_set_id(None, {}, {})
    assert "10.244.0.99" not in out[f"sets/{sid}"]["members"]
