"""Small asyncio helpers for the store's background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel tasks and wait until they have finished.

    Unlike ``with suppress(CancelledError): await task``, a cancellation of
    the *calling* task still propagates (it is not mistaken for the child's).
    The children's exceptions are retrieved (and dropped).
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def first_of(*coros: Coroutine[Any, Any, Any]) -> int:
    """Run coroutines concurrently; return the index of the first to finish, re-raising its error.

    The others are cancelled and awaited before returning.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for index, task in enumerate(tasks):
            if task in done:
                task.result()
                return index
        raise AssertionError("asyncio.wait returned nothing")
    finally:
        await cancel_and_wait(*tasks)
