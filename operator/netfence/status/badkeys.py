"""Which policies a bad key reported by an agent affects (pure).

An agent lists in its report (``badKeys``, see docs/design.md) the keys it
could not decode or that were written outside a controller commit. A key
relative to the store prefix maps to policies as follows:

* ``policies/<ns>/<name>`` -> that policy;
* ``cpolicies/<name>`` -> that ClusterNetworkPolicy (``("", name)``, as everywhere);
* ``sets/<id>``, ``sets2/<id>`` and ``sets2/<id>/<n>`` -> the policies (cluster
  policies included) whose compiled rules reference set ``<id>``;
* ``endpoints/<node>/<ns>/<pod>`` -> the policies that select that endpoint (cluster
  policies included);
* anything else (``meta/...``, malformed keys) -> no policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from netfence.status.aggregate import BadKeyHit, NodeReport

PolicyKey = tuple[str, str]


class PolicyLookup(Protocol):
    """The model's answers the mapping needs (implemented by ``ModelEngine``)."""

    def set_policies(self, set_id: str) -> Iterable[PolicyKey]:
        """Policies whose compiled rules reference set ``set_id``."""
        ...

    def endpoint_policies(self, namespace: str, name: str) -> Iterable[PolicyKey]:
        """Policies that select the endpoint pod ``namespace/name``."""
        ...


def set_id_of(key: str) -> str | None:
    """The set id of a ``sets/<id>`` or ``sets2/<id>[/<n>]`` key, else None."""
    family, _, rest = key.partition("/")
    if family == "sets" and rest and "/" not in rest:
        return rest
    if family == "sets2" and rest:
        sid, slash, chunk = rest.partition("/")
        if sid and (not slash or (chunk.isdigit() and chunk.isascii())):
            return sid
    return None


def affected_policies(key: str, lookup: PolicyLookup) -> frozenset[PolicyKey]:
    """The policies a bad ``key`` (relative to the store prefix) affects."""
    family, _, rest = key.partition("/")
    if family == "policies":
        ns, slash, name = rest.partition("/")
        return frozenset({(ns, name)}) if ns and slash and name and "/" not in name else frozenset()
    if family == "cpolicies":
        return frozenset({("", rest)}) if rest and "/" not in rest else frozenset()
    if family == "endpoints":
        parts = rest.split("/")
        if len(parts) == 3 and all(parts):
            return frozenset(lookup.endpoint_policies(parts[1], parts[2]))
        return frozenset()
    sid = set_id_of(key)
    return frozenset(lookup.set_policies(sid)) if sid is not None else frozenset()


def bad_key_hits(reports: Mapping[str, NodeReport], lookup: PolicyLookup) -> dict[PolicyKey, list[BadKeyHit]]:
    """Every bad key of every report, grouped by the policies it affects (node order, then key order)."""
    out: dict[PolicyKey, list[BadKeyHit]] = {}
    for node in sorted(reports):
        for bad in reports[node].bad_keys:
            hit = BadKeyHit(node, bad.key, bad.reason)
            for policy in sorted(affected_policies(bad.key, lookup)):
                out.setdefault(policy, []).append(hit)
    return out
