"""Upgrades with real processes: controller handover, agent rollout, mixed versions, layout migration, CRD versions.

The world (namespace ``upg-*``, two nodes, each enforcing something):

* ``web0`` (app=web, TCP 80) on node 0 and ``web1`` on node 1;
* ``good0``/``bad0`` (role=good/bad) on node 0, ``good1``/``bad1`` on node 1;
* policy ``web-from-good``: web pods accept TCP 80 from role=good only.

Probed continuously across nodes: good1 -> web0 and good0 -> web1 (allowed),
bad1 -> web0 and bad0 -> web1 (denied). ``spare`` (node 1) is relabelled by the
churn and never probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client, config
from tests.integration.enforcement_helpers import (
    Layout,
    Pair,
    ProbeLoop,
    World,
    allow_from,
    allow_from_spec,
    build_world,
    probes_hold,
)
from tests.integration.helpers import committed_through, controller_probe, eventually, open_store

from netfence.model.compiler import compile_world
from netfence.model.policy import policy_from_k8s
from netfence.model.world import namespace_from_k8s, pod_from_k8s
from netfence.store import layout as L
from netfence.store import migration as M
from netfence.store.etcd import EtcdStore
from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv
from netfence_lab.process import ManagedProcess

REPO = Path(__file__).resolve().parents[2]
OLD_CRD = Path(__file__).parent / "fixtures" / "clusterpolicystatus-v1alpha1.yaml"
NEW_CRD = REPO / "crds" / "clusterpolicystatus.yaml"
MODEL_PREFIXES = ("policies/", "sets/", "sets2/", "endpoints/")
WEB, GOOD = {"app": "web"}, {"role": "good"}


# --- the world -------------------------------------------------------------------------------


UPGRADE_WORLD = Layout(
    pods=(("web0", WEB, 0), ("good0", GOOD, 0), ("bad0", {"role": "bad"}, 0),
          ("web1", WEB, 1), ("good1", GOOD, 1), ("bad1", {"role": "bad"}, 1),
          ("spare", {"role": "spare"}, 1)),
    policies=(("web-from-good", allow_from_spec(WEB, GOOD)),),
    pairs=(Pair("good1->web0", "good1", "web0", True), Pair("good0->web1", "good0", "web1", True),
           Pair("bad1->web0", "bad1", "web0", False), Pair("bad0->web1", "bad0", "web1", False)),
)


async def upgrade_world(env: NetfenceEnv) -> World:
    """Create the namespace, pods and the policy (no controller needed yet: not waited for)."""
    return await build_world(env, f"upg-{uuid.uuid4().hex[:6]}", UPGRADE_WORLD, enforced=False)


@pytest.fixture
async def env(cluster: LocalCluster, tmp_path: Path) -> AsyncIterator[NetfenceEnv]:
    environment = NetfenceEnv(cluster, tmp_path, nodes=2, lease_ttl=3, report_ttl=4)
    await environment.start(controllers=0)
    try:
        yield environment
    finally:
        with contextlib.suppress(Exception):
            await environment.delete_user_state()
        await environment.close()


# --- continuous probes -------------------------------------------------------------------------


def probing(world: World) -> ProbeLoop:
    """One thread per pair: allowed pairs a full exchange (a reply within 3 s), denied pairs never a TCP
    handshake (0.5 s); see ``ProbeLoop``."""
    return ProbeLoop(world, period=0.2, allowed_timeout=3.0, denied_timeout=0.5)


# --- watching etcd -----------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # time.monotonic() when the test saw it
    revision: int
    changes: dict[str, bytes | None]


class Recorder:
    """Every change under the test prefix, from a snapshot on, with the time it was seen."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.initial: dict[str, bytes] = {}
        self.start_revision = 0
        self.events: list[Event] = []
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        snapshot = await self.store.read_all()
        self.initial = dict(snapshot.values)
        self.start_revision = snapshot.revision
        self._task = asyncio.create_task(self._run(snapshot.revision))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self, after: int) -> None:
        async for revision, changes in self.store.watch_changes("", after_revision=after):
            self.events.append(Event(time.monotonic(), revision, changes))
            self._new.set()

    async def wait_for(self, match: Callable[[Event], bool], timeout: float, what: str,
                       since: float = 0.0) -> Event:
        """The first event seen at or after ``since`` that matches (waits for new events as they come)."""
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if event.at >= since and match(event):
                    return event
            self._new.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def replay(self) -> list[tuple[Event, dict[str, bytes]]]:
        """(event, the full state after it) for every event."""
        state = dict(self.initial)
        out = []
        for event in self.events:
            for key, value in event.changes.items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
            out.append((event, dict(state)))
        return out


def _holder(raw: bytes | None) -> str | None:
    return None if raw is None else str(json.loads(raw)["holder"])


def leader_is(identity: str) -> Callable[[Event], bool]:
    return lambda e: L.LEADER in e.changes and _holder(e.changes[L.LEADER]) == identity


def commit_by(identity: str) -> Callable[[Event], bool]:
    return lambda e: e.changes.get(L.COMMIT) is not None and json.loads(e.changes[L.COMMIT] or b"{}").get(
        "controller") == identity


def check_one_writer(recorder: Recorder) -> list[str]:
    """Every commit marker names the holder of the leader key at its revision, and writers never interleave."""
    holder = _holder(recorder.initial.get(L.LEADER))
    writers: list[str] = []
    for event in recorder.events:
        if L.LEADER in event.changes:
            holder = _holder(event.changes[L.LEADER])
        raw = event.changes.get(L.COMMIT)
        if raw is None:
            continue
        writer = json.loads(raw)["controller"]
        assert writer == holder, f"revision {event.revision}: commit by {writer} while {holder} holds the leader key"
        if not writers or writers[-1] != writer:
            assert writer not in writers, f"writers interleave: {[*writers, writer]}"
            writers.append(writer)
    return writers


# --- processes ---------------------------------------------------------------------------------


async def wait_controller_ready(proc: ManagedProcess, timeout: float = 60.0) -> None:
    """Until Kopf's liveness endpoint answers 200 (the runtime has listed the world and runs)."""

    async def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        return await controller_probe(proc) is not None

    await eventually(ready, timeout=timeout, interval=0.1, what=f"{proc.name} ready")


async def report_of(store: EtcdStore, node: str) -> tuple[dict[str, Any], int] | None:
    current = await store.get(L.Layout.node_status(node))
    return None if current is None else (json.loads(current.value), current.lease)


async def wait_reported(store: EtcdStore, node: str, not_lease: int, at_least: int, timeout: float = 60.0
                        ) -> dict[str, Any]:
    """Until the node's report comes from a new agent process (a new lease) that applied ``at_least``."""

    async def check() -> dict[str, Any] | None:
        found = await report_of(store, node)
        if found is None:
            return None
        report, lease = found
        if lease == not_lease or report["appliedRevision"] < at_least:
            return None
        assert report["lastError"] is None, report
        return report

    return await eventually(check, timeout=timeout, interval=0.05, what=f"a report from the new agent of {node}")


# --- the model equals a fresh compile of the API server's state ----------------------------------


async def _list(call: Any) -> list[dict[str, Any]]:
    resp = await call(_preload_content=False)
    items: list[dict[str, Any]] = json.loads(await resp.read())["items"]
    return items


async def fresh_compile(env: NetfenceEnv, schema: int) -> dict[str, Any]:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    compiled = compile_world(
        [pod_from_k8s(p) for p in await _list(core.list_pod_for_all_namespaces)],
        [namespace_from_k8s(n) for n in await _list(core.list_namespace)],
        [policy_from_k8s(p) for p in await _list(net.list_network_policy_for_all_namespaces)],
    )
    return {k: json.loads(L.encode(v)) for k, v in M.physical_state(compiled, schema).items()}


async def assert_model_matches_api(env: NetfenceEnv, store: EtcdStore, schema: int) -> int:
    values = (await store.read_all()).values
    stored = {k: json.loads(v) for k, v in values.items() if k.startswith(MODEL_PREFIXES)}
    expected = await fresh_compile(env, schema)
    missing = sorted(expected.keys() - stored.keys())
    extra = sorted(stored.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
    assert not (missing or extra or differ), f"missing {missing}, extra {extra}, differ {differ}"
    assert json.loads(values["meta/schema"])["schema"] == schema
    return len(stored)


# --- churn during handovers ------------------------------------------------------------------------


class Churn:
    """Creates and deletes policies and relabels a pod in a task; none of it changes the probed pairs."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rounds = 0
        self.live: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        env, ns = self.world.env, self.world.ns
        while not self._stop.is_set():
            name = f"churn-{uuid.uuid4().hex[:6]}"
            self.world.mark(await env.apply_manifest(allow_from(ns, name, WEB, GOOD)))
            self.live.append(name)
            if len(self.live) > 2:
                await env.delete_policy(ns, self.live.pop(0))
            role = "good" if self.rounds % 2 == 0 else "spare"
            self.world.mark(await env.label("Pod", "spare", {"role": role}, namespace=ns))
            self.rounds += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.15)  # pacing, not synchronisation

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run())

    async def wait_rounds(self, n: int) -> None:
        """Until ``n`` more rounds are done (raises what the churn task raised)."""
        target = self.rounds + n

        async def done() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()
            return self.rounds >= target

        await eventually(done, timeout=60, interval=0.05, what=f"{n} churn rounds")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


# ===================================================================================================


async def test_controller_handover_sigterm_and_sigkill(env: NetfenceEnv) -> None:
    world = await upgrade_world(env)
    # "old" gets a long lease: if it did not resign on SIGTERM, "new" would wait ~10 s for the lease to expire.
    old = env.start_controller("old", ("--lease-ttl=10",))
    await env.wait_enforced(world.marks, timeout=90)
    store = await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)
    try:
        new = env.start_controller("new")
        await wait_controller_ready(new)
        churn = Churn(world)
        with probing(world) as probes:
            async with Recorder(store) as rec:
                # --- SIGTERM: a rolling update stops the old pod once the new one is ready.
                churn.start()
                await churn.wait_rounds(3)
                old.signal(signal.SIGTERM)
                t_term = time.monotonic()
                released = await rec.wait_for(lambda e: L.LEADER in e.changes and e.changes[L.LEADER] is None,
                                              timeout=15, what="old to release the leader key", since=t_term)
                elected = await rec.wait_for(leader_is("new"), timeout=15, what="new leading", since=t_term)
                first = await rec.wait_for(commit_by("new"), timeout=15, what="a commit by new", since=t_term)
                await churn.wait_rounds(5)  # more churn under the new leader
                await churn.stop()
                assert old.proc is not None
                await asyncio.to_thread(old.proc.wait, 15)
                term_handover = elected.at - t_term
                term_release = released.at - t_term
                term_first = first.at - t_term
                await env.wait_enforced(world.marks, timeout=60)
                entries = await assert_model_matches_api(env, store, schema=1)

                # --- SIGKILL: the lease has to expire (new runs with lease TTL 3 s).
                newer = env.start_controller("newer")
                await wait_controller_ready(newer)
                churn.start()
                await churn.wait_rounds(3)
                new.signal(signal.SIGKILL)
                t_kill = time.monotonic()
                elected2 = await rec.wait_for(leader_is("newer"), timeout=20, what="newer leading", since=t_kill)
                first2 = await rec.wait_for(commit_by("newer"), timeout=20, what="a commit by newer", since=t_kill)
                await churn.wait_rounds(5)
                await churn.stop()
                kill_handover = elected2.at - t_kill
                await env.wait_enforced(world.marks, timeout=60)
                entries = await assert_model_matches_api(env, store, schema=1)
            writers = check_one_writer(rec)
            commits = sum(1 for e in rec.events if e.changes.get(L.COMMIT) is not None)
            await probes.rounds(2)
            probed = probes.check(minimum=4)
        print(f"\nhandover after SIGTERM: leader key released +{term_release:.2f}s, new leader +{term_handover:.2f}s, "
              f"first commit +{term_first:.2f}s (goal < 5 s; old lease TTL 10 s)")
        print(f"handover after SIGKILL: new leader +{kill_handover:.2f}s, first commit "
              f"+{first2.at - t_kill:.2f}s (goal < lease TTL {env.lease_ttl} s + 3 s)")
        print(f"writers in commit order: {writers} over {commits} commits; churn rounds {churn.rounds}; "
              f"model keys {entries}; probes {probed}")
        assert old.proc is not None and old.proc.returncode == 0, f"old exited with {old.proc and old.proc.returncode}"
        assert term_handover < 5.0, f"handover after SIGTERM took {term_handover:.2f}s"
        assert term_release < 5.0
        assert kill_handover < env.lease_ttl + 3.0, f"handover after SIGKILL took {kill_handover:.2f}s"
        assert writers == ["old", "new", "newer"], writers
        assert churn.rounds >= 16
    finally:
        await store.close()


async def test_agent_rolling_restart_keeps_enforcing(env: NetfenceEnv) -> None:
    world = await upgrade_world(env)
    env.start_controller("c0")
    await env.wait_enforced(world.marks, timeout=90)
    store = await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)
    try:
        await probes_hold(world)
        timings = []
        with probing(world) as probes:
            await probes.rounds(2)  # before the rollout
            for n, index in enumerate(sorted(env.agents)):  # DaemonSet RollingUpdate, maxUnavailable 1
                node = env.agents[index].node
                found = await report_of(store, node)
                assert found is not None
                began = time.monotonic()
                env.agents[index].process.stop()  # SIGTERM, waits for the exit
                stopped = time.monotonic()
                # While the node has no agent: its rules stay in force, and a change is committed.
                world.mark(await env.label("Pod", "spare", {"role": "good" if n % 2 == 0 else "spare"},
                                           namespace=world.ns))
                commit = await committed_through(store, world.marks)
                await probes.rounds(2)
                env.start_agent(index)
                restarted = time.monotonic()
                report = await wait_reported(store, node, not_lease=found[1], at_least=commit)
                timings.append((node, stopped - began, restarted - stopped, time.monotonic() - restarted))
                assert report["schemaSupported"] == [1, 2] and report["version"]
            await probes.rounds(2)  # after the rollout
            probed = probes.check(minimum=6)
        await env.wait_enforced(timeout=30)
        for node, stop_s, down_s, back_s in timings:
            print(f"\nagent {node}: stopped in {stop_s:.2f}s, down {down_s:.2f}s, applied the change made while "
                  f"down and reported {back_s:.2f}s after the restart")
        print(f"probes during the rollout: {probed}")
    finally:
        await store.close()


async def test_agents_before_and_after_issue_11_side_by_side(env: NetfenceEnv) -> None:
    """A rolling upgrade of the agents (issue 11): node 1 runs an agent from before (whole prefix
    watched, every commit reported: ``--watch-scope prefix``), node 0 a current one. A commit that
    touches only node 1 is reported by node 1 alone and the policy's status is Enforced without a
    report from node 0; a commit that touches no node is reported by the old agent only. The
    barrier and the statuses hold throughout."""
    world = await upgrade_world(env)
    node0, node1 = env.agents[0].node, env.agents[1].node
    env.agents[1].process.stop()
    env.start_agent(1, ("--watch-scope=prefix",))
    env.start_controller("c0")
    await env.wait_enforced(world.marks, timeout=90)
    store = await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)
    try:
        async def written(node: str) -> int:
            current = await store.get(L.Layout.node_status(node))
            assert current is not None
            return current.mod_revision

        async def applied(node: str) -> int:
            current = await store.get(L.Layout.node_status(node))
            assert current is not None
            return int(json.loads(current.value)["appliedRevision"])

        before0 = await written(node0)
        # spare (node 1) becomes a web pod: a new endpoint of the policy on node 1, no set changes
        world.mark(await env.label("Pod", "spare", WEB, namespace=world.ns))
        touched = await committed_through(store, world.marks)
        await env.wait_enforced(timeout=60)  # statuses Enforced: node 0 is synced without reporting
        assert await applied(node1) >= touched
        assert await written(node0) == before0, "node 0's agent rewrote its report for a commit elsewhere"
        # a label no selector reads: a commit of controller bookkeeping only
        world.mark(await env.label("Pod", "spare", {"unrelated": "yes"}, namespace=world.ns))
        bookkeeping = await committed_through(store, world.marks)
        await env.wait_enforced(timeout=60)
        assert await applied(node1) >= bookkeeping
        assert await written(node0) == before0
        await probes_hold(world)
    finally:
        await store.close()


async def test_old_agent_reads_values_with_unknown_fields(env: NetfenceEnv) -> None:
    """A newer controller adds fields (same schema); agents of this version ignore them and enforce."""
    world = await upgrade_world(env)
    env.agents[0].process.stop()
    env.start_agent(0, ("--max-schema=1",))  # node 0 runs an "old" agent
    ctl = env.start_controller("c0")
    await env.wait_enforced(world.marks, timeout=90)
    store = await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)
    try:
        ctl.stop()  # the "newer controller" below writes directly
        state = await store.committed_snapshot()
        good = next(k for k, v in state.values.items()
                    if k.startswith("sets/") and world.pods["good1"].ip in json.loads(v)["members"])
        changes: dict[str, bytes | None] = {}
        for key, raw in state.values.items():
            if key.startswith(("policies/", "sets/", "endpoints/")):
                value = json.loads(raw)
                value["addedLater"] = {"note": "a field this agent does not know", "list": [1, 2]}
                changes[key] = L.encode(value)
        # A real change in the same commit, so enforcing it proves the values were decoded, not skipped:
        # bad1 joins the role=good set.
        members = json.loads(state.values[good])["members"]
        value = json.loads(changes[good] or b"")
        value["members"] = sorted({*members, world.pods["bad1"].ip})
        changes[good] = L.encode(value)
        changes["meta/future"] = L.encode({"schema": 1, "something": "new"})
        writer = EtcdStore(store.config, identity="future-controller")
        await writer.connect()
        try:
            revision = await writer.write(changes, fence=None)
        finally:
            await writer.close()
        for agent in env.agents.values():
            await wait_reported(store, agent.node, not_lease=0, at_least=revision)
        # bad1 -> web0 now connects (bad1 is in the set), bad0 -> web1 still must not.
        assert await asyncio.to_thread(world.behaves, Pair("bad1->web0", "bad1", "web0", True))
        assert await asyncio.to_thread(world.behaves, Pair("bad0->web1", "bad0", "web1", False))
        for agent in env.agents.values():
            log_text = agent.process.log_path.read_text(errors="replace")
            assert "corrupt value" not in log_text and "ERROR" not in log_text, agent.process.tail()
        # The real controller comes back and rewrites the state as it should be: bad is denied again.
        env.start_controller("c1")

        async def rewritten() -> bool:
            commit = await store.get(L.COMMIT)
            return commit is not None and json.loads(commit.value)["controller"] == "c1"

        await eventually(rewritten, timeout=60, what="the controller to rewrite the state")
        await env.wait_enforced(timeout=60)
        await assert_model_matches_api(env, store, schema=1)
        await probes_hold(world)
        print(f"\nunknown fields in {len(changes)} values applied at revision {revision} by an old and a new agent")
    finally:
        await store.close()


async def test_layout_migration_waits_for_every_agent(env: NetfenceEnv) -> None:
    world = await upgrade_world(env)
    env.agents[0].process.stop()
    env.start_agent(0, ("--max-schema=1",))  # node 0: old agent, node 1: new agent
    node0, node1 = env.agents[0].node, env.agents[1].node
    # (b) The old controller (default flags: schema 1); the new agent on node 1 reads its state.
    old = env.start_controller("old")
    await env.wait_enforced(world.marks, timeout=90)
    store = await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)
    try:
        await probes_hold(world)
        reports = await store.read_reports()
        assert reports[node0]["schemaSupported"] == [1] and reports[node1]["schemaSupported"] == [1, 2]
        with probing(world) as probes:
            async with Recorder(store) as rec:
                await probes.rounds(2)
                # The new controller (--target-schema 2) takes over; an old agent is live: it stays on schema 1.
                new = env.start_controller("new", ("--target-schema=2",))
                await wait_controller_ready(new)
                old.signal(signal.SIGTERM)
                await rec.wait_for(leader_is("new"), timeout=15, what="new leading")
                world.mark(await env.label("Pod", "spare", {"role": "good"}, namespace=world.ns))
                await env.wait_enforced(world.marks, timeout=60)
                await assert_model_matches_api(env, store, schema=1)
                assert not any(k.startswith("sets2/") for e in rec.events for k in e.changes)
                await probes.rounds(2)

                # (c) The old agent is restarted as a new one: the controller migrates to schema 2.
                before = await report_of(store, node0)
                assert before is not None
                env.agents[0].process.stop()
                env.start_agent(0)
                t_restart = time.monotonic()
                reported = await rec.wait_for(
                    lambda e: e.changes.get(L.Layout.node_status(node0)) is not None
                    and json.loads(e.changes[L.Layout.node_status(node0)] or b"{}").get("schemaSupported") == [1, 2],
                    timeout=60, what="the new agent on node 0 to report")
                switched = await rec.wait_for(
                    lambda e: e.changes.get("meta/schema") is not None
                    and json.loads(e.changes["meta/schema"] or b"{}")["schema"] == 2,
                    timeout=60, what="meta/schema = 2")
                cleaned = await rec.wait_for(
                    lambda e: any(k.startswith("sets/") and v is None for k, v in e.changes.items()),
                    timeout=60, what="the schema 1 sets to be removed")
                await probes.rounds(2)  # probes after the migration
                # Under schema 2 a membership change rewrites one chunk, and is enforced.
                world.mark(await env.label("Pod", "bad1", {"role": "good"}, namespace=world.ns))
                await env.wait_enforced(world.marks, timeout=60)
                entries = await assert_model_matches_api(env, store, schema=2)
            probed = probes.check(minimum=6)
        history = rec.replay()
        # The gate: schema 2 keys appear only once every live report lists 2 ...
        first_v2 = next(i for i, (e, _) in enumerate(history) if any(k.startswith("sets2/") for k in e.changes))
        event, state = history[first_v2]
        live = {k: json.loads(v)["schemaSupported"] for k, v in state.items() if k.startswith("status/nodes/")}
        assert event.revision == switched.revision and event.revision > reported.revision
        assert live and all(2 in s for s in live.values()), live
        # ... in one commit with meta/schema, while the schema 1 keys are still there; those go in a later commit.
        assert event.changes.get(L.COMMIT) is not None
        assert any(k.startswith("sets/") for k in state), "schema 1 sets must survive the switching commit"
        assert cleaned.revision > switched.revision and cleaned.changes.get(L.COMMIT) is not None
        final = history[-1][1]
        assert not any(k.startswith("sets/") for k in final)
        # The membership change after the migration touched exactly one chunk.
        relabel = [e for e in rec.events if e.revision > cleaned.revision
                   and any(k.startswith("sets2/") for k in e.changes)]
        assert relabel and all(len([k for k in e.changes if k.startswith("sets2/")]) == 1 for e in relabel), [
            sorted(e.changes) for e in relabel]
        reports = await store.read_reports()
        assert all(r["lastError"] is None and r["schemaSupported"] == [1, 2] for r in reports.values()), reports
        print(f"\nold agent restarted as new: it reported +{reported.at - t_restart:.2f}s, the controller "
              f"switched to schema 2 +{switched.at - reported.at:.2f}s later (revision {switched.revision}), "
              f"schema 1 keys removed at revision {cleaned.revision}; {entries} model keys; probes {probed}")
    finally:
        await store.close()


# --- CRD versions ----------------------------------------------------------------------------------


def _renamed(path: Path, group: str) -> dict[str, Any]:
    """The CRD at ``path`` under another group (no short names), so the session's real CRD is untouched."""
    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    plural = crd["spec"]["names"]["plural"]
    crd["metadata"]["name"] = f"{plural}.{group}"
    crd["spec"]["group"] = group
    crd["spec"]["names"].pop("shortNames", None)
    crd["spec"]["names"].pop("categories", None)
    return crd


def _status_object(group: str, version: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/{version}", "kind": "ClusterPolicyStatus",
        "metadata": {"name": name},
        "spec": {"policy": {"namespace": "a", "name": name, "uid": "u-1"}, "policyRef": f"a/{name}", "generation": 3},
    }


async def test_crd_v1alpha1_objects_survive_the_v1_upgrade(cluster: LocalCluster) -> None:
    group = f"upg{uuid.uuid4().hex[:6]}.netfence.dev"
    plural = "clusterpolicystatuses"
    crd_name = f"{plural}.{group}"
    old_crd, new_crd = _renamed(OLD_CRD, group), _renamed(NEW_CRD, group)
    assert [v["name"] for v in old_crd["spec"]["versions"]] == ["v1alpha1"]
    api = await config.new_client_from_config(config_file=str(cluster.kubeconfig))
    custom = client.CustomObjectsApi(api)
    status = {"phase": "Enforced", "requiredNodes": 2, "syncedNodes": 2, "endpoints": 5, "revision": 42,
              "observedGeneration": 3, "synced": "2/2", "nodes": [{"name": "node-0", "synced": True}]}
    try:
        await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", input=yaml.safe_dump(old_crd))
        await asyncio.to_thread(cluster.kubectl, "wait", "--for=condition=Established", f"crd/{crd_name}",
                                "--timeout=60s")
        await eventually(lambda: custom.list_cluster_custom_object(group, "v1alpha1", plural),
                         what="v1alpha1 served")
        await custom.create_cluster_custom_object(group, "v1alpha1", plural, _status_object(group, "v1alpha1", "old"))
        await custom.patch_cluster_custom_object_status(
            group, "v1alpha1", plural, "old", {"status": status}, _content_type="application/merge-patch+json")
        before = await custom.get_cluster_custom_object(group, "v1alpha1", plural, "old")

        await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", input=yaml.safe_dump(new_crd))
        await asyncio.to_thread(cluster.kubectl, "wait", "--for=condition=Established", f"crd/{crd_name}",
                                "--timeout=60s")
        as_v1 = await eventually(lambda: custom.get_cluster_custom_object(group, "v1", plural, "old"),
                                 what="the old object under v1")
        as_v1alpha1 = await custom.get_cluster_custom_object(group, "v1alpha1", plural, "old")
        for obj, version in ((as_v1, "v1"), (as_v1alpha1, "v1alpha1")):
            assert obj["apiVersion"] == f"{group}/{version}"
            assert obj["spec"] == before["spec"] and obj["status"] == before["status"] == status
            assert obj["metadata"]["uid"] == before["metadata"]["uid"]
        # Both versions write, and each is read back under the other.
        await custom.patch_cluster_custom_object_status(
            group, "v1", plural, "old", {"status": {"phase": "Pending"}}, _content_type="application/merge-patch+json")
        patched = await custom.get_cluster_custom_object(group, "v1alpha1", plural, "old")
        assert patched["status"]["phase"] == "Pending"
        await custom.create_cluster_custom_object(group, "v1", plural, _status_object(group, "v1", "new"))
        listed = await custom.list_cluster_custom_object(group, "v1alpha1", plural)
        assert sorted(i["metadata"]["name"] for i in listed["items"]) == ["new", "old"]
        crd = json.loads((await asyncio.to_thread(cluster.kubectl, "get", "crd", crd_name, "-o", "json")).stdout)
        assert crd["status"]["storedVersions"] == ["v1alpha1", "v1"], crd["status"]["storedVersions"]
        # The session cluster runs the shipped CRD: both versions served there too.
        for version in ("v1", "v1alpha1"):
            await custom.list_cluster_custom_object("netfence.dev", version, plural)
        print(f"\nCRD upgrade: object stored as v1alpha1 reads as v1 and v1alpha1; storedVersions "
              f"{crd['status']['storedVersions']}")
    finally:
        await asyncio.to_thread(cluster.kubectl, "delete", "crd", crd_name, "--ignore-not-found", "--wait=false",
                                check=False)
        await api.close()

