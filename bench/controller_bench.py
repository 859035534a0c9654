"""Controller benchmark against a real control plane (prints figures; not a test).

Starts a LocalCluster (kube-apiserver + its etcd + Netfence's etcd) in a
temporary directory, creates a synthetic world through the API (default
5,000 pods in 100 namespaces on 10 node names, 1,000 NetworkPolicies; see
``synthetic.py``; pods get ``spec.nodeName`` and a status patch with their
IP and phase Running, no network namespaces), then for each round starts the
REAL controller process (``python -m netfence.controller.main``) on a fresh
etcd prefix and measures:

* cold start: controller spawn -> first commit, and -> the committed snapshot
  equals ``compile_world`` of the same listing (every key and value);
* memory of the controller (VmRSS/VmHWM from /proc) after cold start, after
  the ClusterPolicyStatus objects settled, and at the end;
* pod label change (``track`` stable<->canary, referenced by two of the five
  policy shapes): API write -> the commit marker whose ``meta/observed`` pods
  resourceVersion covers the write (seen through an etcd watch of the prefix),
  and the keys written in that commit (puts/deletes of policies/, sets/,
  endpoints/; commit, pending and meta/ excluded), compared with the keys an
  in-process ModelEngine mirror says changed.

    .venv/bin/python bench/controller_bench.py [--rounds 2] [--changes 50] [--keep]

Everything it starts is stopped at the end (the temp directory too, unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from benchlib import load_note, ms_summary, pct, verdict, vm_status
from netfence.controller.kube import CPS_GROUP, CPS_PLURAL, CPS_VERSION, KubeApi, Listing
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s
from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence_lab.cluster import LocalCluster
from netfence_lab.process import ManagedProcess, free_port
from netfence_lab.tools import ensure_tools
from synthetic import Sizes, flip_track, namespace_bodies, node_bodies, pod_bodies, policy_bodies

BENCH_DIR = Path(__file__).resolve().parent
GOAL_COLD_START = 30.0
GOAL_LABEL_P99 = 0.050
GOAL_MEMORY_MB = 300
DATA_PREFIXES = ("policies/", "sets/", "endpoints/")


# --- setup through the API -----------------------------------------------------------------

async def bounded(limit: int, jobs: Iterable[Callable[[], Awaitable[Any]]]) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            for attempt in range(5):
                try:
                    await job()
                    return
                except ApiException as exc:
                    if exc.status == 409:
                        return
                    if exc.status in (429, 500, 503, 504) and attempt < 4:
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    raise

    await asyncio.gather(*(one(job) for job in jobs))


async def create_world(api: client.ApiClient, sizes: Sizes, concurrency: int) -> dict[str, float]:
    core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
    times: dict[str, float] = {}
    t0 = time.monotonic()
    await bounded(concurrency, [lambda b=b: core.create_node(b) for b in node_bodies(sizes)])
    await bounded(concurrency, [lambda b=b: core.create_namespace(b) for b in namespace_bodies(sizes)])
    times["nodes + namespaces"] = time.monotonic() - t0

    async def make_pod(body: dict[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        with contextlib.suppress(ApiException):  # 409 on a retry: it exists, patch its status anyway
            await core.create_namespaced_pod(meta["namespace"], body)
        await core.patch_namespaced_pod_status(meta["name"], meta["namespace"], status)

    t1 = time.monotonic()
    await bounded(concurrency, [lambda b=b, s=s: make_pod(b, s) for b, s in pod_bodies(sizes)])
    times["pods (create + status patch)"] = time.monotonic() - t1
    t2 = time.monotonic()
    await bounded(concurrency, [
        lambda b=b: net.create_namespaced_network_policy(b["metadata"]["namespace"], b)
        for b in policy_bodies(sizes)
    ])
    times["network policies"] = time.monotonic() - t2
    times["total"] = time.monotonic() - t0
    return times


def expected_state(listing: Listing) -> dict[str, dict[str, Any]]:
    return compile_world(
        [pod_from_k8s(b) for b in listing.pods],
        [namespace_from_k8s(b) for b in listing.namespaces],
        [policy_from_k8s(b) for b in listing.policies],
    )


def mirror_engine(listing: Listing) -> tuple[ModelEngine, WorldTracker]:
    engine = ModelEngine()
    tracker = WorldTracker(engine)
    tracker.replace_all({"pods": listing.pods, "namespaces": listing.namespaces,
                         "networkpolicies": listing.policies, "nodes": listing.nodes})
    engine.drain_changes()
    return engine, tracker


# --- watching the prefix -----------------------------------------------------------------

@dataclass
class Commit:
    revision: int
    seen: float  # time.monotonic() when the watch delivered it
    keys: dict[str, bool]  # data keys of this change -> put (True) / delete (False)
    observed: dict[str, int]  # meta/observed resourceVersions as of this commit


@dataclass
class PrefixWatch:
    """Follows the whole prefix and turns it into a list of commits (with the keys each wrote)."""

    store: EtcdStore
    commits: list[Commit] = field(default_factory=list)
    seen: dict[int, float] = field(default_factory=dict)
    new_commit: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self, after_revision: int | None) -> None:
        self._task = asyncio.create_task(self._run(after_revision))

    async def _run(self, after_revision: int | None) -> None:
        buffer: dict[str, bool] = {}
        observed: dict[str, int] = {}
        async for revision, changes in self.store.watch_changes("", after_revision):
            now = time.monotonic()
            committed = False
            for rel, value in changes.items():
                if rel == "commit":
                    committed = committed or value is not None
                elif rel == "meta/observed" and value is not None:
                    observed = {k: int(v) for k, v in json.loads(value).get("resourceVersions", {}).items()}
                elif rel.startswith(DATA_PREFIXES):
                    buffer[rel] = value is not None
            if committed:
                self.seen[revision] = now
                self.commits.append(Commit(revision, now, buffer, dict(observed)))
                buffer = {}
                self.new_commit.set()

    async def wait_commit(self, predicate: Callable[[Commit], bool], start_index: int, timeout: float) -> Commit:
        deadline = time.monotonic() + timeout
        index = start_index
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def diff_state(values: dict[str, bytes], expected: dict[str, dict[str, Any]]) -> list[str]:
    got = {k: v for k, v in values.items() if k.startswith(DATA_PREFIXES)}
    problems = [f"missing {k}" for k in expected.keys() - got.keys()]
    problems += [f"unexpected {k}" for k in got.keys() - expected.keys()]
    problems += [f"differs {k}" for k in expected.keys() & got.keys() if json.loads(got[k]) != expected[k]]
    return sorted(problems)


# --- one round ---------------------------------------------------------------------------

@dataclass
class RoundResult:
    first_commit: float = 0.0
    cold_start: float = 0.0
    statuses_settled: float | None = None
    keys: dict[str, int] = field(default_factory=dict)
    mem_cold: dict[str, int] = field(default_factory=dict)
    mem_settled: dict[str, int] = field(default_factory=dict)
    mem_end: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    when: list[float] = field(default_factory=list)  # seconds after spawn of each label change
    after_response: list[float] = field(default_factory=list)
    api_rtt: list[float] = field(default_factory=list)
    key_counts: list[int] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    exact: int = 0
    probe: dict[str, Any] = field(default_factory=dict)


async def count_statuses(custom: client.CustomObjectsApi) -> int:
    items = (await custom.list_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL))["items"]
    return sum(1 for item in items if item.get("status"))


async def run_round(
    cluster: LocalCluster, api: client.ApiClient, workdir: Path, round_no: int, args: argparse.Namespace
) -> RoundResult:
    result = RoundResult()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    listing = await KubeApi(api).list_world()
    expected = expected_state(listing)
    result.keys = {p.rstrip("/"): sum(1 for k in expected if k.startswith(p)) for p in DATA_PREFIXES}
    engine, tracker = mirror_engine(listing)
    pods = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in listing.pods}

    prefix = f"/netfence/bench{uuid.uuid4().hex[:8]}/"
    store = EtcdStore(EtcdConfig(endpoints=[cluster.netfence_etcd.endpoint], prefix=prefix))
    await store.connect()
    watch = PrefixWatch(store)
    watch.start(None)
    await asyncio.sleep(0.2)  # let the watch be established before the controller writes
    probe_out = workdir / f"controller-{round_no}.stalls.json"
    runner = ([sys.executable, str(BENCH_DIR / "controller_probe.py"),
               "--probe-out", str(probe_out), "--"] if args.diagnose
              else [sys.executable, "-m", "netfence.controller.main"])
    argv = [
        *runner,
        f"--kubeconfig={cluster.kubeconfig}",
        f"--etcd-endpoints={cluster.netfence_etcd.endpoint}",
        f"--etcd-prefix={prefix}",
        f"--identity=bench-controller-{round_no}",
        f"--health-port={free_port()}",
    ]
    proc = ManagedProcess(f"controller-{round_no}", argv, workdir / f"controller-{round_no}.log")
    try:
        t_start = time.monotonic()
        proc.start()
        assert proc.pid is not None
        first = await watch.wait_commit(lambda c: True, 0, args.timeout)
        result.first_commit = first.seen - t_start
        # complete = a committed snapshot equal to compile_world of the listing
        checked = 0
        problems: list[str] = ["no commit yet"]
        deadline = t_start + args.timeout
        while time.monotonic() < deadline:
            if len(watch.commits) > checked:
                checked = len(watch.commits)
                snap = await store.committed_snapshot()
                problems = diff_state(snap.values, expected)
                if not problems:
                    result.cold_start = watch.seen.get(snap.commit_revision, time.monotonic()) - t_start
                    break
            watch.new_commit.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.new_commit.wait(), 1.0)
        else:
            raise SystemExit(f"controller never reached the expected state: {len(problems)} problems, "
                             f"e.g. {problems[:5]} (log: {proc.log_path})")
        result.mem_cold = vm_status(proc.pid)

        # ClusterPolicyStatus objects: wait until every policy has one with a status (steady state)
        t_cps = time.monotonic()
        while time.monotonic() - t_cps < args.status_timeout:
            if await count_statuses(custom) >= len(listing.policies):
                result.statuses_settled = time.monotonic() - t_start
                break
            await asyncio.sleep(1.0)
        await asyncio.sleep(1.0)
        result.mem_settled = vm_status(proc.pid)

        # single pod label changes (freeze this process's heap first: its own GC pauses must not count)
        gc.collect()
        gc.freeze()
        rng = random.Random(100 + round_no)
        keys = sorted(pods)
        for _ in range(args.changes):
            ns, name = rng.choice(keys)
            body = pods[(ns, name)]
            patch = flip_track(body["metadata"]["labels"])
            index = len(watch.commits)
            t0 = time.monotonic()
            resp = await core.patch_namespaced_pod(name, ns, {"metadata": {"labels": patch}})
            t1 = time.monotonic()
            rv = int(resp.metadata.resource_version)
            commit = await watch.wait_commit(lambda c, rv=rv: c.observed.get("pods", 0) >= rv, index, 30.0)
            result.latencies.append(commit.seen - t0)
            result.when.append(t0 - t_start)
            result.after_response.append(commit.seen - t1)
            result.api_rtt.append(t1 - t0)
            result.key_counts.append(len(commit.keys))
            for key in commit.keys:
                kind = key.split("/", 1)[0]
                result.kinds[kind] = result.kinds.get(kind, 0) + 1
            # what the model says this change must write
            new_body = {**body, "metadata": {**body["metadata"], "labels": {**body["metadata"]["labels"], **patch},
                                             "resourceVersion": str(rv)}}
            pods[(ns, name)] = new_body
            tracker.apply("pods", "MODIFIED", new_body)
            if set(engine.drain_changes()) == set(commit.keys):
                result.exact += 1
            await asyncio.sleep(args.gap)
        result.mem_end = vm_status(proc.pid)
        if not proc.alive():
            raise SystemExit(f"the controller exited (log: {proc.log_path})")
    finally:
        proc.stop(grace=15.0)
        await watch.stop()
        await store.close()
        with contextlib.suppress(ApiException):
            await custom.delete_collection_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL)
    if args.diagnose and probe_out.exists():
        result.probe = json.loads(probe_out.read_text())
        result.probe["t_start"] = t_start
        result.probe["label_phase"] = (t_start + min(result.when, default=0), time.monotonic())
    return result


def mb(mem: dict[str, int]) -> str:
    if not mem:
        return "n/a"
    return f"RSS {mem['VmRSS'] / 1024:5.0f} MB, HWM {mem['VmHWM'] / 1024:5.0f} MB"


def report(round_no: int, r: RoundResult, args: argparse.Namespace) -> None:
    print(f"\n== round {round_no} ==")
    print(f"  expected keys (compile_world): {r.keys['policies']} policies, {r.keys['sets']} sets, "
          f"{r.keys['endpoints']} endpoints")
    print(f"  cold start: spawn -> first commit {r.first_commit:6.2f} s; -> complete state {r.cold_start:6.2f} s"
          f"   [goal < {GOAL_COLD_START:.0f} s: {verdict(r.cold_start < GOAL_COLD_START)}]")
    settled = "not within timeout" if r.statuses_settled is None else f"{r.statuses_settled:6.2f} s after spawn"
    print(f"  every policy has a ClusterPolicyStatus with status: {settled}")
    hwm = max(m.get("VmHWM", 0) for m in (r.mem_cold, r.mem_settled, r.mem_end)) / 1024
    print(f"  controller memory after cold start: {mb(r.mem_cold)}")
    print(f"  controller memory after statuses:   {mb(r.mem_settled)}")
    print(f"  controller memory at the end:       {mb(r.mem_end)}"
          f"   [goal < {GOAL_MEMORY_MB} MB: {verdict(hwm < GOAL_MEMORY_MB)}]")
    print(f"  pod label change x{len(r.latencies)} (gap {args.gap * 1000:.0f} ms):")
    print(f"    API write -> commit seen:      {ms_summary(r.latencies)}"
          f"   [goal p99 < {GOAL_LABEL_P99 * 1000:.0f} ms: {verdict(pct(r.latencies, 0.99) < GOAL_LABEL_P99)}]")
    print(f"    API response -> commit seen:   {ms_summary(r.after_response)}")
    print(f"    API patch round trip:          {ms_summary(r.api_rtt)}")
    slow = [f"{lat * 1000:.0f} ms at t+{when:.1f} s" for lat, when in zip(r.latencies, r.when, strict=True)
            if lat > GOAL_LABEL_P99]
    if slow:
        print(f"    changes over {GOAL_LABEL_P99 * 1000:.0f} ms: {', '.join(slow)}")
    counts = sorted(r.key_counts)
    print(f"    keys written per change (data keys, commit/meta excluded): p50 {pct(counts, 0.5):.0f}, "
          f"max {max(counts) if counts else 0}, by kind {r.kinds}")
    print(f"    changes whose written keys == the keys the model says changed: {r.exact}/{len(r.latencies)}"
          f"   [goal 'only affected keys': {verdict(r.exact == len(r.latencies))}]")
    if r.probe:
        print_probe(r.probe)


def print_probe(probe: dict[str, Any]) -> None:
    t0 = probe["t_start"]
    lo, hi = probe["label_phase"]
    stalls = probe["stalls"]
    during = [s for s in stalls if lo <= s["end"] <= hi]
    print(f"  controller event-loop stalls > 50 ms: {len(stalls)} in total, {len(during)} during the label changes")
    for s in sorted(stalls, key=lambda s: -s["late"])[:8]:
        print(f"    {s['late'] * 1000:7.0f} ms ending at t+{s['end'] - t0:.1f} s")
    print(f"  samples during stalls: {probe['samples_in_stalls']} of {probe['samples_total']} (5 ms CPU each);"
          " innermost netfence frames:")
    for frame, n in probe["innermost_netfence"][:10]:
        print(f"    {n:6d}  {frame}")
    print("  netfence stacks (innermost first):")
    for stack, n in probe["netfence_stacks"][:6]:
        print(f"    {n:6d}  {stack}")


async def main_async(args: argparse.Namespace) -> None:
    sizes = Sizes(namespaces=args.namespaces, pods=args.pods, policies=args.policies, nodes=args.nodes)
    workdir = Path(tempfile.mkdtemp(prefix="netfence-ctlbench-"))
    print(f"controller bench: {sizes.pods} pods, {sizes.namespaces} namespaces, {sizes.policies} policies, "
          f"{sizes.nodes} node names; workdir {workdir}")
    print(f"machine: {load_note()} (shared with other work: figures include contention)")
    tools = ensure_tools()
    cluster = LocalCluster(workdir / "cluster", tools)
    api: client.ApiClient | None = None
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.start)
        print(f"local cluster up in {time.monotonic() - t0:.1f} s")
        api = await config.new_client_from_config(config_file=str(cluster.kubeconfig))
        setup = await create_world(api, sizes, args.concurrency)
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in setup.items())
        print(f"setup through the API (concurrency {args.concurrency}): {steps}")
        results = []
        for round_no in range(1, args.rounds + 1):
            r = await run_round(cluster, api, workdir, round_no, args)
            results.append(r)
            report(round_no, r, args)
        print(f"\nmachine at the end: {load_note()}")
    finally:
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        await asyncio.to_thread(cluster.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="controller cold starts (fresh etcd prefix each)")
    parser.add_argument("--changes", type=int, default=50, help="pod label changes per round")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between label changes")
    parser.add_argument("--concurrency", type=int, default=48, help="parallel API requests during setup")
    parser.add_argument("--timeout", type=float, default=120.0, help="cold start limit (s)")
    parser.add_argument("--status-timeout", type=float, default=90.0,
                        help="how long to wait for every ClusterPolicyStatus before the label changes (s)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    parser.add_argument("--diagnose", action="store_true",
                        help="run the controller under bench/controller_probe.py (stack sampler + loop-stall "
                             "monitor) and print where its event loop stalled")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
