"""Pure status aggregation: node reports + the model -> ClusterPolicyStatus.status.

A node *must enforce* a policy when it hosts an endpoint the policy selects.
It is *synced* when its applied revision is at least the revision of the
policy's last change relevant to that node (the policy itself, its peer sets,
its endpoints on that node: ``PolicyFacts.needed``, ``model/relevance.py``). Phase:

* ``Enforced``: every required node is synced (also when no node is required).
* ``Degraded``: some required node has no live report (its lease expired: the
  agent is gone), reports an error while not synced, or reports a *bad key*
  that affects the policy (a value it could not decode or that was written
  outside a controller commit; see :mod:`netfence.status.badkeys`).
* ``Pending``: some required node is alive and healthy but has not caught up yet.

A required node that reports rules of the policy as *unenforceable* (the
kernel cannot express them; they are rendered to match nothing) adds a
``Warning`` condition naming the node and the feature. So does a
NetworkPolicy whose status object a ClusterNetworkPolicy's takes (the same
name, ``cnp.<name>``: ``PolicyFacts.hides``).

Generations follow the Kubernetes conventions that kstatus, Flux and Argo CD
read: ``status.observedGeneration`` (and every condition's
``observedGeneration``) is the ClusterPolicyStatus object's own
``metadata.generation``; the NetworkPolicy generation the status reflects is
``status.policyGeneration``. The Ready condition's message is a short headline
(``kubectl get policystatus -o wide`` shows it); the Degraded condition carries
the full detail.

Every value fits the CRD's limits (``crds/clusterpolicystatus.yaml``): lists
are capped and the number left out is given (``nodesOmitted``,
``warningsOmitted``), strings are cut to their ``maxLength``, integers are
clamped to their format's range.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

MESSAGE_LIMIT = 512  # condition messages (the CRD allows 32768; kept short for kubectl)
READY_MESSAGE_LIMIT = 120  # the Ready condition's message: a headline for `kubectl get -o wide`
NODE_MESSAGE_LIMIT = 256  # per-node messages (CRD: 1024)
NODE_LIST_LIMIT = 64  # entries of .status.nodes (CRD: maxItems 256)
NODE_NAME_LIMIT = 253  # CRD: nodes[].name maxLength
WARNING_LIMIT = 64  # entries of .status.warnings (CRD: maxItems 64)
WARNING_LENGTH = 1024  # CRD: warnings[] maxLength
REPORT_ENTRY_LIMIT = 256  # entries decoded from one report field (the agent writes at most 32)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class BadKey:
    """A key the agent could not use: undecodable, or written outside a controller commit."""

    key: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Unenforceable:
    """Rules of ``policy`` (``<ns>/<name>``) the node's kernel cannot express (rendered as deny)."""

    policy: str
    feature: str


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    applied_revision: int
    last_error: str | None = None
    version: str = ""
    time: str = ""
    rules: int = 0
    sets: int = 0
    bad_keys: tuple[BadKey, ...] = ()
    bad_keys_total: int = 0  # >= len(bad_keys): the agent lists at most 32
    unenforceable: tuple[Unenforceable, ...] = ()
    unenforceable_total: int = 0  # >= len(unenforceable)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], node: str | None = None) -> NodeReport:
        """Decode a node report leniently: one odd report must not stop status for all.

        ``node`` (the name in the report's key) wins over the body's ``node``.
        Fields of the wrong type count as absent; malformed list entries are
        skipped but still counted in the ``*_total`` fields.
        """

        def number(name: str) -> int:
            value = data.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

        error = data.get("lastError")
        bad_raw, bad_keys = _entries(data.get("badKeys"), _bad_key)
        unenf_raw, unenforceable = _entries(data.get("unenforceable"), _unenforceable)
        return cls(
            node=node or str(data.get("node") or ""),
            applied_revision=number("appliedRevision"),
            last_error=str(error) if error else None,
            version=str(data.get("version") or ""),
            time=str(data.get("time") or ""),
            rules=number("rules"),
            sets=number("sets"),
            bad_keys=bad_keys,
            bad_keys_total=max(number("badKeysTotal"), bad_raw),
            unenforceable=unenforceable,
            unenforceable_total=max(number("unenforceableTotal"), unenf_raw),
        )


def _entries(value: Any, decode: Callable[[Any], _T | None]) -> tuple[int, tuple[_T, ...]]:
    """(entries present, decoded entries) of a report list field; non-lists count as absent."""
    if not isinstance(value, list):
        return 0, ()
    decoded = [item for raw in value[:REPORT_ENTRY_LIMIT] if (item := decode(raw)) is not None]
    return len(value), tuple(decoded)


def _bad_key(raw: Any) -> BadKey | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("key"), str) or not raw["key"]:
        return None
    reason = raw.get("reason")
    return BadKey(raw["key"], reason if isinstance(reason, str) else "")


def _unenforceable(raw: Any) -> Unenforceable | None:
    if not isinstance(raw, Mapping):
        return None
    policy, feature = raw.get("policy"), raw.get("feature")
    if not isinstance(policy, str) or not policy or not isinstance(feature, str):
        return None
    return Unenforceable(policy, feature or "unknown")


@dataclass(frozen=True, slots=True)
class BadKeyHit:
    """A bad key reported by ``node`` that affects the policy (see :mod:`netfence.status.badkeys`)."""

    node: str
    key: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """What the model knows about one policy, for status purposes."""

    namespace: str
    name: str
    generation: int  # metadata.generation of the NetworkPolicy (-> status.policyGeneration)
    required_nodes: frozenset[str]
    endpoints: int
    revision: int  # commit revision of the policy's last relevant change
    warnings: tuple[str, ...] = ()
    bad_keys: tuple[BadKeyHit, ...] = ()  # on any node; only required nodes count
    #: metadata.generation of the ClusterPolicyStatus object the status is written to
    #: (-> status.observedGeneration and the conditions' observedGeneration).
    object_generation: int = 0
    #: Per required node, the revision of the policy's last change relevant to *that* node
    #: (model/relevance.py: not other nodes' endpoints), <= ``revision``. A node absent here
    #: needs ``revision``. Agents skip commits that do not touch their node (issue 11).
    node_revisions: Mapping[str, int] = field(default_factory=dict)
    #: A ClusterNetworkPolicy's only: the NetworkPolicy (``<ns>/<name>``) that wants the same status
    #: object and has none while this policy exists (reported as a ``Warning``).
    hides: str = ""

    def needed(self, node: str) -> int:
        """The revision ``node`` must have applied to be synced for this policy."""
        return self.node_revisions.get(node, self.revision)


def _cap(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(value: int, limit: int) -> int:
    return min(max(value, 0), limit)


def _names(nodes: Iterable[str]) -> str:
    ordered = sorted(nodes)
    shown = ", ".join(ordered[:8])
    return shown + (f" and {len(ordered) - 8} more" if len(ordered) > 8 else "")


def _listed(items: list[str], shown: int) -> str:
    return "; ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _bad_key_text(hit: BadKeyHit) -> str:
    return f"{hit.node}: {hit.key}" + (f" ({hit.reason})" if hit.reason else "")


def _unlisted_bad_keys(report: NodeReport) -> str:
    return (
        f"{report.node} reports {report.bad_keys_total} bad keys but lists only {len(report.bad_keys)}; "
        "this policy may be affected"
    )


def unenforceable_warnings(
    policy: str, required_nodes: Iterable[str], reports: Mapping[str, NodeReport]
) -> list[str]:
    """Warnings for rules of ``policy`` (``<ns>/<name>``) that required nodes cannot express."""
    out: list[str] = []
    for node in sorted(required_nodes):
        report = reports.get(node)
        if report is None:
            continue
        features = sorted({u.feature for u in report.unenforceable if u.policy == policy})
        # A cluster policy's (``/<name>``) Deny rules fall back to denying more, its other rules match nothing.
        effect = ("its Accept and Pass rules there match nothing, its Deny rules deny any such port"
                  if policy.startswith("/") else "those rules match nothing there (deny)")
        out += [f"node {node} cannot enforce {feature}: {effect}" for feature in features]
        if report.unenforceable_total > len(report.unenforceable) and not features:
            out.append(
                f"node {node} reports {report.unenforceable_total} unenforceable rules but lists only "
                f"{len(report.unenforceable)}; rules of this policy may match nothing there"
            )
    return out


def compute_status(facts: PolicyFacts, reports: Mapping[str, NodeReport]) -> dict[str, Any]:
    """The ``.status`` of a policy's ClusterPolicyStatus (without timestamps).

    Deterministic for equal inputs, so callers can compare it with what they
    wrote last and skip unchanged writes. Always within the CRD's limits.
    """
    synced: list[str] = []
    missing: list[str] = []
    failing: dict[str, str] = {}
    lagging: list[str] = []
    failing_revisions: dict[str, int] = {}
    bad: dict[str, list[str]] = {}  # node -> bad-key texts affecting this policy
    hits_by_node: dict[str, list[BadKeyHit]] = {}
    for hit in facts.bad_keys:
        if hit.node in facts.required_nodes:
            hits_by_node.setdefault(hit.node, []).append(hit)
    for node in sorted(facts.required_nodes):
        report = reports.get(node)
        if report is None:
            missing.append(node)
            continue
        texts = [_bad_key_text(h) for h in sorted(hits_by_node.get(node, ()), key=lambda h: h.key)]
        if report.bad_keys_total > len(report.bad_keys) and not texts:
            texts.append(_unlisted_bad_keys(report))
        if texts:
            bad[node] = texts
        if report.applied_revision >= facts.needed(node):
            synced.append(node)
        elif report.last_error:
            failing[node] = report.last_error
            failing_revisions[node] = report.applied_revision
        else:
            lagging.append(node)
    nodes = _node_entries(missing, failing, failing_revisions, lagging, synced, bad)

    required = len(facts.required_nodes)
    bad_texts = [text for node in sorted(bad) for text in bad[node]]
    if missing or failing or bad:
        phase = "Degraded"
        parts = []
        if missing:
            parts.append(f"no agent report from {_names(missing)}")
        if failing:
            parts.append("apply failed on " + _listed([f"{n}: {failing[n]}" for n in sorted(failing)], 4))
        if bad:
            parts.append("bad keys on " + _listed(bad_texts, 4))
        if lagging:
            parts.append(f"waiting for {_names(lagging)}")
        reason = "NodeReportMissing" if missing else "ApplyFailed" if failing else "BadKey"
        message = "; ".join(parts)
    elif len(synced) == required:
        phase, reason, message = "Enforced", "AllNodesSynced", f"enforced on {required}/{required} nodes"
    else:
        phase, reason = "Pending", "WaitingForNodes"
        message = f"waiting for {_names(lagging)} to apply revision {max(facts.needed(n) for n in lagging)}"

    generation = _int(facts.object_generation, INT64_MAX)
    conditions = [
        {
            "type": "Ready",
            "status": "True" if phase == "Enforced" else "False",
            "reason": reason,
            "message": ready_message(message, degraded=phase == "Degraded"),
            "observedGeneration": generation,
        },
        {
            "type": "Degraded",
            "status": "True" if phase == "Degraded" else "False",
            "reason": reason if phase == "Degraded" else "AsExpected",
            "message": _cap(message) if phase == "Degraded" else "",
            "observedGeneration": generation,
        },
    ]
    unenforceable = unenforceable_warnings(f"{facts.namespace}/{facts.name}", facts.required_nodes, reports)
    clash = [name_clash_warning(facts.hides)] if facts.hides else []
    warnings = [*unenforceable, *clash, *facts.warnings]
    shown_warnings = [_cap(w, WARNING_LENGTH) for w in warnings[:WARNING_LIMIT]]
    if warnings:
        omitted = len(warnings) - len(shown_warnings)
        conditions.append(
            {
                "type": "Warning",
                "status": "True",
                "reason": "Unenforceable" if unenforceable else "SuspiciousPolicy" if facts.warnings
                else "StatusNameClash",
                "message": _cap(
                    (f"{len(warnings)} warnings: " if omitted else "")
                    + _cap("; ".join(warnings), MESSAGE_LIMIT - 40 if omitted else MESSAGE_LIMIT)
                ),
                "observedGeneration": generation,
            }
        )
    shown_nodes = nodes[:NODE_LIST_LIMIT]
    status: dict[str, Any] = {
        "phase": phase,
        "requiredNodes": _int(required, INT32_MAX),
        "syncedNodes": _int(len(synced), INT32_MAX),
        "synced": f"{_int(len(synced), INT32_MAX)}/{_int(required, INT32_MAX)}",
        "endpoints": _int(facts.endpoints, INT32_MAX),
        "revision": _int(facts.revision, INT64_MAX),
        "observedGeneration": generation,
        "policyGeneration": _int(facts.generation, INT64_MAX),
        "nodes": shown_nodes,
        "conditions": conditions,
        "warnings": shown_warnings,
    }
    if required > len(shown_nodes):
        status["nodesOmitted"] = _int(required - len(shown_nodes), INT32_MAX)
    if len(warnings) > len(shown_warnings):
        status["warningsOmitted"] = _int(len(warnings) - len(shown_warnings), INT32_MAX)
    return status


def name_clash_warning(hidden: str) -> str:
    """The warning of a ClusterNetworkPolicy whose status object NetworkPolicy ``hidden`` also wants."""
    return (
        f"NetworkPolicy {hidden} has the same status object name as this ClusterNetworkPolicy and gets "
        "no status of its own while this policy exists: rename that NetworkPolicy"
    )


def ready_message(message: str, *, degraded: bool) -> str:
    """The Ready condition's message: ``message`` cut to a headline of READY_MESSAGE_LIMIT
    characters; when cut and the policy is Degraded, it points at the Degraded condition."""
    if len(message) <= READY_MESSAGE_LIMIT:
        return message
    tail = " ... (see Degraded)" if degraded else "..."
    return message[: READY_MESSAGE_LIMIT - len(tail)].rstrip(" ;,") + tail


def _node_entries(
    missing: list[str],
    failing: Mapping[str, str],
    failing_revisions: Mapping[str, int],
    lagging: list[str],
    synced: list[str],
    bad: Mapping[str, list[str]],
) -> list[dict[str, Any]]:
    """Per-node detail, nodes with problems first. Only values that stay put while nothing
    relevant to this policy changes: a synced node's applied revision moves with every
    commit anywhere in the cluster and would turn every commit into a status write for
    every policy. Names longer than the CRD allows (no real node has one) are left out."""

    def with_bad(node: str, entry: dict[str, Any]) -> dict[str, Any]:
        if node in bad:
            note = "bad keys: " + _listed([t.removeprefix(f"{node}: ") for t in bad[node]], 2)
            entry["message"] = f"{entry['message']}; {note}" if "message" in entry else note
        if "message" in entry:
            entry["message"] = _cap(entry["message"], NODE_MESSAGE_LIMIT)
        return entry

    ranked: list[tuple[int, dict[str, Any]]] = []
    ranked += [(0, {"name": n, "synced": False, "message": "no agent report (agent down?)"}) for n in missing]
    ranked += [
        (1, {"name": n, "synced": False, "appliedRevision": _int(failing_revisions[n], INT64_MAX),
             "message": failing[n]})
        for n in sorted(failing)
    ]
    ranked += [(3, {"name": n, "synced": False, "message": "applying"}) for n in lagging]
    ranked += [(4, {"name": n, "synced": True}) for n in synced]
    # A node with bad keys but otherwise fine (lagging or synced) ranks after failing ones.
    ranked = [(2 if rank > 2 and entry["name"] in bad else rank, entry) for rank, entry in ranked]
    ranked.sort(key=lambda item: (item[0], item[1]["name"]))
    return [with_bad(entry["name"], entry) for _, entry in ranked if len(entry["name"]) <= NODE_NAME_LIMIT]


def reduced_status(status: Mapping[str, Any], error: str) -> dict[str, Any]:
    """A minimal ``status`` to write when the API server rejected ``status`` itself.

    Keeps the phase, the counters and the Ready/Degraded/Warning conditions (so a
    Degraded policy still says so), drops the detail lists, and adds a
    ``StatusWriteFailed`` condition carrying the API server's error.
    """
    keep = ("phase", "requiredNodes", "syncedNodes", "synced", "endpoints", "revision", "observedGeneration",
            "policyGeneration")
    out: dict[str, Any] = {k: status[k] for k in keep if k in status}
    generation = int(status.get("observedGeneration", 0))
    conditions = [c for c in status.get("conditions", []) if c.get("type") in ("Ready", "Degraded", "Warning")]
    conditions.append(
        {
            "type": "StatusWriteFailed",
            "status": "True",
            "reason": "Rejected",
            "message": _cap(f"the API server rejected the full status; details are left out: {error}"),
            "observedGeneration": generation,
        }
    )
    out["conditions"] = conditions
    return out


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
