"""Writes outside a controller change are foreign: snapshots leave them out, followers report them."""

from __future__ import annotations

import asyncio

from etcd3aio import Etcd3Client

from netfence.store import layout as L
from netfence.store.etcd import EtcdStore
from netfence.store.types import CommitBatch


async def test_foreign_writes_are_reported_never_committed(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    assert etcd_client.kv is not None
    own = await store.write({"sets/a": L.encode({"v": 1}), "policies/ns/p": L.encode({"v": 1})}, None)
    own_txns: list[int] = []
    store.txn_listeners.append(own_txns.append)

    # A foreign put after the last commit: the snapshot leaves it out and names it.
    resp = await etcd_client.kv.put(store.layout.key("sets/a"), b"{garbage")
    foreign_rev = int(resp.header.revision)
    state = await store.committed_snapshot()
    assert state.commit_revision == own
    assert set(state.values) == {"policies/ns/p"} and state.foreign == {"sets/a": foreign_rev}
    assert state.mod_revisions == {"policies/ns/p": own}

    # A follower sees it at once (foreign_batches) and never as a change, then the next commit.
    batches: list[CommitBatch] = []
    done = asyncio.Event()

    async def follow() -> None:
        async for batch in store.follow_commits(state.commit_revision, foreign_batches=True):
            batches.append(batch)
            if batch.is_commit:
                done.set()
                return

    task = asyncio.create_task(follow())
    deleted = int((await etcd_client.kv.delete(store.layout.key("policies/ns/p"))).header.revision)
    committed = await store.write({"sets/b": L.encode({"v": 2})}, None)
    await asyncio.wait_for(done.wait(), 10)
    await task
    assert [b.is_commit for b in batches] == [False, False, True]
    assert batches[0].foreign == {"sets/a": foreign_rev} and batches[0].changes == {}
    assert batches[1].foreign == {"policies/ns/p": deleted}
    assert batches[2].changes == {"sets/b": L.encode({"v": 2})} and batches[2].commit_revision == committed
    assert batches[2].foreign == {"sets/a": foreign_rev, "policies/ns/p": deleted}
    assert own_txns == [committed]  # the writer learns the revision of each of its transactions
