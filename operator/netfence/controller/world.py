"""Feeds Kubernetes objects (Kopf event bodies or listings) into the model engine.

Keeps what the engine does not: per-object resource versions (so a stale event
never overwrites newer state), the highest resource version observed per kind
(published to etcd so clients can wait for the controller to catch up),
policy metadata for status objects, and parse errors of malformed policies.

Watch events and listings race (a listing is a snapshot at its resource
version ``L`` while events keep arriving), so merging a listing is made safe
by resource versions:

* ``floor[kind]`` is ``L`` of the newest merged listing. An event with a
  resource version ``<= floor`` is stale: the listing already showed a state at
  least that new (so a delayed event never resurrects an object the listing
  showed deleted).
* A deletion leaves a tombstone ``(kind, ns, name) -> delete rv``: a listed
  object older than its tombstone is not restored. Tombstones ``<= floor`` are
  pruned (no event or listing that old is accepted any more).
* An object the tracker holds but the listing lacks is removed only if its
  known version is ``<= L``: one created or updated after the snapshot stays.
* A listing not newer than ``floor`` is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from netfence.model.cluster_policy import cluster_policy_from_k8s
from netfence.model.compiler import ModelEngine
from netfence.model.world import (
    PolicyError,
    namespace_from_k8s,
    node_from_k8s,
    pod_from_k8s,
    policy_from_k8s,
)

log = logging.getLogger(__name__)

#: ClusterNetworkPolicy objects (policy.networking.k8s.io) are held like NetworkPolicies, with the
#: empty namespace: ``policies[("", name)]`` (no NetworkPolicy has an empty namespace).
CLUSTER_POLICIES = "clusternetworkpolicies"
KINDS = ("pods", "namespaces", "networkpolicies", "nodes", CLUSTER_POLICIES)

Ident = tuple[str, str, str]  # (kind, namespace, name)


@dataclass(frozen=True, slots=True)
class PolicyMeta:
    namespace: str
    name: str
    uid: str
    generation: int


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What merging one listing changed."""

    kind: str
    resource_version: int
    stale: bool = False  # not newer than the last merged listing of the kind: ignored
    applied: int = 0  # listed objects (re)applied because they were newer than what was known
    removed: tuple[tuple[str, str], ...] = ()  # (namespace, name) of objects gone since the tracker saw them

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.removed)


def _rv(body: Mapping[str, Any]) -> int:
    try:
        return int(body.get("metadata", {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class WorldTracker:
    def __init__(self, engine: ModelEngine):
        self.engine = engine
        self.versions: dict[Ident, int] = {}
        self.tombstones: dict[Ident, int] = {}
        self.floor: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.observed: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.policies: dict[tuple[str, str], PolicyMeta] = {}
        self.policy_errors: dict[tuple[str, str], str] = {}
        self.nodes: set[str] = set()
        self._invalid_cidrs: dict[str, tuple[str, ...]] = {}  # node -> pod CIDRs skipped (warned once)

    def apply(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Apply one watch event; False when it was stale (or a repeat) and ignored."""
        ns, name = _key(body)
        rv = _rv(body)
        self.observed[kind] = max(self.observed[kind], rv)
        if rv and rv <= self.floor[kind]:
            return False  # a merged listing already reflects a state at least this new
        ident = (kind, ns, name)
        known = self.versions.get(ident, 0)
        if event_type == "DELETED":
            if rv and (known > rv or self.tombstones.get(ident, 0) >= rv):
                return False
            if rv:
                self.tombstones[ident] = rv
            self.versions.pop(ident, None)
            self._remove(kind, ns, name)
            return True
        if rv and (known >= rv or self.tombstones.get(ident, 0) >= rv):
            return False
        self.versions[ident] = rv
        self.tombstones.pop(ident, None)
        self._set(kind, body)
        return True

    def merge_listing(self, kind: str, items: Iterable[Mapping[str, Any]], resource_version: int) -> MergeResult:
        """Merge a listing of ``kind`` taken at ``resource_version`` (see the module docstring)."""
        floor = self.floor[kind]
        if floor and resource_version <= floor:
            return MergeResult(kind, resource_version, stale=True)
        # Not raised to ``resource_version``: that moves with every write in the cluster, and
        # meta/observed is committed when it changes (a re-list must not cause a commit).
        seen: set[tuple[str, str]] = set()
        applied = 0
        for body in items:
            ns, name = _key(body)
            seen.add((ns, name))
            ident = (kind, ns, name)
            rv = _rv(body)
            self.observed[kind] = max(self.observed[kind], rv)
            if rv and (rv <= self.versions.get(ident, 0) or rv <= self.tombstones.get(ident, 0)):
                continue
            self.versions[ident] = rv
            self.tombstones.pop(ident, None)
            self._set(kind, body)
            applied += 1
        gone = [
            ident for ident, known in self.versions.items()
            if ident[0] == kind and (ident[1], ident[2]) not in seen and known <= resource_version
        ]
        for ident in gone:
            del self.versions[ident]
            self._remove(kind, ident[1], ident[2])
        self.floor[kind] = resource_version
        for ident in [i for i, rv in self.tombstones.items() if i[0] == kind and rv <= resource_version]:
            del self.tombstones[ident]
        return MergeResult(kind, resource_version, applied=applied, removed=tuple((i[1], i[2]) for i in gone))

    def replace_all(
        self,
        listing: Mapping[str, Iterable[Mapping[str, Any]]],
        resource_versions: Mapping[str, int] | None = None,
    ) -> list[MergeResult]:
        """Merge a listing of every kind. Without ``resource_versions`` a kind's listing counts
        as taken at the version of its newest object."""
        results = []
        for kind in KINDS:
            items = list(listing.get(kind, ()))
            if resource_versions is not None and kind in resource_versions:
                at = resource_versions[kind]
            else:
                at = max((_rv(body) for body in items), default=0)
            results.append(self.merge_listing(kind, items, at))
        return results

    def held(self, kind: str) -> dict[tuple[str, str], int]:
        """(namespace, name) -> known resource version of every object of ``kind`` held now."""
        return {(i[1], i[2]): rv for i, rv in self.versions.items() if i[0] == kind}

    # ------------------------------------------------------------------

    def _set(self, kind: str, body: Mapping[str, Any]) -> None:
        ns, name = _key(body)
        if kind == "pods":
            self.engine.set_pod(pod_from_k8s(body))
        elif kind == "namespaces":
            self.engine.set_namespace(namespace_from_k8s(body))
        elif kind == "nodes":
            self.nodes.add(name)
            node = node_from_k8s(body)
            if node.invalid and self._invalid_cidrs.get(name) != node.invalid:
                log.warning("Node %s: pod CIDR %s is no CIDR; skipped (nodes/%s lists the others)",
                            name, ", ".join(repr(c) for c in node.invalid), name)
            if node.invalid:
                self._invalid_cidrs[name] = node.invalid
            else:
                self._invalid_cidrs.pop(name, None)
            self.engine.set_node(node)
        elif kind == "networkpolicies":
            meta = body.get("metadata", {})
            self.policies[(ns, name)] = PolicyMeta(
                ns, name, str(meta.get("uid") or ""), int(meta.get("generation") or 0)
            )
            try:
                policy = policy_from_k8s(body)
            except PolicyError as exc:
                # Keep enforcing the last good version (if any); status says why.
                log.warning("NetworkPolicy %s/%s is invalid and not (re)compiled: %s", ns, name, exc)
                self.policy_errors[(ns, name)] = str(exc)
                return
            self.policy_errors.pop((ns, name), None)
            self.engine.set_policy(policy)
        elif kind == CLUSTER_POLICIES:
            meta = body.get("metadata", {})
            uid, generation = str(meta.get("uid") or ""), int(meta.get("generation") or 0)
            self.policies[("", name)] = PolicyMeta("", name, uid, generation)
            try:
                cluster_policy = cluster_policy_from_k8s(body)
            except PolicyError as exc:
                # Keep enforcing the last good version (if any: never more open than before); status says why.
                log.warning("ClusterNetworkPolicy %s cannot be enforced and is not (re)compiled: %s", name, exc)
                self.policy_errors[("", name)] = str(exc)
                return
            self.policy_errors.pop(("", name), None)
            self.engine.set_cluster_policy(cluster_policy)

    def _remove(self, kind: str, ns: str, name: str) -> None:
        if kind == "pods":
            self.engine.remove_pod(ns, name)
        elif kind == "namespaces":
            self.engine.remove_namespace(name)
        elif kind == "nodes":
            self.nodes.discard(name)
            self._invalid_cidrs.pop(name, None)
            self.engine.remove_node(name)
        elif kind == "networkpolicies":
            self.policies.pop((ns, name), None)
            self.policy_errors.pop((ns, name), None)
            self.engine.remove_policy(ns, name)
        elif kind == CLUSTER_POLICIES:
            self.policies.pop(("", name), None)
            self.policy_errors.pop(("", name), None)
            self.engine.remove_cluster_policy(name)
