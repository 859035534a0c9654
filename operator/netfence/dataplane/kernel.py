"""What Netfence owns in the kernel, parsed from tool output (pure).

Only our own chains (:func:`is_owned_chain`) and sets (:func:`is_owned_set`)
are kept, plus where our hook sits in FORWARD; everything else is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from netfence.dataplane.ruleset import (
    FORWARD_CHAIN,
    Family,
    IpSet,
    SetFamily,
    SetType,
    is_owned_chain,
    is_owned_set,
)

HOOK_RULE = f"-j {FORWARD_CHAIN}"


@dataclass(frozen=True, slots=True)
class TableState:
    """One family's filter table, reduced to what we own."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hooks: tuple[int, ...] = ()  # 1-based positions of `-j NETFENCE-FORWARD` in FORWARD


@dataclass(frozen=True, slots=True)
class KernelState:
    """Our chains per family and our ipsets, as found in the kernel.

    ``sets`` holds full contents when read with ``ipset save``; when only the
    names were read (``ipset list -n``) it is None and ``set_names`` is set.
    """

    tables: dict[Family, TableState] = field(default_factory=dict)
    set_names: frozenset[str] = frozenset()
    sets: dict[str, IpSet] | None = None

    def table(self, family: Family) -> TableState:
        return self.tables.get(family, TableState())


def parse_iptables_save(text: str) -> TableState:
    """Parse `iptables-save -t filter` output."""
    chains: dict[str, list[str]] = {}
    forward: list[str] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table != "filter":
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if is_owned_chain(name):
                chains.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            rule = rest[0] if rest else ""
            if chain == "FORWARD":
                forward.append(rule)
            elif is_owned_chain(chain):
                chains.setdefault(chain, []).append(rule)
    hooks = tuple(i for i, rule in enumerate(forward, start=1) if rule == HOOK_RULE)
    return TableState(chains={n: tuple(r) for n, r in sorted(chains.items())}, hooks=hooks)


def hook_positions(listing: str) -> tuple[int, ...]:
    """Positions of our hook in `iptables -S FORWARD` output."""
    rules = [ln[len("-A FORWARD ") :] for ln in listing.splitlines() if ln.startswith("-A FORWARD ")]
    return tuple(i for i, rule in enumerate(rules, start=1) if rule == HOOK_RULE)


def parse_set_names(text: str) -> frozenset[str]:
    """Parse `ipset list -n` output (our sets only)."""
    return frozenset(n.strip() for n in text.splitlines() if is_owned_set(n.strip()))


def parse_ipset_save(text: str) -> dict[str, IpSet]:
    """Parse `ipset save` output (our sets only, members as ipset prints them)."""
    headers: dict[str, tuple[SetType, SetFamily]] = {}
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 3 or not is_owned_set(parts[1]):
            continue
        if parts[0] == "create":
            fam = parts[parts.index("family") + 1] if "family" in parts else "inet"
            headers[parts[1]] = (cast(SetType, parts[2]), cast(SetFamily, fam))
            members.setdefault(parts[1], set())
        elif parts[0] == "add":
            members.setdefault(parts[1], set()).add(" ".join(parts[2:]))
    return {name: IpSet(name, headers[name][0], headers[name][1], frozenset(members[name])) for name in sorted(headers)}


def hook_fix(hooks: Iterable[int]) -> list[str]:
    """Restore lines putting exactly one hook at the top of FORWARD ([] if already so)."""
    positions = sorted(hooks)
    if positions == [1]:
        return []
    # Insert first, then delete the old ones (shifted by one) from the bottom up:
    # one atomic transaction, so FORWARD is never without the hook.
    return [f"-I FORWARD 1 {HOOK_RULE}"] + [f"-D FORWARD {p + 1}" for p in reversed(positions)]
