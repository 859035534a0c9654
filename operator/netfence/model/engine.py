"""The incremental model engine: the desired etcd state, kept up to date cheaply.

:class:`ModelEngine` holds the world (pods, namespaces, policies) and the
derived state (set memberships, policy selections) and answers with the same
key → JSON mapping as :func:`netfence.model.compiler.compile_world`.

Cost model. Every selector is indexed by the label keys it references (pod
selectors per namespace scope, namespace selectors separately). A selector
whose keys did not change cannot change its answer, so:

* a pod label change re-evaluates only the sets/policies whose pod selector
  references a changed key (and only in the pod's scope);
* a namespace label change re-evaluates only the namespace-selector sets that
  reference a changed key, then only the pods of that namespace;
* a pod IP/port change touches only the sets that contain the pod, the named
  port sets it declares, and its endpoint.

Memberships are sets of pod keys (O(1) updates); member lists are rendered
lazily, once per :meth:`drain_changes`/:meth:`desired`, for the keys marked dirty.
``selector_evaluations`` counts every selector evaluation (for tests/metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from netfence.model.cluster_policy import cluster_policy_key
from netfence.model.diagnostics import policy_warnings
from netfence.model.enforcement import Endpoint, NodeNetwork
from netfence.model.membership import MembershipState, PodKey, PolicyKey, SetState
from netfence.model.peersets import (
    NetSetSpec,
    PodsSetSpec,
    endpoint_key,
    make_endpoint,
    net_members,
    peer_set,
    pod_ip_members,
    policy_key,
    port_members,
    set_key,
)
from netfence.model.world import is_endpoint

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class PolicyView:
    """What the status aggregator needs to know about one policy."""

    namespace: str
    name: str
    endpoints: tuple[Endpoint, ...]  # selected, scheduled endpoint pods, by key
    nodes: frozenset[str]  # nodes hosting them (the nodes that must enforce it)
    relevant_keys: frozenset[str]  # its policy key, its set keys, its endpoints' keys
    warnings: tuple[str, ...]


class ModelEngine(MembershipState):
    """Incrementally maintained desired state. Not thread-safe; drive it from one task.

    Mutators (inherited): ``set_pod``, ``remove_pod``, ``set_namespace``,
    ``remove_namespace``, ``set_policy``, ``remove_policy``, ``set_node``, ``remove_node``.
    """

    # ---- output --------------------------------------------------------------

    def desired(self) -> Mapping[str, Json]:
        """The full desired state (read-only view; do not mutate the values)."""
        self._out.materialise(self._value)
        return self._out.state()

    def drain_changes(self) -> dict[str, Json | None]:
        """Keys whose desired value differs from the last drain (None = delete)."""
        self._out.materialise(self._value)
        return self._out.drain()

    def policy_view(self, namespace: str, name: str, *, with_warnings: bool = True) -> PolicyView | None:
        """The policy's selected endpoints, nodes, relevant keys and warnings (None if unknown).

        Warnings cost O(endpoint pods) when the policy has an ipBlock; pass
        ``with_warnings=False`` to skip them (``warnings`` is then empty).
        """
        if not namespace:  # a ClusterNetworkPolicy (controller/world.py holds them so)
            return self.cluster_policy_view(name)
        state = self._policies.get((namespace, name))
        if state is None:
            return None
        endpoints = tuple(ep for key in sorted(state.selected) if (ep := self._endpoint(key)) is not None)
        keys = {policy_key(namespace, name)} | {set_key(sid) for sid in state.specs}
        keys |= {endpoint_key(ep.node, ep.namespace, ep.name) for ep in endpoints}
        warnings: tuple[str, ...] = ()
        if with_warnings:
            warnings = policy_warnings(
                state.policy,
                state.compiled,
                selected=[self._pods[key] for key in sorted(state.selected)],
                set_members=lambda sid: [self._pods[k] for k in sorted(self._sets[sid].members)],
                all_endpoints=lambda: (p for p in self._pods.values() if is_endpoint(p)),
            )
        return PolicyView(
            namespace=namespace,
            name=name,
            endpoints=endpoints,
            nodes=frozenset(ep.node for ep in endpoints),
            relevant_keys=frozenset(keys),
            warnings=warnings,
        )

    def policies_affected_by(self, keys: Iterable[str]) -> set[PolicyKey]:
        """Policies having any of these keys as a relevant key; ClusterNetworkPolicies as ``("", name)``.

        Uses the current state, plus, for endpoint keys reported by the last
        :meth:`drain_changes`, the policies listed in their value before that
        drain (so a policy that stopped selecting a pod is included). The
        result may name policies that no longer exist.
        """
        keys = list(keys)
        out: set[PolicyKey] = set()
        for key in keys:
            kind, _, rest = key.partition("/")
            if kind == "policies":
                ns, _, name = rest.partition("/")
                out.add((ns, name))
            elif kind == "sets" and rest in self._sets:
                out |= self._sets[rest].refs
            elif kind == "endpoints":
                _node, ns, name = rest.split("/", 2)
                out |= self._pod_policies.get((ns, name), set())
                before = self._out.value_before_last_drain(key)
                if before is not None:
                    for ref in [*before.get("ingress", ()), *before.get("egress", ())]:
                        ns, _, name = str(ref).partition("/")
                        out.add((ns, name))
        out |= {("", name) for name in self.cluster_policies_affected_by(keys)}
        return out

    def cluster_policy_view(self, name: str) -> PolicyView | None:
        """Like :meth:`policy_view` for a ClusterNetworkPolicy (``namespace`` is empty).

        Its warnings are the parser's notes: what is enforced fail closed.
        """
        state = self._cpolicies.get(name)
        if state is None:
            return None
        selected = sorted(self._sets[state.subject].members)
        endpoints = tuple(
            ep for key in selected if (ep := self._endpoint(key)) is not None and _lists(ep, name)
        )
        keys = {cluster_policy_key(name)} | {set_key(sid) for sid in state.specs}
        keys |= {endpoint_key(ep.node, ep.namespace, ep.name) for ep in endpoints}
        return PolicyView(
            namespace="",
            name=name,
            endpoints=endpoints,
            nodes=frozenset(ep.node for ep in endpoints),
            relevant_keys=frozenset(keys),
            warnings=state.policy.notes,
        )

    def cluster_policy_names(self) -> list[str]:
        return sorted(self._cpolicies)

    def cluster_policies_affected_by(self, keys: Iterable[str]) -> set[str]:
        """Cluster policies having any of these keys as a relevant key (see :meth:`policies_affected_by`)."""
        out: set[str] = set()
        for key in keys:
            kind, _, rest = key.partition("/")
            if kind == "cpolicies":
                out.add(rest)
            elif kind == "sets" and rest in self._sets:
                out |= self._sets[rest].crefs
            elif kind == "endpoints":
                _node, ns, name = rest.split("/", 2)
                out |= self._pod_cluster_policies((ns, name))
                before = self._out.value_before_last_drain(key)
                if before is not None:
                    for field_name in ("adminIngress", "adminEgress", "baselineIngress", "baselineEgress"):
                        out.update(str(n) for n in before.get(field_name, ()))
        return out

    def set_policies(self, set_id: str) -> frozenset[PolicyKey]:
        """Policies whose compiled rules reference set ``set_id`` (empty if unknown);
        ClusterNetworkPolicies as ``("", name)``."""
        state = self._sets.get(set_id)
        if state is None:
            return frozenset()
        return frozenset(state.refs) | {("", name) for name in state.crefs}

    def endpoint_policies(self, namespace: str, name: str) -> frozenset[PolicyKey]:
        """Policies that select the pod ``namespace/name``; ClusterNetworkPolicies as ``("", name)``."""
        key = (namespace, name)
        return frozenset(self._pod_policies.get(key, ())) | {("", n) for n in self._pod_cluster_policies(key)}

    # ---- internals: rendering ------------------------------------------------

    def _endpoint(self, key: PodKey) -> Endpoint | None:
        pod = self._pods.get(key)
        if pod is None or not pod.node or not is_endpoint(pod):
            return None
        policies = self._pod_policies.get(key)
        cluster = [self._cpolicies[n].compiled for n in self._pod_cluster_policies(key)]
        # every endpoint pod gets its record, selected or not: agents deny the pods they do not know
        return make_endpoint(pod, (self._policies[pk].compiled for pk in policies or ()), cluster)

    def _set_members(self, state: SetState) -> tuple[str, ...]:
        spec = state.spec
        if isinstance(spec, NetSetSpec):
            return net_members(spec)
        if isinstance(spec, PodsSetSpec):
            return pod_ip_members(self._pods[k] for k in state.members)
        holders = self._named_port_pods.get((spec.name, spec.protocol), set())
        return port_members((self._pods[k] for k in holders), spec.name, spec.protocol)

    def _value(self, key: str) -> Json | None:
        kind, _, rest = key.partition("/")
        if kind == "policies":
            ns, _, name = rest.partition("/")
            policy = self._policies.get((ns, name))
            return None if policy is None else policy.compiled.to_json()
        if kind == "sets":
            state = self._sets.get(rest)
            if state is None or not (state.refs or state.crefs):  # a subject-only set is not written
                return None
            return peer_set(rest, state.spec, self._set_members(state)).to_json()
        if kind == "cpolicies":
            cstate = self._cpolicies.get(rest)
            return None if cstate is None else cstate.compiled.to_json()
        if kind == "nodes":
            cidrs = self._node_cidrs.get(rest)
            return None if not cidrs else NodeNetwork(cidrs).to_json()
        node, ns, name = rest.split("/", 2)
        endpoint = self._endpoint((ns, name))
        return None if endpoint is None or endpoint.node != node else endpoint.to_json()


def _lists(endpoint: Endpoint, name: str) -> bool:
    """Whether the endpoint record lists cluster policy ``name`` in any tier and direction."""
    return any(name in names for direction in ("ingress", "egress") for names in endpoint.tiers(direction))
