"""Commits and node reports flowing into the status writer (syncer -> on_commit, reports via the
ReportStore fake): a ClusterPolicyStatus is written only when its own status changes.

(The writer's per-object behaviour against the API server is in tests/unit/status/test_status_writer.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tests.fakes.store import FakeLeadership, FakeStore, MemoryEtcd
from tests.unit.status.test_status_writer import FakeKube

from netfence.controller.status_writer import StatusWriter
from netfence.controller.syncer import EtcdSyncer
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import NodeReport

NODE = "n1"


def policy(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}", "generation": 1,
                         "resourceVersion": str(rv)},
            "spec": {"podSelector": {"matchLabels": {"app": name}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": f"client-{name}"}}}]}]}}


def pod(name: str, app: str, ip: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "labels": {"app": app}, "resourceVersion": str(rv)},
            "spec": {"nodeName": NODE}, "status": {"podIP": ip, "phase": "Running"}}


class Controller:
    """The leader's syncer and status writer wired as the runtime wires them, on fakes."""

    def __init__(self) -> None:
        self.etcd = MemoryEtcd()
        self.store = FakeStore(self.etcd, "controller")
        self.world = WorldTracker(ModelEngine())
        self.world.apply("namespaces", "ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
        self.world.apply("networkpolicies", "ADDED", policy("a", 2))
        self.world.apply("networkpolicies", "ADDED", policy("b", 3))
        self.world.apply("pods", "ADDED", pod("pa", "a", "10.0.0.1", 4))
        self.world.apply("pods", "ADDED", pod("pb", "b", "10.0.0.2", 5))
        self.syncer = EtcdSyncer(self.world.engine, self.store, FakeLeadership(self.etcd.elect("controller")),
                                 observed=dict, coalesce_seconds=0)
        self.kube = FakeKube()
        self.status = StatusWriter(self.kube, self.world.engine, self.world,  # type: ignore[arg-type]
                                   self.syncer.key_revisions, lambda: True, interval=0.0)
        self.syncer.on_commit.append(self.status.on_commit)
        self.commits: list[int] = []  # every on_commit (reconciles that write nothing too)
        self.syncer.on_commit.append(self._committed)
        self.agent_lease = self.etcd.grant(10)

    def _committed(self, revision: int, keys: set[str]) -> None:
        self.commits.append(revision)
        self.etcd.notify()

    async def committed(self, after: int) -> int:
        await self.etcd.until(lambda: bool(self.commits) and self.commits[-1] > after)
        return self.commits[-1]

    async def report(self, applied: int, lease: int | None = None) -> None:
        """The agent reports; the controller's report watch hands it to the status writer."""
        await self.store.put_report(NODE, {"schema": 1, "node": NODE, "appliedRevision": applied,
                                           "lastError": None, "time": "t"}, lease or self.agent_lease)
        await self.etcd.until(lambda: (r := self.status.reports.get(NODE)) is not None
                              and r.applied_revision == applied)

    async def watch_reports(self) -> None:  # as ControllerRuntime._watch_reports does
        reports = await self.store.read_reports()
        self.status.replace_reports({n: NodeReport.from_json(d, n) for n, d in reports.items()})
        async for node, update in self.store.watch_reports(after_revision=reports.revision):
            self.status.set_report(node, None if update is None else NodeReport.from_json(update, node))

    def writes(self, name: str) -> int:
        return self.kube.count("patch_status", f"ns.{name}")

    def phase(self, name: str) -> str:
        return str(self.kube.objects[f"ns.{name}"]["status"]["phase"])


@contextlib.asynccontextmanager
async def running(c: Controller) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c.syncer.run()), asyncio.create_task(c.watch_reports())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_status_is_written_only_for_policies_whose_status_changes() -> None:
    c = Controller()
    async with running(c):
        first = await c.committed(0)
        await c.status.flush()
        assert c.phase("a") == c.phase("b") != "Enforced"  # n1 has not applied it yet
        await c.report(first)
        await c.status.flush()
        assert c.phase("a") == c.phase("b") == "Enforced"
        writes_a, writes_b = c.writes("a"), c.writes("b")

        # A pod for policy a only: a goes unsynced until n1 applies the commit, b is untouched.
        c.world.apply("pods", "ADDED", pod("pa2", "a", "10.0.0.3", 6))
        c.syncer.notify()
        second = await c.committed(first)
        await c.status.flush()
        assert c.phase("a") != "Enforced" and c.writes("a") == writes_a + 1
        await c.report(second)  # n1's applied revision moves: only a's status changes
        await c.status.flush()
        assert c.phase("a") == "Enforced" and c.writes("a") == writes_a + 2
        assert c.writes("b") == writes_b

        # Nothing changes: a reconcile that writes nothing, the report again on a new lease.
        calls = len(c.kube.calls)
        reconciles = len(c.commits)
        c.syncer.request_reconcile()
        await c.etcd.until(lambda: len(c.commits) > reconciles)
        assert c.commits[-1] == second  # nothing written
        await c.status.flush()
        c.etcd.revoke(c.agent_lease)
        await c.etcd.until(lambda: NODE not in c.status.reports)
        await c.report(second, lease=c.etcd.grant(10))
        await c.status.flush()
        assert c.writes("a") == writes_a + 2 and c.writes("b") == writes_b
        assert [call for call in c.kube.calls[calls:] if call[0] != "list"] == []
