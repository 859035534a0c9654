"""The controller's long-lived services, created at start-up and kept in Kopf's memo."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from netfence.config import ControllerConfig
from netfence.controller.kube import KubeApi
from netfence.controller.status_writer import StatusWriter
from netfence.controller.syncer import EtcdSyncer
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import NodeReport
from netfence.store.election import LeaderElection
from netfence.store.etcd import EtcdConfig, EtcdStore

log = logging.getLogger(__name__)


def etcd_config(config: ControllerConfig) -> EtcdConfig:
    settings = config.etcd
    return EtcdConfig(
        endpoints=list(settings.endpoints),
        prefix=settings.prefix,
        ca_file=settings.ca_file,
        cert_file=settings.cert_file,
        key_file=settings.key_file,
    )


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

    @classmethod
    async def start(cls, config: ControllerConfig) -> ControllerRuntime:
        kube = await KubeApi.connect(config.kubeconfig)
        store = EtcdStore(etcd_config(config), identity=config.identity)
        await store.connect()
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
            kube, engine, world, syncer.key_revisions, lambda: election.is_leader, config.status_interval
        )
        syncer.on_commit.append(status.on_commit)
        runtime = cls(config, kube, store, engine, world, election, syncer, status)
        # The world must be complete before this controller may write: list it all first.
        await runtime.full_resync()
        election.on_elected = runtime._on_elected
        election.on_lost = runtime._on_lost
        runtime.tasks = [
            asyncio.create_task(election.run(), name="leader-election"),
            asyncio.create_task(syncer.run(), name="etcd-syncer"),
            asyncio.create_task(status.run(), name="status-writer"),
            asyncio.create_task(runtime._watch_reports(), name="report-watch"),
            asyncio.create_task(runtime._periodic_resync(), name="periodic-resync"),
        ]
        return runtime

    async def full_resync(self) -> None:
        listing = await self.kube.list_world()
        self.world.replace_all(
            {
                "pods": listing.pods,
                "namespaces": listing.namespaces,
                "networkpolicies": listing.policies,
                "nodes": listing.nodes,
            }
        )
        self.syncer.notify()
        self.status.mark_all()

    async def _periodic_resync(self, period: float = 300.0) -> None:
        """Catch anything a watch missed (expired watches, API outages)."""
        while True:
            await asyncio.sleep(period)
            try:
                await self.full_resync()
            except Exception as exc:
                log.warning("periodic full listing failed: %s", exc)

    def _on_elected(self) -> None:
        log.info("%s is now the leader and writes to etcd", self.config.identity)
        self.syncer.request_reconcile()
        self.status.request_resync()

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
                await asyncio.sleep(1.0)

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
