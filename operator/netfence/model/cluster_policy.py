"""ClusterNetworkPolicy (policy.networking.k8s.io, module sigs.k8s.io/network-policy-api v0.3.0).

Typed values, the parser and the compilation into the enforcement model (pure).

The API (v1alpha2 and v1beta1 have the same schema) defines a cluster-scoped
policy with a ``tier`` (Admin: evaluated before NetworkPolicy; Baseline:
after it, only where no NetworkPolicy isolates the pod), a ``priority``
(0-1000, lower first), a ``subject`` (``namespaces`` selector, or ``pods``:
namespaceSelector AND podSelector) and ordered ingress/egress rules, each with
an ``action`` (Accept, Deny, Pass), peers (``namespaces``, ``pods``; egress
also ``networks`` CIDRs, and in the experimental channel ``nodes`` and
``domainNames``) and optional ``protocols`` (tcp/udp/sctp destinationPort
number or range; experimental ``destinationNamedPort``).

Peers compile to the same peer sets as NetworkPolicy peers (a ``namespaces``
peer is the ``pods`` set {namespaceSelector, podSelector: {}}), so a selector
used by both kinds is one set, and a label change costs O(affected sets).

**Fail closed.** What this version cannot enforce as written (``nodes`` and
``domainNames`` peers, a peer or protocol entry with no field this version
knows, an unknown action) is never widened: following the API's own rule for
unknown peers, an Accept rule drops the part it cannot match (a rule left
without peers matches nothing), and a Deny or Pass rule becomes "Deny all" (any
peer, any port). Each such case is recorded in :attr:`ClusterPolicy.notes`
(the status shows them as a Warning, the controller posts an Event).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netfence.model.enforcement import (
    ACTIONS,
    TIERS,
    Action,
    CompiledClusterPolicy,
    CompiledClusterRule,
    CompiledPort,
    CompiledRule,
    Protocol,
    Tier,
)
from netfence.model.peersets import NetSetSpec, PodsSetSpec, PortsSetSpec, SetSpec, set_id
from netfence.model.selectors import EVERYTHING, LabelSelector, PolicyError

API_GROUP = "policy.networking.k8s.io"
#: Versions of the API this parser reads (same schema); the controller watches the first one served.
API_VERSIONS: tuple[str, ...] = ("v1beta1", "v1alpha2")
PLURAL = "clusternetworkpolicies"
MAX_PRIORITY = 1000
_PROTOCOL_FIELDS: dict[str, Protocol] = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}


@dataclass(frozen=True, slots=True)
class ClusterPeer:
    """A peer: pods selected by (namespace selector, pod selector), or CIDR networks."""

    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector = EVERYTHING
    networks: tuple[str, ...] = ()

    def spec(self) -> list[SetSpec]:
        if self.namespace_selector is not None:
            return [PodsSetSpec(None, self.namespace_selector, self.pod_selector)]
        return [NetSetSpec(cidr=cidr, excepts=()) for cidr in self.networks]


@dataclass(frozen=True, slots=True)
class ClusterPort:
    protocol: Protocol
    port: int | None = None  # None: every port of the protocol
    end_port: int | None = None
    named: str | None = None  # destinationNamedPort


@dataclass(frozen=True, slots=True)
class ClusterRule:
    """A rule after fail-closed normalisation. ``peers`` None = any peer; ``ports`` None = any port."""

    action: Action
    peers: tuple[ClusterPeer, ...] | None
    ports: tuple[ClusterPort, ...] | None
    name: str = ""


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    name: str
    uid: str = ""
    generation: int = 0
    tier: Tier = "Admin"
    priority: int = 0
    subject_namespaces: LabelSelector = EVERYTHING
    subject_pods: LabelSelector = EVERYTHING
    ingress: tuple[ClusterRule, ...] = ()
    egress: tuple[ClusterRule, ...] = ()
    #: What could not be enforced as written, with what is enforced instead (one line each).
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name

    def subject_spec(self) -> PodsSetSpec:
        """The subject as a cluster-wide pods set (namespaceSelector AND podSelector)."""
        return PodsSetSpec(None, self.subject_namespaces, self.subject_pods)


class _Unsupported(Exception):
    """A part of a rule this version cannot enforce as written (message: what and where)."""


def _mapping(data: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{path}: must be an object, got {data!r}")
    return data


def _namespaced_pod(data: Any, path: str) -> tuple[LabelSelector, LabelSelector]:
    body = _mapping(data, path)
    ns = LabelSelector.from_k8s(body.get("namespaceSelector"), f"{path}.namespaceSelector")
    pods = LabelSelector.from_k8s(body.get("podSelector"), f"{path}.podSelector")
    return ns, pods


def _parse_subject(data: Any) -> tuple[LabelSelector, LabelSelector]:
    subject = _mapping(data if data is not None else {}, "spec.subject")
    present = [k for k in ("namespaces", "pods") if subject.get(k) is not None]
    if len(present) != 1:
        raise PolicyError("spec.subject: exactly one of namespaces or pods must be set")
    if present[0] == "namespaces":
        return LabelSelector.from_k8s(subject["namespaces"], "spec.subject.namespaces"), EVERYTHING
    return _namespaced_pod(subject["pods"], "spec.subject.pods")


def _parse_cidr(text: Any, path: str) -> str:
    if not isinstance(text, str) or "/" not in text:
        raise _Unsupported(f"{path}: {text!r} is not a CIDR")
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise _Unsupported(f"{path}: {text!r} is not a CIDR ({exc})") from exc


def _parse_peer(data: Any, path: str, egress: bool) -> ClusterPeer:
    body = _mapping(data, path)
    present = [k for k, v in body.items() if v is not None]
    if len(present) != 1:
        raise _Unsupported(f"{path}: a peer must set exactly one field this version knows, got {sorted(present)}")
    kind = present[0]
    if kind == "namespaces":
        return ClusterPeer(namespace_selector=LabelSelector.from_k8s(body[kind], f"{path}.namespaces"))
    if kind == "pods":
        ns, pods = _namespaced_pod(body[kind], f"{path}.pods")
        return ClusterPeer(namespace_selector=ns, pod_selector=pods)
    if kind == "networks" and egress:
        raw = body[kind]
        if not isinstance(raw, list) or not raw:
            raise _Unsupported(f"{path}.networks: must be a non-empty list")
        cidrs = sorted({_parse_cidr(c, f"{path}.networks[{i}]") for i, c in enumerate(raw)})
        return ClusterPeer(networks=tuple(cidrs))
    raise _Unsupported(f"{path}.{kind}: peer type not supported by this version")


def _check_port(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise _Unsupported(f"{path}: {value!r} is not a port number")
    return value


def _parse_protocol(data: Any, path: str) -> ClusterPort:
    body = _mapping(data, path)
    present = [k for k, v in body.items() if v is not None]
    if len(present) != 1:
        raise _Unsupported(
            f"{path}: a protocol entry must set exactly one field this version knows, got {sorted(present)}"
        )
    kind = present[0]
    if kind == "destinationNamedPort":
        name = body[kind]
        if not isinstance(name, str) or not name:
            raise _Unsupported(f"{path}.destinationNamedPort: must be a port name")
        # A named port has no protocol in this API: it matches the named container ports of every protocol.
        return ClusterPort(protocol="TCP", named=name)
    if kind not in _PROTOCOL_FIELDS:
        raise _Unsupported(f"{path}.{kind}: protocol not supported by this version")
    proto = _PROTOCOL_FIELDS[kind]
    fields = _mapping(body[kind], f"{path}.{kind}")
    unknown = sorted(k for k, v in fields.items() if v is not None and k != "destinationPort")
    if unknown:
        raise _Unsupported(f"{path}.{kind}: unsupported fields {unknown}")
    dest = fields.get("destinationPort")
    if dest is None:
        return ClusterPort(protocol=proto)
    port = _mapping(dest, f"{path}.{kind}.destinationPort")
    if port.get("number") is not None and port.get("range") is None:
        return ClusterPort(protocol=proto, port=_check_port(port["number"], f"{path}.{kind}.destinationPort.number"))
    if port.get("range") is not None and port.get("number") is None:
        rng = _mapping(port["range"], f"{path}.{kind}.destinationPort.range")
        start = _check_port(rng.get("start"), f"{path}.{kind}.destinationPort.range.start")
        end = _check_port(rng.get("end"), f"{path}.{kind}.destinationPort.range.end")
        if end < start:
            raise _Unsupported(f"{path}.{kind}.destinationPort.range: end {end} < start {start}")
        return ClusterPort(protocol=proto, port=start, end_port=end)
    raise _Unsupported(f"{path}.{kind}.destinationPort: exactly one of number or range must be set")


def _deny_all(name: str) -> ClusterRule:
    return ClusterRule(action="Deny", peers=None, ports=None, name=name)


def _parse_rule(data: Any, path: str, egress: bool, notes: list[str]) -> ClusterRule:
    body = _mapping(data, path)
    name = body.get("name")
    name = name if isinstance(name, str) else ""
    action = body.get("action")
    if action not in ACTIONS:
        notes.append(f"{path}.action: {action!r} is not Accept, Deny or Pass; enforced as Deny all")
        return _deny_all(name)
    peers_field = "to" if egress else "from"
    raw_peers = body.get(peers_field)
    if not isinstance(raw_peers, list) or not raw_peers:
        problem = f"{path}.{peers_field}: must be a non-empty list"
        if action == "Accept":
            notes.append(f"{problem}; this Accept rule matches nothing")
            return ClusterRule(action=action, peers=(), ports=None, name=name)
        notes.append(f"{problem}; this {action} rule is enforced as Deny all")
        return _deny_all(name)
    peers: list[ClusterPeer] = []
    for i, raw in enumerate(raw_peers):
        try:
            peers.append(_parse_peer(raw, f"{path}.{peers_field}[{i}]", egress))
        except (_Unsupported, PolicyError) as exc:
            if action != "Accept":
                notes.append(f"{exc}; this {action} rule is enforced as Deny all")
                return _deny_all(name)
            notes.append(f"{exc}; this Accept rule does not match that peer")
    raw_protocols = body.get("protocols")
    ports: list[ClusterPort] | None = None
    if raw_protocols is not None:
        if not isinstance(raw_protocols, list):
            raw_protocols = [raw_protocols]
        ports = []
        for i, raw in enumerate(raw_protocols):
            try:
                ports.append(_parse_protocol(raw, f"{path}.protocols[{i}]"))
            except (_Unsupported, PolicyError) as exc:
                if action != "Accept":
                    notes.append(f"{exc}; this {action} rule is enforced as Deny all")
                    return _deny_all(name)
                notes.append(f"{exc}; this Accept rule does not match that protocol entry")
    return ClusterRule(action=action, peers=tuple(peers), ports=None if ports is None else tuple(ports), name=name)


def _parse_rules(data: Any, path: str, egress: bool, notes: list[str]) -> tuple[ClusterRule, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise PolicyError(f"{path}: must be a list, got {data!r}")
    return tuple(_parse_rule(raw, f"{path}[{i}]", egress, notes) for i, raw in enumerate(data))


def cluster_policy_from_k8s(body: Mapping[str, Any]) -> ClusterPolicy:
    """Parse a ClusterNetworkPolicy body.

    Raises :class:`PolicyError` (naming the field) only when the policy as a
    whole cannot be understood (no name, tier or subject): then it cannot be
    enforced at all. Rule-level problems never raise: they are enforced fail
    closed and listed in ``notes``.
    """
    meta = _mapping(body.get("metadata") or {}, "metadata")
    name = meta.get("name")
    if not name or not isinstance(name, str):
        raise PolicyError("metadata.name: required")
    spec = _mapping(body.get("spec") or {}, "spec")
    tier = spec.get("tier")
    if tier not in TIERS:
        raise PolicyError(f"spec.tier: {tier!r} is not Admin or Baseline")
    priority = spec.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
        raise PolicyError(f"spec.priority: must be an integer from 0 to {MAX_PRIORITY}, got {priority!r}")
    ns_sel, pod_sel = _parse_subject(spec.get("subject"))
    notes: list[str] = []
    ingress = _parse_rules(spec.get("ingress"), "spec.ingress", False, notes)
    egress = _parse_rules(spec.get("egress"), "spec.egress", True, notes)
    generation = meta.get("generation")
    return ClusterPolicy(
        name=name,
        uid=str(meta.get("uid") or ""),
        generation=generation if isinstance(generation, int) else 0,
        tier=tier,
        priority=priority,
        subject_namespaces=ns_sel,
        subject_pods=pod_sel,
        ingress=ingress,
        egress=egress,
        notes=tuple(notes),
    )


# ---- compilation ----------------------------------------------------------------


def cluster_policy_key(name: str) -> str:
    """The etcd key (relative) of a compiled cluster policy."""
    return f"cpolicies/{name}"


@dataclass(frozen=True, slots=True)
class ClusterPolicyCompilation:
    compiled: CompiledClusterPolicy
    sets: Mapping[str, SetSpec]  # every set its rules refer to, by id (the subject is not one)


def _port_sort_key(port: CompiledPort) -> tuple[str, int, int, str]:
    return (port.protocol, port.port or 0, port.end_port or 0, port.named_set or "")


def compile_cluster_policy(policy: ClusterPolicy) -> ClusterPolicyCompilation:
    """Compile one cluster policy (pure: independent of pods and namespaces). Rule order is kept."""
    sets: dict[str, SetSpec] = {}

    def add(spec: SetSpec) -> str:
        sid = set_id(spec)
        sets[sid] = spec
        return sid

    def port(p: ClusterPort) -> list[CompiledPort]:
        if p.named is not None:
            return [
                CompiledPort(protocol=proto, named_set=add(PortsSetSpec(p.named, proto)))
                for proto in _PROTOCOL_FIELDS.values()
            ]
        return [CompiledPort(protocol=p.protocol, port=p.port, end_port=p.end_port)]

    def rule(r: ClusterRule) -> CompiledClusterRule:
        peers = None
        if r.peers is not None:
            peers = tuple(sorted({add(spec) for peer in r.peers for spec in peer.spec()}))
        ports = None
        if r.ports is not None:
            ports = tuple(sorted({cp for p in r.ports for cp in port(p)}, key=_port_sort_key))
        return CompiledClusterRule(action=r.action, match=CompiledRule(peers=peers, ports=ports), name=r.name)

    compiled = CompiledClusterPolicy(
        name=policy.name,
        uid=policy.uid,
        tier=policy.tier,
        priority=policy.priority,
        ingress=tuple(rule(r) for r in policy.ingress),
        egress=tuple(rule(r) for r in policy.egress),
    )
    return ClusterPolicyCompilation(compiled=compiled, sets=sets)


def tier_order(policies: list[CompiledClusterPolicy]) -> tuple[list[str], list[str]]:
    """(admin, baseline) names in evaluation order: priority, then name (ties are the API's "any")."""
    ordered = sorted(policies, key=lambda p: (p.priority, p.name))
    return [p.name for p in ordered if p.tier == "Admin"], [p.name for p in ordered if p.tier == "Baseline"]
