"""NetworkPolicy (networking.k8s.io/v1) as typed values, and its validating parser.

Semantics (all decided here, so the compiler only sees the normalised form):

* ``policyTypes`` absent or empty defaults exactly as the API server does
  (``pkg/apis/networking/v1/defaults.go``, ``SetDefaults_NetworkPolicy``):
  ``[Ingress]``, plus ``Egress`` when ``len(spec.egress) != 0``.
* A direction not in ``policyTypes`` is ``None`` (not covered; its rules are
  ignored and a note says so). A covered direction with no rules is ``()``:
  deny everything in that direction.
* A rule whose ``from``/``to`` is absent or empty has ``peers=None`` (any
  peer); absent or empty ``ports`` gives ``ports=None`` (any port).
* Validation mirrors ``pkg/apis/networking/validation``: a peer needs at
  least one of podSelector/namespaceSelector/ipBlock and ipBlock cannot be
  combined; ``except`` must be a strict subset of ``cidr``; ports are 1-65535,
  ``endPort >= port`` and only with a numeric port; named ports are IANA
  service names; protocols are TCP, UDP or SCTP (default TCP).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from netfence.model.enforcement import PROTOCOLS, Protocol
from netfence.model.selectors import EVERYTHING, LabelSelector, PolicyError

PolicyType = Literal["Ingress", "Egress"]
POLICY_TYPES: tuple[PolicyType, ...] = ("Ingress", "Egress")

_PORT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class IPBlock:
    """A CIDR with exceptions; both are stored normalised (``10.0.0.0/8``)."""

    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Peer:
    """One ``from``/``to`` entry. ``None`` fields are absent (not empty)."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class PortSpec:
    """``port`` is a number, a container port name, or ``None`` (all ports)."""

    protocol: Protocol = "TCP"
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] | None = None  # None: any peer
    ports: tuple[PortSpec, ...] | None = None  # None: any port


@dataclass(frozen=True, slots=True)
class Policy:
    """A NetworkPolicy. ``ingress``/``egress`` is None iff the direction is not covered."""

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    pod_selector: LabelSelector = EVERYTHING
    policy_types: frozenset[PolicyType] = frozenset({"Ingress"})
    ingress: tuple[Rule, ...] | None = ()
    egress: tuple[Rule, ...] | None = None
    notes: tuple[str, ...] = ()  # parse-time remarks for humans

    def __post_init__(self) -> None:
        if ("Ingress" in self.policy_types) != (self.ingress is not None):
            raise ValueError("ingress must be a tuple iff policy_types contains Ingress")
        if ("Egress" in self.policy_types) != (self.egress is not None):
            raise ValueError("egress must be a tuple iff policy_types contains Egress")

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def _parse_network(text: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(text, str) or "/" not in text:
        raise PolicyError(f"{path}: must be a CIDR such as 10.0.0.0/8, got {text!r}")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise PolicyError(f"{path}: invalid CIDR {text!r}: {exc}") from exc


def _parse_ip_block(data: Any, path: str) -> IPBlock:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{path}: must be an object, got {data!r}")
    if not data.get("cidr"):
        raise PolicyError(f"{path}.cidr: required")
    net = _parse_network(data["cidr"], f"{path}.cidr")
    excepts = data.get("except")
    excepts = [] if excepts is None else excepts
    if not isinstance(excepts, list):
        raise PolicyError(f"{path}.except: must be a list, got {excepts!r}")
    parsed: list[str] = []
    for i, text in enumerate(excepts):
        sub = _parse_network(text, f"{path}.except[{i}]")
        strict_subset = (
            sub.version == net.version
            and sub.prefixlen > net.prefixlen
            and sub.network_address in net  # same family checked just above
        )
        if not strict_subset:
            raise PolicyError(f"{path}.except[{i}]: {text!r} must be a strict subset of cidr {net}")
        if str(sub) not in parsed:
            parsed.append(str(sub))
    return IPBlock(cidr=str(net), except_=tuple(sorted(parsed)))


def _parse_peer(data: Any, path: str) -> Peer:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{path}: must be an object, got {data!r}")
    pod_sel = data.get("podSelector")
    ns_sel = data.get("namespaceSelector")
    block = data.get("ipBlock")
    present = [x is not None for x in (pod_sel, ns_sel, block)]
    if not any(present):
        raise PolicyError(f"{path}: must specify a peer (podSelector, namespaceSelector or ipBlock)")
    if block is not None and sum(present) > 1:
        raise PolicyError(f"{path}: may not specify both ipBlock and another peer")
    return Peer(
        pod_selector=None if pod_sel is None else LabelSelector.from_k8s(pod_sel, f"{path}.podSelector"),
        namespace_selector=(None if ns_sel is None else LabelSelector.from_k8s(ns_sel, f"{path}.namespaceSelector")),
        ip_block=None if block is None else _parse_ip_block(block, f"{path}.ipBlock"),
    )


def _check_port_number(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise PolicyError(f"{path}: must be a port number between 1 and 65535, got {value!r}")
    return value


def _check_port_name(value: str, path: str) -> str:
    ok = (
        1 <= len(value) <= 15
        and _PORT_NAME_RE.match(value) is not None
        and "--" not in value
        and any(c.isalpha() for c in value)
    )
    if not ok:
        raise PolicyError(
            f"{path}: invalid port name {value!r} (1-15 lower-case letters, digits and '-', with at least one letter)"
        )
    return value


def _parse_port(data: Any, path: str) -> PortSpec:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{path}: must be an object, got {data!r}")
    protocol = data.get("protocol") or "TCP"
    if protocol not in PROTOCOLS:
        raise PolicyError(f"{path}.protocol: unsupported protocol {protocol!r} (expected TCP, UDP or SCTP)")
    port = data.get("port")
    end_port = data.get("endPort")
    if port is None:
        if end_port is not None:
            raise PolicyError(f"{path}.endPort: may not be specified when port is not specified")
        return PortSpec(protocol=protocol)
    if isinstance(port, str):
        if end_port is not None:
            raise PolicyError(f"{path}.endPort: may not be specified when port is a named port")
        return PortSpec(protocol=protocol, port=_check_port_name(port, f"{path}.port"))
    number = _check_port_number(port, f"{path}.port")
    if end_port is not None:
        end = _check_port_number(end_port, f"{path}.endPort")
        if end < number:
            raise PolicyError(f"{path}.endPort: {end} must be greater than or equal to port {number}")
        return PortSpec(protocol=protocol, port=number, end_port=end)
    return PortSpec(protocol=protocol, port=number)


def _parse_rules(data: Any, path: str, peers_field: str) -> tuple[Rule, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise PolicyError(f"{path}: must be a list, got {data!r}")
    rules: list[Rule] = []
    for i, raw in enumerate(data):
        rpath = f"{path}[{i}]"
        entry = {} if raw is None else raw
        if not isinstance(entry, Mapping):
            raise PolicyError(f"{rpath}: must be an object, got {entry!r}")
        raw_peers = entry.get(peers_field)
        raw_ports = entry.get("ports")
        raw_peers = [] if raw_peers is None else raw_peers
        raw_ports = [] if raw_ports is None else raw_ports
        if not isinstance(raw_peers, list):
            raise PolicyError(f"{rpath}.{peers_field}: must be a list, got {raw_peers!r}")
        if not isinstance(raw_ports, list):
            raise PolicyError(f"{rpath}.ports: must be a list, got {raw_ports!r}")
        peers = tuple(_parse_peer(p, f"{rpath}.{peers_field}[{j}]") for j, p in enumerate(raw_peers))
        ports = tuple(_parse_port(p, f"{rpath}.ports[{j}]") for j, p in enumerate(raw_ports))
        rules.append(Rule(peers=peers or None, ports=ports or None))
    return tuple(rules)


def _policy_types(spec: Mapping[str, Any]) -> frozenset[PolicyType]:
    raw = spec.get("policyTypes")
    raw = [] if raw is None else raw
    if not isinstance(raw, list):
        raise PolicyError(f"spec.policyTypes: must be a list, got {raw!r}")
    if len(raw) > 2:
        raise PolicyError("spec.policyTypes: may not specify more than two policyTypes")
    types: set[PolicyType] = set()
    for i, value in enumerate(raw):
        if value == "Ingress":
            types.add("Ingress")
        elif value == "Egress":
            types.add("Egress")
        else:
            raise PolicyError(f"spec.policyTypes[{i}]: unsupported value {value!r} (expected Ingress or Egress)")
    if not types:
        # Same as the API server's SetDefaults_NetworkPolicy (k8s pkg/apis/networking/v1/defaults.go):
        # Ingress always, Egress only when len(spec.egress) != 0.
        types.add("Ingress")
        if spec.get("egress"):
            types.add("Egress")
    return frozenset(types)


def policy_from_k8s(body: Mapping[str, Any]) -> Policy:
    """Parse and validate a NetworkPolicy body; raises :class:`PolicyError` naming the field."""
    meta = body.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise PolicyError("metadata: must be an object")
    namespace, name = meta.get("namespace"), meta.get("name")
    if not namespace or not isinstance(namespace, str):
        raise PolicyError("metadata.namespace: required")
    if not name or not isinstance(name, str):
        raise PolicyError("metadata.name: required")
    spec = body.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise PolicyError("spec: must be an object")
    pod_selector = LabelSelector.from_k8s(spec.get("podSelector"), "spec.podSelector")
    types = _policy_types(spec)
    ingress = _parse_rules(spec.get("ingress"), "spec.ingress", "from")
    egress = _parse_rules(spec.get("egress"), "spec.egress", "to")
    notes: list[str] = []
    if ingress and "Ingress" not in types:
        notes.append("spec.ingress is ignored: policyTypes does not include Ingress")
    if egress and "Egress" not in types:
        notes.append("spec.egress is ignored: policyTypes does not include Egress")
    generation = meta.get("generation")
    return Policy(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        generation=generation if isinstance(generation, int) else 0,
        pod_selector=pod_selector,
        policy_types=types,
        ingress=ingress if "Ingress" in types else None,
        egress=egress if "Egress" in types else None,
        notes=tuple(notes),
    )
