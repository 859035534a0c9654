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

log = logging.getLogger(__name__)


class NodeState:
    """Decoded policies, sets and this node's endpoints, updated by committed batches.

    A value that does not decode is logged and the last good value for that
    key (if any) stays in force: the controller rewrites corrupt values, and
    the agent never crashes or drops enforcement because of one.
    """

    def __init__(self, node: str):
        self.node = node
        self.policies: dict[str, CompiledPolicy] = {}
        self.sets: dict[str, PeerSet] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.decode_errors: dict[str, str] = {}

    def wants(self, key: str) -> bool:
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
        if kind == "policies":
            self.policies.pop(rest, None)
        elif kind == "sets":
            self.sets.pop(rest, None)
        else:
            self.endpoints.pop(rest.partition("/")[2], None)

    def _decode(self, key: str, raw: bytes) -> None:
        kind, _, rest = key.partition("/")
        try:
            data = json.loads(raw)
            if kind == "policies":
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
        return NodeModel(
            node=self.node,
            endpoints=dict(self.endpoints),
            policies=dict(self.policies),
            sets=dict(self.sets),
        )
