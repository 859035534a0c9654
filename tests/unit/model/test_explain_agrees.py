"""``netfence explain``'s evaluator agrees with the compiled-model evaluator and the reference evaluator.

explain traces per-node models decoded by the agent's NodeState (what each agent renders);
this checks, on random worlds, that its verdict is the one both other evaluators give, so it
is not a second opinion that could drift from enforcement.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from model_worlds import EXTERNAL_ADDRESSES, NODES, PROBE_PORTS, cluster_st
from reference import Cluster, pod_ips

from netfence.agent.node_state import NodeState
from netfence.explain.trace import Connection, Party, trace_connection, verdict
from netfence.model.compiler import compile_world
from netfence.model.evaluate import CompiledState
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s

Obj = dict[str, Any]


def parties(namespaces: list[Obj], pods: list[Obj]) -> list[Party]:
    labels = {ns["metadata"]["name"]: ns["metadata"].get("labels") or {} for ns in namespaces}
    out = [Party(ip) for ip in EXTERNAL_ADDRESSES]
    for pod in pods:
        meta = pod["metadata"]
        for ip in pod_ips(pod):
            out.append(Party(ip, meta["namespace"], meta["name"], pod["spec"]["nodeName"], meta.get("labels") or {},
                             labels.get(meta["namespace"]), bool(pod["spec"].get("hostNetwork"))))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_st())
def test_explain_verdicts_match_both_evaluators(cluster: tuple[list[Obj], list[Obj], list[Obj]]) -> None:
    namespaces, pods, policies = cluster
    desired = compile_world([pod_from_k8s(p) for p in pods], [namespace_from_k8s(n) for n in namespaces],
                            [policy_from_k8s(p) for p in policies])
    values = {k: json.dumps(v).encode() for k, v in desired.items()}
    models = {}
    for node in NODES:
        state = NodeState(node)
        state.reset(values)
        models[node] = state.model()
    compiled = CompiledState(desired)
    reference = Cluster(namespaces, pods, policies)
    everyone = parties(namespaces, pods)
    for src in everyone:
        for dst in everyone:
            if src.ip == dst.ip or (":" in src.ip) != (":" in dst.ip):
                continue
            if not (src.is_pod or dst.is_pod):
                continue
            for port, protocol in PROBE_PORTS:
                traces = trace_connection(models, Connection(src, dst, port, protocol))  # type: ignore[arg-type]
                expected = reference.allowed(src.ip, dst.ip, port, protocol)
                assert compiled.allows(src.ip, dst.ip, port, protocol) == expected
                assert verdict(traces) == expected, (src, dst, port, protocol, traces)
                for trace in traces:  # a denied direction always says why
                    assert trace.allowed or (trace.isolated and trace.nearest is not None)
