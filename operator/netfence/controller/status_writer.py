"""Keeps one ClusterPolicyStatus per NetworkPolicy, with aggregated node status.

Runs on the leader only. Objects are created when a policy appears, deleted
when it goes, recreated when someone deletes them. ``.status`` is computed by
the pure :func:`netfence.status.aggregate.compute_status` and written only when
it differs from what this writer wrote last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from netfence.controller.kube import KubeApi, cps_name
from netfence.controller.world import PolicyMeta, WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import (
    NodeReport,
    PolicyFacts,
    compute_status,
    strip_times,
    with_transition_times,
)

log = logging.getLogger(__name__)


class StatusWriter:
    def __init__(
        self,
        kube: KubeApi,
        engine: ModelEngine,
        world: WorldTracker,
        key_revisions: dict[str, int],
        is_leader: Callable[[], bool],
        interval: float = 0.2,
    ):
        self.kube = kube
        self.engine = engine
        self.world = world
        self.key_revisions = key_revisions
        self.is_leader = is_leader
        self.interval = interval
        self.reports: dict[str, NodeReport] = {}
        self.written: dict[str, dict[str, Any]] = {}  # name -> status without times
        self.full_status: dict[str, dict[str, Any]] = {}
        self.existing: set[str] = set()
        self._last_spec: dict[str, dict[str, Any]] = {}
        self.api_writes = 0
        self._dirty: set[tuple[str, str]] = set()
        self._resync = True
        self._wake = asyncio.Event()

    # --- inputs ---------------------------------------------------------

    def mark_all(self) -> None:
        self._dirty.update(self.world.policies)
        self._wake.set()

    def mark(self, keys: set[tuple[str, str]]) -> None:
        self._dirty.update(keys)
        self._wake.set()

    def request_resync(self) -> None:
        """List existing objects again (on becoming leader, after API errors)."""
        self._resync = True
        self.mark_all()

    def on_commit(self, revision: int, keys: set[str]) -> None:
        if keys:
            self.mark(set(self.engine.policies_affected_by(keys)))
        else:
            self.mark_all()

    def set_report(self, node: str, report: NodeReport | None) -> None:
        if report is None:
            self.reports.pop(node, None)
        else:
            self.reports[node] = report
        self.mark_all()

    def replace_reports(self, reports: dict[str, NodeReport]) -> None:
        """All node reports as read afresh (after a watch failure): reports that
        vanished meanwhile (expired leases) must not linger."""
        if reports != self.reports:
            self.reports = dict(reports)
            self.mark_all()

    def status_deleted(self, name: str) -> None:
        """Someone deleted a status object: forget it so it is recreated."""
        self.existing.discard(name)
        self.written.pop(name, None)
        self.full_status.pop(name, None)
        self._wake.set()
        self.mark_all()

    # --- loop -----------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.interval)
            if not self.is_leader():
                self._resync = True
                continue
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("writing ClusterPolicyStatus failed (%s); retrying", exc)
                self._resync = True
                self._wake.set()
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        if self._resync:
            await self._resync_objects()
        dirty, self._dirty = self._dirty, set()
        for key in sorted(dirty):
            meta = self.world.policies.get(key)
            if meta is None:
                continue
            await self._write_one(meta)
            # facts() is CPU work (policy warnings); when no status changes nothing above awaits
            # I/O, so yield: a pass over every policy must not stall the syncer's commits.
            await asyncio.sleep(0)

    async def _resync_objects(self) -> None:
        listed = await self.kube.list_statuses()
        wanted = {cps_name(ns, name): meta for (ns, name), meta in self.world.policies.items()}
        for name, obj in listed.items():
            if name not in wanted and obj.get("metadata", {}).get("labels", {}).get(
                "app.kubernetes.io/managed-by"
            ) == "netfence":
                await self.kube.delete_status(name)
                self.api_writes += 1
        self.existing = {n for n in listed if n in wanted}
        self.written = {
            n: s for n in self.existing if (s := strip_times(listed[n].get("status"))) is not None
        }
        self.full_status = {n: listed[n]["status"] for n in self.existing if listed[n].get("status")}
        self._last_spec = {n: listed[n].get("spec", {}) for n in self.existing}
        self._resync = False
        self._dirty.update(self.world.policies)

    def facts(self, meta: PolicyMeta) -> PolicyFacts:
        view = self.engine.policy_view(meta.namespace, meta.name)
        warnings: list[str] = []
        error = self.world.policy_errors.get((meta.namespace, meta.name))
        if error:
            warnings.append(f"invalid policy, not compiled: {error}")
        if view is None:
            return PolicyFacts(meta.namespace, meta.name, meta.generation, frozenset(), 0, 0, tuple(warnings))
        revision = max((self.key_revisions.get(k, 0) for k in view.relevant_keys), default=0)
        warnings.extend(view.warnings)
        return PolicyFacts(
            namespace=meta.namespace,
            name=meta.name,
            generation=meta.generation,
            required_nodes=frozenset(view.nodes),
            endpoints=len(view.endpoints),
            revision=revision,
            warnings=tuple(warnings),
        )

    async def _write_one(self, meta: PolicyMeta) -> None:
        name = cps_name(meta.namespace, meta.name)
        spec = {
            "policy": {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid},
            "policyRef": f"{meta.namespace}/{meta.name}",
            "generation": meta.generation,
        }
        if name not in self.existing:
            try:
                await self.kube.create_status(name, spec)
            except ApiException as exc:
                log.warning("creating ClusterPolicyStatus %s failed: %s", name, exc.reason)
                raise
            self.api_writes += 1
            self.existing.add(name)
            self.written.pop(name, None)
            self._last_spec[name] = spec
        elif self._last_spec.get(name) != spec:
            await self.kube.patch_spec(name, spec)
            self.api_writes += 1
            self._last_spec[name] = spec
        status = compute_status(self.facts(meta), self.reports)
        if self.written.get(name) == status:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        full = with_transition_times(status, self.full_status.get(name), now)
        if not await self.kube.patch_status(name, full):
            self.existing.discard(name)
            self._dirty.add((meta.namespace, meta.name))
            self._wake.set()
            return
        self.api_writes += 1
        self.written[name] = status
        self.full_status[name] = full

    async def delete(self, namespace: str, name: str) -> None:
        cps = cps_name(namespace, name)
        if not self.is_leader():
            return
        await self.kube.delete_status(cps)
        self.api_writes += 1
        self.existing.discard(cps)
        self.written.pop(cps, None)
        self.full_status.pop(cps, None)
        self._last_spec.pop(cps, None)
