"""Nodes and pods as network namespaces, wired Calico style (pure Linux, no Kubernetes).

Layout of one run with prefix ``P``::

    P-fab   bridge br0 + one veth per node (P f<i>)           (the "underlay" switch)
    P-n<i>  ul0 10.243.0.(i+1)/24, ip_forward=1               (node i, pod CIDR 10.244.i.0/24)
            default via 10.243.0.254 (does not exist: traffic for anywhere else dies here;
            the route also makes proxy ARP answer pods' ARP for 169.254.1.1)
            10.244.j.0/24 via 10.243.0.(j+1) for every other node j
            P p<n> (veth to pod n, proxy_arp=1, proxy_delay=0) + route <pod ip>/32
    P-p<n>  eth0 <pod ip>/32, 169.254.1.1 dev eth0 scope link, default via 169.254.1.1
            + one pod server process serving the pod's ports

Dual-stack (``Fabric(pod_cidr6=...)``, e.g. :func:`node_pod_cidr6`) adds IPv6 next to
it, routed the same way without proxy NDP: node i gets ``fd00:10:243::(i+1)/64`` on
ul0 (forwarding=1), a route ``fd00:10:244:j::/64 via fd00:10:243::(j+1)`` per other
node and, on each pod's veth, the link-local gateway ``fe80::1`` and a route to the
pod's ``/128``; the pod has ``eth0 <pod ip6>/128`` and ``default via fe80::1``. DAD is
off in every namespace (addresses are usable at once; the layout has no duplicates).

Nothing is ever created in the host's network namespace, and no namespace has
a link to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netfence_lab.netns import (
    NetnsError,
    add_netns,
    check_ifname,
    delete_netns,
    ip_batch,
    run,
    set_sysctls,
)
from netfence_lab.process import ManagedProcess, StartupError
from netfence_lab.runs import (
    PODSERVER_MODULE,
    check_prefix,
    cleanup_stale,
    new_prefix,
    owner_path,
    podserver_pids,
    remove_run,
    run_netns,
    write_owner,
)

__all__ = ["Fabric", "NodeNet", "PodNet", "cleanup_stale", "node_pod_cidr", "node_pod_cidr6", "node_underlay_ip",
           "node_underlay_ip6"]

log = logging.getLogger(__name__)

UNDERLAY_PREFIX = "10.243.0"
DEAD_GATEWAY = "10.243.0.254"  # never assigned: the nodes' default route leads nowhere
POD_GATEWAY = "169.254.1.1"
UNDERLAY_PREFIX6 = "fd00:10:243::"
POD_GATEWAY6 = "fe80::1"  # on every pod's node-side veth (link-local: one per link)
NO_DAD = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}
MAX_NODE_INDEX = 252
UNDERLAY_IF = "ul0"
BRIDGE = "br0"
READY_TIMEOUT = 20.0
READY_POLL = 0.005


def node_underlay_ip(index: int) -> str:
    return f"{UNDERLAY_PREFIX}.{index + 1}"


def node_pod_cidr(index: int) -> str:
    return f"10.244.{index}.0/24"


def node_pod_cidr6(index: int) -> str:
    """Node ``index``'s IPv6 pod CIDR (ULA space; ``index`` is the low byte of the fourth group), in
    canonical text (``fd00:10:244::/64`` for node 0)."""
    return str(ipaddress.ip_network(f"fd00:10:244:{index:x}::/64"))


def node_underlay_ip6(index: int) -> str:
    return f"{UNDERLAY_PREFIX6}{index + 1:x}"


@dataclass(frozen=True)
class NodeNet:
    index: int
    netns: str
    underlay_ip: str
    pod_cidr: str
    fabric_veth: str  # its peer in the fabric namespace
    pod_cidr6: str | None = None  # dual-stack fabrics only
    underlay_ip6: str | None = None


@dataclass
class PodNet:
    key: str
    netns: str
    ip: str
    node: NodeNet
    host_veth: str  # the node-side end of the pod's veth
    ports: tuple[tuple[int, str], ...]
    ip6: str | None = None  # dual-stack fabrics only
    server: ManagedProcess | None = None
    served: dict[str, Any] = field(default_factory=dict)  # what the server reported when ready


class Fabric:
    """One test-bed network: a fabric switch, node namespaces and pod namespaces.

    Thread-safe: pods may be added and removed concurrently (e.g. from
    ``asyncio.to_thread``). ``close()`` removes everything and is idempotent.
    """

    def __init__(self, prefix: str | None = None, workdir: Path | None = None,
                 python: str = sys.executable, pod_cidr: Callable[[int], str] = node_pod_cidr,
                 pod_cidr6: Callable[[int], str] | None = None) -> None:
        self.prefix = check_prefix(prefix) if prefix else new_prefix()
        self.pod_cidr = pod_cidr  # node index -> its pod CIDR (default 10.244.<i>.0/24)
        self.pod_cidr6 = pod_cidr6  # node index -> its IPv6 pod CIDR; None: IPv4 only
        self.fabric_netns = f"{self.prefix}-fab"
        self.python = python
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"netfence-{self.prefix}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.nodes: dict[int, NodeNet] = {}
        self.pods: dict[str, PodNet] = {}
        self._pod_seq = 0
        self._lock = threading.Lock()  # bookkeeping
        self._node_lock = threading.Lock()  # node wiring touches every node
        self._started = False
        self._closed = False

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fabric and nodes --------------------------------------------------

    def _ensure_fabric(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError(f"fabric {self.prefix} is closed")
        write_owner(self.prefix, self.workdir if self._own_workdir else None)
        self._started = True
        add_netns(self.fabric_netns)
        ip_batch(self.fabric_netns, [
            "link set lo up",
            # no multicast snooping: IPv6 neighbour discovery floods like ARP broadcasts
            f"link add {BRIDGE} type bridge" + (" mcast_snooping 0" if self.pod_cidr6 else ""),
            f"link set {BRIDGE} up",
        ])

    def add_node(self, index: int) -> NodeNet:
        if not 0 <= index <= MAX_NODE_INDEX:
            raise ValueError(f"node index {index} out of range 0..{MAX_NODE_INDEX}")
        with self._node_lock:
            if index in self.nodes:
                raise ValueError(f"node {index} already exists in fabric {self.prefix}")
            self._ensure_fabric()
            node = NodeNet(index=index, netns=f"{self.prefix}-n{index}", underlay_ip=node_underlay_ip(index),
                           pod_cidr=self.pod_cidr(index),
                           fabric_veth=check_ifname(f"{self.prefix}f{index}"),
                           pod_cidr6=self.pod_cidr6(index) if self.pod_cidr6 else None,
                           underlay_ip6=node_underlay_ip6(index) if self.pod_cidr6 else None)
            add_netns(node.netns)
            try:
                set_sysctls(node.netns, {
                    "net.ipv4.ip_forward": 1,
                    "net.ipv4.conf.all.rp_filter": 0,
                    "net.ipv4.conf.default.rp_filter": 0,
                    **({"net.ipv6.conf.all.forwarding": 1, **NO_DAD} if node.pod_cidr6 else {}),
                })
                ip_batch(self.fabric_netns, [
                    f"link add {node.fabric_veth} type veth peer name {UNDERLAY_IF} netns {node.netns}",
                    f"link set {node.fabric_veth} master {BRIDGE} up",
                ])
                routes = [f"route add {o.pod_cidr} via {o.underlay_ip} dev {UNDERLAY_IF}"
                          for o in self.nodes.values()]
                ip_batch(node.netns, [
                    "link set lo up",
                    f"addr add {node.underlay_ip}/24 dev {UNDERLAY_IF}",
                    f"link set {UNDERLAY_IF} up",
                    f"route add default via {DEAD_GATEWAY} dev {UNDERLAY_IF}",
                    *routes,
                    *self._node_routes6(node),
                ])
                back = [f"route add {node.pod_cidr} via {node.underlay_ip} dev {UNDERLAY_IF}"]
                if node.pod_cidr6:
                    back.append(f"route add {node.pod_cidr6} via {node.underlay_ip6} dev {UNDERLAY_IF}")
                for other in self.nodes.values():
                    ip_batch(other.netns, back)
            except BaseException:
                with contextlib.suppress(NetnsError):
                    run(["ip", "-n", self.fabric_netns, "link", "del", node.fabric_veth])
                delete_netns(node.netns)
                raise
            self.nodes[index] = node
            log.debug("fabric %s: node %d up (%s)", self.prefix, index, node.netns)
            return node

    def _node_routes6(self, node: NodeNet) -> list[str]:
        """A dual-stack node's IPv6 underlay address and its routes to the other nodes' IPv6 pod CIDRs."""
        if not node.pod_cidr6:
            return []
        return [
            f"addr add {node.underlay_ip6}/64 dev {UNDERLAY_IF} nodad",
            *(f"route add {o.pod_cidr6} via {o.underlay_ip6} dev {UNDERLAY_IF}" for o in self.nodes.values()),
        ]

    def node(self, index: int) -> NodeNet:
        return self.nodes[index]

    # -- pods --------------------------------------------------------------

    def add_pod(self, node: NodeNet | int, key: str, ip: str, ports: Sequence[tuple[int, str]],
                *, name: str | None = None, wait: bool = True, ip6: str | None = None) -> PodNet:
        """Create a pod namespace on ``node`` with address ``ip`` and start servers on ``ports``.

        ``ports`` are ``(port, "TCP"|"UDP"|"SCTP")``; the servers answer with
        ``name`` (default: ``key``) over every address of the pod. With ``wait``
        (default) this returns once every TCP/UDP port is bound; otherwise call
        :meth:`wait_ready`. ``ip6``: the pod's IPv6 address (dual-stack fabrics).
        """
        node = self.nodes[node] if isinstance(node, int) else node
        if ipaddress.ip_address(ip) not in ipaddress.ip_network(node.pod_cidr):
            raise ValueError(f"pod address {ip} is outside node {node.index}'s pod CIDR {node.pod_cidr}")
        if ip6 is not None and (node.pod_cidr6 is None
                                or ipaddress.ip_address(ip6) not in ipaddress.ip_network(node.pod_cidr6)):
            raise ValueError(f"pod address {ip6} is outside node {node.index}'s IPv6 pod CIDR {node.pod_cidr6}")
        norm = tuple((int(p), proto.upper()) for p, proto in ports)
        for _, proto in norm:
            if proto not in ("TCP", "UDP", "SCTP"):
                raise ValueError(f"unknown protocol {proto!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"fabric {self.prefix} is closed")
            if key in self.pods:
                raise ValueError(f"pod {key!r} already exists in fabric {self.prefix}")
            if any(p.ip == ip or (ip6 is not None and p.ip6 == ip6) for p in self.pods.values()):
                raise ValueError(f"address {ip} or {ip6} is already in use in fabric {self.prefix}")
            seq = self._pod_seq
            self._pod_seq += 1
            pod = PodNet(key=key, netns=f"{self.prefix}-p{seq}", ip=ip, node=node,
                         host_veth=check_ifname(f"{self.prefix}p{seq}"), ports=norm, ip6=ip6)
            self.pods[key] = pod
        try:
            self._wire_pod(pod)
            self._start_server(pod, name or key)
            if wait:
                self.wait_ready(pod)
        except BaseException:
            self.remove_pod(key)
            raise
        return pod

    def _wire_pod(self, pod: PodNet) -> None:
        node = pod.node
        add_netns(pod.netns)
        if pod.ip6:
            set_sysctls(pod.netns, NO_DAD)  # before eth0 exists: it inherits "default"
        ip_batch(node.netns, [f"link add {pod.host_veth} type veth peer name eth0 netns {pod.netns}"])
        set_sysctls(node.netns, {
            f"net.ipv4.conf.{pod.host_veth}.proxy_arp": 1,
            f"net.ipv4.neigh.{pod.host_veth}.proxy_delay": 0,
        })
        ip_batch(node.netns, [
            f"link set {pod.host_veth} up",
            f"route add {pod.ip}/32 dev {pod.host_veth}",
            *([f"addr add {POD_GATEWAY6}/64 dev {pod.host_veth} nodad",
               f"route add {pod.ip6}/128 dev {pod.host_veth}"] if pod.ip6 else []),
        ])
        ip_batch(pod.netns, [
            "link set lo up",
            f"addr add {pod.ip}/32 dev eth0",
            "link set eth0 up",
            f"route add {POD_GATEWAY} dev eth0 scope link",
            f"route add default via {POD_GATEWAY} dev eth0",
            *([f"addr add {pod.ip6}/128 dev eth0 nodad",
               f"route add ::/0 via {POD_GATEWAY6} dev eth0"] if pod.ip6 else []),
        ])

    def _ready_file(self, pod: PodNet) -> Path:
        return self.workdir / f"{pod.netns}.ready"

    def _start_server(self, pod: PodNet, name: str) -> None:
        argv = ["ip", "netns", "exec", pod.netns, self.python, "-m", PODSERVER_MODULE,
                "--name", name, "--run", self.prefix, "--ready-file", str(self._ready_file(pod))]
        for port, proto in pod.ports:
            argv += [f"--{proto.lower()}", str(port)]
        pod.server = ManagedProcess(f"podserver {pod.key}", argv, self.workdir / f"{pod.netns}.log")
        pod.server.start()

    def wait_ready(self, pod: PodNet | str, timeout: float = READY_TIMEOUT) -> PodNet:
        """Block until the pod's server has bound all its ports."""
        pod = self.pods[pod] if isinstance(pod, str) else pod
        if pod.server is None:
            raise RuntimeError(f"pod {pod.key} has no server")
        ready = self._ready_file(pod)
        deadline = time.monotonic() + timeout
        while not ready.exists():  # poll briefly: pod start-up time adds up over a scenario
            if not pod.server.alive():
                raise StartupError(f"pod server of {pod.key} exited during start-up:\n{pod.server.tail()}")
            if time.monotonic() > deadline:
                raise StartupError(f"pod server of {pod.key} not ready within {timeout:.0f}s "
                                   f"(see {pod.server.log_path})")
            time.sleep(READY_POLL)
        pod.served = json.loads(ready.read_text())
        return pod

    def remove_pod(self, key: str) -> None:
        """Stop the pod's server and delete its namespace (and so its veth). Unknown keys are ignored."""
        with self._lock:
            pod = self.pods.pop(key, None)
        if pod is None:
            return
        if pod.server is not None:
            pod.server.stop(grace=5.0)
        with contextlib.suppress(NetnsError):
            run(["ip", "-n", pod.node.netns, "link", "del", pod.host_veth])
        delete_netns(pod.netns)
        with contextlib.suppress(FileNotFoundError):
            self._ready_file(pod).unlink()

    # -- teardown and checks -----------------------------------------------

    def close(self) -> None:
        """Remove servers, pods, nodes and the fabric. Idempotent; also cleans up after partial failures."""
        with self._lock:
            self._closed = True
            pods = list(self.pods.values())
        for pod in pods:  # let all servers exit at once, then reap them one by one
            if pod.server is not None:
                pod.server.signal(signal.SIGTERM)
        errors: list[BaseException] = []
        for pod in pods:
            try:
                self.remove_pod(pod.key)
            except Exception as exc:
                errors.append(exc)
        try:
            remove_run(self.prefix)  # nodes, fabric, owner record, anything a crash left
        except Exception as exc:
            errors.append(exc)
        self.nodes.clear()
        self._started = False
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise NetnsError(f"fabric {self.prefix}: clean-up errors: {errors}")

    def leftovers(self) -> list[str]:
        """Namespaces and processes of this run that still exist (empty after ``close()``)."""
        found = [f"netns {n}" for n in run_netns(self.prefix)]
        found += [f"process {pid} (podserver)" for pid in podserver_pids(self.prefix)]
        if owner_path(self.prefix).exists():
            found.append(f"owner record {owner_path(self.prefix)}")
        return found
