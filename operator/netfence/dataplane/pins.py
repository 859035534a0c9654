"""Pinned rules: what the kernel holds for keys that have no good value (pure).

An agent that starts while a policy, set or endpoint value in etcd is corrupt
(or was written by someone other than the controller) has no last good value
for it. Rendering the model without it would replace that key's rules in the
kernel by "matches nothing". Instead, the agent *pins* them: chains and sets
are named after the key's identity (``dataplane/names.py``), so the agent
reads them back from the kernel before its first full sync and carries them
over verbatim until a good value arrives:

* a policy ``ns/name``: its chains ``nf-pi-<h>``/``nf-po-<h>``;
* an endpoint ``ns/pod``: its chains ``nf-tw-<h>``/``nf-fw-<h>``, the dispatch
  rules in ``NETFENCE-TO-WL``/``NETFENCE-FROM-WL`` that go to them, and the
  policy chains they jump to (used only where the model renders none);
* a cluster policy ``name``: its chains ``nf-ci-<h>``/``nf-co-<h>``
  (``render_tiers.cluster_chain``; the fixed chains ``NETFENCE-CNP-ACCEPT``/
  ``-PASS`` they go to are rendered from ``render_tiers.FIXED_CHAINS``, not
  taken from the kernel);
* a set id: its ipsets ``nf4-<id>``/``nf6-<id>``;
* and every ipset the carried rules refer to.

If the kernel holds nothing for the key (a fresh node), nothing is pinned and
the key's rules match nothing (a cluster policy: the traffic of the endpoints
naming it is denied); the agent reports which case applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from netfence.dataplane.kernel import KernelState
from netfence.dataplane.names import Direction, endpoint_chain, policy_chain, set_name
from netfence.dataplane.render_tiers import cluster_chain
from netfence.dataplane.ruleset import (
    FROM_WL_CHAIN,
    JUMP_TARGET,
    TO_WL_CHAIN,
    Family,
    IpSet,
    SetType,
    is_owned_chain,
)
from netfence.model.enforcement import SetKind

PinKind = Literal["policy", "cluster_policy", "set", "endpoint"]
PinKey = tuple[PinKind, str]

_SET_REF = re.compile(r"--match-set (\S+) ")
_DISPATCH: tuple[tuple[Direction, str], ...] = (("ingress", TO_WL_CHAIN), ("egress", FROM_WL_CHAIN))
_KIND_OF_TYPE: dict[SetType, SetKind] = {"hash:ip": "pods", "hash:net": "net", "hash:ip,port": "ports"}


def set_kind(set_type: SetType) -> SetKind | None:
    """The peer-set kind an ipset type renders (None for a type we never create)."""
    return _KIND_OF_TYPE.get(set_type)


@dataclass(frozen=True, slots=True)
class Pinned:
    """Chains (per family), dispatch rules and ipsets carried over from the kernel."""

    chains: dict[Family, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    dispatch: dict[Family, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    sets: dict[str, IpSet] = field(default_factory=dict)
    found: frozenset[PinKey] = frozenset()  # the requested keys the kernel had rules or sets for

    @property
    def empty(self) -> bool:
        return not (self.chains or self.dispatch or self.sets)


def merge(parts: Iterable[Pinned]) -> Pinned:
    """One Pinned holding all of ``parts`` (dispatch rules in order, without repeats)."""
    chains: dict[Family, dict[str, tuple[str, ...]]] = {}
    dispatch: dict[Family, dict[str, tuple[str, ...]]] = {}
    sets: dict[str, IpSet] = {}
    found: set[PinKey] = set()
    for part in parts:
        for fam, fam_chains in part.chains.items():
            chains.setdefault(fam, {}).update(fam_chains)
        for fam, fam_dispatch in part.dispatch.items():
            into = dispatch.setdefault(fam, {})
            for chain, lines in fam_dispatch.items():
                into[chain] = tuple(dict.fromkeys((*into.get(chain, ()), *lines)))
        sets.update(part.sets)
        found |= part.found
    return Pinned(chains, dispatch, sets, frozenset(found))


def carry(kernel: KernelState, key: PinKey, families: Iterable[Family]) -> Pinned:
    """What the kernel holds for one key (``KernelState`` read with set contents)."""
    kind, name = key
    kernel_sets = kernel.sets or {}
    chains: dict[Family, dict[str, tuple[str, ...]]] = {}
    dispatch: dict[Family, dict[str, tuple[str, ...]]] = {}
    sets: dict[str, IpSet] = {}
    for fam in families:
        table = kernel.table(fam)
        carried: dict[str, tuple[str, ...]] = {}
        if kind in ("policy", "cluster_policy"):
            name_of = policy_chain if kind == "policy" else cluster_chain
            for direction, _ in _DISPATCH:
                chain = name_of(direction, name)
                if chain in table.chains:
                    carried[chain] = table.chains[chain]
        elif kind == "endpoint":
            for direction, wl in _DISPATCH:
                chain = endpoint_chain(direction, name)
                if chain not in table.chains:
                    continue
                carried[chain] = table.chains[chain]
                lines = tuple(ln for ln in table.chains.get(wl, ()) if ln.endswith(f" -g {chain}"))
                if lines:
                    dispatch.setdefault(fam, {})[wl] = lines
        else:
            ipset = set_name(fam, name)
            if ipset in kernel_sets:
                sets[ipset] = kernel_sets[ipset]
        _add_targets(carried, table.chains)
        for rules in carried.values():
            for rule in rules:
                for ref in _SET_REF.findall(rule):
                    if ref in kernel_sets:
                        sets[ref] = kernel_sets[ref]
        if carried:
            chains[fam] = carried
    found = frozenset({key}) if chains or dispatch or sets else frozenset()
    return Pinned(chains, dispatch, sets, found)


def _add_targets(carried: dict[str, tuple[str, ...]], available: dict[str, tuple[str, ...]]) -> None:
    """Add the chains ``carried`` rules jump to (transitively), as the kernel holds them."""
    todo = [t for rules in carried.values() for r in rules for t in JUMP_TARGET.findall(r)]
    while todo:
        target = todo.pop()
        if target in carried or not is_owned_chain(target) or target not in available:
            continue
        carried[target] = available[target]
        todo += [t for r in available[target] for t in JUMP_TARGET.findall(r)]


@dataclass
class PinCache:
    """The pinned state per key, read from the kernel once (before our own apply replaces it).

    :meth:`needs` tells which requested keys have not been read yet; after
    :meth:`learn` stores what the kernel held for them, :meth:`pinned` returns
    the merged pins for the current request. Keys no longer requested (a good
    value arrived) are forgotten, so a key that turns bad again is read anew.
    """

    entries: dict[PinKey, Pinned] = field(default_factory=dict)

    def needs(self, request: Iterable[PinKey]) -> set[PinKey]:
        return {key for key in request if key not in self.entries}

    def learn(self, kernel: KernelState, keys: Iterable[PinKey], families: Iterable[Family]) -> None:
        fams = tuple(families)
        for key in keys:
            self.entries[key] = carry(kernel, key, fams)

    def pinned(self, request: Iterable[PinKey]) -> Pinned:
        wanted = set(request)
        for key in [k for k in self.entries if k not in wanted]:
            del self.entries[key]
        return merge(self.entries[k] for k in sorted(wanted) if k in self.entries)

    def found(self, key: PinKey) -> bool | None:
        """Whether the kernel had rules or sets for ``key`` (None: not read)."""
        entry = self.entries.get(key)
        return None if entry is None else key in entry.found
