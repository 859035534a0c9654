"""Corrupt and foreign values in Netfence's etcd never pass silently (issue 9, item 5).

The world (``enforcement_helpers.build_world``): good -> web allowed by policy
``web-from-good`` (enforced on node 0), bad -> web denied; both pairs are probed
continuously and their verdicts never change here: zero wrong probes.

* garbage written to the policy's key behind the controller's back is not
  applied (agents keep the last good value and report the key), and the
  controller rewrites it within ``REWRITE_BUDGET``;
* a valid but foreign value (bad's IP added to web's allowed set) is never
  enforced, is reported, and is rewritten within the budget; with the
  controller stopped it stays not enforced, also by an agent restarted meanwhile;
* with the controller stopped, a corrupt value committed as if by a broken
  controller: an agent restarted meanwhile has no good value, keeps the rules
  already in the kernel for the policy, and says so in ``badKeys``; the
  ClusterPolicyStatus names node and key;
* the same for a ClusterNetworkPolicy (``cpolicies/<name>``): an Admin Deny of
  bad -> good (which ``good-from-ns`` alone would allow) keeps holding on the
  restarted agent, web -> good (through the same tier chain) stays allowed, and
  the controller's rewrite restores normal operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from etcd3aio import Etcd3Client
from kubernetes_asyncio import client, watch
from tests.integration.enforcement_helpers import (
    Pair,
    ProbeLoop,
    ProbeTally,
    World,
    agent_health,
    chain_rules,
    in_netns,
    namespace_of_test,
    report_revision,
    running_world,
    store_of,
    wait_agent_serving,
)
from tests.integration.helpers import eventually

from netfence.dataplane.names import endpoint_chain
from netfence.dataplane.render_tiers import cluster_chain
from netfence.model.cluster_policy import API_GROUP as CNP_GROUP
from netfence.model.cluster_policy import API_VERSIONS as CNP_VERSIONS
from netfence.store import layout as L
from netfence.store.etcd import EtcdStore
from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv

REWRITE_BUDGET = 2.0  # seconds from a foreign write to the controller's rewrite
STATUS_WINDOW = 1.5  # test (iii): the restarted controller's coalescing window (it delays the rewrite)
# The controller's coalescing window in these tests (default 20 ms): every write of the controller,
# its rewrites included, waits this long, so agents report a foreign write before it is rewritten
# (with 20 ms that is a race the agents usually, but not always, win). Rewrites took 30-140 ms with
# the default window; with this one the 2 s budget is met with the same margin.
COALESCE = 0.3
GARBAGE = b"{this is not json"


@pytest.fixture
async def world(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=2, resync_seconds=2.0, report_ttl=4,
                      controller_extra_args=(f"--coalesce-ms={COALESCE * 1000:.0f}",))
    async with running_world(env, namespace_of_test("cv", request)) as world:
        yield world


@pytest.fixture
async def raw(world: World) -> AsyncIterator[Etcd3Client]:
    """A plain etcd client: writes that do not go through the controller (or its fence)."""
    etcd = Etcd3Client([world.env.cluster.netfence_etcd.endpoint])
    await etcd.connect()
    try:
        yield etcd
    finally:
        await etcd.close()


@pytest.fixture
async def store(world: World) -> AsyncIterator[EtcdStore]:
    reader = await store_of(world.env)
    try:
        yield reader
    finally:
        await reader.close()


def policy_key(world: World) -> str:
    return f"policies/{world.ns}/web-from-good"


async def put(raw: Etcd3Client, env: NetfenceEnv, rel: str, value: bytes) -> int:
    """A plain put (outside any controller change); its revision."""
    assert raw.kv is not None
    resp = await raw.kv.put(L.Layout(env.prefix).key(rel), value)
    return int(resp.header.revision)


async def commit_as_a_broken_controller(raw: Etcd3Client, env: NetfenceEnv, rel: str, value: bytes) -> int:
    """Put ``value`` with a commit marker in one transaction, as a controller with a bug would."""
    assert raw.kv is not None
    layout = L.Layout(env.prefix)
    marker = L.encode({"seq": 10**6, "time": datetime.now(UTC).isoformat(), "controller": "broken"})
    resp = await raw.kv.txn([], [raw.kv.txn_op_put(layout.key(rel), value),
                                 raw.kv.txn_op_put(layout.key(L.COMMIT), marker)])
    assert resp.succeeded
    return int(resp.header.revision)


async def rewritten(store: EtcdStore, rel: str, after: int, good: bytes) -> float:
    """When ``rel`` is written back to ``good`` after revision ``after`` (monotonic time seen)."""
    stream = store.watch_changes(rel, after, prefix=False)
    async with contextlib.aclosing(stream):
        async for _revision, changes in stream:
            if changes.get(rel) == good:
                return time.monotonic()
    raise AssertionError("watch ended")


def bad_entry(report: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    return next((e for e in (report or {}).get("badKeys") or [] if e.get("key") == key), None)


async def reported_then_cleared(store: EtcdStore, after: int, node: str, key: str) -> dict[str, Any]:
    """Node reports written after ``after``: the ``badKeys`` entry for ``key``, once a later report drops it."""
    entry: dict[str, Any] | None = None
    stream = store.watch_reports(after)
    async with contextlib.aclosing(stream):
        async for who, report in stream:
            if who != node:
                continue
            found = bad_entry(report, key)
            if entry is None and found is not None:
                entry = found
            elif entry is not None and found is None and report is not None:
                return entry
    raise AssertionError("watch ended")


async def report_of(store: EtcdStore, node: str) -> dict[str, Any]:
    return dict((await store.read_reports()).get(node) or {})


async def _probed(probes: ProbeLoop, n: int, since: ProbeTally | None = None) -> bool:
    now, base = probes.snapshot(), since or ProbeTally()
    return now.allowed_ok >= base.allowed_ok + n and now.denied_blocked >= base.denied_blocked + n


def no_wrong_probes(probes: ProbeLoop) -> None:
    tally = probes.snapshot()
    assert tally.denied_connected == [], f"bad -> web connected at {tally.denied_connected}"
    assert tally.allowed_failed == [], f"good -> web failed at {tally.allowed_failed}"


async def foreign_write_is_reported_and_rewritten(
    world: World, raw: Etcd3Client, store: EtcdStore, rel: str, value: bytes
) -> tuple[float, dict[str, Any]]:
    """Write ``value`` to ``rel`` behind the controller's back; (seconds to the rewrite, node 0's report entry)."""
    env = world.env
    good = (await store.get(rel))
    assert good is not None
    start = time.monotonic()
    revision = await put(raw, env, rel, value)
    node = env.agents[0].node
    entry, back = await asyncio.wait_for(asyncio.gather(
        reported_then_cleared(store, revision, node, rel), rewritten(store, rel, revision, good.value)), 20)
    return back - start, entry


# --- (i) garbage -------------------------------------------------------------------------------------


async def test_garbage_behind_the_controllers_back_is_reported_and_rewritten_within_2s(
    world: World, raw: Etcd3Client, store: EtcdStore
) -> None:
    rel = policy_key(world)
    with ProbeLoop(world) as probes:
        await eventually(lambda: _probed(probes, 2), what="probes running")
        seconds, entry = await foreign_write_is_reported_and_rewritten(world, raw, store, rel, GARBAGE)
        print(f"\ngarbage at {rel}: rewritten by the controller after {seconds * 1000:.0f} ms")
        assert "written outside a controller commit" in entry["reason"], entry
        assert "last good value stays in force" in entry["reason"], entry
        assert seconds <= REWRITE_BUDGET
        mark = probes.snapshot()
        await eventually(lambda: _probed(probes, 3, mark), what="probes after the rewrite")
    no_wrong_probes(probes)
    report = await report_of(store, world.env.agents[0].node)
    assert report["badKeys"] == [] and report["badKeysTotal"] == 0 and report["lastError"] is None


# --- (ii) a valid but foreign value ------------------------------------------------------------------


async def allowed_set(store: EtcdStore, world: World) -> tuple[str, dict[str, Any]]:
    """The key and value of the peer set web-from-good allows (good's pods)."""
    policy = json.loads((await store.get(policy_key(world))).value)  # type: ignore[union-attr]
    set_id = policy["ingress"][0]["peers"][0]
    rel = f"sets/{set_id}"
    current = await store.get(rel)
    assert current is not None, f"{rel} missing (layout schema 1 expected)"
    value = json.loads(current.value)
    assert value["members"] == [world.good.ip]
    return rel, value


def set_members(world: World, rel: str) -> list[str]:
    name = "nf4-" + rel.partition("/")[2]
    return in_netns(world.node0, "ipset", "list", name).stdout.split("Members:")[1].split()


async def test_a_foreign_set_member_is_never_enforced_and_is_rewritten_within_2s(
    world: World, raw: Etcd3Client, store: EtcdStore
) -> None:
    env = world.env
    rel, value = await allowed_set(store, world)
    foreign = L.encode({**value, "members": sorted([*value["members"], world.bad.ip])})
    with ProbeLoop(world) as probes:
        await eventually(lambda: _probed(probes, 2), what="probes running")
        # With the controller running: reported meanwhile, rewritten within the budget.
        seconds, entry = await foreign_write_is_reported_and_rewritten(world, raw, store, rel, foreign)
        print(f"\nforeign member in {rel}: rewritten by the controller after {seconds * 1000:.0f} ms")
        assert "written outside a controller commit" in entry["reason"], entry
        assert seconds <= REWRITE_BUDGET

        # With no controller to rewrite it, the foreign value stays in etcd and is still not enforced,
        # also by an agent that restarts meanwhile (it has no good value: the kernel's set is kept).
        env.controllers["controller-0"].stop()
        node = env.agents[0].node
        revision = await put(raw, env, rel, foreign)

        async def listed() -> dict[str, Any] | None:
            return bad_entry(await report_of(store, node), rel)

        await eventually(listed, timeout=10, interval=0.05, what=f"{node} to report {rel}")
        before = await report_revision(env, node)
        await asyncio.to_thread(_stop_agent, env, 0)
        env.start_agent(0)
        await wait_agent_serving(env, 0, before)
        kept = await eventually(listed, timeout=10, interval=0.05, what="the restarted agent to report it")
        assert kept is not None and f"revision {revision}" in kept["reason"], kept
        assert "rules already in the kernel" in kept["reason"], kept
        assert set_members(world, rel) == [world.good.ip]
        mark = probes.snapshot()
        await eventually(lambda: _probed(probes, 3, mark), what="probes against the restarted agent")
        assert not world.denied_connects(timeout=0.5)

        # The controller comes back and rewrites it; the report clears.
        env.start_controller("controller-0")

        async def cleared() -> bool:
            return (await store.get(rel)).value == L.encode(value) and await listed() is None  # type: ignore[union-attr]

        await eventually(cleared, timeout=30, what="the rewrite and a clean report")
        mark = probes.snapshot()
        await eventually(lambda: _probed(probes, 3, mark), what="probes after the rewrite")
    no_wrong_probes(probes)
    assert set_members(world, rel) == [world.good.ip]


def _stop_agent(env: NetfenceEnv, index: int) -> None:
    process = env.agents[index].process
    process.signal(signal.SIGTERM)
    assert process.proc is not None
    process.proc.wait(timeout=15)


# --- (iii) a restarted agent facing a corrupt value ------------------------------------------------


async def status_updates(env: NetfenceEnv, name: str, seen: list[dict[str, Any]], ready: asyncio.Event) -> None:
    """Append every status written to ClusterPolicyStatus ``name`` (a Kubernetes watch)."""
    assert env.api is not None
    api = client.CustomObjectsApi(env.api)
    listing = await api.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses")
    stream = watch.Watch()
    ready.set()
    async with stream:
        async for event in stream.stream(api.list_cluster_custom_object, "netfence.dev", "v1alpha1",
                                         "clusterpolicystatuses", resource_version=listing["metadata"][
                                             "resourceVersion"], timeout_seconds=120):
            obj = event["object"]
            if obj["metadata"]["name"] == name and obj.get("status"):
                seen.append(obj["status"])


def degraded_naming(statuses: list[dict[str, Any]], node: str, key: str) -> dict[str, Any] | None:
    for status in statuses:
        text = json.dumps(status.get("conditions") or [])
        if status.get("phase") == "Degraded" and node in text and key in text:
            return status
    return None


async def test_restarted_agent_keeps_kernel_rules_for_a_corrupt_policy_and_says_so(
    world: World, raw: Etcd3Client, store: EtcdStore
) -> None:
    env = world.env
    rel = policy_key(world)
    node = env.agents[0].node
    rules = chain_rules(world.node0, world.web_policy_chain)
    assert rules
    statuses: list[dict[str, Any]] = []
    watching = asyncio.Event()
    status_task = asyncio.create_task(status_updates(env, f"{world.ns}.web-from-good", statuses, watching))
    try:
        with ProbeLoop(world) as probes:
            await eventually(lambda: _probed(probes, 2), what="probes running")
            env.controllers["controller-0"].stop()
            await commit_as_a_broken_controller(raw, env, rel, GARBAGE)

            async def listed() -> dict[str, Any] | None:
                return bad_entry(await report_of(store, node), rel)

            # The running agent keeps its last good value and says why.
            entry = await eventually(listed, timeout=10, interval=0.05, what=f"{node} to report {rel}")
            assert entry is not None and entry["reason"].startswith("corrupt value"), entry
            assert "last good value" in entry["reason"], entry

            # Restarted, it has no good value: the kernel's rules for the policy are kept.
            before = await report_revision(env, node)
            await asyncio.to_thread(_stop_agent, env, 0)
            env.start_agent(0)
            await wait_agent_serving(env, 0, before)
            entry = await eventually(listed, timeout=10, interval=0.05, what="the restarted agent to report it")
            assert entry is not None, entry
            assert "no good value: the rules already in the kernel for it are kept" in entry["reason"], entry
            assert chain_rules(world.node0, world.web_policy_chain) == rules
            assert "keeping the rules the kernel holds for it" in env.agents[0].process.tail(200)
            body = await agent_health(env, 0)
            assert body is not None and body["badKeys"] == 1 and body["lastError"] is None
            mark = probes.snapshot()
            await eventually(lambda: _probed(probes, 5, mark), what="probes against the restarted agent")
            assert world.allowed()

            # The controller comes back and rewrites the value; the report and the status clear.
            # Its coalescing window (a production setting) is stretched so that the status it
            # writes from the agent's report before its first write is observable for a while.
            await asyncio.wait_for(watching.wait(), 10)
            env.start_controller("controller-0", extra=(f"--coalesce-ms={STATUS_WINDOW * 1000:.0f}",))

            async def cleared() -> bool:
                return await listed() is None and (await agent_health(env, 0) or {}).get("badKeys") == 0

            await eventually(cleared, timeout=30, what="the rewrite and a clean report")
            await env.wait_enforced(timeout=30)
            mark = probes.snapshot()
            await eventually(lambda: _probed(probes, 3, mark), what="probes after the rewrite")
        no_wrong_probes(probes)
    finally:
        status_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await status_task
    degraded = degraded_naming(statuses, node, rel)
    phases = [s.get("phase") for s in statuses]
    print(f"\nstatus phases written while the controller came back: {phases}")
    assert degraded is not None, f"no Degraded status naming {node} and {rel}: {statuses}"
    print(f"Degraded conditions: {degraded['conditions']}")
    assert statuses[-1]["phase"] == "Enforced"


# --- (iv) a restarted agent facing a corrupt cluster policy ----------------------------------------

#: Probed besides the world's pairs once the cluster policy is enforced (both end at good, on node 1).
CNP_PAIRS = (Pair("web->good", "web", "good", True), Pair("bad->good", "bad", "good", False))


def admin_deny_bad_to_good(ns: str, name: str) -> dict[str, Any]:
    """Admin tier: good (node 1) denies ingress from bad; ``good-from-ns`` alone would allow it."""
    def pods(role: str) -> dict[str, Any]:
        return {"pods": {"namespaceSelector": {"matchLabels": {"name": ns}},
                         "podSelector": {"matchLabels": {"role": role}}}}

    return {
        "apiVersion": f"{CNP_GROUP}/{CNP_VERSIONS[0]}", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": 10, "subject": pods("good"),
                 "ingress": [{"name": "from-bad", "action": "Deny", "from": [pods("bad")]}]},
    }


async def test_restarted_agent_keeps_kernel_rules_for_a_corrupt_cluster_policy_and_says_so(
    world: World, raw: Etcd3Client, store: EtcdStore
) -> None:
    env, ns = world.env, world.ns
    name = f"{ns}-deny-bad"  # cluster-scoped: a name of this test alone
    rel = f"cpolicies/{name}"
    node, netns = env.agents[1].node, env.agents[1].netns  # good lives on node 1
    world.mark(await env.apply_manifest(admin_deny_bad_to_good(ns, name)))
    await env.wait_enforced(world.marks, timeout=60)
    world.layout = dataclasses.replace(world.layout, pairs=(*world.layout.pairs, *CNP_PAIRS))
    chains = (cluster_chain("ingress", name), endpoint_chain("ingress", f"{ns}/good"))
    kernel = {chain: chain_rules(netns, chain) for chain in chains}
    assert all(kernel.values()), kernel
    assert any(line.endswith(f"-j {chains[0]}") for line in kernel[chains[1]])

    async def listed() -> dict[str, Any] | None:
        return bad_entry(await report_of(store, node), rel)

    with ProbeLoop(world) as probes:
        await probes.rounds(2)
        env.controllers["controller-0"].stop()
        await commit_as_a_broken_controller(raw, env, rel, GARBAGE)

        # The running agent keeps its last good value and says why.
        entry = await eventually(listed, timeout=10, interval=0.05, what=f"{node} to report {rel}")
        assert entry is not None and entry["reason"].startswith("corrupt value"), entry
        assert "last good value" in entry["reason"], entry

        # Restarted, it has no good value: the kernel's chain of the cluster policy is kept.
        before = await report_revision(env, node)
        await asyncio.to_thread(_stop_agent, env, 1)
        env.start_agent(1)
        await wait_agent_serving(env, 1, before)
        entry = await eventually(listed, timeout=10, interval=0.05, what="the restarted agent to report it")
        assert entry is not None, entry
        assert "no good value: the rules already in the kernel for it are kept" in entry["reason"], entry
        assert {chain: chain_rules(netns, chain) for chain in chains} == kernel
        assert "keeping the rules the kernel holds for it" in env.agents[1].process.tail(200)
        body = await agent_health(env, 1)
        assert body is not None and body["badKeys"] == 1 and body["lastError"] is None
        await probes.rounds(5)  # bad -> good still denied, web -> good still allowed

        # The controller comes back and rewrites the value; the report clears, all is enforced again.
        env.start_controller("controller-0")

        async def cleared() -> bool:
            return await listed() is None and (await agent_health(env, 1) or {}).get("badKeys") == 0

        await eventually(cleared, timeout=30, what="the rewrite and a clean report")
        await env.wait_enforced(timeout=30)
        assert {chain: chain_rules(netns, chain) for chain in chains} == kernel
        await probes.rounds(3)
    no_wrong_probes(probes)
    print(f"\nprobes: {probes.check()}")
