"""Render a NodeModel into the desired ipsets and iptables chains (pure).

Layout (documented in docs/design.md, "iptables layout"): FORWARD jumps to
NETFENCE-FORWARD, which returns established traffic (UDP: replies only) and dispatches local
endpoints by IP to per-endpoint chains; those jump to per-policy chains that
set the accept mark bit, and DROP what no policy marked.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from netfence.dataplane import render_tiers
from netfence.dataplane.members import SET_TYPE, family_members
from netfence.dataplane.names import DIRECTIONS, Direction, endpoint_chain, policy_chain, set_name
from netfence.dataplane.pins import Pinned, set_kind
from netfence.dataplane.ruleset import (
    ACCEPT_MARK,
    FAMILIES,
    FORWARD_CHAIN,
    FROM_WL_CHAIN,
    JUMP_TARGET,
    SET_FAMILY,
    TO_WL_CHAIN,
    Family,
    IpSet,
    Ruleset,
    is_owned_chain,
)
from netfence.model.enforcement import CompiledPort, CompiledRule, Endpoint, NodeModel, SetKind

log = logging.getLogger(__name__)

MARK_ACCEPT = f"-j MARK --set-xmark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x}"
MARK_CLEAR = f"-j MARK --set-xmark 0x0/{ACCEPT_MARK:#x}"
RETURN_IF_ACCEPTED = f"-m mark --mark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x} -j RETURN"
#: The conntrack shortcut at the top of NETFENCE-FORWARD ("Established flows" in docs/design.md):
#: established/related TCP, SCTP and ICMP (errors included) return in both directions, so
#: connections outlive a policy that starts denying them; UDP returns only in the reply
#: direction, so every original-direction datagram is checked against the current policy
#: and a UDP flow stops the moment a deny is committed. Spelled as iptables-save prints it.
ESTABLISHED_RETURN: tuple[str, ...] = (
    "-p udp -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j RETURN",
    "! -p udp -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
)
_MULTIPORT_SLOTS = 15  # xt_multiport: 15 ports, a range takes two
_COMMENT_SAFE = re.compile(r"[^ A-Za-z0-9._/:-]")
_PROTOS = ("tcp", "udp", "sctp")
_SET_REF = re.compile(r"--match-set (\S+) ")
#: Feature ids (reported in a node report's ``unenforceable``) -> the Features field.
SCTP_PORT_MATCH = "sctp-port-match"
FEATURE_FIELDS: dict[str, str] = {SCTP_PORT_MATCH: "sctp_port_match"}


@dataclass(frozen=True, slots=True)
class Features:
    """What the node's kernel/iptables support, and optional behaviour.

    ``sctp_port_match``: ``-p sctp -m sctp --dport`` loads. With the nf_tables
    backend it is translated to a native payload match and loads even without
    the SCTP kernel module; when False, a rule's SCTP ports match nothing (the
    rule never allows SCTP: fail closed), and :func:`unenforceable` lists the
    policies concerned for the node report.
    ``drop_invalid``: endpoint chains drop conntrack INVALID packets before
    evaluating policies (as Calico does).
    ``workload_cidrs``: this node's pod CIDRs. When set, a pod is denied until it is
    known: traffic from or to an address of these CIDRs that is no local endpoint of the
    model is dropped at the end of the dispatch chains, and a known endpoint with no
    policy in a direction returns there (as Calico felix drops traffic of workload
    interfaces it has no endpoint for). Empty: no such rules (addresses not in the
    model are not filtered).
    """

    ipv6: bool = True
    sctp_port_match: bool = True
    drop_invalid: bool = True
    workload_cidrs: tuple[str, ...] = ()

    def without(self, feature_ids: Iterable[str]) -> Features:
        """These Features with the named kernel features (``FEATURE_FIELDS`` ids) switched off."""
        off: dict[str, Any] = {}
        for feature in feature_ids:
            if feature not in FEATURE_FIELDS:
                raise ValueError(f"unknown feature {feature!r}; known: {', '.join(sorted(FEATURE_FIELDS))}")
            off[FEATURE_FIELDS[feature]] = False
        return replace(self, **off)


def _comment(text: str) -> str:
    return '-m comment --comment "' + _COMMENT_SAFE.sub("_", text)[:240] + '"'


def _dports(proto: str, ranges: list[tuple[int, int]]) -> list[tuple[str, str]]:
    """(before-peer, after-peer) fragments matching ``ranges`` of ``proto``."""

    def spec(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}:{hi}"

    if len(ranges) == 1:
        return [(f"-p {proto}", f"-m {proto} --dport {spec(*ranges[0])}")]
    out: list[tuple[str, str]] = []
    chunk: list[str] = []
    used = 0
    for lo, hi in ranges:
        cost = 1 if lo == hi else 2
        if used + cost > _MULTIPORT_SLOTS:
            out.append((f"-p {proto}", "-m multiport --dports " + ",".join(chunk)))
            chunk, used = [], 0
        chunk.append(spec(lo, hi))
        used += cost
    out.append((f"-p {proto}", "-m multiport --dports " + ",".join(chunk)))
    return out


_RULE_CACHE_SIZE = 32_768  # entries (rule lines); cleared when full
_RULE_CACHE: dict[tuple[object, ...], tuple[tuple[str, ...], dict[str, str]]] = {}


def _rule_set_ids(rule: CompiledRule) -> tuple[str, ...]:
    """Every set id a rule names (peers, then named ports)."""
    named = tuple(p.named_set for p in rule.ports or () if p.named_set is not None)
    return (*(rule.peers or ()), *named)


def _ip_mask(family: Family) -> int:
    return 32 if family == "v4" else 128


def endpoint_lines(ep_key: str, direction: Direction, jumps: Iterable[str], features: Features) -> tuple[str, ...]:
    """The rules of an endpoint chain jumping to the (non-empty) policy chains ``jumps``, in order."""
    what = f"netfence {direction} {'to' if direction == 'ingress' else 'from'} {ep_key}"
    lines = [MARK_CLEAR]
    if features.drop_invalid:
        lines.append(f"-m conntrack --ctstate INVALID {_comment(what + ' invalid')} -j DROP")
    for chain in jumps:
        lines += [f"-j {chain}", RETURN_IF_ACCEPTED]
    lines.append(f"{_comment(what + ' denied')} -j DROP")
    return tuple(lines)


def dispatch_lines(direction: Direction, ips: Iterable[str], chain: str | None, family: Family,
                   features: Features) -> tuple[str, ...]:
    """An endpoint's dispatch rules in ``direction``: go to its endpoint chain; without one (no
    policy in that direction) return at once, but only when unknown workloads are dropped."""
    match, mask = ("-s" if direction == "egress" else "-d"), _ip_mask(family)
    if chain is not None:
        return tuple(f"{match} {ip}/{mask} -g {chain}" for ip in ips)
    if features.workload_cidrs:
        return tuple(f"{match} {ip}/{mask} -j RETURN" for ip in ips)
    return ()


def unknown_workload_drops(direction: Direction, family: Family, features: Features) -> tuple[str, ...]:
    """The last rules of a dispatch chain: drop this node's pod-CIDR addresses that no endpoint
    rule above matched (pods the model does not know yet)."""
    match = "-s" if direction == "egress" else "-d"
    out = []
    for text in features.workload_cidrs:
        net = ipaddress.ip_network(text, strict=False)
        if (net.version == 4) == (family == "v4"):
            what = f"netfence {direction} {'from' if direction == 'egress' else 'to'} unknown workload"
            out.append(f"{match} {net} {_comment(what)} -j DROP")
    return tuple(out)


@dataclass
class _FamilyRenderer:
    model: NodeModel
    family: Family
    features: Features
    pins: Pinned = field(default_factory=Pinned)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    set_ids: dict[str, str] = field(default_factory=dict)  # ipset name -> set id
    warned_sctp: bool = False
    #: policy chain name -> (direction, policy key), built when pinned rules first need it
    _policy_by_chain: dict[str, tuple[Direction, str]] | None = field(default=None, init=False, repr=False)

    @property
    def pinned_chains(self) -> dict[str, tuple[str, ...]]:
        return self.pins.chains.get(self.family, {})

    # ---- sets ---------------------------------------------------------------
    def _pinned_set(self, set_id: str) -> IpSet | None:
        """The kernel's copy of a set that has no good value (carried over verbatim), if any."""
        return self.pins.sets.get(set_name(self.family, set_id)) if self.pins.sets else None

    def _kind(self, set_id: str) -> SetKind | None:
        peer_set = self.model.sets.get(set_id)
        if peer_set is not None:
            return peer_set.kind
        pinned = self._pinned_set(set_id)
        return None if pinned is None else set_kind(pinned.type)

    def _set_ref(self, set_id: str, want: Iterable[SetKind]) -> str | None:
        kind = self._kind(set_id)
        if kind is None or kind not in want:
            log.warning("set %r missing or of the wrong kind; its rules never match", set_id)
            return None
        name = set_name(self.family, set_id)
        self.set_ids[name] = set_id
        return name

    def ipsets(self, chains: dict[str, tuple[str, ...]]) -> list[IpSet]:
        """The sets that the rendered ``chains`` refer to (and only those).

        A set with a good value is rendered from the model; one without (a
        bad key, or referenced only by a pinned chain) is the kernel's copy.
        """
        used = {m for rules in chains.values() for r in rules for m in _SET_REF.findall(r)}
        by_name: dict[str, str] | None = None
        out = []
        for name in sorted(used):
            sid = self.set_ids.get(name)
            if sid is None or sid not in self.model.sets:
                if by_name is None:
                    by_name = {set_name(self.family, s): s for s in self.model.sets}
                sid = by_name.get(name, sid)
            ps = self.model.sets.get(sid) if sid is not None else None
            if ps is not None:
                out.append(
                    IpSet(
                        name=name,
                        type=SET_TYPE[ps.kind],
                        family=SET_FAMILY[self.family],
                        members=family_members(ps.kind, ps.members, self.family),
                    )
                )
            elif name in self.pins.sets:
                out.append(self.pins.sets[name])
            else:  # cannot happen: rendered rules name model or pinned sets, pinned rules carry theirs
                raise ValueError(f"rendered rules refer to set {name}, which is neither in the model nor pinned")
        return out

    # ---- policy chains ------------------------------------------------------
    def _port_fragments(self, ports: tuple[CompiledPort, ...]) -> list[tuple[str, str]]:
        any_port: set[str] = set()
        numeric: dict[str, set[tuple[int, int]]] = {p: set() for p in _PROTOS}
        named: list[tuple[str, str]] = []
        for port in ports:
            proto = port.protocol.lower()
            if port.named_set is not None:
                ref = self._set_ref(port.named_set, ("ports",))
                if ref is not None:
                    named.append(("", f"-m set --match-set {ref} dst,dst"))
            elif port.port is None:
                any_port.add(proto)
            elif proto == "sctp" and not self.features.sctp_port_match:
                if not self.warned_sctp:
                    log.warning("the kernel cannot match SCTP ports: SCTP port rules match nothing (%s)",
                                SCTP_PORT_MATCH)
                    self.warned_sctp = True
                continue  # fail closed: never "any SCTP port"
            else:
                hi = port.port if port.end_port is None else port.end_port
                if not 1 <= port.port <= hi <= 65535:
                    log.warning("ignoring invalid port range %s-%s", port.port, hi)
                    continue
                numeric[proto].add((port.port, hi))
        frags: list[tuple[str, str]] = []
        for proto in _PROTOS:
            if proto in any_port:
                frags.append((f"-p {proto}", ""))
            elif numeric[proto]:
                frags.extend(_dports(proto, sorted(numeric[proto])))
        frags.extend(dict.fromkeys(named))
        return frags

    def _rule_lines(self, direction: Direction, rule: CompiledRule) -> tuple[str, ...]:
        """The rule's lines, cached: they depend only on the family, direction, rule, SCTP
        support and the kind (or absence) of the sets it names, and full renders (agent
        start, repairs, pinned rules) render every policy again. Warnings are logged when a
        rule is first rendered."""
        kinds = tuple((sid, self._kind(sid)) for sid in _rule_set_ids(rule))
        key = (self.family, direction, rule, self.features.sctp_port_match, kinds)
        hit = _RULE_CACHE.get(key)
        if hit is None:
            outer, self.set_ids = self.set_ids, {}
            try:
                lines = tuple(self._render_rule(direction, rule))
                hit = (lines, self.set_ids)
            finally:
                self.set_ids = {**outer, **self.set_ids}
            if len(_RULE_CACHE) >= _RULE_CACHE_SIZE:
                _RULE_CACHE.clear()
            _RULE_CACHE[key] = hit
        else:
            self.set_ids.update(hit[1])
        return hit[0]

    def _render_rule(self, direction: Direction, rule: CompiledRule) -> list[str]:
        where = "src" if direction == "ingress" else "dst"
        peers: list[str] = [""]
        if rule.peers is not None:
            refs = (self._set_ref(sid, ("pods", "net")) for sid in dict.fromkeys(rule.peers))
            peers = [f"-m set --match-set {ref} {where}" for ref in refs if ref is not None]
        ports: list[tuple[str, str]] = [("", "")]
        if rule.ports is not None:
            ports = self._port_fragments(rule.ports)
        lines = []
        for peer in peers:
            for before, after in ports:
                lines.append(" ".join(p for p in (before, peer, after, MARK_ACCEPT) if p))
        return lines

    def policy_lines(self, direction: Direction, rules: tuple[CompiledRule, ...]) -> tuple[str, ...]:
        """The rules of a policy chain (empty: the policy can never match in ``direction``)."""
        lines: dict[str, None] = {}
        for rule in rules:
            lines.update(dict.fromkeys(self._rule_lines(direction, rule)))
        return tuple(lines)

    def policy_chain(self, direction: Direction, key: str, rules: tuple[CompiledRule, ...]) -> str | None:
        """Name of policy ``key``'s chain (rendered on first use); None if it would be empty."""
        name = policy_chain(direction, key)
        if name not in self.chains:
            self.chains[name] = self.policy_lines(direction, rules)
        return name if self.chains[name] else None

    # ---- endpoints ----------------------------------------------------------
    def endpoint_chain(self, ep: Endpoint, direction: Direction) -> str | None:
        keys = ep.ingress if direction == "ingress" else ep.egress
        if any(ep.tiers(direction)):  # ClusterNetworkPolicy tiers around the NetworkPolicy jumps
            return render_tiers.endpoint_chain(self, ep, direction)
        if not keys:
            return None
        name = endpoint_chain(direction, ep.key)
        self.chains[name] = endpoint_lines(ep.key, direction, self.policy_jumps(ep, direction, keys), self.features)
        return name

    def policy_jumps(self, ep: Endpoint, direction: Direction, keys: tuple[str, ...]) -> dict[str, None]:
        """The (non-empty or pinned) NetworkPolicy chains endpoint ``ep`` jumps to, in order."""
        jumps: dict[str, None] = {}
        for key in keys:
            policy = self.model.policies.get(key)
            if policy is None:
                pinned = policy_chain(direction, key)
                if pinned in self.pinned_chains:  # no good value: the kernel's rules for it stay
                    self.chains[pinned] = self.pinned_chains[pinned]
                    jumps[pinned] = None
                    continue
                log.warning("endpoint %s refers to unknown policy %s (treated as deny)", ep.key, key)
                continue
            rules = policy.ingress if direction == "ingress" else policy.egress
            chain = self.policy_chain(direction, key, rules or ())
            if chain is not None:
                jumps[chain] = None
        return jumps

    def endpoint_ips(self, ep: Endpoint) -> list[str]:
        out = []
        for text in ep.ips:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                log.warning("endpoint %s has a malformed IP %r", ep.key, text)
                continue
            if (ip.version == 4) == (self.family == "v4"):
                out.append(ip)
        return [str(ip) for ip in sorted(set(out))]

    def render(self) -> dict[str, tuple[str, ...]]:
        from_wl: list[str] = []
        to_wl: list[str] = []
        for key in sorted(self.model.endpoints):
            ep = self.model.endpoints[key]
            ips = self.endpoint_ips(ep)
            if not ips:
                continue
            fw = self.endpoint_chain(ep, "egress")
            tw = self.endpoint_chain(ep, "ingress")
            from_wl += dispatch_lines("egress", ips, fw, self.family, self.features)
            to_wl += dispatch_lines("ingress", ips, tw, self.family, self.features)
        # Endpoints without a good value keep their kernel dispatch (and chains, pulled in below).
        pinned_dispatch = self.pins.dispatch.get(self.family, {})
        from_wl += [ln for ln in pinned_dispatch.get(FROM_WL_CHAIN, ()) if ln not in from_wl]
        to_wl += [ln for ln in pinned_dispatch.get(TO_WL_CHAIN, ()) if ln not in to_wl]
        from_wl += unknown_workload_drops("egress", self.family, self.features)
        to_wl += unknown_workload_drops("ingress", self.family, self.features)
        self.chains[FROM_WL_CHAIN] = tuple(from_wl)
        self.chains[TO_WL_CHAIN] = tuple(to_wl)
        self.chains[FORWARD_CHAIN] = (*ESTABLISHED_RETURN, f"-j {FROM_WL_CHAIN}", f"-j {TO_WL_CHAIN}")
        # Policy chains that ended up empty are never jumped to: leave them out.
        out = {n: rules for n, rules in self.chains.items() if rules or n.startswith("NETFENCE-")}
        if not self.pins.empty:  # without pins every jump target is a rendered, non-empty chain
            self._add_jump_targets(out)
        return dict(sorted(out.items()))

    def _add_jump_targets(self, out: dict[str, tuple[str, ...]]) -> None:
        """Add the chains that pinned rules jump to but were not rendered (from the kernel, or empty)."""
        todo = [t for rules in out.values() for r in rules for t in JUMP_TARGET.findall(r)]
        while todo:
            target = todo.pop()
            if target in out or not is_owned_chain(target):
                continue
            if target not in self.chains:
                self._render_target(target)
            if target in self.chains:
                rules = self.chains[target]  # rendered (possibly empty: the policy matches nothing)
            elif target in self.pinned_chains:
                rules = self.pinned_chains[target]
            else:
                continue  # pins always carry the chains their rules need
            out[target] = rules
            todo += [t for r in rules for t in JUMP_TARGET.findall(r)]

    def _render_target(self, target: str) -> None:
        """Render ``target`` if the model has it: a pinned endpoint jumps to a policy (or cluster
        policy) with a good value, or pinned rules go to a fixed chain (never the kernel's copy)."""
        if target in render_tiers.FIXED_CHAINS:
            self.chains[target] = render_tiers.FIXED_CHAINS[target]
        elif target.startswith(("nf-pi-", "nf-po-")):
            if self._policy_by_chain is None:
                self._policy_by_chain = {
                    policy_chain(d, key): (d, key) for key in self.model.policies for d in DIRECTIONS
                }
            if target in self._policy_by_chain:
                direction, key = self._policy_by_chain[target]
                policy = self.model.policies[key]
                self.policy_chain(direction, key, (policy.ingress if direction == "ingress" else policy.egress) or ())
        elif target.startswith(render_tiers.CLUSTER_CHAIN_PREFIXES):
            render_tiers.render_target(self, target)


def render(model: NodeModel, *, features: Features = Features(), pinned: Pinned | None = None) -> Ruleset:
    """The desired Ruleset for ``model`` (deterministic: equal input, equal output).

    ``pinned``: rules and sets carried over verbatim from the kernel for keys
    that have no good value (dataplane/pins.py): an endpoint referring to a
    policy missing from the model jumps to the policy's pinned chain, a rule
    naming a missing set uses the pinned set, and pinned endpoints keep their
    dispatch and chains.
    """
    families = FAMILIES if features.ipv6 else FAMILIES[:1]
    sets: list[IpSet] = []
    chains: dict[Family, dict[str, tuple[str, ...]]] = {}
    for family in families:
        renderer = _FamilyRenderer(model, family, features, pinned or Pinned())
        chains[family] = renderer.render()
        sets.extend(renderer.ipsets(chains[family]))
    return Ruleset.build(sets, chains)


def unenforceable(model: NodeModel, features: Features) -> list[tuple[str, str]]:
    """``(policy, feature id)`` of policies applied on this node with rules the kernel cannot match.

    Those rules are rendered fail closed (see ``Features``; a cluster policy's Deny rule denies
    any SCTP port instead); the agent lists these pairs in its report's ``unenforceable``. A
    NetworkPolicy is named ``ns/name``, a cluster policy ``/name`` (empty namespace: the key
    the controller's status aggregation looks it up by). Cluster policies count where their
    chain is rendered: Admin tier always, Baseline only where no NetworkPolicy isolates.
    """
    if features.sctp_port_match:
        return []
    found: set[tuple[str, str]] = set()
    for ep in model.endpoints.values():
        if not ep.ips:
            continue
        for direction in DIRECTIONS:
            keys = _sctp_policies(model, ep, direction)
            keys |= {cluster_policy_id(name) for name in _sctp_cluster_policies(model, ep, direction)}
            found |= {(key, SCTP_PORT_MATCH) for key in keys}
    return sorted(found)


def cluster_policy_id(name: str) -> str:
    """How reports name a cluster policy: ``/<name>`` (namespace empty, as the controller holds it)."""
    return "/" + name


def _sctp_policies(model: NodeModel, ep: Endpoint, direction: Direction) -> set[str]:
    """The NetworkPolicies ``ep`` lists in ``direction`` that have SCTP port rules there."""
    out = set()
    for key in ep.ingress if direction == "ingress" else ep.egress:
        policy = model.policies.get(key)
        if policy is None:
            continue
        rules = (policy.ingress if direction == "ingress" else policy.egress) or ()
        if any(_sctp_port(port) for rule in rules for port in rule.ports or ()):
            out.add(key)
    return out


def _sctp_cluster_policies(model: NodeModel, ep: Endpoint, direction: Direction) -> set[str]:
    """The cluster policies rendered in ``ep``'s ``direction`` that have SCTP port rules there."""
    admin, baseline = ep.tiers(direction)
    isolated = bool(ep.ingress if direction == "ingress" else ep.egress)
    out = set()
    for name in admin if isolated else (*admin, *baseline):
        policy = model.cluster_policies.get(name)
        if policy is None:
            continue
        if any(_sctp_port(port) for rule in policy.rules(direction) for port in rule.match.ports or ()):
            out.add(name)
    return out


def _sctp_port(port: CompiledPort) -> bool:
    return port.protocol.lower() == "sctp" and port.port is not None and port.named_set is None
