"""Leader election and write fencing on a real etcd."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client

from netfence.store import layout as L
from netfence.store.election import LeaderElection
from netfence.store.errors import NotLeaderError
from netfence.store.etcd import EtcdStore
from netfence_lab.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[EtcdStore]]
TTL = 2  # etcd's minimum lease TTL with default timing
CHILD = Path(__file__).with_name("election_child.py")


async def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll ``predicate``; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@asynccontextmanager
async def running(*elections: LeaderElection) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(e.run()) for e in elections]
    try:
        yield
        for task in tasks:
            if task.done():
                task.result()  # surface a crashed election
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def candidate(store: EtcdStore, name: str, log: list[str]) -> LeaderElection:
    return LeaderElection(
        store, name, ttl=TTL, on_elected=lambda: log.append(f"{name}+"), on_lost=lambda: log.append(f"{name}-")
    )


async def test_exactly_one_leader_and_fast_handover_on_resign(make_store: MakeStore) -> None:
    log: list[str] = []
    a = candidate(await make_store("a"), "a", log)
    b = candidate(await make_store("b"), "b", log)
    async with running(a, b):
        await wait_until(lambda: a.is_leader or b.is_leader, 5)
        await asyncio.sleep(2 * TTL)  # well past the TTL: keepalives hold the lease
        assert [a.is_leader, b.is_leader].count(True) == 1
        leader, other = (a, b) if a.is_leader else (b, a)
        assert await other.current_leader() == leader.identity
        assert leader.became_leader.is_set() and not other.became_leader.is_set()
        first_fence = leader.fence
        assert first_fence is not None and other.fence is None
        assert first_fence.leader_key == leader.store.layout.key(L.LEADER).decode()
        assert log == [f"{leader.identity}+"]

        await leader.resign()
        assert not leader.is_leader and leader.fence is None
        took = await wait_until(lambda: other.is_leader, 3)
        assert took < 1.0, f"handover after resign took {took:.2f}s"
        assert log == [f"{leader.identity}+", f"{leader.identity}-", f"{other.identity}+"]
        assert other.fence is not None and other.fence.create_revision > first_fence.create_revision
        assert await other.current_leader() == other.identity


@pytest.mark.parametrize("how", ["lease revoked", "key deleted"])
async def test_stale_fence_cannot_write(make_store: MakeStore, etcd_client: Etcd3Client, how: str) -> None:
    log: list[str] = []
    a_store = await make_store("a")
    b_store = await make_store("b")
    a = candidate(a_store, "a", log)
    async with running(a):
        await wait_until(lambda: a.is_leader, 5)
        stale = a.fence
        assert stale is not None
        await a_store.write({"sets/by-a": L.encode({"v": 1})}, stale)

        b = candidate(b_store, "b", log)
        async with running(b):
            await asyncio.sleep(0.3)
            assert not b.is_leader
            held = await a_store.get(L.LEADER)
            assert held is not None
            if how == "lease revoked":  # what an expired lease does
                await etcd_client.lease.revoke(held.lease)
            else:
                await etcd_client.kv.delete(a_store.layout.key(L.LEADER))
            await wait_until(lambda: b.is_leader, TTL + 2)
            await wait_until(lambda: "a-" in log, TTL + 2)
            assert not a.is_leader and a.fence is None

            before = await a_store.read_all()
            big = {f"sets/s{i}": L.encode({"v": i}) for i in range(300)}  # would span 3 transactions
            with pytest.raises(NotLeaderError, match="no longer held") as info:
                await a_store.write(big, stale)
            assert not info.value.partial
            after = await a_store.read_all()
            assert after.values == before.values
            assert after.commit_revision == before.commit_revision

            assert b.fence is not None
            revision = await b_store.write(big, b.fence)
            assert (await b_store.committed_snapshot()).commit_revision == revision
    # a was elected first; then b won and a noticed its loss, in either order (two processes'
    # callbacks: a stale fence cannot write whichever comes first, as checked above)
    assert log[0] == "a+" and sorted(log[1:3]) == ["a-", "b+"], log


async def test_killed_leader_is_replaced_within_ttl(
    make_store: MakeStore, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), etcd_server.endpoint, etcd_prefix, "child", str(TTL),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"LEADER\n"
        log: list[str] = []
        b = candidate(await make_store("b"), "b", log)
        async with running(b):
            await asyncio.sleep(TTL)  # the child keeps its lease alive
            assert not b.is_leader
            assert await b.current_leader() == "child"

            proc.kill()
            killed = time.monotonic()
            await proc.wait()
            await wait_until(lambda: b.is_leader, TTL + 5)
            took = time.monotonic() - killed
            assert took < TTL + 2, f"takeover after SIGKILL took {took:.2f}s"
            assert await b.current_leader() == "b"
            assert log == ["b+"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
