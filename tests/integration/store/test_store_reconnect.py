"""After a long etcd outage the store is back at once: bounded reconnection, a rebuilt channel, exact watches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tests.integration.helpers import first_answer

from netfence.store import layout as L
from netfence.store.errors import StoreError
from netfence.store.etcd import EtcdStore
from netfence.store.tasks import cancel_and_wait
from netfence_lab.etcd_server import EtcdServer

MakeStore = Callable[..., Awaitable[EtcdStore]]

# gRPC's default reconnect backoff after 20 s of failures has grown to ~6-10 s
# per attempt; with the store's options the channel retries at most ~1.2 s apart.
OUTAGE = 20.0


async def write_retrying(store: EtcdStore, changes: dict[str, bytes | None]) -> int:
    """The writer's own channel may need up to a reconnect backoff (~1 s) after etcd answers."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await store.write(changes, None)
            except StoreError:
                await store.pause(1.0)


async def test_watch_and_calls_recover_at_once_after_a_long_outage_across_channel_rebuilds(
    make_store: MakeStore, private_etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    server = private_etcd_server
    writer = await make_store("writer", server=server, timeout=1.0)
    reader = await make_store("reader", server=server, timeout=1.0, watch_probe_interval=0.5,
                              watch_retry_timeout=120.0, rebuild_after=3.0)
    state = await reader.committed_snapshot()
    batches: list[tuple[int, dict[str, bytes | None], float]] = []
    arrived = asyncio.Event()
    answered_at: list[float] = []  # when the reader's own calls succeeded
    call_ok = asyncio.Event()

    async def follow() -> None:
        async for batch in reader.follow_commits(state.revision):
            batches.append((batch.commit_revision, batch.changes, time.monotonic()))
            arrived.set()

    async def poll() -> None:
        """Like the agent's connectivity probe: a call every 0.25 s, retry waits ending when etcd is back."""
        while True:
            try:
                await reader.commit_revision()
                answered_at.append(time.monotonic())
                call_ok.set()
                await asyncio.sleep(0.25)
            except StoreError:
                await reader.pause(1.0)

    tasks = [asyncio.create_task(follow()), asyncio.create_task(poll())]
    try:
        first = await writer.write({"sets/a": L.encode({"v": 1})}, None)
        await asyncio.wait_for(arrived.wait(), 10)
        arrived.clear()

        server.kill()
        killed = time.monotonic()
        call_ok.clear()
        await asyncio.sleep(OUTAGE)
        rebuilt = reader.connection.rebuilds
        assert rebuilt >= 2, "calls failing for longer than rebuild_after rebuild the channel"

        answered = asyncio.create_task(first_answer(server.endpoint, etcd_prefix))
        await asyncio.to_thread(server.restart)
        back = await asyncio.wait_for(answered, 30)
        second = await write_retrying(writer, {"sets/b": L.encode({"v": 2}), "sets/a": None})
        await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.wait_for(call_ok.wait(), 10)  # the reader's own calls work again
        calls_back = min(t for t in answered_at if t > killed)
        print(f"\netcd down {back - killed:.1f}s; after it answered: the reader's calls {calls_back - back:.2f}s, "
              f"its watch {batches[-1][2] - back:.2f}s; channel rebuilt {rebuilt} times")
        assert calls_back - back < 1.5
        assert batches[-1][2] - back < 2.0
        assert [(rev, changes) for rev, changes, _ in batches] == [
            (first, {"sets/a": L.encode({"v": 1})}),
            (second, {"sets/b": L.encode({"v": 2}), "sets/a": None}),
        ]
        assert not any(task.done() for task in tasks)
    finally:
        await cancel_and_wait(*tasks)
