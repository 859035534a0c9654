"""The committed-reader protocol under concurrent multi-transaction writes, and compaction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping

import pytest
from etcd3aio import Etcd3Client

from netfence.store import layout as L
from netfence.store.errors import CompactedError
from netfence.store.etcd import EtcdStore

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[EtcdStore]]

POLICIES = 4
SETS_PER_POLICY = 3
CHANGES = 240


@contextlib.contextmanager
def logged(logger: str, text: str) -> Iterator[asyncio.Event]:
    """An event set when ``logger`` (or a child) logs a message containing ``text`` (INFO and up)."""
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    target, handler = logging.getLogger(logger), Watch(logging.INFO)
    level = target.level
    target.setLevel(logging.INFO)
    target.addHandler(handler)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


def policy_change(j: int, gen: int, rng: random.Random) -> dict[str, bytes | None]:
    """Move policy j from generation gen-1 to gen: new sets, new policy, old sets deleted, shuffled."""
    new_sets = [f"s-p{j}-g{gen}-{k}" for k in range(SETS_PER_POLICY)]
    ops: list[tuple[str, bytes | None]] = [
        (f"policies/ns/p{j}", L.encode({"gen": gen, "sets": new_sets}))
    ]
    ops += [(f"sets/{sid}", L.encode({"members": [f"p{j}:g{gen}", "10.0.0.1"]})) for sid in new_sets]
    if gen > 0:
        ops += [(f"sets/s-p{j}-g{gen - 1}-{k}", None) for k in range(SETS_PER_POLICY)]
    rng.shuffle(ops)  # any order inside the change: only the commit makes it visible
    return dict(ops)


def violations(state: Mapping[str, bytes]) -> list[str]:
    """A policy needs all its sets with its generation's member; every set belongs to a policy."""
    problems: list[str] = []
    wanted: set[str] = set()
    for key, raw in state.items():
        if not key.startswith("policies/"):
            continue
        j = key.rsplit("/p", 1)[1]
        policy = json.loads(raw)
        for sid in policy["sets"]:
            wanted.add(sid)
            members = json.loads(state[f"sets/{sid}"])["members"] if f"sets/{sid}" in state else None
            if members is None or f"p{j}:g{policy['gen']}" not in members:
                problems.append(f"{key} gen {policy['gen']} lacks set {sid} ({members})")
    problems += [f"orphan {k}" for k in state if k.startswith("sets/") and k[5:] not in wanted]
    return problems


def apply(state: dict[str, bytes], changes: Mapping[str, bytes | None]) -> None:
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


async def test_committed_reader_never_sees_half_a_change(make_store: MakeStore) -> None:
    # 7-10 ops per policy change, bursts of 1-3 policies per change, 4 ops per txn: 2-8 txns per change
    writer = await make_store("writer", max_ops_per_txn=4)
    follower = await make_store("follower")
    snapshotter = await make_store("snapshotter")
    naive = await make_store("naive")
    rng = random.Random(7)

    initial: dict[str, bytes | None] = {}
    for j in range(POLICIES):
        initial.update(policy_change(j, 0, rng))
    await writer.write(initial, None)
    generation = [0] * POLICIES

    start = await follower.committed_snapshot()
    assert start.values and violations(start.values) == []
    done = asyncio.Event()
    commit_revisions: list[int] = []

    async def write_all() -> None:
        for _ in range(CHANGES):
            change: dict[str, bytes | None] = {}
            for j in rng.sample(range(POLICIES), rng.randint(1, 3)):
                generation[j] += 1
                change.update(policy_change(j, generation[j], rng))
            commit_revisions.append(await writer.write(change, None))
            if rng.random() < 0.2:
                await asyncio.sleep(0)  # bursts, with the odd pause
        done.set()

    follow_stats = {"commits": 0, "violations": 0, "last": 0}

    async def follow() -> None:
        state = dict(start.values)
        async for batch in follower.follow_commits(start.revision):
            apply(state, batch.changes)
            follow_stats["commits"] += 1
            follow_stats["violations"] += len(violations(state))
            follow_stats["last"] = batch.commit_revision

    snap_stats = {"snapshots": 0, "violations": 0}

    async def snapshots() -> None:
        while not done.is_set():
            snap = await snapshotter.committed_snapshot()
            snap_stats["snapshots"] += 1
            snap_stats["violations"] += len(violations(snap.values))

    naive_stats = {"revisions": 0, "violations": 0, "last": 0}

    async def naive_watch() -> None:
        """Applying every transaction as it comes (no commit markers) does show half changes."""
        state = dict(start.values)
        async for revision, changes in naive.watch_changes("", start.revision):
            apply(state, {k: v for k, v in changes.items() if L.is_committed_key(k)})
            naive_stats["revisions"] += 1
            naive_stats["violations"] += bool(violations(state))
            naive_stats["last"] = revision

    readers = [asyncio.create_task(follow()), asyncio.create_task(naive_watch())]
    try:
        await asyncio.wait_for(asyncio.gather(write_all(), snapshots()), 180)
        async with asyncio.timeout(30):
            while min(follow_stats["last"], naive_stats["last"]) < commit_revisions[-1]:
                for task in readers:
                    if task.done():
                        task.result()  # surface a reader's failure
                await asyncio.sleep(0.05)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    assert follow_stats["commits"] == CHANGES
    assert follow_stats["violations"] == 0
    assert snap_stats["snapshots"] >= 10 and snap_stats["violations"] == 0
    assert naive_stats["violations"] > 0, "the test must be able to see half changes"
    assert naive_stats["revisions"] > 2 * CHANGES  # every change really spanned several transactions
    final = await follower.committed_snapshot()
    assert final.commit_revision == commit_revisions[-1]
    assert violations(final.values) == []


async def test_follow_from_a_compacted_revision_raises(store: EtcdStore, etcd_client: Etcd3Client) -> None:
    first = await store.write({"sets/a": L.encode({"v": 1})}, None)
    await store.write({"sets/a": L.encode({"v": 2})}, None)
    last = await store.write({"sets/b": L.encode({"v": 3})}, None)
    await etcd_client.kv.compact(last, physical=True)

    async def consume() -> None:
        async for _batch in store.follow_commits(first):
            raise AssertionError("a batch from compacted history")

    with pytest.raises(CompactedError, match=f"revision {first + 1} has been compacted"):
        await asyncio.wait_for(consume(), 10)

    # the remedy: a fresh snapshot (read at the latest revision) and follow from it
    state = await store.committed_snapshot()
    assert state.commit_revision == last
    assert set(state.values) == {"sets/a", "sets/b"}


async def test_compacted_history_without_commits_is_skipped(
    store: EtcdStore, etcd_client: Etcd3Client
) -> None:
    """An idle controller, agents reporting, etcd compacting: followers must not loop on snapshots."""
    state = await store.committed_snapshot()
    committed = await store.write({"sets/a": L.encode({"v": 1})}, None)
    for i in range(5):
        resp = await etcd_client.kv.put(store.layout.key(store.layout.node_status("n1")), L.encode({"i": i}))
    await etcd_client.kv.compact(resp.header.revision, physical=True)

    batches: list[tuple[int, dict[str, bytes | None]]] = []

    async def follow(after: int, count: int) -> None:
        async for batch in store.follow_commits(after):
            batches.append((batch.commit_revision, batch.changes))
            if len(batches) == count:
                return

    # from the commit revision: the compacted part held no commit, so nothing is missed. The
    # follower must have skipped the compacted part (it says so) before the next commit: a
    # commit after its position would make the skip unsafe, and it would raise instead.
    with logged("netfence.store", "held no commit") as skipped:
        task = asyncio.create_task(follow(committed, 1))
        await asyncio.wait_for(skipped.wait(), 10)
    later = await store.write({"sets/b": L.encode({"v": 2})}, None)
    await asyncio.wait_for(task, 10)
    assert batches == [(later, {"sets/b": L.encode({"v": 2})})]

    # from before the first commit: that commit is compacted away, so it must raise
    with pytest.raises(CompactedError):
        await asyncio.wait_for(follow(state.revision, 99), 10)
