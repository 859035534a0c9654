"""LeaderElection on the in-memory store (it needs only an ElectionStore): one leader at a time, the
fence of a deposed leader refuses its writes, and leadership moves on when the leader key goes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from tests.fakes.store import FakeStore, MemoryEtcd

from netfence.store import layout as L
from netfence.store.election import LeaderElection
from netfence.store.errors import NotLeaderError


@contextlib.asynccontextmanager
async def campaigning(*elections: LeaderElection) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(e.run()) for e in elections]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_leadership_moves_when_the_leader_key_goes_and_the_old_fence_refuses_writes() -> None:
    etcd = MemoryEtcd()
    events: list[str] = []
    stores = {name: FakeStore(etcd, name) for name in ("a", "b")}

    def candidate(name: str) -> LeaderElection:
        return LeaderElection(stores[name], name, ttl=2, on_elected=lambda: events.append(f"{name} elected"),
                              on_lost=lambda: events.append(f"{name} lost"), retry_interval=0.05)

    elections = {name: candidate(name) for name in stores}
    a, b = elections["a"], elections["b"]
    async with campaigning(a):
        await asyncio.wait_for(a.became_leader.wait(), 5)
        async with campaigning(b):
            assert a.is_leader and not b.is_leader and await b.current_leader() == "a"
            old = a.fence
            assert old is not None
            await stores["a"].write({"policies/x/y": b'{"schema":1}'}, old)

            etcd.depose()  # a's lease expires (a was cut off from etcd)
            await asyncio.wait_for(b.became_leader.wait(), 5)
            await etcd.until(lambda: not a.is_leader)
            assert b.fence is not None and b.fence.create_revision > old.create_revision
            with pytest.raises(NotLeaderError):
                await stores["a"].write({"policies/x/y": b'{"schema":1,"late":true}'}, old)
            assert L.decode(etcd.keys["policies/x/y"].value) == {"schema": 1}

            await b.resign()  # hands over at once: a (still campaigning) takes it
            await asyncio.wait_for(a.became_leader.wait(), 5)
            assert await a.current_leader() == "a"
    assert events[0] == "a elected" and set(events[1:3]) == {"a lost", "b elected"}
    assert events[3:5] == ["b lost", "a elected"]
