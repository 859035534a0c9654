"""The syncer's orchestration on the in-memory store (tests/fakes/store.py): leader loss in the middle
of a multi-transaction change, and coalescing of engine notifications."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.fakes.store import FakeCommittedReader, FakeLeadership, FakeStore, MemoryEtcd, Txn

from netfence.controller.syncer import EtcdSyncer
from netfence.model.compiler import ModelEngine
from netfence.model.policy import policy_from_k8s
from netfence.model.world import namespace_from_k8s, pod_from_k8s
from netfence.store import layout as L
from netfence.store.errors import NotLeaderError
from netfence.store.types import CommitBatch, Fence


def web_pod(name: str, ip: str, node: str = "n1") -> Any:
    return pod_from_k8s({"metadata": {"namespace": "a", "name": name, "labels": {"app": "web"}},
                         "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip}})


def engine(pods: int = 1) -> ModelEngine:
    e = ModelEngine()
    e.set_namespace(namespace_from_k8s({"metadata": {"name": "a"}}))
    e.set_policy(policy_from_k8s({"metadata": {"namespace": "a", "name": "web"},
                                  "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}}))
    for i in range(pods):
        e.set_pod(web_pod(f"w{i}", f"10.0.0.{i + 1}"))
    return e


def add_pods(e: ModelEngine, first: int, count: int) -> None:
    for i in range(first, first + count):
        e.set_pod(web_pod(f"w{i}", f"10.1.{i // 200}.{i % 200 + 1}"))


def committed_view(values: dict[str, bytes]) -> dict[str, Any]:
    """Committed model keys, decoded (meta/ left out: it carries bookkeeping)."""
    return {k: json.loads(v) for k, v in values.items() if not k.startswith("meta/")}


def desired_view(e: ModelEngine) -> dict[str, Any]:
    return {k: json.loads(L.encode(v)) for k, v in e.desired().items()}


@contextlib.asynccontextmanager
async def running(*syncers: EtcdSyncer) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in syncers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def following(reader: FakeCommittedReader, after: int) -> AsyncIterator[list[CommitBatch]]:
    """Collect every commit batch a reader (an agent) receives."""
    batches: list[CommitBatch] = []

    async def follow() -> None:
        async for batch in reader.follow_commits(after):
            batches.append(batch)

    task = asyncio.create_task(follow())
    try:
        yield batches
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def hand_over_at(etcd: MemoryEtcd, writer: str, index: int, successor: str) -> list[Fence]:
    """Before ``writer``'s transaction ``index`` of a change, the leader key goes (its lease expired) and
    ``successor`` is elected; its fence is put in the returned list."""
    fences: list[Fence] = []

    async def hook(txn: Txn) -> None:
        if txn.writer == writer and txn.index == index and txn.total > index:
            etcd.before_txn = None
            etcd.depose()
            fences.append(etcd.elect(successor))

    etcd.before_txn = hook
    return fences


def syncer(e: ModelEngine, store: FakeStore, leadership: FakeLeadership, coalesce: float = 0.0) -> EtcdSyncer:
    return EtcdSyncer(e, store, leadership, observed=dict, coalesce_seconds=coalesce)


async def test_leader_loss_mid_change_leaves_it_uncommitted_and_the_next_leader_completes_it() -> None:
    etcd = MemoryEtcd(max_ops_per_txn=4)
    lead_a = FakeLeadership(etcd.elect("A"))
    world_a = engine()
    syncer_a = syncer(world_a, FakeStore(etcd, "A"), lead_a)
    reader = FakeCommittedReader(etcd)
    async with running(syncer_a):
        await etcd.until(lambda: etcd.commit_revision() > 0)
        before = await reader.committed_snapshot()
        assert committed_view(before.values) == desired_view(world_a)

        fences = hand_over_at(etcd, "A", 1, "B")
        async with following(reader, before.revision) as batches:
            add_pods(world_a, 100, 10)  # ten endpoint keys: three transactions of at most four
            syncer_a.notify()
            await etcd.until(lambda: any(not t.ok for t in etcd.txns))

            # A's first transaction went in (with `pending`), the second was refused by the fence.
            mine = [t for t in etcd.txns if t.writer == "A"][-2:]
            assert [(t.index, t.total, t.ok) for t in mine] == [(0, 3, True), (1, 3, False)]
            assert L.PENDING in etcd.keys and etcd.commit_revision() == before.commit_revision
            # Readers see nothing of it: the snapshot is the one before, no batch was delivered.
            now = await reader.committed_snapshot()
            assert now.values == before.values and now.commit_revision == before.commit_revision
            assert batches == []
            assert syncer_a.commit_revision == before.commit_revision

            # A learns it lost; B (who sees the same world) takes over and reconciles.
            lead_a.step_down()
            world_b = engine()
            add_pods(world_b, 100, 10)
            syncer_b = syncer(world_b, FakeStore(etcd, "B"), FakeLeadership(fences[0]))
            async with running(syncer_b):
                await etcd.until(lambda: L.PENDING not in etcd.keys and etcd.commit_revision() > now.revision)
                after = await reader.committed_snapshot()
                assert committed_view(after.values) == desired_view(world_b)
                assert json.loads(etcd.keys[L.COMMIT].value)["controller"] == "B"
                # The follower got the whole change in one batch, A's half included, at B's commit.
                await etcd.until(lambda: bool(batches))
                [batch] = batches
                assert batch.commit_revision == after.commit_revision
                new_endpoints = {f"endpoints/n1/a/w{i}" for i in range(100, 110)}
                assert new_endpoints <= batch.changes.keys()
        assert [t for t in etcd.txns if t.writer == "A"][-1] == mine[-1]  # A wrote nothing after the refusal


async def test_a_change_cut_short_with_nothing_left_to_write_is_still_committed_by_the_next_leader() -> None:
    """A deposed leader rewrote unchanged values (a reconcile after foreign writes) and was cut off before
    its commit: the stored values already match, but the stale `pending` would hide every later state
    from snapshots, so the next leader's reconcile commits anyway."""
    etcd = MemoryEtcd(max_ops_per_txn=2)
    world = engine(pods=5)
    fence_a = etcd.elect("A")
    store_a = FakeStore(etcd, "A")
    async with running(syncer(world, store_a, FakeLeadership(fence_a))):
        await etcd.until(lambda: etcd.commit_revision() > 0)
    committed = etcd.commit_revision()
    same = {k: v for k, v in etcd.values().items() if k.startswith("endpoints/")}
    assert len(same) == 5
    fences = hand_over_at(etcd, "A", 1, "B")
    with pytest.raises(NotLeaderError) as refused:
        await store_a.write(same, fence_a)
    assert refused.value.partial
    assert L.PENDING in etcd.keys and etcd.commit_revision() == committed

    syncer_b = syncer(engine(pods=5), FakeStore(etcd, "B"), FakeLeadership(fences[0]))
    async with running(syncer_b):
        await etcd.until(lambda: L.PENDING not in etcd.keys)
    assert etcd.commit_revision() > committed
    assert etcd.changes_written[-1] == {}  # only a commit marker: nothing else differed
    snapshot = await FakeCommittedReader(etcd).committed_snapshot()
    assert snapshot.commit_revision == etcd.commit_revision()


async def test_a_burst_of_notifications_is_written_as_one_change() -> None:
    etcd = MemoryEtcd()
    world = engine()
    sync = syncer(world, FakeStore(etcd, "A"), FakeLeadership(etcd.elect("A")), coalesce=0.05)
    async with running(sync):
        await etcd.until(lambda: etcd.commit_revision() > 0)
        written = len(etcd.changes_written)
        for i in range(20):
            add_pods(world, 200 + i, 1)
            sync.notify()
        await etcd.until(lambda: len(etcd.changes_written) > written)
        [change] = etcd.changes_written[written:]
        assert {f"endpoints/n1/a/w{i}" for i in range(200, 220)} <= change.keys()
        assert world.drain_changes() == {}  # nothing left over for another write


async def test_notifications_during_a_write_are_coalesced_into_the_next_one() -> None:
    etcd = MemoryEtcd()
    world = engine()
    sync = syncer(world, FakeStore(etcd, "A"), FakeLeadership(etcd.elect("A")), coalesce=0.01)
    async with running(sync):
        await etcd.until(lambda: etcd.commit_revision() > 0)
        written = len(etcd.changes_written)
        release = asyncio.Event()
        held = asyncio.Event()

        async def hold(txn: Txn) -> None:
            held.set()
            await release.wait()

        etcd.before_txn = hold
        add_pods(world, 300, 1)
        sync.notify()
        await asyncio.wait_for(held.wait(), 5)  # the first change is being written
        etcd.before_txn = None
        for i in range(301, 311):
            add_pods(world, i, 1)
            sync.notify()
        release.set()
        await etcd.until(lambda: len(etcd.changes_written) >= written + 2)
        first, second = etcd.changes_written[written:written + 2]
        assert "endpoints/n1/a/w300" in first and "endpoints/n1/a/w301" not in first
        assert {f"endpoints/n1/a/w{i}" for i in range(301, 311)} <= second.keys()
        assert sync.commit_revision == etcd.commit_revision()
        assert world.drain_changes() == {}
        assert len(etcd.changes_written) == written + 2


async def test_an_isolated_change_pays_no_window_and_one_right_after_a_write_waits_for_it() -> None:
    etcd = MemoryEtcd()
    world = engine()
    sync = syncer(world, FakeStore(etcd, "A"), FakeLeadership(etcd.elect("A")), coalesce=30.0)
    waits: list[float] = []

    async def window(delay: float) -> None:  # records the window instead of sleeping it
        waits.append(delay)

    sync.coalesce_sleep = window
    async with running(sync):
        await etcd.until(lambda: etcd.commit_revision() > 0)
        assert waits == [30.0]  # the first reconcile gathered its triggers for a whole window
        waits.clear()
        sync._last_write = -float("inf")  # idle for longer than any window
        written = len(etcd.changes_written)
        add_pods(world, 400, 1)
        sync.notify()
        await etcd.until(lambda: len(etcd.changes_written) > written)
        assert waits == []  # written at once
        add_pods(world, 401, 1)
        sync.notify()
        await etcd.until(lambda: len(etcd.changes_written) > written + 1)
        [delay] = waits  # the second change came right after a write: it waited out the window
        assert 29.0 < delay <= 30.0
        assert "endpoints/n1/a/w401" in etcd.changes_written[written + 1]
        waits.clear()
        sync.request_reconcile()  # a reconcile waits the whole window, however long the syncer idled
        sync._last_write = -float("inf")
        await etcd.until(lambda: waits == [30.0])
