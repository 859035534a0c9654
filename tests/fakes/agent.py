"""Running the real agent loop over the fakes (tests/fakes/store.py, tests/fakes/dataplane.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol


class Runnable(Protocol):
    """A long-running loop of ours: the agent (agent/loop.py), the syncer (controller/syncer.py)."""

    async def run(self) -> None: ...


@contextlib.asynccontextmanager
async def running(loop: Runnable) -> AsyncIterator[None]:
    """``loop.run()`` for the body of the ``async with``; cancelled and awaited after it."""
    task = asyncio.create_task(loop.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
