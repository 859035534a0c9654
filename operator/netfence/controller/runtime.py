"""The controller's long-lived services, created at start-up and kept in Kopf's memo."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from netfence.config import ControllerConfig
from netfence.controller.kube import CPS_PLURAL, KubeApi
from netfence.controller.metrics import ControllerMetrics
from netfence.controller.relist import KindRelister
from netfence.controller.status_writer import StatusWriter
from netfence.controller.syncer import EtcdSyncer
from netfence.controller.world import CLUSTER_POLICIES, KINDS, MergeResult, WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import NodeReport
from netfence.store.connection import Backoff
from netfence.store.election import LeaderElection
from netfence.store.errors import StoreError
from netfence.store.etcd import EtcdStore

log = logging.getLogger(__name__)


async def _connect_store(store: EtcdStore) -> None:
    """Connect to etcd, retrying every second at most until it answers (a controller pod
    started before etcd's Service name resolves or etcd is up starts within about a
    second of it answering, not after Kopf's 60 s start-up handler retry)."""
    backoff = Backoff()  # 0.2 s doubling, at most RETRY_BACKOFF_MAX (1 s)
    while True:
        try:
            await store.connect()
            return
        except StoreError as exc:
            log.warning("etcd unavailable at start (%s); retrying", exc)
            await store.pause(backoff.next())  # ends early once the channel connects


@dataclass
class ControllerRuntime:
    config: ControllerConfig
    kube: KubeApi
    store: EtcdStore
    engine: ModelEngine
    world: WorldTracker
    election: LeaderElection
    syncer: EtcdSyncer
    status: StatusWriter
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    warnings_posted: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # Listings merged per kind (start-up, watch re-lists, leadership, periodic); for metrics.
    relists: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    metrics: ControllerMetrics = field(default_factory=ControllerMetrics)  # /metrics (controller/metrics.py)
    relister: KindRelister = field(init=False)
    # Whether the ClusterNetworkPolicy CRD was served when this controller started (Kopf's watches
    # are fixed then: a CRD installed later is only polled, see _note_cluster_policy_crd).
    cluster_policies_at_start: bool | None = None
    late_crd_poll_seconds: float = 10.0
    _late_crd_poll: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # ClusterPolicyStatus is not compiled: a re-list of it makes the status writer
        # list its objects again (recreating ones deleted during a watch gap).
        self.relister = KindRelister(self._relist_job, (*KINDS, CPS_PLURAL))

    @classmethod
    async def start(cls, config: ControllerConfig, metrics: ControllerMetrics | None = None) -> ControllerRuntime:
        kube = await KubeApi.connect(config.kubeconfig)
        store = EtcdStore(config.etcd, identity=config.identity)
        await _connect_store(store)
        engine = ModelEngine()
        world = WorldTracker(engine)
        election = LeaderElection(store, config.identity, ttl=config.lease_ttl)
        syncer = EtcdSyncer(
            engine,
            store,
            election,
            observed=lambda: world.observed,
            coalesce_seconds=config.coalesce_seconds,
            reconcile_seconds=config.reconcile_seconds,
            target_schema=config.target_schema,
        )
        status = StatusWriter(
            kube, engine, world, syncer.key_revisions, lambda: election.is_leader, config.status_interval,
            settle=config.status_settle,
            concurrency=config.status_concurrency, mark_all_on_report=config.baseline_status,
        )
        syncer.on_commit.append(status.on_commit)
        runtime = cls(config, kube, store, engine, world, election, syncer, status,
                      metrics=metrics if metrics is not None else ControllerMetrics())
        runtime.metrics.bind(runtime)
        # The world must be complete before this controller may write: list it all first.
        try:
            await runtime.full_resync()
        except BaseException:
            # Kopf retries the start-up: leave nothing bound or open for the next attempt.
            runtime.metrics.unbind(runtime)
            await runtime.stop()
            raise
        election.on_elected = runtime._on_elected
        election.on_lost = runtime._on_lost
        runtime.tasks = [
            asyncio.create_task(election.run(), name="leader-election"),
            asyncio.create_task(syncer.run(), name="etcd-syncer"),
            asyncio.create_task(status.run(), name="status-writer"),
            asyncio.create_task(runtime._watch_reports(), name="report-watch"),
            asyncio.create_task(runtime._periodic_resync(), name="periodic-resync"),
            asyncio.create_task(runtime.relister.run(), name="relister"),
        ]
        return runtime

    async def full_resync(self) -> None:
        """List every kind afresh and merge each listing (at start-up: before any write)."""
        self.metrics.full_relist("startup")
        for kind in KINDS:
            await self.relist(kind)
        self.syncer.notify()
        self.status.mark_all()

    async def relist(self, kind: str) -> MergeResult:
        """List one kind and merge it: what is gone is removed, nothing newer is lost or undone."""
        listing = await self.kube.list_kind(kind)
        if kind == CLUSTER_POLICIES:
            self._note_cluster_policy_crd()
        result = self.world.merge_listing(kind, listing.items, listing.resource_version)
        self.relists[kind] += 1
        if result.stale:
            log.debug("listing of %s at %d is not newer than the last merged one", kind, result.resource_version)
            return result
        if result.removed:
            log.info("listing of %s at %d: %d objects gone without a delete event (%s), %d updated",
                     kind, result.resource_version, len(result.removed),
                     ", ".join("/".join(filter(None, key)) for key in result.removed[:10]), result.applied)
        else:
            log.log(logging.INFO if result.applied else logging.DEBUG, "listing of %s at %d: %d updated",
                    kind, result.resource_version, result.applied)
        if result.changed:
            self.syncer.notify()
            self.status.mark_all()
        if kind in ("networkpolicies", CLUSTER_POLICIES) and result.removed:
            self.policies_removed(result.removed)
        return result

    def _note_cluster_policy_crd(self) -> None:
        """The ClusterNetworkPolicy CRD appeared after start-up: Kopf does not watch the kind (its
        watches are set when it starts; scanning is off), so say so once and list the kind every
        ``late_crd_poll_seconds`` until the controller restarts (changes then take that long)."""
        served = getattr(self.kube, "cluster_policies_served", None)
        if served is None:
            return
        if self.cluster_policies_at_start is None:
            self.cluster_policies_at_start = served
            return
        if served and not self.cluster_policies_at_start and self._late_crd_poll is None:
            log.warning("the ClusterNetworkPolicy CRD was installed after this controller started: its objects "
                        "are listed every %.0f s instead of watched until the controller restarts "
                        "(kubectl rollout restart deployment of the controller)", self.late_crd_poll_seconds)
            self._late_crd_poll = asyncio.create_task(self._poll_cluster_policies(), name="cluster-policy-poll")
            self.tasks.append(self._late_crd_poll)

    async def _poll_cluster_policies(self) -> None:
        while True:
            await asyncio.sleep(self.late_crd_poll_seconds)
            self.relister.request(CLUSTER_POLICIES, "CRD installed after start")

    def policies_removed(self, keys: Iterable[tuple[str, str]]) -> None:
        """NetworkPolicies are gone (delete event or listing): their ClusterPolicyStatus objects go
        (the status writer deletes them, retrying on errors)."""
        keys = list(keys)
        for key in keys:
            self.warnings_posted.pop(key, None)
        self.status.policies_removed(keys)

    def watch_listed(self, kind: str) -> None:
        """Kopf (re)listed ``kind`` after (re)connecting its watch (an event with ``type`` None):
        events may have been missed, deletions in particular, which a re-list does not report.
        Reconcile the kind against a listing of our own (debounced: one per burst)."""
        if not self.relister.pending(kind):  # the first event of a burst (metrics)
            self.metrics.watch_restarted(kind)
        self.relister.request(kind, "watch re-listed")

    async def _relist_job(self, kind: str) -> None:
        if kind == CPS_PLURAL:
            self.status.request_resync(full=False)
        else:
            await self.relist(kind)
        # The API server answers: status writes that failed meanwhile (an outage) go now,
        # not after their per-object backoff.
        self.status.api_answers()

    async def _periodic_resync(self, period: float = 300.0) -> None:
        """Backstop: reconcile every kind against a fresh listing now and then."""
        while True:
            await asyncio.sleep(period)
            self.metrics.full_relist("periodic")
            for kind in KINDS:
                self.relister.request(kind, "periodic")

    def _on_elected(self) -> None:
        log.info("%s is now the leader and writes to etcd", self.config.identity)
        self.syncer.request_reconcile()
        self.status.request_resync()
        self.metrics.full_relist("elected")
        # A standby's watches may have had gaps nobody acted on: reconcile every kind.
        for kind in KINDS:
            self.relister.request(kind, "elected")

    def _on_lost(self) -> None:
        log.warning("%s lost leadership; writes stop", self.config.identity)

    async def _watch_reports(self) -> None:
        while True:
            try:
                reports = await self.store.read_reports()
                self.status.replace_reports({node: NodeReport.from_json(data, node) for node, data in reports.items()})
                for gone in set(self.syncer.agent_schemas) - set(reports):
                    self.syncer.set_agent_report(gone, None)
                for node, data in reports.items():
                    self.syncer.set_agent_report(node, data)
                async for node, update in self.store.watch_reports(after_revision=reports.revision):
                    self.status.set_report(node, None if update is None else NodeReport.from_json(update, node))
                    self.syncer.set_agent_report(node, update)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching node reports failed (%s); retrying", exc)
                await self.store.pause(1.0)  # ends early once etcd is reachable again

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.election.resign(), 3)
        for task in self.tasks:
            task.cancel()
        # Bounded: a gRPC stream stuck in cancellation must not hold up shutdown
        # (the leader key is already released above, so the handover is done).
        _, stuck = await asyncio.wait(self.tasks, timeout=3.0)
        for task in stuck:
            log.warning("task %s did not stop within 3s; exiting anyway", task.get_name())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.close(), 3.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.kube.close(), 3.0)
