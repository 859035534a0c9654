"""Schema versions of the etcd key layout, and the gate that decides when to migrate (pure).

The controller compiles the world into *logical* keys (schema 1 names:
``policies/…``, ``sets/<id>``, ``endpoints/…``). The *layout schema* decides
how those are stored:

* **Schema 1**: one key per logical key, ``sets/<id>`` holding the whole
  member list.
* **Schema 2**: peer sets are chunked. ``sets2/<id>`` holds the set without
  its members plus ``"chunks": K``; ``sets2/<id>/<n>`` (``n`` in ``0..K-1``)
  holds ``{"members": [...]}``, member ``m`` living in chunk
  ``crc32(m) % K``; ``K`` is the smallest power of two giving at most
  :data:`CHUNK_MEMBERS` members per chunk on average. A pod joining a set of
  100 000 members rewrites one ~256-member chunk instead of a ~2 MB value
  (which also exceeds etcd's default 1.5 MiB request limit). Policies,
  endpoints and nodes are unchanged.

Agents built with schema-2 support read both layouts and pick the one named
by ``meta/schema`` (absent: 1), which the controller writes in the same
commit as the new layout's keys, so an agent switches atomically. Agents
that only know schema 1 ignore ``sets2/`` and would see no sets at all, so
the controller only writes schema 2 when the gate (:func:`decide_schema`)
allows it:

* it never writes a schema above its ``--target-schema`` (default 1);
* it never writes a schema that a *live* agent report (``status/nodes/…``,
  lease-bound) does not list in ``schemaSupported`` — if such an agent shows
  up after a migration, the controller falls back;
* it migrates *up* only when, in addition, every node that must enforce
  something (hosts an endpoint) has a live report — an agent that is
  restarting might come back at the old version.

A migration is two commits: first the new layout's keys plus ``meta/schema``
(agents switch here), then the deletion of the old layout's keys.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

Json = dict[str, Any]

SCHEMAS: tuple[int, ...] = (1, 2)
LATEST = SCHEMAS[-1]
CHUNK_MEMBERS = 256

SETS_V1 = "sets/"
SETS_V2 = "sets2/"
ENDPOINTS = "endpoints/"
META_SCHEMA = "meta/schema"

# Key families that exist in only one layout (deleted when migrating away from it).
EXCLUSIVE_FAMILIES: dict[int, tuple[str, ...]] = {1: (SETS_V1,), 2: (SETS_V2,)}
ALL_FAMILIES: tuple[str, ...] = ("policies/", "cpolicies/", SETS_V1, SETS_V2, ENDPOINTS, "nodes/", "meta/")


class SchemaError(ValueError):
    """A stored value or set of values does not form a valid layout."""


def check_schema(schema: int) -> int:
    if schema not in SCHEMAS:
        raise SchemaError(f"unknown layout schema {schema}; known: {', '.join(map(str, SCHEMAS))}")
    return schema


# -- the controller side: logical -> physical ----------------------------------------------


def chunk_count(members: int) -> int:
    """Chunks of a set with ``members`` members: the smallest power of two with <= CHUNK_MEMBERS each."""
    count = 1
    while count * CHUNK_MEMBERS < members:
        count *= 2
    return count


def chunk_of(member: str, chunks: int) -> int:
    return zlib.crc32(member.encode()) % chunks


def set_header_key(set_id: str) -> str:
    return f"{SETS_V2}{set_id}"


def set_chunk_key(set_id: str, index: int) -> str:
    return f"{SETS_V2}{set_id}/{index}"


def physical(key: str, value: Mapping[str, Any], schema: int) -> dict[str, Json]:
    """The stored keys and values of one logical key under ``schema``."""
    if schema < 2 or not key.startswith(SETS_V1):
        return {key: dict(value)}
    set_id = key[len(SETS_V1) :]
    members = [str(m) for m in value.get("members") or ()]
    count = chunk_count(len(members))
    chunks: list[list[str]] = [[] for _ in range(count)]
    for member in members:  # members are sorted; so is every chunk
        chunks[chunk_of(member, count)].append(member)
    header = {k: v for k, v in value.items() if k != "members"}
    header.update(schema=2, chunks=count)
    out: dict[str, Json] = {set_header_key(set_id): header}
    for index, chunk in enumerate(chunks):
        out[set_chunk_key(set_id, index)] = {"schema": 2, "members": chunk}
    return out


def physical_state(desired: Mapping[str, Mapping[str, Any]], schema: int) -> dict[str, Json]:
    """The whole stored state of a logical state under ``schema``."""
    out: dict[str, Json] = {}
    for key, value in desired.items():
        out.update(physical(key, value, schema))
    return out


def logical_key(key: str) -> str:
    """The logical key a stored key belongs to (``sets2/<id>[/<n>]`` -> ``sets/<id>``)."""
    if key.startswith(SETS_V2):
        return SETS_V1 + key[len(SETS_V2) :].partition("/")[0]
    return key


def exclusive_to(key: str, schema: int) -> bool:
    """Whether ``key`` belongs to a key family that only layout ``schema`` uses."""
    return key.startswith(EXCLUSIVE_FAMILIES.get(schema, ()))


# -- the gate ------------------------------------------------------------------------------


def report_schemas(report: Mapping[str, Any] | None) -> frozenset[int]:
    """The layout schemas a node report says its agent reads (agents without the field read 1)."""
    raw = (report or {}).get("schemaSupported")
    if not isinstance(raw, list):
        return frozenset({1})
    return frozenset(s for s in raw if isinstance(s, int) and not isinstance(s, bool)) or frozenset({1})


def decide_schema(
    target: int,
    stored: int,
    supported: Mapping[str, Collection[int]],
    required_nodes: Iterable[str] | None,
) -> int:
    """The layout schema the controller should write now (see the module doc).

    ``supported``: schemas per node with a live report. ``required_nodes``:
    nodes hosting at least one endpoint; only consulted for an upgrade (pass
    None to mean "unknown", which blocks an upgrade).
    """
    ceiling = 1
    for schema in SCHEMAS:
        if schema <= target and all(schema in schemas for schemas in supported.values()):
            ceiling = schema
    if stored >= ceiling:
        return ceiling  # stay, or fall back (a live agent cannot read the stored layout, or target lowered)
    if required_nodes is None or not set(required_nodes) <= set(supported):
        return stored  # a node that must enforce has no live agent: it may come back old
    return ceiling


def migration_holders(
    target: int, supported: Mapping[str, Collection[int]], required_nodes: Iterable[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What keeps the layout below ``target``: (nodes whose live agent cannot read it, nodes
    that host endpoints but have no live agent report), each sorted. For the controller's log."""
    old = tuple(sorted(node for node, schemas in supported.items() if target not in schemas))
    absent = tuple(sorted(set(required_nodes or ()) - set(supported)))
    return old, absent


def required_nodes(keys: Iterable[str]) -> set[str]:
    """Nodes that host an endpoint, from logical (or stored) keys."""
    nodes = set()
    for key in keys:
        if key.startswith(ENDPOINTS):
            node = key[len(ENDPOINTS) :].partition("/")[0]
            if node:
                nodes.add(node)
    return nodes


def stored_schema(raw: Mapping[str, Any] | None) -> int:
    """The layout named by a decoded ``meta/schema`` value (absent or odd: 1)."""
    value = (raw or {}).get("schema", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


# -- the agent side: physical -> logical ---------------------------------------------------


def parse_set_key(key: str) -> tuple[str, int | None] | None:
    """``sets2/<id>`` -> (id, None); ``sets2/<id>/<n>`` -> (id, n); else None."""
    if not key.startswith(SETS_V2):
        return None
    set_id, sep, rest = key[len(SETS_V2) :].partition("/")
    if not set_id:
        return None
    if not sep:
        return set_id, None
    if not rest.isdigit():
        return None
    return set_id, int(rest)


def assemble_set(header: Mapping[str, Any], chunks: Mapping[int, Mapping[str, Any]]) -> Json:
    """The schema-1 JSON of a chunked set; SchemaError if a chunk is missing or malformed."""
    count = header.get("chunks")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SchemaError(f"set {header.get('id')!r}: bad chunk count {count!r}")
    members: list[str] = []
    for index in range(count):
        chunk = chunks.get(index)
        if chunk is None:
            raise SchemaError(f"set {header.get('id')!r}: chunk {index} of {count} is missing")
        part = chunk.get("members")
        if not isinstance(part, list):
            raise SchemaError(f"set {header.get('id')!r}: chunk {index} has no member list")
        members.extend(str(m) for m in part)
    out = {k: v for k, v in header.items() if k != "chunks"}
    out["members"] = sorted(set(members))
    return out
