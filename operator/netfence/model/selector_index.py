"""Inverted indexes from label keys to the selectors that reference them.

A selector's answer depends only on the label keys it references, so when a
label set changes, only selectors referencing a changed key need a look.
Pod selectors are indexed per scope: ``(namespace, key)`` for sets bound to
one namespace and for policies' ``spec.podSelector``; ``(None, key)`` for sets
that use a namespace selector (their scope is the namespaces it matches).
Namespace selectors are indexed by key alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from netfence.model.peersets import PodsSetSpec
from netfence.model.policy import Policy

PolicyKey = tuple[str, str]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Hashable)


def index_add(index: dict[K, set[V]], key: K, value: V) -> None:
    index.setdefault(key, set()).add(value)


def index_discard(index: dict[K, set[V]], key: K, value: V) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(value)
        if not bucket:
            del index[key]


def changed_keys(old: Mapping[str, str], new: Mapping[str, str]) -> set[str]:
    """Label keys whose value differs (including added and removed keys)."""
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


class SelectorIndex:
    def __init__(self) -> None:
        self._set_pod_keys: dict[tuple[str | None, str], set[str]] = {}
        self._policy_keys: dict[tuple[str, str], set[PolicyKey]] = {}
        self._set_ns_keys: dict[str, set[str]] = {}
        self._sets_by_ns: dict[str, set[str]] = {}
        self._policies_by_ns: dict[str, set[PolicyKey]] = {}
        self.ns_selector_sets: set[str] = set()

    def add_set(self, sid: str, spec: PodsSetSpec) -> None:
        for label in sorted(spec.pod_selector.keys()):
            index_add(self._set_pod_keys, (spec.namespace, label), sid)
        if spec.namespace is not None:
            index_add(self._sets_by_ns, spec.namespace, sid)
        elif spec.namespace_selector is not None:
            self.ns_selector_sets.add(sid)
            for label in sorted(spec.namespace_selector.keys()):
                index_add(self._set_ns_keys, label, sid)

    def remove_set(self, sid: str, spec: PodsSetSpec) -> None:
        for label in sorted(spec.pod_selector.keys()):
            index_discard(self._set_pod_keys, (spec.namespace, label), sid)
        if spec.namespace is not None:
            index_discard(self._sets_by_ns, spec.namespace, sid)
        elif spec.namespace_selector is not None:
            self.ns_selector_sets.discard(sid)
            for label in sorted(spec.namespace_selector.keys()):
                index_discard(self._set_ns_keys, label, sid)

    def add_policy(self, policy: Policy) -> None:
        index_add(self._policies_by_ns, policy.namespace, policy.key)
        for label in sorted(policy.pod_selector.keys()):
            index_add(self._policy_keys, (policy.namespace, label), policy.key)

    def remove_policy(self, policy: Policy) -> None:
        index_discard(self._policies_by_ns, policy.namespace, policy.key)
        for label in sorted(policy.pod_selector.keys()):
            index_discard(self._policy_keys, (policy.namespace, label), policy.key)

    def sets_bound_to(self, namespace: str) -> set[str]:
        """Pods sets whose scope is exactly this namespace (podSelector-only peers)."""
        return set(self._sets_by_ns.get(namespace, ()))

    def policies_in(self, namespace: str) -> set[PolicyKey]:
        return set(self._policies_by_ns.get(namespace, ()))

    def for_pod_labels(self, namespace: str, labels: Iterable[str]) -> tuple[set[str], set[PolicyKey]]:
        """Sets and policies whose pod selector references any of these keys, for a pod in ``namespace``.

        Namespace-selector sets are returned regardless of whether they cover
        ``namespace``; the caller checks that (cheaply, without evaluating).
        """
        sids: set[str] = set()
        pks: set[PolicyKey] = set()
        for label in labels:
            sids |= self._set_pod_keys.get((namespace, label), set())
            sids |= self._set_pod_keys.get((None, label), set())
            pks |= self._policy_keys.get((namespace, label), set())
        return sids, pks

    def for_namespace_labels(self, labels: Iterable[str]) -> set[str]:
        """Namespace-selector sets referencing any of these namespace label keys."""
        sids: set[str] = set()
        for label in labels:
            sids |= self._set_ns_keys.get(label, set())
        return sids
