"""Pure: an explanation as data (``netfence explain -o json``) and as text (the same content).

:func:`explanation` puts together the traced directions (:mod:`netfence.explain.trace`),
where each is enforced — the node, its applied revision against the revision of the
last committed change relevant to the verdict, the chains and sets the node's kernel
holds for it (names from ``dataplane/names.py``) — and the live counters read from
the node. :func:`format_text` prints it; its last line is ``verdict: allowed`` or
``verdict: denied``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netfence.dataplane.counters import Counters, RuleCounter
from netfence.dataplane.names import endpoint_chain, policy_chain, set_name
from netfence.dataplane.render_tiers import cluster_chain
from netfence.dataplane.ruleset import FROM_WL_CHAIN, TO_WL_CHAIN, Family
from netfence.explain.trace import Connection, DirectionTrace, Party, describe_set, verdict
from netfence.model.enforcement import NodeModel

SCHEMA = 1


@dataclass(frozen=True, slots=True)
class CounterRead:
    """What was read from one node: ``counters`` (None when they could not be read, ``error`` says why)."""

    source: str  # "netns <name>" or the agent's URL
    counters: Counters | None = None
    error: str | None = None


def family_of(conn: Connection) -> Family:
    return "v6" if ipaddress.ip_address(conn.dst.ip).version == 6 else "v4"


def dispatch_chain(trace: DirectionTrace) -> str:
    return FROM_WL_CHAIN if trace.direction == "egress" else TO_WL_CHAIN


def chains_of(trace: DirectionTrace) -> list[tuple[str, str, str | None]]:
    """``(chain, role, policy)`` of the chains the node's kernel holds for this verdict:
    the dispatch chain, the endpoint's chain and one chain per isolating policy (none when
    the endpoint is not isolated: it has no chain and no dispatch rule)."""
    if not trace.isolated or trace.endpoint is None:
        return []
    out: list[tuple[str, str, str | None]] = [
        (dispatch_chain(trace), "dispatch", None),
        (endpoint_chain(trace.direction, trace.endpoint), "endpoint", None),
    ]
    out += [(cluster_chain(trace.direction, name), "cluster policy", name) for name in trace.tiers]
    out += [(policy_chain(trace.direction, key), "policy", key) for key in trace.policies]
    return out


def relevant_keys(trace: DirectionTrace, model: NodeModel) -> list[str]:
    """Committed keys (relative, schema-1 names) whose change can change this direction's verdict."""
    keys: list[str] = []
    if trace.endpoint is not None:
        keys.append(f"endpoints/{trace.node}/{trace.endpoint}")
    for key in trace.policies:
        keys.append(f"policies/{key}")
        policy = model.policies.get(key)
        if policy is not None:
            keys += [f"sets/{sid}" for sid in sorted(policy.set_ids)]
    for name in trace.tiers:
        keys.append(f"cpolicies/{name}")
        cluster = model.cluster_policies.get(name)
        if cluster is not None:
            keys += [f"sets/{sid}" for sid in sorted(cluster.set_ids)]
    return keys


def change_revision(keys: list[str], mod_revisions: Mapping[str, int]) -> int | None:
    """The newest mod revision among ``keys`` (a set key also covers its schema-2 chunks)."""
    found: list[int] = []
    for key in keys:
        if key in mod_revisions:
            found.append(mod_revisions[key])
        if key.startswith("sets/"):
            chunked = "sets2/" + key.removeprefix("sets/")
            found += [rev for k, rev in mod_revisions.items() if k == chunked or k.startswith(chunked + "/")]
    return max(found) if found else None


def _party_json(party: Party) -> dict[str, Any]:
    if not party.is_pod:
        return {"kind": "address", "ip": party.ip}
    out: dict[str, Any] = {"kind": "pod", "namespace": party.namespace, "name": party.name, "ip": party.ip,
                           "node": party.node, "labels": dict(party.labels)}
    if party.host_network:
        out["hostNetwork"] = True
    return out


def _rules_json(rules: list[RuleCounter] | None) -> list[dict[str, Any]] | None:
    return None if rules is None else [r.to_json() for r in rules]


def _chain_summary(role: str, rules: list[RuleCounter], endpoint_name: str,
                   set_names: list[str]) -> dict[str, Any]:
    """Counter figures of one chain (what the text shows)."""
    if role == "dispatch":
        mine = [r for r in rules if f"-g {endpoint_name}" in r.rule]
        return {"packets": sum(r.packets for r in mine), "rules": mine}
    if role == "endpoint":
        dropped = [r for r in rules if r.rule.endswith("-j DROP") and "denied" in r.rule]
        invalid = [r for r in rules if r.rule.endswith("-j DROP") and "invalid" in r.rule]
        return {"dropped": sum(r.packets for r in dropped), "invalidDropped": sum(r.packets for r in invalid),
                "rules": rules}
    if role == "cluster policy":  # Deny rules drop here; Accept/Pass rules go to the mark chains
        denied = [r for r in rules if r.rule.endswith("-j DROP")]
        decided = [r for r in rules if not r.rule.endswith("-j DROP")]
        return {"dropped": sum(r.packets for r in denied), "marked": sum(r.packets for r in decided), "rules": rules}
    matched = [r for r in rules if any(f"--match-set {s} " in r.rule for s in set_names)] if set_names else []
    out: dict[str, Any] = {"marked": sum(r.packets for r in rules), "rules": rules}
    if matched:
        out["viaSets"] = sum(r.packets for r in matched)
    return out


def _direction_json(trace: DirectionTrace, conn: Connection, model: NodeModel, report: Mapping[str, Any] | None,
                    mod_revisions: Mapping[str, int], commit_revision: int, read: CounterRead | None,
                    family: Family) -> dict[str, Any]:
    local = conn.local(trace.direction)
    data: dict[str, Any] = {
        "direction": trace.direction,
        "pod": local.key,
        "node": trace.node,
        "endpoint": trace.endpoint,
        "isolated": trace.isolated,
        "policies": list(trace.policies),
        "verdict": "allowed" if trace.allowed else "denied",
        "reason": trace.reason,
        "allowedBy": None,
        "nearestMiss": None,
        "clusterPolicies": list(trace.tiers),
        "decidedBy": None,
        "notes": list(trace.notes),
    }
    if trace.cluster is not None:
        c = trace.cluster
        data["decidedBy"] = {"clusterPolicy": c.policy, "tier": c.tier, "rule": c.rule, "ruleName": c.rule_name,
                             "action": c.action, "peer": c.peer, "port": c.port,
                             "summary": c.describe(trace.direction)}
    if trace.match is not None:
        m = trace.match
        data["allowedBy"] = {"policy": m.policy, "rule": m.rule, "peer": m.peer, "port": m.port}
    if trace.nearest is not None:
        n = trace.nearest
        data["nearestMiss"] = {"policy": n.policy, "rule": n.rule, "text": n.text,
                               "summary": n.describe(trace.direction)}
    applied = _applied(report)
    change = change_revision(relevant_keys(trace, model), mod_revisions)
    need = change if change is not None else commit_revision
    enforcement: dict[str, Any] = {
        "node": trace.node,
        "agentReport": report is not None,
        "appliedRevision": applied,
        "commitRevision": commit_revision,
        "changeRevision": change,
        "inForce": applied is not None and applied >= need,
        "lastError": (report or {}).get("lastError") or None,
        "chains": [],
        "sets": [],
        "counters": None if read is None or not chains_of(trace) else {"source": read.source, "error": read.error},
    }
    endpoint_name = endpoint_chain(trace.direction, trace.endpoint) if trace.endpoint else ""
    set_names = [set_name(family, sid) for sid in trace.set_ids]
    for chain, role, policy in chains_of(trace):
        entry: dict[str, Any] = {"name": chain, "role": role}
        if policy is not None:
            entry["policy"] = policy
        rules = None if read is None or read.counters is None else read.counters.get(chain)
        if read is not None and read.counters is not None:
            entry["present"] = rules is not None
        if rules is not None:
            summary = _chain_summary(role, rules, endpoint_name, set_names)
            entry.update({k: v for k, v in summary.items() if k != "rules"})
            entry["rules"] = _rules_json(summary["rules"])
        enforcement["chains"].append(entry)
    for sid in trace.set_ids:
        peer_set = model.sets.get(sid)
        enforcement["sets"].append({
            "name": set_name(family, sid), "id": sid, "selects": describe_set(peer_set, sid),
            "members": None if peer_set is None else len(peer_set.members),
        })
    data["enforcement"] = enforcement
    return data


def _applied(report: Mapping[str, Any] | None) -> int | None:
    if report is None:
        return None
    value = report.get("appliedRevision")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def explanation(conn: Connection, traces: list[DirectionTrace], models: Mapping[str, NodeModel],
                reports: Mapping[str, Mapping[str, Any]], mod_revisions: Mapping[str, int], commit_revision: int,
                counters: Mapping[str, CounterRead] | None = None, notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole explanation as JSON-ready data (``-o json``); :func:`format_text` prints it."""
    family = family_of(conn)
    directions = []
    for trace in traces:
        model = models.get(trace.node) or NodeModel(trace.node, {}, {}, {})
        directions.append(_direction_json(trace, conn, model, reports.get(trace.node), mod_revisions,
                                          commit_revision, (counters or {}).get(trace.node), family))
    all_notes = list(notes)
    for direction, party in (("egress", conn.src), ("ingress", conn.dst)):
        if not any(t.direction == direction for t in traces):
            what = "leaves" if direction == "egress" else "enters"
            all_notes.append(f"{party.describe()} is not a pod of the cluster: no node checks the {direction} "
                             f"of what {what} it")
    return {
        "schema": SCHEMA,
        "source": _party_json(conn.src),
        "destination": _party_json(conn.dst),
        "port": conn.port,
        "protocol": conn.protocol,
        "commitRevision": commit_revision,
        "directions": directions,
        "notes": all_notes,
        "verdict": "allowed" if verdict(traces) else "denied",
    }


# --- text -------------------------------------------------------------------------------------


def _party_text(data: Mapping[str, Any]) -> str:
    if data["kind"] != "pod":
        return str(data["ip"])
    return f"{data['namespace']}/{data['name']} ({data['ip']}, {data.get('node') or 'no node'})"


def _enforcement_lines(e: Mapping[str, Any]) -> list[str]:
    node = e["node"]
    lines = []
    if not e["agentReport"]:
        lines.append(f"  enforced on {node}: no agent report (is the agent running?); "
                     f"committed revision {e['commitRevision']}")
    else:
        change = e["changeRevision"]
        against = (f"the last change to these rules is revision {change}" if change is not None
                   else f"the controller's last commit is revision {e['commitRevision']}")
        state = "in force" if e["inForce"] else "NOT yet in force there"
        lines.append(f"  enforced on {node}: applied revision {e['appliedRevision']}, {against}: {state}")
        if e.get("lastError"):
            lines.append(f"    last apply error on {node}: {str(e['lastError'])[:200]}")
    counters = e.get("counters")
    if counters and counters.get("error"):
        lines.append(f"    counters: unavailable ({counters['error']})")
    for chain in e["chains"]:
        lines.append("    " + _chain_text(chain))
    for s in e["sets"]:
        members = "? members" if s["members"] is None else f"{s['members']} member" + ("s" * (s["members"] != 1))
        lines.append(f"    set {s['name']}: {s['selects']} ({members})")
    if counters and not counters.get("error"):
        lines.append(f"    (counters read from {counters['source']})")
    return lines


def _chain_text(chain: Mapping[str, Any]) -> str:
    role, name = chain["role"], chain["name"]
    what = {"dispatch": "dispatch", "endpoint": "endpoint chain"}.get(role, f"{role} {chain.get('policy')}")
    if chain.get("present") is False:
        if role == "policy":
            return f"{name}  {what}: no chain in the kernel (the policy allows nothing here)"
        return f"{name}  {what}: missing from the kernel"
    if "dropped" in chain:
        extra = f", {chain['invalidDropped']} invalid" if chain.get("invalidDropped") else ""
        if "marked" in chain:
            extra += f", {_packets(chain['marked'])} accepted or passed"
        return f"{name}  {what}: {_packets(chain['dropped'])} dropped{extra}"
    if "marked" in chain:
        via = f" ({chain['viaSets']} via the sets below)" if "viaSets" in chain else ""
        return f"{name}  {what}: {_packets(chain['marked'])} allowed{via}"
    if "packets" in chain:
        return f"{name}  {what}: {_packets(chain['packets'])} dispatched to the endpoint chain"
    return f"{name}  {what}"


def _packets(count: int) -> str:
    return f"{count} packet" if count == 1 else f"{count} packets"


def format_text(data: Mapping[str, Any]) -> list[str]:
    """The explanation as lines of text; the last is ``verdict: allowed`` or ``verdict: denied``."""
    lines = [
        f"explain {_party_text(data['source'])} -> {_party_text(data['destination'])} "
        f"port {data['port']}/{data['protocol']}",
        f"committed model: revision {data['commitRevision']}",
    ]
    for d in data["directions"]:
        who = d["pod"] or "?"
        if d["isolated"]:
            by = [*(f"cluster policy {c}" for c in d.get("clusterPolicies", ())), *d["policies"]]
            head = f"{d['direction']} of {who} on {d['node']}: isolated by {', '.join(by)}"
        else:
            head = f"{d['direction']} of {who} on {d['node']}: not isolated (no policy selects it for {d['direction']})"
        lines.append("")
        lines.append(head)
        if d.get("decidedBy") is not None:
            lines.append(f"  {d['decidedBy']['summary']}")
        elif d["allowedBy"] is not None:
            a = d["allowedBy"]
            lines.append(f"  allowed by policy {a['policy']} {d['direction']} rule {a['rule']}: "
                         f"peer {a['peer']}, port {a['port']}")
        elif d["isolated"] and not d["policies"]:
            lines.append("  allowed: no cluster policy rule decided and no NetworkPolicy isolates it")
        elif d["isolated"]:
            lines.append("  denied: no rule of the isolating policies matches")
            if d["nearestMiss"] is not None:
                lines.append(f"  nearest miss: {d['nearestMiss']['summary']}")
        else:
            lines.append("  allowed")
        lines += [f"  note: {n}" for n in d["notes"]]
        lines += _enforcement_lines(d["enforcement"])
    if data["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in data["notes"]]
    lines.append(f"verdict: {data['verdict']}")
    return lines
