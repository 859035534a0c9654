"""``netfence explain`` against the real test bed.

1. Its verdict equals what real probes see, for every pair and port of 12 conformance
   scenarios, after every step (the conformance runner's own set-up; a hook runs explain
   right after the step's probes, while that state is still in force). At the last step of
   each scenario the real command is also run for one denied and one allowed cell, with
   the node counters: the denied direction's DROP counter has risen.
2. The command end to end on a small world: text and JSON, the rule and the nearest miss,
   counters read from the node namespace and from the agent's ``/counters``, the default
   port, the kubectl plugin, and bad input (unknown pod, pod without IP, unreachable API
   server, a port name) as one line and a non-zero exit, with nothing changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client
from tests.integration.enforcement_helpers import store_of

from netfence.explain.gather import (
    PartyResolver,
    Question,
    Target,
    explain_connection,
    read_model,
    resolve_connection,
)
from netfence.store.settings import EtcdSettings
from netfence_lab.cluster import LocalCluster
from netfence_lab.conformance.runner import ScenarioRun, StepResult, run_scenarios
from netfence_lab.conformance.scenario import load_scenario
from netfence_lab.env import NetfenceEnv
from netfence_lab.probe import Probe, Prober

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = [
    "pod-selector", "namespace-selector", "pod-and-namespace-selector", "ipblock-except", "end-port-range",
    "named-port-ingress", "named-port-egress", "default-deny-egress", "multiple-policies-union", "policy-types",
    "udp", "ingress-and-egress-both-ends", "cnp-tiers-integration", "cnp-egress-networks",
]


def etcd_of(env: NetfenceEnv) -> EtcdSettings:
    return EtcdSettings(endpoints=[env.cluster.netfence_etcd.endpoint], prefix=env.prefix)


def explain_cli(env: NetfenceEnv, *args: str, counters: str = "netns", kubeconfig: Path | str | None = "env",
                extra_env: dict[str, str] | None = None, command: list[str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """The real command, pointed at ``env`` with the same etcd flags as `netfence status`
    (``kubeconfig`` None: none given, the command falls back to $KUBECONFIG)."""
    where = [f"--etcd-endpoints={env.cluster.netfence_etcd.endpoint}", f"--etcd-prefix={env.prefix}"]
    if kubeconfig is not None:
        where.append(f"--kubeconfig={env.cluster.kubeconfig if kubeconfig == 'env' else kubeconfig}")
    if counters == "netns":
        where += [f"--node-netns={a.node}={a.netns}" for a in env.agents.values()]
    elif counters == "agent":
        where += [f"--agent-url={a.node}=http://127.0.0.1:{a.health_port}" for a in env.agents.values()]
    else:
        where.append("--no-counters")
    argv = command or [sys.executable, "-m", "netfence.cli"]
    return subprocess.run([*argv, "explain", *args, *where], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, **(extra_env or {})})


# --- 1. explain agrees with the probes over conformance scenarios ------------------------------------


@dataclass
class ExplainChecker:
    """The runner's after-step hook: explain every probed cell and compare with the probe."""

    compared: int = 0
    cli_runs: int = 0
    mismatches: list[str] = field(default_factory=list)

    async def __call__(self, run: ScenarioRun, step: StepResult) -> None:
        env = run.env
        assert env.api is not None
        view = await read_model(etcd_of(env))
        resolver = PartyResolver(env.api)
        target = Target(etcd=etcd_of(env), counters=False)
        samples: dict[bool, tuple[str, str, int, str]] = {}
        for expect in step.expects:
            for (src, dst), seen in sorted(expect.observed.items()):
                if seen is None or (expect.port, expect.protocol) not in run.pods[dst].ports:
                    continue  # no probe (no SCTP here), or nothing serves that port: nothing to compare
                conn = await resolve_connection(resolver, Question(src, dst, expect.port, expect.protocol))  # type: ignore[arg-type]
                data = await explain_connection(view, conn, target, resolver)
                self.compared += 1
                if (data["verdict"] == "allowed") != seen:
                    self.mismatches.append(
                        f"{run.scenario.name} step {step.index}: {src} -> {dst} {expect.port}/{expect.protocol}: "
                        f"probe {'connected' if seen else 'failed'}, explain says {data['verdict']}: "
                        + json.dumps(data["directions"])[:1500])
                samples.setdefault(seen, (src, dst, expect.port, expect.protocol))
        if step.index == len(run.scenario.steps) - 1:
            await asyncio.to_thread(self._cli_samples, env, samples)

    def _cli_samples(self, env: NetfenceEnv, samples: dict[bool, tuple[str, str, int, str]]) -> None:
        for seen, (src, dst, port, protocol) in samples.items():
            result = explain_cli(env, src, dst, f"--port={port}", f"--protocol={protocol}", "-o", "json")
            self.cli_runs += 1
            if result.returncode != 0:
                self.mismatches.append(f"CLI {src} -> {dst}: exit {result.returncode}: {result.stderr}")
                continue
            data = json.loads(result.stdout)
            if (data["verdict"] == "allowed") != seen:
                self.mismatches.append(f"CLI {src} -> {dst} {port}/{protocol}: explain says {data['verdict']}")
            if not seen:  # the probe of this very pair was dropped: the denying chain's DROP counter shows it
                denied = [d for d in data["directions"] if d["verdict"] == "denied"]
                dropped = [c.get("dropped", 0) for d in denied for c in d["enforcement"]["chains"]
                           if c["role"] in ("endpoint", "cluster policy")]
                if not dropped or max(dropped) < 1:
                    self.mismatches.append(f"CLI {src} -> {dst}: no DROP counted: {json.dumps(denied)[:1500]}")


@pytest.mark.parametrize("name", SCENARIOS)
async def test_explain_agrees_with_real_probes(name: str, cluster: LocalCluster, tmp_path: Path) -> None:
    scenario = load_scenario(REPO / "tests" / "conformance" / f"{name}.yaml")
    checker = ExplainChecker()
    lines: list[str] = []
    [result] = await run_scenarios([scenario], cluster, tmp_path, out=lines.append, after_step=checker)
    output = "\n".join(lines)
    assert result.status in ("passed", "skipped"), f"{result.status} ({result.error})\n{output}"
    assert checker.mismatches == [], "\n".join(checker.mismatches)
    probed = sum(1 for s in result.steps for e in s.expects for v in e.observed.values() if v is not None)
    assert checker.compared >= probed // 2 > 0, (checker.compared, probed)  # the cells whose server serves the port
    assert checker.cli_runs >= 1


# --- 2. the command end to end -------------------------------------------------------------------------

NS = "exp"


@pytest.fixture(scope="module")
async def env(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NetfenceEnv]:
    """web (app=web, 80/TCP, node 0) accepts TCP 80 from role=good only; good and bad on node 1."""
    environment = NetfenceEnv(cluster, tmp_path_factory.mktemp("explain-env"), nodes=2)
    await environment.start()
    try:
        marks: dict[str, int] = {}

        def mark(result: tuple[str, int]) -> None:
            marks[result[0]] = max(marks.get(result[0], 0), result[1])

        mark(await environment.ensure_namespace(NS, {"team": "blue"}))
        mark(await environment.create_pod(NS, "web", {"app": "web"}, [(80, "TCP")], 0))
        mark(await environment.create_pod(NS, "good", {"role": "good"}, [(80, "TCP")], 1))
        mark(await environment.create_pod(NS, "bad", {"role": "bad"}, [(80, "TCP")], 1))
        mark(await environment.apply_manifest({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": NS, "name": "web-from-good"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "good"}}}],
                                  "ports": [{"protocol": "TCP", "port": 80}]}]}}))
        await environment.wait_enforced(marks, timeout=90)
        yield environment
    finally:
        try:
            await environment.delete_user_state()
        finally:
            await environment.close()


def probe(env: NetfenceEnv, src: str, dst: str, port: int = 80) -> bool:
    assert env.kubelet is not None
    pods = env.kubelet.pods
    return bool(Prober().probe(Probe(pods[f"{NS}/{src}"].netns, pods[f"{NS}/{dst}"].ip, port, "TCP")))


async def test_denied_pair_names_the_nearest_miss_and_the_drop_counter(env: NetfenceEnv) -> None:
    assert not await asyncio.to_thread(probe, env, "bad", "web")  # counted by web's DROP rule on node-0
    result = await asyncio.to_thread(explain_cli, env, f"{NS}/bad", f"{NS}/web", "--port", "80")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[-1] == "verdict: denied"
    text = result.stdout
    assert f"ingress of {NS}/web on node-0: isolated by {NS}/web-from-good" in text
    assert (f"nearest miss: policy {NS}/web-from-good ingress rule 0: pod {NS}/bad labels role=bad do not match "
            "podSelector role=good") in text
    assert "enforced on node-0: applied revision" in text and ": in force" in text
    dropped = next(line for line in lines if "endpoint chain:" in line)
    assert dropped.split()[0].startswith("nf-tw-")
    assert int(dropped.split("endpoint chain: ")[1].split()[0]) >= 1, dropped
    assert "set nf4-p" in text and f"podSelector role=good in namespace {NS} (1 member)" in text
    assert "(counters read from network namespace" in text


async def test_allowed_pair_names_the_rule_with_counters_from_the_agent(env: NetfenceEnv) -> None:
    assert await asyncio.to_thread(probe, env, "good", "web")
    result = await asyncio.to_thread(explain_cli, env, f"{NS}/good", f"{NS}/web", "-o", "json", counters="agent")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # no --port: web declares one port, 80/TCP
    assert (data["port"], data["protocol"], data["verdict"]) == (80, "TCP", "allowed")
    egress, ingress = data["directions"]
    assert (egress["direction"], egress["isolated"], egress["node"]) == ("egress", False, "node-1")
    assert ingress["allowedBy"] == {"policy": f"{NS}/web-from-good", "rule": 0,
                                    "peer": f"podSelector role=good in namespace {NS}", "port": "TCP 80"}
    enforcement = ingress["enforcement"]
    store = await store_of(env)
    try:
        reports = await store.read_reports()
        commit = await store.commit_revision()
    finally:
        await store.close()
    assert enforcement["appliedRevision"] == reports["node-0"]["appliedRevision"]
    assert enforcement["commitRevision"] <= commit and enforcement["inForce"] is True
    assert enforcement["counters"]["source"].startswith("http://127.0.0.1:")
    assert enforcement["counters"]["error"] is None
    chains = {c["role"]: c for c in enforcement["chains"]}
    assert chains["policy"]["present"] is True and chains["policy"]["marked"] >= 1
    assert chains["policy"]["viaSets"] >= 1
    assert chains["endpoint"]["present"] is True


async def test_kubectl_plugin(env: NetfenceEnv) -> None:
    venv_bin = str(Path(sys.executable).parent)
    kubectl = str(env.cluster.tools.kubectl)
    result = await asyncio.to_thread(
        explain_cli, env, f"{NS}/bad", f"{NS}/web", "--port=80", counters="none", command=[kubectl, "netfence"],
        kubeconfig=None,
        extra_env={"PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "KUBECONFIG": str(env.cluster.kubeconfig)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "verdict: denied"


async def test_bad_input_is_one_line_and_changes_nothing(env: NetfenceEnv, tmp_path: Path) -> None:
    assert env.api is not None
    core = client.CoreV1Api(env.api)
    # A pod the scheduler placed but that has no address yet (no kubelet runs it).
    created = await core.create_namespaced_pod(NS, {"metadata": {"name": "starting"}, "spec": {
        "nodeName": "node-0", "containers": [{"name": "app", "image": "netfence/pause"}]}})
    await env.wait_enforced({"pods": int(created.metadata.resource_version)})  # the controller has seen it
    # A kubeconfig whose API server does not answer.
    config = yaml.safe_load(env.cluster.kubeconfig.read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{closed}"
    unreachable = tmp_path / "unreachable.kubeconfig"
    unreachable.write_text(yaml.safe_dump(config))

    store = await store_of(env)
    try:
        before = await store.read_all()
        cases: list[tuple[list[str], Path | str, int, list[str]]] = [
            ([f"{NS}/nope", f"{NS}/web", "--port=80"], "env", 1,
             [f"pod {NS}/nope not found", f"kubectl get pods -n {NS}"]),
            ([f"{NS}/starting", f"{NS}/web", "--port=80"], "env", 1,
             [f"pod {NS}/starting (SRC) has no IP address yet", "wait until it runs"]),
            ([f"{NS}/bad", f"{NS}/web", "--port=http"], "env", 2, ["--port 'http' is not a port number"]),
            ([f"{NS}/bad", f"{NS}/starting"], "env", 1, ["has no IP address yet"]),
            ([f"{NS}/bad", f"{NS}/web", "--port=80"], unreachable, 1,
             [f"cannot reach the API server at https://127.0.0.1:{closed}", "check that it runs"]),
        ]
        for args, kubeconfig, code, fragments in cases:
            result = await asyncio.to_thread(explain_cli, env, *args, counters="none", kubeconfig=kubeconfig)
            assert result.returncode == code, (args, result.stdout, result.stderr)
            assert result.stdout == "", args
            [line] = result.stderr.splitlines()
            assert line.startswith("netfence: ") and "; " in line, line
            for fragment in fragments:
                assert fragment in line, (fragment, line)
        after = await store.read_all()
    finally:
        await store.close()
        await core.delete_namespaced_pod("starting", NS)
    committed = {k: v for k, v in before.values.items() if not k.startswith("status/")}
    assert {k: v for k, v in after.values.items() if not k.startswith("status/")} == committed
    assert after.commit_revision == before.commit_revision
