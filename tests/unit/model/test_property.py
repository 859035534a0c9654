"""The compiled model (compile_world + evaluate) agrees with an independent reference evaluator."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from model_worlds import EXTERNAL_ADDRESSES, PROBE_PORTS, cluster_st, namespace_body
from reference import Cluster, pod_ips, takes_part

from netfence.model.compiler import compile_world
from netfence.model.evaluate import CompiledState
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s

Obj = dict[str, Any]


def compiled_state(namespaces: list[Obj], pods: list[Obj], policies: list[Obj]) -> CompiledState:
    desired = compile_world(
        [pod_from_k8s(p) for p in pods],
        [namespace_from_k8s(n) for n in namespaces],
        [policy_from_k8s(p) for p in policies],
    )
    return CompiledState(desired)


def flows(pods: list[Obj]) -> list[tuple[str, str]]:
    """Address pairs (same family) where at least one side is a live pod."""
    live = {ip for pod in pods if takes_part(pod) for ip in pod_ips(pod)}
    others = {ip for pod in pods if not takes_part(pod) for ip in pod_ips(pod)} | set(EXTERNAL_ADDRESSES)
    everything = sorted(live | others)
    return [
        (src, dst)
        for src in everything
        for dst in everything
        if src != dst
        and (src in live or dst in live)
        and ipaddress.ip_address(src).version == ipaddress.ip_address(dst).version
    ]


def check_agreement(namespaces: list[Obj], pods: list[Obj], policies: list[Obj]) -> tuple[int, int]:
    compiled = compiled_state(namespaces, pods, policies)
    reference = Cluster(namespaces, pods, policies)
    allowed = denied = 0
    for src, dst in flows(pods):
        for port, protocol in PROBE_PORTS:
            expected = reference.allowed(src, dst, port, protocol)
            assert compiled.allows(src, dst, port, protocol) == expected, (
                f"{src} -> {dst} {port}/{protocol}: reference says {expected}"
            )
            allowed += expected
            denied += not expected
    return allowed, denied


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_st())
def test_compiled_model_matches_reference(cluster: tuple[list[Obj], list[Obj], list[Obj]]) -> None:
    check_agreement(*cluster)


def pod(ns: str, name: str, ip: str, labels: dict[str, str], ports: list[Obj] | None = None) -> Obj:
    return {
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": "n0", "containers": [{"name": "c", "ports": ports or []}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    }


def test_both_evaluators_on_a_known_scenario() -> None:
    namespaces = [namespace_body("x", {"ns": "x"}), namespace_body("y", {"ns": "y"})]
    pods = [
        pod("x", "a", "10.244.0.10", {"pod": "a"}, [{"name": "serve-80-tcp", "containerPort": 80}]),
        pod("x", "b", "10.244.0.11", {"pod": "b"}),
        pod("y", "a", "10.244.0.12", {"pod": "a"}),
    ]
    policies = [
        {
            "metadata": {"namespace": "x", "name": "allow-b-to-a"},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "serve-80-tcp"}]}
                ],
            },
        }
    ]
    compiled = compiled_state(namespaces, pods, policies)
    reference = Cluster(namespaces, pods, policies)
    expectations = [
        ("10.244.0.11", "10.244.0.10", 80, "TCP", True),  # x/b -> x/a on the named port
        ("10.244.0.11", "10.244.0.10", 81, "TCP", False),
        ("10.244.0.11", "10.244.0.10", 80, "UDP", False),
        ("10.244.0.12", "10.244.0.10", 80, "TCP", False),  # y/a is not x/b
        ("10.244.0.10", "10.244.0.12", 80, "TCP", True),  # x/a's egress is not isolated
    ]
    for src, dst, port, protocol, expected in expectations:
        assert reference.allowed(src, dst, port, protocol) is expected
        assert compiled.allows(src, dst, port, protocol) is expected
    assert check_agreement(namespaces, pods, policies)[1] > 0
