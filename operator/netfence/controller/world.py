"""Feeds Kubernetes objects (Kopf event bodies or listings) into the model engine.

Keeps what the engine does not: per-object resource versions (so a stale event
never overwrites newer state), the highest resource version observed per kind
(published to etcd so clients can wait for the controller to catch up),
policy metadata for status objects, and parse errors of malformed policies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from netfence.model.compiler import ModelEngine
from netfence.model.world import (
    PolicyError,
    namespace_from_k8s,
    pod_from_k8s,
    policy_from_k8s,
)

log = logging.getLogger(__name__)

KINDS = ("pods", "namespaces", "networkpolicies", "nodes")


@dataclass(frozen=True, slots=True)
class PolicyMeta:
    namespace: str
    name: str
    uid: str
    generation: int


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
        self.versions: dict[tuple[str, str, str], int] = {}
        self.observed: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.policies: dict[tuple[str, str], PolicyMeta] = {}
        self.policy_errors: dict[tuple[str, str], str] = {}
        self.nodes: set[str] = set()

    def apply(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Apply one watch event; False when it was stale and ignored."""
        ns, name = _key(body)
        rv = _rv(body)
        self.observed[kind] = max(self.observed[kind], rv)
        ident = (kind, ns, name)
        if event_type == "DELETED":
            if rv and self.versions.get(ident, 0) > rv:
                return False
            self.versions.pop(ident, None)
            self._remove(kind, ns, name)
            return True
        if rv and self.versions.get(ident, 0) > rv:
            return False
        self.versions[ident] = rv
        self._set(kind, body)
        return True

    def replace_all(self, listing: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Make the engine equal to a full listing: set everything, remove what is gone."""
        for kind in KINDS:
            seen: set[tuple[str, str]] = set()
            for body in listing.get(kind, ()):
                seen.add(_key(body))
                self.apply(kind, None, body)
            for ident in [i for i in self.versions if i[0] == kind and (i[1], i[2]) not in seen]:
                del self.versions[ident]
                self._remove(kind, ident[1], ident[2])

    # ------------------------------------------------------------------

    def _set(self, kind: str, body: Mapping[str, Any]) -> None:
        ns, name = _key(body)
        if kind == "pods":
            self.engine.set_pod(pod_from_k8s(body))
        elif kind == "namespaces":
            self.engine.set_namespace(namespace_from_k8s(body))
        elif kind == "nodes":
            self.nodes.add(name)
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

    def _remove(self, kind: str, ns: str, name: str) -> None:
        if kind == "pods":
            self.engine.remove_pod(ns, name)
        elif kind == "namespaces":
            self.engine.remove_namespace(name)
        elif kind == "nodes":
            self.nodes.discard(name)
        elif kind == "networkpolicies":
            self.policies.pop((ns, name), None)
            self.policy_errors.pop((ns, name), None)
            self.engine.remove_policy(ns, name)
