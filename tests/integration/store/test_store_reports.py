"""Lease-bound node reports and the lease keeper on a real etcd."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from etcd3aio import Etcd3Client

from netfence.store.etcd import EtcdStore
from netfence.store.lease import LeaseKeeper

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[EtcdStore]]
TTL = 2


def report(node: str, revision: int) -> dict[str, object]:
    return {"schema": 1, "node": node, "appliedRevision": revision, "rules": 3, "lastError": None}


async def test_report_expires_with_its_lease(store: EtcdStore) -> None:
    lease = await store.grant_lease(TTL)
    written = await store.put_report("n1", report("n1", 7), lease)
    reports = await store.read_reports()
    assert dict(reports) == {"n1": report("n1", 7)}
    assert reports.mod_revisions == {"n1": written}
    assert reports.revision >= written

    async def gone() -> tuple[str, object]:
        async for node, data in store.watch_reports(reports.revision):
            return node, data
        raise AssertionError("watch ended")

    start = time.monotonic()
    assert await asyncio.wait_for(gone(), TTL + 5) == ("n1", None)
    took = time.monotonic() - start
    assert TTL - 0.5 < took < TTL + 2, f"report vanished after {took:.2f}s"
    assert dict(await store.read_reports()) == {}


async def test_watch_reports_sees_updates_and_skips_corrupt(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    lease = await store.grant_lease(30)
    seen: list[tuple[str, object]] = []
    start = (await store.read_reports()).revision  # the watch replays everything after it

    async def watch(count: int) -> None:
        async for event in store.watch_reports(start):
            seen.append(event)
            if len(seen) == count:
                return

    task = asyncio.create_task(watch(3))
    await store.put_report("n1", report("n1", 1), lease)
    await etcd_client.kv.put(store.layout.key(store.layout.node_status("n2")), b"not json")
    await store.put_report("n1", report("n1", 2), lease)
    await asyncio.wait_for(task, 10)
    assert seen == [("n1", report("n1", 1)), ("n2", None), ("n1", report("n1", 2))]
    assert dict(await store.read_reports()) == {"n1": report("n1", 2)}  # n2 is skipped
    await store.revoke_lease(lease)
    await store.revoke_lease(lease)  # already gone: fine
    assert dict(await store.read_reports()) == {}


async def test_lease_keeper_keeps_and_regrants(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    regranted: list[int] = []
    republished = asyncio.Event()

    async def republish(lease_id: int) -> None:
        regranted.append(lease_id)
        await store.put_report("n1", report("n1", 2), lease_id)
        republished.set()

    async with LeaseKeeper(store, TTL, on_new_lease=republish, revoke_on_exit=True) as keeper:
        first = keeper.lease_id
        await store.put_report("n1", report("n1", 1), first)
        await asyncio.sleep(2.5 * TTL)  # far past the TTL
        assert keeper.alive and keeper.lease_id == first
        assert dict(await store.read_reports()) == {"n1": report("n1", 1)}

        await etcd_client.lease.revoke(first)  # as if it had expired during an outage
        await asyncio.wait_for(republished.wait(), TTL + 3)
        assert keeper.alive and keeper.lease_id == regranted[0] != first
        assert dict(await store.read_reports()) == {"n1": report("n1", 2)}
    assert not keeper.alive
    assert dict(await store.read_reports()) == {}  # revoked on exit


async def test_keep_lease_reports_loss(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    lease = await store.grant_lease(TTL)
    async with store.keep_lease(lease, TTL) as keeper:
        await asyncio.sleep(TTL * 1.5)
        assert keeper.alive
        await etcd_client.lease.revoke(lease)
        await asyncio.wait_for(keeper.lost.wait(), TTL + 2)
        assert not keeper.alive and keeper.lease_id == lease  # it does not re-grant
