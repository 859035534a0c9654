"""Commit atomicity across several watch ranges on a real etcd (issue 11 part 1).

An agent watches only the commit marker, ``pending``, policies, sets and its own node's
endpoints, as several watches on one stream (``store/reader.py`` with ``ranges``). etcd orders
events per watch only; a follower must still never apply a commit before every range has
delivered all of it. Changes here span several transactions that interleave keys of every
range (and keys the follower does not watch), written while followers run — one live, one
catching up from old history (etcd's unsynced watchers, where the ranges drift furthest apart).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping

import pytest

from netfence.store import layout as L
from netfence.store.etcd import EtcdStore
from netfence.store.types import KeyRange

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[EtcdStore]]

NODE = "node-1"
GROUPS = 4
CHANGES = 150
RANGES = [KeyRange("policies/"), KeyRange("sets/"), KeyRange(f"endpoints/{NODE}/")]


def group_keys(j: int) -> list[str]:
    return [f"policies/ns/p{j}", f"sets/s{j}-a", f"sets/s{j}-b", f"endpoints/{NODE}/ns/pod{j}",
            f"endpoints/node-2/ns/pod{j}", f"endpoints/node-3/ns/pod{j}"]


def change(j: int, gen: int, rng: random.Random) -> dict[str, bytes | None]:
    """Every key of group j moves to generation ``gen`` (shuffled: any order inside the change)."""
    ops = [(key, L.encode({"gen": gen})) for key in group_keys(j)]
    ops.append(("meta/observed", L.encode({"gen": gen, "group": j})))
    rng.shuffle(ops)
    return dict(ops)


def torn(state: Mapping[str, bytes]) -> list[str]:
    """Groups whose keys (as the follower sees them) are not all of one generation."""
    problems = []
    for j in range(GROUPS):
        gens = {key: json.loads(state[key])["gen"] for key in group_keys(j) if key in state}
        if len(set(gens.values())) > 1:
            problems.append(f"group {j}: {gens}")
    return problems


async def test_no_follower_applies_a_partial_commit_across_its_watch_ranges(make_store: MakeStore) -> None:
    # 7 keys per group, 1-3 groups per change, 2 keys per transaction: 4-11 transactions per change
    writer = await make_store("writer", max_ops_per_txn=2)
    live = await make_store("live")
    late = await make_store("late")
    rng = random.Random(11)
    initial: dict[str, bytes | None] = {}
    for j in range(GROUPS):
        initial.update(change(j, 0, rng))
    await writer.write(initial, None)
    start = await live.committed_snapshot()
    generation = [0] * GROUPS
    commits: list[int] = []

    async def write_all() -> None:
        for i in range(CHANGES):
            batch: dict[str, bytes | None] = {}
            for j in rng.sample(range(GROUPS), rng.randint(1, 3)):
                generation[j] += 1
                batch.update(change(j, generation[j], rng))
            commits.append(await writer.write(batch, None))
            if i % 5 == 0:
                await asyncio.sleep(0)

    stats: dict[str, dict[str, int]] = {}

    async def follow(name: str, store: EtcdStore) -> None:
        state = {k: v for k, v in start.values.items() if any(k.startswith(r.rel) for r in RANGES)}
        seen = stats.setdefault(name, {"commits": 0, "torn": 0, "foreign": 0, "unwatched": 0, "last": 0})
        async for batch in store.follow_commits(start.revision, ranges=RANGES):
            seen["unwatched"] += sum(1 for k in batch.changes if not any(k.startswith(r.rel) for r in RANGES))
            seen["foreign"] += len(batch.foreign)
            for key, value in batch.changes.items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
            seen["commits"] += 1
            seen["torn"] += len(torn(state))
            seen["last"] = batch.commit_revision

    live_task = asyncio.create_task(follow("live", live))
    await asyncio.wait_for(write_all(), 180)
    # the late follower starts after everything was written: it replays history, range by range
    late_task = asyncio.create_task(follow("late", late))
    tasks = [live_task, late_task]
    try:
        async with asyncio.timeout(60):
            while min(s["last"] for s in stats.values()) < commits[-1] or len(stats) < 2:
                for task in tasks:
                    if task.done():
                        task.result()  # surface a follower's failure
                await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    for name, seen in stats.items():
        assert seen["commits"] == CHANGES, (name, seen)
        assert seen["torn"] == 0, (name, seen)
        assert seen["foreign"] == 0 and seen["unwatched"] == 0, (name, seen)


async def test_a_quiet_range_does_not_hold_a_commit_back(make_store: MakeStore) -> None:
    """A commit touching one range only is delivered even though the other ranges (and the
    node's endpoints) never see an event: etcd's progress answer proves them complete."""
    writer = await make_store("writer")
    follower = await make_store("follower")
    start = await follower.committed_snapshot()
    stream = follower.follow_commits(start.revision, ranges=RANGES)
    revision = await writer.write({"sets/only": L.encode({"v": 1}), "endpoints/node-9/ns/x": L.encode({"v": 1})},
                                  None)
    async with asyncio.timeout(10):
        batch = await anext(stream)
    await stream.aclose()
    assert batch.commit_revision == revision
    assert set(batch.changes) == {"sets/only"} and batch.reports_relevant


async def test_a_ranged_snapshot_is_the_full_snapshot_filtered(make_store: MakeStore) -> None:
    """The agent's start-up snapshot reads only its ranges, at one revision, never half a change:
    the same committed values as the whole-prefix snapshot, also while a change is in flight."""
    writer = await make_store("writer")
    reader = await make_store("reader")
    rng = random.Random(5)
    for j in range(GROUPS):
        await writer.write(change(j, 1, rng), None)

    def scoped(values: Mapping[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in values.items() if any(k.startswith(r.rel) for r in RANGES)}

    full = await reader.committed_snapshot()
    ranged = await reader.committed_snapshot(ranges=RANGES)
    assert ranged.values == scoped(full.values) and ranged.values
    assert ranged.commit_revision == full.commit_revision
    # a change in flight: `pending` and an uncommitted policy, as the fenced writer leaves them mid-change
    kv = writer.access.kv
    await kv.put(writer.layout.key(L.PENDING), L.encode({"seq": 99}))
    await kv.put(writer.layout.key("policies/ns/p0"), L.encode({"gen": 99}))
    ranged = await reader.committed_snapshot(ranges=RANGES)
    assert ranged.values == scoped(full.values), "a snapshot showed part of a change in flight"
    assert ranged.commit_revision == full.commit_revision
