"""Cluster-size simulation bench (issue 11): status and etcd fan-out at many nodes (prints figures).

A real kube-apiserver, a real etcd and the REAL controller process (a
LocalCluster in a temporary directory plus ``python -m netfence.controller.main``),
and N simulated nodes as asyncio tasks in a child process of the bench (``--fleet-procs``
of them; apart from the measuring process, so that the agents' own work does not delay
what it observes). Each simulated agent is the real ``netfence.agent.loop.Agent`` with
its netfilter taken out: it follows commits
through the same store calls (``committed_snapshot`` / ``follow_commits`` with
its node's ``wants``, coalescing commits that arrive while it is busy) and
writes its lease-bound report with the agent's own report loop (the same
JSON), but its "apply" only records the revision, and it does not decode
values, check drift or probe etcd every second. The world (API objects only:
pods get ``spec.nodeName`` and a status with an IP from their node's CIDR, no
kubelet) defaults to 1,000 nodes, 5,000 pods, 100 namespaces, 1,000 policies.
Policies have synthetic.py's five shapes; namespace ``ns-0`` holds exactly one
of each and every other policy lives elsewhere, so the label changes (pods of
``ns-0``) are the same change at every policy count.

For every policy count of ``--policy-points`` (the world grows between them)
and every ``--modes`` entry, one round: ClusterPolicyStatus objects deleted, a
fresh etcd prefix, the simulated agents started, then the controller, and

* cold start: spawn -> first commit -> every ClusterPolicyStatus has a status
  -> every one says ``Enforced``;
* ``--label-changes`` pod label changes (``track`` stable<->canary of a pod in
  ``ns-0``, one at a time): API write -> every affected status (a policy whose relevant keys the
  commit changed, per an in-process model mirror) shows ``Enforced`` at a
  revision >= the commit's;
* at ``--policies`` only, ``--creates`` policy creations: API create -> its
  status ``Enforced`` at a revision >= the commit that wrote the policy (then
  deleted again), and then every ClusterPolicyStatus deleted at once -> all
  recreated ``Enforced`` (the writer's throughput apart from the controller's
  start-up; ``--no-bulk-rewrite`` skips it);
* over the label changes: watch events received by the simulated agents per
  commit (in total and per agent), etcd writes under the prefix per commit
  (reports included; counted by a watch of the prefix), etcd's own
  ``etcd_debugging_mvcc_events_total`` (every watcher: the agents, the
  controller's, this bench's) and put/delete counters per commit, controller
  CPU seconds (``/proc/<pid>/stat``, less its idle rate) per commit and per
  report change (each change is measured from a quiet controller to a quiet
  controller; the median is given; it includes the controller's background
  work over that window, ``controller_idle_cpu_rate`` x ``cpu_window_s``), and ClusterPolicyStatus
  API writes (a Kubernetes watch) per change, with what they changed.

Modes: ``new`` is the controller as built; ``baseline`` runs the same build with
``--baseline-status=true --status-concurrency=1`` (every report change
re-evaluates every policy, objects written one at a time: the status writer
before issue 11), so before/after figures come from one run on one machine.

    .venv/bin/python bench/scale_bench.py --nodes 100 --pods 1000 --policy-points 100,1000 \\
        --policies 1000 --creates 100 --label-changes 20 --json /tmp/scale.json

Where the simulated agents' time goes: ``NETFENCE_FLEET_PROFILE=DIR`` runs each fleet child under
cProfile and writes ``DIR/fleet-<first node>.prof`` when it stops.

Everything it starts is stopped at the end (the temp directory too, unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from benchlib import load_note, pct, verdict
from controller_bench import bounded, mirror_engine
from netfence.agent.loop import Agent
from netfence.agent.metrics import AgentMetrics
from netfence.agent.node_state import NodeState
from netfence.config import AgentConfig
from netfence.controller.kube import CPS_GROUP, CPS_PLURAL, CPS_VERSION, KubeApi, cps_name
from netfence.dataplane.render import Features
from netfence.model.enforcement import CompiledPolicy, Endpoint
from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence.store.migration import logical_key
from netfence.store.reader import EtcdCommittedReader
from netfence.store.types import CommitBatch, CommittedState, Include, KeyRange, Reports
from netfence.store.watch import RangeEvents
from netfence_lab.cluster import LocalCluster
from netfence_lab.process import ManagedProcess, free_port
from netfence_lab.tools import ensure_tools
from synthetic import Sizes, flip_track, namespace_bodies, node_bodies, node_name, pod_bodies
from synthetic import _policy_spec as policy_spec

log = logging.getLogger("scale_bench")

GOAL_P99 = 1.0  # seconds, both changes, at 1,000 simulated nodes
GOAL_COLD_STATUS = 5.0  # seconds to write every status of 1,000 policies after a cold start
NODE_BLOCK = 4096  # addresses per node CIDR (/20): 10.1.0.0/20, 10.1.16.0/20, ...
CLK_TCK = os.sysconf("SC_CLK_TCK")
THIS_FILE = str(Path(__file__).resolve())
QUIET_TIMEOUT = 30.0  # seconds to wait for the controller to go quiet around a measured change


# --- the world ---------------------------------------------------------------------------------


def node_cidr(index: int) -> ipaddress.IPv4Network:
    """Node ``index``'s pod CIDR (a /20 from 10.1.0.0 on: room for 4,000 nodes)."""
    base = int(ipaddress.IPv4Address("10.1.0.0")) + index * NODE_BLOCK
    return ipaddress.IPv4Network((base, 20))


def node_pod_ip(index: int, slot: int) -> str:
    """The ``slot``-th pod IP on node ``index``."""
    return str(node_cidr(index).network_address + 1 + slot)


def scale_pod_bodies(sizes: Sizes) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """synthetic.pod_bodies with every pod's IP taken from its node's CIDR (pod i on node i % nodes)."""
    out = []
    for i, (body, _status) in enumerate(pod_bodies(sizes)):
        ip = node_pod_ip(i % sizes.nodes, i // sizes.nodes)
        out.append((body, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))
    return out


async def create_world(api: client.ApiClient, sizes: Sizes, concurrency: int) -> float:
    core = client.CoreV1Api(api)
    t0 = time.monotonic()
    await bounded(concurrency, [lambda b=b: core.create_node(b) for b in node_bodies(sizes)])
    await bounded(concurrency, [lambda b=b: core.create_namespace(b) for b in namespace_bodies(sizes)])

    async def make_pod(body: dict[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        with contextlib.suppress(ApiException):  # 409 on a retry: it exists, patch its status anyway
            await core.create_namespaced_pod(meta["namespace"], body)
        await core.patch_namespaced_pod_status(meta["name"], meta["namespace"], status)

    await bounded(concurrency, [lambda b=b, s=s: make_pod(b, s) for b, s in scale_pod_bodies(sizes)])
    return time.monotonic() - t0


PROBE_NAMESPACE = "ns-0"  # the label changes flip pods here; it holds one policy of each shape, whatever the count


def scale_policy_bodies(sizes: Sizes, start: int, stop: int) -> list[dict[str, Any]]:
    """Policies ``pol-<start>`` .. ``pol-<stop - 1>`` of synthetic.py's five shapes (shape ``j % 5``).
    The first five live in PROBE_NAMESPACE, every other one in the other namespaces: a label change
    in PROBE_NAMESPACE is the same change at every policy count (the policies added are unrelated)."""
    out = []
    others = max(sizes.namespaces - 1, 1)
    for j in range(start, stop):
        ns = PROBE_NAMESPACE if j < 5 else f"ns-{1 + (j - 5) % others}"
        out.append({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"pol-{j}", "namespace": ns},
            "spec": policy_spec(j % 5, random.Random(j)),
        })
    return out


async def grow_policies(api: client.ApiClient, sizes: Sizes, have: int, want: int, concurrency: int) -> None:
    net = client.NetworkingV1Api(api)
    await bounded(concurrency, [
        lambda b=b: net.create_namespaced_network_policy(b["metadata"]["namespace"], b)
        for b in scale_policy_bodies(sizes, have, want)
    ])


# --- the simulated agents ----------------------------------------------------------------------


@dataclass
class AgentCounters:
    events: int = 0  # watch events this agent received (every key its watches delivered)
    reports: int = 0  # reports it wrote


class CountingAccess:
    """The shared store access, counting the watch events one agent receives."""

    def __init__(self, access: Any, counters: AgentCounters) -> None:
        self._access = access
        self._counters = counters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._access, name)

    async def watch_changes(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, dict[str, bytes | None]], None]:
        stream = self._access.watch_changes(rel, after_revision, prefix=prefix)
        async with contextlib.aclosing(stream):
            async for revision, changes in stream:
                self._counters.events += len(changes)
                yield revision, changes

    def watch_ranges(self, ranges: list[KeyRange], after_revision: int) -> CountingRangeWatch:
        return CountingRangeWatch(self._access.watch_ranges(ranges, after_revision), self._counters)


class CountingRangeWatch:
    """A ``RangeWatch`` (store/watch.py) counting the events it delivers to one agent."""

    def __init__(self, watch: Any, counters: AgentCounters) -> None:
        self._watch = watch
        self._counters = counters

    def request_progress(self) -> None:
        self._watch.request_progress()

    def close(self) -> None:
        self._watch.close()

    async def items(self) -> AsyncGenerator[Any, None]:
        stream = self._watch.items()
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, RangeEvents):
                    self._counters.events += len(item.events)
                yield item


class SimStore:
    """The agent's store (``AgentStore``) over a shared ``EtcdStore``: its own committed reader on a
    counting access, the shared lease and report calls; reports seen by the bench."""

    def __init__(self, store: EtcdStore, counters: AgentCounters, on_report: Callable[[str, int], None]) -> None:
        self._store = store
        self._reader = EtcdCommittedReader(CountingAccess(store.access, counters))  # type: ignore[arg-type]
        self.counters = counters
        self._on_report = on_report

    async def committed_snapshot(self, include: Include | None = None, *, max_wait: float = 30.0,
                                 ranges: Sequence[KeyRange] | None = None) -> CommittedState:
        return await self._reader.committed_snapshot(include, max_wait=max_wait, ranges=ranges)

    def follow_commits(
        self, after_revision: int, include: Include | None = None, *, foreign_batches: bool = False,
        ranges: Sequence[KeyRange] | None = None,
    ) -> AsyncGenerator[CommitBatch, None]:
        return self._reader.follow_commits(after_revision, include, foreign_batches=foreign_batches, ranges=ranges)

    async def commit_revision(self) -> int:
        return await self._store.commit_revision()

    async def pause(self, delay: float) -> None:
        await self._store.pause(delay)

    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int:
        revision = await self._store.put_report(node, report, lease_id)
        self.counters.reports += 1
        self._on_report(node, int(report.get("appliedRevision") or 0))
        return revision

    async def read_reports(self) -> Reports:
        return await self._store.read_reports()

    def watch_reports(
        self, after_revision: int | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
        return self._store.watch_reports(after_revision)

    async def grant_lease(self, ttl: int) -> int:
        return await self._store.grant_lease(ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._store.revoke_lease(lease_id)

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        return await self._store.keep_alive_once(lease_id, wait)

    def keep_lease(self, lease_id: int, ttl: int) -> Any:
        return self._store.keep_lease(lease_id, ttl)


class LazyPolicies(Mapping[str, CompiledPolicy]):
    """Policies by ``ns/name`` kept as bytes, decoded only when looked up (what relevance asks:
    the policies the node's endpoints use), so that a thousand simulated agents do not each
    decode every policy."""

    def __init__(self) -> None:
        self.raw: dict[str, bytes] = {}
        self._decoded: dict[str, CompiledPolicy] = {}

    def set(self, name: str, raw: bytes | None) -> None:
        self._decoded.pop(name, None)
        if raw is None:
            self.raw.pop(name, None)
        else:
            self.raw[name] = raw

    def __getitem__(self, name: str) -> CompiledPolicy:
        found = self._decoded.get(name)
        if found is None:
            found = self._decoded[name] = CompiledPolicy.from_json(json.loads(self.raw[name]))
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class LightState(NodeState):
    """The agent's node state, decoding only what the agent's relevance check reads (its own
    endpoints; policies lazily): the keys still pass its ``wants`` filter. No rendering."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.lazy = LazyPolicies()
        self.policies = self.lazy  # type: ignore[assignment]

    def reset(self, values: Mapping[str, bytes], foreign: Mapping[str, int] | None = None,
              mod_revisions: Mapping[str, int] | None = None) -> None:
        self.foreign = {k: r for k, r in (foreign or {}).items() if self.wants(k)}
        self.lazy = LazyPolicies()
        self.policies = self.lazy  # type: ignore[assignment]
        self.endpoints = {}
        self._uses = None
        self.update(values)

    def update(self, changes: Mapping[str, bytes | None]) -> None:
        mine = f"endpoints/{self.node}/"
        for key, raw in changes.items():
            self.foreign.pop(key, None)
            self._references_changed(key)
            if key.startswith("policies/"):
                self.lazy.set(key.removeprefix("policies/"), raw)
            elif key.startswith(mine):
                name = key.removeprefix(mine)
                if raw is None:
                    self.endpoints.pop(name, None)
                else:
                    self.endpoints[name] = Endpoint.from_json(json.loads(raw))


class NoDataplane:
    families = ("ipv4",)

    def ensure_hooks(self) -> None: ...

    def check_drift(self) -> bool:
        return False


class SimAgent(Agent):
    """The real agent's commit following and report loop; "apply" records the revision only."""

    def __init__(self, node: str, store: SimStore, metrics: AgentMetrics, report_ttl: int,
                 watch_scope: str = "node", on_synced: Callable[[], None] | None = None) -> None:
        super().__init__(AgentConfig(node=node, report_ttl=report_ttl, watch_scope=watch_scope), store,
                         NoDataplane(), Features(), metrics)  # type: ignore[arg-type]
        self.state = LightState(node)
        self._on_synced = on_synced

    async def _unchanged(self, report: bool) -> None:
        await super()._unchanged(report)
        if self._on_synced is not None:
            self._on_synced()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._follow(), name=f"sim-follow-{self.config.node}"),
                 asyncio.create_task(self._report_loop(), name=f"sim-report-{self.config.node}")]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def apply(self, full: bool = False) -> bool:
        revision = self._revision
        self.health.target_revision = revision
        self.health.applied_revision = revision
        self.health.synced_revision = revision
        self.health.last_error = None
        self.health.last_sync = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.health.applies += 1
        self._report_wake.set()
        if self._on_synced is not None:
            self._on_synced()
        return True


@dataclass
class Fleet:
    """Simulated agents ``first .. first + count - 1`` in this process (a fleet child process)."""

    agents: list[SimAgent] = field(default_factory=list)
    counters: list[AgentCounters] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)  # nodes that have written a report
    first_reports: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stores: list[EtcdStore] = field(default_factory=list)

    synced_news: asyncio.Event = field(default_factory=asyncio.Event)

    def on_report(self, node: str, applied: int) -> None:
        self.reported.add(node)
        if len(self.reported) == len(self.agents):
            self.first_reports.set()

    def on_synced(self) -> None:
        self.synced_news.set()

    async def wait_synced(self, revision: int) -> None:
        """Until every agent here enforces ``revision`` (applied, or seen not to touch its node)."""
        behind = [a for a in self.agents if a.health.synced_revision < revision]
        while behind:
            self.synced_news.clear()
            await self.synced_news.wait()
            behind = [a for a in behind if a.health.synced_revision < revision]

    def totals(self) -> dict[str, Any]:
        return {"events": [c.events for c in self.counters], "reports": sum(c.reports for c in self.counters)}

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for store in self.stores:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.close(), 5)


async def start_fleet(endpoint: str, prefix: str, first: int, count: int, channels: int, report_ttl: int,
                      watch_scope: str = "node") -> Fleet:
    fleet = Fleet()
    for _ in range(channels):
        store = EtcdStore(EtcdConfig(endpoints=[endpoint], prefix=prefix))
        await store.connect()
        fleet.stores.append(store)
    metrics = AgentMetrics()  # one registry for all: the simulated agents do not serve /metrics
    for i in range(first, first + count):
        counters = AgentCounters()
        sim_store = SimStore(fleet.stores[i % channels], counters, fleet.on_report)
        agent = SimAgent(node_name(i), sim_store, metrics, report_ttl, watch_scope, fleet.on_synced)
        fleet.agents.append(agent)
        fleet.counters.append(counters)
        fleet.tasks.append(asyncio.create_task(agent.run(), name=f"sim-agent-{i}"))
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the first ones connect while the others are made
    return fleet


async def fleet_child(spec: dict[str, Any]) -> None:
    """A fleet child process: runs its agents; on stdin "counters" prints their counters as one JSON
    line, "stop" (or end of input) stops. Prints "ready" once every agent has written a report."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s fleet %(name)s %(levelname)s %(message)s")
    fleet = await start_fleet(spec["endpoint"], spec["prefix"], spec["first"], spec["count"], spec["channels"],
                              spec["report_ttl"], spec.get("watch_scope", "node"))
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await fleet.first_reports.wait()
    print("ready", flush=True)
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "counters":
                print(json.dumps(fleet.totals()), flush=True)
            elif line.startswith("synced "):
                await fleet.wait_synced(int(line.split()[1]))
                print("synced", flush=True)
            elif line == "stop":
                break
    finally:
        await fleet.stop()


class FleetProcess:
    """One child process running simulated agents (so that their work, N watches each receiving
    what etcd sends, does not delay this process's own observations)."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log_file = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, THIS_FILE, "--fleet-child", json.dumps(self.spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file)
        finally:
            log_file.close()  # the child has its own copy

    async def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"fleet process exited (log: {self.log_path})")
        return line.decode().strip()

    async def ready(self, timeout: float) -> None:
        if (line := await self._line(timeout)) != "ready":
            raise RuntimeError(f"fleet process said {line!r}")

    async def counters(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"counters\n")
        await self.proc.stdin.drain()
        result: dict[str, Any] = json.loads(await self._line(60))
        return result

    async def synced(self, revision: int, timeout: float) -> None:
        """Until every agent of this process enforces ``revision``."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"synced {revision}\n".encode())
        await self.proc.stdin.drain()
        if (line := await self._line(timeout)) != "synced":
            raise RuntimeError(f"fleet process said {line!r}")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Fleets:
    """The fleet processes, and every agent's applied revision as its reports show it (a watch of the
    reports, as the controller's)."""

    store: EtcdStore
    nodes: int
    procs: list[FleetProcess] = field(default_factory=list)
    reported: dict[str, int] = field(default_factory=dict)  # node -> applied revision last reported
    reported_at: float = 0.0  # time.monotonic() of the latest report
    synced_at: float = 0.0  # time.monotonic() when the last wait_synced ended
    report_events: int = 0  # report changes seen (as the controller sees them)
    news: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def start(self, endpoint: str, prefix: str, procs: int, channels: int, report_ttl: int,
                    workdir: Path, timeout: float, watch_scope: str = "node") -> None:
        reports = await self.store.read_reports()
        self.task = asyncio.create_task(self._watch(reports.revision))
        per = -(-self.nodes // procs)
        for k, first in enumerate(range(0, self.nodes, per)):
            spec = {"endpoint": endpoint, "prefix": prefix, "first": first, "count": min(per, self.nodes - first),
                    "channels": max(1, channels // procs), "report_ttl": report_ttl, "watch_scope": watch_scope}
            proc = FleetProcess(spec, workdir / f"fleet-{prefix.strip('/').replace('/', '-')}-{k}.log")
            await proc.start()
            self.procs.append(proc)
        for proc in self.procs:
            await proc.ready(timeout)

    async def _watch(self, after: int) -> None:
        async for node, report in self.store.watch_reports(after_revision=after):
            self.report_events += 1
            if report is not None:
                self.reported[node] = int(report.get("appliedRevision") or 0)
                self.reported_at = time.monotonic()
                self.news.set()

    async def counters(self) -> dict[str, Any]:
        events: list[int] = []
        reports = 0
        for proc in self.procs:
            got = await proc.counters()
            events += got["events"]
            reports += got["reports"]
        return {"events": events, "reports": reports}

    def min_reported(self) -> int:
        """The lowest applied revision reported (-1 while some agent has not reported yet)."""
        if len(self.reported) < self.nodes:
            return -1
        return min(self.reported.values(), default=0)

    async def wait_reported(self, revision: int, timeout: float) -> None:
        """Until every agent has reported an applied revision >= ``revision``."""
        deadline = time.monotonic() + timeout
        while self.min_reported() < revision:
            self.news.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                behind = self.nodes - sum(1 for r in self.reported.values() if r >= revision)
                raise TimeoutError(f"{behind} simulated agents did not report revision {revision}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.news.wait(), min(remaining, 1.0))

    async def wait_synced(self, revision: int, timeout: float) -> None:
        """Until every agent enforces ``revision``: it applied it, or saw that it does not touch its
        node (agents report only commits that touch their node, issue 11). Sets ``synced_at``."""
        await asyncio.gather(*(proc.synced(revision, timeout) for proc in self.procs))
        self.synced_at = time.monotonic()

    async def stop(self) -> None:
        await asyncio.gather(*(proc.stop() for proc in self.procs), return_exceptions=True)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


# --- watching etcd and the API ------------------------------------------------------------------


@dataclass
class Commit:
    revision: int
    seen: float
    keys: set[str]  # data keys written by this change (policies/, sets/, sets2/, endpoints/)
    observed: dict[str, int]


@dataclass
class PrefixWatch:
    """Every write under the prefix (counted) and the commits, with the data keys of each."""

    store: EtcdStore
    commits: list[Commit] = field(default_factory=list)
    writes: int = 0  # puts and deletes under the prefix (reports included)
    new_commit: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        keys: set[str] = set()
        observed: dict[str, int] = {}
        async for revision, changes in self.store.watch_changes("", None):
            now = time.monotonic()
            self.writes += len(changes)
            committed = False
            for rel, value in changes.items():
                if rel == "commit":
                    committed = committed or value is not None
                elif rel == "meta/observed" and value is not None:
                    observed = {k: int(v) for k, v in json.loads(value).get("resourceVersions", {}).items()}
                elif rel.startswith(("policies/", "sets/", "sets2/", "endpoints/")):
                    keys.add(logical_key(rel))
            if committed:
                self.commits.append(Commit(revision, now, keys, dict(observed)))
                keys = set()
                self.new_commit.set()

    async def wait_commit(self, predicate: Callable[[Commit], bool], start: int, timeout: float) -> Commit:
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.commits):
                if predicate(self.commits[index]):
                    return self.commits[index]
                index += 1
            self.new_commit.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching commit")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.new_commit.wait(), remaining)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


@dataclass
class StatusWatch:
    """ClusterPolicyStatus objects as the API shows them (a watch), and the writes to them."""

    api: client.ApiClient
    phase: dict[str, str] = field(default_factory=dict)
    revision: dict[str, int] = field(default_factory=dict)
    writes: int = 0  # ADDED/MODIFIED/DELETED events: creates, spec and status patches, deletes
    with_status: int = 0
    enforced: int = 0
    news: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    last: dict[str, Any] = field(default_factory=dict)  # name -> the object as last seen
    what: Counter[str] = field(default_factory=Counter)  # what each write changed (for the report)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def _note(self, kind: str, name: str, obj: Mapping[str, Any]) -> None:
        """Count what a write changed: created, deleted, spec, or the status fields that differ."""
        before = self.last.get(name)
        if kind == "DELETED":
            self.what["deleted"] += 1
        elif before is None:
            self.what["created"] += 1
        else:
            old, new = before.get("status") or {}, obj.get("status") or {}
            fields = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            changed = "spec" if before.get("spec") != obj.get("spec") else ""
            self.what[changed or ("status: " + ",".join(fields) if fields else "nothing visible")] += 1
        if kind == "DELETED":
            self.last.pop(name, None)
        else:
            self.last[name] = obj

    def _set(self, name: str, obj: Mapping[str, Any] | None) -> None:
        status = (obj or {}).get("status") or {}
        old_phase = self.phase.pop(name, None)
        self.revision.pop(name, None)
        if old_phase is not None:
            self.with_status -= 1
            self.enforced -= old_phase == "Enforced"
        if obj is not None and status:
            phase = str(status.get("phase") or "")
            self.phase[name] = phase
            self.revision[name] = int(status.get("revision") or 0)
            self.with_status += 1
            self.enforced += phase == "Enforced"

    async def _run(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        while True:
            try:
                await self._list_and_watch(custom)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken watch: list again (writes meanwhile are not counted)
                log.warning("ClusterPolicyStatus watch failed (%s: %s); listing again", type(exc).__name__, exc)
                await asyncio.sleep(0.5)

    async def _list_and_watch(self, custom: client.CustomObjectsApi) -> None:
        listing = await custom.list_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL)
        for name in list(self.phase):
            self._set(name, None)
        self.last.clear()
        for item in listing["items"]:
            self._set(item["metadata"]["name"], item)
            self.last[item["metadata"]["name"]] = item
        self.ready.set()
        self.news.set()
        stream = watch.Watch().stream(custom.list_cluster_custom_object, CPS_GROUP, CPS_VERSION, CPS_PLURAL,
                                      resource_version=listing["metadata"]["resourceVersion"],
                                      timeout_seconds=3600)
        async with stream:
            async for event in stream:
                obj = event["object"]
                if event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
                    raise RuntimeError(f"watch event {event['type']}: {obj}")
                self.writes += 1
                self._note(event["type"], obj["metadata"]["name"], obj)
                self._set(obj["metadata"]["name"], None if event["type"] == "DELETED" else obj)
                self.news.set()

    def enforced_at(self, name: str, revision: int) -> bool:
        return self.phase.get(name) == "Enforced" and self.revision.get(name, 0) >= revision

    async def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Until ``predicate()`` holds; the time.monotonic() when it was first seen to hold."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self.news.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.news.wait(), min(remaining, 1.0))
        return time.monotonic()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


# --- CPU and etcd counters ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included) in seconds, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def idle_rate(pid: int, samples: int = 6, seconds: float = 0.5) -> float:
    """The controller's CPU seconds per second while nothing happens (its background work: the
    least of a few short samples, so that a periodic burst is not taken for the idle rate)."""
    rates = []
    for _ in range(samples):
        c0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        rates.append((cpu_seconds(pid) - c0) / (time.monotonic() - t0))
    return min(rates)


async def quiesce(pid: int, idle: float, timeout: float, window: float = 0.25) -> bool:
    """Until the controller's CPU use is back at its idle rate (within 2 % of a core) for two windows
    in a row; False if it was not within ``timeout``."""
    deadline = time.monotonic() + timeout
    calm = 0
    while calm < 2:
        if time.monotonic() >= deadline:
            return False
        c0 = cpu_seconds(pid)
        await asyncio.sleep(window)
        calm = calm + 1 if cpu_seconds(pid) - c0 <= (idle + 0.02) * window else 0
    return True


METRIC_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{[^}]*\})? (?P<value>[0-9.e+-]+)$")
ETCD_COUNTERS = ("etcd_debugging_mvcc_events_total", "etcd_mvcc_put_total", "etcd_mvcc_delete_total",
                 "etcd_mvcc_txn_total")


def parse_counters(text: str, names: Iterable[str] = ETCD_COUNTERS) -> dict[str, float]:
    """Sums of the named counters (over their labels) in a Prometheus text exposition."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match and match["name"] in wanted:
            out[match["name"]] = out.get(match["name"], 0.0) + float(match["value"])
    return out


def etcd_counters(metrics_port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            return parse_counters(resp.read().decode())
    except OSError:
        return {}


# --- one round ---------------------------------------------------------------------------------


@dataclass
class RoundResult:
    mode: str
    policies: int
    nodes: int
    first_commit_s: float = 0.0
    statuses_written_s: float | None = None  # first commit -> every policy's status written
    all_enforced_s: float | None = None  # first commit -> every status Enforced
    cold_start_cpu_s: float | None = None  # controller CPU from the first commit to every status written
    bulk_rewrite_s: float | None = None  # every status object deleted -> all recreated and Enforced
    bulk_rewrite_cpu_s: float | None = None
    label_latencies: list[float] = field(default_factory=list)
    label_commit: list[float] = field(default_factory=list)  # API write -> the commit seen (breakdown)
    label_reported: list[float] = field(default_factory=list)  # API write -> every agent reported it
    label_noop: int = 0  # label changes that affected no policy (not in the latencies)
    create_latencies: list[float] = field(default_factory=list)
    commits: int = 0
    events: int = 0  # watch events received by the simulated agents
    max_agent_events: int = 0
    etcd_writes: int = 0  # puts/deletes under the prefix (reports included)
    reports: int = 0
    change_cpu: list[float] = field(default_factory=list)  # controller CPU per label change (quiet to quiet)
    change_seconds: list[float] = field(default_factory=list)  # the length of those windows
    change_reports: list[int] = field(default_factory=list)  # report changes per label change
    not_quiet: int = 0  # label changes whose CPU window did not end quiet (within 30 s)
    status_write_kinds: dict[str, int] = field(default_factory=dict)  # what the writes changed (top 6)
    idle_cpu_rate: float = 0.0
    status_writes: int = 0
    etcd_metrics: dict[str, float] = field(default_factory=dict)

    def per_commit(self, value: float) -> float:
        return value / self.commits if self.commits else 0.0

    def summary(self) -> dict[str, Any]:
        changes = len(self.label_latencies) + self.label_noop
        return {
            "mode": self.mode,
            "policies": self.policies,
            "nodes": self.nodes,
            "cold_start_first_commit_s": round(self.first_commit_s, 3),
            "cold_start_statuses_written_s": None if self.statuses_written_s is None
            else round(self.statuses_written_s, 3),
            "cold_start_all_enforced_s": None if self.all_enforced_s is None else round(self.all_enforced_s, 3),
            "cold_start_controller_cpu_s": None if self.cold_start_cpu_s is None else round(self.cold_start_cpu_s, 2),
            "bulk_rewrite_s": None if self.bulk_rewrite_s is None else round(self.bulk_rewrite_s, 3),
            "bulk_rewrite_controller_cpu_s": None if self.bulk_rewrite_cpu_s is None
            else round(self.bulk_rewrite_cpu_s, 2),
            "label_changes": changes,
            "label_enforced_p50_s": round(pct(self.label_latencies, 0.5), 4),
            "label_enforced_p99_s": round(pct(self.label_latencies, 0.99), 4),
            "label_commit_p50_s": round(pct(self.label_commit, 0.5), 4),
            "label_commit_p99_s": round(pct(self.label_commit, 0.99), 4),
            "label_all_reported_p50_s": round(pct(self.label_reported, 0.5), 4),
            "label_all_reported_p99_s": round(pct(self.label_reported, 0.99), 4),
            "policy_creates": len(self.create_latencies),
            "policy_enforced_p50_s": round(pct(self.create_latencies, 0.5), 4) if self.create_latencies else None,
            "policy_enforced_p99_s": round(pct(self.create_latencies, 0.99), 4) if self.create_latencies else None,
            "commits": self.commits,
            "events_per_commit": round(self.per_commit(self.events), 1),
            "events_per_agent_per_commit": round(self.per_commit(self.events) / max(self.nodes, 1), 2),
            "max_agent_events_per_commit": round(self.per_commit(self.max_agent_events), 2),
            "etcd_writes_per_commit": round(self.per_commit(self.etcd_writes), 1),
            "reports_per_commit": round(self.per_commit(self.reports), 1),
            "etcd_metrics_per_commit": {k: round(self.per_commit(v), 1) for k, v in self.etcd_metrics.items()},
            "controller_cpu_per_commit_s": round(median(self.change_cpu), 4),
            "controller_cpu_per_report_change_s": round(median(
                [c / r for c, r in zip(self.change_cpu, self.change_reports, strict=True) if r]), 6),
            "controller_cpu_per_commit_max_s": round(max(self.change_cpu, default=0.0), 4),
            "controller_idle_cpu_rate": round(self.idle_cpu_rate, 4),
            "cpu_window_s": round(median(self.change_seconds), 2),
            "cpu_windows_not_quiet": self.not_quiet,
            "status_writes_per_change": round(self.status_writes / changes, 2) if changes else 0.0,
            "status_writes_changed": self.status_write_kinds,
        }


PROFILED = (  # runs the controller under cProfile; the stats go to argv[1] when it exits (SIGTERM included)
    "import atexit, cProfile, sys; import netfence.controller.main as m; out = sys.argv.pop(1); "
    "p = cProfile.Profile(); atexit.register(lambda: (p.disable(), p.dump_stats(out))); p.enable(); "
    "sys.exit(m.main(sys.argv[1:]))"
)


def controller_argv(mode: str, cluster: LocalCluster, prefix: str, name: str, log_level: str = "WARNING",
                    profile: Path | None = None) -> list[str]:
    runner = ["-c", PROFILED, str(profile)] if profile is not None else ["-m", "netfence.controller.main"]
    argv = [
        sys.executable, *runner,
        f"--kubeconfig={cluster.kubeconfig}",
        f"--etcd-endpoints={cluster.netfence_etcd.endpoint}",
        f"--etcd-prefix={prefix}",
        f"--identity={name}",
        f"--health-port={free_port()}",
        f"--log-level={log_level}",
    ]
    if mode == "baseline":
        argv += ["--baseline-status=true", "--status-concurrency=1"]
    # baseline's agents also watch the whole prefix and report every commit (--watch-scope prefix)
    return argv


def affected_policies(engine: Any, keys: set[str]) -> set[tuple[str, str]]:
    """Policies whose relevant keys (as of now) include a key the commit changed: their status
    must show a revision >= the commit's."""
    out = set()
    for ns, name in engine.policies_affected_by(keys):
        view = engine.policy_view(ns, name, with_warnings=False)
        if view is not None and view.relevant_keys & keys:
            out.add((ns, name))
    return out


async def delete_statuses(api: client.ApiClient, timeout: float = 120.0) -> None:
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiException):
            await custom.delete_collection_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL)
        items = (await custom.list_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL))["items"]
        if not items:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("ClusterPolicyStatus objects were not deleted")


async def run_round(cluster: LocalCluster, api: client.ApiClient, workdir: Path, sizes: Sizes, mode: str,
                    policies: int, creates: int, args: argparse.Namespace) -> RoundResult:
    result = RoundResult(mode, policies, sizes.nodes)
    core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
    await delete_statuses(api)
    listing = await KubeApi(api).list_world()
    engine, tracker = mirror_engine(listing)
    pods = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in listing.pods}
    prefix = f"/netfence/scale{uuid.uuid4().hex[:8]}/"
    store = EtcdStore(EtcdConfig(endpoints=[cluster.netfence_etcd.endpoint], prefix=prefix))
    await store.connect()
    prefix_watch = PrefixWatch(store)
    prefix_watch.start()
    statuses = StatusWatch(api)
    statuses.start()
    await asyncio.wait_for(statuses.ready.wait(), 60)
    t_fleet = time.monotonic()
    fleet = Fleets(store, sizes.nodes)
    await fleet.start(cluster.netfence_etcd.endpoint, prefix, args.fleet_procs, args.channels, args.report_ttl,
                      workdir, args.timeout, watch_scope="prefix" if mode == "baseline" else "node")
    await fleet.wait_reported(0, args.timeout)  # every agent has its lease and a first report
    print(f"  [{mode} @ {policies} policies] {sizes.nodes} simulated agents reporting after "
          f"{time.monotonic() - t_fleet:.1f} s", flush=True)
    name = f"scale-controller-{mode}-{policies}"
    profile = args.profile_controller / f"{name}.prof" if args.profile_controller else None
    argv = controller_argv(mode, cluster, prefix, name, args.controller_log_level, profile)
    proc = ManagedProcess(name, argv, workdir / f"{name}.log")
    try:
        t_start = time.monotonic()
        proc.start()
        pid = proc.pid
        assert pid is not None
        first = await prefix_watch.wait_commit(lambda c: True, 0, args.timeout)
        result.first_commit_s = first.seen - t_start
        cpu_first = cpu_seconds(pid)
        with contextlib.suppress(TimeoutError):
            t = await statuses.wait(lambda: statuses.with_status >= policies, args.timeout, "every status written")
            result.statuses_written_s = t - first.seen
            result.cold_start_cpu_s = cpu_seconds(pid) - cpu_first
            t = await statuses.wait(lambda: statuses.enforced >= policies, args.timeout, "every status Enforced")
            result.all_enforced_s = t - first.seen
        print(f"  [{mode} @ {policies} policies] cold start: first commit {result.first_commit_s:.1f} s after "
              f"spawn; statuses written {fmt_s(result.statuses_written_s)}, all Enforced "
              f"{fmt_s(result.all_enforced_s)} after it", flush=True)
        await fleet.wait_synced(prefix_watch.commits[-1].revision, args.timeout)
        result.idle_cpu_rate = await idle_rate(pid)  # the least of a few samples: its background work

        # --- pod label changes: latency, fan-out, CPU, status writes ------------------------------
        gc.collect()
        gc.freeze()
        rng = random.Random(7 + policies)
        keys = sorted(key for key in pods if key[0] == PROBE_NAMESPACE)
        counters0 = await fleet.counters()
        statuses.what.clear()
        commits0, writes0, status0 = len(prefix_watch.commits), prefix_watch.writes, statuses.writes
        etcd0 = await asyncio.to_thread(etcd_counters, cluster.netfence_etcd.metrics_port)
        for _ in range(args.label_changes):
            # Each change starts and ends with the controller quiet: its CPU is this change's work.
            await quiesce(pid, result.idle_cpu_rate, QUIET_TIMEOUT)
            reports0, cpu0, t_cpu0 = fleet.report_events, cpu_seconds(pid), time.monotonic()
            ns, pod_name = rng.choice(keys)
            body = pods[(ns, pod_name)]
            patch = flip_track(body["metadata"]["labels"])
            index = len(prefix_watch.commits)
            t0 = time.monotonic()
            resp = await core.patch_namespaced_pod(pod_name, ns, {"metadata": {"labels": patch}})
            rv = int(resp.metadata.resource_version)
            commit = await prefix_watch.wait_commit(lambda c, rv=rv: c.observed.get("pods", 0) >= rv, index,
                                                    args.timeout)
            new_body = {**body, "metadata": {**body["metadata"], "labels": {**body["metadata"]["labels"], **patch},
                                             "resourceVersion": str(rv)}}
            pods[(ns, pod_name)] = new_body
            tracker.apply("pods", "MODIFIED", new_body)
            engine.drain_changes()
            affected = [cps_name(*p) for p in affected_policies(engine, commit.keys)]
            result.label_commit.append(commit.seen - t0)
            reported = asyncio.create_task(fleet.wait_synced(commit.revision, args.timeout))
            if affected:
                t_done = await statuses.wait(
                    lambda a=affected, r=commit.revision: all(statuses.enforced_at(n, r) for n in a),
                    args.timeout, f"{len(affected)} statuses Enforced at {commit.revision}")
                result.label_latencies.append(t_done - t0)
            else:
                result.label_noop += 1
            await reported
            result.label_reported.append(fleet.synced_at - t0)
            result.not_quiet += not await quiesce(pid, result.idle_cpu_rate, QUIET_TIMEOUT)
            # Raw: it includes the controller's background work over the window (idle_cpu_rate x about
            # 1 s); subtracting an idle rate estimate was noisier than the figure at small sizes.
            result.change_cpu.append(cpu_seconds(pid) - cpu0)
            result.change_seconds.append(time.monotonic() - t_cpu0)
            result.change_reports.append(fleet.report_events - reports0)
            await asyncio.sleep(args.gap)
        etcd1 = await asyncio.to_thread(etcd_counters, cluster.netfence_etcd.metrics_port)
        gc.unfreeze()
        result.commits = len(prefix_watch.commits) - commits0
        counters1 = await fleet.counters()
        per_agent = [b - a for a, b in zip(counters0["events"], counters1["events"], strict=True)]
        result.events = sum(per_agent)
        result.max_agent_events = max(per_agent, default=0)
        result.etcd_writes = prefix_watch.writes - writes0
        result.reports = counters1["reports"] - counters0["reports"]
        result.status_writes = statuses.writes - status0
        result.status_write_kinds = dict(statuses.what.most_common(6))
        result.etcd_metrics = {k: etcd1[k] - etcd0[k] for k in etcd1 if k in etcd0}
        s = result.summary()
        print(f"  [{mode} @ {policies} policies] {s['label_changes']} label changes: Enforced p50 "
              f"{s['label_enforced_p50_s'] * 1000:.0f} ms p99 {s['label_enforced_p99_s'] * 1000:.0f} ms; "
              f"controller CPU {s['controller_cpu_per_commit_s'] * 1000:.1f} ms/commit, "
              f"{s['controller_cpu_per_report_change_s'] * 1e6:.0f} us/report change", flush=True)

        # --- policy creates -------------------------------------------------------------------------
        created: list[dict[str, Any]] = []
        if creates:
            bodies = scale_policy_bodies(sizes, policies, policies + creates)
            for body in bodies:
                ns, pol = body["metadata"]["namespace"], body["metadata"]["name"]
                index = len(prefix_watch.commits)
                t0 = time.monotonic()
                await net.create_namespaced_network_policy(ns, body)
                created.append(body)
                key, status_name = f"policies/{ns}/{pol}", cps_name(ns, pol)
                commit = await prefix_watch.wait_commit(lambda c, k=key: k in c.keys, index, args.timeout)
                t_done = await statuses.wait(
                    lambda n=status_name, r=commit.revision: statuses.enforced_at(n, r),
                    args.timeout, f"{ns}/{pol} Enforced")
                result.create_latencies.append(t_done - t0)
                await fleet.wait_synced(commit.revision, args.timeout)
                await asyncio.sleep(args.gap)
            s = result.summary()
            print(f"  [{mode} @ {policies} policies] {len(created)} policy creates: Enforced p50 "
                  f"{s['policy_enforced_p50_s'] * 1000:.0f} ms p99 {s['policy_enforced_p99_s'] * 1000:.0f} ms",
                  flush=True)
        await bounded(args.concurrency, [
            lambda b=b: net.delete_namespaced_network_policy(b["metadata"]["name"], b["metadata"]["namespace"])
            for b in created
        ])
        if creates and args.bulk_rewrite:
            # --- every status object deleted at once: the writer recreates them all (its throughput,
            # apart from the controller's start-up) -------------------------------------------------------
            await statuses.wait(lambda: statuses.with_status == policies, args.timeout, "created policies gone")
            await quiesce(pid, result.idle_cpu_rate, QUIET_TIMEOUT)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            await client.CustomObjectsApi(api).delete_collection_cluster_custom_object(
                CPS_GROUP, CPS_VERSION, CPS_PLURAL)
            await statuses.wait(lambda: statuses.with_status < policies, args.timeout, "statuses deleted")
            t = await statuses.wait(lambda: statuses.enforced >= policies, args.timeout, "statuses rewritten")
            result.bulk_rewrite_s = t - t0
            result.bulk_rewrite_cpu_s = cpu_seconds(pid) - cpu0
            print(f"  [{mode} @ {policies} policies] every ClusterPolicyStatus deleted: all {policies} recreated "
                  f"Enforced in {result.bulk_rewrite_s:.2f} s (controller CPU {result.bulk_rewrite_cpu_s:.1f} s)",
                  flush=True)
        if not proc.alive():
            raise SystemExit(f"the controller exited (log: {proc.log_path})")
    finally:
        proc.stop(grace=15.0)
        await fleet.stop()
        await statuses.stop()
        await prefix_watch.stop()
        await store.close()
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def fmt_s(value: float | None) -> str:
    return "not within the timeout" if value is None else f"{value:.2f} s"


# --- report --------------------------------------------------------------------------------------


def figures(rounds: list[RoundResult], mode: str, main_policies: int) -> dict[str, Any]:
    """The JSON figures of one mode: the main point's values plus per-policy-count CPU."""
    mine = [r for r in rounds if r.mode == mode]
    main = next((r for r in mine if r.policies == main_policies), mine[-1] if mine else None)
    if main is None:
        return {}
    s = main.summary()
    return {
        **{k: s[k] for k in ("policy_enforced_p50_s", "policy_enforced_p99_s", "label_enforced_p50_s",
                             "label_enforced_p99_s", "events_per_agent_per_commit", "events_per_commit",
                             "etcd_writes_per_commit", "status_writes_per_change")},
        "cold_start_statuses_written_s": s["cold_start_statuses_written_s"],
        "controller_cpu_per_report_change_s": {str(r.policies): r.summary()["controller_cpu_per_report_change_s"]
                                               for r in mine},
        "controller_cpu_per_commit_s": {str(r.policies): r.summary()["controller_cpu_per_commit_s"] for r in mine},
        "cold_start_statuses_written_by_policies_s": {
            str(r.policies): r.summary()["cold_start_statuses_written_s"] for r in mine},
    }


def print_table(rounds: list[RoundResult]) -> None:
    rows = [r.summary() for r in rounds]
    cols = [
        ("mode", "mode", "{}"), ("policies", "policies", "{}"),
        ("cold: statuses written s", "cold_start_statuses_written_s", "{}"),
        ("cold: all Enforced s", "cold_start_all_enforced_s", "{}"),
        ("cold: controller CPU s", "cold_start_controller_cpu_s", "{}"),
        ("all CPS deleted: rewrite s", "bulk_rewrite_s", "{}"),
        ("  controller CPU s", "bulk_rewrite_controller_cpu_s", "{}"),
        ("label p50 ms", "label_enforced_p50_s", "ms"), ("label p99 ms", "label_enforced_p99_s", "ms"),
        ("  of which commit p50 ms", "label_commit_p50_s", "ms"), ("  commit p99 ms", "label_commit_p99_s", "ms"),
        ("  all reported p50 ms", "label_all_reported_p50_s", "ms"),
        ("  all reported p99 ms", "label_all_reported_p99_s", "ms"),
        ("create p50 ms", "policy_enforced_p50_s", "ms"), ("create p99 ms", "policy_enforced_p99_s", "ms"),
        ("events/commit", "events_per_commit", "{}"), ("events/agent/commit", "events_per_agent_per_commit", "{}"),
        ("etcd writes/commit", "etcd_writes_per_commit", "{}"), ("reports/commit", "reports_per_commit", "{}"),
        ("ctl CPU ms/commit", "controller_cpu_per_commit_s", "ms"),
        ("ctl CPU us/report", "controller_cpu_per_report_change_s", "us"),
        ("ctl CPU ms/commit (max)", "controller_cpu_per_commit_max_s", "ms"),
        ("CPS writes/change", "status_writes_per_change", "{}"),
    ]
    print()
    for title, key, style in cols:
        values = []
        for row in rows:
            value = row.get(key)
            if value is None:
                values.append("-")
            elif style == "ms":
                values.append(f"{value * 1e3:.1f}")
            elif style == "us":
                values.append(f"{value * 1e6:.0f}")
            else:
                values.append(str(value))
        print(f"  {title:<26}" + "".join(f"{v:>14}" for v in values))
    for row in rows:
        print(f"  status writes during the label changes ({row['mode']} @ {row['policies']}), by what changed: "
              f"{row['status_writes_changed']}")
    for row in rows:
        if row["etcd_metrics_per_commit"]:
            print(f"  etcd counters per commit ({row['mode']} @ {row['policies']}): {row['etcd_metrics_per_commit']}")


def print_goals(rounds: list[RoundResult], main_policies: int) -> None:
    for r in rounds:
        s = r.summary()
        if r.policies == main_policies:
            written = s["cold_start_statuses_written_s"]
            print(f"  {r.mode}: cold start writes {r.policies} statuses in {fmt_s(written)}"
                  f"   [goal < {GOAL_COLD_STATUS:.0f} s at 1,000: "
                  f"{verdict(written is not None and written < GOAL_COLD_STATUS)}]")
            for what, key in (("label change", "label_enforced_p99_s"), ("policy create", "policy_enforced_p99_s")):
                if s[key] is not None:
                    print(f"  {r.mode}: {what} -> Enforced p99 {s[key]:.3f} s at {r.nodes} nodes"
                          f"   [goal < {GOAL_P99:.0f} s at 1,000 nodes: {verdict(s[key] < GOAL_P99)}]")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    points = sorted({int(p) for p in args.policy_points.split(",") if p.strip()} | {args.policies})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sizes = Sizes(namespaces=args.namespaces, pods=args.pods, policies=points[0], nodes=args.nodes)
    workdir = Path(tempfile.mkdtemp(prefix="netfence-scalebench-"))
    print(f"scale bench: {sizes.nodes} simulated nodes, {sizes.pods} pods, {sizes.namespaces} namespaces, "
          f"policy counts {points} (creates at {args.policies}), modes {modes}; workdir {workdir}")
    print(f"machine: {load_note()} (shared with other work: figures include contention)", flush=True)
    tools = ensure_tools()
    cluster = LocalCluster(workdir / "cluster", tools)
    api: client.ApiClient | None = None
    rounds: list[RoundResult] = []
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.start)
        api = await config.new_client_from_config(config_file=str(cluster.kubeconfig))
        setup = await create_world(api, sizes, args.concurrency)
        print(f"local cluster up in {setup + 0:.0f} s of setup ({time.monotonic() - t0:.0f} s in all)", flush=True)
        have = 0
        for point in points:
            t1 = time.monotonic()
            await grow_policies(api, sizes, have, point, args.concurrency)
            have = point
            print(f"{point} policies in the API ({time.monotonic() - t1:.1f} s)", flush=True)
            for mode in modes:
                creates = args.creates if point == args.policies else 0
                rounds.append(await run_round(cluster, api, workdir, sizes, mode, point, creates, args))
        print(f"\nmachine at the end: {load_note()}")
        print_table(rounds)
        print_goals(rounds, args.policies)
    finally:
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        await asyncio.to_thread(cluster.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {
        "sizes": {**asdict(sizes), "policy_points": points, "creates": args.creates,
                  "label_changes": args.label_changes},
        "machine": load_note(),
        "rounds": [r.summary() for r in rounds],
    }
    main_mode = "new" if "new" in modes else modes[0]
    out.update(figures(rounds, main_mode, args.policies))
    for mode in modes:
        if mode != main_mode:
            out[mode] = figures(rounds, mode, args.policies)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes (agents)")
    p.add_argument("--pods", type=int, default=5000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--policies", type=int, default=1000, help="the policy count of the create measurements")
    p.add_argument("--policy-points", default="100,1000,5000",
                   help="policy counts to measure controller CPU at (comma-separated; --policies is added)")
    p.add_argument("--creates", type=int, default=100, help="policy creates measured at --policies")
    p.add_argument("--label-changes", type=int, default=20, help="pod label changes per round")
    p.add_argument("--no-bulk-rewrite", dest="bulk_rewrite", action="store_false",
                   help="skip deleting every ClusterPolicyStatus at --policies (the writer recreates them all)")
    p.add_argument("--modes", default="baseline,new", help="'baseline' (pre-issue-11 status writer) and/or 'new'")
    p.add_argument("--gap", type=float, default=0.05, help="seconds between changes (after every agent reported)")
    p.add_argument("--channels", type=int, default=8, help="etcd connections shared by the simulated agents")
    p.add_argument("--fleet-procs", type=int, default=1, help="processes running the simulated agents")
    p.add_argument("--fleet-child", help=argparse.SUPPRESS)  # internal: run a fleet (JSON spec)
    p.add_argument("--report-ttl", type=int, default=10, help="lease TTL of the simulated agents' reports")
    p.add_argument("--concurrency", type=int, default=48, help="parallel API requests during setup")
    p.add_argument("--timeout", type=float, default=600.0, help="limit of every wait (s)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    p.add_argument("--controller-log-level", default="WARNING", help="the controller's --log-level")
    p.add_argument("--profile-controller", type=Path,
                   help="run the controller under cProfile and write <mode>-<policies>.prof stats into this directory")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.fleet_child:
        spec = json.loads(args.fleet_child)
        profile_dir = os.environ.get("NETFENCE_FLEET_PROFILE")  # where the simulated agents' time goes
        if not profile_dir:
            asyncio.run(fleet_child(spec))
            return
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            asyncio.run(fleet_child(spec))
        finally:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir) / f"fleet-{spec['first']}.prof"))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = asyncio.run(main_async(args))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
