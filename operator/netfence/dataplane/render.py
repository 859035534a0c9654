"""Render a NodeModel into the desired ipsets and iptables chains (pure).

Layout (documented in docs/design.md, "iptables layout"): FORWARD jumps to
NETFENCE-FORWARD, which returns established traffic and dispatches local
endpoints by IP to per-endpoint chains; those jump to per-policy chains that
set the accept mark bit, and DROP what no policy marked.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from netfence.dataplane.members import SET_TYPE, family_members
from netfence.dataplane.names import Direction, endpoint_chain, policy_chain, set_name
from netfence.dataplane.ruleset import (
    ACCEPT_MARK,
    FAMILIES,
    FORWARD_CHAIN,
    FROM_WL_CHAIN,
    SET_FAMILY,
    TO_WL_CHAIN,
    Family,
    IpSet,
    Ruleset,
)
from netfence.model.enforcement import CompiledPort, CompiledRule, Endpoint, NodeModel, SetKind

log = logging.getLogger(__name__)

MARK_ACCEPT = f"-j MARK --set-xmark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x}"
MARK_CLEAR = f"-j MARK --set-xmark 0x0/{ACCEPT_MARK:#x}"
RETURN_IF_ACCEPTED = f"-m mark --mark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x} -j RETURN"
ESTABLISHED_RETURN = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
_MULTIPORT_SLOTS = 15  # xt_multiport: 15 ports, a range takes two
_COMMENT_SAFE = re.compile(r"[^ A-Za-z0-9._/:-]")
_PROTOS = ("tcp", "udp", "sctp")
_SET_REF = re.compile(r"--match-set (\S+) ")


@dataclass(frozen=True, slots=True)
class Features:
    """What the node's kernel/iptables support, and optional behaviour.

    ``sctp_port_match``: ``-p sctp -m sctp --dport`` loads. With the nf_tables
    backend it is translated to a native payload match and loads even without
    the SCTP kernel module; when False, SCTP port rules degrade to ``-p sctp``
    (any SCTP port, logged as a warning).
    ``drop_invalid``: endpoint chains drop conntrack INVALID packets before
    evaluating policies (as Calico does).
    """

    ipv6: bool = True
    sctp_port_match: bool = True
    drop_invalid: bool = True


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


@dataclass
class _FamilyRenderer:
    model: NodeModel
    family: Family
    features: Features
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    set_ids: dict[str, str] = field(default_factory=dict)  # ipset name -> set id
    warned_sctp: bool = False

    # ---- sets ---------------------------------------------------------------
    def _set_ref(self, set_id: str, want: Iterable[SetKind]) -> str | None:
        peer_set = self.model.sets.get(set_id)
        if peer_set is None or peer_set.kind not in want:
            log.warning("set %r missing or of the wrong kind; its rules never match", set_id)
            return None
        name = set_name(self.family, set_id)
        self.set_ids[name] = set_id
        return name

    def ipsets(self, chains: dict[str, tuple[str, ...]]) -> list[IpSet]:
        """The sets that the rendered ``chains`` refer to (and only those)."""
        used = {m for rules in chains.values() for r in rules for m in _SET_REF.findall(r)}
        out = []
        for sid in sorted({self.set_ids[name] for name in used}):
            ps = self.model.sets[sid]
            out.append(
                IpSet(
                    name=set_name(self.family, sid),
                    type=SET_TYPE[ps.kind],
                    family=SET_FAMILY[self.family],
                    members=family_members(ps.kind, ps.members, self.family),
                )
            )
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
                    log.warning("kernel lacks SCTP port matching: SCTP port rules match any SCTP port")
                    self.warned_sctp = True
                any_port.add(proto)
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
        support and the kind (or absence) of the sets it names, and the agent renders its
        whole model on every commit. Warnings are logged when a rule is first rendered."""
        kinds = tuple(
            (sid, ps.kind if (ps := self.model.sets.get(sid)) is not None else None) for sid in _rule_set_ids(rule)
        )
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

    def policy_chain(self, direction: Direction, key: str, rules: tuple[CompiledRule, ...]) -> str | None:
        """Name of policy ``key``'s chain (rendered on first use); None if it would be empty."""
        name = policy_chain(direction, key)
        if name not in self.chains:
            lines: dict[str, None] = {}
            for rule in rules:
                lines.update(dict.fromkeys(self._rule_lines(direction, rule)))
            self.chains[name] = tuple(lines)
        return name if self.chains[name] else None

    # ---- endpoints ----------------------------------------------------------
    def endpoint_chain(self, ep: Endpoint, direction: Direction) -> str | None:
        keys = ep.ingress if direction == "ingress" else ep.egress
        if not keys:
            return None
        jumps: dict[str, None] = {}
        for key in keys:
            policy = self.model.policies.get(key)
            if policy is None:
                log.warning("endpoint %s refers to unknown policy %s (treated as deny)", ep.key, key)
                continue
            rules = policy.ingress if direction == "ingress" else policy.egress
            chain = self.policy_chain(direction, key, rules or ())
            if chain is not None:
                jumps[chain] = None
        what = f"netfence {direction} {'to' if direction == 'ingress' else 'from'} {ep.key}"
        lines = [MARK_CLEAR]
        if self.features.drop_invalid:
            lines.append(f"-m conntrack --ctstate INVALID {_comment(what + ' invalid')} -j DROP")
        for chain in jumps:
            lines += [f"-j {chain}", RETURN_IF_ACCEPTED]
        lines.append(f"{_comment(what + ' denied')} -j DROP")
        name = endpoint_chain(direction, ep.key)
        self.chains[name] = tuple(lines)
        return name

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
        mask = _ip_mask(self.family)
        for key in sorted(self.model.endpoints):
            ep = self.model.endpoints[key]
            ips = self.endpoint_ips(ep)
            if not ips:
                continue
            fw = self.endpoint_chain(ep, "egress")
            tw = self.endpoint_chain(ep, "ingress")
            from_wl += [f"-s {ip}/{mask} -g {fw}" for ip in ips if fw]
            to_wl += [f"-d {ip}/{mask} -g {tw}" for ip in ips if tw]
        self.chains[FROM_WL_CHAIN] = tuple(from_wl)
        self.chains[TO_WL_CHAIN] = tuple(to_wl)
        self.chains[FORWARD_CHAIN] = (ESTABLISHED_RETURN, f"-j {FROM_WL_CHAIN}", f"-j {TO_WL_CHAIN}")
        # Policy chains that ended up empty are never jumped to: leave them out.
        return {n: rules for n, rules in sorted(self.chains.items()) if rules or n.startswith("NETFENCE-")}


def render(model: NodeModel, *, features: Features = Features()) -> Ruleset:
    """The desired Ruleset for ``model`` (deterministic: equal input, equal output)."""
    families = FAMILIES if features.ipv6 else FAMILIES[:1]
    sets: list[IpSet] = []
    chains: dict[Family, dict[str, tuple[str, ...]]] = {}
    for family in families:
        renderer = _FamilyRenderer(model, family, features)
        chains[family] = renderer.render()
        sets.extend(renderer.ipsets(chains[family]))
    return Ruleset.build(sets, chains)
