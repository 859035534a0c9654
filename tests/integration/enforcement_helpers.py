"""Shared pieces of the agent and status integration tests: a small enforced world, probes, readers.

The world (namespace ``ns``, two nodes):

* ``web`` (app=web, TCP 80) on node 0; ``good`` (role=good) and ``bad`` (role=bad) on node 1;
* policy ``web-from-good``: web accepts TCP 80 from role=good only (enforced by node 0);
* policy ``good-from-ns``: good accepts anything from pods of ``ns`` (enforced by node 1).

So good -> web is the allowed pair and bad -> web the denied pair, both across nodes.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.integration.helpers import eventually, open_store

from netfence.dataplane.names import endpoint_chain, policy_chain
from netfence.store.etcd import EtcdStore
from netfence.testbed.env import NetfenceEnv
from netfence.testbed.kubelet import PodHandle
from netfence.testbed.probe import Probe, Prober

PORT = 80


def manifest(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def allow_from(ns: str, name: str, target: dict[str, str], peer: dict[str, str], port: int = PORT) -> dict[str, Any]:
    return manifest(ns, name, {
        "podSelector": {"matchLabels": target},
        "ingress": [{"from": [{"podSelector": {"matchLabels": peer}}], "ports": [{"port": port, "protocol": "TCP"}]}],
    })


@dataclass
class World:
    env: NetfenceEnv
    ns: str
    web: PodHandle
    good: PodHandle
    bad: PodHandle
    prober: Prober = field(default_factory=Prober)

    @property
    def node0(self) -> str:
        return self.env.agents[0].netns

    @property
    def web_chain(self) -> str:
        return endpoint_chain("ingress", f"{self.ns}/web")

    @property
    def web_policy_chain(self) -> str:
        return policy_chain("ingress", f"{self.ns}/web-from-good")

    def allowed(self, timeout: float = 2.0) -> bool:
        """good -> web: a full exchange (connect, request, the server's reply)."""
        return self.prober.exchange(Probe(self.good.netns, self.web.ip, PORT), timeout) is not None

    def denied_connects(self, timeout: float = 0.3) -> bool:
        """bad -> web: True if the TCP handshake completed (it must not)."""
        return connects(self.prober, self.bad.netns, self.web.ip, PORT, timeout)

    def bad_exchange(self, timeout: float = 2.0) -> bool:
        return self.prober.exchange(Probe(self.bad.netns, self.web.ip, PORT), timeout) is not None


async def build_world(env: NetfenceEnv, ns: str) -> World:
    assert env.kubelet is not None
    marks: dict[str, int] = {}

    def mark(result: tuple[str, int]) -> None:
        marks[result[0]] = max(marks.get(result[0], 0), result[1])

    mark(await env.ensure_namespace(ns, {"name": ns}))
    mark(await env.create_pod(ns, "web", {"app": "web"}, [(PORT, "TCP")], 0))
    mark(await env.create_pod(ns, "good", {"role": "good"}, [(PORT, "TCP")], 1))
    mark(await env.create_pod(ns, "bad", {"role": "bad"}, [(PORT, "TCP")], 1))
    mark(await env.apply_manifest(allow_from(ns, "web-from-good", {"app": "web"}, {"role": "good"})))
    mark(await env.apply_manifest(manifest(ns, "good-from-ns", {
        "podSelector": {"matchLabels": {"role": "good"}}, "ingress": [{"from": [{"podSelector": {}}]}]})))
    await env.wait_enforced(marks, timeout=60)
    kubelet = env.kubelet
    return World(env, ns, kubelet.pod(ns, "web"), kubelet.pod(ns, "good"), kubelet.pod(ns, "bad"))


def connects(prober: Prober, netns: str, ip: str, port: int, timeout: float) -> bool:
    """Whether a TCP handshake from ``netns`` to ip:port completes within ``timeout``."""
    sock = prober.open_socket(netns, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
        except OSError:
            return False
        return True


# --- continuous probing ---------------------------------------------------------


@dataclass
class ProbeTally:
    allowed_ok: int = 0
    allowed_failed: list[float] = field(default_factory=list)  # monotonic times
    denied_blocked: int = 0
    denied_connected: list[float] = field(default_factory=list)


class ProbeLoop:
    """Probes the allowed and the denied pair continuously in two threads until stopped."""

    def __init__(self, world: World, period: float = 0.12) -> None:
        self.world = world
        self.period = period
        self.tally = ProbeTally()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(self._allowed,), name="probe-allowed", daemon=True),
            threading.Thread(target=self._run, args=(self._denied,), name="probe-denied", daemon=True),
        ]

    def _allowed(self) -> None:
        ok = self.world.allowed(timeout=3.0)
        with self._lock:
            if ok:
                self.tally.allowed_ok += 1
            else:
                self.tally.allowed_failed.append(time.monotonic())

    def _denied(self) -> None:
        connected = self.world.denied_connects(timeout=0.2)
        with self._lock:
            if connected:
                self.tally.denied_connected.append(time.monotonic())
            else:
                self.tally.denied_blocked += 1

    def _run(self, probe: Any) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            probe()
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def __enter__(self) -> ProbeLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def snapshot(self) -> ProbeTally:
        with self._lock:
            return ProbeTally(self.tally.allowed_ok, list(self.tally.allowed_failed), self.tally.denied_blocked,
                              list(self.tally.denied_connected))


# --- reading a node's netfilter ----------------------------------------------------


def in_netns(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30,
                          check=check)


def iptables_save(netns: str, table: str = "filter", counters: bool = False) -> str:
    argv = ["iptables-save", "-t", table] + (["-c"] if counters else [])
    return in_netns(netns, *argv).stdout


def chain_rules(netns: str, chain: str) -> list[str]:
    return [ln for ln in iptables_save(netns).splitlines() if ln.startswith(f"-A {chain} ")]


_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")


def drop_packets(netns: str, chain: str) -> int:
    """Packets counted by the final "... denied" DROP rule of an endpoint chain."""
    for line in iptables_save(netns, counters=True).splitlines():
        match = _COUNTED.match(line)
        if match and match.group(3) == chain and "denied" in match.group(4) and match.group(4).endswith("-j DROP"):
            return int(match.group(1))
    raise AssertionError(f"no denied DROP rule in {chain} of {netns}:\n{iptables_save(netns)}")


# --- the agent's own signals ------------------------------------------------------


def health(port: int, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


async def agent_health(env: NetfenceEnv, index: int, path: str = "/healthz") -> dict[str, Any] | None:
    try:
        _, body = await asyncio.to_thread(health, env.agents[index].health_port, path)
    except OSError:
        return None  # not listening yet
    return body


async def store_of(env: NetfenceEnv) -> EtcdStore:
    return await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)


async def report_revision(env: NetfenceEnv, node: str) -> int:
    """The mod revision of the node's report key (0 if absent)."""
    store = await store_of(env)
    try:
        return (await store.read_reports()).mod_revisions.get(node, 0)
    finally:
        await store.close()


async def wait_agent_serving(env: NetfenceEnv, index: int, after_report: int, timeout: float = 30.0) -> None:
    """Until the (re)started agent ``index`` is ready (applied, no error) and has rewritten its report."""
    node = env.agents[index].node

    async def ready() -> bool:
        if not env.agents[index].process.alive():
            raise RuntimeError(f"agent {node} exited:\n{env.agents[index].process.tail()}")
        body = await agent_health(env, index, "/readyz")
        if body is None or body["appliedRevision"] <= 0 or body["lastError"]:
            return False
        return await report_revision(env, node) > after_report

    await eventually(ready, timeout=timeout, interval=0.05, what=f"agent {node} applied and reported")


async def cps(env: NetfenceEnv, name: str) -> dict[str, Any]:
    from kubernetes_asyncio import client

    assert env.api is not None
    result: dict[str, Any] = await client.CustomObjectsApi(env.api).get_cluster_custom_object(
        "netfence.dev", "v1alpha1", "clusterpolicystatuses", name)
    return result
