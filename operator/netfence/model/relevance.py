"""Which committed keys matter to one node (pure; the one definition both sides use).

A node's rules depend on its own endpoints, the policies those endpoints list
(in any direction or tier), the peer sets those policies reference, its own
pod CIDRs (``nodes/<node>``, read with ``--pod-cidrs=auto``) and the layout
schema (``meta/schema``). A commit is *relevant to node N* iff it
changed a key of that kind — judged with N's references both before and after
the commit (a policy N stops using still changes N's rules; one it starts
using too). Everything else (other nodes' endpoints, policies and sets no
endpoint of N refers to, controller bookkeeping such as ``meta/observed``)
leaves N's rules as they were.

* The agent (``agent/loop.py``) neither applies nor rewrites its report for a
  commit that is not relevant to its node (:func:`commit_relevant`).
* Status aggregation (``controller/status_writer.py``) needs, per policy P and
  required node N, the revision of the last change to P's keys that is
  relevant to N (:func:`node_revisions`): a node that a commit does not touch stays
  synced without reporting. That revision is always a commit relevant to N
  (the max over keys N uses), so an agent following this rule reaches it; an
  agent that reports every commit (older agents) reaches it too.

Key families are data (:data:`FAMILIES`): a new kind of key (a new policy
kind) is a new row naming what it is (``endpoint``, ``node``, ``policy``, ``set``,
``layout``, ``bookkeeping``) and how its name is read. ``endpoint`` and ``node``
keys are per node: they matter to the node they name only. A committed key of an
unknown family is relevant to every node (applying too often is safe;
skipping a change is not).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from netfence.model.enforcement import CompiledClusterPolicy, CompiledPolicy, Endpoint, ModelDecodeError

Kind = Literal["endpoint", "node", "policy", "clusterpolicy", "set", "layout", "bookkeeping"]
#: Kinds whose name is a node name: such a key matters to that node only.
PER_NODE: frozenset[Kind] = frozenset({"endpoint", "node"})


def _rest(rest: str) -> str | None:
    return rest or None


def _first(rest: str) -> str | None:
    head = rest.partition("/")[0]
    return head or None


def _endpoint_node(rest: str) -> str | None:
    node, sep, _ = rest.partition("/")
    return node if node and sep else None


def _node(rest: str) -> str | None:
    return rest if rest and "/" not in rest else None


@dataclass(frozen=True, slots=True)
class Family:
    """Keys starting with ``prefix`` (or equal to it when ``exact``): what they are and their name."""

    prefix: str
    kind: Kind
    name: Callable[[str], str | None] = _rest  # the name within the kind, from the rest of the key
    exact: bool = False


#: Committed key families, most specific first. ``endpoint`` and ``node`` names are node names.
FAMILIES: tuple[Family, ...] = (
    Family("endpoints/", "endpoint", _endpoint_node),
    Family("nodes/", "node", _node),  # nodes/<node>: that node's pod CIDRs
    Family("policies/", "policy"),
    Family("cpolicies/", "clusterpolicy"),  # ClusterNetworkPolicies, by name
    Family("sets/", "set"),
    Family("sets2/", "set", _first),  # layout schema 2: ``sets2/<id>[/<chunk>]``
    Family("meta/schema", "layout", exact=True),
    Family("meta/", "bookkeeping"),  # meta/observed and the like: no agent applies them
)


def classify(key: str) -> tuple[Kind, str | None] | None:
    """``(kind, name)`` of a committed key; None for a key of no known family."""
    for family in FAMILIES:
        if family.exact:
            if key == family.prefix:
                return family.kind, None
        elif key.startswith(family.prefix):
            return family.kind, family.name(key[len(family.prefix):])
    return None


@dataclass(frozen=True, slots=True)
class NodeUses:
    """What a node's rules refer to: names per kind (``policy``: ``ns/name``; ``set``: set ids)."""

    node: str
    names: Mapping[Kind, frozenset[str]] = field(default_factory=dict)

    def uses(self, kind: Kind, name: str | None) -> bool:
        return name is not None and name in self.names.get(kind, frozenset())


def key_relevant(key: str, uses: NodeUses) -> bool:
    """Whether a change of ``key`` can change the rules of ``uses.node`` (given what it uses)."""
    found = classify(key)
    if found is None:
        return True  # unknown family: conservative
    kind, name = found
    if kind in PER_NODE:
        return name == uses.node
    if kind == "layout":
        return True
    if kind == "bookkeeping":
        return False
    return uses.uses(kind, name)


def commit_relevant(keys: Iterable[str], before: NodeUses, after: NodeUses) -> bool:
    """Whether a commit changing ``keys`` is relevant to the node: some key matters to it with
    its references before the commit or after it."""
    return any(key_relevant(key, before) or key_relevant(key, after) for key in keys)


class _Endpoint(Protocol):
    @property
    def ingress(self) -> tuple[str, ...]: ...

    @property
    def egress(self) -> tuple[str, ...]: ...


class _Policy(Protocol):
    @property
    def set_ids(self) -> frozenset[str]: ...


#: Endpoint fields naming policies, per kind (a new policy kind adds its fields here).
ENDPOINT_REFERENCES: tuple[tuple[Kind, tuple[str, ...]], ...] = (
    ("policy", ("ingress", "egress")),
    ("clusterpolicy", ("admin_ingress", "admin_egress", "baseline_ingress", "baseline_egress")),
)


#: Where each policy kind is stored and how a value decodes (for :func:`needed_revisions`).
POLICY_KINDS: dict[Kind, tuple[str, Callable[[object], _Policy]]] = {
    "policy": ("policies/", CompiledPolicy.from_json),
    "clusterpolicy": ("cpolicies/", CompiledClusterPolicy.from_json),
}


def node_uses(
    node: str,
    endpoints: Iterable[_Endpoint],
    policies: Mapping[Kind, Mapping[str, _Policy]],
) -> NodeUses:
    """What ``node``'s endpoints refer to: policies of every kind they list, and the sets of
    those policies (``policies``: the decoded policies per kind, by name)."""
    names: dict[Kind, set[str]] = {"set": set()}
    for endpoint in endpoints:
        for kind, fields in ENDPOINT_REFERENCES:
            for attr in fields:
                names.setdefault(kind, set()).update(getattr(endpoint, attr, ()))
    for kind, _fields in ENDPOINT_REFERENCES:
        known = policies.get(kind, {})
        for name in names.get(kind, ()):
            policy = known.get(name)
            if policy is not None:
                names["set"].update(policy.set_ids)
    return NodeUses(node, {kind: frozenset(values) for kind, values in names.items()})


def node_revisions(keys: Iterable[str], revision_of: Callable[[str], int],
                   nodes: Iterable[str]) -> dict[str, int]:
    """Per node of ``nodes``, the newest revision among one policy's relevant ``keys`` (its
    own key, its sets' keys, its endpoints' keys on every node) that matter to that node when
    it uses the policy: every key but other nodes' endpoints (:func:`key_relevant` with the
    policy and its sets as the node's uses; a ``nodes/<n>`` key, should one be given, counts for
    node n only). O(keys + nodes)."""
    base = 0
    by_node: dict[str, int] = {}
    for key in keys:
        found = classify(key)
        if found is not None and found[0] == "bookkeeping":
            continue
        revision = revision_of(key)
        if found is not None and found[0] in PER_NODE:
            node = found[1] or ""
            by_node[node] = max(by_node.get(node, 0), revision)
        else:
            base = max(base, revision)
    return {node: max(base, by_node.get(node, 0)) for node in nodes}


def needed_revisions(values: Mapping[str, bytes], mod_revisions: Mapping[str, int],
                     nodes: Iterable[str]) -> dict[str, int]:
    """Per node, the newest revision among the committed keys that matter to it *now* (its
    endpoints, its ``nodes/`` key, the policies they use, those policies' sets, the layout,
    keys of unknown families): a node whose applied revision reaches it enforces the committed state
    (``netfence status``'s lag). From one committed snapshot, so a key deleted since (a pod
    gone) is not seen: a node that has not applied a deletion may show no lag. Values that
    do not decode count as referencing nothing."""
    endpoint_keys: dict[str, list[str]] = {}
    own: dict[str, int] = {}  # node -> revision of its nodes/ key
    named: dict[tuple[Kind, str], int] = {}  # (kind, name) -> newest revision of its keys
    everyone = 0  # layout and unknown families: every node
    for key in values:
        found = classify(key)
        revision = mod_revisions.get(key, 0)
        if found is None or found[0] == "layout":
            everyone = max(everyone, revision)
        elif found[0] == "endpoint":
            endpoint_keys.setdefault(found[1] or "", []).append(key)
        elif found[0] == "node":
            own[found[1] or ""] = max(own.get(found[1] or "", 0), revision)
        elif found[0] != "bookkeeping" and found[1] is not None:
            named[(found[0], found[1])] = max(named.get((found[0], found[1]), 0), revision)
    decoded: dict[str, _Policy | None] = {}

    def policy(key: str, decode: Callable[[object], _Policy]) -> _Policy | None:
        if key not in decoded:
            raw = values.get(key)
            try:
                decoded[key] = None if raw is None else decode(json.loads(raw))
            except (ValueError, ModelDecodeError, TypeError, KeyError):
                decoded[key] = None
        return decoded[key]

    out: dict[str, int] = {}
    for node in nodes:
        needed = max(everyone, own.get(node, 0))
        endpoints = []
        for key in endpoint_keys.get(node, ()):
            needed = max(needed, mod_revisions.get(key, 0))
            try:
                endpoints.append(Endpoint.from_json(json.loads(values[key])))
            except (ValueError, ModelDecodeError, TypeError, KeyError):
                continue
        known: dict[Kind, dict[str, _Policy]] = {}
        for kind, fields in ENDPOINT_REFERENCES:
            prefix, decode = POLICY_KINDS[kind]
            mine = known.setdefault(kind, {})
            for ep in endpoints:
                for attr in fields:
                    for name in getattr(ep, attr, ()):
                        if (p := policy(prefix + name, decode)) is not None:
                            mine[name] = p
        uses = node_uses(node, endpoints, known)
        for kind, names in uses.names.items():
            for name in names:
                needed = max(needed, named.get((kind, name), 0))
        out[node] = needed
    return out
