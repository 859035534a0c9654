"""The input world as typed, immutable values: pods, namespaces, NetworkPolicies.

The ``*_from_k8s`` parsers take object bodies as Kopf hands them over (plain
dicts with ``metadata``/``spec``/``status``). Policy parsing validates like the
API server does and raises :class:`PolicyError` with the field path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from netfence.model.enforcement import PROTOCOLS, Protocol, pod_cidr
from netfence.model.policy import (
    IPBlock,
    Peer,
    Policy,
    PolicyType,
    PortSpec,
    Rule,
    policy_from_k8s,
)
from netfence.model.selectors import LabelSelector, PolicyError

__all__ = [
    "ContainerPort",
    "IPBlock",
    "LabelSelector",
    "Labels",
    "Namespace",
    "Node",
    "Peer",
    "Pod",
    "Policy",
    "PolicyError",
    "PolicyType",
    "PortSpec",
    "Rule",
    "is_endpoint",
    "namespace_from_k8s",
    "node_from_k8s",
    "normalise_ip",
    "pod_from_k8s",
    "policy_from_k8s",
]

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class Labels(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping (compares equal to dicts)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._data: dict[str, str] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"Labels({self._data!r})"


def _labels(value: Mapping[str, str]) -> Labels:
    return value if isinstance(value, Labels) else Labels(value)


def normalise_ip(ip: str) -> str:
    """The canonical text form of an IPv4/IPv6 address (raises ValueError if invalid)."""
    return str(ipaddress.ip_address(ip))


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str | None
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as far as policy is concerned. ``labels`` may be given as any mapping."""

    namespace: str
    name: str
    node: str | None = None
    ips: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=Labels)
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False
    phase: str = "Running"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _labels(self.labels))
        object.__setattr__(self, "ips", tuple(normalise_ip(ip) for ip in self.ips))

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def named_ports(self) -> frozenset[tuple[str, Protocol]]:
        """The (name, protocol) pairs of its named container ports."""
        return frozenset((p.name, p.protocol) for p in self.ports if p.name)


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=Labels)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _labels(self.labels))


@dataclass(frozen=True, slots=True)
class Node:
    """A node as far as agents are concerned: its pod CIDRs (``spec.podCIDRs``, canonical), and
    the entries that are no CIDR (skipped: never read as another, wider network)."""

    name: str
    pod_cidrs: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()


def is_endpoint(pod: Pod) -> bool:
    """A pod is a policy endpoint iff it has an IP, is not hostNetwork, and is not finished."""
    return bool(pod.ips) and not pod.host_network and pod.phase not in TERMINAL_PHASES


def _metadata(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _label_map(meta: Mapping[str, Any]) -> Labels:
    raw = meta.get("labels") or {}
    if not isinstance(raw, Mapping):
        return Labels()
    return Labels({str(k): str(v) for k, v in raw.items() if v is not None})


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    raw: list[str] = []
    for entry in status.get("podIPs") or []:
        if isinstance(entry, Mapping) and entry.get("ip"):
            raw.append(str(entry["ip"]))
    if not raw and status.get("podIP"):
        raw.append(str(status["podIP"]))
    ips: list[str] = []
    for ip in raw:
        try:
            norm = normalise_ip(ip)
        except ValueError:
            continue  # the API server validates pod IPs; ignore anything unreadable
        if norm not in ips:
            ips.append(norm)
    return tuple(ips)


def _container_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    for container in spec.get("containers") or []:
        if not isinstance(container, Mapping):
            continue
        for port in container.get("ports") or []:
            if not isinstance(port, Mapping):
                continue
            number = port.get("containerPort")
            protocol = port.get("protocol") or "TCP"
            if not isinstance(number, int) or isinstance(number, bool) or protocol not in PROTOCOLS:
                continue
            ports.append(ContainerPort(name=port.get("name") or None, protocol=protocol, port=number))
    return tuple(ports)


def pod_from_k8s(body: Mapping[str, Any]) -> Pod:
    """Parse a Pod body. Never raises on odd status/spec content; it is skipped instead.

    Ports are taken from ``spec.containers[].ports[]`` (protocol defaults to TCP).
    """
    meta = _metadata(body)
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return Pod(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        node=spec.get("nodeName") or None,
        ips=_pod_ips(status),
        labels=_label_map(meta),
        ports=_container_ports(spec),
        host_network=bool(spec.get("hostNetwork")),
        phase=str(status.get("phase") or "Pending"),
    )


def namespace_from_k8s(body: Mapping[str, Any]) -> Namespace:
    meta = _metadata(body)
    return Namespace(name=str(meta.get("name") or ""), labels=_label_map(meta))


def node_from_k8s(body: Mapping[str, Any]) -> Node:
    """Parse a Node body: ``spec.podCIDRs``, else ``spec.podCIDR``. Never raises: an entry that
    is no CIDR is listed in ``invalid`` and left out (duplicates once)."""
    meta = _metadata(body)
    spec = body.get("spec") or {}
    if not isinstance(spec, Mapping):
        spec = {}
    raw = spec.get("podCIDRs")
    if not isinstance(raw, list) or not raw:
        raw = [spec["podCIDR"]] if spec.get("podCIDR") else []
    cidrs: list[str] = []
    invalid: list[str] = []
    for entry in raw:
        try:
            cidr = pod_cidr(entry)
        except ValueError:
            invalid.append(str(entry))
            continue
        if cidr not in cidrs:
            cidrs.append(cidr)
    return Node(name=str(meta.get("name") or ""), pod_cidrs=tuple(cidrs), invalid=tuple(invalid))
