"""Incremental rendering: keep the last rendering, re-render only what a model change touches (pure).

The agent hands :meth:`IncrementalRenderer.render` the node's whole model after every
commit. The renderer finds the keys whose value changed since the previous model
(a pointer comparison per key: ``NodeState`` keeps the decoded object of every
unchanged key) and re-renders only:

* a changed policy: its own chains (``nf-pi-``/``nf-po-`` of that key); the endpoint
  chains that jump to one of them only when it appears, disappears or turns
  empty/non-empty (a policy that can never match gets no jump);
* a set whose members changed: that ipset, never a chain (a set exists even when
  empty, so membership never changes a rule); a set that appears, disappears or
  changes kind: the policy chains whose rules name it, then as above;
* a changed endpoint: its endpoint chains and the two dispatch chains.

Dirty tracking is keyed by chain name, as Calico felix keeps dirty chains and
dirty sets: an endpoint chain lists the *rule chains* it may jump to, each rule
chain knows its source (direction and policy key), its users (endpoints) and the
set ids its rules name. Another kind of rule chain (cluster policy tiers) adds a
source, not a new scheme. Until then a model with cluster policies or endpoints
that list some, and a model with pinned rules (dataplane/pins.py, rare), is
rendered in full by :func:`~netfence.dataplane.render.render`.

The result always equals ``render(model)`` (tests/unit/dataplane/test_incremental.py
checks it on random sequences of changes); :attr:`IncrementalRenderer.rendered`
counts the chains each call actually rendered.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from netfence.dataplane.members import SET_TYPE, family_members
from netfence.dataplane.names import DIRECTIONS, Direction, endpoint_chain, policy_chain, set_name
from netfence.dataplane.pins import Pinned
from netfence.dataplane.render import (
    _SET_REF,
    ESTABLISHED_RETURN,
    Features,
    _FamilyRenderer,
    _rule_set_ids,
    dispatch_lines,
    endpoint_lines,
    render,
    unknown_workload_drops,
)
from netfence.dataplane.ruleset import (
    FAMILIES,
    FORWARD_CHAIN,
    FROM_WL_CHAIN,
    SET_FAMILY,
    TO_WL_CHAIN,
    Family,
    IpSet,
    Ruleset,
)
from netfence.model.enforcement import Endpoint, NodeModel

log = logging.getLogger(__name__)

_V = TypeVar("_V")
_MISSING = object()


def changed_keys(old: Mapping[str, _V], new: Mapping[str, _V]) -> list[str]:
    """Keys added, removed or whose value changed (identity first, then equality)."""
    if old is new:
        return []
    out = [k for k, v in new.items() if (o := old.get(k, _MISSING)) is not v and o != v]
    out += [k for k in old if k not in new]
    return out


@dataclass(frozen=True, slots=True)
class ModelChanges:
    """The keys of a model change, by kind."""

    policies: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()  # any change (members, kind, added, removed)
    set_kinds: tuple[str, ...] = ()  # added, removed or changed kind: the rules naming it change

    @classmethod
    def between(cls, old: NodeModel, new: NodeModel) -> ModelChanges:
        sets = changed_keys(old.sets, new.sets)
        kinds = []
        for sid in sets:
            before, after = old.sets.get(sid), new.sets.get(sid)
            if before is None or after is None or before.kind != after.kind:
                kinds.append(sid)
        return cls(
            policies=tuple(changed_keys(old.policies, new.policies)),
            endpoints=tuple(changed_keys(old.endpoints, new.endpoints)),
            sets=tuple(sets),
            set_kinds=tuple(kinds),
        )

    @property
    def empty(self) -> bool:
        return not (self.policies or self.endpoints or self.sets)


@dataclass
class _EndpointState:
    ips: tuple[str, ...]  # this family's addresses, as rendered (sorted)
    refs: dict[Direction, tuple[str, ...]]  # rule chains its endpoint chain may jump to, in order
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # its endpoint chains
    from_wl: tuple[str, ...] = ()  # its dispatch rules
    to_wl: tuple[str, ...] = ()


class _FamilyState:
    """One family's rendering, kept between commits."""

    def __init__(self, family: Family, features: Features) -> None:
        self.family = family
        self.features = features
        self.endpoints: dict[str, _EndpointState] = {}
        self.order: list[str] = []  # endpoint keys, sorted (dispatch order)
        self.rule_lines: dict[str, tuple[str, ...]] = {}  # rendered rule chains (empty: never matches)
        self.sources: dict[str, tuple[Direction, str]] = {}  # rule chain -> (direction, policy key)
        self.users: dict[str, set[str]] = {}  # rule chain -> endpoints listing it
        self.chain_sets: dict[str, frozenset[str]] = {}  # rule chain -> set ids its rules name
        self.set_users: dict[str, set[str]] = {}  # set id -> rule chains naming it
        #: the last rules of the dispatch chains (features.workload_cidrs: unknown workloads dropped)
        self.drops = {d: unknown_workload_drops(d, family, features) for d in DIRECTIONS}
        self.out: dict[str, tuple[str, ...]] = {
            FORWARD_CHAIN: (*ESTABLISHED_RETURN, f"-j {FROM_WL_CHAIN}", f"-j {TO_WL_CHAIN}"),
            FROM_WL_CHAIN: self.drops["egress"],
            TO_WL_CHAIN: self.drops["ingress"],
        }
        self.out_sorted = False
        self._out_copy: dict[str, tuple[str, ...]] | None = None  # the last snapshot, while still current
        self.set_refs: dict[str, int] = {}  # ipset name -> output chains naming it
        self.set_ids: dict[str, str] = {}  # ipset name -> set id
        self.ipsets: dict[str, IpSet] = {}
        self.ipsets_sorted = True
        self._new_set_names: set[str] = set()

    # ---- output bookkeeping ----------------------------------------------------
    def _set_out(self, name: str, lines: tuple[str, ...] | None) -> None:
        old = self.out.get(name)
        if old is lines or old == lines:
            return
        self._out_copy = None
        if old is not None:
            for ref in _SET_REF.findall("\n".join(old)):
                self.set_refs[ref] -= 1
                if not self.set_refs[ref]:
                    del self.set_refs[ref]
                    self.ipsets.pop(ref, None)
                    self._new_set_names.discard(ref)
        if lines is None:
            self.out.pop(name, None)
            return
        if old is None:
            self.out_sorted = False
        self.out[name] = lines
        for ref in _SET_REF.findall("\n".join(lines)):
            count = self.set_refs.get(ref, 0)
            self.set_refs[ref] = count + 1
            if not count:
                self._new_set_names.add(ref)

    def _unlink_sets(self, chain: str) -> None:
        for sid in self.chain_sets.pop(chain, ()):
            users = self.set_users.get(sid)
            if users is not None:
                users.discard(chain)
                if not users:
                    del self.set_users[sid]

    # ---- one commit -------------------------------------------------------------
    def update(self, model: NodeModel, changes: ModelChanges, rendered: Counter[str]) -> None:
        renderer = _FamilyRenderer(model, self.family, self.features)
        redo: dict[str, set[Direction]] = {}  # endpoint -> directions whose endpoint chain to re-render
        recheck: set[str] = set()  # rule chains whose users changed: new ones to render, unused ones to forget
        for key in changes.endpoints:
            self._endpoint_changed(key, model, renderer, recheck, redo)
        dirty: set[str] = set()  # rule chains whose content may have changed
        for key in changes.policies:
            for direction in DIRECTIONS:
                chain = policy_chain(direction, key)
                if chain in self.users:
                    dirty.add(chain)
        for sid in changes.set_kinds:
            dirty.update(self.set_users.get(sid, ()))
        for chain in sorted(recheck | dirty):
            if chain in dirty or chain not in self.rule_lines or not self.users.get(chain):
                self._rule_chain(chain, model, renderer, redo, rendered)
        for key, directions in redo.items():
            self._endpoint_chains(key, directions, model, rendered)
        if changes.endpoints:
            self._dispatch()
        for sid in changes.sets:
            name = set_name(self.family, sid)
            if name in self.set_refs:
                self._new_set_names.add(name)
        self.set_ids.update(renderer.set_ids)
        for name in self._new_set_names:
            self._ipset(name, model)
        self._new_set_names.clear()

    def _endpoint_changed(self, key: str, model: NodeModel, renderer: _FamilyRenderer, recheck: set[str],
                          redo: dict[str, set[Direction]]) -> None:
        old = self.endpoints.pop(key, None)
        if old is not None:
            for old_refs in old.refs.values():
                for chain in old_refs:
                    self.users[chain].discard(key)
                    if not self.users[chain]:
                        recheck.add(chain)
            for name in old.chains:
                self._set_out(name, None)
        ep = model.endpoints.get(key)
        if ep is None:
            return
        ips = tuple(renderer.endpoint_ips(ep))
        refs: dict[Direction, tuple[str, ...]] = {}
        if ips:
            for direction in DIRECTIONS:
                chains: dict[str, None] = {}
                for policy in ep.ingress if direction == "ingress" else ep.egress:
                    chain = policy_chain(direction, policy)
                    chains[chain] = None
                    self.users.setdefault(chain, set()).add(key)
                    self.sources[chain] = (direction, policy)
                    if chain not in self.rule_lines:
                        recheck.add(chain)
                if chains:
                    refs[direction] = tuple(chains)
        state = _EndpointState(ips, refs)
        fw = endpoint_chain("egress", ep.key) if "egress" in refs else None
        tw = endpoint_chain("ingress", ep.key) if "ingress" in refs else None
        state.from_wl = dispatch_lines("egress", ips, fw, self.family, self.features)
        state.to_wl = dispatch_lines("ingress", ips, tw, self.family, self.features)
        self.endpoints[key] = state
        redo[key] = set(refs)

    def _rule_chain(self, chain: str, model: NodeModel, renderer: _FamilyRenderer,
                    redo: dict[str, set[Direction]], rendered: Counter[str]) -> None:
        """Render rule chain ``chain`` again (or forget it when no endpoint lists it any more)."""
        was_jumped = bool(self.rule_lines.get(chain))
        users = self.users.get(chain)
        self._unlink_sets(chain)
        if not users:
            self.users.pop(chain, None)
            self.sources.pop(chain, None)
            self.rule_lines.pop(chain, None)
            self._set_out(chain, None)
            return
        direction, key = self.sources[chain]
        policy = model.policies.get(key)
        if policy is None:
            self.rule_lines.pop(chain, None)
            lines: tuple[str, ...] = ()
        else:
            rules = (policy.ingress if direction == "ingress" else policy.egress) or ()
            lines = renderer.policy_lines(direction, rules)
            rendered[chain] += 1
            self.rule_lines[chain] = lines
            sids = frozenset(sid for rule in rules for sid in _rule_set_ids(rule))
            self.chain_sets[chain] = sids
            for sid in sids:
                self.set_users.setdefault(sid, set()).add(chain)
        self._set_out(chain, lines or None)
        if bool(lines) != was_jumped:
            for user in users:
                redo.setdefault(user, set()).add(direction)

    def _endpoint_chains(self, key: str, directions: set[Direction], model: NodeModel,
                         rendered: Counter[str]) -> None:
        state = self.endpoints.get(key)
        ep = model.endpoints.get(key)
        if state is None or ep is None:
            return
        for direction in sorted(directions):
            refs = state.refs.get(direction)
            if not refs:
                continue
            jumps = []
            for chain in refs:
                if self.rule_lines.get(chain):
                    jumps.append(chain)
                elif self.sources[chain][1] not in model.policies:
                    log.warning("endpoint %s refers to unknown policy %s (treated as deny)", ep.key,
                                self.sources[chain][1])
            name = endpoint_chain(direction, ep.key)
            lines = endpoint_lines(ep.key, direction, jumps, self.features)
            rendered[name] += 1
            state.chains[name] = lines
            self._set_out(name, lines)

    def _dispatch(self) -> None:
        if len(self.order) != len(self.endpoints) or any(k not in self.endpoints for k in self.order):
            self.order = sorted(self.endpoints)
        eps = [self.endpoints[k] for k in self.order]
        self._set_out(FROM_WL_CHAIN, (*(line for ep in eps for line in ep.from_wl), *self.drops["egress"]))
        self._set_out(TO_WL_CHAIN, (*(line for ep in eps for line in ep.to_wl), *self.drops["ingress"]))

    def _ipset(self, name: str, model: NodeModel) -> None:
        sid = self.set_ids.get(name)
        ps = model.sets.get(sid) if sid is not None else None
        if ps is None:  # cannot happen: rendered rules name only sets of the model
            raise ValueError(f"rendered rules refer to set {name}, which is not in the model")
        ipset = IpSet(name=name, type=SET_TYPE[ps.kind], family=SET_FAMILY[self.family],
                      members=family_members(ps.kind, ps.members, self.family))
        old = self.ipsets.get(name)
        if old is None:
            self.ipsets_sorted = False
        elif old == ipset:  # e.g. only the other family's members changed: plan() skips the same object
            return
        self.ipsets[name] = ipset

    def snapshot(self) -> tuple[dict[str, tuple[str, ...]], dict[str, IpSet]]:
        """Copies of the chains and ipsets, sorted by name (the caller may keep them)."""
        if not self.out_sorted:
            self.out = dict(sorted(self.out.items()))
            self.out_sorted = True
        if not self.ipsets_sorted:
            self.ipsets = dict(sorted(self.ipsets.items()))
            self.ipsets_sorted = True
        if self._out_copy is None:  # unchanged chains: the same dict again (plan() skips it at once)
            self._out_copy = dict(self.out)
        return self._out_copy, self.ipsets


class IncrementalRenderer:
    """Renders a node's model commit after commit, re-rendering only what changed.

    ``full``: always render the whole model from scratch (:func:`render`), as the
    agent did before; benchmarks use it to measure the old path in the same run.
    """

    def __init__(self, features: Features, *, full: bool = False) -> None:
        self.features = features
        self.full = full
        #: chain name -> times it was rendered incrementally (tests count through it)
        self.rendered: Counter[str] = Counter()
        self.full_renders = 0  # calls answered by a full render()
        self._model: NodeModel | None = None
        self._families: dict[Family, _FamilyState] = {}
        self._endpoints_seen: Mapping[str, Endpoint] = {}  # of the last call, incremental or not
        self._tiered: set[str] = set()  # endpoints listing cluster policies

    def reset(self) -> None:
        """Forget the kept rendering: the next call renders everything again."""
        self._model = None
        self._families = {}

    def render(self, model: NodeModel, *, pinned: Pinned | None = None) -> Ruleset:
        """The desired Ruleset for ``model``: always equal to ``render(model, features, pinned)``."""
        for key in changed_keys(self._endpoints_seen, model.endpoints):
            ep = model.endpoints.get(key)
            if ep is not None and ep.has_cluster_policies:
                self._tiered.add(key)
            else:
                self._tiered.discard(key)
        self._endpoints_seen = model.endpoints
        if self.full or (pinned is not None and not pinned.empty) or model.cluster_policies or self._tiered:
            self.reset()
            self.full_renders += 1
            return render(model, features=self.features, pinned=pinned)
        previous = self._model
        if previous is None:
            families = FAMILIES if self.features.ipv6 else FAMILIES[:1]
            self._families = {fam: _FamilyState(fam, self.features) for fam in families}
            previous = NodeModel(node=model.node, endpoints={}, policies={}, sets={})
        self._model = None  # until the update is complete: a failure leaves no half-updated state behind
        try:
            changes = ModelChanges.between(previous, model)
            for state in self._families.values():
                state.update(model, changes, self.rendered)
        except Exception:
            log.exception("incremental rendering failed; rendering the whole model")
            self.reset()
            self.full_renders += 1
            return render(model, features=self.features)
        self._model = model
        chains: dict[Family, dict[str, tuple[str, ...]]] = {}
        sets: dict[str, IpSet] = {}
        for fam, state in self._families.items():  # v4 then v6: nf4-* sorts before nf6-*
            chains[fam], fam_sets = state.snapshot()
            sets.update(fam_sets)
        return Ruleset(sets=sets, chains=chains)
