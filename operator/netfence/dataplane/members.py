"""Normalise peer-set members into ipset entries in `ipset save`'s own spelling."""

from __future__ import annotations

import functools
import ipaddress
import logging

from netfence.dataplane.ruleset import Family, SetType
from netfence.model.enforcement import SetKind

log = logging.getLogger(__name__)

SET_TYPE: dict[SetKind, SetType] = {"pods": "hash:ip", "net": "hash:net", "ports": "hash:ip,port"}
_PROTOS = frozenset({"tcp", "udp", "sctp"})


def _family(version: int) -> Family:
    return "v4" if version == 4 else "v6"


def _net_entries(member: str) -> list[tuple[Family, str]]:
    nomatch = member.startswith("!")
    net = ipaddress.ip_network(member[1:] if nomatch else member, strict=False)
    # hash:net rejects a /0 prefix: cover it with the two halves instead.
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
        list(net.subnets(prefixlen_diff=1)) if net.prefixlen == 0 else [net]
    )
    out = []
    for n in nets:
        text = str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
        out.append((_family(n.version), text + (" nomatch" if nomatch else "")))
    return out


def _port_entry(member: str) -> tuple[Family, str]:
    ip_text, _, proto_port = member.rpartition(",")
    proto, _, port_text = proto_port.partition(":")
    proto = proto.lower()
    port = int(port_text)
    if proto not in _PROTOS or not 0 <= port <= 65535:
        raise ValueError(f"bad protocol/port {proto_port!r}")
    ip = ipaddress.ip_address(ip_text)
    return _family(ip.version), f"{ip},{proto}:{port}"


def entries(kind: SetKind, member: str) -> list[tuple[Family, str]]:
    """ipset entries (with their family) for one model member; [] if malformed."""
    try:
        if kind == "pods":
            ip = ipaddress.ip_address(member)
            return [(_family(ip.version), str(ip))]
        if kind == "net":
            return _net_entries(member)
        return [_port_entry(member)]
    except ValueError as exc:
        log.warning("ignoring malformed %s set member %r: %s", kind, member, exc)
        return []


@functools.lru_cache(maxsize=4096)
def family_members(kind: SetKind, members: tuple[str, ...], family: Family) -> frozenset[str]:
    """The entries of ``family``; for hash:net an except (nomatch) wins over an equal CIDR.

    Cached (pure; the result is immutable): a full render (agent start, repair)
    would otherwise re-parse every member of every unchanged set.
    A malformed member is therefore logged once per distinct member list, not per render.
    """
    by_element: dict[str, str] = {}
    for member in members:
        for fam, entry in entries(kind, member):
            if fam != family:
                continue
            element = entry.split(" ", 1)[0]
            if element not in by_element or entry.endswith(" nomatch"):
                by_element[element] = entry
    return frozenset(by_element.values())
