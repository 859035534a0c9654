"""Multi-transaction writes, commit markers and the committed snapshot, on a real etcd."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from etcd3aio import Etcd3Client

from netfence.store import layout as L
from netfence.store.errors import CorruptValueError
from netfence.store.etcd import EtcdStore

MakeStore = Callable[..., Awaitable[EtcdStore]]

pytestmark = pytest.mark.integration


def set_value(i: int) -> bytes:
    return L.encode({"id": f"s{i}", "kind": "net", "members": [f"10.0.{i // 250}.{i % 250}/32"]})


async def commit_events(store: EtcdStore, after: int, until: int) -> list[int]:
    """Revisions of the commit puts in (after, until]."""
    seen: list[int] = []

    async def collect() -> None:
        async for revision, changes in store.watch_changes(L.COMMIT, after, prefix=False):
            if changes.get(L.COMMIT) is not None:
                seen.append(revision)
            if revision >= until:
                return

    await asyncio.wait_for(collect(), 10)
    return seen


async def test_large_change_spans_transactions_and_ends_with_one_commit(store: EtcdStore) -> None:
    before = (await store.read_all()).revision
    changes = {f"sets/s{i}": set_value(i) for i in range(300)}
    revision = await store.write(changes, fence=None)

    # 300 ops at 120 per transaction: 3 transactions, 3 revisions, one commit marker, in the last
    assert revision == before + 3
    assert await commit_events(store, before, revision) == [revision]
    assert await store.commit_revision() == revision
    commit = L.decode((await store.get(L.COMMIT)).value, L.COMMIT)  # type: ignore[union-attr]
    assert commit["seq"] == 1 and commit["controller"] == "test-writer" and commit["schema"] == 1

    state = await store.committed_snapshot()
    assert state.commit_revision == revision
    assert state.values == changes
    snap = await store.read_all()
    assert not snap.pending and L.PENDING not in snap.values
    assert snap.commit_revision == revision
    assert {k: v for k, v in snap.values.items() if k.startswith("sets/")} == changes

    # deletes also span transactions; the sequence number grows by one per change
    second = await store.write({f"sets/s{i}": None for i in range(0, 300, 2)}, fence=None)
    state = await store.committed_snapshot()
    assert sorted(state.values) == sorted(f"sets/s{i}" for i in range(1, 300, 2))
    assert state.commit_revision == second
    assert L.decode((await store.get(L.COMMIT)).value)["seq"] == 2  # type: ignore[union-attr]


async def test_custom_transaction_size(make_store: MakeStore) -> None:
    store = await make_store("small-txns", max_ops_per_txn=7)
    before = (await store.read_all()).revision
    revision = await store.write({f"sets/s{i}": set_value(i) for i in range(20)}, fence=None)
    assert revision == before + 3  # ceil(20 / 7)
    assert len((await store.committed_snapshot()).values) == 20


async def test_empty_change_writes_nothing(store: EtcdStore) -> None:
    assert await store.write({}, fence=None) == 0
    first = await store.write({"sets/a": set_value(1)}, fence=None)
    before = (await store.read_all()).revision
    assert await store.write({}, fence=None) == first
    assert (await store.read_all()).revision == before


async def test_only_committed_keys_may_be_written(store: EtcdStore) -> None:
    for key in ("commit", "pending", "leader", "status/nodes/n1", "other"):
        with pytest.raises(ValueError, match="not a committed key"):
            await store.write({key: b"{}"}, fence=None)
    assert (await store.read_all()).values == {}


async def test_commit_only_clears_a_stale_pending_marker(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    await etcd_client.kv.put(store.layout.key(L.PENDING), L.encode({"seq": 9}))
    revision = await store.write_commit_only(fence=None)
    snap = await store.read_all()
    assert not snap.pending
    assert snap.commit_revision == revision


async def test_snapshot_hides_a_change_in_flight(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    """A change whose first transactions are written but whose commit is not: invisible."""
    old = {"sets/old": set_value(1), "policies/ns/p": L.encode({"sets": ["old"]})}
    committed = await store.write(old, None)
    # what a writer that died (or is slow) after its first transaction leaves behind
    first = await etcd_client.kv.txn(
        [],
        [
            etcd_client.kv.txn_op_put(store.layout.key(L.PENDING), L.encode({"seq": 2})),
            etcd_client.kv.txn_op_put(store.layout.key("policies/ns/p"), L.encode({"sets": ["new"]})),
            etcd_client.kv.txn_op_delete(store.layout.key("sets/old")),
        ],
    )
    # unrelated, uncommitted activity after it (reports, leader key)
    await etcd_client.kv.put(store.layout.key("status/nodes/n1"), L.encode({"node": "n1"}))

    state = await store.committed_snapshot()
    assert state.commit_revision == committed
    assert state.revision == first.header.revision - 1
    assert set(state.values) == {"sets/old", "policies/ns/p"}
    assert json.loads(state.values["policies/ns/p"])["sets"] == ["old"]

    # The reader follows from the snapshot and sees the change only once it commits: the watch
    # replays every revision after the snapshot (the half change, the report, the commit) in
    # order, so a batch for the half change would come first; the first batch is the commit's.
    async def first_batch() -> tuple[int, dict[str, bytes | None]]:
        async for batch in store.follow_commits(state.revision):
            return batch.commit_revision, batch.changes
        raise AssertionError("no batch")

    task = asyncio.create_task(first_batch())
    final = await store.write({"sets/new": set_value(2)}, None)
    assert await asyncio.wait_for(task, 10) == (
        final, {"policies/ns/p": L.encode({"sets": ["new"]}), "sets/old": None, "sets/new": set_value(2)}
    )
    state = await store.committed_snapshot()
    assert state.commit_revision == final
    assert set(state.values) == {"policies/ns/p", "sets/new"}


async def test_include_filters_snapshot_and_batches(store: EtcdStore) -> None:
    mine = store.layout.endpoint("n1", "ns", "a")
    other = store.layout.endpoint("n2", "ns", "b")
    initial = {mine: L.encode({"ip": "1"}), other: L.encode({"ip": "2"}), "sets/s": set_value(0)}
    await store.write(initial, None)

    def wants(rel: str) -> bool:
        return not rel.startswith("endpoints/") or rel.startswith(store.layout.endpoints_of("n1"))

    state = await store.committed_snapshot(include=wants)
    assert set(state.values) == {mine, "sets/s"}

    async def first_batch() -> dict[str, bytes | None]:
        async for batch in store.follow_commits(state.revision, include=wants):
            return batch.changes
        raise AssertionError("no batch")

    task = asyncio.create_task(first_batch())  # from the snapshot's revision: nothing after it is missed
    await store.write({other: None, mine: None}, None)
    assert await asyncio.wait_for(task, 10) == {mine: None}


async def test_corrupt_stored_value_is_reported_with_its_key(store: EtcdStore) -> None:
    await store.write({"sets/bad": b"{oops", "sets/noschema": b'{"id":"x"}'}, None)
    state = await store.committed_snapshot()
    for key in ("sets/bad", "sets/noschema"):
        with pytest.raises(CorruptValueError, match=key):
            L.decode(state.values[key], key)
