"""The enforcement model: what the controller writes to etcd and agents apply.

This module is the contract between the controller (which compiles the
Kubernetes world into these objects) and the agents (which render them into
ipset + iptables). Everything here is pure data with a stable JSON form.

Vocabulary:

* A **peer set** (:class:`PeerSet`) is a named set of addresses. Its ``id`` is
  derived from its *definition* (not its members), so the same selector used by
  many policies is one set. Kinds:

  - ``pods``: IPs of the pods matched by (namespace, namespaceSelector,
    podSelector); members are plain addresses (``10.244.0.10``, ``fd00::a``).
  - ``net``: an ipBlock; members are CIDRs, an ``except`` CIDR is written with a
    leading ``!`` (rendered as an ipset ``nomatch`` entry).
  - ``ports``: a named port resolved over every pod that declares it; members
    are ``ip,proto:port`` (``10.244.0.10,tcp:80``), as ``hash:ip,port`` wants.

* A **policy** (:class:`CompiledPolicy`) is one NetworkPolicy with its rules
  rewritten to refer to peer sets. ``ingress``/``egress`` is ``None`` when the
  policy does not cover that direction, and a tuple (possibly empty = deny all)
  when it does.

* An **endpoint** (:class:`Endpoint`) is one pod that is a policy endpoint (has
  an IP, is not hostNetwork, is not finished), with the ordered keys of the
  policies that select it per direction. An empty tuple means the pod is not
  isolated in that direction (everything allowed).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 1

SetKind = Literal["pods", "net", "ports"]
Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")


class ModelDecodeError(ValueError):
    """A stored value does not decode into the enforcement model."""


def content_hash(obj: Any, length: int = 12) -> str:
    """A short, stable hash of a JSON-serialisable object."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:length]


@dataclass(frozen=True, slots=True)
class PeerSet:
    id: str
    kind: SetKind
    definition: dict[str, Any]
    members: tuple[str, ...]  # sorted, unique

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "kind": self.kind,
            "definition": self.definition,
            "members": list(self.members),
        }

    @classmethod
    def from_json(cls, data: Any) -> PeerSet:
        try:
            kind = data["kind"]
            if kind not in ("pods", "net", "ports"):
                raise ModelDecodeError(f"unknown set kind {kind!r}")
            return cls(
                id=str(data["id"]),
                kind=kind,
                definition=dict(data.get("definition") or {}),
                members=tuple(str(m) for m in data["members"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelDecodeError(f"bad peer set: {exc!r}") from exc

    @staticmethod
    def make_id(kind: SetKind, definition: dict[str, Any]) -> str:
        return {"pods": "p", "net": "n", "ports": "q"}[kind] + content_hash({"k": kind, "d": definition})


@dataclass(frozen=True, slots=True)
class CompiledPort:
    """One entry of a rule's ports.

    ``port is None and named_set is None``: every port of ``protocol``.
    ``named_set``: the id of a ``ports`` peer set (destination ip,proto:port).
    ``end_port``: inclusive upper bound of a range starting at ``port``.
    """

    protocol: Protocol
    port: int | None = None
    end_port: int | None = None
    named_set: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol}
        if self.port is not None:
            out["port"] = self.port
        if self.end_port is not None:
            out["endPort"] = self.end_port
        if self.named_set is not None:
            out["namedSet"] = self.named_set
        return out

    @classmethod
    def from_json(cls, data: Any) -> CompiledPort:
        proto = data["protocol"]
        if proto not in PROTOCOLS:
            raise ModelDecodeError(f"unknown protocol {proto!r}")
        return cls(
            protocol=proto,
            port=data.get("port"),
            end_port=data.get("endPort"),
            named_set=data.get("namedSet"),
        )


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One ingress or egress rule.

    ``peers is None``: any peer. Otherwise the peer must be in one of the sets
    (an empty tuple never matches). ``ports is None``: any port/protocol.
    Otherwise one of the ports must match (an empty tuple never matches).
    """

    peers: tuple[str, ...] | None
    ports: tuple[CompiledPort, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "peers": None if self.peers is None else list(self.peers),
            "ports": None if self.ports is None else [p.to_json() for p in self.ports],
        }

    @classmethod
    def from_json(cls, data: Any) -> CompiledRule:
        peers = data.get("peers")
        ports = data.get("ports")
        return cls(
            peers=None if peers is None else tuple(str(p) for p in peers),
            ports=None if ports is None else tuple(CompiledPort.from_json(p) for p in ports),
        )


def _rules_json(rules: tuple[CompiledRule, ...] | None) -> list[dict[str, Any]] | None:
    return None if rules is None else [r.to_json() for r in rules]


def _rules_from(data: Any) -> tuple[CompiledRule, ...] | None:
    return None if data is None else tuple(CompiledRule.from_json(r) for r in data)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    namespace: str
    name: str
    uid: str
    ingress: tuple[CompiledRule, ...] | None
    egress: tuple[CompiledRule, ...] | None
    _set_ids: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def rules_hash(self) -> str:
        """Hash of the rules only: two policies with equal rules share chains."""
        return content_hash({"i": _rules_json(self.ingress), "e": _rules_json(self.egress)})

    @property
    def set_ids(self) -> frozenset[str]:
        """The peer and named-port sets the rules reference (computed once: relevance asks often)."""
        if self._set_ids is None:
            ids: set[str] = set()
            for rules in (self.ingress or (), self.egress or ()):
                for rule in rules:
                    ids.update(rule.peers or ())
                    ids.update(p.named_set for p in rule.ports or () if p.named_set)
            object.__setattr__(self, "_set_ids", frozenset(ids))
        assert self._set_ids is not None
        return self._set_ids

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "ingress": _rules_json(self.ingress),
            "egress": _rules_json(self.egress),
        }

    @classmethod
    def from_json(cls, data: Any) -> CompiledPolicy:
        try:
            return cls(
                namespace=str(data["namespace"]),
                name=str(data["name"]),
                uid=str(data.get("uid", "")),
                ingress=_rules_from(data.get("ingress")),
                egress=_rules_from(data.get("egress")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelDecodeError(f"bad policy: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Endpoint:
    node: str
    namespace: str
    name: str
    ips: tuple[str, ...]
    ingress: tuple[str, ...]  # policy keys "ns/name", ordered
    egress: tuple[str, ...]
    #: ClusterNetworkPolicy names per tier and direction, in evaluation order
    #: (priority, then name); written to JSON only when non-empty, so an
    #: endpoint without cluster policies keeps the value it always had.
    admin_ingress: tuple[str, ...] = ()
    admin_egress: tuple[str, ...] = ()
    baseline_ingress: tuple[str, ...] = ()
    baseline_egress: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def tiers(self, direction: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(admin, baseline) cluster policy names for ``direction`` ("ingress"/"egress")."""
        if direction == "ingress":
            return self.admin_ingress, self.baseline_ingress
        return self.admin_egress, self.baseline_egress

    @property
    def has_cluster_policies(self) -> bool:
        return bool(self.admin_ingress or self.admin_egress or self.baseline_ingress or self.baseline_egress)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "node": self.node,
            "namespace": self.namespace,
            "name": self.name,
            "ips": list(self.ips),
            "ingress": list(self.ingress),
            "egress": list(self.egress),
        }
        for field_name, value in _tier_fields(self):
            if value:
                out[field_name] = list(value)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Endpoint:
        try:
            return cls(
                node=str(data["node"]),
                namespace=str(data["namespace"]),
                name=str(data["name"]),
                ips=tuple(str(i) for i in data["ips"]),
                ingress=tuple(str(p) for p in data.get("ingress") or ()),
                egress=tuple(str(p) for p in data.get("egress") or ()),
                admin_ingress=tuple(str(p) for p in data.get("adminIngress") or ()),
                admin_egress=tuple(str(p) for p in data.get("adminEgress") or ()),
                baseline_ingress=tuple(str(p) for p in data.get("baselineIngress") or ()),
                baseline_egress=tuple(str(p) for p in data.get("baselineEgress") or ()),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelDecodeError(f"bad endpoint: {exc!r}") from exc


def pod_cidr(text: object) -> str:
    """A pod CIDR in canonical form (``10.244.1.0/24``, ``fd00:10:244:1::/64``); ValueError when it is
    none: not a string, no prefix length, or host bits set (never read as a wider network)."""
    if not isinstance(text, str) or "/" not in text:
        raise ValueError(f"{text!r} is not a CIDR")
    return str(ipaddress.ip_network(text.strip(), strict=True))


@dataclass(frozen=True, slots=True)
class NodeNetwork:
    """``nodes/<node>``: the node's pod CIDRs (``spec.podCIDRs``), read by agents started with
    ``--pod-cidrs=auto`` (a pod there is denied until the model knows it). Never empty: a node
    without pod CIDRs has no key."""

    pod_cidrs: tuple[str, ...]  # canonical, in the Node's order

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "podCIDRs": list(self.pod_cidrs)}

    @classmethod
    def from_json(cls, data: Any) -> NodeNetwork:
        raw = data.get("podCIDRs") if isinstance(data, dict) else None
        if not isinstance(raw, list) or not raw:
            raise ModelDecodeError(f"bad node: podCIDRs is not a non-empty list: {raw!r}")
        try:
            return cls(tuple(pod_cidr(c) for c in raw))
        except ValueError as exc:
            raise ModelDecodeError(f"bad node: {exc}") from exc


def _tier_fields(ep: Endpoint) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (
        ("adminIngress", ep.admin_ingress),
        ("adminEgress", ep.admin_egress),
        ("baselineIngress", ep.baseline_ingress),
        ("baselineEgress", ep.baseline_egress),
    )


#: ClusterNetworkPolicy tiers and rule actions (policy.networking.k8s.io).
Tier = Literal["Admin", "Baseline"]
TIERS: tuple[Tier, ...] = ("Admin", "Baseline")
Action = Literal["Accept", "Deny", "Pass"]
ACTIONS: tuple[Action, ...] = ("Accept", "Deny", "Pass")


@dataclass(frozen=True, slots=True)
class CompiledClusterRule:
    """One ClusterNetworkPolicy rule: an action on what ``match`` matches.

    ``match`` has the :class:`CompiledRule` semantics (``peers`` None = any
    peer, ``ports`` None = any port; empty tuples never match). ``name`` is
    the rule's name in the policy (may be empty), for explanations.
    """

    action: Action
    match: CompiledRule
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"action": self.action, **self.match.to_json()}
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_json(cls, data: Any) -> CompiledClusterRule:
        action = data["action"]
        if action not in ACTIONS:
            raise ModelDecodeError(f"unknown action {action!r}")
        return cls(action=action, match=CompiledRule.from_json(data), name=str(data.get("name") or ""))


@dataclass(frozen=True, slots=True)
class CompiledClusterPolicy:
    """One ClusterNetworkPolicy: tier, priority and ordered rules per direction.

    An empty direction does not affect that direction's traffic (the API's
    "CNPs with no ingress rules do not affect ingress traffic"); endpoints
    list the policy only in the directions where it has rules.
    """

    name: str
    uid: str
    tier: Tier
    priority: int
    ingress: tuple[CompiledClusterRule, ...]
    egress: tuple[CompiledClusterRule, ...]
    _set_ids: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        return self.name

    def rules(self, direction: str) -> tuple[CompiledClusterRule, ...]:
        return self.ingress if direction == "ingress" else self.egress

    @property
    def set_ids(self) -> frozenset[str]:
        """The peer and named-port sets the rules reference (computed once)."""
        if self._set_ids is None:
            ids: set[str] = set()
            for rule in (*self.ingress, *self.egress):
                ids.update(rule.match.peers or ())
                ids.update(p.named_set for p in rule.match.ports or () if p.named_set)
            object.__setattr__(self, "_set_ids", frozenset(ids))
        assert self._set_ids is not None
        return self._set_ids

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "uid": self.uid,
            "tier": self.tier,
            "priority": self.priority,
            "ingress": [r.to_json() for r in self.ingress],
            "egress": [r.to_json() for r in self.egress],
        }

    @classmethod
    def from_json(cls, data: Any) -> CompiledClusterPolicy:
        try:
            tier = data["tier"]
            if tier not in TIERS:
                raise ModelDecodeError(f"unknown tier {tier!r}")
            priority = data["priority"]
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise ModelDecodeError(f"priority must be an integer, got {priority!r}")
            return cls(
                name=str(data["name"]),
                uid=str(data.get("uid", "")),
                tier=tier,
                priority=priority,
                ingress=tuple(CompiledClusterRule.from_json(r) for r in data.get("ingress") or ()),
                egress=tuple(CompiledClusterRule.from_json(r) for r in data.get("egress") or ()),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelDecodeError(f"bad cluster policy: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class NodeModel:
    """Everything one agent needs: its endpoints and what they refer to."""

    node: str
    endpoints: dict[str, Endpoint]  # by "ns/name"
    policies: dict[str, CompiledPolicy]  # by "ns/name" (at least those the endpoints use)
    sets: dict[str, PeerSet]  # by id (at least those the policies use)
    #: ClusterNetworkPolicies by name (at least those the endpoints use)
    cluster_policies: dict[str, CompiledClusterPolicy] = field(default_factory=dict)
