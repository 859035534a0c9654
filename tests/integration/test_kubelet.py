"""The test-bed kubelet against the real API server: Nodes, Pods, addresses, pod namespaces."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import new_client_from_config

from netfence_lab.fabric import Fabric, node_pod_cidr6
from netfence_lab.kubelet import Kubelet, pod_ip, port_name
from netfence_lab.netns import netns_exists
from netfence_lab.probe import Probe, Prober

pytestmark = [pytest.mark.integration, pytest.mark.netns]

log = logging.getLogger(__name__)
E2E_PORTS = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")]


@pytest.fixture
async def api(cluster: Any) -> AsyncIterator[ApiClient]:
    client = await new_client_from_config(config_file=str(cluster.kubeconfig))
    async with client:
        yield client


@pytest.fixture
async def kubelet(api: ApiClient) -> AsyncIterator[Kubelet]:
    fabric = Fabric()
    kl = Kubelet(api, fabric)
    try:
        yield kl
    finally:
        try:
            await kl.close()
        finally:
            fabric.close()
        assert fabric.leftovers() == []


async def test_nodes_are_registered_ready_with_pod_cidr(kubelet: Kubelet, api: ApiClient) -> None:
    assert await kubelet.add_node(0) == "node-0"
    assert await kubelet.add_node(1) == "node-1"
    core = CoreV1Api(api)
    for i in range(2):
        node = await core.read_node(f"node-{i}")
        assert node.spec.pod_cidr == f"10.244.{i}.0/24"
        assert {(a.type, a.address) for a in node.status.addresses} >= {("InternalIP", f"10.243.0.{i + 1}")}
        ready = [c.status for c in node.status.conditions if c.type == "Ready"]
        assert ready == ["True"]


async def test_pods_objects_addresses_and_connectivity(kubelet: Kubelet, api: ApiClient) -> None:
    core = CoreV1Api(api)
    for i in range(2):
        await kubelet.add_node(i)
    await kubelet.ensure_namespace("x", {"ns": "x"})
    await kubelet.ensure_namespace("x", {"team": "blue"})  # exists: labels merge
    ns = await core.read_namespace("x")
    assert ns.metadata.labels["ns"] == "x" and ns.metadata.labels["team"] == "blue"

    a = await kubelet.create_pod("x", "a", {"pod": "a"}, [(80, "TCP"), (53, "UDP"), (132, "SCTP")], 0)
    b = await kubelet.create_pod("x", "b", {"pod": "b"}, [(80, "TCP")], 1)
    c = await kubelet.create_pod("x", "c", {"pod": "c"}, [(80, "TCP")], 0)
    assert (a.ip, b.ip, c.ip) == ("10.244.0.10", "10.244.1.10", "10.244.0.11")
    assert (a.node, b.node, c.node) == ("node-0", "node-1", "node-0")

    pod = await core.read_namespaced_pod("a", "x")
    assert pod.spec.node_name == "node-0"
    assert pod.metadata.labels == {"pod": "a"}
    [container] = pod.spec.containers
    assert container.name == "app"
    assert [(p.name, p.container_port, p.protocol) for p in container.ports] == [
        ("serve-80-tcp", 80, "TCP"), ("serve-53-udp", 53, "UDP"), ("serve-132-sctp", 132, "SCTP")]
    assert pod.status.phase == "Running"
    assert pod.status.pod_ip == "10.244.0.10"
    assert [p.ip for p in pod.status.pod_ips] == ["10.244.0.10"]
    assert pod.status.host_ip == "10.243.0.1"
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"

    prober = Prober()
    assert prober.exchange(Probe(b.netns, a.ip, 80, "TCP")) == "x/a"
    assert prober.exchange(Probe(c.netns, a.ip, 53, "UDP")) == "x/a"
    assert prober.probe_sctp(b.netns, a.ip, 132) is None  # no SCTP in this kernel: skipped

    # deleting removes the object and the namespace; the address is never handed out again
    await kubelet.delete_pod("x", "c")
    assert not netns_exists(c.netns)
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod("c", "x")
    assert err.value.status == 404
    assert not prober.probe_tcp(a.netns, c.ip, 80)
    c2 = await kubelet.create_pod("x", "c", {"pod": "c"}, [(80, "TCP")], 0)
    assert c2.ip == "10.244.0.12"
    assert prober.exchange(Probe(b.netns, c2.ip, 80, "TCP")) == "x/c"


async def test_nine_pods_e2e_preset_timing(kubelet: Kubelet, api: ApiClient) -> None:
    """The e2e preset (3 namespaces x 3 pods, 4 ports each) on 2 nodes, round-robin: time it."""
    for i in range(2):
        await kubelet.add_node(i)
    for ns in ("x", "y", "z"):
        await kubelet.ensure_namespace(ns, {"ns": ns})
    order = [(ns, pod) for ns in ("x", "y", "z") for pod in ("a", "b", "c")]
    start = time.monotonic()
    handles = [await kubelet.create_pod(ns, pod, {"pod": pod}, E2E_PORTS, k % 2)
               for k, (ns, pod) in enumerate(order)]
    sequential = time.monotonic() - start
    log.warning("9 pods (e2e preset, 4 ports each), created one after another: %.2fs", sequential)
    # FORMAT.md: the k-th pod placed on node i gets 10.244.i.(10+k)
    assert [h.ip for h in handles] == [pod_ip(k % 2, k // 2) for k in range(9)]

    core = CoreV1Api(api)
    pods = (await core.list_namespaced_pod("y")).items
    want = {h.name: h.ip for h in handles if h.namespace == "y"}
    assert {p.metadata.name: p.status.pod_ip for p in pods} == want
    names = {port_name(p, proto) for p, proto in E2E_PORTS}
    assert {port.name for port in pods[0].spec.containers[0].ports} == names

    probes = [Probe(s.netns, d.ip, port, proto)
              for s in handles for d in handles if s is not d for port, proto in E2E_PORTS]
    results = Prober().probe_many(probes)
    assert len(results) == 9 * 8 * 4 and all(results.values())

    for ns, pod in order:
        await kubelet.delete_pod(ns, pod)
    start = time.monotonic()
    await asyncio.gather(*(kubelet.create_pod(ns, f"{pod}2", {"pod": pod}, E2E_PORTS, k % 2)
                           for k, (ns, pod) in enumerate(order)))
    log.warning("9 pods created concurrently: %.2fs", time.monotonic() - start)
    # node 0 already handed out k = 0..4 and node 1 k = 0..3: deleted pods' addresses stay used
    expected = [pod_ip(0, k) for k in range(5, 10)] + [pod_ip(1, k) for k in range(4, 8)]
    assert sorted(h.ip for h in kubelet.pods.values()) == sorted(expected)


async def test_dual_stack_nodes_and_pods_list_both_families_primary_first(api: ApiClient) -> None:
    """A dual-stack fabric (IPv6 primary): podCIDRs and podIPs carry both families, IPv6 first, and
    the pods answer over both (probes stay inside the test's namespaces)."""
    fabric = Fabric(pod_cidr6=node_pod_cidr6)
    kubelet = Kubelet(api, fabric, ipv6_primary=True)
    core = CoreV1Api(api)
    try:
        for i in range(2):
            await kubelet.add_node(i)
            node = await core.read_node(f"node-{i}")
            v6 = "fd00:10:244::/64" if i == 0 else f"fd00:10:244:{i}::/64"
            assert node.spec.pod_cidrs == [v6, f"10.244.{i}.0/24"]
            assert node.spec.pod_cidr == v6
        await kubelet.ensure_namespace("d", {})
        a = await kubelet.create_pod("d", "a", {}, [(80, "TCP"), (53, "UDP")], 0)
        b = await kubelet.create_pod("d", "b", {}, [(80, "TCP"), (53, "UDP")], 1)
        c = await kubelet.create_pod("d", "c", {}, [(80, "TCP")], 0)
        assert (a.ips, b.ips, c.ips) == (
            ("fd00:10:244::a", "10.244.0.10"), ("fd00:10:244:1::a", "10.244.1.10"),
            ("fd00:10:244::b", "10.244.0.11"))
        assert a.ip == "fd00:10:244::a"
        pod = await core.read_namespaced_pod("a", "d")
        assert pod.status.pod_ip == "fd00:10:244::a"
        assert [p.ip for p in pod.status.pod_ips] == ["fd00:10:244::a", "10.244.0.10"]
        prober = Prober()
        for src, dst in ((a, b), (b, a), (c, a), (a, c)):
            for ip in dst.ips:
                assert prober.exchange(Probe(src.netns, ip, 80, "TCP")) == dst.key, (src.key, ip)
                if dst.key != "d/c":  # d/c serves TCP only
                    assert prober.exchange(Probe(src.netns, ip, 53, "UDP")) == dst.key, (src.key, ip)
        # An address of the IPv6 pod CIDR that no pod holds gets no answer.
        assert not prober.probe_tcp(a.netns, "fd00:10:244:1::c8", 80, timeout=0.5)
    finally:
        try:
            await kubelet.close()
        finally:
            fabric.close()
        assert fabric.leftovers() == []
