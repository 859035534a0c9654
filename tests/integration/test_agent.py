"""The node agent with real processes: rendering, foreign rules, fail-static, etcd outages, drift, failures.

Every test gets its own two-node test bed (``enforcement_helpers.build_world``):
good -> web is allowed, bad -> web is denied, both across nodes; node 0 enforces it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from etcd3aio import Etcd3Client
from tests.integration.enforcement_helpers import (
    ProbeLoop,
    World,
    agent_health,
    allow_from,
    chain_rules,
    cps,
    drop_packets,
    in_netns,
    iptables_save,
    namespace_of_test,
    report_revision,
    running_world,
    store_of,
    wait_agent_serving,
)
from tests.integration.helpers import eventually

from netfence import __version__
from netfence.model.relevance import needed_revisions
from netfence.store.errors import CompactedError
from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv

RESYNC_SECONDS = 2.0


@pytest.fixture
async def world(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=2, resync_seconds=RESYNC_SECONDS, report_ttl=4)
    async with running_world(env, namespace_of_test("ag", request)) as built:
        yield built


def stop_agent(env: NetfenceEnv, index: int, sig: int) -> None:
    process = env.agents[index].process
    process.signal(sig)
    assert process.proc is not None
    process.proc.wait(timeout=15)


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


# --- rendering ----------------------------------------------------------------------


async def test_deny_counts_drops_and_node_reports_what_it_applied(world: World) -> None:
    env, node0 = world.env, world.node0
    before = drop_packets(node0, world.web_chain)
    for _ in range(3):
        assert not world.denied_connects(timeout=0.5)
    assert world.allowed()
    assert drop_packets(node0, world.web_chain) >= before + 3

    store = await store_of(env)
    try:
        state = await store.committed_snapshot()
        reports = await store.read_reports()
    finally:
        await store.close()
    # agents apply and report only commits that touch their node (model/relevance.py)
    needed = needed_revisions(state.values, state.mod_revisions, reports)
    for agent in env.agents.values():
        report = reports[agent.node]
        assert report["node"] == agent.node
        assert report["appliedRevision"] >= needed[agent.node] > 0
        assert report["lastError"] is None
        assert report["version"] == __version__
        assert 1 in report["schemaSupported"]
        assert datetime.fromisoformat(report["time"]).tzinfo is not None
        # The counts are what is in the node's kernel: our chains' rules and our sets.
        ours = [ln for ln in iptables_save(agent.netns).splitlines()
                if re.match(r"-A (NETFENCE-|nf-(fw|tw|pi|po)-)", ln)]
        sets = [s for s in in_netns(agent.netns, "ipset", "list", "-n").stdout.split() if s.startswith("nf4-")]
        assert report["rules"] == len(ours) > 0
        assert report["sets"] == len(sets) > 0
    body = await agent_health(env, 0, "/readyz")
    assert body is not None and body["etcdConnected"] and not body["enforcingStale"]
    assert body["appliedRevision"] == reports[env.agents[0].node]["appliedRevision"]


# --- foreign rules ----------------------------------------------------------------------

FOREIGN_SETUP = [
    ["ipset", "create", "fx-peers", "hash:ip"],
    ["ipset", "add", "fx-peers", "10.9.9.9"],
    ["ipset", "create", "nf4x-lookalike", "hash:net"],
    ["ipset", "add", "nf4x-lookalike", "10.8.0.0/16"],
    ["iptables", "-w", "-N", "FOREIGN-FW"],
    ["iptables", "-w", "-A", "FOREIGN-FW", "-m", "set", "--match-set", "fx-peers", "src", "-j", "ACCEPT"],
    ["iptables", "-w", "-A", "FOREIGN-FW", "-s", "10.9.9.8/32", "-j", "DROP"],
    ["iptables", "-w", "-A", "FORWARD", "-j", "FOREIGN-FW"],
    ["iptables", "-w", "-I", "FORWARD", "1", "-s", "10.9.9.7/32", "-j", "RETURN"],  # pushes our hook down
    ["iptables", "-w", "-N", "nf-keep-me"],
    ["iptables", "-w", "-A", "nf-keep-me", "-j", "RETURN"],
    ["iptables", "-w", "-N", "NETFENCEX"],
    ["iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP"],
    ["iptables", "-w", "-t", "nat", "-N", "FOREIGN-NAT"],
    ["iptables", "-w", "-t", "nat", "-A", "FOREIGN-NAT", "-d", "10.9.9.9/32", "-j", "RETURN"],
    ["iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-j", "FOREIGN-NAT"],
]
_OURS = re.compile(r"^(:|-A )(NETFENCE-|nf-(fw|tw|pi|po)-)")
_SET_OURS = re.compile(r"^(create|add) nf[46]-")
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def foreign_view(netns: str) -> list[str]:
    """Everything in the node's filter/nat tables and ipsets that is not ours."""
    lines = []
    for table in ("filter", "nat"):
        for line in iptables_save(netns, table).splitlines():
            if line.startswith("#") or _OURS.match(line) or line == "-A FORWARD -j NETFENCE-FORWARD":
                continue
            lines.append(_COUNTERS.sub("", line))
    lines += [ln for ln in in_netns(netns, "ipset", "save").stdout.splitlines() if not _SET_OURS.match(ln)]
    return lines


def forward_rules(netns: str) -> list[str]:
    return [ln for ln in iptables_save(netns).splitlines() if ln.startswith("-A FORWARD ")]


async def test_foreign_chains_rules_and_sets_survive_syncs(world: World) -> None:
    env, ns = world.env, world.ns
    nodes = [a.netns for a in env.agents.values()]
    for netns in nodes:
        for argv in FOREIGN_SETUP:
            in_netns(netns, *argv)
    baseline = {netns: foreign_view(netns) for netns in nodes}
    assert all("-A FOREIGN-FW -s 10.9.9.8/32 -j DROP" in view for view in baseline.values())

    def unchanged(what: str) -> None:
        for netns in nodes:
            assert foreign_view(netns) == baseline[netns], f"foreign state changed after {what} in {netns}"

    # 1. The hook is no longer first: drift, repaired by a full sync that leaves the foreign rule in place.
    async def hook_first_again() -> bool:
        return all(forward_rules(n)[0] == "-A FORWARD -j NETFENCE-FORWARD" for n in nodes)

    await eventually(hook_first_again, timeout=RESYNC_SECONDS + 10, what="our hook back at the top of FORWARD")
    assert forward_rules(world.node0) == [
        "-A FORWARD -j NETFENCE-FORWARD", "-A FORWARD -s 10.9.9.7/32 -j RETURN", "-A FORWARD -j FOREIGN-FW"]
    unchanged("a full sync (hook repair)")

    # 2. Deltas: a changed policy chain, then set membership both ways.
    await env.wait_enforced(dict([await env.apply_manifest(
        allow_from(ns, "web-from-good", {"app": "web"}, {"role": "good"}, port=81))]))
    assert not world.allowed(timeout=0.5)
    unchanged("a policy change")
    for role in ("good", "bad"):
        await env.wait_enforced(dict([await env.label("Pod", "bad", {"role": role}, ns)]))
        unchanged(f"a membership change (role={role})")

    # 3. A full sync after a restart of the agent.
    before = await report_revision(env, env.agents[0].node)
    stop_agent(env, 0, signal.SIGTERM)
    env.start_agent(0)
    await wait_agent_serving(env, 0, before)
    unchanged("an agent restart")
    body = await agent_health(env, 0)
    assert body is not None and body["applies"] >= 1


# --- fail-static ------------------------------------------------------------------------


async def test_enforcement_never_lapses_across_20_agent_restarts(world: World) -> None:
    env = world.env
    restarts = 20
    started = time.monotonic()
    with ProbeLoop(world) as probes:
        await eventually(lambda: probes.probed(3), what="probes running")
        for i in range(restarts):
            index = i % 2  # both nodes; each gets SIGTERM and SIGKILL
            sig = signal.SIGTERM if i % 4 < 2 else signal.SIGKILL
            before = await report_revision(env, env.agents[index].node)
            await asyncio.to_thread(stop_agent, env, index, sig)
            env.start_agent(index)
            await wait_agent_serving(env, index, before)
        mark = probes.snapshot()
        await eventually(lambda: probes.probed(3, mark), what="probes against the last agents")
    tally = probes.snapshot()
    seconds = time.monotonic() - started
    assert tally.denied_connected == [], f"denied connections got through at {tally.denied_connected}"
    assert tally.allowed_failed == [], f"allowed connections failed at {tally.allowed_failed}"
    assert tally.allowed_ok >= restarts and tally.denied_blocked >= restarts, (tally, seconds)


# --- etcd outage and compaction -------------------------------------------------------------


async def test_etcd_outage_keeps_enforcing_and_recovers(world: World) -> None:
    env, ns = world.env, world.ns
    etcd = env.cluster.netfence_etcd
    with ProbeLoop(world) as probes:
        await eventually(lambda: probes.probed(2), what="probes running")
        try:
            etcd.kill()

            async def stale(index: int) -> bool:
                body = await agent_health(env, index)
                return body is not None and body["etcdConnected"] is False and body["enforcingStale"] is True

            for index in env.agents:
                await eventually(lambda i=index: stale(i), timeout=15, what=f"agent {index} to notice the outage")
            during = probes.snapshot()
            await eventually(lambda: probes.probed(5, during), what="probes while etcd is down")
            assert all(a.process.alive() for a in env.agents.values())
            readyz = await agent_health(env, 0, "/readyz")
            assert readyz is not None and readyz["etcdConnected"] is False
        finally:
            await asyncio.to_thread(etcd.restart)

        async def connected(index: int) -> bool:
            body = await agent_health(env, index)
            return body is not None and body["etcdConnected"] is True and body["enforcingStale"] is False

        for index in env.agents:
            await eventually(lambda i=index: connected(i), timeout=30, what=f"agent {index} back on etcd")
    tally = probes.snapshot()
    assert tally.denied_connected == [] and tally.allowed_failed == [], tally

    # A change made after the outage is enforced: now bad is allowed and good is not.
    marks = dict([await env.apply_manifest(allow_from(ns, "web-from-good", {"app": "web"}, {"role": "bad"}))])
    await env.wait_enforced(marks, timeout=60)
    assert world.bad_exchange()
    assert not world.allowed(timeout=0.5)


async def test_restart_after_compaction_converges_with_a_full_resync(world: World) -> None:
    env, ns = world.env, world.ns
    node = env.agents[0].node
    store = await store_of(env)
    raw = Etcd3Client([env.cluster.netfence_etcd.endpoint])
    await raw.connect()
    try:
        applied = int((await store.read_reports())[node]["appliedRevision"])
        stop_agent(env, 0, signal.SIGTERM)
        marks = dict([await env.apply_manifest(allow_from(ns, "web-from-bad", {"app": "web"}, {"role": "bad"}))])
        await env.delete_policy(ns, "web-from-good")

        async def committed() -> bool:
            values = (await store.committed_snapshot()).values
            return f"policies/{ns}/web-from-bad" in values and f"policies/{ns}/web-from-good" not in values

        await eventually(committed, what="the controller to commit both changes")
        # Fail-static: the stopped agent's node keeps the old rules.
        assert world.allowed()
        assert not world.denied_connects()
        assert raw.kv is not None
        await raw.kv.compact((await store.read_all()).revision, physical=True)
        with pytest.raises(CompactedError):
            async for _ in store.follow_commits(applied):
                break

        env.start_agent(0)
        await env.wait_enforced(marks, timeout=60)
        assert world.bad_exchange()
        assert not world.allowed(timeout=0.5)
        assert world.web_policy_chain not in iptables_save(world.node0)  # the deleted policy's chain is gone
    finally:
        await raw.close()
        await store.close()


# --- drift ------------------------------------------------------------------------------------


async def test_drift_is_repaired_within_the_resync_period(world: World) -> None:
    env, node0 = world.env, world.node0
    rules = chain_rules(node0, world.web_chain)
    assert rules

    # An emptied endpoint chain lets the denied client in until the agent rewrites it.
    in_netns(node0, "iptables", "-w", "-F", world.web_chain)
    flushed = time.monotonic()
    assert world.bad_exchange()

    async def chain_back() -> bool:
        return chain_rules(node0, world.web_chain) == rules and not world.denied_connects()

    await eventually(chain_back, timeout=RESYNC_SECONDS + 15, interval=0.1, what="the flushed chain repaired")
    assert time.monotonic() - flushed < RESYNC_SECONDS + 5

    # An emptied peer set shuts the allowed client out until the agent refills it.
    match = re.search(r"--match-set (nf4-\S+) src", "\n".join(chain_rules(node0, world.web_policy_chain)))
    assert match is not None
    peer_set = match.group(1)
    members = in_netns(node0, "ipset", "list", peer_set).stdout.split("Members:")[1].split()
    assert members == [world.good.ip]
    in_netns(node0, "ipset", "flush", peer_set)
    flushed = time.monotonic()
    assert not world.allowed(timeout=0.5)

    async def set_back() -> bool:
        listing = in_netns(node0, "ipset", "list", peer_set).stdout
        return listing.split("Members:")[1].split() == members and world.allowed()

    await eventually(set_back, timeout=RESYNC_SECONDS + 15, interval=0.1, what="the flushed set refilled")
    assert time.monotonic() - flushed < RESYNC_SECONDS + 5
    body = await agent_health(env, 0)
    assert body is not None and body["driftRepairs"] >= 2


# --- a failing apply ------------------------------------------------------------------------------

SHIM = """#!/bin/sh
# iptables-restore for one test agent: fails while the fault file exists.
if [ -e "{fault}" ]; then
    echo "iptables-restore: injected fault: {fault} exists" >&2
    exit 4
fi
exec "{real}" "$@"
"""


def status_cli(env: NetfenceEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netfence.cli", "status", f"--etcd-endpoints={env.cluster.netfence_etcd.endpoint}",
         f"--etcd-prefix={env.prefix}", *args],
        capture_output=True, text=True, timeout=60, check=True)


async def test_failed_apply_keeps_rules_degrades_status_and_recovers(world: World, tmp_path: Path) -> None:
    env, ns = world.env, world.ns
    node = env.agents[0].node
    real = shutil.which("iptables-restore")
    assert real is not None
    shim_dir, fault = tmp_path / "shim", tmp_path / "fault"
    shim_dir.mkdir()
    (shim_dir / "iptables-restore").write_text(SHIM.format(fault=fault, real=real))
    (shim_dir / "iptables-restore").chmod(0o755)

    before = await report_revision(env, node)
    stop_agent(env, 0, signal.SIGTERM)
    env.start_agent(0, env={"PATH": f"{shim_dir}:{os.environ.get('PATH', '')}"})
    await wait_agent_serving(env, 0, before)

    fault.touch()
    try:
        marks = dict([await env.apply_manifest(allow_from(ns, "web-from-bad", {"app": "web"}, {"role": "bad"}))])

        async def failing_report() -> dict[str, Any] | None:
            store = await store_of(env)
            try:
                report = (await store.read_reports()).get(node) or {}
            finally:
                await store.close()
            return report if "injected fault" in (report.get("lastError") or "") else None

        report = await eventually(failing_report, what="the node report to carry the error")

        async def degraded() -> dict[str, Any] | None:
            status = (await cps(env, f"{ns}.web-from-bad")).get("status") or {}
            return status if status.get("phase") == "Degraded" else None

        status = await eventually(degraded, what="the new policy's status to be Degraded")
        message = condition(status, "Ready")["message"]
        assert node in message and "injected fault" in message, message
        assert condition(status, "Degraded")["status"] == "True"
        assert condition(status, "Degraded")["reason"] == "ApplyFailed"
        entry = next(n for n in status["nodes"] if n["name"] == node)
        assert entry["synced"] is False and "injected fault" in entry["message"]
        assert entry["appliedRevision"] == report["appliedRevision"]

        # The previous rules stay in force: bad is still denied, good still allowed.
        assert not world.denied_connects()
        assert world.allowed()
        assert env.agents[0].process.alive()

        # The CLI shows the error and the lag.
        listed = json.loads(status_cli(env, "-o", "json").stdout)
        row = next(a for a in listed["agents"] if a["node"] == node)
        assert "injected fault" in row["lastError"] and row["lag"] > 0
    finally:
        fault.unlink(missing_ok=True)

    # The agent retries (with backoff) and recovers without a restart.
    await env.wait_enforced(marks, timeout=60)
    assert world.bad_exchange()
    status = (await cps(env, f"{ns}.web-from-bad"))["status"]
    assert status["phase"] == "Enforced" and condition(status, "Degraded")["status"] == "False"
    body = await agent_health(env, 0, "/readyz")
    assert body is not None and body["lastError"] is None


# --- a dead agent ------------------------------------------------------------------------------------


async def test_dead_agent_report_expires_then_status_recovers(world: World) -> None:
    env, ns = world.env, world.ns
    node = env.agents[0].node
    stop_agent(env, 0, signal.SIGKILL)
    killed = time.monotonic()

    async def degraded() -> dict[str, Any] | None:
        status = (await cps(env, f"{ns}.web-from-good")).get("status") or {}
        return status if status.get("phase") == "Degraded" else None

    status = await eventually(degraded, timeout=env.report_ttl + 20, what="Degraded after the report expired")
    # Not before the lease could expire (keepalives go out every ttl/3, so it has >= 2/3 ttl left).
    assert time.monotonic() - killed >= env.report_ttl / 2
    assert condition(status, "Ready")["reason"] == "NodeReportMissing"
    assert node in condition(status, "Ready")["message"]
    assert status["synced"] == "0/1"
    store = await store_of(env)
    try:
        assert node not in await store.read_reports()
    finally:
        await store.close()
    # A policy only node 1 must enforce is not affected.
    other = (await cps(env, f"{ns}.good-from-ns"))["status"]
    assert other["phase"] == "Enforced" and other["synced"] == "1/1"
    # The dead agent's rules stay in force.
    assert not world.denied_connects()
    assert world.allowed()

    env.start_agent(0)
    await env.wait_enforced(timeout=60)
    status = (await cps(env, f"{ns}.web-from-good"))["status"]
    assert status["phase"] == "Enforced" and status["synced"] == "1/1"
