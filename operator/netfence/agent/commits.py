"""Commit batches as the agent applies them: in order, and coalesced while an apply runs.

The committed reader yields one batch per commit. Applying takes a while
(``iptables-restore``, ``ipset``), and commits keep coming meanwhile; applying
each of them on its own would put the node further and further behind. So a
background task reads the batches as they come and :func:`coalesced` hands the
consumer, each time it asks, *every* batch that arrived since it last asked,
in commit order: the consumer feeds them all to its state and applies once.

The reader's error (``CompactedError``, ``EtcdUnavailable``) is raised to the
consumer only after the batches that came before it have been handed over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, TypeVar

from netfence.store.tasks import cancel_and_wait

T = TypeVar("T")


class _End:
    """The reader's stream ended (normally or with ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error


class _Reader(Generic[T]):
    def __init__(self, source: AsyncIterator[T]) -> None:
        self.queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self.source = source

    async def run(self) -> None:
        try:
            async for item in self.source:
                self.queue.put_nowait(item)
        except Exception as exc:
            self.queue.put_nowait(_End(exc))
        else:
            self.queue.put_nowait(_End())


async def coalesced(source: AsyncIterator[T]) -> AsyncGenerator[list[T], None]:
    """Groups of ``source``'s items, in order: each group is every item that arrived since
    the previous one was taken (at least one). Raises ``source``'s error after the items
    before it; ends when ``source`` ends. Closing the generator stops the reading task."""
    reader: _Reader[T] = _Reader(source)
    task = asyncio.create_task(reader.run(), name="commit-reader")
    try:
        while True:
            group: list[T] = []
            item = await reader.queue.get()
            while not isinstance(item, _End):
                group.append(item)
                if reader.queue.empty():
                    break
                item = reader.queue.get_nowait()
            if group:
                yield group
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
    finally:
        await cancel_and_wait(task)
