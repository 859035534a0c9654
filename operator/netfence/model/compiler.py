"""World → desired etcd state (relative key → JSON value).

:func:`compile_world` is the straightforward, from-scratch compiler; the
incremental :class:`~netfence.model.engine.ModelEngine` (re-exported here)
maintains the same mapping under pod/namespace/policy changes and is tested
to be equal to it.

Keys (relative to the store prefix, see docs/design.md):

* ``policies/<ns>/<name>`` → ``CompiledPolicy.to_json()``
* ``sets/<id>`` → ``PeerSet.to_json()``; only sets referenced by a policy exist
* ``endpoints/<node>/<ns>/<name>`` → ``Endpoint.to_json()``; written for every
  endpoint pod (IP, not hostNetwork, not finished) that has a node, also when no
  policy selects it (empty policy lists: not isolated). So an agent knows every
  pod of its node and can deny the addresses it does not know yet (a new pod is
  denied until its rules exist; ``Features.workload_cidrs``).
* ``nodes/<node>`` → ``NodeNetwork.to_json()``: the node's pod CIDRs, for every
  node that has some (agents with ``--pod-cidrs=auto`` read their own).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from netfence.model.cluster_policy import ClusterPolicy, cluster_policy_key, compile_cluster_policy
from netfence.model.enforcement import CompiledClusterPolicy, CompiledPolicy, NodeNetwork
from netfence.model.engine import ModelEngine, PolicyView
from netfence.model.peersets import (
    NetSetSpec,
    PodsSetSpec,
    SetSpec,
    compile_policy,
    endpoint_key,
    make_endpoint,
    net_members,
    node_key,
    peer_set,
    pod_ip_members,
    pods_spec_matches,
    policy_key,
    port_members,
    set_key,
)
from netfence.model.world import Namespace, Node, Pod, Policy, is_endpoint

__all__ = ["ModelEngine", "PolicyView", "compile_world", "resolve_members"]


def resolve_members(
    spec: SetSpec, endpoints: Iterable[Pod], namespace_labels: Mapping[str, Mapping[str, str]]
) -> tuple[str, ...]:
    """The members of a set given every endpoint pod and the known namespaces' labels."""
    if isinstance(spec, NetSetSpec):
        return net_members(spec)
    if isinstance(spec, PodsSetSpec):
        return pod_ip_members(
            pod for pod in endpoints if pods_spec_matches(spec, pod, namespace_labels.get(pod.namespace))
        )
    return port_members(endpoints, spec.name, spec.protocol)


def compile_world(
    pods: Iterable[Pod],
    namespaces: Iterable[Namespace],
    policies: Iterable[Policy],
    cluster_policies: Iterable[ClusterPolicy] = (),
    nodes: Iterable[Node] = (),
) -> dict[str, dict[str, Any]]:
    """The full desired state for this world. Later duplicates (same key) win."""
    pod_map = {pod.key: pod for pod in pods}
    ns_labels = {ns.name: ns.labels for ns in namespaces}
    policy_map = {policy.key: policy for policy in policies}
    cluster_map = {cp.name: cp for cp in cluster_policies}
    endpoints = [pod for pod in pod_map.values() if is_endpoint(pod)]

    out: dict[str, dict[str, Any]] = {}
    specs: dict[str, SetSpec] = {}
    selecting: dict[tuple[str, str], list[CompiledPolicy]] = {}
    for policy in policy_map.values():
        compilation = compile_policy(policy)
        out[policy_key(policy.namespace, policy.name)] = compilation.compiled.to_json()
        specs.update(compilation.sets)
        for pod in endpoints:
            if pod.namespace == policy.namespace and policy.pod_selector.matches(pod.labels):
                selecting.setdefault(pod.key, []).append(compilation.compiled)
    cluster_selecting: dict[tuple[str, str], list[CompiledClusterPolicy]] = {}
    for cp in cluster_map.values():
        ccomp = compile_cluster_policy(cp)
        out[cluster_policy_key(cp.name)] = ccomp.compiled.to_json()
        specs.update(ccomp.sets)
        subject = cp.subject_spec()
        for pod in endpoints:
            if pods_spec_matches(subject, pod, ns_labels.get(pod.namespace)):
                cluster_selecting.setdefault(pod.key, []).append(ccomp.compiled)
    for sid, spec in specs.items():
        out[set_key(sid)] = peer_set(sid, spec, resolve_members(spec, endpoints, ns_labels)).to_json()
    for pod in endpoints:
        if not pod.node:
            continue
        endpoint = make_endpoint(pod, selecting.get(pod.key, ()), cluster_selecting.get(pod.key, ()))
        out[endpoint_key(pod.node, pod.namespace, pod.name)] = endpoint.to_json()
    for node in nodes:
        if node.pod_cidrs:
            out[node_key(node.name)] = NodeNetwork(node.pod_cidrs).to_json()
        else:
            out.pop(node_key(node.name), None)
    return out
