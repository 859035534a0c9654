"""Real multi-node end-to-end bench (issue 11 part 5): policy and pod changes as real probes see them.

A real kube-apiserver with its etcd, Netfence's own etcd, the REAL controller
and one REAL agent per node (``netfence.agent.main``) programming that node's
network namespace (the test bed of ``lab/netfence_lab``: ``NetfenceEnv``, its
fabric and "kubelet"). The world: ``--nodes`` namespace nodes (6), ``--pods``
pods (5,000) in ``--namespaces`` namespaces (100) under ``--policies``
NetworkPolicies (1,000) of synthetic.py's shapes. Most pods are API objects
only, bound to the nodes, with addresses on those nodes' pod CIDRs (one /21
per node, ``10.244.(8*i).0/21``); a server and a client per node are real
pods (a network namespace with servers), probed with real TCP connections.

It measures, with probes started every ``--probe-interval`` (10 ms; a probe
is a new TCP connection, through = it connected, denied = no answer within
``--probe-timeout``):

* policy create -> its ClusterPolicyStatus ``Enforced`` (seen by a watch),
  p50/p99 over ``--creates`` creates (>= 100 by default);
* policy create -> the first probe that shows the new verdict: a deny
  appearing (a policy isolating a server from everyone) and an allow appearing
  (a second policy allowing one client in), alternately, each pair deleted
  again before the next;
* a NEW pod that an existing deny policy selects: from its address being set
  in the API (``status.podIPs``) to the first denied probe, and how many probes
  got through before (after and before the address was published). As with a
  real kubelet and CNI the pod's network exists and its server answers before
  the address is published: the probes start (from a client on the same node
  and one on another node) while the Pod object has no address yet;
* a new pod that NO policy selects: from its address being published to the
  first probe that gets through (it must be reachable once known).

Modes (``--modes``, default both, in one run on one world): ``baseline`` runs the agents without
``--pod-cidrs`` (as before the fix: a pod the model does not know yet is not filtered), then
``pod-cidrs`` restarts them with each node's CIDR (a new pod is denied until it is known) and
measures everything again. ``--json`` puts the last mode's figures at the top level and every
mode's under ``modes``.

    .venv/bin/python bench/e2e_bench.py [--quick] [--json FILE] [--modes pod-cidrs] [--agent-arg=--flag=value ...]

Everything it starts is stopped at the end (the temp directory too, unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import ipaddress
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_note, ms_summary, pct, verdict

GOAL_P99 = 0.300  # seconds, all three figures (issue 11 part 5)
CIDR_PREFIX = 21  # one /21 per node: 2,046 addresses (5,000 pods on 6 nodes need ~834 each)
FIRST_API_HOST = 256  # API-only pods from host 256 of their node's CIDR on; real pods take 10, 11, ...
PROBE_PORT = 8080
PROBE_NS = "e2e-probe"
NEW_NS = "e2e-new"
STABLE = 5  # probes in a row showing a verdict before it counts as settled
log = logging.getLogger("e2e_bench")


# --- pure parts: addresses, probe logs, statistics, figures --------------------------------------


def node_cidr(index: int, prefix: int = CIDR_PREFIX) -> str:
    """Node ``index``'s pod CIDR: consecutive blocks of size ``/prefix`` from 10.244.0.0."""
    size = 1 << (32 - prefix)
    base = int(ipaddress.IPv4Address("10.244.0.0")) + index * size
    return str(ipaddress.IPv4Network((base, prefix)))


def api_pod_ip(index: int, slot: int, prefix: int = CIDR_PREFIX) -> str:
    """The ``slot``-th API-only pod's address on node ``index`` (above the real pods' addresses)."""
    net = ipaddress.IPv4Network(node_cidr(index, prefix))
    host = FIRST_API_HOST + slot
    if host >= net.num_addresses - 1:
        raise ValueError(f"node {index}'s CIDR {net} has no room for API pod {slot}")
    return str(net.network_address + host)


@dataclass(frozen=True)
class ProbeResult:
    start: float  # time.monotonic() when the connection attempt started
    through: bool  # connected (or refused: the packet got through), else no answer in time


def first_verdict(results: Sequence[ProbeResult], since: float, through: bool) -> ProbeResult | None:
    """The first probe started at or after ``since`` that shows ``through``."""
    for r in sorted(results, key=lambda r: r.start):
        if r.start >= since and r.through == through:
            return r
    return None


def settled(results: Sequence[ProbeResult], since: float, through: bool, stable: int = STABLE) -> bool:
    """Whether the last ``stable`` probes started after ``since`` all show ``through``."""
    tail = [r for r in sorted(results, key=lambda r: r.start) if r.start >= since][-stable:]
    return len(tail) == stable and all(r.through == through for r in tail)


def count_through(results: Iterable[ProbeResult], start: float, stop: float) -> int:
    """Probes started in ``[start, stop)`` that got through."""
    return sum(1 for r in results if start <= r.start < stop and r.through)


def flaps(results: Sequence[ProbeResult], first: ProbeResult, through: bool) -> int:
    """Probes after ``first`` (the first of the new verdict) still showing the old one."""
    return sum(1 for r in results if r.start > first.start and r.through != through)


def stats(samples: Sequence[float]) -> dict[str, Any]:
    """``{"n", "p50_s", "p99_s", "max_s"}`` (zeros without samples)."""
    return {"n": len(samples), "p50_s": pct(samples, 0.5), "p99_s": pct(samples, 0.99),
            "max_s": max(samples) if samples else 0.0}


@dataclass
class NewPodSample:
    """One new pod: when its address was published and what the probes saw."""

    node: int
    published: float  # time.monotonic() just before the status write that sets the address
    window_s: float | None  # published -> first probe of the expected verdict (None: never)
    through_before_publish: int  # probes through while the Pod object had no address yet
    through_after_publish: int  # probes through after publishing, before the first denied one
    probes: int


def new_pod_sample(node: int, published: float, results: Sequence[ProbeResult], expect_through: bool) -> NewPodSample:
    """Analyse one new pod's probes (all sources together): the window to the expected verdict and,
    for a pod that must be denied, the probes that got through before it."""
    first = first_verdict(results, published, expect_through)
    stop = first.start if first is not None else float("inf")
    before = count_through(results, float("-inf"), published) if not expect_through else 0
    after = count_through(results, published, stop) if not expect_through else 0
    return NewPodSample(node=node, published=published,
                        window_s=None if first is None else max(0.0, first.start - published),
                        through_before_publish=before, through_after_publish=after, probes=len(results))


@dataclass
class Figures:
    """Everything the bench measured (``figures_json`` is its JSON form)."""

    enforced: list[float] = field(default_factory=list)  # policy create -> Enforced
    deny_seen: list[float] = field(default_factory=list)  # policy create -> first denied probe
    allow_seen: list[float] = field(default_factory=list)  # policy create -> first probe through
    flapping: int = 0  # probes showing the old verdict after the new one was first seen
    timeouts: int = 0  # steps that did not finish within --step-timeout (counted at the timeout)
    new_denied: list[NewPodSample] = field(default_factory=list)
    new_free: list[NewPodSample] = field(default_factory=list)
    setup: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    probe_gap_s: list[float] = field(default_factory=list)  # actual gaps between probe starts
    load: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)


def windows(samples: Iterable[NewPodSample]) -> list[float]:
    return [s.window_s for s in samples if s.window_s is not None]


def figures_json(f: Figures) -> dict[str, Any]:
    """The JSON the bench writes with ``--json`` (keys are stable; times in seconds)."""
    seen = f.deny_seen + f.allow_seen
    denied = windows(f.new_denied)
    reach_after = sum(s.through_after_publish for s in f.new_denied)
    reach_before = sum(s.through_before_publish for s in f.new_denied)
    return {
        "sizes": f.sizes,
        "setup_s": f.setup,
        "agent_args": f.agent_args,
        "load": f.load,
        "probe_gap_p50_s": pct(f.probe_gap_s, 0.5),
        "policy_enforced": stats(f.enforced),
        "policy_enforced_p50_s": pct(f.enforced, 0.5),
        "policy_enforced_p99_s": pct(f.enforced, 0.99),
        "policy_probe": stats(seen),
        "policy_probe_p50_s": pct(seen, 0.5),
        "policy_probe_p99_s": pct(seen, 0.99),
        "policy_probe_deny": stats(f.deny_seen),
        "policy_probe_allow": stats(f.allow_seen),
        "policy_probe_flapping": f.flapping,
        "step_timeouts": f.timeouts,
        "new_pod_denied": stats(denied),
        "new_pod_denied_p50_s": pct(denied, 0.5),
        "new_pod_denied_p99_s": pct(denied, 0.99),
        "new_pod_never_denied": sum(1 for s in f.new_denied if s.window_s is None),
        "new_pod_through_after_publish": reach_after,
        "new_pod_through_before_publish": reach_before,
        "new_pods_reachable_after_publish": sum(1 for s in f.new_denied if s.through_after_publish),
        "new_pod_reachable_before_rules": reach_after + reach_before > 0,
        "new_free_pod_allowed": stats(windows(f.new_free)),
        "new_free_pod_never_allowed": sum(1 for s in f.new_free if s.window_s is None),
        "goal_p99_s": GOAL_P99,
        "goals_met": {
            "policy_enforced": bool(f.enforced) and pct(f.enforced, 0.99) < GOAL_P99,
            "policy_probe": bool(seen) and pct(seen, 0.99) < GOAL_P99,
            "new_pod_denied": bool(denied) and pct(denied, 0.99) < GOAL_P99
            and len(denied) == len(f.new_denied),
            "new_pod_not_reachable_before_rules": reach_after + reach_before == 0,
        },
    }


def modes_json(modes: Mapping[str, Figures]) -> dict[str, Any]:
    """The ``--json`` file: the last mode's figures at the top level (the product as it is meant to
    run), every mode's under ``modes`` (before/after from one run)."""
    last = list(modes)[-1]
    return {**figures_json(modes[last]), "mode": last, "modes": {m: figures_json(f) for m, f in modes.items()}}


def print_report(f: Figures) -> None:
    j = figures_json(f)
    seen = f.deny_seen + f.allow_seen
    denied = windows(f.new_denied)
    print(f"\nsizes: {f.sizes}")
    print("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in f.setup.items()))
    print(f"agent args: {' '.join(f.agent_args) or '(defaults)'}")
    print(f"probe gap p50 {pct(f.probe_gap_s, 0.5) * 1e3:.1f} ms (asked {j['sizes'].get('probe_interval_ms', 0)} ms)")
    print(f"policy create -> Enforced          {ms_summary(f.enforced)}  {verdict(pct(f.enforced, 0.99) < GOAL_P99)}")
    print(f"policy create -> probe verdict     {ms_summary(seen)}  {verdict(pct(seen, 0.99) < GOAL_P99)}")
    print(f"    deny appearing                 {ms_summary(f.deny_seen)}")
    print(f"    allow appearing                {ms_summary(f.allow_seen)}")
    print(f"    probes with the old verdict after the new one: {f.flapping}; steps timed out: {f.timeouts}")
    ok_denied = bool(denied) and pct(denied, 0.99) < GOAL_P99 and len(denied) == len(f.new_denied)
    print(f"new pod (deny selects it): IP set -> first denied probe  {ms_summary(denied)}  {verdict(ok_denied)}")
    print(f"    never denied: {j['new_pod_never_denied']} of {len(f.new_denied)}")
    print(f"    probes through after the IP was set, before the deny: {j['new_pod_through_after_publish']} "
          f"({j['new_pods_reachable_after_publish']} of {len(f.new_denied)} pods)")
    print(f"    probes through while the pod had no IP in the API yet: {j['new_pod_through_before_publish']}")
    hole = j["new_pod_reachable_before_rules"]
    print(f"    a new pod CAN{'' if hole else 'NOT'} be reached before its rules exist")
    print(f"new pod (no policy selects it): IP set -> first probe through  {ms_summary(windows(f.new_free))}  "
          f"never: {j['new_free_pod_never_allowed']} of {len(f.new_free)}")
    for note in f.load:
        print(f"load: {note}")


# --- probing (I/O) ---------------------------------------------------------------------------------


class ProbeStream:
    """Starts a TCP probe from ``src_netns`` to ``ip:port`` every ``interval`` seconds, in threads.

    Through = the connection was made (or refused: the packet reached the pod); denied = no answer
    within ``timeout``. Each socket is closed with a reset (SO_LINGER 0): no TIME_WAIT piles up and
    no later probe reuses an earlier one's flow.
    """

    def __init__(self, prober: Any, src_netns: str, ip: str, port: int, interval: float, timeout: float,
                 pool: ThreadPoolExecutor) -> None:
        self.prober, self.src_netns, self.ip, self.port = prober, src_netns, ip, port
        self.interval, self.timeout, self.pool = interval, timeout, pool
        self.results: list[ProbeResult] = []
        self.starts: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name=f"probe-{ip}", daemon=True)

    def start(self) -> ProbeStream:
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_at:
                self._stop.wait(next_at - now)
                continue
            next_at = max(next_at + self.interval, now)
            with self._lock:
                self._pending += 1
            self.pool.submit(self._one)

    def _one(self) -> None:
        try:
            sock = self.prober.open_socket(self.src_netns, socket.SOCK_STREAM)
        except Exception:
            log.exception("cannot open a probe socket in %s", self.src_netns)
            with self._lock:
                self._pending -= 1
            return
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.settimeout(self.timeout)
            start = time.monotonic()
            try:
                sock.connect((self.ip, self.port))
                through = True
            except ConnectionRefusedError:
                through = True
            except OSError as exc:
                through = False
                if not isinstance(exc, TimeoutError) and exc.errno not in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                    log.debug("probe %s -> %s: %s", self.src_netns, self.ip, exc)
        with self._lock:
            self.results.append(ProbeResult(start, through))
            self.starts.append(start)
            self._pending -= 1

    def snapshot(self) -> list[ProbeResult]:
        with self._lock:
            return list(self.results)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    async def drain(self) -> None:
        """Stop and wait until every started probe has a result."""
        self.stop()
        while True:
            with self._lock:
                if self._pending == 0:
                    return
            await asyncio.sleep(0.02)

    def gaps(self) -> list[float]:
        with self._lock:
            s = sorted(self.starts)
        return [b - a for a, b in itertools.pairwise(s)]


async def until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> float:
    """Poll ``predicate`` (probe results arrive from threads); the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic()


# --- the world (API objects) -------------------------------------------------------------------


def world_pods(sizes: Any, nodes: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """synthetic.pod_bodies bound to the test bed's nodes, addresses from their pod CIDRs."""
    from netfence_lab.kubelet import node_name
    from synthetic import pod_bodies

    out = []
    for i, (body, _status) in enumerate(pod_bodies(sizes)):
        node = i % nodes
        body["spec"]["nodeName"] = node_name(node)
        ip = api_pod_ip(node, i // nodes)
        out.append((body, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))
    return out


async def create_world(api: Any, sizes: Any, nodes: int, concurrency: int) -> dict[str, int]:
    """Namespaces, API-only pods and policies; the highest resource version written per kind."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    from controller_bench import bounded
    from synthetic import namespace_bodies, policy_bodies

    core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
    marks: dict[str, int] = {"pods": 0, "namespaces": 0, "networkpolicies": 0}

    def note(kind: str, obj: Any) -> None:
        marks[kind] = max(marks[kind], int(obj.metadata.resource_version))

    async def make_ns(body: dict[str, Any]) -> None:
        note("namespaces", await core.create_namespace(body))

    async def make_pod(body: dict[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        with contextlib.suppress(ApiException):  # 409 on a retry: it exists, patch its status anyway
            await core.create_namespaced_pod(meta["namespace"], body)
        note("pods", await core.patch_namespaced_pod_status(meta["name"], meta["namespace"], status))

    async def make_policy(body: dict[str, Any]) -> None:
        note("networkpolicies", await net.create_namespaced_network_policy(body["metadata"]["namespace"], body))

    await bounded(concurrency, [functools.partial(make_ns, b) for b in namespace_bodies(sizes)])
    await bounded(concurrency, [functools.partial(make_pod, b, s) for b, s in world_pods(sizes, nodes)])
    await bounded(concurrency, [functools.partial(make_policy, b) for b in policy_bodies(sizes)])
    return marks


def deny_all(name: str, namespace: str, selector: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": ["Ingress"], "ingress": []}}


def allow_from(name: str, namespace: str, selector: Mapping[str, str], peer: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": dict(peer)}}],
                                  "ports": [{"protocol": "TCP", "port": PROBE_PORT}]}]}}


# --- the measurements ----------------------------------------------------------------------------


@dataclass
class Bed:
    env: Any
    status: Any  # scale_bench.StatusWatch
    prober: Any
    pool: ThreadPoolExecutor
    args: argparse.Namespace
    servers: dict[int, Any] = field(default_factory=dict)  # node -> PodHandle
    clients: dict[int, Any] = field(default_factory=dict)
    figures: Figures = field(default_factory=Figures)

    def stream(self, src: Any, ip: str) -> ProbeStream:
        return ProbeStream(self.prober, src.netns, ip, PROBE_PORT, self.args.probe_interval,
                           self.args.probe_timeout, self.pool).start()


async def policy_cycles(bed: Bed, first: int = 0) -> None:
    """Deny appearing, then allow appearing, per cycle; both policies deleted again after each."""
    for c in range((bed.args.creates + 1) // 2):
        await policy_cycle(bed, first + c)
        log.info("cycle %d: enforced %.0f ms, deny %.0f ms, allow %.0f ms", c + 1, bed.figures.enforced[-1] * 1e3,
                 bed.figures.deny_seen[-1] * 1e3, bed.figures.allow_seen[-1] * 1e3)


async def policy_cycle(bed: Bed, c: int) -> None:
    from kubernetes_asyncio import client

    from netfence.controller.kube import cps_name

    net = client.NetworkingV1Api(bed.env.api)
    nodes = len(bed.servers)
    timeout = bed.args.step_timeout
    srv, cli = bed.servers[c % nodes], bed.clients[(c + 1) % nodes]
    stream = bed.stream(cli, srv.ip)
    try:
        await until(lambda: settled(stream.snapshot(), 0.0, True), timeout, f"{srv.key} reachable")
        target = {"pod": srv.name}
        for kind, body in (("deny", deny_all(f"deny-{c}", PROBE_NS, target)),
                           ("allow", allow_from(f"allow-{c}", PROBE_NS, target, {"pod": cli.name}))):
            name = cps_name(PROBE_NS, body["metadata"]["name"])
            want = kind == "allow"
            t0 = time.monotonic()
            await net.create_namespaced_network_policy(PROBE_NS, body)
            try:
                enforced = await bed.status.wait(functools.partial(bed.status.enforced_at, name, 0),
                                                 timeout, f"{name} Enforced")
            except TimeoutError as exc:  # counted at the timeout (a lower bound), not a reason to stop
                log.warning("%s", exc)
                bed.figures.timeouts += 1
                enforced = t0 + timeout
            seen = (bed.figures.allow_seen if want else bed.figures.deny_seen)
            try:
                await until(functools.partial(_settled_on, stream, t0, want), timeout,
                            f"{kind} seen by probes {cli.key} -> {srv.key}")
            except TimeoutError as exc:
                log.warning("%s", exc)
                bed.figures.timeouts += 1
            results = stream.snapshot()
            first = first_verdict(results, t0, want)
            bed.figures.enforced.append(enforced - t0)
            seen.append(timeout if first is None else first.start - t0)
            if first is not None:
                bed.figures.flapping += flaps(results, first, want)
        t_del = time.monotonic()
        for name in (f"allow-{c}", f"deny-{c}"):
            await net.delete_namespaced_network_policy(name, PROBE_NS)
        try:
            await until(functools.partial(_settled_on, stream, t_del, True), timeout, f"{srv.key} open again")
        except TimeoutError as exc:
            log.warning("%s", exc)
            bed.figures.timeouts += 1
    finally:
        await stream.drain()
        bed.figures.probe_gap_s += stream.gaps()


def _settled_on(stream: ProbeStream, since: float, through: bool) -> bool:
    return settled(stream.snapshot(), since, through)


async def new_pods(bed: Bed, count: int, labels: Mapping[str, str], expect_through: bool,
                   tag: str) -> list[NewPodSample]:
    """Create ``count`` new real pods (round robin over the nodes), probed from a client on the same
    node and one on another node from before their address is published."""
    out = []
    for s in range(count):
        sample = await new_pod(bed, f"{tag}-{s}", s % len(bed.servers), labels, expect_through)
        out.append(sample)
        log.info("%s-%d: window %s, through before publish %d, after %d", tag, s,
                 "never" if sample.window_s is None else f"{sample.window_s * 1e3:.0f} ms",
                 sample.through_before_publish, sample.through_after_publish)
    return out


async def new_pod(bed: Bed, name: str, node: int, labels: Mapping[str, str], expect_through: bool) -> NewPodSample:
    nodes = len(bed.servers)
    kubelet = bed.env.kubelet
    sources = [bed.clients[node], bed.clients[(node + 1) % nodes]]
    streams: list[ProbeStream] = []
    published = 0.0
    timeout = bed.args.step_timeout

    def probed() -> bool:
        return all(len(st.snapshot()) >= 3 for st in streams)

    def done() -> bool:
        return all(settled(st.snapshot(), published, expect_through) for st in streams)

    async def before_publish(handle: Any) -> None:
        nonlocal published
        streams.extend(bed.stream(src, handle.ip) for src in sources)
        await until(probed, timeout, f"probes of {handle.key} before publishing")
        published = time.monotonic()

    try:
        await kubelet.create_pod(NEW_NS, name, {**labels, "pod": name}, [(PROBE_PORT, "TCP")], node,
                                 before_publish=before_publish)
        with contextlib.suppress(TimeoutError):  # never settling is a finding, not a bench error
            await until(done, timeout, f"{name}: {'through' if expect_through else 'denied'}")
    finally:
        for st in streams:
            await st.drain()
            bed.figures.probe_gap_s += st.gaps()
        with contextlib.suppress(Exception):
            await kubelet.delete_pod(NEW_NS, name)
    results = [r for st in streams for r in st.snapshot()]
    return new_pod_sample(node, published, results, expect_through)


# --- orchestration -------------------------------------------------------------------------------


async def world_enforced(env: Any, marks: Mapping[str, int], timeout: float) -> None:
    """The controller has processed every write up to ``marks`` and every ClusterPolicyStatus says
    ``Enforced``: the test bed's barrier without its check that every node applied the last commit
    (an agent whose node a commit does not touch does not apply it, issue 11 part 1)."""
    deadline = time.monotonic() + timeout
    store = await env._etcd_reader()
    try:
        await env._wait_observed(store, dict(marks), deadline)
    finally:
        await store.close()
    await env._wait_statuses(deadline)




#: agent flags per mode ({cidr}: the node's pod CIDR): the agents as before the fix, and with it
MODES: dict[str, tuple[str, ...]] = {"baseline": (), "pod-cidrs": ("--pod-cidrs={cidr}",)}


async def start_agents(env: Any, nodes: int, flags: Sequence[str], timeout: float) -> None:
    """(Re)start every node's agent with ``flags`` and wait until each has reported a full sync
    at the last commit (a report written after the restart)."""
    from datetime import datetime as dt

    for i in range(nodes):
        old = env.agents.get(i)
        if old is not None:
            old.process.stop()
    since = dt.now(UTC)
    for i in range(nodes):
        env.start_agent(i, extra=tuple(a.replace("{cidr}", node_cidr(i)) for a in flags))
    deadline = time.monotonic() + timeout
    store = await env._etcd_reader()
    try:
        commit = (await store.committed_snapshot()).commit_revision
        while True:
            reports = await store.read_reports()
            lagging = [a.node for a in env.agents.values()
                       if (r := reports.get(a.node)) is None or int(r.get("appliedRevision") or 0) < commit
                       or dt.fromisoformat(str(r.get("time"))) < since]
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents of {lagging} have not synced revision {commit} after their start")
            await asyncio.sleep(0.1)
    finally:
        await store.close()


async def measure(bed: Bed, mode: int) -> None:
    """One mode's measurements into ``bed.figures`` (names made unique per mode)."""
    figures, args = bed.figures, bed.args
    figures.load.append(f"measuring: {load_note()}")
    await policy_cycles(bed, first=mode * 10_000)
    figures.load.append(f"after policy creates: {load_note()}")
    figures.new_denied = await new_pods(bed, args.new_pods, {"role": "new"}, False, f"new{mode}")
    figures.new_free = await new_pods(bed, args.free_pods, {"role": "free"}, True, f"free{mode}")
    figures.load.append(f"end: {load_note()}")


async def run(args: argparse.Namespace, workdir: Path, out: dict[str, Figures]) -> None:
    """Measure every mode into ``out`` (filled as the run goes: a run that fails keeps what it has)."""
    from kubernetes_asyncio import client

    from netfence_lab.cluster import LocalCluster
    from netfence_lab.env import NetfenceEnv
    from netfence_lab.probe import Prober
    from netfence_lab.tools import ensure_tools
    from scale_bench import StatusWatch
    from synthetic import Sizes

    sizes = Sizes(namespaces=args.namespaces, pods=args.pods, policies=args.policies, nodes=args.nodes)
    size_note = {"nodes": args.nodes, "pods": args.pods, "namespaces": args.namespaces,
                 "policies": args.policies, "creates": args.creates, "new_pods": args.new_pods,
                 "free_pods": args.free_pods, "probe_interval_ms": round(args.probe_interval * 1e3),
                 "probe_timeout_ms": round(args.probe_timeout * 1e3)}
    setup: dict[str, float] = {}
    start_load = load_note()
    t0 = time.monotonic()
    with LocalCluster(workdir / "cluster", ensure_tools()) as cluster:
        env = NetfenceEnv(cluster, workdir / "env", nodes=0, pod_cidr=node_cidr,
                          resync_seconds=60.0, report_ttl=10,
                          controller_extra_args=("--status-interval-ms=200", *args.controller_arg))
        await env.start()
        kubelet = env.kubelet
        assert kubelet is not None
        pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="probe")
        status = StatusWatch(env.api)
        try:
            for i in range(args.nodes):
                await kubelet.add_node(i)
            await start_agents(env, args.nodes, [*MODES[args.modes[0]], *args.agent_arg], args.setup_timeout)
            setup["control plane and nodes"] = time.monotonic() - t0
            t1 = time.monotonic()
            marks = await create_world(env.api, sizes, args.nodes, args.concurrency)
            setup["world created"] = time.monotonic() - t1
            servers: dict[int, Any] = {}
            clients: dict[int, Any] = {}
            for ns in (PROBE_NS, NEW_NS):
                await kubelet.ensure_namespace(ns, {"e2e": ns})
            await env.apply_manifest(deny_all("deny-new", NEW_NS, {"role": "new"}))
            for i in range(args.nodes):
                for role, pods in (("srv", servers), ("cli", clients)):
                    labels = {"role": role, "pod": f"{role}-{i}"}
                    pods[i] = await kubelet.create_pod(PROBE_NS, f"{role}-{i}", labels, [(PROBE_PORT, "TCP")], i)
            t2 = time.monotonic()
            pod = await client.CoreV1Api(env.api).read_namespaced_pod(f"cli-{args.nodes - 1}", PROBE_NS)
            marks["pods"] = max(marks["pods"], int(pod.metadata.resource_version))
            await world_enforced(env, marks, args.setup_timeout)
            setup["world enforced after the last write"] = time.monotonic() - t2
            status.start()
            await asyncio.wait_for(status.ready.wait(), 60)
            for m, mode in enumerate(args.modes):
                flags = [*MODES[mode], *args.agent_arg]
                figures = Figures(sizes=size_note, setup=dict(setup), agent_args=flags, load=[f"start: {start_load}"])
                if m > 0:
                    t3 = time.monotonic()
                    await start_agents(env, args.nodes, flags, args.setup_timeout)
                    figures.setup = {"agents restarted and synced": time.monotonic() - t3}
                log.info("mode %s: agent flags %s", mode, " ".join(flags) or "(none)")
                bed = Bed(env, status, Prober(), pool, args, servers, clients, figures)
                out[mode] = figures
                await measure(bed, m)
        finally:
            await status.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            await env.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--pods", type=int, default=5000, help="API-only pods (the real ones come on top)")
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--creates", type=int, default=100, help="policy creates (half deny, half allow)")
    p.add_argument("--new-pods", type=int, default=100, help="new pods an existing deny policy selects")
    p.add_argument("--free-pods", type=int, default=30, help="new pods no policy selects")
    p.add_argument("--probe-interval", type=float, default=0.01, help="seconds between probe starts")
    p.add_argument("--probe-timeout", type=float, default=0.5, help="no answer within this: denied")
    p.add_argument("--step-timeout", type=float, default=30.0, help="give up on one measured change after this")
    p.add_argument("--setup-timeout", type=float, default=900.0)
    p.add_argument("--concurrency", type=int, default=32, help="API writes in flight while creating the world")
    p.add_argument("--agent-arg", action="append", default=[],
                   help="extra agent flag (repeatable); {cidr} becomes the node's pod CIDR")
    p.add_argument("--controller-arg", action="append", default=[], help="extra controller flag (repeatable)")
    p.add_argument("--modes", type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                   default=list(MODES), help=f"comma-separated, in order, of {', '.join(MODES)} (default: all): "
                   "the agents before the fix and with --pod-cidrs; the first mode's agents build the world")
    p.add_argument("--quick", action="store_true", help="a smoke size: 3 nodes, 300 pods, 50 policies, few samples")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    return p


QUICK = {"nodes": 3, "pods": 300, "namespaces": 10, "policies": 50, "creates": 10, "new_pods": 6, "free_pods": 3}


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("kubernetes_asyncio", "aiohttp", "netfence_lab"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="netfence-e2e-bench-"))
    print(f"e2e bench {datetime.now(UTC).isoformat(timespec='seconds')}: {load_note()}; workdir {workdir}")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        raise SystemExit(f"e2e_bench: unknown modes {unknown}; known: {', '.join(MODES)}")
    modes: dict[str, Figures] = {}
    try:
        asyncio.run(run(args, workdir, modes))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        for mode, figures in modes.items():  # also what a failed or interrupted run measured
            print(f"\n=== mode {mode} ===")
            print_report(figures)
        if args.json and modes:
            args.json.write_text(json.dumps(modes_json(modes), indent=2) + "\n")
            print(f"JSON written to {args.json}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("e2e_bench: needs root (network namespaces)")
    main()
