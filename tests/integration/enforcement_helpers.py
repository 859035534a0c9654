"""Shared pieces of the agent and status integration tests: a small enforced world, probes, readers.

The world (namespace ``ns``, two nodes):

* ``web`` (app=web, TCP 80) on node 0; ``good`` (role=good) and ``bad`` (role=bad) on node 1;
* policy ``web-from-good``: web accepts TCP 80 from role=good only (enforced by node 0);
* policy ``good-from-ns``: good accepts anything from pods of ``ns`` (enforced by node 1).

So good -> web is the allowed pair and bad -> web the denied pair, both across nodes.
That is the default :class:`Layout`; tests that need another world (the upgrade tests)
pass their own layout to :func:`build_world`, and :class:`ProbeLoop` probes its pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.integration.helpers import eventually, open_store

from netfence.dataplane.names import endpoint_chain, policy_chain
from netfence.store.etcd import EtcdStore
from netfence.store.types import Reports
from netfence_lab.env import NetfenceEnv
from netfence_lab.kubelet import PodHandle
from netfence_lab.probe import Probe, Prober

PORT = 80


def manifest(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def allow_from_spec(target: dict[str, str], peer: dict[str, str], port: int = PORT) -> dict[str, Any]:
    """Pods labelled ``target`` accept TCP ``port`` from pods labelled ``peer`` (same namespace) only."""
    return {
        "podSelector": {"matchLabels": target},
        "ingress": [{"from": [{"podSelector": {"matchLabels": peer}}], "ports": [{"port": port, "protocol": "TCP"}]}],
    }


def allow_from(ns: str, name: str, target: dict[str, str], peer: dict[str, str], port: int = PORT) -> dict[str, Any]:
    return manifest(ns, name, allow_from_spec(target, peer, port))


@dataclass(frozen=True)
class Pair:
    """A probed pair of the world: ``src`` connects to ``dst`` on TCP ``PORT``; ``allowed`` is the policies' verdict."""

    name: str
    src: str  # pod names in the world's namespace
    dst: str
    allowed: bool


@dataclass(frozen=True)
class Layout:
    """What a world is made of: pods (name, labels, node index), policies (name, spec) and the probed pairs."""

    pods: tuple[tuple[str, dict[str, str], int], ...]
    policies: tuple[tuple[str, dict[str, Any]], ...]
    pairs: tuple[Pair, ...]


# The world of the module docstring: good -> web allowed, bad -> web denied, across nodes.
TWO_NODES = Layout(
    pods=(("web", {"app": "web"}, 0), ("good", {"role": "good"}, 1), ("bad", {"role": "bad"}, 1)),
    policies=(
        ("web-from-good", allow_from_spec({"app": "web"}, {"role": "good"})),
        ("good-from-ns", {"podSelector": {"matchLabels": {"role": "good"}},
                          "ingress": [{"from": [{"podSelector": {}}]}]}),
    ),
    pairs=(Pair("good->web", "good", "web", True), Pair("bad->web", "bad", "web", False)),
)


@dataclass
class World:
    """A built :class:`Layout`: its pods by name, the resource versions written (``marks``), a prober.

    ``web``, ``good``, ``bad`` and the helpers that name them are for the default layout (:data:`TWO_NODES`).
    """

    env: NetfenceEnv
    ns: str
    pods: dict[str, PodHandle]
    layout: Layout = TWO_NODES
    marks: dict[str, int] = field(default_factory=dict)
    prober: Prober = field(default_factory=Prober)

    def mark(self, result: tuple[str, int]) -> None:
        """Remember a write's (kind, resourceVersion) so ``env.wait_enforced(world.marks)`` covers it."""
        self.marks[result[0]] = max(self.marks.get(result[0], 0), result[1])

    def behaves(self, pair: Pair, allowed_timeout: float = 3.0, denied_timeout: float = 0.5) -> bool:
        """Whether ``pair`` does what the policies say: an allowed pair completes a full exchange
        (connect, request, the server's reply), a denied pair never completes a TCP handshake."""
        src, dst = self.pods[pair.src], self.pods[pair.dst]
        if pair.allowed:
            return self.prober.exchange(Probe(src.netns, dst.ip, PORT), allowed_timeout) is not None
        return not connects(self.prober, src.netns, dst.ip, PORT, denied_timeout)

    @property
    def web(self) -> PodHandle:
        return self.pods["web"]

    @property
    def good(self) -> PodHandle:
        return self.pods["good"]

    @property
    def bad(self) -> PodHandle:
        return self.pods["bad"]

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


async def build_world(env: NetfenceEnv, ns: str, layout: Layout = TWO_NODES, *, enforced: bool = True) -> World:
    """Create the namespace ``ns``, the layout's pods and policies; with ``enforced``, wait until
    every node enforces them (that needs a controller and agents running)."""
    assert env.kubelet is not None
    world = World(env, ns, {}, layout)
    world.mark(await env.ensure_namespace(ns, {"name": ns}))
    for name, labels, node in layout.pods:
        world.mark(await env.create_pod(ns, name, labels, [(PORT, "TCP")], node))
        world.pods[name] = env.kubelet.pod(ns, name)
    for name, spec in layout.policies:
        world.mark(await env.apply_manifest(manifest(ns, name, spec)))
    if enforced:
        await env.wait_enforced(world.marks, timeout=60)
    return world


@contextlib.asynccontextmanager
async def running_world(env: NetfenceEnv, ns: str, layout: Layout = TWO_NODES) -> AsyncIterator[World]:
    """Start ``env`` (a controller, the agents), build an enforced world in ``ns``; afterwards delete
    what the test created and stop everything (for a test's ``world`` fixture)."""
    await env.start()
    try:
        yield await build_world(env, ns, layout)
    finally:
        try:
            await env.delete_user_state()
        finally:
            await env.close()


def namespace_of_test(prefix: str, request: pytest.FixtureRequest) -> str:
    """A namespace name of the test alone: ``<prefix>-`` and a hash of the test's name."""
    return f"{prefix}-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:8]


async def probes_hold(world: World) -> None:
    """A one-shot check of every pair of the world."""
    for pair in world.layout.pairs:
        ok = await asyncio.to_thread(world.behaves, pair)
        assert ok, f"{pair.name} must {'connect' if pair.allowed else 'not connect'}"


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
    """Probes every pair of the world continuously, one thread per pair, until stopped.

    An allowed pair must complete a full exchange within ``allowed_timeout``; a denied pair must
    not complete a TCP handshake within ``denied_timeout`` (see :meth:`World.behaves`). Reports the
    tallies over all pairs (:meth:`snapshot`, :meth:`probed`), each pair's progress (``counts``,
    :meth:`rounds`) and every violation with its time since the start (``violations``, :meth:`check`).
    """

    def __init__(self, world: World, period: float = 0.12, *, allowed_timeout: float = 3.0,
                 denied_timeout: float = 0.2) -> None:
        self.world = world
        self.period = period
        self.allowed_timeout = allowed_timeout
        self.denied_timeout = denied_timeout
        self.tally = ProbeTally()
        self.counts: dict[str, int] = {}  # pair name -> probes made
        self.violations: list[str] = []
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(pair,), name=f"probe-{pair.name}", daemon=True)
                         for pair in world.layout.pairs]

    def _probe(self, pair: Pair) -> None:
        began = time.monotonic()
        ok = self.world.behaves(pair, self.allowed_timeout, self.denied_timeout)
        now = time.monotonic()
        with self._lock:
            self.counts[pair.name] = self.counts.get(pair.name, 0) + 1
            if pair.allowed:
                if ok:
                    self.tally.allowed_ok += 1
                else:
                    self.tally.allowed_failed.append(now)
            elif ok:
                self.tally.denied_blocked += 1
            else:
                self.tally.denied_connected.append(now)
            if not ok:
                what = "allowed connection failed" if pair.allowed else "denied connection succeeded"
                self.violations.append(f"{pair.name}: {what} at +{began - self._started:.2f}s")

    def _run(self, pair: Pair) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._probe(pair)
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def __enter__(self) -> ProbeLoop:
        self._started = time.monotonic()
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

    async def probed(self, n: int, since: ProbeTally | None = None) -> bool:
        """Whether allowed pairs passed and denied pairs were blocked ``n`` more times since ``since``
        (for :func:`eventually`)."""
        now, base = self.snapshot(), since or ProbeTally()
        return now.allowed_ok >= base.allowed_ok + n and now.denied_blocked >= base.denied_blocked + n

    async def rounds(self, n: int, timeout: float = 60.0) -> None:
        """Until every pair has been probed ``n`` more times (the probes' own progress, not a sleep)."""
        with self._lock:
            start = dict(self.counts)

        async def done() -> bool:
            with self._lock:
                return all(self.counts.get(p.name, 0) >= start.get(p.name, 0) + n for p in self.world.layout.pairs)

        await eventually(done, timeout=timeout, interval=0.05, what=f"{n} more probe rounds")

    def check(self, minimum: int = 3) -> str:
        """Assert no violation and at least ``minimum`` probes of every pair; the counts, for a report."""
        with self._lock:
            assert not self.violations, self.violations
            assert all(self.counts.get(p.name, 0) >= minimum for p in self.world.layout.pairs), self.counts
            return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


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


async def node_reports(env: NetfenceEnv) -> Reports:
    """Every node report as stored now."""
    store = await store_of(env)
    try:
        return await store.read_reports()
    finally:
        await store.close()


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
