"""``netfence demo``: the whole system on one machine, with the classic policies.

Starts the local control plane, the controller, two namespace nodes with one
agent each, creates a small cluster (``web`` in ``default``; ``role=backend``
and ``role=frontend`` in ``myns``; client namespaces ``bob`` (user=bob) and
``alice`` (user=alice)), shows connectivity, applies three policies, waits for
the system to report them enforced, and shows ``kubectl get policystatus``,
the connectivity after and the DROP counters that rose. It ends with ``netfence
explain`` for a denied and an allowed pair: the rule (or the nearest miss), the
node's applied revision and the live counters of the chains involved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netfence.cli import Subcommands, add_command
from netfence_lab.cli_errors import LAB_ERRORS
from netfence_lab.tools import cache_dir

KNOWN_ERRORS = LAB_ERRORS  # netfence.cli.main reports these as one line

Out = Callable[[str], None]


@dataclass(frozen=True)
class DemoPod:
    namespace: str
    name: str
    labels: dict[str, str]
    port: int
    node: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


NAMESPACES: dict[str, dict[str, str]] = {"default": {}, "myns": {}, "bob": {"user": "bob"}, "alice": {"user": "alice"}}
PODS = (
    DemoPod("default", "web", {"app": "web"}, 80, 0),
    DemoPod("myns", "backend", {"role": "backend"}, 6379, 1),
    DemoPod("myns", "frontend", {"role": "frontend"}, 443, 0),
    DemoPod("bob", "client", {"app": "client"}, 8080, 1),
    DemoPod("alice", "client", {"app": "client"}, 8080, 0),
)


def _policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }


POLICIES = (
    _policy("default", "web-deny-all", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": []}),
    _policy(
        "myns",
        "backend-from-frontend",
        {
            "podSelector": {"matchLabels": {"role": "backend"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                    "ports": [{"protocol": "TCP", "port": 6379}],
                }
            ],
        },
    ),
    _policy(
        "myns",
        "frontend-from-bob",
        {
            "podSelector": {"matchLabels": {"role": "frontend"}},
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"user": "bob"}}}],
                    "ports": [{"protocol": "TCP", "port": 443}],
                }
            ],
        },
    ),
)


class Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def ok(self, text: str) -> str:
        return self._wrap("32", text)

    def bad(self, text: str) -> str:
        return self._wrap("31", text)


def connectivity_table(results: dict[tuple[str, str], bool], style: Style) -> str:
    """Rows: clients; columns: servers (with their port). ``ok``/``--`` per pair."""
    servers = [p for p in PODS]
    heads = [f"{p.key}:{p.port}" for p in servers]
    width = max(len(p.key) for p in PODS)
    cols = [max(len(h), 4) for h in heads]
    header = "  ".join(h.ljust(c) for h, c in zip(heads, cols, strict=True))
    lines = ["  " + "from \\ to".ljust(width) + "  " + header.rstrip()]
    for client in PODS:
        cells = []
        for server, col in zip(servers, cols, strict=True):
            if client.key == server.key:
                cells.append("·".ljust(col))
                continue
            ok = results[(client.key, server.key)]
            cells.append(style.ok("ok".ljust(col)) if ok else style.bad("--".ljust(col)))
        lines.append(("  " + client.key.ljust(width) + "  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def drop_counters(netns: str) -> list[tuple[str, int, str]]:
    """(chain, packets, comment) of Netfence DROP rules with a non-zero counter in a node namespace."""
    res = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-save", "-c", "-t", "filter"],
        capture_output=True, text=True, check=False,
    )
    found = []
    for line in res.stdout.splitlines():
        m = re.match(r"^\[(\d+):(\d+)\] -A (\S+) (.*)-j DROP", line)
        if not m or int(m.group(1)) == 0:
            continue
        comment = re.search(r'--comment (?:"([^"]*)"|(\S+))', line)
        found.append((m.group(3), int(m.group(1)), (comment.group(1) or comment.group(2)) if comment else ""))
    return found


async def run_demo(out: Out, keep: bool, workdir: Path, style: Style) -> int:
    from netfence_lab.cluster import LocalCluster
    from netfence_lab.env import NetfenceEnv
    from netfence_lab.probe import Probe, Prober
    from netfence_lab.tools import ensure_tools

    def step(text: str) -> None:
        out("")
        out(style.bold(f"==> {text}"))

    step("Building or reusing the control-plane tools (etcd, kube-apiserver, kubectl, helm)")
    tools = ensure_tools()
    out(f"  tools in {tools.etcd.parent}")
    step("Starting the local control plane: kube-apiserver, its etcd, and Netfence's etcd")
    cluster = LocalCluster(workdir / "cluster", tools)
    cluster.start()
    env = NetfenceEnv(cluster, workdir / "env", nodes=2, prefix="/netfence/v1/", resync_seconds=10, report_ttl=10)
    try:
        step("Starting netfence-controller and two nodes (network namespaces), each with a netfence-agent")
        await env.start()
        out(f"  API server {cluster.api_url}; nodes: {', '.join(env.kubelet.nodes.values()) if env.kubelet else ''}")
        step("Creating namespaces and pods")
        marks: dict[str, int] = {}
        for ns, labels in NAMESPACES.items():
            kind, rv = await env.ensure_namespace(ns, labels)
            marks[kind] = max(marks.get(kind, 0), rv)
        for pod in PODS:
            kind, rv = await env.create_pod(pod.namespace, pod.name, pod.labels, [(pod.port, "TCP")], pod.node)
            marks[kind] = max(marks.get(kind, 0), rv)
            assert env.kubelet is not None
            handle = env.kubelet.pod(pod.namespace, pod.name)
            out(f"  {pod.key:<16} {handle.ip:<13} on {handle.node}  labels {pod.labels}  serves {pod.port}/TCP")
        await env.wait_enforced(marks)
        prober = Prober()

        def probe_all() -> dict[tuple[str, str], bool]:
            assert env.kubelet is not None
            handles = env.kubelet.pods
            probes = {
                (c.key, s.key): Probe(handles[c.key].netns, handles[s.key].ip, s.port, "TCP")
                for c in PODS for s in PODS if c.key != s.key
            }
            results = prober.probe_many(probes.values(), timeout=1.0)
            return {pair: bool(results[p]) for pair, p in probes.items()}

        step("Connectivity before any NetworkPolicy (real TCP connections between pod namespaces)")
        out(connectivity_table(await asyncio.to_thread(probe_all), style))

        step("Applying the three classic NetworkPolicies")
        marks = {}
        for policy in POLICIES:
            kind, rv = await env.apply_manifest(policy)
            marks[kind] = max(marks.get(kind, 0), rv)
            out(f"  networkpolicy {policy['metadata']['namespace']}/{policy['metadata']['name']} applied")
        took = await env.wait_enforced(marks)
        out(f"  the system reports every policy enforced on every node after {took:.2f}s")

        step("kubectl get policystatus -o wide")
        out(_indent(cluster.kubectl("get", "policystatus", "-o", "wide").stdout.rstrip()))

        step("Connectivity with the policies in force")
        after = await asyncio.to_thread(probe_all)
        out(connectivity_table(after, style))

        step("DROP counters that rose on the nodes (iptables -L -v)")
        for agent in env.agents.values():
            for chain, packets, comment in drop_counters(agent.netns):
                out(f"  {agent.node}: {chain:<22} {packets:>4} packets dropped  ({comment})")

        expected_denied = {
            ("myns/backend", "default/web"), ("myns/frontend", "default/web"), ("bob/client", "default/web"),
            ("alice/client", "default/web"), ("default/web", "myns/backend"), ("bob/client", "myns/backend"),
            ("alice/client", "myns/backend"), ("default/web", "myns/frontend"), ("myns/backend", "myns/frontend"),
            ("alice/client", "myns/frontend"),
        }
        wrong = [pair for pair, ok in after.items() if ok == (pair in expected_denied)]
        if wrong:
            out(style.bad(f"  unexpected results for {wrong}"))
            return 1
        out("")
        out(style.ok("All connections behave as the policies say."))
        if not await explain_pairs(out, style, step, cluster, env):
            out(style.bad("  netfence explain gave an unexpected verdict"))
            return 1
        if keep:
            state = {"workdir": str(workdir), "fabric": env.fabric.prefix if env.fabric else None,
                     "nodes": {a.node: a.netns for a in env.agents.values()},  # for netfence explain
                     "pids": [p.pid for p in env.controllers.values()] + [a.process.pid for a in env.agents.values()]}
            (workdir / "demo.json").write_text(json.dumps(state))
            cluster.detach()
            if env.api is not None:
                await env.api.close()  # the processes stay; only this client goes
            env_kept = True
            out("")
            out(style.bold("The demo keeps running."))
            out(f"  export KUBECONFIG={cluster.kubeconfig}")
            out(f"  {tools.kubectl} get policystatus")
            where = "" if workdir == (cache_dir() / "demo").resolve() else f" --demo-dir {workdir}"
            out(f"  netfence explain alice/client myns/frontend --port 443{where}   (or: kubectl netfence explain ...)")
            out(f"  stop it with:  netfence demo --down --dir {workdir}")
            return 0
        env_kept = False
        return 0
    finally:
        if not locals().get("env_kept"):
            await env.close()
            cluster.stop()


#: The pairs ``netfence explain`` is shown for at the end: (source, destination, port, what to expect).
EXPLAINED = (
    ("alice/client", "myns/frontend", 443, "denied"),
    ("bob/client", "myns/frontend", 443, "allowed"),
)


async def explain_pairs(out: Out, style: Style, step: Out, cluster: Any, env: Any) -> bool:
    """Run ``netfence explain`` on the demo for the EXPLAINED pairs; False if a verdict is unexpected."""
    from netfence.explain.gather import Question, Target, explain
    from netfence.explain.report import format_text
    from netfence.store.settings import EtcdSettings

    target = Target(
        etcd=EtcdSettings(endpoints=[cluster.netfence_etcd.endpoint], prefix=env.prefix),
        kubeconfig=cluster.kubeconfig,
        node_netns={agent.node: agent.netns for agent in env.agents.values()},
    )
    ok = True
    for src, dst, port, expected in EXPLAINED:
        step(f"netfence explain {src} {dst} --port {port}    (a pair the policies leave {expected})")
        data = await explain(target, Question(src, dst, port, "TCP"))
        lines = format_text(data)
        for line in lines[:-1]:
            out("  " + line if line else "")
        verdict = lines[-1]
        out("  " + (style.ok(verdict) if data["verdict"] == expected else style.bad(verdict)))
        ok = ok and data["verdict"] == expected
    return ok


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def stop_kept(workdir: Path, out: Out) -> int:
    from netfence_lab.cluster import read_state, stop_recorded
    from netfence_lab.runs import remove_run

    state_path = workdir / "demo.json"
    if not state_path.exists():
        out(f"netfence: no kept demo in {workdir}")
        return 1
    state = json.loads(state_path.read_text())
    for pid in state.get("pids", []):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    time.sleep(0.5)
    if state.get("fabric"):
        remove_run(state["fabric"])
    cluster_state = read_state(workdir / "cluster")
    if cluster_state is not None:
        stop_recorded(cluster_state)
    state_path.unlink()
    out("demo stopped")
    return 0


def register(sub: Subcommands) -> None:
    demo = add_command(
        sub, "demo", demo_command, "run the local demo: control plane, controller, two nodes, policies",
        needs_root=True,
    )
    demo.add_argument("--keep", action="store_true", help="leave everything running when done")
    demo.add_argument("--down", action="store_true", help="stop a demo left running by --keep")
    demo.add_argument("--dir", type=Path, default=None, help="work folder (default ~/.cache/netfence/demo)")


def demo_command(args: argparse.Namespace) -> int:
    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    workdir = (args.dir or cache_dir() / "demo").resolve()
    if args.down:
        return stop_kept(workdir, out)
    if (workdir / "demo.json").exists():
        out(f"netfence: a kept demo is still running in {workdir}; stop it with: netfence demo --down --dir {workdir}")
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    style = Style(sys.stdout.isatty() and os.environ.get("NO_COLOR") is None)
    return asyncio.run(run_demo(out, args.keep, workdir, style))
