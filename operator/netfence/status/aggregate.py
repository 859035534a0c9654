"""Pure status aggregation: node reports + the model -> ClusterPolicyStatus.status.

A node *must enforce* a policy when it hosts an endpoint the policy selects.
It is *synced* when its applied revision is at least the revision of the
policy's last relevant change (the policy itself, its peer sets, its
endpoints). Phase:

* ``Enforced``: every required node is synced (also when no node is required).
* ``Degraded``: some required node is not synced and either has no live report
  (its lease expired: the agent is gone) or reports an error.
* ``Pending``: some required node is alive and healthy but has not caught up yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MESSAGE_LIMIT = 512
NODE_LIST_LIMIT = 64


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    applied_revision: int
    last_error: str | None = None
    version: str = ""
    time: str = ""
    rules: int = 0
    sets: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any], node: str | None = None) -> NodeReport:
        """Decode a node report leniently: one odd report must not stop status for all.

        ``node`` (the name in the report's key) wins over the body's ``node``.
        Fields of the wrong type count as absent.
        """

        def number(name: str) -> int:
            value = data.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

        error = data.get("lastError")
        return cls(
            node=node or str(data.get("node") or ""),
            applied_revision=number("appliedRevision"),
            last_error=str(error) if error else None,
            version=str(data.get("version") or ""),
            time=str(data.get("time") or ""),
            rules=number("rules"),
            sets=number("sets"),
        )


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """What the model knows about one policy, for status purposes."""

    namespace: str
    name: str
    generation: int
    required_nodes: frozenset[str]
    endpoints: int
    revision: int  # commit revision of the policy's last relevant change
    warnings: tuple[str, ...] = ()


def _cap(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(nodes: Iterable[str]) -> str:
    ordered = sorted(nodes)
    shown = ", ".join(ordered[:8])
    return shown + (f" and {len(ordered) - 8} more" if len(ordered) > 8 else "")


def compute_status(facts: PolicyFacts, reports: Mapping[str, NodeReport]) -> dict[str, Any]:
    """The ``.status`` of a policy's ClusterPolicyStatus (without timestamps).

    Deterministic for equal inputs, so callers can compare it with what they
    wrote last and skip unchanged writes.
    """
    synced: list[str] = []
    missing: list[str] = []
    failing: dict[str, str] = {}
    lagging: list[str] = []
    failing_revisions: dict[str, int] = {}
    for node in sorted(facts.required_nodes):
        report = reports.get(node)
        if report is None:
            missing.append(node)
        elif report.applied_revision >= facts.revision:
            synced.append(node)
        elif report.last_error:
            failing[node] = report.last_error
            failing_revisions[node] = report.applied_revision
        else:
            lagging.append(node)
    # Per-node detail, nodes that are not synced first. Only values that stay put
    # while nothing relevant to this policy changes: a synced node's applied
    # revision moves with every commit anywhere in the cluster and would turn
    # every commit into a status write for every policy.
    nodes: list[dict[str, Any]] = []
    nodes += [{"name": n, "synced": False, "message": "no agent report (agent down?)"} for n in missing]
    nodes += [
        {"name": n, "synced": False, "appliedRevision": failing_revisions[n], "message": _cap(failing[n], 256)}
        for n in sorted(failing)
    ]
    nodes += [{"name": n, "synced": False, "message": "applying"} for n in lagging]
    nodes += [{"name": n, "synced": True} for n in synced]

    required = len(facts.required_nodes)
    if len(synced) == required:
        phase, reason, message = "Enforced", "AllNodesSynced", f"enforced on {required}/{required} nodes"
    elif missing or failing:
        phase = "Degraded"
        parts = []
        if missing:
            parts.append(f"no agent report from {_names(missing)}")
        if failing:
            parts.append(
                "apply failed on "
                + "; ".join(f"{n}: {failing[n]}" for n in sorted(failing)[:4])
                + (f" and {len(failing) - 4} more" if len(failing) > 4 else "")
            )
        if lagging:
            parts.append(f"waiting for {_names(lagging)}")
        reason = "NodeReportMissing" if missing else "ApplyFailed"
        message = "; ".join(parts)
    else:
        phase, reason = "Pending", "WaitingForNodes"
        message = f"waiting for {_names(lagging)} to apply revision {facts.revision}"

    conditions = [
        {
            "type": "Ready",
            "status": "True" if phase == "Enforced" else "False",
            "reason": reason,
            "message": _cap(message),
            "observedGeneration": facts.generation,
        },
        {
            "type": "Degraded",
            "status": "True" if phase == "Degraded" else "False",
            "reason": reason if phase == "Degraded" else "AsExpected",
            "message": _cap(message) if phase == "Degraded" else "",
            "observedGeneration": facts.generation,
        },
    ]
    if facts.warnings:
        conditions.append(
            {
                "type": "Warning",
                "status": "True",
                "reason": "SuspiciousPolicy",
                "message": _cap("; ".join(facts.warnings)),
                "observedGeneration": facts.generation,
            }
        )
    return {
        "phase": phase,
        "requiredNodes": required,
        "syncedNodes": len(synced),
        "synced": f"{len(synced)}/{required}",
        "endpoints": facts.endpoints,
        "revision": facts.revision,
        "observedGeneration": facts.generation,
        "nodes": nodes[:NODE_LIST_LIMIT],
        "conditions": conditions,
        "warnings": list(facts.warnings),
    }


def with_transition_times(
    new: dict[str, Any], old: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """Set ``lastTransitionTime`` on conditions: kept from ``old`` unless the status flipped."""
    previous = {c.get("type"): c for c in (old or {}).get("conditions", [])}
    out = dict(new)
    conditions = []
    for cond in new["conditions"]:
        before = previous.get(cond["type"])
        stamp = before.get("lastTransitionTime") if before and before.get("status") == cond["status"] else None
        conditions.append({**cond, "lastTransitionTime": stamp or now})
    out["conditions"] = conditions
    return out


def strip_times(status: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``status`` without condition timestamps, for change detection."""
    if status is None:
        return None
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])
    ]
    return out
