"""KindRelister: a burst of requests is one run, one run at a time per kind, failed runs are retried."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Sized

import pytest

from netfence.controller.relist import KindRelister


class FakeJob:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, int] = {}  # kind -> failures still to raise
        self.gate: dict[str, asyncio.Event] = {}  # kind -> runs wait for it when present
        self.started = asyncio.Event()
        self.done = asyncio.Condition()
        self.concurrent: dict[str, int] = {}
        self.max_concurrent = 0

    async def __call__(self, kind: str) -> None:
        self.concurrent[kind] = self.concurrent.get(kind, 0) + 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent[kind])
        self.started.set()
        try:
            if kind in self.gate:
                await self.gate[kind].wait()
            if self.fail.get(kind, 0) > 0:
                self.fail[kind] -= 1
                raise RuntimeError("API server down")
            self.calls.append(kind)
        finally:
            self.concurrent[kind] -= 1
            async with self.done:
                self.done.notify_all()

    async def wait_calls(self, n: int, timeout: float = 5.0) -> None:
        async def enough() -> None:
            async with self.done:
                await self.done.wait_for(lambda: len(self.calls) >= n)

        await asyncio.wait_for(enough(), timeout)


@pytest.fixture
async def relister() -> AsyncIterator[tuple[KindRelister, FakeJob]]:
    job = FakeJob()
    subject = KindRelister(job, ("pods", "namespaces"), quiet=0.05, max_delay=0.5, retry=0.05)
    task = asyncio.create_task(subject.run())
    try:
        yield subject, job
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_burst_of_requests_is_one_run(relister: tuple[KindRelister, FakeJob]) -> None:
    subject, job = relister
    for _ in range(200):  # e.g. one request per object of Kopf's re-list
        subject.request("pods", "watch re-listed")
    await job.wait_calls(1)
    await asyncio.sleep(0.2)  # absence of a second run: nothing else to wait for
    assert job.calls == ["pods"]
    assert subject.runs == {"pods": 1, "namespaces": 0}
    assert not subject.pending("pods")


async def test_a_request_during_a_run_causes_exactly_one_more(relister: tuple[KindRelister, FakeJob]) -> None:
    subject, job = relister
    job.gate["pods"] = asyncio.Event()
    subject.request("pods", "elected")
    await asyncio.wait_for(job.started.wait(), 5)
    assert subject.pending("pods")
    for _ in range(10):
        subject.request("pods", "watch re-listed")
    job.gate["pods"].set()
    await job.wait_calls(2)
    await asyncio.sleep(0.2)
    assert job.calls == ["pods", "pods"]
    assert job.max_concurrent == 1


async def test_failed_runs_are_retried_until_they_succeed(relister: tuple[KindRelister, FakeJob]) -> None:
    subject, job = relister
    job.fail["namespaces"] = 3
    subject.request("namespaces", "periodic")
    await job.wait_calls(1)
    assert job.calls == ["namespaces"]
    assert subject.failures["namespaces"] == 3 and subject.runs["namespaces"] == 1


async def test_kinds_are_independent(relister: tuple[KindRelister, FakeJob]) -> None:
    subject, job = relister
    job.gate["pods"] = asyncio.Event()  # pods blocked (a slow listing)
    subject.request("pods", "elected")
    subject.request("namespaces", "elected")
    await job.wait_calls(1)
    assert job.calls == ["namespaces"]
    job.gate["pods"].set()
    await job.wait_calls(2)


def test_unknown_kind_is_refused() -> None:
    async def job(kind: str) -> None:
        return None

    with pytest.raises(ValueError):
        KindRelister(job, ("pods",)).request("secrets", "x")


def test_kopf_backoffs_are_short_endless_and_reiterable() -> None:
    from netfence.controller.handlers import RetryBackoffs

    backoffs = RetryBackoffs()
    first = list(itertools.islice(backoffs, 100))
    assert first[:3] == [0.25, 0.5, 1.0] and max(first) == 1.0 and len(first) == 100  # never exhausted
    assert list(itertools.islice(backoffs, 3)) == first[:3]  # Kopf iterates it afresh for every request
    assert isinstance(backoffs, Iterable) and not isinstance(backoffs, Sized)
