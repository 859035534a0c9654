"""Running the real agent loop over the fakes (tests/fakes/store.py, tests/fakes/dataplane.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from netfence.agent.loop import Agent


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[None]:
    """``agent.run()`` for the body of the ``async with``; cancelled and awaited after it."""
    task = asyncio.create_task(agent.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
