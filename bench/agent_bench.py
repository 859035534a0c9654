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

    .venv/bin/python bench/agent_bench.py [--changes 50] [--restarts 2] [--poll 10]

Everything it starts is stopped at the end (namespaces, processes, temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
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
GOAL_MEMBERSHIP_P99 = 0.050
GOAL_POLICY_P99 = 0.100
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


def etcd_values(model: NodeModel, remote: bool = True) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in model.policies.values():
        out[f"policies/{p.namespace}/{p.name}"] = encode(p.to_json())
    for s in model.sets.values():
        out[f"sets/{s.id}"] = encode(s.to_json())
    for e in model.endpoints.values():
        out[f"endpoints/{NODE}/{e.namespace}/{e.name}"] = encode(replace(e, node=NODE).to_json())
    if remote:
        for key, ep in remote_endpoints(model).items():
            out[key] = encode(ep.to_json())
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
    agents_started: int = 0
    state: dict[str, bytes] = field(default_factory=dict)

    def start_agent(self) -> tuple[ManagedProcess, float, float]:
        """Spawn an agent; returns (process, monotonic and wall time of the spawn)."""
        self.agents_started += 1
        argv = [
            sys.executable, "-m", "netfence.agent.main",
            f"--node={NODE}", f"--netns={self.netns}", "--no-ipv6",
            f"--etcd-endpoints={self.etcd.endpoint}", f"--etcd-prefix={self.prefix}",
            f"--health-port={free_port()}", "--report-ttl=10", "--resync-seconds=300",
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
        revision = await self.store.write(changes, None)
        self.state = values
        return revision, t0, len(changes)

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


async def latencies(bench: Bench, n_changes: int, gap: float) -> dict[str, Any]:
    model = model_of(1000)
    revision, _, _ = await bench.commit(etcd_values(model))
    await bench.watch.wait(revision)
    key, sid = local_policy_and_set(model)
    out: dict[str, Any] = {"policy": key, "set": sid}
    # set-membership change
    samples, writes, verified = [], [], 0
    current = model
    for it in range(n_changes):
        current, ip, present = membership_change(model, sid, it)
        revision, t0, _ = await bench.commit(etcd_values(current))
        writes.append(time.monotonic() - t0)
        report = await bench.watch.wait(revision)
        samples.append(report.seen - t0)
        test = bench.kernel("ipset", "test", set_name("v4", sid), ip)
        verified += (test.returncode == 0) == present
        await asyncio.sleep(gap)
    out["membership"] = (samples, writes, verified)
    # one-policy change
    samples, writes, verified = [], [], 0
    base = current
    for it in range(n_changes):
        current, port = policy_change(base, key, it)
        revision, t0, _ = await bench.commit(etcd_values(current))
        writes.append(time.monotonic() - t0)
        report = await bench.watch.wait(revision)
        samples.append(report.seen - t0)
        verified += policy_chain_has_port(bench, current, key, port)
        await asyncio.sleep(gap)
    out["policy_change"] = (samples, writes, verified)
    out["rules"] = report.data["rules"]
    out["sets"] = report.data["sets"]
    return out


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


async def resyncs(bench: Bench, restarts: int) -> dict[str, Any]:
    n = 1000
    while render(model_of(n), features=FEATURES).rule_count < 20000:
        n += 250
    model = model_of(n)
    revision, t0, _ = await bench.commit(etcd_values(model))
    report = await bench.watch.wait(revision)
    out: dict[str, Any] = {"policies": n, "rules": report.data["rules"], "sets": report.data["sets"],
                           "first_apply": report.seen - t0, "restarts": []}
    for _ in range(restarts):
        assert bench.agent is not None
        bench.agent.stop(grace=10.0)  # fail-static: the rules stay in the kernel
        rules_left, sets_left = bench.kernel_counts()
        after = bench.watch.reports[-1].revision if bench.watch.reports else 0
        proc, t_mono, t_wall = bench.start_agent()
        report = await bench.watch.wait(revision, after_revision=after)
        started = log_time(proc.log_path, "agent for node")
        synced = log_time(proc.log_path, "full sync:")
        out["restarts"].append({
            "total": report.seen - t_mono,
            "startup": None if started is None else started - t_wall,
            "started_to_sync_log": None if started is None or synced is None else synced - started,
            "kernel_before": (rules_left, sets_left),
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
        bench.start_agent()

        print("\nRules and sets on the node as policies grow (report / kernel; 'apply' = commit -> report):")
        for line in await growth(bench):
            print(line)
        print("  (pod sets hold 30 members each; endpoints of other nodes and policies not applied here add"
              " nothing)")

        lat = await latencies(bench, args.changes, args.gap)
        print(f"\nCommit -> rules in the kernel, 1,000 policies in etcd ({lat['rules']} rules, {lat['sets']} sets on"
              f" the node), x{args.changes} each, gap {args.gap * 1000:.0f} ms:")
        for label, name, goal in (("set-membership change", "membership", GOAL_MEMBERSHIP_P99),
                                  ("one-policy change", "policy_change", GOAL_POLICY_P99)):
            samples, writes, verified = lat[name]
            print(f"  {label:<22} {ms_summary(samples)}   [goal p99 < {goal * 1000:.0f} ms: "
                  f"{verdict(pct(samples, 0.99) < goal)}]")
            print(f"  {'':<22} (of which the etcd write: {ms_summary(writes)}; kernel verified after the report "
                  f"{verified}/{len(samples)})")
        if args.poll:
            member, policy = await kernel_polled(bench, args.poll)
            print("  cross-check by polling the kernel only (ipset test / iptables -S, ~5-10 ms per poll):")
            print(f"  {'set-membership change':<22} {ms_summary(member)}")
            print(f"  {'one-policy change':<22} {ms_summary(policy)}")

        rs = await resyncs(bench, args.restarts)
        print(f"\nFull resync: {rs['policies']} policies -> {rs['rules']} rules, {rs['sets']} sets on the node "
              f"(first apply by the running agent: {rs['first_apply']:.2f} s)")
        for i, r in enumerate(rs["restarts"], 1):
            startup = "?" if r["startup"] is None else f"{r['startup']:.2f} s"
            sync = "?" if r["started_to_sync_log"] is None else f"{r['started_to_sync_log']:.2f} s"
            print(f"  restart {i}: agent spawn -> first report {r['total']:.2f} s   [goal < {GOAL_RESYNC:.0f} s: "
                  f"{verdict(r['total'] < GOAL_RESYNC)}]  (process start-up until 'agent started' {startup}, "
                  f"then -> 'full sync' logged {sync}; kernel held {r['kernel_before'][0]} rules /"
                  f" {r['kernel_before'][1]} sets meanwhile)")
        print(f"\nmachine at the end: {load_note()}")
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
    parser.add_argument("--changes", type=int, default=50, help="changes per latency series")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between changes")
    parser.add_argument("--restarts", type=int, default=2, help="agent restarts for the full-resync figure")
    parser.add_argument("--poll", type=int, default=10, help="changes measured by kernel polling (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (agent logs)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
