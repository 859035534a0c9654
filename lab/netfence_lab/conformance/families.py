"""Pure: IP families of a conformance run (``--ip-family ipv4|ipv6|dual``).

The runner's test bed is dual-stack: node ``i`` owns ``10.244.i.0/24`` and
``fd00:10:244:i::/64`` (``i`` written as a hexadecimal group), and the k-th pod
placed on node ``i`` gets ``10.244.i.(10+k)`` and ``fd00:10:244:i::(10+k)`` (host
number ``10+k``, e.g. ``fd00:10:244:1::b`` for k=1), so both addresses of a pod sit
at the same place in their family's layout. The run's *mode* says over which
families the probes go and which addresses the placeholders yield:

* ``ipv4`` (default, as the shared format describes): probes and placeholders IPv4;
* ``ipv6``: probes and placeholders IPv6 (the pods' primary family is IPv6);
* ``dual``: probes over both families, each cell must hold on both; a peer of a
  manifest holding placeholders is written once per family (:func:`expand`).

Placeholders (format additions: docs/conformance.md):

* ``${ip:NS/POD}``, ``${cidr:NS/POD/LEN}``: the run's family. ``LEN`` and a
  ``/LEN`` written right after ``${ip:..}`` are IPv4 prefix lengths (the shared
  format's); for IPv6 they are mapped so that the network holds the same pods
  (:func:`ipv6_length`: ``/24`` (a node) → ``/64``, ``/32`` (one pod) → ``/128``).
* ``${ip4:..}``, ``${ip6:..}``, ``${cidr4:NS/POD/LEN}``, ``${cidr6:NS/POD/LEN}``:
  that family in every mode; ``LEN`` is a length of that family, taken as written.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Literal

from netfence_lab.conformance.scenario import ScenarioError

IpFamily = Literal["ipv4", "ipv6"]
Mode = Literal["ipv4", "ipv6", "dual"]
FAMILIES: tuple[IpFamily, ...] = ("ipv4", "ipv6")
MODES: tuple[Mode, ...] = ("ipv4", "ipv6", "dual")
DEFAULT_MODE: Mode = "ipv4"

#: pod key ("NS/POD") -> its address per family
PodAddresses = Mapping[str, Mapping[IpFamily, str]]

_PLACEHOLDER = re.compile(r"\$\{(ip|cidr)(4|6)?:([^}]*)\}(/\d+)?")
_PINNED: dict[str, IpFamily] = {"4": "ipv4", "6": "ipv6"}
_MAX_LEN: dict[IpFamily, int] = {"ipv4": 32, "ipv6": 128}


class PlaceholderError(ScenarioError):
    """A placeholder that cannot be expanded (unknown pod, a family the pod lacks, a bad length)."""


def parse_mode(text: str) -> Mode:
    for mode in MODES:
        if text == mode:
            return mode
    raise ValueError(f"IP family {text!r}: expected one of {', '.join(MODES)}")


def probe_families(mode: Mode) -> tuple[IpFamily, ...]:
    """The families every (unpinned) expectation is probed over, in reporting order."""
    return FAMILIES if mode == "dual" else (mode,)


def primary_family(mode: Mode) -> IpFamily:
    """The pods' primary family (first in ``status.podIPs``) and the single-valued placeholders' family."""
    return "ipv6" if mode == "ipv6" else "ipv4"


def family_of(ip: str) -> IpFamily:
    return "ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4"


def ipv6_length(length: int) -> int:
    """The IPv6 prefix length that holds the same pods as IPv4 length ``length`` in the test bed's layout.

    IPv4 ``10.244.NODE.HOST`` and IPv6 ``fd00:10:244:NODE::HOST``: the cluster part (bits 0-15 in
    IPv4, 0-47 in IPv6) scales, the node byte (16-23 / 56-63) and the host byte (24-31 / 120-127)
    move. So 0 → 0, 16 → 48, 24 → 64, 31 → 127, 32 → 128.
    """
    if not 0 <= length <= 32:
        raise ValueError(f"IPv4 prefix length {length}: expected 0 to 32")
    if length <= 16:
        return length * 3
    if length <= 24:
        return length + 40
    return length + 96


def _address(addresses: PodAddresses, pod: str, family: IpFamily, text: str) -> str:
    if pod not in addresses:
        raise PlaceholderError(f"placeholder {text}: no such pod {pod!r}")
    ip = addresses[pod].get(family)
    if ip is None:
        have = ", ".join(sorted(addresses[pod])) or "none"
        raise PlaceholderError(f"placeholder {text}: pod {pod} has no {family_name(family)} address (it has {have})")
    return ip


def family_name(family: IpFamily) -> str:
    return "IPv6" if family == "ipv6" else "IPv4"


def _length(text: str, raw: str, family: IpFamily) -> int:
    if not raw.isdigit() or int(raw) > _MAX_LEN[family]:
        raise PlaceholderError(
            f"placeholder {text}: expected a prefix length from 0 to {_MAX_LEN[family]} for {family_name(family)}, "
            f"got {raw!r}"
        )
    return int(raw)


def _replace(match: re.Match[str], addresses: PodAddresses, family: IpFamily) -> str:
    kind, pin, arg, suffix = match.group(1), match.group(2), match.group(3), match.group(4) or ""
    text = match.group(0)[: len(match.group(0)) - len(suffix)]
    fam = _PINNED[pin] if pin else family
    if kind == "ip":
        ip = _address(addresses, arg, fam, text)
        if suffix and not pin and fam == "ipv6":  # "${ip:P}/LEN": an IPv4 length, mapped like ${cidr:P/LEN}
            v4 = _length(text + suffix, suffix[1:], "ipv4")
            return f"{ip}/{ipv6_length(v4)}"
        return ip + suffix
    pod, _, raw = arg.rpartition("/")
    if not pod:
        raise PlaceholderError(f"placeholder {text}: expected NS/POD/LEN")
    ip = _address(addresses, pod, fam, text)
    length = _length(text, raw, "ipv4" if not pin else fam)
    if not pin and fam == "ipv6":
        length = ipv6_length(length)
    return str(ipaddress.ip_network(f"{ip}/{length}", strict=False)) + suffix


def substitute_family(value: Any, addresses: PodAddresses, family: IpFamily) -> Any:
    """Every placeholder in every string of ``value`` expanded; unpinned ones in ``family``."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: _replace(m, addresses, family), value)
    if isinstance(value, list):
        return [substitute_family(v, addresses, family) for v in value]
    if isinstance(value, dict):
        return {k: substitute_family(v, addresses, family) for k, v in value.items()}
    return value


def has_unpinned(value: Any) -> bool:
    """Whether ``value`` holds a placeholder whose family the run decides."""
    if isinstance(value, str):
        return any(m.group(2) is None for m in _PLACEHOLDER.finditer(value))
    if isinstance(value, list):
        return any(has_unpinned(v) for v in value)
    if isinstance(value, dict):
        return any(has_unpinned(v) for v in value.values())
    return False


def placeholder_pins(value: Any) -> set[IpFamily]:
    """The families pinned by ``${ip4:..}``-style placeholders anywhere in ``value``."""
    if isinstance(value, str):
        return {_PINNED[m.group(2)] for m in _PLACEHOLDER.finditer(value) if m.group(2)}
    if isinstance(value, list):
        return set().union(*(placeholder_pins(v) for v in value))
    if isinstance(value, dict):
        return set().union(*(placeholder_pins(v) for v in value.values()))
    return set()


def _per_family(item: Any) -> bool:
    """A list item written once per family in ``dual`` mode: a NetworkPolicy peer with an ``ipBlock``
    (its ``cidr`` and ``except`` stay one family), or a string (e.g. an entry of a list of networks)."""
    return isinstance(item, str) or (isinstance(item, dict) and "ipBlock" in item)


def _dual(value: Any, addresses: PodAddresses) -> Any:
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            if _per_family(item) and has_unpinned(item):
                out += [substitute_family(item, addresses, family) for family in FAMILIES]
            else:
                out.append(_dual(item, addresses))
        return out
    if isinstance(value, dict):
        return {k: _dual(v, addresses) for k, v in value.items()}
    return substitute_family(value, addresses, primary_family("dual"))


def expand(value: Any, addresses: PodAddresses, mode: Mode) -> Any:
    """A manifest with its placeholders expanded for a run in ``mode``.

    ``ipv4``/``ipv6``: every unpinned placeholder in that family. ``dual``: each list
    item that is an ``ipBlock`` peer or a string and holds unpinned placeholders is
    written once per family (IPv4 first), so the rule covers both families as the
    IPv4-only rule covers one; any other unpinned placeholder yields the primary
    family's (IPv4) value. Raises :class:`PlaceholderError` (one line).
    """
    if mode == "dual":
        return _dual(value, addresses)
    return substitute_family(value, addresses, mode)


def pod_addresses(handles: Mapping[str, Any]) -> dict[str, dict[IpFamily, str]]:
    """``{pod key: {family: address}}`` from handles carrying ``ips`` (all addresses of the pod)."""
    return {key: {family_of(ip): ip for ip in h.ips} for key, h in handles.items()}
