"""The desired (or applied) dataplane state: ipsets and iptables chains.

A :class:`Ruleset` is what :func:`netfence.dataplane.render.render` produces and
what :func:`netfence.dataplane.plan.plan` diffs. Rules are stored *without* the
``-A CHAIN`` prefix, in the canonical form that ``iptables-save`` prints back
(``-s 10.0.0.1/32``, ``-p tcp -m tcp --dport 80``...), so the kernel read-back
of a chain can be compared with the rendered one as plain strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Family = Literal["v4", "v6"]
FAMILIES: tuple[Family, ...] = ("v4", "v6")
SetType = Literal["hash:ip", "hash:net", "hash:ip,port"]
SetFamily = Literal["inet", "inet6"]

#: The FORWARD hook target and the fixed chains.
FORWARD_CHAIN = "NETFENCE-FORWARD"
FROM_WL_CHAIN = "NETFENCE-FROM-WL"
TO_WL_CHAIN = "NETFENCE-TO-WL"
#: Prefixes of every chain Netfence owns (and may flush or delete).
OWNED_CHAIN_PREFIXES: tuple[str, ...] = ("NETFENCE-", "nf-fw-", "nf-tw-", "nf-pi-", "nf-po-", "nf-ci-", "nf-co-")
#: Prefixes of every ipset Netfence owns (and may destroy).
OWNED_SET_PREFIXES: tuple[str, ...] = ("nf4-", "nf6-")
#: Packet mark bit meaning "a policy accepted this packet" (see docs/design.md).
ACCEPT_MARK = 0x10000
#: Fixed ipset maxelem: memory grows with entries, not with maxelem, and a fixed
#: value keeps `create -exist` and `swap` compatible across versions.
SET_MAXELEM = 1 << 20

SET_FAMILY: dict[Family, SetFamily] = {"v4": "inet", "v6": "inet6"}


#: The chain a rule jumps (``-j``) or goes (``-g``) to: group 1 (a target such as DROP too).
JUMP_TARGET = re.compile(r"-[jg] (\S+)")


def is_owned_chain(name: str) -> bool:
    return name.startswith(OWNED_CHAIN_PREFIXES)


def is_owned_set(name: str) -> bool:
    return name.startswith(OWNED_SET_PREFIXES)


def element_key(member: str) -> str:
    """The element of an ipset entry without flags (`10.0.0.0/8 nomatch` -> `10.0.0.0/8`)."""
    return member.split(" ", 1)[0]


@dataclass(frozen=True, slots=True)
class IpSet:
    name: str
    type: SetType
    family: SetFamily
    members: frozenset[str]  # ipset entries, `nomatch` flag appended for hash:net

    def create_line(self, name: str | None = None) -> str:
        return f"create {name or self.name} {self.type} family {self.family} maxelem {SET_MAXELEM}"

    def header(self) -> tuple[str, str]:
        return (self.type, self.family)


def _frozen_chains(chains: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    return {name: tuple(rules) for name, rules in chains.items()}


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Ipsets by name and chains per family (chain name -> rules, in order)."""

    sets: dict[str, IpSet] = field(default_factory=dict)
    chains: dict[Family, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def build(cls, sets: Iterable[IpSet], chains: Mapping[Family, Mapping[str, Iterable[str]]]) -> Ruleset:
        return cls(
            sets={s.name: s for s in sorted(sets, key=lambda s: s.name)},
            chains={fam: _frozen_chains(dict(sorted(chains[fam].items()))) for fam in FAMILIES if fam in chains},
        )

    def family_chains(self, family: Family) -> dict[str, tuple[str, ...]]:
        return self.chains.get(family, {})

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(f for f in FAMILIES if f in self.chains)

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for chains in self.chains.values() for rules in chains.values())

    @property
    def set_count(self) -> int:
        return len(self.sets)

    def restricted(self, families: Iterable[Family]) -> Ruleset:
        """Only the chains and sets of ``families``."""
        keep = tuple(families)
        set_fams = {SET_FAMILY[f] for f in keep}
        return Ruleset(
            sets={n: s for n, s in self.sets.items() if s.family in set_fams},
            chains={f: c for f, c in self.chains.items() if f in keep},
        )

    def dump(self) -> str:
        """A deterministic, human-readable text form (golden files, debugging)."""
        out: list[str] = []
        for s in self.sets.values():
            out.append(s.create_line())
            out.extend(f"add {s.name} {m}" for m in sorted(s.members))
        for fam in self.families:
            out.append(f"*filter {fam}")
            for chain, rules in self.chains[fam].items():
                out.append(f":{chain}")
                out.extend(f"-A {chain} {r}" for r in rules)
        return "\n".join(out) + "\n"
