"""Writes the engine's desired state to etcd: coalesced, fenced, and self-healing.

Only the leader writes. A change that arrives while the syncer is idle is
written at once; changes that arrive during a write, or within the coalescing
window after it ends, are drained together when that window has passed and
written as one logical change (one or more fenced transactions ending with the
commit marker). So an isolated change pays no window, and a burst costs at most
one write per window. A reconcile (below) always waits the window first, so that
its triggers (a burst of foreign writes, an election) gather into one. When leadership is (re)gained,
after any write error, and periodically, the syncer *reconciles*: it reads the
whole prefix and writes exactly the difference to the desired state, which
also deletes state of objects removed while no controller ran and rewrites
values someone changed or corrupted. A reconcile against matching state
writes nothing.

Foreign writes: the leader watches its own keys (``policies/``, ``cpolicies/``, ``sets/``,
``sets2/``, ``endpoints/``, ``nodes/``, ``meta/``, ``commit``, ``pending``) and knows the
revision of every transaction it wrote (``FencedWriter.txn_listeners``). An event
at any other revision — someone else's put (valid or corrupt) or deletion —
triggers a reconcile at once that rewrites exactly those keys (even if the
stored value equals the desired one, so that its revision becomes the
controller's again), typically within tens of milliseconds.

Layout schema (``store/migration.py``): the engine produces *logical* keys;
the syncer stores them in the layout ``schema`` that the migration gate
allows (never above ``target_schema``, and only what every live agent
reads). A change of layout is done by a reconcile in two commits: the new
layout's keys with ``meta/schema``, then the removal of the old layout's keys.

The syncer knows the store only as a ``SyncerStore`` and the election as a
``Leadership`` (``store/protocols.py``); a change cut short by a lost fence
(``NotLeaderError``, earlier transactions left uncommitted) is completed by
the next leader's reconcile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from netfence.model.compiler import ModelEngine
from netfence.store.connection import RETRY_BACKOFF_MAX
from netfence.store.errors import NotLeaderError
from netfence.store.layout import CorruptValueError
from netfence.store.migration import (
    check_schema,
    decide_schema,
    exclusive_to,
    logical_key,
    migration_holders,
    physical,
    physical_state,
    report_schemas,
    required_nodes,
    stored_schema,
)
from netfence.store.protocols import Leadership, SyncerStore

log = logging.getLogger(__name__)

OWNED_PREFIXES = ("policies/", "cpolicies/", "sets/", "sets2/", "endpoints/", "nodes/", "meta/")
PROTOCOL_KEYS = ("commit", "pending")
SCHEMA_KEY = "meta/schema"
OBSERVED_KEY = "meta/observed"


def is_guarded(key: str) -> bool:
    """A key only the leading controller writes (not ``leader``, not ``status/`` reports)."""
    return key.startswith(OWNED_PREFIXES) or key in PROTOCOL_KEYS


def foreign_keys(revision: int, keys: Iterable[str], own_revisions: Collection[int]) -> set[str]:
    """The guarded ``keys`` changed at ``revision`` if that is not a revision of our own transactions."""
    if revision in own_revisions:
        return set()
    return {key for key in keys if is_guarded(key)}


class EtcdSyncer:
    def __init__(
        self,
        engine: ModelEngine,
        store: SyncerStore,
        election: Leadership,
        observed: Callable[[], Mapping[str, int]],
        coalesce_seconds: float = 0.02,
        reconcile_seconds: float = 60.0,
        target_schema: int = 1,
    ):
        self.engine = engine
        self.store = store
        self.election = election
        self.observed = observed
        self.coalesce_seconds = coalesce_seconds
        self.reconcile_seconds = reconcile_seconds
        self.key_revisions: dict[str, int] = {}
        self.commit_revision = 0
        self.healthy = False
        self.last_error: str | None = None
        self.writes = 0  # etcd keys written (put or delete), for tests and metrics
        self.on_commit: list[Callable[[int, set[str]], None]] = []
        self._wake = asyncio.Event()
        self._needs_reconcile = True
        self._written_observed: dict[str, int] = {}
        self._last_reconcile = 0.0
        self._last_write = -float("inf")  # monotonic end of the last write or reconcile
        self.coalesce_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the window's wait (tests)
        # Layout schema (see store/migration.py).
        self.target_schema = check_schema(target_schema)
        self.schema = 1  # the layout in etcd (meta/schema), as of the last reconcile or commit
        self.agent_schemas: dict[str, frozenset[int]] = {}  # live node reports: node -> schemas read
        self.migrations: list[tuple[int, int, int]] = []  # (from, to, revision), for tests and logs
        self._gate_held: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # last logged by _log_gate
        self._stored_sets: dict[str, dict[str, bytes]] = {}  # schema >= 2: set key -> its stored keys
        # Foreign writes (see the module docstring).
        self._own_revisions: set[int] = set()  # revisions of our transactions not yet seen by the watch
        self._foreign: dict[str, int] = {}  # guarded key -> revision of a foreign write, until rewritten
        self.foreign_writes = 0  # foreign writes noticed (revisions), for tests and metrics
        store.txn_listeners.append(self._own_revisions.add)

    def notify(self) -> None:
        """The engine changed (or the world was observed further): sync soon."""
        self._wake.set()

    def request_reconcile(self) -> None:
        self._needs_reconcile = True
        self._wake.set()

    def set_agent_report(self, node: str, report: Mapping[str, Any] | None) -> None:
        """A node report changed (None: gone); the migration gate may open or close."""
        schemas = None if report is None else report_schemas(report)
        if self.agent_schemas.get(node) == schemas:
            return
        if schemas is None:
            self.agent_schemas.pop(node, None)
        else:
            self.agent_schemas[node] = schemas
        if self.target_schema > 1 or self.schema > 1:
            self._wake.set()

    def wanted_schema(self) -> int:
        """The layout schema to write now (the migration gate, store/migration.py)."""
        if self.target_schema == 1 and self.schema == 1:
            return 1
        required = required_nodes(self.engine.desired()) if self.schema < self.target_schema else None
        wanted = decide_schema(self.target_schema, self.schema, self.agent_schemas, required)
        self._log_gate(wanted, required)
        return wanted

    def _log_gate(self, wanted: int, required: set[str] | None) -> None:
        """Say once (per change) which nodes keep the layout below the target schema."""
        held = None
        if wanted < self.target_schema:
            held = migration_holders(self.target_schema, self.agent_schemas, required)
        if held != self._gate_held:
            self._gate_held = held
            if held is not None:
                old, absent = held
                log.info("etcd layout stays at schema %d (target %d): agents that cannot read it on %s; "
                         "endpoints on nodes without a live agent report: %s", wanted, self.target_schema,
                         ", ".join(old) or "none", ", ".join(absent) or "none")

    async def run(self) -> None:
        watcher = asyncio.create_task(self.watch_own_keys(), name="own-keys-watch")
        try:
            await self._run()
        finally:
            watcher.cancel()
            await asyncio.wait({watcher}, timeout=2.0)  # bounded: a stuck gRPC stream must not hold us

    async def watch_own_keys(self) -> None:
        """Notice writes to our keys at revisions that are not ours, and have them rewritten at once."""
        while True:
            try:
                async for revision, changes in self.store.watch_changes("", None):
                    guarded = [key for key in changes if is_guarded(key)]
                    if not guarded:
                        continue
                    if revision not in self._own_revisions:
                        await self.store.writes_settled()  # a change being written may own this revision
                    foreign = foreign_keys(revision, guarded, self._own_revisions)
                    self._own_revisions.difference_update([r for r in self._own_revisions if r <= revision])
                    fence = self.election.fence
                    # Writes from before we were elected (a previous leader's) are covered by the
                    # reconcile that follows every election; only later ones can be foreign to us.
                    if foreign and self.election.is_leader and fence is not None and revision > fence.create_revision:
                        self.foreign_writes += 1
                        log.warning("foreign write at revision %d to %s; rewriting",
                                    revision, ", ".join(sorted(foreign)))
                        self._foreign.update(dict.fromkeys(foreign, revision))
                        self.request_reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching our own keys failed (%s); reconciling and watching again", exc)
                self.request_reconcile()  # events may have been missed meanwhile
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            timeout = max(0.05, self.reconcile_seconds - (time.monotonic() - self._last_reconcile))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                self._needs_reconcile = True
            self._wake.clear()
            if self._needs_reconcile:  # start, election, foreign writes, errors: let their triggers gather
                window = self.coalesce_seconds
            else:  # a change: at once, unless a write ended less than a window ago (a burst gathers)
                window = self.coalesce_seconds - (time.monotonic() - self._last_write)
            if window > 0:
                await self.coalesce_sleep(window)
            if not self.election.is_leader:
                self.engine.drain_changes()  # the next leader reconciles from desired()
                self._needs_reconcile = True
                continue
            try:
                try:
                    if self._needs_reconcile or self.wanted_schema() != self.schema:
                        await self.reconcile()
                    else:
                        await self._write_changes()
                finally:
                    self._last_write = time.monotonic()
                self.healthy = True
                self.last_error = None
                backoff = 0.2
            except NotLeaderError:
                log.warning("lost leadership while writing; another controller writes now")
                self._needs_reconcile = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.healthy = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._needs_reconcile = True
                log.warning("etcd write failed (%s); retrying in %.1fs", self.last_error, backoff)
                await self.store.pause(backoff)  # ends early once etcd is reachable again
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX)
                self._wake.set()

    # ------------------------------------------------------------------

    def _current_observed(self) -> dict[str, int]:
        merged = dict(self._written_observed)
        for kind, rv in self.observed().items():
            merged[kind] = max(rv, merged.get(kind, 0))
        return merged

    def _observed_change(self) -> dict[str, bytes | None]:
        observed = self._current_observed()
        if observed == self._written_observed:
            return {}
        return {OBSERVED_KEY: self.store.layout.encode({"resourceVersions": observed})}

    async def _write_changes(self) -> None:
        changes: dict[str, bytes | None] = {}
        stored_sets: dict[str, dict[str, bytes]] = {}
        for key, value in self.engine.drain_changes().items():
            if self.schema < 2 or not key.startswith("sets/"):
                changes[key] = None if value is None else self.store.layout.encode(value)
                continue
            # Chunked sets: write only the chunks (and header) that changed.
            before = self._stored_sets.get(key, {})
            after = {} if value is None else self._encoded(physical(key, value, self.schema))
            changes.update({k: raw for k, raw in after.items() if before.get(k) != raw})
            changes.update(dict.fromkeys(before.keys() - after.keys()))
            stored_sets[key] = after
        changes.update(self._observed_change())
        if changes:
            await self._commit(changes)
        for key, after in stored_sets.items():
            if after:
                self._stored_sets[key] = after
            else:
                self._stored_sets.pop(key, None)

    def _encoded(self, values: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
        return {key: self.store.layout.encode(value) for key, value in values.items()}

    async def reconcile(self) -> None:
        foreign, self._foreign = self._foreign, {}
        try:
            await self._reconcile(foreign)
        except BaseException:
            for key, revision in foreign.items():  # not rewritten yet: the next reconcile does it
                self._foreign.setdefault(key, revision)
            raise

    async def _reconcile(self, foreign: Mapping[str, int]) -> None:
        snapshot = await self.store.read_all()
        self.engine.drain_changes()  # desired() below covers them
        # A foreign meta/ value is never trusted (it would set the schema or the observed versions).
        stored = self.schema if SCHEMA_KEY in foreign else self._stored_schema(snapshot.values.get(SCHEMA_KEY))
        self.schema = stored
        schema = self.wanted_schema()
        desired: dict[str, Any] = physical_state(self.engine.desired(), schema)
        desired[SCHEMA_KEY] = {"schema": schema}
        observed = self._merged_observed(None if OBSERVED_KEY in foreign else snapshot.values.get(OBSERVED_KEY))
        desired[OBSERVED_KEY] = {"schema": 1, "resourceVersions": observed}
        changes: dict[str, bytes | None] = {}
        for key, value in desired.items():
            raw = snapshot.values.get(key)
            if raw is None or key in foreign or not self._same(key, raw, value):
                changes[key] = self.store.layout.encode(value)
        migrating = schema != stored
        for key in snapshot.values:
            if key.startswith(OWNED_PREFIXES) and key not in desired:
                if migrating and exclusive_to(key, stored):
                    continue  # readers of the old layout still use it: removed after the switch
                changes[key] = None
        self._last_reconcile = time.monotonic()
        self._needs_reconcile = False
        if migrating:
            log.info("migrating the etcd layout from schema %d to %d (live agents read: %s)",
                     stored, schema, {n: sorted(s) for n, s in sorted(self.agent_schemas.items())})
        if changes:
            log.info("reconcile: %d keys differ from the desired state; writing them", len(changes))
            self._written_observed = observed
            await self._commit(changes)
        elif snapshot.pending or foreign.keys() & set(PROTOCOL_KEYS):
            # Only the commit marker or `pending` was touched, or a change cut short by a lost
            # fence left `pending` with nothing else to write (it hides every later state from
            # snapshots): a fresh commit of ours clears both.
            self._written_observed = observed
            await self._commit_marker()
        else:
            self._written_observed = observed
            commit_rev = snapshot.commit_revision
            self.commit_revision = max(self.commit_revision, commit_rev)
            for key in desired:
                self.key_revisions.setdefault(logical_key(key), commit_rev)
            for callback in self.on_commit:
                callback(self.commit_revision, set())
        self.schema = schema
        self._stored_sets = {}
        if schema >= 2:
            for key, value in desired.items():
                if key.startswith("sets2/"):
                    self._stored_sets.setdefault(logical_key(key), {})[key] = self.store.layout.encode(value)
        if migrating:
            self.migrations.append((stored, schema, self.commit_revision))
            log.info("layout schema %d committed at revision %d; removing the schema %d keys",
                     schema, self.commit_revision, stored)
            await self.reconcile()

    def _stored_schema(self, raw: bytes | None) -> int:
        if raw is None:
            return 1
        try:
            return stored_schema(self.store.layout.decode(raw, key=SCHEMA_KEY))
        except CorruptValueError:
            return 1

    def _merged_observed(self, raw: bytes | None) -> dict[str, int]:
        """Observed resource versions only grow: a fresh listing misses deletions seen before."""
        observed = dict(self.observed())
        if raw is not None:
            try:
                stored = self.store.layout.decode(raw, key=OBSERVED_KEY).get("resourceVersions", {})
                for kind, rv in stored.items():
                    if isinstance(rv, int) and rv > observed.get(kind, 0):
                        observed[kind] = rv
            except CorruptValueError:
                pass
        return observed

    def _same(self, key: str, raw: bytes, value: Mapping[str, Any]) -> bool:
        try:
            stored = self.store.layout.decode(raw, key=key)
        except CorruptValueError as exc:
            log.warning("corrupt value in etcd, rewriting it: %s", exc)
            return False
        expected = json.loads(self.store.layout.encode(value))
        return bool(stored == expected)

    async def _commit_marker(self) -> None:
        fence = self.election.fence
        if fence is None:
            raise NotLeaderError("not the leader")
        revision = await self.store.write_commit_only(fence)
        self.commit_revision = revision
        for callback in self.on_commit:
            callback(revision, set())

    async def _commit(self, changes: dict[str, bytes | None]) -> None:
        fence = self.election.fence
        if fence is None:
            raise NotLeaderError("not the leader")
        if OBSERVED_KEY not in changes:
            changes.update(self._observed_change())
        observed_now = self._current_observed()
        revision = await self.store.write(changes, fence)
        self.writes += len(changes)
        self.commit_revision = revision
        if OBSERVED_KEY in changes:
            self._written_observed = observed_now
        logical = {logical_key(key) for key in changes}
        for key in logical:
            self.key_revisions[key] = revision
        log.debug("committed %d keys at revision %d", len(changes), revision)
        for callback in self.on_commit:
            callback(revision, logical)
