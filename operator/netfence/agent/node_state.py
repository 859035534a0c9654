"""Pure: the agent's view of the committed etcd model, reduced to one node."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from netfence.dataplane.pins import PinKey
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledPolicy,
    Endpoint,
    ModelDecodeError,
    NodeModel,
    NodeNetwork,
    PeerSet,
)
from netfence.model.peersets import node_key
from netfence.model.relevance import NodeUses, node_uses
from netfence.store.migration import META_SCHEMA, SCHEMAS, SchemaError, assemble_set, parse_set_key, stored_schema

log = logging.getLogger(__name__)

#: Key prefixes whose values :meth:`NodeState.uses` reads (own endpoints are under endpoints/).
USES_SOURCES = ("policies/", "cpolicies/", "endpoints/")


class NodeState:
    """Decoded policies, sets, this node's endpoints and its pod CIDRs (``nodes/<node>``),
    updated by committed batches.

    A value that does not decode is logged and the last good value for that
    key (if any) stays in force: the controller rewrites corrupt values, and
    the agent never crashes or drops enforcement because of one. A *foreign*
    write (outside a controller change, store/commit_window.py) is never
    applied: the last good value stays too. Both are :meth:`bad_keys` until a
    committed value for the key arrives; :meth:`unresolved` lists those with
    no good value at all (the agent pins their kernel rules, dataplane/pins.py).
    """

    def __init__(self, node: str, max_schema: int = SCHEMAS[-1]):
        self.node = node
        self._init_layout(max_schema)
        self.policies: dict[str, CompiledPolicy] = {}
        self.cluster_policies: dict[str, CompiledClusterPolicy] = {}
        self.sets: dict[str, PeerSet] = {}
        self.endpoints: dict[str, Endpoint] = {}
        #: this node's pod CIDRs from ``nodes/<node>`` (None: no such key; --pod-cidrs=auto reads them)
        self.pod_cidrs: tuple[str, ...] | None = None
        self._node_key = node_key(node)
        self.decode_errors: dict[str, str] = {}
        self.foreign: dict[str, int] = {}  # key -> revision of a foreign write (not applied)
        self._uses: NodeUses | None = None  # cache of uses(); dropped when a key it reads from changes

    def wants(self, key: str) -> bool:
        if self.max_schema >= 2 and (key == META_SCHEMA or key.startswith("sets2/")):
            return True
        return key == self._node_key or key.startswith(("policies/", "cpolicies/", "sets/", f"endpoints/{self.node}/"))

    def uses(self) -> NodeUses:
        """What this node's rules refer to now (model/relevance.py). Cached: only a change of one of
        the node's endpoints or of a policy (of any kind) can change it, and a commit of set
        members only (the common one) then costs nothing here."""
        if self._uses is None:
            self._uses = node_uses(self.node, self.endpoints.values(),
                                   {"policy": self.policies, "clusterpolicy": self.cluster_policies})
        return self._uses

    def _references_changed(self, key: str) -> None:
        if key.startswith(USES_SOURCES):
            self._uses = None

    def reset(
        self,
        values: Mapping[str, bytes],
        foreign: Mapping[str, int] | None = None,
        mod_revisions: Mapping[str, int] | None = None,
    ) -> None:
        """Replace everything with a fresh snapshot.

        Keys absent from the snapshot are dropped; a key whose new value does
        not decode keeps its last good value (as in :meth:`update`). ``foreign``
        keys (written after the snapshot's commit) keep their last good value;
        so does a key already known as foreign whose value is still that write
        (same mod revision in ``mod_revisions``).
        """
        mods = mod_revisions or {}
        still = {k: r for k, r in self.foreign.items() if mods.get(k) == r}
        new_foreign = {k: r for k, r in (foreign or {}).items() if self.wants(k)} | still
        wanted = {k: v for k, v in values.items() if self.wants(k) and k not in new_foreign}
        for key in [*self._keys()]:
            if key not in wanted and key not in new_foreign:
                self._drop(key)
        self.decode_errors.clear()
        self.foreign = new_foreign
        self.update(wanted)

    def mark_foreign(self, foreign: Mapping[str, int]) -> None:
        """Keys written outside a controller change: not applied, reported until a committed value arrives."""
        for key, revision in foreign.items():
            if self.wants(key):
                self.foreign[key] = revision

    def _keys(self) -> list[str]:
        return (
            [f"policies/{k}" for k in self.policies]
            + [f"cpolicies/{k}" for k in self.cluster_policies]
            + [f"sets/{k}" for k in self.sets]
            + [f"endpoints/{self.node}/{k}" for k in self.endpoints]
            + ([self._node_key] if self.pod_cidrs is not None else [])
            + self._layout_keys()
        )

    def update(self, changes: Mapping[str, bytes | None]) -> None:
        for key, raw in changes.items():
            if not self.wants(key):
                continue
            self._references_changed(key)
            self.foreign.pop(key, None)  # a committed value (or deletion) supersedes a foreign write
            if raw is None:
                self._drop(key)
            else:
                self._decode(key, raw)

    def _drop(self, key: str) -> None:
        self._references_changed(key)
        self.decode_errors.pop(key, None)
        kind, _, rest = key.partition("/")
        if kind in ("meta", "sets2"):
            self._drop_layout(key)
        elif kind == "policies":
            self.policies.pop(rest, None)
        elif kind == "cpolicies":
            self.cluster_policies.pop(rest, None)
        elif kind == "sets":
            self.sets.pop(rest, None)
        elif kind == "nodes":
            self.pod_cidrs = None
        else:
            self.endpoints.pop(rest.partition("/")[2], None)

    def _decode(self, key: str, raw: bytes) -> None:
        kind, _, rest = key.partition("/")
        try:
            data = json.loads(raw)
            if kind in ("meta", "sets2"):
                self._decode_layout(key, data)
            elif kind == "policies":
                self.policies[rest] = CompiledPolicy.from_json(data)
            elif kind == "cpolicies":
                self.cluster_policies[rest] = CompiledClusterPolicy.from_json(data)
            elif kind == "sets":
                self.sets[rest] = PeerSet.from_json(data)
            elif kind == "nodes":
                self.pod_cidrs = NodeNetwork.from_json(data).pod_cidrs
            else:
                self.endpoints[rest.partition("/")[2]] = Endpoint.from_json(data)
        except (ValueError, ModelDecodeError, TypeError, KeyError) as exc:
            self.decode_errors[key] = str(exc)
            log.error("corrupt value at %s (keeping the last good one, if any): %s", key, exc)
            return
        self.decode_errors.pop(key, None)

    # --- bad keys ---------------------------------------------------------------

    def bad_keys(self) -> dict[str, str]:
        """Keys that could not be decoded or were written foreign -> why (one line)."""
        out = {key: f"corrupt value: {reason}" for key, reason in self.decode_errors.items()}
        for key, revision in self.foreign.items():
            out[key] = f"written outside a controller commit (revision {revision}); not applied"
        return out

    def pin_key(self, key: str) -> PinKey | None:
        """What to pin (dataplane/pins.py) while ``key`` has no good value; None: nothing to pin."""
        kind, _, rest = key.partition("/")
        if kind == "policies":
            return ("policy", rest)
        if kind == "cpolicies":
            return ("cluster_policy", rest)
        if kind == "endpoints":
            return ("endpoint", rest.partition("/")[2])
        if kind == "sets" and self.layout == 1:
            return ("set", rest)
        if kind == "sets2" and self.layout >= 2:
            parsed = parse_set_key(key)
            return None if parsed is None else ("set", parsed[0])
        return None  # meta/schema, nodes/<node> (no rules of its own), or a set key of the layout not in use

    def has_good_value(self, pin: PinKey) -> bool:
        kind, name = pin
        if kind == "policy":
            return name in self.policies
        if kind == "cluster_policy":
            return name in self.cluster_policies
        if kind == "endpoint":
            return name in self.endpoints
        return name in (self._assembled if self.layout >= 2 else self.sets)

    def unresolved(self) -> dict[str, PinKey]:
        """Bad keys without any good value -> what to pin for them (call after :meth:`model`)."""
        out: dict[str, PinKey] = {}
        for key in self.bad_keys():
            pin = self.pin_key(key)
            if pin is not None and not self.has_good_value(pin):
                out[key] = pin
        return out

    def model(self) -> NodeModel:
        chunked = self._chunked_sets()
        return NodeModel(
            node=self.node,
            endpoints=dict(self.endpoints),
            policies=dict(self.policies),
            sets=chunked if self.layout >= 2 else dict(self.sets),
            cluster_policies=dict(self.cluster_policies),
        )

    # --- etcd layout schemas (store/migration.py) ------------------------------
    #
    # ``meta/schema`` names the layout the controller writes; sets are read from
    # ``sets/`` (schema 1) or assembled from ``sets2/<id>`` + its chunks (schema 2).
    # An agent with ``max_schema`` 1 wants neither key, exactly as agents did
    # before schema 2 existed.

    def _init_layout(self, max_schema: int) -> None:
        if max_schema not in SCHEMAS:
            raise ValueError(f"unknown layout schema {max_schema}")
        self.max_schema = max_schema
        self.schemas_supported: tuple[int, ...] = tuple(s for s in SCHEMAS if s <= max_schema)
        self.layout = 1
        self._set_headers: dict[str, dict[str, object]] = {}
        self._set_chunks: dict[str, dict[int, dict[str, object]]] = {}
        self._assembled: dict[str, PeerSet] = {}
        self._dirty_sets: set[str] = set()

    def _layout_keys(self) -> list[str]:
        keys = [f"sets2/{sid}" for sid in self._set_headers]
        keys += [f"sets2/{sid}/{n}" for sid, chunks in self._set_chunks.items() for n in chunks]
        return [*keys, META_SCHEMA] if self.layout != 1 else keys

    def _drop_layout(self, key: str) -> None:
        if key == META_SCHEMA:
            self.layout = 1
            return
        parsed = parse_set_key(key)
        if parsed is None:
            return
        sid, index = parsed
        if index is None:
            self._set_headers.pop(sid, None)
        else:
            chunks = self._set_chunks.get(sid, {})
            chunks.pop(index, None)
            if not chunks:
                self._set_chunks.pop(sid, None)
        self._dirty_sets.add(sid)

    def _decode_layout(self, key: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ModelDecodeError(f"expected a JSON object, got {type(data).__name__}")
        if key == META_SCHEMA:
            schema = stored_schema(data)
            if schema > self.max_schema:
                log.error("etcd holds layout schema %d, this agent reads up to %d", schema, self.max_schema)
            self.layout = min(schema, self.max_schema)
            return
        parsed = parse_set_key(key)
        if parsed is None:
            raise ModelDecodeError(f"not a chunked-set key: {key}")
        sid, index = parsed
        if index is None:
            self._set_headers[sid] = data
        else:
            self._set_chunks.setdefault(sid, {})[index] = data
        self._dirty_sets.add(sid)

    def _chunked_sets(self) -> dict[str, PeerSet]:
        """The schema-2 sets; a set whose chunks do not add up keeps its last good value."""
        for sid in self._dirty_sets:
            key = f"sets2/{sid}"
            header = self._set_headers.get(sid)
            if header is None:
                self._assembled.pop(sid, None)
                continue
            try:
                self._assembled[sid] = PeerSet.from_json(assemble_set(header, self._set_chunks.get(sid, {})))
            except (SchemaError, ModelDecodeError) as exc:
                self.decode_errors[key] = str(exc)
                log.error("chunked set %s does not assemble (keeping the last good one, if any): %s", sid, exc)
                continue
            self.decode_errors.pop(key, None)
        self._dirty_sets.clear()
        return dict(self._assembled)
