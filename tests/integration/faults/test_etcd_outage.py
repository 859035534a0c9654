"""Netfence's etcd crashes or freezes; a change made meanwhile is enforced within 3 s of etcd answering again.

The world (``enforcement_helpers.build_world``): good -> web allowed, bad -> web
denied (both probed continuously, their verdicts never change here), and
``good-from-ns`` letting every pod of the namespace reach good. During the
outage ``good-from-ns`` is narrowed to web only, so bad -> good turns denied
once the change is enforced.

etcd is killed (SIGKILL) for 50 s — with gRPC's default reconnect backoff
(1 s growing by 1.6x to 120 s, +-20 % jitter) a process's attempts are then
about 27 s apart, so it would notice etcd's return seconds to tens of seconds
late (at 40 s an attempt often falls just after the restart) — or frozen
(SIGSTOP) for 20 s, past the keepalive that drops dead connections. It comes
back with the same data directory and arguments.
Measured from the first answer of etcd to a fresh client: real probes see the
change, the agent reports it applied, and its ClusterPolicyStatus is
``Enforced`` for the new generation — within ``RECOVERY_BUDGET``.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.integration.enforcement_helpers import (
    PORT,
    ProbeLoop,
    ProbeTally,
    World,
    agent_health,
    build_world,
    connects,
    manifest,
    store_of,
)
from tests.integration.helpers import eventually, first_answer

from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv
from netfence_lab.probe import Probe

RECOVERY_BUDGET = 3.0  # seconds from etcd answering to the change being enforced everywhere


@pytest.fixture
async def world(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=2, report_ttl=4)
    ns = "eo-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:8]
    await env.start()
    try:
        yield await build_world(env, ns)
    finally:
        etcd = cluster.netfence_etcd
        etcd.process.signal(signal.SIGCONT)  # whatever happened to the test, leave etcd running
        if not etcd.process.alive():
            await asyncio.to_thread(etcd.restart)
        try:
            await env.delete_user_state()
        finally:
            await env.close()


def bad_reaches_good(world: World, timeout: float = 0.2) -> bool:
    return connects(world.prober, world.bad.netns, world.good.ip, PORT, timeout)


async def first_blocked(world: World) -> float:
    """When bad -> good is first refused by the narrowed policy (the start of that probe)."""
    while True:
        started = time.monotonic()
        if not await asyncio.to_thread(bad_reaches_good, world):
            return started
        await asyncio.sleep(0.02)


async def _probed(probes: ProbeLoop, n: int, since: ProbeTally | None = None) -> bool:
    now, base = probes.snapshot(), since or ProbeTally()
    return now.allowed_ok >= base.allowed_ok + n and now.denied_blocked >= base.denied_blocked + n


@pytest.mark.parametrize(("fault", "outage"), [("kill", 50.0), ("stop", 20.0)])
async def test_change_made_during_an_etcd_outage_is_enforced_within_3s(
    world: World, fault: str, outage: float
) -> None:
    env, ns = world.env, world.ns
    etcd = env.cluster.netfence_etcd
    policy_key = f"policies/{ns}/good-from-ns"
    reader = await store_of(env)
    try:
        before = (await reader.read_all()).values[policy_key]
    finally:
        await reader.close()
    assert await asyncio.to_thread(bad_reaches_good, world, 2.0)
    web_to_good = Probe(world.web.netns, world.good.ip, PORT)

    with ProbeLoop(world) as probes:
        await eventually(lambda: _probed(probes, 2), what="probes running")
        down_since = time.monotonic()
        if fault == "kill":
            etcd.kill()
        else:
            etcd.process.signal(signal.SIGSTOP)

        async def noticed(index: int) -> bool:
            body = await agent_health(env, index)
            return body is not None and body["etcdConnected"] is False

        for index in env.agents:
            await eventually(lambda i=index: noticed(i), timeout=15, what=f"agent {index} to notice the outage")
        # The change, made while etcd is away: good accepts web only (bad -> good turns denied).
        marks = dict([await env.apply_manifest(manifest(ns, "good-from-ns", {
            "podSelector": {"matchLabels": {"role": "good"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}))])
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - down_since)))  # the outage itself
        # Fail-static: nothing could reach the agents, the old rules are in force.
        assert await asyncio.to_thread(bad_reaches_good, world, 2.0)

        answered = asyncio.create_task(first_answer(etcd.endpoint, env.prefix))
        if fault == "kill":
            await asyncio.to_thread(etcd.restart)  # same data directory and arguments
        else:
            etcd.process.signal(signal.SIGCONT)
        back = await asyncio.wait_for(answered, 30)
        blocked = asyncio.create_task(first_blocked(world))
        await env.wait_enforced(marks, timeout=30)  # committed, applied by every agent, status Enforced
        enforced = time.monotonic()
        probed = await asyncio.wait_for(blocked, 30)
        after = probes.snapshot()
        await eventually(lambda: _probed(probes, 3, after), what="probes after the recovery")

    recovery = max(enforced, probed) - back
    print(f"\netcd {fault} for {back - down_since:.1f}s: after etcd answered, the probe saw the change in "
          f"{probed - back:.2f}s, reports and ClusterPolicyStatus in {enforced - back:.2f}s")
    tally = probes.snapshot()
    assert tally.denied_connected == [] and tally.allowed_failed == [], tally

    reader = await store_of(env)
    try:
        state = await reader.read_all()
    finally:
        await reader.close()
    assert state.values[policy_key] != before
    node1 = await agent_health(env, 1)
    assert node1 is not None and node1["appliedRevision"] >= state.mod_revisions[policy_key], node1
    assert node1["etcdConnected"] and not node1["lastError"]
    # The new verdicts hold: bad -> good denied, web -> good still allowed.
    assert not any([await asyncio.to_thread(bad_reaches_good, world) for _ in range(3)])
    assert world.prober.exchange(web_to_good, 2.0) is not None
    assert recovery <= RECOVERY_BUDGET, f"enforced {recovery:.2f}s after etcd answered"
