"""Peer-set specifications and the compilation of one policy into the enforcement model.

Compiling a :class:`Policy` does not depend on the rest of the world: the set
ids it refers to are content hashes of the set *definitions*. Resolving a set
to members does depend on the world; the helpers for that are here too so
the full compiler and the incremental engine produce identical values.

Peer → set mapping:

* ``ipBlock`` → ``net`` set ``{cidr, except}``.
* ``podSelector`` only → ``pods`` set in the policy's namespace.
* ``namespaceSelector`` (with or without ``podSelector``) → ``pods`` set over
  the matching namespaces; an absent ``podSelector`` is normalised to the
  empty selector (all pods), so ``{nsSel}`` and ``{nsSel, podSelector: {}}``
  are one set.
* a named port → ``ports`` set ``{name, protocol}`` over every endpoint pod in
  the cluster (matched on destination ip + port, for ingress and egress).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    PeerSet,
    Protocol,
    SetKind,
)
from netfence.model.policy import IPBlock, Peer, Policy, PortSpec, Rule
from netfence.model.selectors import EVERYTHING, LabelSelector
from netfence.model.world import Pod


@dataclass(frozen=True, slots=True)
class PodsSetSpec:
    """Pods in ``namespace`` (or in namespaces matching ``namespace_selector``) matching ``pod_selector``.

    Exactly one of ``namespace`` / ``namespace_selector`` is set.
    """

    namespace: str | None
    namespace_selector: LabelSelector | None
    pod_selector: LabelSelector

    kind: ClassVar[SetKind] = "pods"

    def definition(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "namespaceSelector": (None if self.namespace_selector is None else self.namespace_selector.canonical()),
            "podSelector": self.pod_selector.canonical(),
        }


@dataclass(frozen=True, slots=True)
class NetSetSpec:
    cidr: str
    excepts: tuple[str, ...]

    kind: ClassVar[SetKind] = "net"

    def definition(self) -> dict[str, Any]:
        return {"cidr": self.cidr, "except": list(self.excepts)}


@dataclass(frozen=True, slots=True)
class PortsSetSpec:
    name: str
    protocol: Protocol

    kind: ClassVar[SetKind] = "ports"

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "protocol": self.protocol}


SetSpec = PodsSetSpec | NetSetSpec | PortsSetSpec


def set_id(spec: SetSpec) -> str:
    return PeerSet.make_id(spec.kind, spec.definition())


def set_key(sid: str) -> str:
    return f"sets/{sid}"


def policy_key(namespace: str, name: str) -> str:
    return f"policies/{namespace}/{name}"


def endpoint_key(node: str, namespace: str, name: str) -> str:
    return f"endpoints/{node}/{namespace}/{name}"


def node_key(node: str) -> str:
    """``nodes/<node>``: the node's pod CIDRs (``NodeNetwork``)."""
    return f"nodes/{node}"


def peer_spec(policy_namespace: str, peer: Peer) -> SetSpec:
    """The peer set a NetworkPolicyPeer compiles to."""
    if peer.ip_block is not None:
        return net_spec(peer.ip_block)
    if peer.namespace_selector is None:
        return PodsSetSpec(policy_namespace, None, peer.pod_selector or EVERYTHING)
    return PodsSetSpec(None, peer.namespace_selector, peer.pod_selector or EVERYTHING)


def net_spec(block: IPBlock) -> NetSetSpec:
    return NetSetSpec(cidr=block.cidr, excepts=tuple(sorted(set(block.except_))))


def _port_sort_key(port: CompiledPort) -> tuple[str, int, int, str]:
    return (port.protocol, port.port or 0, port.end_port or 0, port.named_set or "")


@dataclass(frozen=True, slots=True)
class PolicyCompilation:
    compiled: CompiledPolicy
    sets: Mapping[str, SetSpec]  # every set the compiled policy refers to, by id


class _Compiler:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.sets: dict[str, SetSpec] = {}

    def _add(self, spec: SetSpec) -> str:
        sid = set_id(spec)
        self.sets[sid] = spec
        return sid

    def port(self, spec: PortSpec) -> CompiledPort:
        if isinstance(spec.port, str):
            sid = self._add(PortsSetSpec(spec.port, spec.protocol))
            return CompiledPort(protocol=spec.protocol, named_set=sid)
        return CompiledPort(protocol=spec.protocol, port=spec.port, end_port=spec.end_port)

    def rule(self, rule: Rule) -> CompiledRule:
        peers = None
        if rule.peers is not None:
            peers = tuple(sorted({self._add(peer_spec(self.policy.namespace, p)) for p in rule.peers}))
        ports = None
        if rule.ports is not None:
            ports = tuple(sorted({self.port(p) for p in rule.ports}, key=_port_sort_key))
        return CompiledRule(peers=peers, ports=ports)

    def rules(self, rules: tuple[Rule, ...] | None) -> tuple[CompiledRule, ...] | None:
        return None if rules is None else tuple(self.rule(r) for r in rules)


def compile_policy(policy: Policy) -> PolicyCompilation:
    """Compile one policy (pure: independent of pods and namespaces)."""
    compiler = _Compiler(policy)
    compiled = CompiledPolicy(
        namespace=policy.namespace,
        name=policy.name,
        uid=policy.uid,
        ingress=compiler.rules(policy.ingress),
        egress=compiler.rules(policy.egress),
    )
    return PolicyCompilation(compiled=compiled, sets=dict(compiler.sets))


def net_members(spec: NetSetSpec) -> tuple[str, ...]:
    return tuple(sorted([spec.cidr, *(f"!{e}" for e in spec.excepts)]))


def pod_ip_members(pods: Iterable[Pod]) -> tuple[str, ...]:
    """Members of a ``pods`` set: every IP (v4 and v6) of the given pods, sorted."""
    return tuple(sorted({ip for pod in pods for ip in pod.ips}))


def port_entries(pod: Pod, name: str, protocol: Protocol) -> set[str]:
    """``ip,proto:port`` entries of one pod for a named port (ipset hash:ip,port form)."""
    proto = protocol.lower()
    return {
        f"{ip},{proto}:{cp.port}" for cp in pod.ports if cp.name == name and cp.protocol == protocol for ip in pod.ips
    }


def port_members(pods: Iterable[Pod], name: str, protocol: Protocol) -> tuple[str, ...]:
    entries: set[str] = set()
    for pod in pods:
        entries |= port_entries(pod, name, protocol)
    return tuple(sorted(entries))


def peer_set(sid: str, spec: SetSpec, members: tuple[str, ...]) -> PeerSet:
    return PeerSet(id=sid, kind=spec.kind, definition=spec.definition(), members=members)


def pods_spec_matches(spec: PodsSetSpec, pod: Pod, namespace_labels: Mapping[str, str] | None) -> bool:
    """Whether an endpoint pod belongs to a ``pods`` set.

    ``namespace_labels`` is None when the pod's Namespace is unknown: such a
    pod matches no namespaceSelector (not even ``{}``) until the namespace is seen.
    """
    if spec.namespace_selector is None:
        return pod.namespace == spec.namespace and spec.pod_selector.matches(pod.labels)
    if namespace_labels is None:
        return False
    return spec.namespace_selector.matches(namespace_labels) and spec.pod_selector.matches(pod.labels)


def make_endpoint(
    pod: Pod, policies: Iterable[CompiledPolicy], cluster: Iterable[CompiledClusterPolicy] = ()
) -> Endpoint:
    """The endpoint record of a (selected, scheduled) endpoint pod; policy keys sorted.

    ``cluster``: the ClusterNetworkPolicies whose subject selects the pod; each
    is listed per tier in the directions where it has rules, in evaluation
    order (priority, then name).
    """
    chosen = sorted(policies, key=lambda p: p.key)
    if pod.node is None:
        raise ValueError(f"pod {pod.namespace}/{pod.name} has no node")
    ordered = sorted(cluster, key=lambda c: (c.priority, c.name))

    def tier(name: str, direction: str) -> tuple[str, ...]:
        return tuple(c.name for c in ordered if c.tier == name and c.rules(direction))

    return Endpoint(
        node=pod.node,
        namespace=pod.namespace,
        name=pod.name,
        ips=pod.ips,
        ingress=tuple(p.key for p in chosen if p.ingress is not None),
        egress=tuple(p.key for p in chosen if p.egress is not None),
        admin_ingress=tier("Admin", "ingress"),
        admin_egress=tier("Admin", "egress"),
        baseline_ingress=tier("Baseline", "ingress"),
        baseline_egress=tier("Baseline", "egress"),
    )


@functools.lru_cache(maxsize=1 << 16)
def _address(ip: str) -> tuple[int, int]:
    """(IP version, integer value) of an address; cached: the same pod IPs are tested over and over."""
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def net_matcher(spec: NetSetSpec) -> Callable[[str], bool]:
    """ipBlock semantics as a predicate: inside cidr and outside every except.

    Compares integers (an address is in a network iff it lies between its
    first and last address); an except of the other IP version never matches.
    """
    net = ipaddress.ip_network(spec.cidr)
    version, first, last = net.version, int(net.network_address), int(net.broadcast_address)
    excepts = [
        (int(e.network_address), int(e.broadcast_address))
        for e in (ipaddress.ip_network(x) for x in spec.excepts)
        if e.version == version
    ]

    def matches(ip: str) -> bool:
        ip_version, value = _address(ip)
        if ip_version != version or not first <= value <= last:
            return False
        return not any(lo <= value <= hi for lo, hi in excepts)

    return matches
