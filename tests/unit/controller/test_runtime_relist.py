"""ControllerRuntime.relist: a listing is merged, what it removed leaves etcd and ClusterPolicyStatus."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from netfence.config import ControllerConfig
from netfence.controller.kube import KindListing
from netfence.controller.runtime import ControllerRuntime
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine


def policy(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": str(rv), "uid": name, "generation": 1},
            "spec": {"podSelector": {}}}


@dataclass
class FakeKube:
    listings: dict[str, KindListing] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    cluster_policies_served: bool | None = None

    async def list_kind(self, kind: str) -> KindListing:
        self.calls.append(kind)
        return self.listings.get(kind, KindListing([], 1))


@dataclass
class FakeSyncer:
    notified: int = 0

    def notify(self) -> None:
        self.notified += 1


@dataclass
class FakeStatus:
    removed: list[tuple[str, str]] = field(default_factory=list)
    marked_all: int = 0
    resyncs: int = 0
    full_resyncs: int = 0
    answers: int = 0

    def policies_removed(self, keys: list[tuple[str, str]]) -> None:
        self.removed.extend(keys)

    def mark_all(self) -> None:
        self.marked_all += 1

    def request_resync(self, full: bool = True) -> None:
        self.resyncs += 1
        self.full_resyncs += full

    def api_answers(self) -> None:
        self.answers += 1


def runtime() -> tuple[ControllerRuntime, FakeKube, FakeSyncer, FakeStatus]:
    kube, syncer, status = FakeKube(), FakeSyncer(), FakeStatus()
    engine = ModelEngine()
    rt = ControllerRuntime(ControllerConfig(), kube, None, engine, WorldTracker(engine), None,  # type: ignore[arg-type]
                           syncer, status)  # type: ignore[arg-type]
    return rt, kube, syncer, status


async def test_a_listing_removes_what_is_gone_and_its_status() -> None:
    rt, kube, syncer, status = runtime()
    rt.world.apply("networkpolicies", "ADDED", policy("kept", 3))
    rt.world.apply("networkpolicies", "ADDED", policy("deleted-in-a-gap", 4))
    rt.warnings_posted[("ns", "deleted-in-a-gap")] = ("w",)
    kube.listings["networkpolicies"] = KindListing([policy("kept", 3)], 9)
    result = await rt.relist("networkpolicies")
    assert result.removed == (("ns", "deleted-in-a-gap"),)
    assert set(rt.world.policies) == {("ns", "kept")}
    assert status.removed == [("ns", "deleted-in-a-gap")] and ("ns", "deleted-in-a-gap") not in rt.warnings_posted
    assert syncer.notified == 1 and status.marked_all == 1
    assert rt.relists["networkpolicies"] == 1


async def test_an_unchanged_or_stale_listing_notifies_nobody() -> None:
    rt, kube, syncer, status = runtime()
    kube.listings["pods"] = KindListing([], 9)
    await rt.relist("pods")
    kube.listings["pods"] = KindListing([], 5)  # older than the one merged
    assert (await rt.relist("pods")).stale
    assert syncer.notified == 0 and status.marked_all == 0 and status.removed == []
    assert rt.relists["pods"] == 2


async def test_jobs_per_kind() -> None:
    rt, kube, _, status = runtime()
    await rt._relist_job("clusterpolicystatuses")
    # the status writer lists its own objects; a re-list computes again only what changed
    assert status.resyncs == 1 and status.full_resyncs == 0 and kube.calls == []
    await rt._relist_job("pods")
    assert status.answers == 2  # failed status writes are retried at once
    kube.calls.clear()
    await rt.full_resync()
    assert kube.calls == ["pods", "namespaces", "networkpolicies", "nodes", "clusternetworkpolicies"]


async def test_a_cluster_policy_crd_installed_after_start_is_polled() -> None:
    """Kopf's watches are fixed at start: a ClusterNetworkPolicy CRD that appears later is
    listed every ``late_crd_poll_seconds`` (and said once), its objects merged like any listing."""
    rt, kube, _, _ = runtime()
    rt.late_crd_poll_seconds = 0.01
    kube.cluster_policies_served = False
    await rt.relist("clusternetworkpolicies")  # start-up: no CRD
    assert rt.cluster_policies_at_start is False and rt.tasks == []
    kube.cluster_policies_served = True  # installed meanwhile
    kube.listings["clusternetworkpolicies"] = KindListing([{
        "metadata": {"name": "deny", "resourceVersion": "7", "uid": "u", "generation": 1},
        "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
    }], 7)
    relists = asyncio.create_task(rt.relister.run())
    try:
        await rt.relist("clusternetworkpolicies")  # e.g. the periodic one
        assert ("", "deny") in rt.world.policies
        [poll] = rt.tasks
        await rt.relist("clusternetworkpolicies")
        assert rt.tasks == [poll]  # one poll, said once
        before = kube.calls.count("clusternetworkpolicies")
        polled = asyncio.Event()
        listing = kube.list_kind

        async def counted(kind: str) -> KindListing:  # the poll's requests make the relister list the kind
            out = await listing(kind)
            if kube.calls.count("clusternetworkpolicies") >= before + 2:
                polled.set()
            return out

        kube.list_kind = counted  # type: ignore[method-assign]
        await asyncio.wait_for(polled.wait(), 10)
    finally:
        for task in [*rt.tasks, relists]:
            task.cancel()
        await asyncio.gather(*rt.tasks, relists, return_exceptions=True)


async def test_a_cluster_policy_crd_served_at_start_is_not_polled() -> None:
    rt, kube, _, _ = runtime()
    kube.cluster_policies_served = True
    await rt.relist("clusternetworkpolicies")
    await rt.relist("clusternetworkpolicies")
    assert rt.cluster_policies_at_start is True and rt.tasks == []
