"""Cancellation helpers: a caller's own cancellation is never swallowed."""

from __future__ import annotations

import asyncio

import pytest

from netfence.store.tasks import cancel_and_wait, first_of


async def test_cancel_and_wait_finishes_children_and_drops_their_errors() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    failing = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    sleeping = asyncio.ensure_future(sleeps())
    await cancel_and_wait(failing, sleeping)
    assert failing.done() and sleeping.cancelled()


async def test_cancel_and_wait_propagates_the_callers_cancellation() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # cleanup that takes a while

    async def owner() -> None:
        child = asyncio.ensure_future(slow_to_stop())
        await asyncio.sleep(0)
        await cancel_and_wait(child)
        await asyncio.sleep(60)  # must never get here if cancelled meanwhile

    task = asyncio.ensure_future(owner())
    await asyncio.sleep(0.05)  # owner is now waiting for its child to stop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_first_of_returns_the_first_and_cancels_the_rest() -> None:
    cancelled: list[str] = []

    async def wait(name: str, delay: float) -> str:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        return name

    assert await first_of(wait("slow", 5), wait("fast", 0.01)) == 1
    assert cancelled == ["slow"]


async def test_first_of_reraises_the_first_error() -> None:
    async def fails() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await first_of(asyncio.sleep(5), fails())
