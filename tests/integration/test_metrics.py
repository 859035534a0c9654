"""Prometheus metrics of the real processes on the test bed (docs/metrics.md), scraped over HTTP.

The world of ``enforcement_helpers`` (two nodes): web on node 0 accepts TCP 80 from role=good
only; good and bad on node 1. The test bed gives every controller and agent a free metrics port.

* every documented metric of each program is served;
* a policy change moves the controller's commits and latencies and every agent's applies and
  commit -> kernel latency (synchronised on the enforcement barrier, not on time);
* denied probes bad -> web raise the ingress denied-packet counter of web, by what the node's
  kernel counted, and only isolated local pods have such series.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.enforcement_helpers import (
    ProbeLoop,
    World,
    allow_from,
    drop_packets,
    namespace_of_test,
    running_world,
)
from tests.integration.helpers import eventually
from tests.unit.test_metrics_docs import documented

from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def world(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=2, resync_seconds=5.0, report_ttl=4)
    async with running_world(env, namespace_of_test("mx", request)) as built:
        yield built


def _scrape(port: int) -> tuple[set[str], Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name + ("_total" if family.type == "counter" else ""))
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


async def scrape(port: int) -> tuple[set[str], Samples]:
    return await asyncio.to_thread(_scrape, port)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def ports(env: NetfenceEnv) -> tuple[int, list[int]]:
    [controller] = env.controller_metrics_ports.values()
    return controller, [a.metrics_port for a in env.agents.values()]


async def test_both_programs_serve_every_documented_metric(world: World) -> None:
    controller, agents = ports(world.env)
    assert controller and all(agents) and len({controller, *agents}) == 3  # ports of their own
    docs = set(documented())
    served, samples = await scrape(controller)
    assert {n for n in docs if n.startswith("netfence_controller_")} <= served
    assert total(samples, "netfence_controller_leader") == 1
    assert total(samples, "netfence_controller_commits_total") >= 1
    assert total(samples, "netfence_controller_full_relists_total", trigger="startup") == 1
    for port in agents:
        served, samples = await scrape(port)
        assert {n for n in docs if n.startswith("netfence_agent_")} <= served
        assert total(samples, "netfence_agent_etcd_connected") == 1
        assert total(samples, "netfence_agent_applies_total", kind="full") >= 1
        assert total(samples, "netfence_agent_rules") > 0 and total(samples, "netfence_agent_sets") > 0
    # The health port is not the metrics port: /metrics is not served there.
    health = world.env.agents[0].health_port
    with pytest.raises(urllib.error.HTTPError):
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{health}/metrics", None, 5)


async def test_a_policy_change_moves_commits_applies_and_latencies(world: World) -> None:
    env = world.env
    controller, agents = ports(env)
    _, before = await scrape(controller)
    agents_before = [(await scrape(p))[1] for p in agents]

    # One more policy for web (the union allows what it did before: the probes' verdicts stay).
    world.mark(await env.apply_manifest(allow_from(world.ns, "web-from-good-too", {"app": "web"},
                                                   {"role": "good"})))
    await env.wait_enforced(world.marks, timeout=60)  # every node applied it, its status is Enforced

    async def moved() -> bool:
        _, after = await scrape(controller)
        grew = [
            total(after, name) > total(before, name)
            for name in ("netfence_controller_commits_total", "netfence_controller_commit_keys_count",
                         "netfence_controller_event_to_commit_seconds_count",
                         "netfence_controller_commit_to_enforced_seconds_count",
                         "netfence_controller_status_writes_total")
        ]
        return all(grew)

    await eventually(moved, timeout=10, what="controller commit metrics after a policy change")
    _, after = await scrape(controller)
    assert total(after, "netfence_controller_commit_revision") > total(before, "netfence_controller_commit_revision")
    # Only the nodes the change touches apply it (issue 11: an agent neither re-applies nor reports for
    # a commit irrelevant to its node); web runs on at least one of them.
    applied = 0
    for port, was in zip(agents, agents_before, strict=True):
        _, now = await scrape(port)
        if total(now, "netfence_agent_applies_total") == total(was, "netfence_agent_applies_total"):
            assert total(now, "netfence_agent_commit_to_kernel_seconds_count") == \
                total(was, "netfence_agent_commit_to_kernel_seconds_count")
            continue
        applied += 1
        assert total(now, "netfence_agent_commit_to_kernel_seconds_count") > \
            total(was, "netfence_agent_commit_to_kernel_seconds_count")
        assert total(now, "netfence_agent_applied_revision") >= total(after, "netfence_controller_commit_revision")
        # Latencies on one machine: well under the enforcement barrier's budget.
        count = total(now, "netfence_agent_commit_to_kernel_seconds_count")
        assert 0 <= total(now, "netfence_agent_commit_to_kernel_seconds_sum") / count < 5
    assert applied >= 1


async def test_denied_probes_raise_the_pods_denied_counters(world: World) -> None:
    env, ns = world.env, world.ns
    web_in = {"namespace": ns, "pod": "web", "direction": "ingress"}
    node0 = env.agents[0].metrics_port
    _, samples = await scrape(node0)
    assert ("netfence_agent_denied_packets_total", frozenset(web_in.items())) in samples  # isolated: a series
    before = total(samples, "netfence_agent_denied_packets_total", **web_in)
    bytes_before = total(samples, "netfence_agent_denied_bytes_total", **web_in)

    with ProbeLoop(world) as probes:  # real TCP connections between the pods' namespaces
        await probes.rounds(3)
    probes.check(minimum=3)  # good -> web connected, bad -> web never did
    kernel = await asyncio.to_thread(drop_packets, world.node0, world.web_chain)

    async def counted() -> float:
        _, now = await scrape(node0)  # the agent reads the kernel at most once a second
        value = total(now, "netfence_agent_denied_packets_total", **web_in)
        return value if value >= kernel else 0.0

    value = await eventually(counted, timeout=10, interval=0.2, what="web's denied packets reaching the kernel's")
    assert value >= before + 3  # at least one dropped SYN per denied probe
    _, now = await scrape(node0)
    assert total(now, "netfence_agent_denied_bytes_total", **web_in) >= bytes_before + 3 * 40  # >= 40-byte SYNs
    # Bounded labels: only this node's pods a policy isolates (web, ingress) have series.
    series = {dict(ls)["pod"] + "/" + dict(ls)["direction"] for (n, ls), _ in now.items()
              if n == "netfence_agent_denied_packets_total" and dict(ls)["namespace"] == ns}
    assert series == {"web/ingress"}
    _, node1 = await scrape(env.agents[1].metrics_port)
    series1 = {dict(ls)["pod"] for (n, ls), _ in node1.items()
               if n == "netfence_agent_denied_packets_total" and dict(ls)["namespace"] == ns}
    assert series1 == {"good"}  # bad is selected by no policy: no chain, no series
