"""Evaluate the *compiled* model: would the agents let this packet through?

This reads the desired state exactly as agents receive it (relative key → JSON)
and applies the enforcement semantics:

* traffic src → dst is allowed iff egress allows it at src's endpoint and
  ingress allows it at dst's endpoint;
* an address with no endpoint record, or an endpoint with an empty policy list
  in a direction, is unrestricted in that direction;
* a direction is allowed iff some rule of some listed policy matches: the
  peer is in one of the rule's sets (or ``peers`` is None) and the port
  matches one of its ports (or ``ports`` is None);
* ``pods`` sets match by address; ``net`` sets follow ipset ``hash:net``
  ``nomatch`` semantics (the most specific entry containing the address
  decides); ``ports`` sets match ``dst_ip,proto:port``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, NamedTuple

from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint, PeerSet

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _NetSet:
    def __init__(self, members: tuple[str, ...]) -> None:
        entries: list[tuple[IPNetwork, bool]] = []
        for member in members:
            nomatch = member.startswith("!")
            entries.append((ipaddress.ip_network(member.lstrip("!"), strict=False), nomatch))
        # most specific first: the first containing entry decides
        self.entries = sorted(entries, key=lambda e: -e[0].prefixlen)

    def contains(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        for net, nomatch in self.entries:
            if net.version == addr.version and addr in net:
                return not nomatch
        return False


#: ``net`` set membership with ipset ``hash:net`` ``nomatch`` semantics (also used by netfence.explain.trace).
NetSet = _NetSet


class Packet(NamedTuple):
    src: str  # normalised addresses
    dst: str
    port: int
    protocol: str


class CompiledState:
    """An indexed view of a desired state, for fast repeated queries."""

    def __init__(self, desired: Mapping[str, Mapping[str, Any]]) -> None:
        self.policies: dict[str, CompiledPolicy] = {}
        self.endpoints_by_ip: dict[str, Endpoint] = {}
        self.plain_sets: dict[str, frozenset[str]] = {}
        self.net_sets: dict[str, _NetSet] = {}
        for key, value in desired.items():
            kind = key.partition("/")[0]
            if kind == "policies":
                policy = CompiledPolicy.from_json(value)
                self.policies[policy.key] = policy
            elif kind == "endpoints":
                endpoint = Endpoint.from_json(value)
                for ip in endpoint.ips:
                    self.endpoints_by_ip[_norm(ip)] = endpoint
            elif kind == "sets":
                peer_set = PeerSet.from_json(value)
                if peer_set.kind == "net":
                    self.net_sets[peer_set.id] = _NetSet(peer_set.members)
                else:
                    self.plain_sets[peer_set.id] = frozenset(peer_set.members)

    def _in_set(self, sid: str, entry: str, ip: str) -> bool:
        if sid in self.net_sets:
            return self.net_sets[sid].contains(ip)
        return entry in self.plain_sets.get(sid, frozenset())

    def _port_ok(self, port: CompiledPort, packet: Packet) -> bool:
        if port.protocol != packet.protocol:
            return False
        if port.named_set is not None:
            entry = f"{packet.dst},{packet.protocol.lower()}:{packet.port}"
            return entry in self.plain_sets.get(port.named_set, frozenset())
        if port.port is None:
            return True
        return port.port <= packet.port <= (port.end_port if port.end_port is not None else port.port)

    def _rule_ok(self, rule: CompiledRule, peer_ip: str, packet: Packet) -> bool:
        if rule.peers is not None and not any(self._in_set(s, peer_ip, peer_ip) for s in rule.peers):
            return False
        if rule.ports is None:
            return True
        return any(self._port_ok(p, packet) for p in rule.ports)

    def _direction_ok(self, policy_keys: tuple[str, ...], ingress: bool, packet: Packet) -> bool:
        if not policy_keys:
            return True
        peer_ip = packet.src if ingress else packet.dst
        for key in policy_keys:
            policy = self.policies.get(key)
            if policy is None:
                continue  # referenced but absent: contributes no allow rules
            rules = policy.ingress if ingress else policy.egress
            if any(self._rule_ok(r, peer_ip, packet) for r in rules or ()):
                return True
        return False

    def allows(self, src_ip: str, dst_ip: str, port: int, protocol: str) -> bool:
        """Whether ``src_ip`` may open ``protocol``/``port`` to ``dst_ip``."""
        packet = Packet(_norm(src_ip), _norm(dst_ip), port, protocol)
        src_ep = self.endpoints_by_ip.get(packet.src)
        if src_ep is not None and not self._direction_ok(src_ep.egress, False, packet):
            return False
        dst_ep = self.endpoints_by_ip.get(packet.dst)
        return dst_ep is None or self._direction_ok(dst_ep.ingress, True, packet)


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def is_allowed(desired: Mapping[str, Mapping[str, Any]], src_ip: str, dst_ip: str, port: int, protocol: str) -> bool:
    """One-shot form of :meth:`CompiledState.allows` (indexes the state on every call)."""
    return CompiledState(desired).allows(src_ip, dst_ip, port, protocol)
