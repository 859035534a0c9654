"""Agent benchmark: a REAL agent process, commits written straight into etcd (prints figures; not a test).

Starts a Netfence etcd (``EtcdServer``) and one namespace node
(``Fabric().add_node(0)``, no pods), runs ``python -m netfence.agent.main``
against it (``--netns`` = the node, ``--no-ipv6``) and writes the enforcement
model directly with ``EtcdStore.write(changes, fence=None)`` in the documented
layout (``policies/``, ``sets/``, ``endpoints/<node>/``; schema 1). The model
is ``dataplane_bench.synthetic_model`` (100 local endpoints, 30-member pod
sets, ipBlock and named-port sets), plus endpoints of other nodes that this
agent must ignore.

Method ("commit -> rules in the kernel"): t0 just before ``store.write``;
done when the agent's node report (``status/nodes/<node>``, watched) carries
``appliedRevision`` >= the revision of that commit. The agent sets
appliedRevision only after ``Dataplane.apply`` returned, i.e. after
``ipset restore`` / ``iptables-restore`` exited 0 in the node's namespace, so
the figure is an upper bound of commit -> kernel (it adds one etcd put and one
watch delivery, ~1-3 ms). After every change the bench checks the kernel
itself (``ipset test`` / ``iptables -S`` in the namespace); ``--poll``
additionally measures a few changes by polling the kernel only.

Phases: growth (100 / 1,000 / 5,000 policies, and 5,000 in etcd of which
1,000 apply on this node) with rules/sets from the report and the kernel;
latency at 1,000 policies (set-membership change, one-policy change); full
resync at ~20,000 rules (restart the agent against the existing kernel state,
spawn -> first report).

Before/after in the same run: every latency and resync figure is measured for
the agent as it is ("incremental": re-renders only what a commit touches, full
syncs write only what differs from the kernel) and for the same agent with the
hidden ``--bench-full-render`` ("full": the whole model rendered and diffed on
every commit, full syncs rewrite every chain and set, as before issue 11 part 6),
in interleaved rounds so both see the same machine load; it prints both and the
ratio, plus the agent's own CPU and its kernel tools' CPU per commit (from
/proc/<pid>/stat: less sensitive to the load than latencies). ``--json FILE``
writes the figures. Where the time goes inside the agent: attach a sampling
profiler to it during a run, e.g. ``py-spy record -p <agent pid> -f raw``.

    .venv/bin/python bench/agent_bench.py [--changes 60] [--rounds 3] [--restarts 3] [--no-growth]
        [--no-compare] [--poll 10] [--json FILE]

Everything it starts is stopped at the end (namespaces, processes, temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_note, ms_summary, pct, verdict
from dataplane_bench import synthetic_model
from netfence.dataplane.names import policy_chain, set_name
from netfence.dataplane.render import Features, render
from netfence.model.enforcement import CompiledPort, CompiledRule, Endpoint, NodeModel
from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence.store.layout import encode
from netfence_lab.etcd_server import EtcdServer
from netfence_lab.fabric import Fabric
from netfence_lab.process import ManagedProcess, free_port
from netfence_lab.tools import ensure_tools

NODE = "bench"
GOAL_MEMBERSHIP_P99 = 0.020
GOAL_POLICY_P99 = 0.050
GOAL_RESYNC = 2.0
REMOTE_NODES = 9
REMOTE_PER_NODE = 100
FEATURES = Features(ipv6=False)


# --- the model as etcd keys -----------------------------------------------------------------

def remote_endpoints(model: NodeModel) -> dict[str, Endpoint]:
    """Endpoints of other nodes (same policies): in etcd, never this agent's business."""
    keys = sorted(model.policies)
    out = {}
    for n in range(REMOTE_NODES):
        for j in range(REMOTE_PER_NODE):
            pol = keys[(n * REMOTE_PER_NODE + j) % len(keys)] if keys else None
            ep = Endpoint(f"remote-{n}", f"ns{j % 10}", f"r{n}-pod{j}", (f"10.245.{n}.{j + 2}",),
                          (pol,) if pol else (), ())
            out[f"endpoints/{ep.node}/{ep.namespace}/{ep.name}"] = ep
    return out


_ENCODED: dict[int, tuple[object, bytes]] = {}  # id(value) -> (value, its encoding): the bench's own CPU
_REMOTE: dict[tuple[str, ...], dict[str, bytes]] = {}  # stays low while it measures the agent


def _encoded(value: Any, encoder: Callable[[], dict[str, Any]]) -> bytes:
    hit = _ENCODED.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    data = encode(encoder())
    _ENCODED[id(value)] = (value, data)
    return data


def etcd_values(model: NodeModel, remote: bool = True) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in model.policies.values():
        out[f"policies/{p.namespace}/{p.name}"] = _encoded(p, p.to_json)
    for s in model.sets.values():
        out[f"sets/{s.id}"] = _encoded(s, s.to_json)
    for e in model.endpoints.values():
        out[f"endpoints/{NODE}/{e.namespace}/{e.name}"] = _encoded(e, replace(e, node=NODE).to_json)
    if remote:
        keys = tuple(sorted(model.policies))
        if keys not in _REMOTE:
            _REMOTE[keys] = {key: encode(ep.to_json()) for key, ep in remote_endpoints(model).items()}
        out.update(_REMOTE[keys])
    return out


def delta(before: dict[str, bytes], after: dict[str, bytes]) -> dict[str, bytes | None]:
    changes: dict[str, bytes | None] = {k: v for k, v in after.items() if before.get(k) != v}
    changes.update(dict.fromkeys(before.keys() - after.keys()))
    return changes


def model_of(n_policies: int, applied: int | None = None) -> NodeModel:
    model = synthetic_model(n_policies, applied=applied)
    endpoints = {k: replace(e, node=NODE) for k, e in model.endpoints.items()}
    return replace(model, node=NODE, endpoints=endpoints)


def local_policy_and_set(model: NodeModel) -> tuple[str, str]:
    """A policy applied on this node and a pods set its first rule uses."""
    used = {key for ep in model.endpoints.values() for key in ep.ingress}
    key = sorted(used)[0]
    rule = model.policies[key].ingress[0]  # type: ignore[index]
    assert rule.peers
    return key, rule.peers[0]


def membership_change(model: NodeModel, sid: str, it: int) -> tuple[NodeModel, str, bool]:
    """Add (even it) or remove (odd it) one address of a local set; (model, address, present)."""
    base = model.sets[sid]
    ip = f"10.250.{it // 200 % 250}.{it % 200 + 2}"
    present = it % 2 == 0
    members = tuple(sorted({*base.members, ip})) if present else base.members
    return replace(model, sets={**model.sets, sid: replace(base, members=members)}), ip, present


def policy_change(model: NodeModel, key: str, it: int) -> tuple[NodeModel, int]:
    """Change the first rule's first port of one local policy; returns (model, new port)."""
    pol = model.policies[key]
    assert pol.ingress
    rule = pol.ingress[0]
    assert rule.ports
    port = 20000 + it
    new_rule = CompiledRule(rule.peers, (CompiledPort("TCP", port), *rule.ports[1:]))
    changed = replace(pol, ingress=(new_rule, *pol.ingress[1:]))
    return replace(model, policies={**model.policies, key: changed}), port


# --- the agent and its reports ------------------------------------------------------------

@dataclass
class Report:
    revision: int  # etcd revision of the report write
    seen: float
    data: dict[str, Any]


@dataclass
class ReportWatch:
    store: EtcdStore
    reports: list[Report] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for revision, changes in self.store.watch_changes(f"status/nodes/{NODE}", prefix=False):
            now = time.monotonic()
            for value in changes.values():
                if value is not None:
                    self.reports.append(Report(revision, now, json.loads(value)))
                    self.changed.set()

    async def wait(self, applied: int, after_revision: int = 0, timeout: float = 120.0) -> Report:
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            while index < len(self.reports):
                r = self.reports[index]
                if r.revision > after_revision and r.data.get("appliedRevision", 0) >= applied:
                    return r
                index += 1
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = self.reports[-1].data if self.reports else None
                raise TimeoutError(f"no report with appliedRevision >= {applied}; last report {last}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@dataclass
class Bench:
    etcd: EtcdServer
    netns: str
    workdir: Path
    prefix: str
    store: EtcdStore
    watch: ReportWatch
    agent: ManagedProcess | None = None
    mode: str = "incremental"
    agents_started: int = 0
    state: dict[str, bytes] = field(default_factory=dict)
    revision: int = 0  # of the last commit written
    health_port: int = 0  # the running agent's /healthz

    def start_agent(self, full: bool = False) -> tuple[ManagedProcess, float, float]:
        """Spawn an agent (``full``: the path before incremental rendering); (process, monotonic and
        wall time of the spawn)."""
        self.agents_started += 1
        self.mode = "full" if full else "incremental"
        self.health_port = free_port()
        argv = [
            sys.executable, "-m", "netfence.agent.main",
            f"--node={NODE}", f"--netns={self.netns}", "--no-ipv6",
            f"--etcd-endpoints={self.etcd.endpoint}", f"--etcd-prefix={self.prefix}",
            f"--health-port={self.health_port}", "--report-ttl=10", "--resync-seconds=300",
            *(["--bench-full-render"] if full else []),
        ]
        proc = ManagedProcess(f"agent-{self.agents_started}", argv,
                              self.workdir / f"agent-{self.agents_started}.log")
        t_mono, t_wall = time.monotonic(), time.time()
        proc.start()
        self.agent = proc
        return proc, t_mono, t_wall

    async def commit(self, values: dict[str, bytes]) -> tuple[int, float, int]:
        """Write the difference to ``values`` as one change; (commit revision, t0, keys written)."""
        changes = delta(self.state, values)
        t0 = time.monotonic()
        if not changes:
            return self.revision, t0, 0
        revision = await self.store.write(changes, None)
        self.state = values
        self.revision = revision
        return revision, t0, len(changes)

    async def synced(self, revision: int, timeout: float = 120.0) -> None:
        """Until the agent's /healthz says it is synced to ``revision``: also for a commit that
        does not touch this node (the agent neither applies nor reports it, model/relevance.py)."""
        import aiohttp

        deadline = time.monotonic() + timeout
        last: object = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(f"http://127.0.0.1:{self.health_port}/healthz") as response:
                        last = (await response.json()).get("syncedRevision")
                        if isinstance(last, int) and last >= revision:
                            return
                await asyncio.sleep(0.01)
        raise TimeoutError(f"agent not synced to revision {revision} within {timeout}s (syncedRevision {last})")

    def kernel(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              check=False)

    def kernel_counts(self) -> tuple[int, int]:
        rules = sum(1 for line in self.kernel("iptables-save", "-t", "filter").stdout.splitlines()
                    if line.startswith("-A ") and not line.startswith("-A FORWARD "))
        sets = sum(1 for name in self.kernel("ipset", "list", "-n").stdout.split() if name.startswith("nf"))
        return rules, sets


def policy_chain_has_port(bench: Bench, model: NodeModel, key: str, port: int) -> bool:
    chain = policy_chain("ingress", key)
    out = bench.kernel("iptables", "-w", "-S", chain).stdout
    return f"--dport {port} " in out or f"--dport {port}\n" in out or f"--dports {port}," in out


# --- phases -------------------------------------------------------------------------------------

async def growth(bench: Bench) -> list[str]:
    lines = [f"  {'policies in etcd':>16} {'applied here':>12} {'local eps':>9} {'remote eps':>10} "
             f"{'pod-set members':>15} {'rules':>7} {'sets':>5} {'kernel rules':>12} {'kernel sets':>11} "
             f"{'apply':>8}"]
    for n, applied in ((100, 100), (1000, 1000), (5000, 5000), (5000, 1000)):
        model = model_of(n, applied)
        revision, t0, _ = await bench.commit(etcd_values(model))
        report = await bench.watch.wait(revision)
        rules, sets = bench.kernel_counts()
        members = sum(len(s.members) for s in model.sets.values() if s.kind == "pods")
        lines.append(f"  {n:>16} {applied:>12} {len(model.endpoints):>9} {REMOTE_NODES * REMOTE_PER_NODE:>10} "
                     f"{members:>15} {report.data['rules']:>7} {report.data['sets']:>5} {rules:>12} {sets:>11} "
                     f"{report.seen - t0:7.2f}s")
    return lines


MODES = ("incremental", "full")  # the agent as it is / with --bench-full-render (the path before)


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """(the process's own CPU seconds, CPU seconds of its reaped children: the kernel tools)."""
    if pid is None:
        return 0.0, 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


@dataclass
class Series:
    """One series of changes measured against one agent."""

    samples: list[float] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    verified: int = 0
    agent_cpu: float = 0.0  # seconds, over the series
    tools_cpu: float = 0.0

    def extend(self, other: Series) -> None:
        self.samples += other.samples
        self.writes += other.writes
        self.verified += other.verified
        self.agent_cpu += other.agent_cpu
        self.tools_cpu += other.tools_cpu

    def figures(self) -> dict[str, Any]:
        n = max(1, len(self.samples))
        return {"p50_ms": pct(self.samples, 0.5) * 1e3, "p99_ms": pct(self.samples, 0.99) * 1e3,
                "max_ms": max(self.samples, default=0.0) * 1e3, "n": len(self.samples),
                "verified": self.verified, "etcd_write_p50_ms": pct(self.writes, 0.5) * 1e3,
                "agent_cpu_ms_per_commit": self.agent_cpu / n * 1e3,
                "tools_cpu_ms_per_commit": self.tools_cpu / n * 1e3}


async def latency_base(bench: Bench) -> tuple[NodeModel, str, str]:
    """Commit the 1,000-policy model (if not yet there); (model, local policy key, local set id)."""
    model = model_of(1000)
    revision, _, _ = await bench.commit(etcd_values(model))
    # The agent is done with it (its first apply, or a commit this node does not need: policies
    # only other nodes use, which it neither applies nor reports).
    await bench.synced(revision)
    key, sid = local_policy_and_set(model)
    return model, key, sid


async def membership_series(bench: Bench, n_changes: int, gap: float, offset: int) -> Series:
    """``n_changes`` set-membership changes (add, remove, ...) of one set a local policy uses."""
    model, _, sid = await latency_base(bench)
    out = Series()
    cpu0 = cpu_seconds(bench.agent.pid if bench.agent else None)
    for it in range(offset, offset + n_changes):
        current, ip, present = membership_change(model, sid, it)
        revision, t0, _ = await bench.commit(etcd_values(current))
        out.writes.append(time.monotonic() - t0)
        report = await bench.watch.wait(revision)
        out.samples.append(report.seen - t0)
        test = bench.kernel("ipset", "test", set_name("v4", sid), ip)
        out.verified += (test.returncode == 0) == present
        await asyncio.sleep(gap)
    cpu1 = cpu_seconds(bench.agent.pid if bench.agent else None)
    out.agent_cpu, out.tools_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return out


async def policy_series(bench: Bench, n_changes: int, gap: float, offset: int) -> Series:
    """``n_changes`` changes of one local policy (its first port), then back to the base model."""
    model, key, _ = await latency_base(bench)
    out = Series()
    cpu0 = cpu_seconds(bench.agent.pid if bench.agent else None)
    for it in range(offset, offset + n_changes):
        current, port = policy_change(model, key, it)
        revision, t0, _ = await bench.commit(etcd_values(current))
        out.writes.append(time.monotonic() - t0)
        report = await bench.watch.wait(revision)
        out.samples.append(report.seen - t0)
        out.verified += policy_chain_has_port(bench, current, key, port)
        await asyncio.sleep(gap)
    cpu1 = cpu_seconds(bench.agent.pid if bench.agent else None)
    out.agent_cpu, out.tools_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    revision, _, _ = await bench.commit(etcd_values(model))
    await bench.watch.wait(revision)
    return out


SERIES: dict[str, tuple[str, float]] = {
    "membership": ("set-membership change", GOAL_MEMBERSHIP_P99),
    "policy": ("one-policy change", GOAL_POLICY_P99),
}


def _ratio(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}x"


async def switch_agent(bench: Bench, mode: str) -> float:
    """Run the agent in ``mode`` (restarting it if needed); spawn -> report of the current state, seconds."""
    if bench.agent is not None and bench.mode == mode:
        return 0.0
    if bench.agent is not None:
        bench.agent.stop(grace=10.0)  # fail-static: the rules stay in the kernel
    after = bench.watch.reports[-1].revision if bench.watch.reports else 0
    _, t_mono, _ = bench.start_agent(full=mode == "full")
    report = await bench.watch.wait(bench.revision, after_revision=after)
    return report.seen - t_mono


async def kernel_polled(bench: Bench, n: int) -> tuple[list[float], list[float]]:
    """Commit -> first poll that sees the change in the kernel (ipset test / iptables -S), n each."""
    model = model_of(1000)
    key, sid = local_policy_and_set(model)
    revision, _, _ = await bench.commit(etcd_values(model))
    await bench.watch.wait(revision)
    member, policy = [], []
    for it in range(n):
        changed, ip, _ = membership_change(model, sid, 2 * it + 1000)  # an add
        revision, t0, _ = await bench.commit(etcd_values(changed))
        while bench.kernel("ipset", "test", set_name("v4", sid), ip).returncode != 0:
            if time.monotonic() - t0 > 30:
                raise TimeoutError("membership change never reached the kernel")
        member.append(time.monotonic() - t0)
        await bench.watch.wait(revision)
        revision, _, _ = await bench.commit(etcd_values(model))
        await bench.watch.wait(revision)
    for it in range(n):
        changed, port = policy_change(model, key, it + 500)
        revision, t0, _ = await bench.commit(etcd_values(changed))
        while not policy_chain_has_port(bench, changed, key, port):
            if time.monotonic() - t0 > 30:
                raise TimeoutError("policy change never reached the kernel")
        policy.append(time.monotonic() - t0)
        await bench.watch.wait(revision)
    return member, policy


def log_time(path: Path, needle: str) -> float | None:
    """Wall time of the first log line containing ``needle`` (the agent logs asctime with ms)."""
    try:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                stamp = " ".join(line.split()[:2])
                return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except (OSError, ValueError):
        return None
    return None


async def resyncs(bench: Bench, restarts: int, modes: tuple[str, ...]) -> dict[str, Any]:
    n = 1000
    while render(model_of(n), features=FEATURES).rule_count < 20000:
        n += 250
    model = model_of(n)
    revision, t0, _ = await bench.commit(etcd_values(model))
    report = await bench.watch.wait(revision)
    out: dict[str, Any] = {"policies": n, "rules": report.data["rules"], "sets": report.data["sets"],
                           "first_apply": report.seen - t0, "restarts": {m: [] for m in modes}}
    for _ in range(restarts):
        for mode in modes:  # interleaved, so both see the same load
            assert bench.agent is not None
            bench.agent.stop(grace=10.0)  # fail-static: the rules stay in the kernel
            rules_left, sets_left = bench.kernel_counts()
            after = bench.watch.reports[-1].revision if bench.watch.reports else 0
            proc, t_mono, t_wall = bench.start_agent(full=mode == "full")
            report = await bench.watch.wait(revision, after_revision=after)
            started = log_time(proc.log_path, "agent for node")
            synced = log_time(proc.log_path, "full sync:")
            out["restarts"][mode].append({
                "total": report.seen - t_mono,
                "startup": None if started is None else started - t_wall,
                "started_to_sync_log": None if started is None or synced is None else synced - started,
                "kernel_before": (rules_left, sets_left),
                "load1": os.getloadavg()[0],
            })
    return out


# --- main ------------------------------------------------------------------------------------------

async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="netfence-agentbench-"))
    print(f"agent bench: node '{NODE}', 100 local endpoints, {REMOTE_NODES * REMOTE_PER_NODE} endpoints of "
          f"{REMOTE_NODES} other nodes in etcd; IPv4 only; workdir {workdir}")
    print(f"machine: {load_note()} (shared with other work: figures include contention)")
    tools = ensure_tools()
    etcd = EtcdServer(tools.etcd, workdir / "etcd", name="bench-etcd")
    fabric: Fabric | None = None
    store: EtcdStore | None = None
    watch: ReportWatch | None = None
    bench: Bench | None = None
    try:
        await asyncio.to_thread(etcd.start)
        fabric = Fabric(workdir=workdir / "fabric")
        node = await asyncio.to_thread(fabric.add_node, 0)
        prefix = f"/netfence/agentbench{uuid.uuid4().hex[:6]}/"
        store = EtcdStore(EtcdConfig(endpoints=[etcd.endpoint], prefix=prefix))
        await store.connect()
        watch = ReportWatch(store)
        watch.start()
        bench = Bench(etcd, node.netns, workdir, prefix, store, watch)
        await bench.commit(etcd_values(model_of(1000)))  # a commit exists before the first agent starts
        bench.start_agent()

        if args.growth:
            print("\nRules and sets on the node as policies grow (report / kernel; 'apply' = commit -> report):")
            for line in await growth(bench):
                print(line)
            print("  (pod sets hold 30 members each; endpoints of other nodes and policies not applied here add"
                  " nothing)")

        modes = MODES if args.compare else MODES[:1]
        results: dict[str, Any] = {"load_start": os.getloadavg(), "modes": list(modes), "changes": args.changes,
                                   "rounds": args.rounds, "gap_s": args.gap}
        series: dict[str, dict[str, Series]] = {kind: {m: Series() for m in modes} for kind in SERIES}
        per_round = max(2, args.changes // args.rounds // 2 * 2)  # even: membership adds and removes
        for rnd in range(args.rounds):
            for mode in (modes if rnd % 2 == 0 else modes[::-1]):  # interleaved, alternating order
                await switch_agent(bench, mode)
                await latency_base(bench)
                series["membership"][mode].extend(await membership_series(bench, per_round, args.gap,
                                                                          2 * rnd * per_round))
                series["policy"][mode].extend(await policy_series(bench, per_round, args.gap, rnd * per_round))
        last = bench.watch.reports[-1].data
        print(f"\nCommit -> rules in the kernel, 1,000 policies in etcd ({last['rules']} rules, {last['sets']} sets"
              f" on the node); {per_round * args.rounds} changes of each kind per mode in {args.rounds} interleaved"
              f" rounds, gap {args.gap * 1000:.0f} ms; 'full' = the agent with --bench-full-render (whole model"
              f" re-rendered and diffed per commit, as before):")
        results["latency"] = {}
        for kind, (label, goal) in SERIES.items():
            print(f"  {label}:")
            results["latency"][kind] = {}
            for mode in modes:
                ser = series[kind][mode]
                fig = ser.figures()
                results["latency"][kind][mode] = fig
                mark = f"   [goal p99 < {goal * 1000:.0f} ms: {verdict(pct(ser.samples, 0.99) < goal)}]" \
                    if mode == "incremental" else ""
                print(f"    {mode:<12} {ms_summary(ser.samples)}{mark}")
                print(f"    {'':<12} agent CPU {fig['agent_cpu_ms_per_commit']:.1f} ms/commit, kernel tools CPU "
                      f"{fig['tools_cpu_ms_per_commit']:.1f} ms/commit; etcd write p50 "
                      f"{fig['etcd_write_p50_ms']:.1f} ms; kernel verified {ser.verified}/{len(ser.samples)}")
            if len(modes) == 2:
                new, old = results["latency"][kind]["incremental"], results["latency"][kind]["full"]
                ratio = {k: old[k] / new[k] if new[k] else None
                         for k in ("p50_ms", "p99_ms", "agent_cpu_ms_per_commit")}
                results["latency"][kind]["ratio_full_over_incremental"] = ratio
                print(f"    ratio full/incremental: p50 {_ratio(ratio['p50_ms'])}, p99 {_ratio(ratio['p99_ms'])},"
                      f" agent CPU per commit {_ratio(ratio['agent_cpu_ms_per_commit'])}")
        await switch_agent(bench, modes[0])
        if args.poll:
            member, policy = await kernel_polled(bench, args.poll)
            print("  cross-check by polling the kernel only (incremental agent; ipset test / iptables -S, ~5-10 ms"
                  " per poll):")
            print(f"  {'set-membership change':<22} {ms_summary(member)}")
            print(f"  {'one-policy change':<22} {ms_summary(policy)}")

        rs = await resyncs(bench, args.restarts, modes)
        results["resync"] = rs
        print(f"\nFull resync: {rs['policies']} policies -> {rs['rules']} rules, {rs['sets']} sets on the node "
              f"(first apply by the running agent: {rs['first_apply']:.2f} s); agent restarted against the kernel "
              f"state it left ('full' rewrites every chain and set, 'incremental' only what differs):")
        for mode in modes:
            for i, r in enumerate(rs["restarts"][mode], 1):
                startup = "?" if r["startup"] is None else f"{r['startup']:.2f} s"
                sync = "?" if r["started_to_sync_log"] is None else f"{r['started_to_sync_log']:.2f} s"
                mark = f"   [goal < {GOAL_RESYNC:.0f} s: {verdict(r['total'] < GOAL_RESYNC)}]" \
                    if mode == "incremental" else ""
                print(f"  {mode:<12} restart {i}: agent spawn -> first report {r['total']:.2f} s{mark}  (start-up"
                      f" until 'agent started' {startup}, then -> 'full sync' logged {sync}; load {r['load1']:.2f})")
        if len(modes) == 2:
            new_t = [r["total"] for r in rs["restarts"]["incremental"]]
            old_t = [r["total"] for r in rs["restarts"]["full"]]
            if new_t and old_t:
                rs["ratio_full_over_incremental"] = pct(old_t, 0.5) / pct(new_t, 0.5)
                print(f"  ratio full/incremental (medians): {_ratio(rs['ratio_full_over_incremental'])}")
        results["load_end"] = os.getloadavg()
        print(f"\nmachine at the end: {load_note()}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            print(f"figures written to {args.json}")
    finally:
        if bench is not None and bench.agent is not None:
            bench.agent.stop()
        if watch is not None:
            await watch.stop()
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        if fabric is not None:
            await asyncio.to_thread(fabric.close)
        await asyncio.to_thread(etcd.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=60, help="changes per kind and mode")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the changes are split into")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between changes")
    parser.add_argument("--restarts", type=int, default=3, help="agent restarts per mode for the resync figure")
    parser.add_argument("--poll", type=int, default=0, help="changes measured by kernel polling (0: skip)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="measure only the agent as it is (not also with --bench-full-render)")
    parser.add_argument("--no-growth", dest="growth", action="store_false", help="skip the growth table")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (agent logs)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
