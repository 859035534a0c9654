"""Writes the engine's desired state to etcd: coalesced, fenced, and self-healing.

Only the leader writes. Every burst of engine changes is drained after a short
coalescing window and written as one logical change (one or more fenced
transactions ending with the commit marker). When leadership is (re)gained,
after any write error, and periodically, the syncer *reconciles*: it reads the
whole prefix and writes exactly the difference to the desired state, which
also deletes state of objects removed while no controller ran and rewrites
values someone changed or corrupted. A reconcile against matching state
writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from netfence.model.compiler import ModelEngine
from netfence.store.election import LeaderElection
from netfence.store.errors import NotLeaderError
from netfence.store.etcd import EtcdStore
from netfence.store.layout import CorruptValueError

log = logging.getLogger(__name__)

OWNED_PREFIXES = ("policies/", "sets/", "endpoints/", "meta/")
SCHEMA_KEY = "meta/schema"
OBSERVED_KEY = "meta/observed"


class EtcdSyncer:
    def __init__(
        self,
        engine: ModelEngine,
        store: EtcdStore,
        election: LeaderElection,
        observed: Callable[[], Mapping[str, int]],
        coalesce_seconds: float = 0.02,
        reconcile_seconds: float = 60.0,
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

    def notify(self) -> None:
        """The engine changed (or the world was observed further): sync soon."""
        self._wake.set()

    def request_reconcile(self) -> None:
        self._needs_reconcile = True
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.2
        while True:
            timeout = max(0.05, self.reconcile_seconds - (time.monotonic() - self._last_reconcile))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                self._needs_reconcile = True
            self._wake.clear()
            if self.coalesce_seconds:
                await asyncio.sleep(self.coalesce_seconds)
            if not self.election.is_leader:
                self.engine.drain_changes()  # the next leader reconciles from desired()
                self._needs_reconcile = True
                continue
            try:
                if self._needs_reconcile:
                    await self.reconcile()
                else:
                    await self._write_changes()
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
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
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
        changes: dict[str, bytes | None] = {
            key: None if value is None else self.store.layout.encode(value)
            for key, value in self.engine.drain_changes().items()
        }
        changes.update(self._observed_change())
        if changes:
            await self._commit(changes)

    async def reconcile(self) -> None:
        snapshot = await self.store.read_all()
        self.engine.drain_changes()  # desired() below covers them
        desired: dict[str, Any] = dict(self.engine.desired())
        desired[SCHEMA_KEY] = {"schema": 1}
        observed = self._merged_observed(snapshot.values.get(OBSERVED_KEY))
        desired[OBSERVED_KEY] = {"schema": 1, "resourceVersions": observed}
        changes: dict[str, bytes | None] = {}
        for key, value in desired.items():
            raw = snapshot.values.get(key)
            if raw is None or not self._same(key, raw, value):
                changes[key] = self.store.layout.encode(value)
        for key in snapshot.values:
            if key.startswith(OWNED_PREFIXES) and key not in desired:
                changes[key] = None
        self._last_reconcile = time.monotonic()
        self._needs_reconcile = False
        if changes:
            log.info("reconcile: %d keys differ from the desired state; writing them", len(changes))
            self._written_observed = observed
            await self._commit(changes)
        else:
            self._written_observed = observed
            commit_rev = snapshot.commit_revision
            self.commit_revision = max(self.commit_revision, commit_rev)
            for key in desired:
                self.key_revisions.setdefault(key, commit_rev)
            for callback in self.on_commit:
                callback(self.commit_revision, set())

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
        for key in changes:
            self.key_revisions[key] = revision
        log.debug("committed %d keys at revision %d", len(changes), revision)
        for callback in self.on_commit:
            callback(revision, set(changes))
