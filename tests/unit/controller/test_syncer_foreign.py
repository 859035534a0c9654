"""The leader notices writes to its own keys by anyone else and rewrites them at once (a fake store)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from netfence.controller.syncer import EtcdSyncer, foreign_keys, is_guarded
from netfence.model.compiler import ModelEngine
from netfence.model.policy import policy_from_k8s
from netfence.model.world import namespace_from_k8s, pod_from_k8s
from netfence.store import layout as L
from netfence.store.types import Fence, Snapshot

POLICY = "policies/a/web"


def test_guarded_keys_are_the_controllers_own() -> None:
    for key in ("policies/a/b", "sets/p1", "sets2/p1/0", "endpoints/n/a/b", "meta/observed", "commit", "pending"):
        assert is_guarded(key), key
    for key in ("leader", "status/nodes/n1", "other"):
        assert not is_guarded(key), key


def test_only_changes_at_revisions_of_other_writers_are_foreign() -> None:
    assert foreign_keys(7, ["policies/a/b", "status/nodes/n1"], {5, 6}) == {"policies/a/b"}
    assert foreign_keys(6, ["policies/a/b", "commit"], {5, 6}) == set()
    assert foreign_keys(8, ["leader", "status/nodes/n1"], set()) == set()


class WatchedStore:
    """A fake etcd: every write is one revision, and a watch sees all of them.

    Our own writes reach the watch *before* their revision is known to the
    writer (as can happen with a real etcd), to exercise that race.
    """

    def __init__(self) -> None:
        self.layout = L.Layout("/t/")
        self.values: dict[str, bytes] = {}
        self.mods: dict[str, int] = {}
        self.revision = 0
        self.commit = 0
        self.txn_listeners: list[Callable[[int], None]] = []
        self.events: asyncio.Queue[tuple[int, dict[str, bytes | None]]] = asyncio.Queue()
        self.own_writes: list[dict[str, bytes | None]] = []
        self.processed = 0  # the last revision the watcher has finished with
        self.changed = asyncio.Event()  # set on every write and every revision processed
        self._lock = asyncio.Lock()

    def _put(self, changes: dict[str, bytes | None]) -> int:
        self.revision += 1
        for key, value in changes.items():
            if value is None:
                self.values.pop(key, None)
                self.mods.pop(key, None)
            else:
                self.values[key] = value
                self.mods[key] = self.revision
        self.events.put_nowait((self.revision, dict(changes)))
        self.changed.set()
        return self.revision

    def foreign(self, changes: dict[str, bytes | None]) -> int:
        return self._put(changes)

    async def read_all(self) -> Snapshot:
        return Snapshot(dict(self.values), self.revision, dict(self.mods), self.commit)

    async def write(self, changes: dict[str, bytes | None], fence: Any) -> int:
        assert fence is not None
        async with self._lock:
            revision = self._put({**changes, "commit": b'{"schema":1}'})
            self.commit = revision
            self.own_writes.append(dict(changes))
            await asyncio.sleep(0.01)  # the watch sees the event first
            for listener in self.txn_listeners:
                listener(revision)
            return revision

    async def write_commit_only(self, fence: Any) -> int:
        return await self.write({}, fence)

    async def writes_settled(self) -> None:
        async with self._lock:
            return

    async def watch_changes(self, rel: str = "", after_revision: int | None = None) -> AsyncIterator[
            tuple[int, dict[str, bytes | None]]]:
        while True:
            revision, changes = await self.events.get()
            yield revision, changes
            self.processed = revision  # the consumer asks for the next one: done with this one
            self.changed.set()

    async def until(self, check: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


class Leader:
    is_leader = True
    fence = Fence("/t/leader", 1)


def engine() -> ModelEngine:
    e = ModelEngine()
    e.set_namespace(namespace_from_k8s({"metadata": {"name": "a"}}))
    e.set_pod(pod_from_k8s({"metadata": {"namespace": "a", "name": "w", "labels": {"app": "web"}},
                            "spec": {"nodeName": "n1"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}}))
    e.set_policy(policy_from_k8s({"metadata": {"namespace": "a", "name": "web"},
                                  "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}}))
    return e


@pytest.fixture
async def running() -> AsyncIterator[tuple[EtcdSyncer, WatchedStore]]:
    store = WatchedStore()
    syncer = EtcdSyncer(engine(), cast(Any, store), cast(Any, Leader()), observed=dict, coalesce_seconds=0.01)
    task = asyncio.create_task(syncer.run())
    try:
        await store.until(lambda: POLICY in store.values)
        yield syncer, store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_own_writes_are_never_taken_for_foreign_ones(running: tuple[EtcdSyncer, WatchedStore]) -> None:
    syncer, store = running
    for i in range(5):
        written = len(store.own_writes)
        syncer.request_reconcile()  # rewrites nothing: matching state
        syncer.engine.set_pod(pod_from_k8s({"metadata": {"namespace": "a", "name": f"p{i}", "labels": {"app": "web"}},
                                            "spec": {"nodeName": "n1"},
                                            "status": {"phase": "Running", "podIP": f"10.0.1.{i}"}}))
        syncer.notify()
        await store.until(lambda w=written: len(store.own_writes) > w)  # type: ignore[misc]
    await store.until(lambda: store.processed == store.revision)
    assert syncer.foreign_writes == 0


@pytest.mark.parametrize(
    "what",
    ["garbage", "same bytes", "deletion", "new key", "commit marker", "observed versions"],
)
async def test_foreign_writes_to_own_keys_are_rewritten_at_once(
    running: tuple[EtcdSyncer, WatchedStore], what: str
) -> None:
    syncer, store = running
    good = dict(store.values)
    changes: dict[str, dict[str, bytes | None]] = {
        "garbage": {POLICY: b"{oops"},
        "same bytes": {POLICY: good[POLICY]},
        "deletion": {POLICY: None},
        "new key": {"policies/a/rogue": L.encode({"namespace": "a", "name": "rogue"})},
        "commit marker": {"commit": b'{"schema":1,"seq":999}'},
        "observed versions": {"meta/observed": L.encode({"resourceVersions": {"pods": 10**9}})},
    }
    change = changes[what]
    written = len(store.own_writes)
    foreign = store.foreign(change)
    key = next(iter(change))
    await store.until(lambda: syncer.foreign_writes == 1 and len(store.own_writes) > written)
    last = store.own_writes[-1]
    if key == "commit":
        assert last == {} and store.commit > foreign  # a fresh commit marker of ours
    elif key == "policies/a/rogue":
        assert last == {key: None} and key not in store.values
    else:
        assert key in last and store.values[key] == good[key] and store.mods[key] > foreign
