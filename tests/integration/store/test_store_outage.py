"""etcd going away: watches resume exactly after a restart; a dead etcd raises instead of hanging."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from netfence.store import layout as L
from netfence.store.election import LeaderElection
from netfence.store.errors import EtcdUnavailable
from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence.store.tasks import cancel_and_wait
from netfence_lab.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[EtcdStore]]


async def write_retrying(store: EtcdStore, changes: dict[str, bytes | None], within: float) -> int:
    deadline = time.monotonic() + within
    while True:
        try:
            return await store.write(changes, None)
        except EtcdUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_follow_resumes_exactly_after_etcd_restart(
    make_store: MakeStore, private_etcd_server: EtcdServer
) -> None:
    server = private_etcd_server
    writer = await make_store("writer", server=server, timeout=1.0)
    reader = await make_store("reader", server=server, watch_probe_interval=0.5, watch_retry_timeout=30.0)
    state = await reader.committed_snapshot()
    batches: list[tuple[int, dict[str, bytes | None]]] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        async for batch in reader.follow_commits(state.revision):
            batches.append((batch.commit_revision, batch.changes))
            arrived.set()

    task = asyncio.create_task(follow())
    try:
        first = await writer.write({"sets/a": L.encode({"v": 1})}, None)
        await asyncio.wait_for(arrived.wait(), 10)
        arrived.clear()

        server.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.restart)
        second = await write_retrying(writer, {"sets/b": L.encode({"v": 2}), "sets/a": None}, 20)
        await asyncio.wait_for(arrived.wait(), 20)
        await asyncio.sleep(0.3)
        assert not task.done()
        assert batches == [
            (first, {"sets/a": L.encode({"v": 1})}),
            (second, {"sets/b": L.encode({"v": 2}), "sets/a": None}),
        ]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_dead_etcd_raises_instead_of_hanging(
    make_store: MakeStore, private_etcd_server: EtcdServer
) -> None:
    server = private_etcd_server
    store = await make_store("s", server=server, timeout=1.0, watch_probe_interval=0.5, watch_retry_timeout=2.0)
    lost = asyncio.Event()
    leader_store = await make_store("leader", server=server, timeout=1.0)
    election = LeaderElection(leader_store, "leader", ttl=2, on_lost=lost.set)
    election_task = asyncio.create_task(election.run())
    follow_error: list[BaseException] = []

    async def follow() -> None:
        try:
            async for _batch in store.follow_commits((await store.read_all()).revision):
                pass
        except Exception as exc:
            follow_error.append(exc)

    follow_task = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(election.became_leader.wait(), 5)
        await asyncio.sleep(0.5)
        server.kill()
        killed = time.monotonic()

        with pytest.raises(EtcdUnavailable):
            await store.read_all()
        assert time.monotonic() - killed < 3

        await asyncio.wait_for(follow_task, 10)
        assert len(follow_error) == 1 and isinstance(follow_error[0], EtcdUnavailable)
        assert time.monotonic() - killed < 8

        await asyncio.wait_for(lost.wait(), 5)
        assert not election.is_leader and election.fence is None
        assert time.monotonic() - killed < 8
    finally:
        for task in (election_task, follow_task):
            task.cancel()
        await asyncio.gather(election_task, follow_task, return_exceptions=True)


async def test_quiet_watch_is_not_reconnected(
    store: EtcdStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A silent stream on a healthy etcd stays open (etcd is probed, the stream not torn down)."""
    quiet = EtcdStore(
        EtcdConfig(store.config.endpoints, store.config.prefix, watch_probe_interval=0.3), identity="quiet"
    )
    await quiet.connect()
    got: list[int] = []

    async def follow() -> None:
        async for batch in quiet.follow_commits((await quiet.read_all()).revision):
            got.append(batch.commit_revision)
            return

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(2.0)  # several probe intervals of silence
        revision = await store.write({"sets/a": L.encode({"v": 1})}, None)
        await asyncio.wait_for(task, 5)
        assert got == [revision]
        assert not [r for r in caplog.records if "interrupted" in r.getMessage()]
    finally:
        await cancel_and_wait(task)
        await quiet.close()


async def test_hung_etcd_raises_instead_of_hanging(
    make_store: MakeStore, private_etcd_server: EtcdServer
) -> None:
    """etcd frozen (SIGSTOP): the connection stays up but nothing answers."""
    server = private_etcd_server
    store = await make_store("s", server=server, timeout=1.0, watch_probe_interval=0.5, watch_retry_timeout=2.0)
    start = (await store.read_all()).revision

    async def follow() -> None:
        async for _batch in store.follow_commits(start):
            raise AssertionError("no commits were written")

    server.process.signal(signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await asyncio.wait_for(follow(), 20)
        assert time.monotonic() - frozen < 10
        with pytest.raises(EtcdUnavailable):
            await store.read_all()
    finally:
        server.process.signal(signal.SIGCONT)
