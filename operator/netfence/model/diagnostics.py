"""Human-readable warnings about a policy in the current world.

These never change what is enforced; they point at likely mistakes:

* parse-time notes (e.g. rules ignored because ``policyTypes`` excludes them);
* ``spec.podSelector`` or a peer selector that currently matches no pod;
* a rule that duplicates an earlier rule of the same direction;
* a named port that no pod in scope declares (ingress: the selected pods;
  egress: the rule's pod peers, or every pod when the rule has any peer
  or an ipBlock peer);
* an ipBlock covering pod addresses (it is still enforced exactly as written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from netfence.model.enforcement import CompiledPolicy, CompiledRule
from netfence.model.peersets import NetSetSpec, net_matcher, peer_spec, set_id
from netfence.model.policy import Policy, Rule
from netfence.model.world import Pod


def _first_covered(spec: NetSetSpec, pods: Iterable[Pod]) -> str | None:
    covers = net_matcher(spec)
    for pod in pods:
        for ip in pod.ips:
            if covers(ip):
                return f"{pod.namespace}/{pod.name} {ip}"
    return None


@dataclass(frozen=True)
class _World:
    policy: Policy
    selected: Sequence[Pod]
    set_members: Callable[[str], Sequence[Pod]]
    all_endpoints: Callable[[], Iterable[Pod]]


def _rule_warnings(world: _World, path: str, rule: Rule, peers_field: str) -> list[str]:
    policy, selected, set_members, all_endpoints = (
        world.policy,
        world.selected,
        world.set_members,
        world.all_endpoints,
    )
    out: list[str] = []
    scope: list[Pod] | None = None if rule.peers is None else []
    for j, peer in enumerate(rule.peers or ()):
        spec = peer_spec(policy.namespace, peer)
        ppath = f"{path}.{peers_field}[{j}]"
        if isinstance(spec, NetSetSpec):
            covered = _first_covered(spec, all_endpoints())
            if covered is not None:
                out.append(
                    f"{ppath}.ipBlock {spec.cidr} covers pod addresses (e.g. {covered}); "
                    "it is enforced as written, by address"
                )
            scope = None
            continue
        members = set_members(set_id(spec))
        if not members:
            out.append(f"{ppath}: selects no pods")
        if scope is not None:
            scope.extend(members)
    is_ingress = path.startswith("spec.ingress")
    for k, port in enumerate(rule.ports or ()):
        if not isinstance(port.port, str):
            continue
        named = (port.port, port.protocol)
        if is_ingress:
            candidates: Iterable[Pod] = selected
            who = "selected pod"
        else:
            candidates = all_endpoints() if scope is None else scope
            who = "pod" if scope is None else "peer pod"
        if not any(named in pod.named_ports() for pod in candidates):
            out.append(f"{path}.ports[{k}]: named port {port.port}/{port.protocol} is not declared by any {who}")
    return out


def policy_warnings(
    policy: Policy,
    compiled: CompiledPolicy,
    selected: Sequence[Pod],
    set_members: Callable[[str], Sequence[Pod]],
    all_endpoints: Callable[[], Iterable[Pod]],
) -> tuple[str, ...]:
    """Warnings for one policy.

    ``selected``: the endpoint pods it selects; ``set_members(id)``: the pods
    in a ``pods`` set; ``all_endpoints()``: every endpoint pod in the cluster.
    """
    world = _World(policy, selected, set_members, all_endpoints)
    out = list(policy.notes)
    if not selected:
        out.append("spec.podSelector selects no pods")
    directions = (
        ("ingress", "from", policy.ingress, compiled.ingress),
        ("egress", "to", policy.egress, compiled.egress),
    )
    for direction, peers_field, rules, compiled_rules in directions:
        if rules is None or compiled_rules is None:
            continue
        seen: dict[CompiledRule, int] = {}
        for i, (rule, crule) in enumerate(zip(rules, compiled_rules, strict=True)):
            path = f"spec.{direction}[{i}]"
            if crule in seen:
                out.append(f"{path} duplicates spec.{direction}[{seen[crule]}]")
            else:
                seen[crule] = i
            out.extend(_rule_warnings(world, path, rule, peers_field))
    return tuple(out)
