"""Netfence against kube-network-policies: same nodes, same pods, one run (prints figures; not a test).

The peer is SIG Network's reference enforcer ``sigs.k8s.io/kube-network-policies``
v0.8.0 (nftables + nfqueue: the first packet of every new connection is judged in
user space), built by ``hack/setup-peer.sh`` and run by :mod:`netfence_lab.peer`:
one process per node inside the node's network namespace, against the same local
API server. Read that module's docstring for the queue hook this kernel needs
(no ``CONFIG_NFT_QUEUE`` here: its nftables table is refused, the same hook is
installed with iptables' NFQUEUE target; every verdict is still the peer's own).

One invocation:

1. **Correctness first** (unless ``--no-conformance``): the 7 shared conformance
   scenarios through the conformance runner and the same probes, once with
   Netfence, once with the peer (``enforcer=kube-network-policies``: no
   enforcement signal, every step probes until its tables hold).
2. One test bed: the local control plane, 2 namespace nodes, pods
   ``pb-client/client`` and ``pb-client/other`` on node-0, ``pb-server/server``
   and ``pb-target/target`` on node-1. Policies: ``pb-server/allow-client``
   (server accepts client on 80 and the rate port), ``pb-client/client-egress``
   (client isolated for egress, allows all), and fillers in ``pb-server`` that
   all select the server (ingress from a team/app pair on a port of their own),
   so "N policies" are N policies in force on node-1 and in the peer's
   evaluation of every connection to the server.
3. Each system in turn on those nodes and pods (Netfence: controller + agents;
   then they stop, the nodes' netfilter is reset, the peer starts), then no
   enforcer at all (the baseline for added latency):

   * policy create -> the first probe with the new verdict, at 100 and 1,000
     policies: ``deny-k`` isolates target (client -> target turns denied), then
     ``allow-k`` admits client (turns allowed); both are deleted and the bed
     waits until ``other -> target`` is allowed again. Probes are new TCP
     connections launched every ``--interval`` from the client's namespace;
     the sample is the launch time of the first probe with the new verdict
     (a denied one only when the next two are denied too) minus the time the
     create call was made.
   * pod label change -> the first allowed probe: ``from-granted`` admits pods
     labelled ``access=granted``; ``other`` gets the label (sample), loses it
     (not timed, the bed waits for denied).
   * new TCP connections per second client -> server (node-0 -> node-1, through
     node-1's 1,000 policies): a bounded connect/close loop (``--workers``
     threads, at most ``--conn-seconds``) run inside the client pod's namespace
     against an accept/close loop inside the server pod's namespace; then a
     sequential loop for the mean time per connection, minus the baseline's.
   * CPU seconds of each system's processes (Netfence: controller, agents and
     its etcd; the peer: its processes, its API relays listed apart) over the
     policy writes at 1,000 policies, per 100 writes (creates and deletes).
   * kernel objects per node at 1,000 policies (rules, sets, set members).

    .venv/bin/python bench/peer_bench.py [--quick] [--json FILE]

Traffic stays between the bed's namespaces (and the API server on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import pct

NETFENCE = "netfence"
PEER = "kube-network-policies"
NONE = "none"
SHARED_SCENARIOS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "scenarios"
RATE_PORT = 9001
HTTP_PORT = 80
BASE_POLICIES = 2  # allow-client, client-egress
RESYNC_SECONDS = 60.0  # the agent's default --resync-seconds (and the chart's resyncSeconds)
TEAMS = 10
APPS = 20
GOAL_CONN_RATE = 3.0  # Netfence's new-connection rate >= 3x the peer's
GOAL_ENFORCE_P99 = 2.0  # Netfence's policy-change-to-enforced p99 <= 2x the peer's
#: What the peer's own nftables table holds per node (v0.8.0 ``syncNFTablesRules``, without the
#: DNS workaround): one postrouting chain of 7 rules and 2 sets of the node's local pods that some
#: policy selects. On a kernel without CONFIG_NFT_QUEUE that table is refused and the shim's
#: xtables rules are counted instead.
PEER_OWN_TABLE = "1 chain, 7 rules, 2 sets (one element per selected local pod)"

Body = dict[str, Any]


# -- pure: sizes, policies -----------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    levels: tuple[int, ...] = (100, 1000)
    changes: int = 100  # policy changes (verdict flips) per level; two per cycle
    label_changes: int = 100
    conn_seconds: float = 5.0
    conn_count: int = 50000  # upper bound of one rate loop
    latency_count: int = 2000
    workers: int = 4
    interval: float = 0.01
    probe_timeout: float = 0.3
    wait_timeout: float = 30.0


QUICK = Sizes(levels=(20, 100), changes=6, label_changes=4, conn_seconds=1.0, conn_count=5000, latency_count=200)


def filler_policy(j: int) -> Body:
    """Filler ``j``: selects the server, admits one team/app pair on a port of its own."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "pb-server", "name": f"filler-{j}"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"team": f"t{j % TEAMS}"}},
                          "podSelector": {"matchLabels": {"app": f"a{j % APPS}"}}}],
                "ports": [{"protocol": "TCP", "port": 10000 + j % 50000}],
            }],
        },
    }


def base_policies() -> list[Body]:
    return [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"namespace": "pb-server", "name": "allow-client"},
         "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "client"}},
                                         "podSelector": {"matchLabels": {"app": "client"}}}],
                               "ports": [{"protocol": "TCP", "port": HTTP_PORT},
                                         {"protocol": "TCP", "port": RATE_PORT}]}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"namespace": "pb-client", "name": "client-egress"},
         "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                  "egress": [{}]}},
    ]


def deny_policy(k: int) -> Body:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "pb-target", "name": f"deny-{k}"},
            "spec": {"podSelector": {"matchLabels": {"app": "target"}}, "policyTypes": ["Ingress"]}}


def allow_policy(k: int) -> Body:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "pb-target", "name": f"allow-{k}"},
            "spec": {"podSelector": {"matchLabels": {"app": "target"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "client"}},
                                            "podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"protocol": "TCP", "port": HTTP_PORT}]}]}}


def granted_policy() -> Body:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "pb-target", "name": "from-granted"},
            "spec": {"podSelector": {"matchLabels": {"app": "target"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "client"}},
                                            "podSelector": {"matchLabels": {"access": "granted"}}}],
                                  "ports": [{"protocol": "TCP", "port": HTTP_PORT}]}]}}


# -- pure: statistics, verdict detection, table, JSON --------------------------------------------

def summary(samples: Sequence[float], missed: int = 0) -> dict[str, Any]:
    """p50/p99/max in milliseconds of durations in seconds; ``missed``: changes never seen."""
    return {
        "p50_ms": round(pct(samples, 0.5) * 1e3, 2) if samples else None,
        "p99_ms": round(pct(samples, 0.99) * 1e3, 2) if samples else None,
        "max_ms": round(max(samples) * 1e3, 2) if samples else None,
        "n": len(samples),
        "missed": missed,
    }


def first_confirmed(samples: Sequence[tuple[float, bool | None]], want: bool, confirm: int) -> float | None:
    """Launch time of the first probe (in launch order) whose result is ``want`` and whose next
    ``confirm`` probes are finished with ``want`` too; None while that cannot be decided yet (an
    earlier probe is still pending, or the confirming ones are) or no probe shows ``want``.

    ``samples``: (launch time, result) in launch order; result None = still pending.
    """
    for i, (start, result) in enumerate(samples):
        if result is None:
            return None  # an earlier probe may still show the verdict
        if result != want:
            continue
        following = samples[i + 1:i + 1 + confirm]
        if len(following) < confirm or any(r is None for _, r in following):
            return None
        if all(r == want for _, r in following):
            return start
    return None


def ratio(netfence: float | None, peer: float | None) -> float | None:
    """Netfence / peer (None when either is missing or the peer's is 0)."""
    if netfence is None or peer is None or peer == 0:
        return None
    return round(netfence / peer, 3)


def _num(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def _pair(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("p50_ms") is None:
        return "-"
    missed = f" ({stats['missed']} missed)" if stats.get("missed") else ""
    return f"{stats['p50_ms']:.0f} / {stats['p99_ms']:.0f} ms{missed}"


def _ratio_pair(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str:
    if not a or not b:
        return "-"
    r50, r99 = ratio(a.get("p50_ms"), b.get("p50_ms")), ratio(a.get("p99_ms"), b.get("p99_ms"))
    return f"{_num(r50, 'x', 2)} / {_num(r99, 'x', 2)}"


def table_rows(figures: Mapping[str, Mapping[str, Any]], levels: Sequence[int]) -> list[tuple[str, str, str, str]]:
    """(what, Netfence, kube-network-policies, Netfence / peer) rows of the printed table (pure)."""
    nf, peer = figures.get(NETFENCE, {}), figures.get(PEER, {})
    rows: list[tuple[str, str, str, str]] = []
    for level in levels:
        key = f"enforce_{level}"
        rows.append((f"policy create -> new verdict, p50 / p99, {level:,} policies",
                     _pair(nf.get(key)), _pair(peer.get(key)), _ratio_pair(nf.get(key), peer.get(key))))
        for direction in ("deny", "allow"):
            sub_nf = (nf.get(key) or {}).get(direction)
            sub_peer = (peer.get(key) or {}).get(direction)
            rows.append((f"  of which a {direction} appearing", _pair(sub_nf), _pair(sub_peer),
                         _ratio_pair(sub_nf, sub_peer)))
    top = levels[-1]
    rows.append((f"pod label change -> first allowed probe, p50 / p99, {top:,} policies",
                 _pair(nf.get("label")), _pair(peer.get("label")), _ratio_pair(nf.get("label"), peer.get("label"))))
    rows.append((f"new TCP connections / s across nodes, {top:,} policies",
                 _num(nf.get("conn_rate"), "", 0), _num(peer.get("conn_rate"), "", 0),
                 _num(ratio(nf.get("conn_rate"), peer.get("conn_rate")), "x", 2)))
    rows.append(("added latency per new connection vs no enforcer",
                 _num(nf.get("added_latency_us"), " us", 0), _num(peer.get("added_latency_us"), " us", 0),
                 _num(ratio(nf.get("added_latency_us"), peer.get("added_latency_us")), "x", 2)))
    rows.append(("user-space CPU of the enforcer per new connection",
                 _num(nf.get("cpu_us_per_conn"), " us", 0), _num(peer.get("cpu_us_per_conn"), " us", 0), "-"))
    rows.append(("CPU seconds per 100 policy writes",
                 _num(nf.get("cpu_per_100"), " s", 2), _num(peer.get("cpu_per_100"), " s", 2),
                 _num(ratio(nf.get("cpu_per_100"), peer.get("cpu_per_100")), "x", 2)))
    for node in sorted(set(nf.get("kernel_objects") or {}) | set(peer.get("kernel_objects") or {})):
        a = (nf.get("kernel_objects") or {}).get(node) or {}
        b = (peer.get("kernel_objects") or {}).get(node) or {}

        def objs(o: Mapping[str, int]) -> str:
            if not o:
                return "-"
            return f"{o.get('rules', 0):,} rules, {o.get('sets', 0)} sets, {o.get('members', 0):,} members"

        rows.append((f"kernel objects on {node}, {top:,} policies", objs(a), objs(b),
                     _num(ratio(a.get("rules"), b.get("rules")), "x rules", 0)))
    return rows


def format_table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    header = ("what", "Netfence", "kube-network-policies", "Netfence / peer")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(header)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


def report(figures: Mapping[str, Mapping[str, Any]], levels: Sequence[int], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` document (pure): every figure of both systems (and the no-enforcer
    baseline), the ratios Netfence / peer, the goals."""
    nf, peer = figures.get(NETFENCE, {}), figures.get(PEER, {})
    top = f"enforce_{levels[-1]}"
    conn = ratio(nf.get("conn_rate"), peer.get("conn_rate"))
    enforce = ratio((nf.get(top) or {}).get("p99_ms"), (peer.get(top) or {}).get("p99_ms"))
    return {
        **meta,
        "levels": list(levels),
        "systems": {name: dict(values) for name, values in figures.items()},
        "conn_rate_ratio": conn,
        "enforce_p99_ratio": enforce,
        "ratios": {
            "enforce_p50_" + str(level): ratio((nf.get(f"enforce_{level}") or {}).get("p50_ms"),
                                               (peer.get(f"enforce_{level}") or {}).get("p50_ms"))
            for level in levels
        } | {
            "enforce_p99_" + str(level): ratio((nf.get(f"enforce_{level}") or {}).get("p99_ms"),
                                               (peer.get(f"enforce_{level}") or {}).get("p99_ms"))
            for level in levels
        } | {
            "label_p99": ratio((nf.get("label") or {}).get("p99_ms"), (peer.get("label") or {}).get("p99_ms")),
            "added_latency": ratio(nf.get("added_latency_us"), peer.get("added_latency_us")),
            "cpu_per_100": ratio(nf.get("cpu_per_100"), peer.get("cpu_per_100")),
        },
        "goals": {
            "conn_rate_ratio_at_least": GOAL_CONN_RATE,
            "conn_rate_met": conn is not None and conn >= GOAL_CONN_RATE,
            "enforce_p99_ratio_at_most": GOAL_ENFORCE_P99,
            "enforce_p99_met": enforce is not None and enforce <= GOAL_ENFORCE_P99,
        },
    }


# -- connection loops (run inside pod namespaces: `ip netns exec POD python peer_bench.py conn-...`) --

def conn_server(port: int, ready_file: Path | None) -> None:
    """Accept and close, until killed."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4096)
    if ready_file is not None:
        ready_file.write_text(str(os.getpid()))

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            conn.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    threads[0].join()


def conn_client(dst: str, port: int, workers: int, count: int, seconds: float) -> dict[str, Any]:
    """``workers`` threads connect (full handshake) and close with RST (no TIME_WAIT), until
    ``count`` connections in all or ``seconds`` pass; returns rate and per-connect times."""
    linger = struct.pack("ii", 1, 0)
    lock = threading.Lock()
    times: list[float] = []
    failures = [0]
    left = [count]
    deadline = time.monotonic() + seconds

    def work() -> None:
        mine: list[float] = []
        fails = 0
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.settimeout(1.0)
            t0 = time.perf_counter()
            try:
                sock.connect((dst, port))
                mine.append(time.perf_counter() - t0)
            except OSError:
                fails += 1
            finally:
                sock.close()
        with lock:
            times.extend(mine)
            failures[0] += fails

    started = time.monotonic()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    times.sort()
    return {
        "connections": len(times), "failures": failures[0], "seconds": round(elapsed, 3),
        "rate": round(len(times) / elapsed, 1) if elapsed > 0 else 0.0,
        "mean_us": round(sum(times) / len(times) * 1e6, 1) if times else None,
        "p50_us": round(pct(times, 0.5) * 1e6, 1) if times else None,
        "p99_us": round(pct(times, 0.99) * 1e6, 1) if times else None,
    }


# -- the bed and the measurements (edges) --------------------------------------------------------

def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class AsyncProber:
    """New TCP connections from a pod namespace, on the event loop (the socket is created in
    the namespace on the switcher thread, then used from here)."""

    def __init__(self) -> None:
        from netfence_lab.netns import default_switcher

        self._switcher = default_switcher()
        self._linger = struct.pack("ii", 1, 0)

    async def connect(self, netns: str, ip: str, port: int, timeout: float) -> bool:
        sock = self._switcher.call(netns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self._linger)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout)
            return True
        except (OSError, TimeoutError):
            return False
        finally:
            sock.close()


async def time_to_verdict(prober: AsyncProber, netns: str, ip: str, port: int, want: bool, t0: float,
                          sizes: Sizes) -> float | None:
    """Seconds from ``t0`` to the launch of the first probe showing ``want`` (a denied verdict
    confirmed by the next two probes); None after ``sizes.wait_timeout``."""
    confirm = 0 if want else 2
    starts: list[float] = []
    tasks: list[asyncio.Task[bool]] = []
    try:
        while True:
            now = time.monotonic()
            starts.append(now)
            tasks.append(asyncio.create_task(prober.connect(netns, ip, port, sizes.probe_timeout)))
            samples = [(s, t.result() if t.done() else None) for s, t in zip(starts, tasks, strict=True)]
            found = first_confirmed(samples, want, confirm)
            if found is not None:
                return max(0.0, found - t0)
            if now - t0 > sizes.wait_timeout:
                return None
            await asyncio.sleep(sizes.interval)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Bed:
    cluster: Any
    env: Any  # NetfenceEnv
    workdir: Path
    sizes: Sizes
    prober: AsyncProber = field(default_factory=AsyncProber)
    fillers: int = 0
    cycle: int = 0

    def pod(self, key: str) -> Any:
        ns, name = key.split("/")
        return self.env.kubelet.pod(ns, name)

    async def apply(self, body: Body) -> None:
        await self.env.apply_manifest(body)

    async def delete(self, namespace: str, name: str) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            await self.env.delete_policy(namespace, name)

    async def set_fillers(self, want: int, concurrency: int = 16) -> int:
        """Create or delete fillers until ``want`` exist; returns the API writes made."""
        sem = asyncio.Semaphore(concurrency)

        async def bounded(call: Awaitable[None]) -> None:
            async with sem:
                await call

        if want > self.fillers:
            await asyncio.gather(*(bounded(self.apply(filler_policy(j))) for j in range(self.fillers, want)))
        else:
            await asyncio.gather(*(bounded(self.delete("pb-server", f"filler-{j}")) for j in range(want, self.fillers)))
        writes = abs(want - self.fillers)
        self.fillers = want
        return writes

    async def verdict(self, src: str, dst: str, port: int, want: bool, t0: float | None = None) -> float | None:
        start = time.monotonic() if t0 is None else t0
        return await time_to_verdict(self.prober, self.pod(src).netns, self.pod(dst).ip, port, want, start, self.sizes)

    async def policy_cycles(self, changes: int, warmup: int = 1) -> tuple[dict[str, Any], int]:
        """``changes`` verdict flips (deny appearing, allow appearing, in turn); returns the
        summary and the policy writes made."""
        deny: list[float] = []
        allow: list[float] = []
        missed = 0
        writes = 0
        cycles = (changes + 1) // 2
        for n in range(warmup + cycles):
            k = self.cycle
            self.cycle += 1
            t0 = time.monotonic()
            await self.apply(deny_policy(k))
            d = await self.verdict("pb-client/client", "pb-target/target", HTTP_PORT, False, t0)
            t1 = time.monotonic()
            await self.apply(allow_policy(k))
            a = await self.verdict("pb-client/client", "pb-target/target", HTTP_PORT, True, t1)
            await self.delete("pb-target", f"deny-{k}")
            await self.delete("pb-target", f"allow-{k}")
            writes += 4
            reset = await self.verdict("pb-client/other", "pb-target/target", HTTP_PORT, True)
            if reset is None:
                raise RuntimeError("target did not become reachable again after its policies were deleted")
            if n < warmup:
                continue
            for value, bucket in ((d, deny), (a, allow)):
                if value is None:
                    missed += 1
                else:
                    bucket.append(value)
        both = deny + allow
        return {**summary(both, missed), "deny": summary(deny), "allow": summary(allow)}, writes

    async def label_cycles(self, changes: int, warmup: int = 1) -> dict[str, Any]:
        await self.apply(granted_policy())
        if await self.verdict("pb-client/other", "pb-target/target", HTTP_PORT, False) is None:
            raise RuntimeError("from-granted did not isolate target")
        samples: list[float] = []
        missed = 0
        try:
            for n in range(warmup + changes):
                t0 = time.monotonic()
                await self.env.label("Pod", "other", {"access": "granted"}, "pb-client")
                value = await self.verdict("pb-client/other", "pb-target/target", HTTP_PORT, True, t0)
                await self.env.label("Pod", "other", {"access": None}, "pb-client")
                if await self.verdict("pb-client/other", "pb-target/target", HTTP_PORT, False) is None:
                    raise RuntimeError("other kept access to target after losing its label")
                if n < warmup:
                    continue
                if value is None:
                    missed += 1
                else:
                    samples.append(value)
        finally:
            await self.delete("pb-target", "from-granted")
        if await self.verdict("pb-client/other", "pb-target/target", HTTP_PORT, True) is None:
            raise RuntimeError("target did not become reachable again after from-granted was deleted")
        return summary(samples, missed)

    def conn_loop(self, workers: int, count: int, seconds: float) -> dict[str, Any]:
        client_pod, server_pod = self.pod("pb-client/client"), self.pod("pb-server/server")
        ready = self.workdir / "conn-server.ready"
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        server = subprocess.Popen(
            ["ip", "netns", "exec", server_pod.netns, sys.executable, __file__, "conn-server",
             "--port", str(RATE_PORT), "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while not ready.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the connection-rate server did not start in the server pod")
                time.sleep(0.01)
            res = subprocess.run(
                ["ip", "netns", "exec", client_pod.netns, sys.executable, __file__, "conn-client",
                 "--dst", server_pod.ip, "--port", str(RATE_PORT), "--workers", str(workers),
                 "--count", str(count), "--seconds", str(seconds)],
                capture_output=True, text=True, check=True, timeout=seconds + 60)
            result: dict[str, Any] = json.loads(res.stdout)
            return result
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=10)

    def connections(self) -> dict[str, Any]:
        s = self.sizes
        rate = self.conn_loop(s.workers, s.conn_count, s.conn_seconds)
        seq = self.conn_loop(1, s.latency_count, s.conn_seconds * 2)
        return {"rate": rate, "sequential": seq}


def cpu_of(pids: Iterable[int]) -> float:
    from netfence_lab.peer import cpu_seconds

    return sum(cpu_seconds(p) for p in pids)


async def quiesce(pids: Sequence[int], window: float = 1.0, idle: float = 0.05, timeout: float = 120.0) -> None:
    """Wait until ``pids`` together use less than ``idle`` CPU seconds in ``window`` (the peer
    has no other "done" signal; Netfence is waited for by its barrier first)."""
    deadline = time.monotonic() + timeout
    last = cpu_of(pids)
    while time.monotonic() < deadline:
        await asyncio.sleep(window)
        now = cpu_of(pids)
        if now - last < idle:
            return
        last = now


async def measure_system(bed: Bed, name: str, pids: Callable[[], dict[str, int]],
                         settle: Callable[[], Awaitable[None]], extra_cpu: Callable[[], float] | None = None,
                         ) -> dict[str, Any]:
    from netfence_lab.peer import node_kernel_objects

    s = bed.sizes
    figures: dict[str, Any] = {}
    for level in s.levels:
        await bed.set_fillers(level - BASE_POLICIES)
        await settle()
        out(f"  {name}: {level:,} policies in the cluster; {s.changes} policy changes ...")
        if level == s.levels[-1]:
            before = cpu_of(pids().values())
            extra_before = extra_cpu() if extra_cpu else 0.0
        figures[f"enforce_{level}"], writes = await bed.policy_cycles(s.changes)
        if level == s.levels[-1]:
            spent = cpu_of(pids().values()) - before
            figures["cpu_seconds"] = round(spent, 3)
            figures["policy_writes"] = writes
            figures["cpu_per_100"] = round(spent / writes * 100, 3)
            if extra_cpu:
                figures["relay_cpu_per_100"] = round((extra_cpu() - extra_before) / writes * 100, 3)
        out(f"    {figures[f'enforce_{level}']}")
    out(f"  {name}: {s.label_changes} pod label changes ...")
    figures["label"] = await bed.label_cycles(s.label_changes)
    await settle()
    out(f"  {name}: connection rate ...")
    before = cpu_of(pids().values())
    conns = await asyncio.to_thread(bed.connections)
    made = conns["rate"]["connections"] + conns["sequential"]["connections"]
    # user-space CPU of the enforcer's processes per new connection (the kernel's share is not counted)
    figures["cpu_us_per_conn"] = round((cpu_of(pids().values()) - before) / made * 1e6, 1) if made else None
    figures["conn"] = conns
    figures["conn_rate"] = conns["rate"]["rate"]
    figures["conn_mean_us"] = conns["sequential"]["mean_us"]
    figures["kernel_objects"] = {
        f"node-{i}": node_kernel_objects(bed.env.fabric.node(i).netns) for i in range(bed.env.nodes)
    }
    return figures


async def run_conformance(cluster: Any, workdir: Path, enforcer: str) -> str:
    from netfence_lab.conformance.command import load_all
    from netfence_lab.conformance.runner import run_scenarios, summary_line

    results = await run_scenarios(load_all([SHARED_SCENARIOS]), cluster, workdir / f"conformance-{enforcer}",
                                  out=lambda line: out("    " + line), enforcer=enforcer)
    return summary_line(results)


async def main_async(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    from netfence_lab.cluster import LocalCluster
    from netfence_lab.env import NetfenceEnv
    from netfence_lab.peer import PeerNode, PeerNodes, peer_binary, reset_node_netfilter
    from netfence_lab.tools import ensure_tools

    peer_binary()  # fail early with what to run
    load_start = os.getloadavg()
    meta: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "peer": {"module": "sigs.k8s.io/kube-network-policies", "version": "v0.8.0"},
        "sizes": {"levels": list(sizes.levels), "changes": sizes.changes, "label_changes": sizes.label_changes,
                  "conn_seconds": sizes.conn_seconds, "workers": sizes.workers},
    }
    figures: dict[str, dict[str, Any]] = {}
    with LocalCluster(workdir / "cluster", ensure_tools()) as cluster:
        if args.conformance:
            out("conformance: the 7 shared scenarios, each system in turn")
            meta["conformance"] = {}
            for enforcer in (NETFENCE, PEER):
                line = await run_conformance(cluster, workdir, enforcer)
                meta["conformance"][enforcer] = line
                out(f"  {enforcer}: {line}")
                if ", 0 failed" not in line:
                    raise RuntimeError(f"{enforcer} fails the shared conformance scenarios ({line}); no timing")
        # The agents' drift check at its production default (the test bed's 5 s would put a
        # full resync of the node into many of the timed changes).
        env = NetfenceEnv(cluster, workdir / "bed", nodes=2, resync_seconds=RESYNC_SECONDS)
        await env.start()
        fabric, kubelet = env.fabric, env.kubelet
        assert fabric is not None and kubelet is not None
        peers: PeerNodes | None = None
        try:
            await env.ensure_namespace("pb-client", {"team": "client"})
            await env.ensure_namespace("pb-server", {"team": "server"})
            await env.ensure_namespace("pb-target", {"team": "target"})
            await env.create_pod("pb-client", "client", {"app": "client"}, [(HTTP_PORT, "TCP")], 0)
            await env.create_pod("pb-client", "other", {"app": "other"}, [(HTTP_PORT, "TCP")], 0)
            await env.create_pod("pb-server", "server", {"app": "server"}, [(HTTP_PORT, "TCP")], 1)
            await env.create_pod("pb-target", "target", {"app": "target"}, [(HTTP_PORT, "TCP")], 1)
            for body in base_policies():
                await env.apply_manifest(body)
            bed = Bed(cluster, env, workdir, sizes)

            def netfence_pids() -> dict[str, int]:
                pids = {name: p.pid for name, p in env.controllers.items() if p.pid}
                pids |= {a.node: a.process.pid for a in env.agents.values() if a.process.pid}
                etcd_pid = cluster.netfence_etcd.process.pid
                if etcd_pid:
                    pids["netfence-etcd"] = etcd_pid
                return pids

            async def netfence_settle() -> None:
                await env.wait_enforced({}, timeout=300, statuses=False)
                await quiesce(list(netfence_pids().values()))

            out(f"{NETFENCE}: controller + agents on node-0, node-1")
            await netfence_settle()
            figures[NETFENCE] = await measure_system(bed, NETFENCE, netfence_pids, netfence_settle)

            for proc in env.controllers.values():
                proc.stop()
            for agent in env.agents.values():
                agent.process.stop()
            for i in range(env.nodes):
                reset_node_netfilter(fabric.node(i).netns)
            await bed.set_fillers(sizes.levels[0] - BASE_POLICIES)

            out(f"{PEER}: one process per node, in the node's namespace")
            peers = PeerNodes(env.api, cluster.apiserver.port, cluster.apiserver.pki.ca_cert, workdir / "peer",
                              python=sys.executable)
            (workdir / "peer").mkdir(exist_ok=True)
            await peers.start([PeerNode(kubelet.nodes[i], fabric.node(i).netns, fabric.node(i).pod_cidr)
                               for i in range(env.nodes)])
            meta["peer"]["queue_hook"] = peers.hook
            running = peers

            async def peer_settle() -> None:
                await quiesce(list(running.pids().values()))

            figures[PEER] = await measure_system(bed, PEER, running.pids, peer_settle,
                                                 extra_cpu=lambda: running.cpu()[1])
            meta["peer"]["nft_table_refusals"] = {
                p.node: p.process.log_path.read_text(errors="replace").count('"syncing nftables rules" error')
                for p in running.procs.values()
            }
            peers.stop()
            peers = None
            for i in range(env.nodes):
                reset_node_netfilter(fabric.node(i).netns)

            out(f"{NONE}: no enforcer (baseline)")
            conns = await asyncio.to_thread(bed.connections)
            figures[NONE] = {"conn": conns, "conn_rate": conns["rate"]["rate"],
                             "conn_mean_us": conns["sequential"]["mean_us"]}
            base = conns["sequential"]["mean_us"]
            for name in (NETFENCE, PEER):
                mean = figures[name].get("conn_mean_us")
                figures[name]["added_latency_us"] = (round(mean - base, 1)
                                                     if mean is not None and base is not None else None)
        finally:
            if peers is not None:
                peers.stop()
            with contextlib.suppress(Exception):
                await env.delete_user_state()
            await env.close()
    meta["load"] = {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in os.getloadavg()]}
    return report(figures, sizes.levels, meta)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    srv = sub.add_parser("conn-server", help="(internal) accept/close loop inside a pod namespace")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--ready-file", type=Path, default=None)
    cli = sub.add_parser("conn-client", help="(internal) connect/close loop inside a pod namespace")
    cli.add_argument("--dst", required=True)
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--workers", type=int, default=4)
    cli.add_argument("--count", type=int, default=10000)
    cli.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="a smoke-sized run (minutes, not the figures)")
    p.add_argument("--changes", type=int, default=None, help="policy changes per level (default 100)")
    p.add_argument("--no-conformance", dest="conformance", action="store_false",
                   help="skip the shared conformance scenarios (timing only)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures and ratios")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temp dir)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.command == "conn-server":
        conn_server(args.port, args.ready_file)
        return
    if args.command == "conn-client":
        print(json.dumps(conn_client(args.dst, args.port, args.workers, args.count, args.seconds)))
        return
    sizes = QUICK if args.quick else Sizes()
    if args.changes is not None:
        sizes = Sizes(**{**sizes.__dict__, "changes": args.changes})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="netfence-peer-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out(f"peer bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; logs in {workdir}")
    result = asyncio.run(main_async(args, sizes, workdir))
    rows = table_rows(result["systems"], sizes.levels)
    out()
    out(f"Netfence vs kube-network-policies v0.8.0 (queue hook: {result['peer'].get('queue_hook')}), "
        f"{result['machine']['cpus']} CPUs, load {result['load']['start'][0]} -> {result['load']['end'][0]}")
    out(format_table(rows))
    if result["peer"].get("queue_hook") == "xt":
        out(f"kube-network-policies' own table was refused by this kernel (no CONFIG_NFT_QUEUE; "
            f"{result['peer'].get('nft_table_refusals')} refusals in its logs); counted: the xtables queue hook. "
            f"Its own table would hold {PEER_OWN_TABLE}.")
    out(f"conn_rate_ratio {result['conn_rate_ratio']} (goal >= {GOAL_CONN_RATE}); "
        f"enforce_p99_ratio {result['enforce_p99_ratio']} (goal <= {GOAL_ENFORCE_P99})")
    out(f"no enforcer: {result['systems'][NONE]['conn_rate']:,.0f} connections/s, "
        f"{result['systems'][NONE]['conn_mean_us']} us per connection; took {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        out(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
