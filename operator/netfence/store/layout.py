"""The etcd key layout and value encoding (pure; see docs/design.md "etcd layout").

Keys are handled *relative* to the prefix (``policies/default/web``); the
absolute key is ``prefix + relative``. Values are compact, key-sorted UTF-8
JSON objects that always carry ``"schema"``.

Key families:

* committed data, written by the controller and applied by readers only at
  commit markers: ``policies/<ns>/<name>``, ``cpolicies/<name>``, ``sets/<id>`` (layout schema 1)
  or ``sets2/<id>[/<chunk>]`` (layout schema 2, see ``store/migration.py``),
  ``endpoints/<node>/<ns>/<name>``, ``nodes/<node>`` (the node's pod CIDRs), ``meta/...``;
* protocol keys: ``commit`` (the commit marker), ``pending`` (present while a
  change that spans several transactions is being written), ``leader``;
* reports: ``status/nodes/<node>`` (agent-written, lease-bound).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netfence.store.errors import CorruptValueError

__all__ = [
    "COMMIT",
    "DEFAULT_PREFIX",
    "LEADER",
    "PENDING",
    "SCHEMA_VERSION",
    "CorruptValueError",
    "Layout",
    "decode",
    "encode",
    "is_committed_key",
]

DEFAULT_PREFIX = "/netfence/v1/"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA = 2  # the newest layout schema this code reads (store/migration.py)

POLICIES = "policies/"
SETS = "sets/"
SETS_V2 = "sets2/"  # layout schema 2: chunked peer sets
ENDPOINTS = "endpoints/"
NODES = "nodes/"  # nodes/<node>: the node's pod CIDRs (NodeNetwork)
META = "meta/"
STATUS_NODES = "status/nodes/"
COMMIT = "commit"
PENDING = "pending"
LEADER = "leader"
META_SCHEMA = "meta/schema"
#: Commit marker field: ``"relevant"`` says the controller that wrote the commit counts a node
#: synced at the last commit relevant to it (model/relevance.py), so agents whose node the
#: commit does not touch need not report it. Absent (an older controller): report every commit.
COMMIT_REPORTS = "reports"
REPORTS_RELEVANT = "relevant"

CLUSTER_POLICIES = "cpolicies/"  # ClusterNetworkPolicy: cpolicies/<name>
COMMITTED_PREFIXES: tuple[str, ...] = (POLICIES, CLUSTER_POLICIES, SETS, SETS_V2, ENDPOINTS, NODES, META)


def commit_marker(seq: int, time: str, controller: str) -> dict[str, Any]:
    """The commit marker's value (``commit``)."""
    return {"seq": seq, "time": time, "controller": controller, COMMIT_REPORTS: REPORTS_RELEVANT}


def _check_part(what: str, value: str) -> str:
    if not value or "/" in value:
        raise ValueError(f"invalid {what} {value!r}: must be non-empty and contain no '/'")
    return value


def is_committed_key(rel: str) -> bool:
    """Whether ``rel`` is committed data (applied by readers only at commit markers)."""
    return rel.startswith(COMMITTED_PREFIXES)


@dataclass(frozen=True, slots=True)
class Layout:
    """Key builders and parsers for one prefix (which must end with ``/``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"etcd prefix {self.prefix!r} must start and end with '/'")

    # -- absolute keys ---------------------------------------------------------

    @property
    def prefix_bytes(self) -> bytes:
        return self.prefix.encode()

    def key(self, rel: str) -> bytes:
        """The absolute key (bytes) of a relative key."""
        return (self.prefix + rel).encode()

    def relative(self, key: bytes) -> str:
        """The relative key of an absolute key; ValueError if outside the prefix."""
        text = key.decode("utf-8", errors="replace")
        if not text.startswith(self.prefix):
            raise ValueError(f"key {text!r} is outside the prefix {self.prefix!r}")
        return text[len(self.prefix) :]

    # -- relative key builders -------------------------------------------------

    @staticmethod
    def policy(namespace: str, name: str) -> str:
        return f"{POLICIES}{_check_part('namespace', namespace)}/{_check_part('name', name)}"

    @staticmethod
    def set(set_id: str) -> str:
        return f"{SETS}{_check_part('set id', set_id)}"

    @staticmethod
    def endpoint(node: str, namespace: str, name: str) -> str:
        return (
            f"{ENDPOINTS}{_check_part('node', node)}/"
            f"{_check_part('namespace', namespace)}/{_check_part('name', name)}"
        )

    @staticmethod
    def endpoints_of(node: str) -> str:
        """The relative prefix of one node's endpoints (``endpoints/<node>/``)."""
        return f"{ENDPOINTS}{_check_part('node', node)}/"

    @staticmethod
    def node(node: str) -> str:
        """``nodes/<node>``: the node's pod CIDRs."""
        return f"{NODES}{_check_part('node', node)}"

    @staticmethod
    def node_status(node: str) -> str:
        return f"{STATUS_NODES}{_check_part('node', node)}"

    commit = COMMIT
    pending = PENDING
    leader = LEADER
    meta_schema = META_SCHEMA

    # -- values (the module functions, for callers holding a Layout) ----------

    @staticmethod
    def encode(value: Mapping[str, Any]) -> bytes:
        return encode(value)

    @staticmethod
    def decode(raw: bytes, key: str = "?", *, strict: bool = False) -> dict[str, Any]:
        return decode(raw, key, strict=strict)

    # -- parsers (relative keys) ----------------------------------------------

    @staticmethod
    def parse_policy(rel: str) -> tuple[str, str] | None:
        """``policies/<ns>/<name>`` -> (ns, name), else None."""
        parts = _split(rel, POLICIES, 2)
        return (parts[0], parts[1]) if parts else None

    @staticmethod
    def parse_set(rel: str) -> str | None:
        parts = _split(rel, SETS, 1)
        return parts[0] if parts else None

    @staticmethod
    def parse_endpoint(rel: str) -> tuple[str, str, str] | None:
        """``endpoints/<node>/<ns>/<name>`` -> (node, ns, name), else None."""
        parts = _split(rel, ENDPOINTS, 3)
        return (parts[0], parts[1], parts[2]) if parts else None

    @staticmethod
    def parse_node(rel: str) -> str | None:
        """``nodes/<node>`` -> node, else None."""
        parts = _split(rel, NODES, 1)
        return parts[0] if parts else None

    @staticmethod
    def parse_node_status(rel: str) -> str | None:
        parts = _split(rel, STATUS_NODES, 1)
        return parts[0] if parts else None


def _split(rel: str, family: str, count: int) -> tuple[str, ...] | None:
    if not rel.startswith(family):
        return None
    parts = rel[len(family) :].split("/")
    if len(parts) != count or not all(parts):
        return None
    return tuple(parts)


# -- values ---------------------------------------------------------------------


def encode(value: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted UTF-8 JSON; adds ``"schema": SCHEMA_VERSION`` if absent."""
    if not isinstance(value, Mapping):
        raise TypeError(f"store values are JSON objects, got {type(value).__name__}")
    value = dict(value)
    value.setdefault("schema", SCHEMA_VERSION)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes, key: str = "?", *, strict: bool = False) -> dict[str, Any]:
    """Decode a stored value; CorruptValueError (naming ``key``) if it is not usable.

    Accepted: a JSON object whose ``schema`` is an integer >= 1. Older schemas
    are accepted (newer readers read older data); a newer schema than
    ``SUPPORTED_SCHEMA`` is accepted too (unknown fields are ignored by
    readers) unless ``strict``. Unknown fields are kept.
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptValueError(key, f"not UTF-8 JSON ({exc}); raw={raw[:80]!r}") from exc
    if not isinstance(value, dict):
        raise CorruptValueError(key, f"expected a JSON object, got {type(value).__name__}")
    schema = value.get("schema")
    if schema is None:
        raise CorruptValueError(key, "missing 'schema'")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise CorruptValueError(key, f"invalid schema {schema!r}")
    if strict and schema > SUPPORTED_SCHEMA:
        raise CorruptValueError(key, f"schema {schema} is newer than supported ({SUPPORTED_SCHEMA})")
    return value
