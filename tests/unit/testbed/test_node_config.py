"""The pure parts of the real-node test bed (testbed/node.py): configs and manifests."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from netfence_lab import node


def test_kubelet_config_has_the_settings_this_vm_needs() -> None:
    cfg = node.kubelet_config(Path("/w"), Path("/w/ca.crt"))
    assert cfg["failCgroupV1"] is False
    assert cfg["cgroupRoot"] == f"/{node.CGROUP_ROOT}"
    assert cfg["clusterDNS"] == [node.DNS_IP]
    assert cfg["containerRuntimeEndpoint"] == "unix:///w/containerd/containerd.sock"
    assert cfg["authentication"]["anonymous"]["enabled"] is False


def test_containerd_config_restricts_oom_score_adj_and_uses_local_pause() -> None:
    text = node.containerd_config(Path("/w"))
    assert "restrict_oom_score_adj = true" in text
    assert f'sandbox_image = "{node.PAUSE_IMAGE}"' in text
    assert 'address = "/w/containerd/containerd.sock"' in text


def test_cni_is_routed_ptp_with_host_local_in_the_pod_cidr() -> None:
    cfg = node.cni_config()
    first = cfg["plugins"][0]
    assert first["type"] == "ptp" and first["ipMasq"] is False
    assert first["ipam"]["type"] == "host-local"
    assert first["ipam"]["ranges"] == [[{"subnet": node.POD_CIDR}]]


def test_addresses_are_consistent() -> None:
    link = ipaddress.ip_network(f"{node.HOST_IP}/{node.LINK_PREFIX}", strict=False)
    assert ipaddress.ip_address(node.NODE_IP) in link
    assert ipaddress.ip_network(node.POD_CIDR).subnet_of(ipaddress.ip_network(node.CLUSTER_CIDR))
    assert ipaddress.ip_address(node.DNS_IP) in ipaddress.ip_network(node.SERVICE_CIDR)


def test_coredns_has_no_upstream_and_serves_the_dns_service_ip() -> None:
    docs = node.coredns_manifests()
    corefile = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["Corefile"]
    assert "forward" not in corefile  # nothing leaves the machine
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["clusterIP"] == node.DNS_IP


def test_in_node_enters_both_namespaces() -> None:
    argv = node.in_node(Path("/w"), ["kubelet", "--v=1"])
    assert argv[:3] == ["nsenter", f"--net=/var/run/netns/{node.NODE_NETNS}", "--mount=/w/ns/mnt"]
    assert argv[-2:] == ["kubelet", "--v=1"]


def test_cgroup_hierarchies_skip_symlinks(tmp_path: Path) -> None:
    for name in ("memory", "pids"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cgroup.procs").write_text("")
    (tmp_path / "cpu").symlink_to(tmp_path / "pids")
    (tmp_path / "empty").mkdir()
    assert [p.name for p in node.cgroup_hierarchies(tmp_path)] == ["memory", "pids"]


def test_state_round_trips() -> None:
    state = node.NodeState(workdir="/w", netns=True, sysctls={"kernel/panic": "0"}, cgroups=["/x"])
    assert node.NodeState.from_json(state.to_json()) == state
