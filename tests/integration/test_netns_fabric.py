"""The namespace fabric: nodes and pods as network namespaces, their servers, probes and clean-up."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from netfence_lab.fabric import DEAD_GATEWAY, Fabric, PodNet, cleanup_stale
from netfence_lab.netns import list_netns, netns_exists
from netfence_lab.probe import Probe, Prober
from netfence_lab.runs import owner_path, podserver_pids

pytestmark = pytest.mark.netns

PORTS = [(80, "TCP"), (80, "UDP"), (132, "SCTP")]
# Destinations outside every test namespace. 192.0.2.0/24 (TEST-NET-1) is deliberately absent:
# on these machines the host's own eth0 lives there.
OUTSIDE = [DEAD_GATEWAY, "198.51.100.1", "203.0.113.1", "8.8.8.8"]


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def fabric2x3() -> Iterator[tuple[Fabric, list[PodNet]]]:
    fabric = Fabric()
    try:
        for i in range(2):
            fabric.add_node(i)
        pods = [fabric.add_pod(i, f"x/p{i}{k}", f"10.244.{i}.{10 + k}", PORTS)
                for i in range(2) for k in range(3)]
        yield fabric, pods
    finally:
        fabric.close()
    assert fabric.leftovers() == []


def test_every_pod_reaches_every_other_pod_tcp_and_udp(fabric2x3: tuple[Fabric, list[PodNet]],
                                                       prober: Prober) -> None:
    _, pods = fabric2x3
    probes = [Probe(a.netns, b.ip, 80, proto)
              for a in pods for b in pods if a is not b for proto in ("TCP", "UDP")]
    assert len(probes) == 60  # 6 pods x 5 peers x 2 protocols, same node and across nodes
    results = prober.probe_many(probes)
    assert [p for p, ok in results.items() if ok is not True] == []

    # and the answer comes from the right pod
    by_ip = {p.ip: p.key for p in pods}
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(prober.exchange, probes))
    assert [(p, r) for p, r in zip(probes, replies, strict=True) if r != by_ip[p.dst_ip]] == []


def test_nothing_outside_the_test_namespaces_is_reachable(fabric2x3: tuple[Fabric, list[PodNet]],
                                                          prober: Prober) -> None:
    fabric, pods = fabric2x3
    host_nets = [ipaddress.ip_interface(a["local"] + "/" + str(a["prefixlen"])).network
                 for link in json.loads(run("ip", "-j", "addr")) for a in link.get("addr_info", [])]
    for dst in OUTSIDE:  # never probe anything that could be on the host
        assert not any(ipaddress.ip_address(dst) in net for net in host_nets if net.version == 4), dst

    unused_pod_ip = "10.244.1.200"
    probes = [Probe(src.netns, dst, port, proto)
              for src in (pods[0], pods[3]) for dst in [*OUTSIDE, unused_pod_ip]
              for port, proto in ((80, "TCP"), (80, "UDP"))]
    start = time.monotonic()
    results = prober.probe_many(probes, timeout=1.0)
    assert [p for p, ok in results.items() if ok is not False] == []
    assert time.monotonic() - start < 3.0  # all in parallel, each bounded by the 1 s timeout

    # anything that is not a pod leaves a node only toward the dead gateway, inside the fabric
    for node in fabric.nodes.values():
        assert f"via {DEAD_GATEWAY} dev ul0" in run("ip", "-n", node.netns, "route", "get", "8.8.8.8")
    # and no namespace of ours has any interface but its own wiring (so no way to the host)
    allowed = {"lo", "ul0", "eth0", "br0"}
    for ns in [fabric.fabric_netns, *(n.netns for n in fabric.nodes.values()), *(p.netns for p in pods)]:
        links = run("ip", "-n", ns, "-o", "link").splitlines()
        names = {line.split(":")[1].strip().split("@")[0] for line in links}
        assert {n for n in names if n not in allowed and not n.startswith(fabric.prefix)} == set(), ns


def test_sctp_is_reported_skipped_not_passed(fabric2x3: tuple[Fabric, list[PodNet]], prober: Prober) -> None:
    _, pods = fabric2x3
    assert prober.probe_sctp(pods[0].netns, pods[4].ip, 132) is None
    assert prober.probe_many([Probe(pods[0].netns, pods[4].ip, 132, "SCTP")]) == {
        Probe(pods[0].netns, pods[4].ip, 132, "SCTP"): None}
    assert pods[4].served["sctp_skipped"] == [132]
    assert pods[4].served["tcp"] == [80] and pods[4].served["udp"] == [80]


def test_node_and_pod_wiring(fabric2x3: tuple[Fabric, list[PodNet]]) -> None:
    _, pods = fabric2x3
    pod = pods[1]
    node = pod.node
    assert run("ip", "netns", "exec", node.netns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    conf = f"net.ipv4.conf.{pod.host_veth}.proxy_arp"
    assert run("ip", "netns", "exec", node.netns, "sysctl", "-n", conf).strip() == "1"
    routes = run("ip", "-n", node.netns, "route")
    assert f"{pod.ip} dev {pod.host_veth}" in routes
    assert "10.244.1.0/24 via 10.243.0.2 dev ul0" in routes
    assert f"default via {DEAD_GATEWAY} dev ul0" in routes
    pod_routes = run("ip", "-n", pod.netns, "route")
    assert "default via 169.254.1.1 dev eth0" in pod_routes
    assert "169.254.1.1 dev eth0 scope link" in pod_routes
    assert f"inet {pod.ip}/32" in run("ip", "-n", pod.netns, "-o", "addr", "show", "dev", "eth0")


def test_remove_pod_and_add_another(make_fabric: Callable[[], Fabric], prober: Prober) -> None:
    fabric = make_fabric()
    fabric.add_node(0)
    fabric.add_node(1)
    a = fabric.add_pod(0, "x/a", "10.244.0.10", [(80, "TCP")])
    b = fabric.add_pod(1, "x/b", "10.244.1.10", [(80, "TCP")])
    assert prober.probe_tcp(a.netns, b.ip, 80)
    assert b.server is not None
    server_pid = b.server.pid
    fabric.remove_pod("x/b")
    assert not netns_exists(b.netns)
    assert server_pid not in podserver_pids(fabric.prefix)
    assert b.host_veth not in run("ip", "-n", b.node.netns, "-o", "link")
    assert not prober.probe_tcp(a.netns, b.ip, 80)
    fabric.remove_pod("x/b")  # unknown keys are ignored
    c = fabric.add_pod(1, "x/c", "10.244.1.11", [(80, "TCP")])
    assert prober.exchange(Probe(a.netns, c.ip, 80)) == "x/c"
    with pytest.raises(ValueError, match="outside"):
        fabric.add_pod(1, "x/d", "10.244.0.99", [(80, "TCP")])
    with pytest.raises(ValueError, match="already exists"):
        fabric.add_pod(1, "x/c", "10.244.1.12", [(80, "TCP")])


def test_close_removes_everything_and_leaves_the_host_alone(
        make_fabric: Callable[[], Fabric], prober: Prober, host_network_snapshot: Callable[[], str]) -> None:
    before = host_network_snapshot()
    fabric = make_fabric()
    for i in range(2):
        fabric.add_node(i)
    pods = [fabric.add_pod(i, f"x/p{i}", f"10.244.{i}.10", [(80, "TCP"), (81, "UDP")]) for i in range(2)]
    assert prober.probe_udp(pods[0].netns, pods[1].ip, 81)
    assert len(fabric.leftovers()) == 1 + 2 + 2 + 2 + 1  # fabric, nodes, pods, servers, owner record
    fabric.close()
    fabric.close()  # idempotent
    assert fabric.leftovers() == []
    assert not [n for n in list_netns() if n.startswith(fabric.prefix + "-")]
    assert podserver_pids(fabric.prefix) == {}
    assert not fabric.workdir.exists()
    assert host_network_snapshot() == before


CRASHING_RUN = """
import os, sys
from netfence_lab.fabric import Fabric
f = Fabric(prefix=sys.argv[1])
f.add_node(0)
f.add_pod(0, "x/a", "10.244.0.10", [(80, "TCP")])
os._exit(0)  # crash: no close()
"""


def test_cleanup_stale_removes_runs_of_dead_processes_only(make_fabric: Callable[[], Fabric]) -> None:
    live = make_fabric()
    live.add_node(0)
    crashed = "nfd" + os.urandom(2).hex()[:3]
    subprocess.run([sys.executable, "-c", CRASHING_RUN, crashed], check=True, timeout=60)
    assert {f"{crashed}-fab", f"{crashed}-n0", f"{crashed}-p0"} <= set(list_netns())
    assert len(podserver_pids(crashed)) == 1  # the orphaned server still runs
    scratch = json.loads(owner_path(crashed).read_text())["scratch"]
    assert os.path.isdir(scratch)

    removed = cleanup_stale(r"nf[0-9a-f]{4}")
    assert crashed in removed and live.prefix not in removed
    assert not [n for n in list_netns() if n.startswith(crashed + "-")]
    assert podserver_pids(crashed) == {}
    assert not owner_path(crashed).exists()
    assert not os.path.exists(scratch)
    assert netns_exists(live.fabric_netns)  # a live run is never touched
