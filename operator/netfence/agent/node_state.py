"""Pure: the agent's view of the committed etcd model, reduced to one node."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from netfence.model.enforcement import (
    CompiledPolicy,
    Endpoint,
    ModelDecodeError,
    NodeModel,
    PeerSet,
)
from netfence.store.migration import META_SCHEMA, SCHEMAS, SchemaError, assemble_set, parse_set_key, stored_schema

log = logging.getLogger(__name__)


class NodeState:
    """Decoded policies, sets and this node's endpoints, updated by committed batches.

    A value that does not decode is logged and the last good value for that
    key (if any) stays in force: the controller rewrites corrupt values, and
    the agent never crashes or drops enforcement because of one.
    """

    def __init__(self, node: str, max_schema: int = SCHEMAS[-1]):
        self.node = node
        self._init_layout(max_schema)
        self.policies: dict[str, CompiledPolicy] = {}
        self.sets: dict[str, PeerSet] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.decode_errors: dict[str, str] = {}

    def wants(self, key: str) -> bool:
        if self.max_schema >= 2 and (key == META_SCHEMA or key.startswith("sets2/")):
            return True
        return key.startswith(("policies/", "sets/", f"endpoints/{self.node}/"))

    def reset(self, values: Mapping[str, bytes]) -> None:
        """Replace everything with a fresh snapshot.

        Keys absent from the snapshot are dropped; a key whose new value does
        not decode keeps its last good value (as in :meth:`update`).
        """
        wanted = {k: v for k, v in values.items() if self.wants(k)}
        for key in [*self._keys()]:
            if key not in wanted:
                self._drop(key)
        self.decode_errors.clear()
        self.update(wanted)

    def _keys(self) -> list[str]:
        return (
            [f"policies/{k}" for k in self.policies]
            + [f"sets/{k}" for k in self.sets]
            + [f"endpoints/{self.node}/{k}" for k in self.endpoints]
            + self._layout_keys()
        )

    def update(self, changes: Mapping[str, bytes | None]) -> None:
        for key, raw in changes.items():
            if not self.wants(key):
                continue
            if raw is None:
                self._drop(key)
            else:
                self._decode(key, raw)

    def _drop(self, key: str) -> None:
        self.decode_errors.pop(key, None)
        kind, _, rest = key.partition("/")
        if kind in ("meta", "sets2"):
            self._drop_layout(key)
        elif kind == "policies":
            self.policies.pop(rest, None)
        elif kind == "sets":
            self.sets.pop(rest, None)
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
            elif kind == "sets":
                self.sets[rest] = PeerSet.from_json(data)
            else:
                self.endpoints[rest.partition("/")[2]] = Endpoint.from_json(data)
        except (ValueError, ModelDecodeError, TypeError, KeyError) as exc:
            self.decode_errors[key] = str(exc)
            log.error("corrupt value at %s (keeping the last good one, if any): %s", key, exc)
            return
        self.decode_errors.pop(key, None)

    def model(self) -> NodeModel:
        chunked = self._chunked_sets()
        return NodeModel(
            node=self.node,
            endpoints=dict(self.endpoints),
            policies=dict(self.policies),
            sets=chunked if self.layout >= 2 else dict(self.sets),
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
