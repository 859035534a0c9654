"""Liveness depends on the process only; etcd reachability is readiness only (issue 14, point 1).

A controller and an agent run against the session's etcd; the probes the
chart configures (paths, ports, periods, timeouts, failure thresholds, read
from `helm template`) are run here exactly as the kubelet runs them. etcd is
stopped for 90 s: the controller turns unready, and neither liveness probe
ever fails, so the kubelet would restart nothing; when etcd returns the
controller and the agent are ready again, the same processes as before.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv
from netfence_lab.process import free_port
from netfence_lab.tools import Tools

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "netfence"
OUTAGE_SECONDS = 90.0


@dataclass(frozen=True)
class ProbeSpec:
    path: str
    period: float
    timeout: float
    failure_threshold: int


def chart_probes(tools: Tools, home: Path) -> dict[str, dict[str, ProbeSpec]]:
    """The chart's liveness and readiness probes of the controller and the agent containers."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    out = subprocess.run([str(tools.helm), "template", "t", str(CHART)], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout
    probes: dict[str, dict[str, ProbeSpec]] = {}
    for doc in yaml.safe_load_all(out):
        if not doc or doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        [ctr] = doc["spec"]["template"]["spec"]["containers"]
        probes[ctr["name"]] = {
            kind: ProbeSpec(ctr[kind]["httpGet"]["path"], ctr[kind].get("periodSeconds", 10),
                            ctr[kind].get("timeoutSeconds", 1), ctr[kind].get("failureThreshold", 3))
            for kind in ("livenessProbe", "readinessProbe")
        }
    return probes


def http_ok(url: str, timeout: float) -> bool:
    """The kubelet's HTTP probe: success is a status in [200, 400) within the timeout."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 400
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Prober:
    """One probe run as the kubelet runs it: every period, one GET; state flips after the thresholds."""

    name: str
    url: str
    spec: ProbeSpec
    results: list[tuple[float, bool]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            ok = await asyncio.to_thread(http_ok, self.url, self.spec.timeout)
            self.results.append((started, ok))
            self._changed.set()
            await asyncio.sleep(max(0.0, self.spec.period - (time.monotonic() - started)))

    def failing(self) -> bool:
        """The kubelet's verdict now: failureThreshold consecutive failures (restart / not ready)."""
        tail = [ok for _, ok in self.results[-self.spec.failure_threshold:]]
        return len(tail) == self.spec.failure_threshold and not any(tail)

    def succeeding(self) -> bool:
        return bool(self.results) and self.results[-1][1]  # successThreshold 1

    def max_consecutive_failures(self, since: int = 0) -> int:
        """The longest run of failures from result ``since`` on."""
        longest = run = 0
        for _, ok in self.results[since:]:
            run = 0 if ok else run + 1
            longest = max(longest, run)
        return longest

    def probed(self, count: int) -> bool:
        return len(self.results) >= count

    async def wait(self, predicate: str, timeout: float, *args: int) -> float:
        """Wait until ``failing()``, ``succeeding()`` or ``probed(n)`` holds; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        while not getattr(self, predicate)(*args):
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: not {predicate} within {timeout}s: {self.results[-8:]}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        return time.monotonic()


@pytest.fixture
async def outage_env(cluster: LocalCluster, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[NetfenceEnv, int]]:
    liveness = free_port()
    # What the chart sets on the controller container (an agent ignores it).
    monkeypatch.setenv("NETFENCE_LIVENESS_PORT", str(liveness))
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=1, lease_ttl=3)
    await env.start(controllers=1)
    try:
        yield env, liveness
    finally:
        await env.delete_user_state()
        await env.close()


def controller_health_port(env: NetfenceEnv) -> int:
    argv: list[str] = env.controllers["controller-0"].argv
    return int(next(a for a in argv if a.startswith("--health-port=")).split("=", 1)[1])


@pytest.mark.timeout(420)
async def test_etcd_outage_never_fails_liveness_and_only_readiness(
    outage_env: tuple[NetfenceEnv, int], tools: Tools, tmp_path: Path
) -> None:
    env, liveness_port = outage_env
    probes = chart_probes(tools, tmp_path / "helm-home")
    # The chart: the controller's liveness is /livez (process), readiness /healthz (Kopf's etcd probe);
    # the agent's liveness /healthz (process), readiness /readyz (etcd, in sync).
    assert probes["controller"]["livenessProbe"].path == "/livez"
    assert probes["controller"]["readinessProbe"].path == "/healthz"
    assert (probes["agent"]["livenessProbe"].path, probes["agent"]["readinessProbe"].path) == ("/healthz", "/readyz")
    agent = env.agents[0]
    urls = {
        "controller": {"livenessProbe": f"http://127.0.0.1:{liveness_port}/livez",
                       "readinessProbe": f"http://127.0.0.1:{controller_health_port(env)}/healthz"},
        "agent": {"livenessProbe": f"http://127.0.0.1:{agent.health_port}/healthz",
                  "readinessProbe": f"http://127.0.0.1:{agent.health_port}/readyz"},
    }
    probers = {(c, k): Prober(f"{c} {k}", urls[c][k], probes[c][k]) for c in urls for k in urls[c]}
    pids = {"controller": env.controllers["controller-0"].pid, "agent": agent.process.pid}
    tasks = [asyncio.create_task(p.run(), name=p.name) for p in probers.values()]
    etcd = env.cluster.netfence_etcd
    try:
        # Up (the kubelet would wait initialDelaySeconds too); what counts starts here.
        for component in ("controller", "agent"):
            await probers[(component, "readinessProbe")].wait("succeeding", 90)
            await probers[(component, "livenessProbe")].wait("succeeding", 30)
        before = {key: len(p.results) for key, p in probers.items()}

        etcd.kill()
        stopped = time.monotonic()
        try:
            # Readiness follows etcd: the controller is taken out of its Service.
            unready = await probers[("controller", "readinessProbe")].wait("failing", OUTAGE_SECONDS)
            assert unready - stopped < 60, unready - stopped
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))  # the outage itself
        finally:
            etcd.restart()
        for component in ("controller", "agent"):
            await probers[(component, "readinessProbe")].wait("succeeding", 90)
        for prober in probers.values():  # one more round of every probe after the recovery
            await prober.wait("probed", prober.spec.period * 3, len(prober.results) + 1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    for component in ("controller", "agent"):
        liveness = probers[(component, "livenessProbe")]
        during = liveness.results[before[(component, "livenessProbe")]:]
        # The kubelet would never have restarted it: not a single liveness failure, let alone a threshold's worth.
        assert len(during) >= OUTAGE_SECONDS / liveness.spec.period - 1, (component, during)
        assert liveness.max_consecutive_failures(before[(component, "livenessProbe")]) == 0, (component, during)
    readiness = probers[("controller", "readinessProbe")]
    since = before[("controller", "readinessProbe")]
    assert readiness.max_consecutive_failures(since) >= readiness.spec.failure_threshold
    assert probers[("controller", "readinessProbe")].succeeding()
    assert probers[("agent", "readinessProbe")].succeeding()
    # The same processes throughout.
    assert env.controllers["controller-0"].alive() and env.controllers["controller-0"].pid == pids["controller"]
    assert agent.process.alive() and agent.process.pid == pids["agent"]
