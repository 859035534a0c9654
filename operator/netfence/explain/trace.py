"""Pure: trace one connection through the compiled model of the nodes that enforce it.

This is the evaluator behind ``netfence explain``. It reads the same values the
agents render (:class:`~netfence.model.enforcement.NodeModel`: endpoints,
compiled policies, peer sets, as decoded from the committed etcd state by the
agent's own :class:`~netfence.agent.node_state.NodeState`) and follows the
renderer's semantics (``dataplane/render.py``):

* a packet is dispatched by address: the egress side is the endpoint of the
  source's node whose IPs include the source address, the ingress side the
  endpoint of the destination's node holding the destination address; no
  endpoint, or no policy in that direction: not isolated, allowed;
* an isolated endpoint's chain jumps to its policies' chains in order; a packet
  is allowed when a rule of one of them matches: its peer is in one of the
  rule's ``pods``/``net`` sets (``None``: any peer) and its port matches one of
  the rule's ports (``None``: any) — ``net`` sets with ipset ``nomatch``
  semantics, named ports matched on ``destination ip,proto:port``;
* what the renderer leaves out matches nothing: a set or policy missing from
  the model, a set of the wrong kind, an invalid port range, SCTP ports on a
  node without ``sctp-port-match`` (fail closed).

For a denied direction it also finds the *nearest miss*: the first rule, in
chain order, with the fewest failing parts (peer, port), and says why it fails
in the terms of the policy (the compiled sets carry their selectors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from netfence.dataplane.names import Direction
from netfence.dataplane.render import SCTP_PORT_MATCH, Features
from netfence.model.enforcement import (
    CompiledClusterRule,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
    PeerSet,
    Protocol,
)
from netfence.model.evaluate import NetSet

DIRECTIONS: tuple[Direction, ...] = ("egress", "ingress")


@dataclass(frozen=True, slots=True)
class Party:
    """One end of a connection: a pod (``namespace``/``name`` set) or an address outside the pods."""

    ip: str
    namespace: str | None = None
    name: str | None = None
    node: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] | None = None  # None: the Namespace object is unknown
    host_network: bool = False

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None and self.name is not None

    @property
    def key(self) -> str | None:
        return f"{self.namespace}/{self.name}" if self.is_pod else None

    def describe(self) -> str:
        return f"{self.key} ({self.ip})" if self.is_pod else self.ip


@dataclass(frozen=True, slots=True)
class Connection:
    src: Party
    dst: Party
    port: int
    protocol: Protocol

    def local(self, direction: Direction) -> Party:
        """The party whose node enforces ``direction`` (the source for egress)."""
        return self.src if direction == "egress" else self.dst

    def peer(self, direction: Direction) -> Party:
        return self.dst if direction == "egress" else self.src


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """The rule that allows a direction: ``rule`` is its index in the policy's list for the direction."""

    policy: str
    rule: int
    peer: str
    port: str
    sets: tuple[str, ...]  # set ids it matched through (peer set, named-port set)

    def describe(self, direction: Direction) -> str:
        return f"policy {self.policy} {direction} rule {self.rule} (peer: {self.peer}; port: {self.port})"


@dataclass(frozen=True, slots=True)
class Miss:
    """Why one rule (``rule`` None: the whole policy) does not match; ``failed`` parts (3: no rule at all)."""

    policy: str
    rule: int | None
    text: str
    failed: int
    sets: tuple[str, ...] = ()

    def describe(self, direction: Direction) -> str:
        where = f"policy {self.policy}" + ("" if self.rule is None else f" {direction} rule {self.rule}")
        return f"{where}: {self.text}"


@dataclass(frozen=True, slots=True)
class ClusterDecision:
    """The ClusterNetworkPolicy rule that decided a direction (Accept or Deny; ``rule`` -1: the
    policy is missing from the committed model, which denies)."""

    policy: str
    tier: str
    rule: int
    action: str
    peer: str
    port: str
    rule_name: str = ""
    sets: tuple[str, ...] = ()

    def describe(self, direction: Direction) -> str:
        verb = "allowed" if self.action == "Accept" else "denied"
        if self.rule < 0:
            return f"{verb}: cluster policy {self.policy} ({self.tier} tier) is missing from the committed model"
        named = f" {self.rule_name!r}" if self.rule_name else ""
        return (f"{verb} by cluster policy {self.policy} ({self.tier} tier) {direction} rule {self.rule}{named}: "
                f"{self.action} (peer: {self.peer}; port: {self.port})")


@dataclass(frozen=True, slots=True)
class DirectionTrace:
    """The verdict of one direction on one node."""

    direction: Direction
    node: str
    endpoint: str | None  # key of the endpoint record the address dispatches to (None: none there)
    policies: tuple[str, ...]  # the policies isolating the endpoint in this direction, in chain order
    allowed: bool
    match: RuleMatch | None = None
    nearest: Miss | None = None
    notes: tuple[str, ...] = ()

    #: ClusterNetworkPolicies evaluated for this direction (Admin, then Baseline when no policy isolates)
    tiers: tuple[str, ...] = ()
    cluster: ClusterDecision | None = None  # the cluster policy rule that decided, if one did

    @property
    def isolated(self) -> bool:
        return bool(self.policies or self.tiers)

    @property
    def reason(self) -> str:
        if not self.isolated:
            return "not isolated: no policy selects it in this direction"
        if self.cluster is not None:
            return self.cluster.describe(self.direction)
        if self.match is not None:
            return "allowed by " + self.match.describe(self.direction)
        if not self.policies:
            return "no cluster policy rule matched and no NetworkPolicy isolates it: allowed (the default)"
        return "no rule of the isolating policies matches"

    @property
    def set_ids(self) -> tuple[str, ...]:
        """The sets involved in the verdict (of the allowing rule, else of the nearest miss)."""
        if self.match is not None:
            return self.match.sets
        return self.nearest.sets if self.nearest is not None else ()


# --- describing selectors, sets and ports --------------------------------------------------


def describe_selector(canonical: Mapping[str, Any] | None) -> str:
    """A selector in kubectl's spelling: ``a=b,c in (d,e),f,!g``; ``{}`` for the empty one."""
    if not canonical:
        return "{}"
    parts = [f"{k}={v}" for k, v in sorted((canonical.get("matchLabels") or {}).items())]
    for expr in canonical.get("matchExpressions") or ():
        key, op, values = expr.get("key"), expr.get("operator"), ",".join(expr.get("values") or ())
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": f"{key}",
                      "DoesNotExist": f"!{key}"}.get(str(op), f"{key} {op} ({values})"))
    return ",".join(parts) or "{}"


def describe_labels(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return "{}"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def describe_set(peer_set: PeerSet | None, set_id: str = "?") -> str:
    """What a peer set selects, in the policy's own terms."""
    if peer_set is None:
        return f"set {set_id} (missing from the committed model)"
    d = peer_set.definition
    if peer_set.kind == "net":
        excepts = list(d.get("except") or ())
        return f"ipBlock {d.get('cidr')}" + (f" except {', '.join(excepts)}" if excepts else "")
    if peer_set.kind == "ports":
        return f"named port {d.get('name')}/{d.get('protocol')}"
    pods = describe_selector(d.get("podSelector"))
    if d.get("namespaceSelector") is None:
        return f"podSelector {pods} in namespace {d.get('namespace')}"
    text = f"namespaceSelector {describe_selector(d.get('namespaceSelector'))}"
    return text if pods == "{}" else f"{text} with podSelector {pods}"


def describe_port(port: CompiledPort, sets: Mapping[str, PeerSet]) -> str:
    if port.named_set is not None:
        named = sets.get(port.named_set)
        name = named.definition.get("name") if named is not None else port.named_set
        return f"{port.protocol} port named {name}"
    if port.port is None:
        return f"any {port.protocol} port"
    if port.end_port is not None and port.end_port != port.port:
        return f"{port.protocol} {port.port}-{port.end_port}"
    return f"{port.protocol} {port.port}"


# --- matching (the renderer's semantics) ----------------------------------------------------


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _pods_member(peer_set: PeerSet, ip: str) -> bool:
    wanted = _norm(ip)
    for member in peer_set.members:
        try:
            if _norm(member) == wanted:
                return True
        except ValueError:
            continue  # the renderer skips malformed members too
    return False


def _net_member(peer_set: PeerSet, ip: str) -> bool:
    try:
        return NetSet(peer_set.members).contains(ip)
    except ValueError:
        return False


def _ports_member(peer_set: PeerSet, dst_ip: str, protocol: str, port: int) -> bool:
    wanted = f"{_norm(dst_ip)},{protocol.lower()}:{port}"
    for member in peer_set.members:
        ip_text, _, proto_port = member.rpartition(",")
        try:
            if f"{_norm(ip_text)},{proto_port.lower()}" == wanted:
                return True
        except ValueError:
            continue
    return False


def named_ports_of(peer_set: PeerSet, dst_ip: str) -> list[int]:
    """The port numbers a named-port set gives ``dst_ip`` (what that pod declares under the name)."""
    out = []
    for member in peer_set.members:
        ip_text, _, proto_port = member.rpartition(",")
        try:
            if _norm(ip_text) == _norm(dst_ip):
                out.append(int(proto_port.partition(":")[2]))
        except ValueError:
            continue
    return sorted(out)


@dataclass(frozen=True, slots=True)
class _PartResult:
    ok: bool
    text: str  # what matched, or why nothing did
    sets: tuple[str, ...] = ()


@dataclass
class _Tracer:
    model: NodeModel
    conn: Connection
    direction: Direction
    features: Features

    # -- peers ------------------------------------------------------------------------------
    def peer_part(self, rule: CompiledRule) -> _PartResult:
        if rule.peers is None:
            return _PartResult(True, "any peer")
        if not rule.peers:
            return _PartResult(False, "the rule lists no peer (matches nothing)")
        peer = self.conn.peer(self.direction)
        reasons: list[str] = []
        for sid in dict.fromkeys(rule.peers):
            peer_set = self.model.sets.get(sid)
            if peer_set is None or peer_set.kind not in ("pods", "net"):
                reasons.append(f"set {sid} is missing from the committed model (its rules match nothing)")
                continue
            member = _pods_member(peer_set, peer.ip) if peer_set.kind == "pods" else _net_member(peer_set, peer.ip)
            if member:
                return _PartResult(True, describe_set(peer_set, sid), (sid,))
            reasons.append(self.peer_miss(peer_set, peer))
        return _PartResult(False, "; ".join(dict.fromkeys(reasons)), tuple(dict.fromkeys(rule.peers)))

    def peer_miss(self, peer_set: PeerSet, peer: Party) -> str:
        """Why ``peer`` is not in ``peer_set`` (a pods or net set), in the policy's terms."""
        d = peer_set.definition
        if peer_set.kind == "net":
            return _net_miss(peer.ip, str(d.get("cidr")), [str(e) for e in d.get("except") or ()])
        desc = describe_set(peer_set, peer_set.id)
        if not peer.is_pod:
            return f"{peer.ip} is not a pod's address ({desc} selects pods)"
        if peer.host_network:
            return f"{peer.key} uses the host network: no policy peer set holds its address"
        pod_selector = describe_selector(d.get("podSelector"))
        if d.get("namespaceSelector") is None:
            if peer.namespace != d.get("namespace"):
                return (f"namespace {peer.namespace} is not {d.get('namespace')} (a podSelector without "
                        "namespaceSelector selects pods of the policy's namespace only)")
        elif peer.namespace_labels is None:
            return f"namespace {peer.namespace} is unknown, so it matches no namespaceSelector"
        elif not _selector_matches(d.get("namespaceSelector"), peer.namespace_labels):
            return (f"namespace {peer.namespace} does not match namespaceSelector "
                    f"{describe_selector(d.get('namespaceSelector'))}")
        if not _selector_matches(d.get("podSelector"), peer.labels):
            return f"pod {peer.key} labels {describe_labels(peer.labels)} do not match podSelector {pod_selector}"
        return (f"{peer.key} matches {desc} but its address {peer.ip} is not in the committed set "
                f"{peer_set.id} (the controller has not committed it yet)")

    # -- ports ------------------------------------------------------------------------------
    def port_part(self, rule: CompiledRule) -> _PartResult:
        if rule.ports is None:
            return _PartResult(True, "any port")
        conn = self.conn
        same = [p for p in rule.ports if p.protocol == conn.protocol]
        for port in same:
            ok, sets = self._port_ok(port)
            if ok:
                return _PartResult(True, describe_port(port, self.model.sets), sets)
        named_sets = tuple(p.named_set for p in same if p.named_set is not None)
        if not rule.ports:
            return _PartResult(False, "the rule lists no port (matches nothing)")
        if not same:
            listed = ", ".join(dict.fromkeys(describe_port(p, self.model.sets) for p in rule.ports))
            return _PartResult(False, f"protocol {conn.protocol} is not in [{listed}]")
        return _PartResult(False, self._port_miss(same), named_sets)

    def _port_ok(self, port: CompiledPort) -> tuple[bool, tuple[str, ...]]:
        conn = self.conn
        if port.named_set is not None:
            named = self.model.sets.get(port.named_set)
            if named is None or named.kind != "ports":
                return False, ()
            return _ports_member(named, conn.dst.ip, conn.protocol, conn.port), (port.named_set,)
        if port.port is None:
            return True, ()
        if port.protocol == "SCTP" and not self.features.sctp_port_match:
            return False, ()
        hi = port.port if port.end_port is None else port.end_port
        if not 1 <= port.port <= hi <= 65535:
            return False, ()  # the renderer ignores invalid ranges
        return port.port <= conn.port <= hi, ()

    def _port_miss(self, same: list[CompiledPort]) -> str:
        conn = self.conn
        listed: list[str] = []
        details: list[str] = []
        for port in same:
            if port.named_set is not None:
                named = self.model.sets.get(port.named_set)
                if named is None or named.kind != "ports":
                    listed.append(f"named {port.named_set}")
                    details.append(f"named-port set {port.named_set} is missing from the committed model")
                    continue
                name = str(named.definition.get("name"))
                listed.append(name)
                declared = named_ports_of(named, conn.dst.ip)
                what = ", ".join(map(str, declared)) if declared else "no such port"
                details.append(f"{conn.dst.describe()} declares {name}/{conn.protocol} as {what}")
            elif port.protocol == "SCTP" and port.port is not None and not self.features.sctp_port_match:
                listed.append(_numbers(port))
                details.append(f"node {self.model.node} cannot match SCTP ports ({SCTP_PORT_MATCH}): "
                               "those rules match nothing there")
            else:
                listed.append(_numbers(port))
        text = f"port {conn.port} is not in [{', '.join(dict.fromkeys(listed))}]"
        return text + "".join(f" ({d})" for d in dict.fromkeys(details))

    # -- cluster policy tiers (dataplane/render_tiers.py) -----------------------------------
    def _cluster_rule(self, rule: CompiledClusterRule) -> tuple[_PartResult, _PartResult]:
        match = rule.match
        if rule.action == "Deny":  # fail closed as the renderer does: never narrower than written
            if match.ports is not None and not self.features.sctp_port_match:
                match = CompiledRule(match.peers, tuple(
                    CompiledPort("SCTP") if p.protocol == "SCTP" and p.port is not None and p.named_set is None
                    else p for p in match.ports))
            if match.peers and not any(self.model.sets.get(sid) for sid in match.peers):
                match = CompiledRule(None, match.ports)
        return self.peer_part(match), self.port_part(match)

    def tier(self, names: tuple[str, ...], tier: str) -> tuple[ClusterDecision | None, list[str]]:
        """The first Accept/Deny rule of the tier's policies that matches (a Pass ends the tier)."""
        notes: list[str] = []
        for name in names:
            policy = self.model.cluster_policies.get(name)
            if policy is None:
                notes.append(f"cluster policy {name} is referenced but missing from the committed model (denies)")
                return ClusterDecision(name, tier, -1, "Deny", "any", "any"), notes
            for index, rule in enumerate(policy.rules(self.direction)):
                peer, port = self._cluster_rule(rule)
                if not (peer.ok and port.ok):
                    continue
                if rule.action == "Pass":
                    notes.append(f"passed to the next tier by cluster policy {name} ({tier} tier) "
                                 f"{self.direction} rule {index}")
                    return None, notes
                return ClusterDecision(name, tier, index, rule.action, peer.text, port.text, rule.name,
                                       (*peer.sets, *port.sets)), notes
        return None, notes

    # -- the direction --------------------------------------------------------------------
    def run(self, endpoint: Endpoint | None) -> DirectionTrace:
        node, direction = self.model.node, self.direction
        if endpoint is None:
            return DirectionTrace(direction, node, None, (), True)
        keys = endpoint.ingress if direction == "ingress" else endpoint.egress
        admin, baseline = endpoint.tiers(direction)
        if not keys and not admin and not baseline:
            return DirectionTrace(direction, node, endpoint.key, (), True)
        tiers = (*admin, *(() if keys else baseline))
        decision, tier_notes = self.tier(admin, "Admin")
        if decision is None and not keys:
            decision, more = self.tier(baseline, "Baseline")
            tier_notes += more
        if decision is not None or not keys:
            allowed = decision is None or decision.action == "Accept"
            return DirectionTrace(direction, node, endpoint.key, keys, allowed, notes=tuple(tier_notes),
                                  tiers=tiers, cluster=decision)
        trace = self._network_policies(endpoint, keys)
        if not tiers and not tier_notes:
            return trace
        return dataclasses.replace(trace, tiers=tiers, notes=(*tier_notes, *trace.notes))

    def _network_policies(self, endpoint: Endpoint, keys: tuple[str, ...]) -> DirectionTrace:
        node, direction = self.model.node, self.direction
        misses: list[Miss] = []
        notes: list[str] = []
        for key in keys:
            policy = self.model.policies.get(key)
            if policy is None:
                notes.append(f"policy {key} is referenced but missing from the committed model (it allows nothing)")
                misses.append(Miss(key, None, "missing from the committed model (allows nothing)", 3))
                continue
            rules = (policy.ingress if direction == "ingress" else policy.egress) or ()
            if not rules:
                misses.append(Miss(key, None, f"it has no {direction} rules (denies all {direction})", 3))
                continue
            for index, rule in enumerate(rules):
                peer, port = self.peer_part(rule), self.port_part(rule)
                if peer.ok and port.ok:
                    match = RuleMatch(key, index, peer.text, port.text, (*peer.sets, *port.sets))
                    return DirectionTrace(direction, node, endpoint.key, keys, True, match, notes=tuple(notes))
                failed = [part for part in (peer, port) if not part.ok]
                text = " and ".join(part.text for part in failed)
                sets = tuple(dict.fromkeys((*peer.sets, *port.sets)))
                misses.append(Miss(key, index, text, len(failed), sets))
        nearest = min(misses, key=lambda m: m.failed) if misses else None
        return DirectionTrace(direction, node, endpoint.key, keys, False, None, nearest, tuple(notes))


def _numbers(port: CompiledPort) -> str:
    if port.port is None:
        return "any"
    if port.end_port is not None and port.end_port != port.port:
        return f"{port.port}-{port.end_port}"
    return str(port.port)


def _net_miss(ip: str, cidr: str, excepts: list[str]) -> str:
    try:
        addr = ipaddress.ip_address(ip)
        block = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return f"{ip} is not in ipBlock {cidr}"
    if addr.version != block.version or addr not in block:
        return f"{ip} is not in ipBlock {cidr}"
    for text in excepts:
        with contextlib.suppress(ValueError):
            excepted = ipaddress.ip_network(text, strict=False)
            if addr.version == excepted.version and addr in excepted:
                return f"{ip} is in except {text} of ipBlock {cidr}"
    return f"{ip} is in ipBlock {cidr} but not in its committed set"


def _selector_matches(canonical: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a canonical selector (``LabelSelector.canonical()`` form) matches ``labels``."""
    if canonical is None:
        return False
    for key, value in (canonical.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in canonical.get("matchExpressions") or ():
        key, op, values = expr.get("key"), expr.get("operator"), set(expr.get("values") or ())
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def endpoint_for(model: NodeModel, ip: str) -> Endpoint | None:
    """The endpoint record the node dispatches ``ip`` to (by address, as the kernel does)."""
    try:
        wanted = _norm(ip)
    except ValueError:
        return None
    for key in sorted(model.endpoints):
        endpoint = model.endpoints[key]
        for text in endpoint.ips:
            try:
                if _norm(text) == wanted:
                    return endpoint
            except ValueError:
                continue
    return None


def trace_direction(model: NodeModel, conn: Connection, direction: Direction,
                    features: Features | None = None) -> DirectionTrace:
    """Whether ``model``'s node lets ``conn`` through in ``direction``, and why."""
    local = conn.local(direction)
    trace = _Tracer(model, conn, direction, features or Features()).run(endpoint_for(model, local.ip))
    notes = list(trace.notes)
    if trace.endpoint is not None and local.key is not None and trace.endpoint != local.key:
        notes.append(f"{local.ip} belongs to endpoint {trace.endpoint} in the committed model, not {local.key}")
    if trace.endpoint is None and local.is_pod and local.host_network:
        notes.append(f"{local.key} uses the host network: NetworkPolicy does not isolate it")
    if notes != list(trace.notes):
        return dataclasses.replace(trace, notes=tuple(notes))
    return trace


def applicable_directions(conn: Connection) -> list[Direction]:
    """The directions some node enforces: egress when the source is a scheduled pod, ingress
    when the destination is one (an address outside the pods has no node that isolates it)."""
    out: list[Direction] = []
    if conn.src.is_pod and conn.src.node:
        out.append("egress")
    if conn.dst.is_pod and conn.dst.node:
        out.append("ingress")
    return out


def trace_connection(models: Mapping[str, NodeModel], conn: Connection,
                     features: Mapping[str, Features] | None = None) -> list[DirectionTrace]:
    """Every applicable direction of ``conn``, each on its node's model (egress first).

    A node missing from ``models`` is traced over an empty model (nothing isolated there).
    """
    out = []
    for direction in applicable_directions(conn):
        node = conn.local(direction).node
        assert node is not None
        model = models.get(node) or NodeModel(node, {}, {}, {})
        out.append(trace_direction(model, conn, direction, (features or {}).get(node, Features())))
    return out


def verdict(traces: list[DirectionTrace]) -> bool:
    """Allowed iff every applicable direction allows it."""
    return all(t.allowed for t in traces)
