"""Flows that exist when a policy starts denying them, against a real kernel.

The contract (docs/design.md, "Established flows"): an established TCP connection
outlives a policy that denies it, new connections are refused; a UDP flow is
checked datagram by datagram in its original direction, so it stops the moment
the deny is committed, while replies of allowed flows (and ICMP errors about
them) keep passing even when the reverse direction is isolated. And the
conformance runner's probes never reuse a live flow (``testbed/ports.py``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from dataplane_topology import Topology, socket_in, tcp_ok

from netfence.dataplane.apply import Dataplane
from netfence.dataplane.names import endpoint_chain
from netfence.dataplane.render import ESTABLISHED_RETURN, render
from netfence.dataplane.ruleset import FORWARD_CHAIN, Ruleset
from netfence.dataplane.runner import SubprocessRunner
from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint, NodeModel, PeerSet
from netfence_lab.ports import SourcePorts
from netfence_lab.probe import Probe, Prober

pytestmark = pytest.mark.netns

A4, B4, C4 = "10.244.0.10", "10.244.0.11", "10.244.0.12"
A6, B6, C6 = "fd00::a", "fd00::b", "fd00::c"
IPS = {"a": (A4, A6), "b": (B4, B6), "c": (C4, C6)}
TCP_PORT, UDP_PORT, CLOSED_UDP_PORT = 90, 91, 93  # a: persistent TCP echo; UDP echo (topology); nothing
OLD_BASE_RULE = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"  # before: every established flow


# ---- topology, servers, models -------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology(["a", "b", "c"], ports=(80, UDP_PORT))
    try:
        yield t
    finally:
        t.close()
    assert t.leftovers() == []


@pytest.fixture
def node(topo: Topology) -> Iterator[Topology]:
    topo.reset_netfilter()  # also flushes conntrack
    yield topo
    topo.reset_netfilter()


@pytest.fixture
def dp(node: Topology) -> Dataplane:
    return Dataplane(SubprocessRunner(node.node), ipv6=True)


class StreamEcho:
    """A TCP echo server in ``netns`` (dual-stack) that keeps each connection open until the client closes."""

    def __init__(self, netns: str, port: int) -> None:
        self.listener = socket_in(netns, socket.AF_INET6, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("::", port))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    data = conn.recv(64)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2)
        self.listener.close()


@pytest.fixture(scope="module")
def stream_echo(topo: Topology) -> Iterator[StreamEcho]:
    server = StreamEcho(topo.pods["a"].netns, TCP_PORT)
    try:
        yield server
    finally:
        server.close()


def clients(*names: str) -> PeerSet:
    """The peer set a's ingress policy allows (same id whatever the members: only membership changes)."""
    members = sorted(ip for n in names for ip in IPS[n])
    return PeerSet(PeerSet.make_id("pods", {"n": "clients"}), "pods", {"n": "clients"}, tuple(members))


def a_model(*allowed: str) -> NodeModel:
    """a accepts TCP 90 and UDP 91/93 from ``allowed``; a may start nothing (egress deny-all), so
    everything a sends back to its clients passes only as a reply."""
    peers = clients(*allowed)
    ports = (CompiledPort("TCP", TCP_PORT), CompiledPort("UDP", UDP_PORT), CompiledPort("UDP", CLOSED_UDP_PORT))
    ingress = CompiledPolicy("default", "clients", "u1", (CompiledRule((peers.id,), ports),), None)
    no_egress = CompiledPolicy("default", "no-egress", "u2", None, ())
    eps = {f"default/{p}": Endpoint("node", "default", p, ips, (), ()) for p, ips in IPS.items()}
    eps["default/a"] = Endpoint("node", "default", "a", IPS["a"], ("default/clients",), ("default/no-egress",))
    return NodeModel("node", eps, {p.key: p for p in (ingress, no_egress)}, {peers.id: peers})


def with_old_base_chain(rs: Ruleset) -> Ruleset:
    """``rs`` with the base chain of earlier versions (every established flow returns, UDP too)."""
    chains = {
        fam: {**c, FORWARD_CHAIN: (OLD_BASE_RULE, *c[FORWARD_CHAIN][len(ESTABLISHED_RETURN):])}
        for fam, c in rs.chains.items()
    }
    return Ruleset(sets=rs.sets, chains=chains)


# ---- probes and kernel reads ------------------------------------------------------


def family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


@contextlib.contextmanager
def connected(topo: Topology, src: str, dst: str, port: int, kind: socket.SocketKind) -> Iterator[socket.socket]:
    sock = socket_in(topo.pods[src].netns, family(dst), kind)
    with sock:
        sock.settimeout(1.0)
        sock.connect((dst, port))
        yield sock


def echoes(sock: socket.socket, payload: bytes, timeout: float = 1.0) -> bool:
    """True when ``payload`` comes back on ``sock`` within ``timeout`` (TCP or connected UDP)."""
    sock.settimeout(timeout)
    try:
        sock.send(payload)
        reply = sock.recv(64)
    except (TimeoutError, ConnectionError):
        return False
    # the topology's UDP servers answer with the pod name, the stream echo with the payload
    return reply in (payload, b"a")


def drops(topo: Topology, chain: str, tool: str = "iptables") -> int:
    listing = topo.node_sh(tool, "-w", "-L", chain, "-v", "-x", "-n")
    (line,) = [ln for ln in listing.splitlines() if " DROP " in ln and "denied" in ln]
    return int(line.split()[0])


def udp_entries(topo: Topology, src: str, dst: str, dport: int) -> list[str]:
    """The node's conntrack entries of UDP flows src -> dst:dport (original direction)."""
    out = topo.node_sh(
        "conntrack", "-L", "-f", "ipv6" if ":" in dst else "ipv4", "-p", "udp",
        "--orig-src", src, "--orig-dst", dst, "--dport", str(dport),
    )
    return [ln for ln in out.splitlines() if "udp" in ln.split()[:3]]


def source_ports(entries: list[str]) -> list[int]:
    return [int(ln.split("sport=", 1)[1].split()[0]) for ln in entries]


# ---- the base chain ------------------------------------------------------------------


def test_kernel_spells_the_base_chain_as_rendered_and_old_agents_are_upgraded(node: Topology, dp: Dataplane) -> None:
    """iptables-save prints the new base rules back identically (drift checks compare strings), and an
    agent that finds the old base chain rewrites it: by a delta, and by the full sync after a restart."""
    new = render(a_model("b", "c"))
    old = with_old_base_chain(new)
    dp.apply(old)
    for tool in ("iptables", "ip6tables"):
        assert node.node_sh(tool, "-w", "-S", FORWARD_CHAIN).splitlines()[1] == f"-A {FORWARD_CHAIN} {OLD_BASE_RULE}"
    assert not dp.apply(new).full  # delta: the changed base chain is rewritten like any other
    want = [f"-A {FORWARD_CHAIN} {r}" for r in new.family_chains("v4")[FORWARD_CHAIN]]
    assert want[:2] == [f"-A {FORWARD_CHAIN} {r}" for r in ESTABLISHED_RETURN]
    for tool in ("iptables", "ip6tables"):
        assert node.node_sh(tool, "-w", "-S", FORWARD_CHAIN).splitlines()[1:] == want
    assert not dp.check_drift()

    dp.apply(old)
    restarted = Dataplane(SubprocessRunner(node.node), ipv6=True)  # an upgraded agent starting
    assert restarted.apply(new).full
    for tool in ("iptables", "ip6tables"):
        assert node.node_sh(tool, "-w", "-S", FORWARD_CHAIN).splitlines()[1:] == want
    assert not restarted.check_drift()


# ---- established flows -------------------------------------------------------------------


@pytest.mark.parametrize("dst", [A4, A6])
def test_established_tcp_connection_survives_a_deny_and_new_ones_are_refused(
    node: Topology, dp: Dataplane, stream_echo: StreamEcho, dst: str
) -> None:
    dp.apply(render(a_model("b", "c")))
    with connected(node, "c", dst, TCP_PORT, socket.SOCK_STREAM) as conn:
        assert echoes(conn, b"before")
        dp.apply(render(a_model("b")))  # c may no longer connect to a
        assert echoes(conn, b"after")  # kept, as Calico does (replies pass although a may start nothing)
        assert echoes(conn, b"again")
    assert not tcp_ok(node.pods["c"].netns, dst, TCP_PORT)  # a new connection is refused
    assert tcp_ok(node.pods["b"].netns, dst, TCP_PORT)


@pytest.mark.parametrize(("dst", "tool"), [(A4, "iptables"), (A6, "ip6tables")])
def test_live_udp_flow_stops_at_the_deny_while_allowed_flows_keep_their_replies(
    node: Topology, dp: Dataplane, dst: str, tool: str
) -> None:
    dp.apply(render(a_model("b", "c")))
    chain = endpoint_chain("ingress", "default/a")
    with (
        connected(node, "c", dst, UDP_PORT, socket.SOCK_DGRAM) as from_c,
        connected(node, "b", dst, UDP_PORT, socket.SOCK_DGRAM) as from_b,
    ):
        assert echoes(from_c, b"1") and echoes(from_b, b"1")
        c_ip = IPS["c"][1 if ":" in dst else 0]
        before = drops(node, chain, tool)

        dp.apply(render(a_model("b")))  # c is denied from now on; its flow's conntrack entry is alive
        assert not echoes(from_c, b"2", timeout=0.5)  # the very next datagram is dropped by the policy
        assert drops(node, chain, tool) == before + 1
        assert udp_entries(node, c_ip, dst, UDP_PORT), "the entry is alive: the rule stopped the flow"
        assert echoes(from_b, b"2")  # allowed: original direction re-checked and passes, the reply returns
        assert echoes(from_b, b"3")
        assert drops(node, chain, tool) == before + 1


@pytest.mark.parametrize("dst", [A4, A6])
def test_icmp_errors_about_allowed_udp_flows_still_reach_the_client(node: Topology, dp: Dataplane, dst: str) -> None:
    """An ICMP(v6) port-unreachable is RELATED to the UDP flow and is not UDP: it returns like a
    reply, although a (which sends it) may start nothing."""
    dp.apply(render(a_model("b")))
    with connected(node, "b", dst, CLOSED_UDP_PORT, socket.SOCK_DGRAM) as sock:
        sock.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(64)
    with connected(node, "c", dst, CLOSED_UDP_PORT, socket.SOCK_DGRAM) as sock:  # denied: no error, silence
        sock.send(b"anyone?")
        with pytest.raises(TimeoutError):
            sock.settimeout(0.5)
            sock.recv(64)


# ---- the runner's probes never reuse a flow ------------------------------------------------


def udp_probe(prober: Prober, topo: Topology, src: str) -> bool:
    return prober.probe(Probe(topo.pods[src].netns, A4, UDP_PORT, "UDP")) is True


def forced_reuse() -> SourcePorts:
    """Source ports that reuse one port at once: the collision the kernel's random choice made now and then."""
    return SourcePorts(40000, 40000, quarantine=0)


def test_a_reused_udp_5_tuple_passed_a_deny_with_the_old_base_chain(node: Topology, dp: Dataplane) -> None:
    """The defect, reproduced (so the tests below show a fix, not luck): two probes with one 5-tuple
    across a step that starts denying; the second returned through RELATED,ESTABLISHED."""
    prober = Prober(source_ports=forced_reuse())
    dp.apply(with_old_base_chain(render(a_model("b", "c"))))
    assert udp_probe(prober, node, "c")
    dp.apply(with_old_base_chain(render(a_model("b"))))
    assert udp_probe(prober, node, "c"), "the old base chain let the reused flow through"
    assert source_ports(udp_entries(node, C4, A4, UDP_PORT)) == [40000]


def test_the_runner_s_source_ports_give_every_probe_a_new_flow(node: Topology, dp: Dataplane) -> None:
    """Fix 1, the runner: a per-run allocator never reuses a port within the conntrack lifetime, so
    the deny holds even on a dataplane with the old base chain."""
    prober = Prober(source_ports=SourcePorts.for_run(reserved={UDP_PORT}))
    dp.apply(with_old_base_chain(render(a_model("b", "c"))))
    assert udp_probe(prober, node, "c")
    dp.apply(with_old_base_chain(render(a_model("b"))))
    assert not udp_probe(prober, node, "c")
    assert udp_probe(prober, node, "b")
    ports = source_ports(udp_entries(node, C4, A4, UDP_PORT)) + source_ports(udp_entries(node, B4, A4, UDP_PORT))
    assert len(ports) == len(set(ports)) == 2  # the denied probe left no entry; the others differ


def test_the_new_base_chain_denies_even_a_reused_udp_5_tuple(node: Topology, dp: Dataplane) -> None:
    """Fix 2, the dataplane: original-direction UDP is always checked against the current policy."""
    prober = Prober(source_ports=forced_reuse())
    dp.apply(render(a_model("b", "c")))
    assert udp_probe(prober, node, "c")
    dp.apply(render(a_model("b")))
    assert source_ports(udp_entries(node, C4, A4, UDP_PORT)) == [40000]  # the old flow is alive
    assert not udp_probe(prober, node, "c")
