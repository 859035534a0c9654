"""World state and derived memberships, maintained incrementally.

:class:`MembershipState` holds pods, namespaces and policies, and keeps for
every peer set its members and for every policy the endpoint pods it selects.
Each mutation re-evaluates only what can have changed (see the cost model in
:mod:`netfence.model.engine`) and marks the affected output keys dirty in a
:class:`~netfence.model.changes.ChangeTracker`; rendering is the engine's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from netfence.model.changes import ChangeTracker
from netfence.model.cluster_policy import ClusterPolicy, cluster_policy_key, compile_cluster_policy
from netfence.model.enforcement import CompiledClusterPolicy, CompiledPolicy, Protocol
from netfence.model.peersets import (
    PodsSetSpec,
    PortsSetSpec,
    SetSpec,
    compile_policy,
    endpoint_key,
    node_key,
    policy_key,
    set_id,
    set_key,
)
from netfence.model.selector_index import SelectorIndex, changed_keys, index_add, index_discard
from netfence.model.selectors import LabelSelector
from netfence.model.world import Namespace, Node, Pod, Policy, is_endpoint

PodKey = tuple[str, str]
PolicyKey = tuple[str, str]


@dataclass(eq=False)
class SetState:
    sid: str
    spec: SetSpec
    refs: set[PolicyKey] = field(default_factory=set)
    crefs: set[str] = field(default_factory=set)  # cluster policies whose rules reference it
    subject_of: set[str] = field(default_factory=set)  # cluster policies whose subject it is
    members: set[PodKey] = field(default_factory=set)  # pods sets only
    namespaces: set[str] = field(default_factory=set)  # namespace-selector sets: matching namespaces


@dataclass(eq=False)
class ClusterPolicyState:
    policy: ClusterPolicy
    compiled: CompiledClusterPolicy
    specs: Mapping[str, SetSpec]  # sets its rules refer to
    subject: str  # id of its subject set (a cluster-wide pods set, not written to etcd unless a rule uses it)


@dataclass(eq=False)
class PolicyState:
    policy: Policy
    compiled: CompiledPolicy
    specs: Mapping[str, SetSpec]
    selected: set[PodKey] = field(default_factory=set)


class MembershipState:
    """Pods, namespaces, policies and what they imply; marks changed output keys dirty."""

    def __init__(self) -> None:
        self.selector_evaluations = 0
        self._pods: dict[PodKey, Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._policies: dict[PolicyKey, PolicyState] = {}
        self._sets: dict[str, SetState] = {}
        self._pods_by_ns: dict[str, set[PodKey]] = {}
        self._index = SelectorIndex()
        self._ns_matches: dict[str, set[str]] = {}  # namespace -> ns-selector sets matching it
        self._port_sets: dict[tuple[str, Protocol], str] = {}  # named port -> its set, if referenced
        self._named_port_pods: dict[tuple[str, Protocol], set[PodKey]] = {}  # endpoint pods declaring it
        self._pod_sets: dict[PodKey, set[str]] = {}  # reverse: pods sets containing the pod
        self._pod_policies: dict[PodKey, set[PolicyKey]] = {}  # reverse: policies selecting the pod
        self._cpolicies: dict[str, ClusterPolicyState] = {}
        self._node_cidrs: dict[str, tuple[str, ...]] = {}  # node -> its pod CIDRs (nodes with some only)
        self._out = ChangeTracker()

    # ---- pods ----------------------------------------------------------------

    def set_pod(self, pod: Pod) -> None:
        old = self._pods.get(pod.key)
        if old == pod:
            return
        self._pods[pod.key] = pod
        index_add(self._pods_by_ns, pod.namespace, pod.key)
        was, now = old is not None and is_endpoint(old), is_endpoint(pod)
        if old is not None and was and not now:
            self._detach(old)
        elif now and not was:
            self._attach(pod)
        elif old is not None and was and now:
            self._update_endpoint_pod(old, pod)
        if old is not None:
            self._dirty_endpoint(old)
        self._dirty_endpoint(pod)

    def remove_pod(self, namespace: str, name: str) -> None:
        old = self._pods.pop((namespace, name), None)
        if old is None:
            return
        index_discard(self._pods_by_ns, namespace, old.key)
        if is_endpoint(old):
            self._detach(old)
        self._dirty_endpoint(old)

    # ---- namespaces ----------------------------------------------------------

    def set_namespace(self, namespace: Namespace) -> None:
        old = self._namespaces.get(namespace.name)
        if old == namespace:
            return
        self._namespaces[namespace.name] = namespace
        if old is None:
            candidates = set(self._index.ns_selector_sets)
        else:
            candidates = self._index.for_namespace_labels(changed_keys(old.labels, namespace.labels))
        for sid in candidates:
            state = self._sets[sid]
            selector = self._ns_selector(state)
            self._set_namespace_match(state, namespace.name, self._eval(selector, namespace.labels))

    def remove_namespace(self, name: str) -> None:
        if self._namespaces.pop(name, None) is None:
            return
        for sid in list(self._ns_matches.get(name, ())):
            self._set_namespace_match(self._sets[sid], name, False)

    # ---- nodes ---------------------------------------------------------------

    def set_node(self, node: Node) -> None:
        """A Node's pod CIDRs (``nodes/<node>``; a node without any has no key). Any other
        change of the Node (its status, every few minutes) costs nothing."""
        if self._node_cidrs.get(node.name, ()) == node.pod_cidrs:
            return
        if node.pod_cidrs:
            self._node_cidrs[node.name] = node.pod_cidrs
        else:
            del self._node_cidrs[node.name]
        self._out.mark(node_key(node.name))

    def remove_node(self, name: str) -> None:
        if self._node_cidrs.pop(name, None) is not None:
            self._out.mark(node_key(name))

    # ---- policies ------------------------------------------------------------

    def set_policy(self, policy: Policy) -> None:
        pk = policy.key
        old = self._policies.get(pk)
        if old is not None and old.policy == policy:
            return
        compilation = compile_policy(policy)
        for sid, spec in compilation.sets.items():
            state = self._sets.get(sid) or self._create_set(sid, spec)
            state.refs.add(pk)
            self._out.mark(set_key(sid))  # a set that was only a subject is written from now on
        if old is not None:
            for sid in old.specs.keys() - compilation.sets.keys():
                self._unref_set(sid, pk)
        new = PolicyState(policy, compilation.compiled, compilation.sets)
        if old is not None and old.policy.pod_selector == policy.pod_selector:
            new.selected = old.selected
            if (old.compiled.ingress is None, old.compiled.egress is None) != (
                new.compiled.ingress is None,
                new.compiled.egress is None,
            ):
                for key in new.selected:
                    self._dirty_endpoint(self._pods[key])
            self._policies[pk] = new
        else:
            if old is not None:
                self._drop_selection(old)
            self._policies[pk] = new
            self._index.add_policy(policy)
            for pod_key in self._pods_by_ns.get(policy.namespace, ()):
                pod = self._pods[pod_key]
                if is_endpoint(pod) and self._eval(policy.pod_selector, pod.labels):
                    self._select(new, pod, True)
        self._out.mark(policy_key(*pk))

    def remove_policy(self, namespace: str, name: str) -> None:
        pk = (namespace, name)
        state = self._policies.pop(pk, None)
        if state is None:
            return
        self._drop_selection(state)
        for sid in state.specs:
            self._unref_set(sid, pk)
        self._out.mark(policy_key(*pk))

    # ---- cluster policies (ClusterNetworkPolicy) -------------------------------
    #
    # A cluster policy's subject is a cluster-wide pods set (namespaceSelector AND
    # podSelector): its membership is maintained by the same indexed machinery as
    # peer sets, so a label change re-evaluates it only when a referenced key
    # changed. Membership changes of a subject set dirty the pod's endpoint.

    def set_cluster_policy(self, policy: ClusterPolicy) -> None:
        name = policy.name
        old = self._cpolicies.get(name)
        if old is not None and old.policy == policy:
            return
        compilation = compile_cluster_policy(policy)
        for sid, spec in compilation.sets.items():
            state = self._sets.get(sid) or self._create_set(sid, spec)
            state.crefs.add(name)
            self._out.mark(set_key(sid))  # a set that was only a subject is written from now on
        subject_spec = policy.subject_spec()
        subject = set_id(subject_spec)
        subject_state = self._sets.get(subject) or self._create_set(subject, subject_spec)
        subject_state.subject_of.add(name)
        new = ClusterPolicyState(policy, compilation.compiled, compilation.sets, subject)
        self._cpolicies[name] = new
        if old is not None:
            for sid in old.specs.keys() - compilation.sets.keys():
                self._sets[sid].crefs.discard(name)
                self._release_set(sid)
        shape = (new.compiled.tier, new.compiled.priority, bool(new.compiled.ingress), bool(new.compiled.egress))
        if old is None or old.subject != subject or shape != (
            old.compiled.tier,
            old.compiled.priority,
            bool(old.compiled.ingress),
            bool(old.compiled.egress),
        ):
            self._dirty_members(subject_state)
            if old is not None and old.subject != subject:
                old_subject = self._sets[old.subject]
                old_subject.subject_of.discard(name)
                self._dirty_members(old_subject)
                self._release_set(old.subject)
        self._out.mark(cluster_policy_key(name))

    def remove_cluster_policy(self, name: str) -> None:
        state = self._cpolicies.pop(name, None)
        if state is None:
            return
        subject = self._sets[state.subject]
        subject.subject_of.discard(name)
        self._dirty_members(subject)
        self._release_set(state.subject)
        for sid in state.specs:
            self._sets[sid].crefs.discard(name)
            self._release_set(sid)
        self._out.mark(cluster_policy_key(name))

    def _dirty_members(self, state: SetState) -> None:
        for key in state.members:
            self._dirty_endpoint(self._pods[key])

    def _pod_cluster_policies(self, key: PodKey) -> set[str]:
        """Cluster policies whose subject selects the endpoint pod ``key``."""
        out: set[str] = set()
        for sid in self._pod_sets.get(key, ()):
            out |= self._sets[sid].subject_of
        return out

    # ---- evaluation and membership ------------------------------------------

    def _eval(self, selector: LabelSelector, labels: Mapping[str, str]) -> bool:
        self.selector_evaluations += 1
        return selector.matches(labels)

    @staticmethod
    def _pods_spec(state: SetState) -> PodsSetSpec:
        if not isinstance(state.spec, PodsSetSpec):
            raise TypeError(f"set {state.sid} is not a pods set")
        return state.spec

    def _ns_selector(self, state: SetState) -> LabelSelector:
        selector = self._pods_spec(state).namespace_selector
        if selector is None:
            raise TypeError(f"set {state.sid} has no namespace selector")
        return selector

    def _wants(self, state: SetState, pod: Pod) -> bool:
        spec = self._pods_spec(state)
        in_scope = (
            pod.namespace == spec.namespace if spec.namespace is not None else (pod.namespace in state.namespaces)
        )
        return in_scope and self._eval(spec.pod_selector, pod.labels)

    def _member(self, state: SetState, key: PodKey, member: bool) -> None:
        if (key in state.members) == member:
            return
        if member:
            state.members.add(key)
            index_add(self._pod_sets, key, state.sid)
        else:
            state.members.discard(key)
            index_discard(self._pod_sets, key, state.sid)
        self._out.mark(set_key(state.sid))
        if state.subject_of and (pod := self._pods.get(key)) is not None:
            self._dirty_endpoint(pod)

    def _select(self, state: PolicyState, pod: Pod, selected: bool) -> None:
        if (pod.key in state.selected) == selected:
            return
        pk = state.policy.key
        if selected:
            state.selected.add(pod.key)
            index_add(self._pod_policies, pod.key, pk)
        else:
            state.selected.discard(pod.key)
            index_discard(self._pod_policies, pod.key, pk)
        self._dirty_endpoint(pod)

    def _drop_selection(self, state: PolicyState) -> None:
        policy = state.policy
        for key in list(state.selected):
            self._select(state, self._pods[key], False)
        self._index.remove_policy(policy)

    def _dirty_endpoint(self, pod: Pod) -> None:
        if pod.node:
            self._out.mark(endpoint_key(pod.node, pod.namespace, pod.name))

    def _dirty_port_sets(self, named: Iterable[tuple[str, Protocol]]) -> None:
        for np in named:
            sid = self._port_sets.get(np)
            if sid is not None:
                self._out.mark(set_key(sid))

    def _attach(self, pod: Pod) -> None:
        """Add a pod that just became an endpoint: evaluate every selector in its scope."""
        ns = pod.namespace
        for sid in self._index.sets_bound_to(ns) | self._ns_matches.get(ns, set()):
            state = self._sets[sid]
            self._member(state, pod.key, self._wants(state, pod))
        for pk in self._index.policies_in(ns):
            state_p = self._policies[pk]
            if self._eval(state_p.policy.pod_selector, pod.labels):
                self._select(state_p, pod, True)
        for np in pod.named_ports():
            index_add(self._named_port_pods, np, pod.key)
        self._dirty_port_sets(pod.named_ports())

    def _detach(self, pod: Pod) -> None:
        """Remove a pod that stopped being an endpoint, via the reverse indexes."""
        for sid in list(self._pod_sets.get(pod.key, ())):
            self._member(self._sets[sid], pod.key, False)
        for pk in list(self._pod_policies.get(pod.key, ())):
            self._select(self._policies[pk], pod, False)
        for np in pod.named_ports():
            index_discard(self._named_port_pods, np, pod.key)
        self._dirty_port_sets(pod.named_ports())

    def _update_endpoint_pod(self, old: Pod, new: Pod) -> None:
        sids, pks = self._index.for_pod_labels(new.namespace, changed_keys(old.labels, new.labels))
        for sid in sids:
            state = self._sets[sid]
            self._member(state, new.key, self._wants(state, new))
        for pk in pks:
            state_p = self._policies[pk]
            self._select(state_p, new, self._eval(state_p.policy.pod_selector, new.labels))
        if old.ips != new.ips:
            for sid in self._pod_sets.get(new.key, ()):
                self._out.mark(set_key(sid))
        if old.ips != new.ips or old.ports != new.ports:
            for np in old.named_ports() - new.named_ports():
                index_discard(self._named_port_pods, np, new.key)
            for np in new.named_ports():
                index_add(self._named_port_pods, np, new.key)
            self._dirty_port_sets(old.named_ports() | new.named_ports())

    def _set_namespace_match(self, state: SetState, namespace: str, match: bool) -> None:
        if (namespace in state.namespaces) == match:
            return
        if match:
            state.namespaces.add(namespace)
            index_add(self._ns_matches, namespace, state.sid)
        else:
            state.namespaces.discard(namespace)
            index_discard(self._ns_matches, namespace, state.sid)
        selector = self._pods_spec(state).pod_selector
        for key in self._pods_by_ns.get(namespace, ()):
            pod = self._pods[key]
            if is_endpoint(pod):
                self._member(state, key, match and self._eval(selector, pod.labels))

    def _create_set(self, sid: str, spec: SetSpec) -> SetState:
        state = SetState(sid, spec)
        self._sets[sid] = state
        self._out.mark(set_key(sid))
        if isinstance(spec, PortsSetSpec):
            self._port_sets[(spec.name, spec.protocol)] = sid
        elif isinstance(spec, PodsSetSpec):
            self._index.add_set(sid, spec)
            if spec.namespace is not None:
                for key in self._pods_by_ns.get(spec.namespace, ()):
                    pod = self._pods[key]
                    if is_endpoint(pod):
                        self._member(state, key, self._wants(state, pod))
            else:
                selector = self._ns_selector(state)
                for namespace in self._namespaces.values():
                    if self._eval(selector, namespace.labels):
                        self._set_namespace_match(state, namespace.name, True)
        return state

    def _unref_set(self, sid: str, pk: PolicyKey) -> None:
        self._sets[sid].refs.discard(pk)
        self._release_set(sid)

    def _release_set(self, sid: str) -> None:
        """Forget set ``sid`` once nothing refers to it any more."""
        state = self._sets[sid]
        self._out.mark(set_key(sid))  # it may have become a subject only (no longer written)
        if state.refs or state.crefs or state.subject_of:
            return
        del self._sets[sid]
        self._out.mark(set_key(sid))
        spec = state.spec
        if isinstance(spec, PortsSetSpec):
            del self._port_sets[(spec.name, spec.protocol)]
        elif isinstance(spec, PodsSetSpec):
            for key in state.members:
                index_discard(self._pod_sets, key, sid)
            self._index.remove_set(sid, spec)
            for namespace in state.namespaces:
                index_discard(self._ns_matches, namespace, sid)
