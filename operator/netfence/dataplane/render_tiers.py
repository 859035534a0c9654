"""ClusterNetworkPolicy tiers in an endpoint chain (pure; called by dataplane/render.py).

An endpoint that a ClusterNetworkPolicy selects gets an endpoint chain laid
out in the API's evaluation order (docs/design.md, "ClusterNetworkPolicy
tiers")::

    nf-tw-<h(endpoint)>:
      -j MARK --set-xmark 0x0/0x30000                  clear the accept and pass bits
      -m conntrack --ctstate INVALID ... -j DROP
      -m mark --mark 0x0/0x20000 -j nf-ci-<h(cnp)>     Admin tier, by priority then name,
      -m mark --mark 0x10000/0x10000 -j RETURN         skipped once a rule passed
      ...
      -j nf-pi-<h(policy)> ; RETURN if accepted ...    NetworkPolicy, as without tiers,
      ... -j DROP                                      when a NetworkPolicy isolates the pod
    or (no NetworkPolicy isolates the pod in this direction):
      -j MARK --set-xmark 0x0/0x20000                  a Pass of the Admin tier ends there
      -m mark --mark 0x0/0x20000 -j nf-ci-<h(cnp)>     Baseline tier
      -m mark --mark 0x10000/0x10000 -j RETURN
      (end of chain: allowed, the API's default)

    nf-ci-<h(cnp)> / nf-co-<h(cnp)>: the policy's rules in order, one line per
    (peer set, port group), each ending in its action:
      Accept: -g NETFENCE-CNP-ACCEPT   (sets the accept bit, returns to the endpoint chain)
      Deny:   -m comment --comment "netfence cnp <name> <direction> rule <i> denied" -j DROP
      Pass:   -g NETFENCE-CNP-PASS     (sets the pass bit, returns to the endpoint chain)

``-g`` to the one-rule mark chains means the first matching rule of a cluster
policy decides (a later rule of the same policy is never reached), like the
API's rule order. Chains are named by the policy's identity, so a rule change
rewrites only its own chain.

Fail static, then closed: a cluster policy an endpoint names but the model
lacks (a bad key) keeps the chain the kernel already holds for it (pinned by
the agent, dataplane/pins.py: exactly what was enforced before); without one
it drops that direction's traffic from there on. A Deny rule whose peer sets
are all missing denies any peer; on a node whose kernel cannot match SCTP
ports, a Deny rule's SCTP ports become "any SCTP port" (an Accept rule's match
nothing, as for NetworkPolicy). Nothing is ever allowed that the policy as
written would deny.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from netfence.dataplane.names import DIRECTIONS, Direction, _digest
from netfence.dataplane.names import endpoint_chain as endpoint_chain_name
from netfence.dataplane.ruleset import ACCEPT_MARK
from netfence.model.enforcement import CompiledClusterPolicy, CompiledClusterRule, CompiledPort, CompiledRule, Endpoint

if TYPE_CHECKING:
    from netfence.dataplane.render import _FamilyRenderer

log = logging.getLogger(__name__)

#: Packet mark bit meaning "a Pass rule of the current tier matched" (next to ACCEPT_MARK).
PASS_MARK = 0x20000
TIER_MARKS = ACCEPT_MARK | PASS_MARK
CNP_ACCEPT_CHAIN = "NETFENCE-CNP-ACCEPT"
CNP_PASS_CHAIN = "NETFENCE-CNP-PASS"
CLUSTER_CHAIN_PREFIXES: tuple[str, ...] = ("nf-ci-", "nf-co-")

_MARK_ACCEPT = f"-j MARK --set-xmark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x}"
_MARK_PASS = f"-j MARK --set-xmark {PASS_MARK:#x}/{PASS_MARK:#x}"
CLEAR_TIER_MARKS = f"-j MARK --set-xmark 0x0/{TIER_MARKS:#x}"
CLEAR_PASS = f"-j MARK --set-xmark 0x0/{PASS_MARK:#x}"
IF_NOT_PASSED = f"-m mark --mark 0x0/{PASS_MARK:#x}"
RETURN_IF_ACCEPTED = f"-m mark --mark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x} -j RETURN"
#: The fixed chains the rule targets go to, and their one rule.
FIXED_CHAINS: dict[str, tuple[str, ...]] = {CNP_ACCEPT_CHAIN: (_MARK_ACCEPT,), CNP_PASS_CHAIN: (_MARK_PASS,)}
_COMMENT_SAFE = re.compile(r"[^ A-Za-z0-9._/:-]")


def _comment(text: str) -> str:  # the spelling of render._comment (iptables-save prints it back so)
    return '-m comment --comment "' + _COMMENT_SAFE.sub("_", text)[:240] + '"'


def cluster_chain(direction: Direction, name: str) -> str:
    """`nf-ci-<h>` / `nf-co-<h>`, h from the cluster policy's name (identity, not content)."""
    prefix = "nf-ci-" if direction == "ingress" else "nf-co-"
    return prefix + _digest("cluster|" + name)


def _deny_ports(ports: tuple[CompiledPort, ...] | None, sctp_port_match: bool) -> tuple[CompiledPort, ...] | None:
    """A Deny rule's ports on this node: SCTP ports the kernel cannot match become any SCTP port."""
    if ports is None or sctp_port_match:
        return ports
    return tuple(
        CompiledPort(protocol="SCTP") if p.protocol == "SCTP" and p.port is not None and p.named_set is None else p
        for p in ports
    )


def _rule_lines(r: _FamilyRenderer, direction: Direction, policy: str, index: int, rule: CompiledClusterRule
                ) -> list[str]:
    match = rule.match
    if rule.action == "Deny":
        match = CompiledRule(peers=match.peers, ports=_deny_ports(match.ports, r.features.sctp_port_match))
    base = r._rule_lines(direction, match)
    if rule.action == "Deny" and not base and match.peers and (match.ports is None or match.ports):
        log.warning("cluster policy %s %s rule %d names no known set: it denies any peer", policy, direction, index)
        base = r._rule_lines(direction, CompiledRule(peers=None, ports=match.ports))
    if rule.action == "Accept":
        target = f"-g {CNP_ACCEPT_CHAIN}"
    elif rule.action == "Pass":
        target = f"-g {CNP_PASS_CHAIN}"
    else:
        target = _comment(f"netfence cnp {policy} {direction} rule {index} denied") + " -j DROP"
    out = []
    for line in base:
        head = line[: -len(_MARK_ACCEPT)].rstrip() if line.endswith(_MARK_ACCEPT) else line
        out.append(f"{head} {target}".strip())
        if rule.action != "Deny":
            r.chains[target[3:]] = FIXED_CHAINS[target[3:]]
    return out


def policy_lines(r: _FamilyRenderer, direction: Direction, policy: CompiledClusterPolicy) -> tuple[str, ...]:
    """The rules of a cluster policy's chain in ``direction`` (empty: it never matches there)."""
    lines: dict[str, None] = {}
    for index, rule in enumerate(policy.rules(direction)):
        lines.update(dict.fromkeys(_rule_lines(r, direction, policy.name, index, rule)))
    return tuple(lines)


def _policy_chain(r: _FamilyRenderer, direction: Direction, policy: CompiledClusterPolicy) -> str | None:
    name = cluster_chain(direction, policy.name)
    if name not in r.chains:
        r.chains[name] = policy_lines(r, direction, policy)
    return name if r.chains[name] else None


def _pinned_chain(r: _FamilyRenderer, direction: Direction, name: str) -> str | None:
    """The kernel's chain of cluster policy ``name`` (no good value: dataplane/pins.py), if pinned.

    It is carried over verbatim; the fixed chains its rules go to are rendered from
    ``FIXED_CHAINS`` like every chain pinned rules jump to (render.py ``_add_jump_targets``).
    """
    chain = cluster_chain(direction, name)
    pinned = r.pinned_chains.get(chain)
    if pinned is None:
        return None
    r.chains[chain] = pinned
    return chain


def render_target(r: _FamilyRenderer, target: str) -> None:
    """Render chain ``target`` (``nf-ci-``/``nf-co-``) if it is the chain of a cluster policy of
    the model: pinned rules (a pinned endpoint's chain) jump to it."""
    for policy in r.model.cluster_policies.values():
        for direction in DIRECTIONS:
            if cluster_chain(direction, policy.name) == target:
                _policy_chain(r, direction, policy)
                return


def _tier_lines(r: _FamilyRenderer, ep: Endpoint, direction: Direction, names: tuple[str, ...], what: str
                ) -> tuple[list[str], bool]:
    """(lines, final): the jumps of one tier; final when a missing policy ended it with a DROP.

    A policy missing from the model (a bad key) whose chain the kernel holds
    (pinned) keeps that chain; without one it denies from there on (fail closed).
    """
    lines: list[str] = []
    for name in names:
        policy = r.model.cluster_policies.get(name)
        if policy is None:
            chain = _pinned_chain(r, direction, name)
            if chain is None:
                log.warning("endpoint %s refers to unknown cluster policy %s (its traffic is denied)", ep.key, name)
                lines.append(f"{_comment(f'{what} cluster policy {name} unknown')} -j DROP")
                return lines, True
            lines += [f"{IF_NOT_PASSED} -j {chain}", RETURN_IF_ACCEPTED]
            continue
        chain = _policy_chain(r, direction, policy)
        if chain is not None:
            lines += [f"{IF_NOT_PASSED} -j {chain}", RETURN_IF_ACCEPTED]
    return lines, False


def endpoint_chain(r: _FamilyRenderer, ep: Endpoint, direction: Direction) -> str | None:
    """Render ``ep``'s endpoint chain in ``direction`` with its tiers; None when nothing applies."""
    keys = ep.ingress if direction == "ingress" else ep.egress
    admin, baseline = ep.tiers(direction)
    if not keys and not admin and not baseline:
        return None
    what = f"netfence {direction} {'to' if direction == 'ingress' else 'from'} {ep.key}"
    lines = [CLEAR_TIER_MARKS]
    if r.features.drop_invalid:
        lines.append(f"-m conntrack --ctstate INVALID {_comment(what + ' invalid')} -j DROP")
    tier, final = _tier_lines(r, ep, direction, admin, what)
    lines += tier
    if not final and keys:
        for chain in r.policy_jumps(ep, direction, keys):
            lines += [f"-j {chain}", RETURN_IF_ACCEPTED]
        lines.append(f"{_comment(what + ' denied')} -j DROP")
    elif not final and baseline:
        if admin:
            lines.append(CLEAR_PASS)
        tier, _ = _tier_lines(r, ep, direction, baseline, what)
        lines += tier
    name = endpoint_chain_name(direction, ep.key)
    r.chains[name] = tuple(lines)
    return name
