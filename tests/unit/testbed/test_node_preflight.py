"""``node up``'s preflight: what a machine lacks to run the real node, named exactly."""

from __future__ import annotations

import dataclasses

import pytest

from netfence_lab.node import KUBELET_CGROUP_CONTROLLERS, HostFacts, preflight_problems

GOOD = HostFacts(
    uid=0,
    cgroup_v2_only=False,
    cgroup_v1_controllers=frozenset(KUBELET_CGROUP_CONTROLLERS),
    filesystems=frozenset({"ext4", "overlay", "cgroup", "proc"}),
    kmsg=True,
    missing_commands=(),
    missing_cni_plugins=(),
)


def test_a_machine_with_everything_has_no_problem() -> None:
    assert preflight_problems(GOOD) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"uid": 1000}, "root: the node runs containerd and a kubelet and makes namespaces (uid is 1000)"),
        ({"cgroup_v2_only": True, "cgroup_v1_controllers": frozenset()},
         "cgroup v1: /sys/fs/cgroup is cgroup v2 (unified) only; the node test bed "
         "(lab/netfence_lab/node.py) records and removes cgroup v1 hierarchies only"),
        ({"cgroup_v1_controllers": frozenset({"cpu", "cpuacct", "cpuset"})},
         "cgroup v1 hierarchies memory, pids (no /sys/fs/cgroup/<name>/cgroup.procs): "
         "the kubelet's cgroupfs driver puts its pods there"),
        ({"filesystems": frozenset({"ext4"})},
         "the overlay file system (not in /proc/filesystems; modprobe overlay): containerd's snapshotter"),
        ({"kmsg": False}, "/dev/kmsg: the kubelet's OOM watcher reads it (in a container: bind-mount it)"),
        ({"missing_commands": ("containerd", "runc")}, "commands containerd, runc: run hack/setup-node.sh"),
        ({"missing_cni_plugins": ("ptp",)},
         "CNI plugins ptp in /usr/lib/cni (Debian's containernetworking-plugins): run hack/setup-node.sh"),
    ],
)
def test_each_missing_piece_is_one_exact_line(change: dict[str, object], expected: str) -> None:
    assert preflight_problems(dataclasses.replace(GOOD, **change)) == [expected]  # type: ignore[arg-type]


def test_every_problem_is_listed_not_just_the_first() -> None:
    facts = dataclasses.replace(GOOD, uid=1, kmsg=False, missing_commands=("ctr",))
    assert [p.split(":")[0] for p in preflight_problems(facts)] == ["root", "/dev/kmsg", "commands ctr"]
