"""The agent's read-only ``GET /counters`` (for netfence explain) next to /healthz and /readyz."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from netfence.agent.health import build_app
from netfence.dataplane.counters import MAX_CHAINS, CounterError, Counters, RuleCounter, read_counters
from netfence.dataplane.runner import Result

HEALTH = {"node": "n0", "etcdConnected": True, "appliedRevision": 5, "lastError": None}


class Kernel:
    """Counts reads; answers like iptables-save -c would."""

    def __init__(self) -> None:
        self.reads: list[tuple[list[str], str]] = []

    def __call__(self, chains: list[str], family: Any) -> Counters:
        self.reads.append((chains, family))
        if "nf-fw-broken" in chains:
            raise CounterError("iptables-save failed (exit 1): no table")
        return {c: [RuleCounter(3, 180, "-j DROP")] if c.startswith("nf-fw") else None for c in chains}


@pytest.fixture
async def agent() -> AsyncIterator[tuple[TestClient[Any, Any], Kernel]]:
    kernel = Kernel()
    client = TestClient(TestServer(build_app(lambda: dict(HEALTH), kernel)))
    await client.start_server()
    try:
        yield client, kernel
    finally:
        await client.close()


async def test_counters_of_named_chains(agent: tuple[TestClient[Any, Any], Kernel]) -> None:
    client, kernel = agent
    resp = await client.get("/counters", params={"chains": "nf-fw-abc,nf-pi-def,nf-fw-abc"})
    assert resp.status == 200
    assert await resp.json() == {"node": "n0", "family": "v4", "chains": {
        "nf-fw-abc": [{"packets": 3, "bytes": 180, "rule": "-j DROP"}], "nf-pi-def": None}}
    assert kernel.reads == [(["nf-fw-abc", "nf-pi-def"], "v4")]
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("query", [
    {}, {"chains": ""}, {"chains": "INPUT"}, {"chains": "nf-fw-a;rm"}, {"chains": "nf-fw-a", "family": "v5"},
    {"chains": ",".join(f"nf-fw-{i}" for i in range(MAX_CHAINS + 1))},
])
async def test_only_netfence_chains_few_at_a_time(agent: tuple[TestClient[Any, Any], Kernel],
                                                  query: dict[str, str]) -> None:
    client, kernel = agent
    resp = await client.get("/counters", params=query)
    assert resp.status == 400
    assert "error" in await resp.json()
    assert kernel.reads == []  # refused before anything runs


async def test_a_failing_read_is_an_error_not_a_crash(agent: tuple[TestClient[Any, Any], Kernel]) -> None:
    client, _ = agent
    resp = await client.get("/counters", params={"chains": "nf-fw-broken"})
    assert resp.status == 500 and "no table" in (await resp.json())["error"]


async def test_no_reader_no_counters() -> None:
    client = TestClient(TestServer(build_app(lambda: dict(HEALTH))))
    await client.start_server()
    try:
        assert (await client.get("/counters", params={"chains": "nf-fw-a"})).status == 404
    finally:
        await client.close()


class FakeRunner:
    def __init__(self, result: Result) -> None:
        self.result = result
        self.argv: list[list[str]] = []

    def run(self, argv: Any, input: str | None = None) -> Result:
        self.argv.append(list(argv))
        return self.result


def test_read_counters_runs_iptables_save_with_counters() -> None:
    runner = FakeRunner(Result(0, "*filter\n:nf-tw-1 - [0:0]\n[2:100] -A nf-tw-1 -j DROP\nCOMMIT\n", ""))
    assert read_counters(runner, ["nf-tw-1"], "v6") == {"nf-tw-1": [RuleCounter(2, 100, "-j DROP")]}
    assert runner.argv == [["ip6tables-save", "-c", "-t", "filter"]]
    with pytest.raises(CounterError, match="exit 4"):
        read_counters(FakeRunner(Result(4, "", "boom")), ["nf-tw-1"])
    with pytest.raises(CounterError, match="not a Netfence chain"):
        read_counters(runner, ["FORWARD"])
