"""A tiny namespace topology for dataplane tests: one node, a few routed pods.

Everything lives in network namespaces named ``nftest-<random>-*`` that this
module creates and always deletes; nothing is configured in, or sent from, the
host's namespace. Sockets are opened inside a namespace by a short-lived thread
that ``setns()``es into it (the network namespace is per thread), so probes
need no subprocesses.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def sh(*argv: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_ns(netns: str, *argv: str, input: str | None = None, check: bool = True) -> str:
    return sh("ip", "netns", "exec", netns, *argv, input=input, check=check)


def socket_in(netns: str, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A socket that belongs to ``netns``."""
    box: dict[str, object] = {}

    def target() -> None:
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            box["sock"] = socket.socket(family, kind)
        except BaseException as exc:
            box["err"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock


@dataclass
class Pod:
    name: str
    netns: str
    ip4: str
    ip6: str
    node_if: str


@dataclass
class Servers:
    """TCP and UDP echo servers (dual-stack) on some ports of one namespace."""

    netns: str
    ports: tuple[int, ...]
    reply: bytes
    sockets: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        for port in self.ports:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket_in(self.netns, socket.AF_INET6, kind)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::", port))
                s.settimeout(0.2)
                if kind == socket.SOCK_STREAM:
                    s.listen(64)
                self.sockets.append(s)
                t = threading.Thread(target=self._serve, args=(s, kind), daemon=True)
                t.start()
                self.threads.append(t)

    def _serve(self, s: socket.socket, kind: socket.SocketKind) -> None:
        while not self.stop.is_set():
            try:
                if kind == socket.SOCK_STREAM:
                    conn, _ = s.accept()
                    with conn:
                        conn.settimeout(1.0)
                        conn.recv(64)
                        conn.sendall(self.reply)
                else:
                    _, peer = s.recvfrom(64)
                    s.sendto(self.reply, peer)
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2)
        for s in self.sockets:
            s.close()


def tcp_ok(netns: str, dst: str, port: int, timeout: float = 0.7) -> bool:
    """True when a TCP connection from ``netns`` to dst:port gets the echo back."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket_in(netns, family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
            s.sendall(b"hello")
            return bool(s.recv(64))
        except (TimeoutError, ConnectionError):
            return False


def udp_ok(netns: str, dst: str, port: int, timeout: float = 0.7) -> bool:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket_in(netns, family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"hello", (dst, port))
            return bool(s.recv(64))
        except (TimeoutError, ConnectionError):
            return False


class Topology:
    """``node`` (forwarding, proxy ARP) with ``pods`` on routed veths and a dead-end underlay."""

    def __init__(self, pod_names: list[str], ports: tuple[int, ...] = (80, 81)) -> None:
        self.prefix = "nftest-" + secrets.token_hex(3)
        self.node = f"{self.prefix}-node"
        self.underlay = f"{self.prefix}-ul"
        self.pods: dict[str, Pod] = {}
        self.servers: list[Servers] = []
        self._created: list[str] = []
        try:
            self._build(pod_names, ports)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self._created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self, pod_names: list[str], ports: tuple[int, ...]) -> None:
        node, ul = self.node, self.underlay
        self._add_ns(node)
        self._add_ns(ul)
        in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # underlay: the default route points at an address that does not exist, so the node
        # has a route covering 169.254.1.1 (proxy ARP answers) and anything else dies here.
        sh("ip", "-n", node, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", ul)
        sh("ip", "-n", node, "addr", "add", "192.168.255.1/24", "dev", "ul0")
        sh("ip", "-n", node, "addr", "add", "fd99::1/64", "dev", "ul0", "nodad")
        sh("ip", "-n", ul, "addr", "add", "192.168.255.2/24", "dev", "ul0")
        sh("ip", "-n", node, "link", "set", "ul0", "up")
        sh("ip", "-n", ul, "link", "set", "ul0", "up")
        sh("ip", "-n", node, "route", "add", "default", "via", "192.168.255.254")
        sh("ip", "-n", node, "-6", "route", "add", "default", "via", "fd99::fe", "dev", "ul0")
        for i, name in enumerate(pod_names):
            self._add_pod(i, name)
        for pod in self.pods.values():
            servers = Servers(pod.netns, ports, pod.name.encode())
            self.servers.append(servers)
            servers.start()

    def _add_pod(self, i: int, name: str) -> None:
        node, netns, veth = self.node, f"{self.prefix}-{name}", f"nfv{i}"
        pod = Pod(name, netns, f"10.244.0.{10 + i}", f"fd00::{10 + i:x}", veth)
        self._add_ns(netns)
        sh("ip", "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        for ns, dev in ((node, veth), (netns, "eth0")):
            in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")
        in_ns(node, "sysctl", "-qw", f"net.ipv4.conf.{veth}.proxy_arp=1", f"net.ipv4.neigh.{veth}.proxy_delay=0")
        sh("ip", "-n", node, "addr", "add", "fe80::1/64", "dev", veth, "nodad")
        sh("ip", "-n", node, "link", "set", veth, "up")
        sh("ip", "-n", node, "route", "add", f"{pod.ip4}/32", "dev", veth)
        sh("ip", "-n", node, "-6", "route", "add", f"{pod.ip6}/128", "dev", veth)
        sh("ip", "-n", netns, "addr", "add", f"{pod.ip4}/32", "dev", "eth0")
        sh("ip", "-n", netns, "addr", "add", f"{pod.ip6}/128", "dev", "eth0", "nodad")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        sh("ip", "-n", netns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        sh("ip", "-n", netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        self.pods[name] = pod

    def node_sh(self, *argv: str, input: str | None = None, check: bool = True) -> str:
        return in_ns(self.node, *argv, input=input, check=check)

    def reset_netfilter(self) -> None:
        """Empty the node's filter tables and ipsets (our test node only)."""
        for tool in ("iptables", "ip6tables"):
            self.node_sh(tool, "-w", "-F")
            self.node_sh(tool, "-w", "-X")
        self.node_sh("ipset", "destroy")
        self.node_sh("conntrack", "-F", check=False)

    def close(self) -> None:
        for servers in self.servers:
            servers.close()
        for name in reversed(self._created):
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", name)
        self._created.clear()

    def leftovers(self) -> list[str]:
        existing = sh("ip", "netns", "list")
        return [ln.split()[0] for ln in existing.splitlines() if ln.startswith(self.prefix)]
