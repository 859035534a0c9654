"""A real Kubernetes node on this machine: ``netfence node up`` / ``netfence node down``.

Layout (one node, the way kind runs a node inside a container)::

    host netns   kube-apiserver (+ its etcd, Netfence's test etcd) bound to
                 HOST_IP, kube-scheduler, kube-controller-manager (loopback
                 ports only); veth HOST_IF HOST_IP/30
    NODE_NETNS   veth NODE_IF NODE_IP/30, NO default route (nothing can leave);
                 containerd, kubelet, kube-proxy, each entered into the node's
                 private mount namespace (<dir>/ns/mnt) in which
                 /var/lib/kubelet, /var/log/pods, /var/lib/cni, /run/containerd,
                 /var/lib/containerd and /etc/cni are bind mounts of <dir>
                 folders (the kubelet ignores --root-dir for device plugins);
                 pods: ptp + host-local (POD_CIDR), one /32 route per pod, so
                 pod-to-pod traffic crosses the node's FORWARD chain as with
                 Calico; traffic from pods to the API server is masqueraded to
                 NODE_IP (the host has no route to the pods and gets none).

Why ptp + host-local: a routed layout (no bridge) is what Calico does and what
Netfence's own test fabric models (testbed/fabric.py): every pod packet is
routed by the node, so it crosses FORWARD where the agent's rules sit; with a
bridge it would need br_netfilter, a global module setting.

What the kubelet changes outside its namespaces and ``node down`` restores:
the sysctls ``kernel.panic``, ``kernel.panic_on_oops`` and
``vm.overcommit_memory`` (recorded before the kubelet starts), and the cgroups
under ``/<CGROUP_ROOT>`` in every cgroup v1 hierarchy (the kubelet's
``cgroupRoot``; removed after every process in them is gone).

State: ``<dir>/node.json`` lists what was created, so ``node down`` (another
process) removes exactly that, also after a failed ``node up``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from netfence_lab.cluster import (
    LocalCluster,
    ProcessRecord,
    proc_start_time,
    read_state,
    stop_recorded,
)
from netfence_lab.netns import NETNS_DIR, add_netns, delete_netns, ip_batch, netns_pids, run
from netfence_lab.process import free_port
from netfence_lab.tools import Tools, cache_dir, find_repo_root

log = logging.getLogger(__name__)

NODE_NAME = "nfn-node1"
NODE_NETNS = "nfn-node1"
HOST_IF = "nfn-h1"
NODE_IF = "nfn-n1"
# RFC 2544's benchmarking range: a /30 that exists only on this veth pair.
HOST_IP = "198.18.0.1"
NODE_IP = "198.18.0.2"
LINK_PREFIX = 30
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "netfence-node1"
CGROUP_BASE = Path("/sys/fs/cgroup")
KERNEL_SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory")
# Paths bind-mounted from <dir>/<name> inside the node's mount namespace.
NODE_MOUNTS = {
    "var-lib-kubelet": "/var/lib/kubelet",
    "var-log-pods": "/var/log/pods",
    "var-lib-cni": "/var/lib/cni",
    "run-containerd": "/run/containerd",
    "var-lib-containerd": "/var/lib/containerd",
    "etc-cni": "/etc/cni",
    # the pods' network namespaces (containerd pins them as /run/netns/cni-*): kept off the
    # host's /run/netns, where they would outlive the node as dead entries (`ip netns` then
    # prints "Peer netns reference is invalid" for each)
    "run-netns": "/run/netns",
}
CNI_BIN_DIR = "/usr/lib/cni"
STATE_FILE = "node.json"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
COREDNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.15.0"
NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy", "coredns")


class NodeError(RuntimeError):
    """The node could not be brought up or down; one line: what is wrong; what to do."""


# -- configuration files (pure) ----------------------------------------------------------------

def containerd_config(workdir: Path) -> str:
    """containerd's config (v2 schema, containerd 1.6/1.7): private root/state/socket, CRI with
    the local pause image, CNI from Debian's plugins, ``restrict_oom_score_adj`` (this VM's
    bounding set lacks CAP_SYS_RESOURCE, so runc cannot lower oom_score_adj)."""
    return f"""version = 2
root = "{workdir}/containerd/root"
state = "{workdir}/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{workdir}/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "/etc/cni/net.d"
"""


def cni_config() -> dict[str, Any]:
    """ptp + host-local: one veth per pod, a /32 route per pod on the node (routed, as Calico)."""
    return {
        "cniVersion": "0.4.0",
        "name": "netfence-node",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": "/var/lib/cni/networks",
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(workdir: Path, ca_cert: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This VM has cgroup v1; kubelet >= 1.35 refuses it unless told not to.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "containerRuntimeEndpoint": f"unix://{workdir}/containerd/containerd.sock",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(workdir / "resolv.conf"),
        "failSwapOn": False,
        "podCIDR": POD_CIDR,
        "maxPods": 110,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi", "nodefs.available": "1%",
            "nodefs.inodesFree": "1%", "imagefs.available": "1%",
        },
        "protectKernelDefaults": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "enableServer": True,
        "staticPodPath": "",
        "registerNode": True,
    }


def kube_proxy_config(kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # conntrack sizes are machine-wide: leave them as they are
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def coredns_manifests(image: str = COREDNS_IMAGE) -> list[dict[str, Any]]:
    """CoreDNS as the cluster DNS: Service kube-dns at DNS_IP. No ``forward``: names outside
    the cluster fail instead of leaving the machine."""
    labels = {"k8s-app": "kube-dns"}
    corefile = (
        ".:53 {\n    errors\n    health {\n        lameduck 2s\n    }\n    ready\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n        pods insecure\n"
        "        ttl 30\n    }\n    cache 30\n    loadbalance\n}\n"
    )
    meta = {"name": "coredns", "namespace": "kube-system"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "serviceAccountName": "coredns",
                     "priorityClassName": "system-cluster-critical",
                     "dnsPolicy": "Default",
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [{"containerPort": 53, "protocol": "UDP", "name": "dns"},
                                   {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"}],
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                            "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                           "periodSeconds": 10, "failureThreshold": 5},
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"selector": labels, "clusterIP": DNS_IP,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ]


def in_node(workdir: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the node's network and mount namespaces."""
    return ["nsenter", f"--net={NETNS_DIR / NODE_NETNS}", f"--mount={workdir / 'ns' / 'mnt'}", "--", *argv]


def cgroup_hierarchies(base: Path = CGROUP_BASE) -> list[Path]:
    """The cgroup v1 hierarchies (real directories, not the cpu/cpuacct symlinks)."""
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists())


# -- what the machine must offer (checked before anything is changed) ---------------------------

# The kubelet's cgroupfs driver creates its pods' cgroups in these v1 hierarchies.
KUBELET_CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids")
NODE_COMMANDS = ("ip", "iptables", "nsenter", "unshare", "mount", "umount", "containerd", "runc", "ctr")
CNI_PLUGINS = ("ptp", "host-local", "loopback", "portmap")


@dataclass(frozen=True)
class HostFacts:
    """What ``preflight_problems`` judges, read from the machine by ``host_facts``."""

    uid: int
    cgroup_v2_only: bool  # /sys/fs/cgroup is the unified hierarchy
    cgroup_v1_controllers: frozenset[str]  # controllers with a mounted v1 hierarchy
    filesystems: frozenset[str]  # /proc/filesystems
    kmsg: bool  # /dev/kmsg exists
    missing_commands: tuple[str, ...]
    missing_cni_plugins: tuple[str, ...]


def preflight_problems(facts: HostFacts) -> list[str]:
    """What this machine lacks to run the node, one line each (empty: nothing)."""
    problems = []
    if facts.uid != 0:
        problems.append(f"root: the node runs containerd and a kubelet and makes namespaces (uid is {facts.uid})")
    if facts.cgroup_v2_only:
        problems.append(f"cgroup v1: {CGROUP_BASE} is cgroup v2 (unified) only; the node test bed "
                        "(lab/netfence_lab/node.py) records and removes cgroup v1 hierarchies only")
    else:
        missing = [c for c in KUBELET_CGROUP_CONTROLLERS if c not in facts.cgroup_v1_controllers]
        if missing:
            problems.append(f"cgroup v1 hierarchies {', '.join(missing)} (no {CGROUP_BASE}/<name>/cgroup.procs): "
                            "the kubelet's cgroupfs driver puts its pods there")
    if "overlay" not in facts.filesystems:
        problems.append("the overlay file system (not in /proc/filesystems; modprobe overlay): "
                        "containerd's snapshotter")
    if not facts.kmsg:
        problems.append("/dev/kmsg: the kubelet's OOM watcher reads it (in a container: bind-mount it)")
    if facts.missing_commands:
        problems.append(f"commands {', '.join(facts.missing_commands)}: run hack/setup-node.sh")
    if facts.missing_cni_plugins:
        problems.append(f"CNI plugins {', '.join(facts.missing_cni_plugins)} in {CNI_BIN_DIR} "
                        "(Debian's containernetworking-plugins): run hack/setup-node.sh")
    return problems


def host_facts() -> HostFacts:
    try:
        filesystems = frozenset(line.split()[-1] for line in Path("/proc/filesystems").read_text().splitlines()
                                if line.strip())
    except OSError:
        filesystems = frozenset()
    return HostFacts(
        uid=os.geteuid(),
        cgroup_v2_only=(CGROUP_BASE / "cgroup.controllers").exists(),
        cgroup_v1_controllers=frozenset(c for c in KUBELET_CGROUP_CONTROLLERS
                                        if (CGROUP_BASE / c / "cgroup.procs").exists()),
        filesystems=filesystems,
        kmsg=Path("/dev/kmsg").exists(),
        missing_commands=tuple(c for c in NODE_COMMANDS if shutil.which(c) is None),
        missing_cni_plugins=tuple(p for p in CNI_PLUGINS if not os.access(Path(CNI_BIN_DIR, p), os.X_OK)),
    )


def preflight() -> list[str]:
    """What this machine lacks to run the node (``node up`` refuses to start then)."""
    return preflight_problems(host_facts())


# -- node tools --------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeTools:
    bin_dir: Path

    def path(self, name: str) -> Path:
        return self.bin_dir / name

    def missing(self) -> list[str]:
        return [n for n in NODE_BINARIES if not os.access(self.path(n), os.X_OK)]


def ensure_node_tools() -> NodeTools:
    """Build (once per machine) and locate the node tools: ``hack/build-tools.sh --node``."""
    root = find_repo_root()
    if root is not None:
        res = subprocess.run(["bash", str(root / "hack" / "build-tools.sh"), "--node"],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise NodeError(f"building the node tools failed: {last}")
        tools = NodeTools(Path(res.stdout.strip().splitlines()[-1]))
    else:
        tools = NodeTools(cache_dir() / "bin")
    if tools.missing():
        raise NodeError(f"missing node tools {', '.join(tools.missing())}: run hack/setup-node.sh")
    return tools


# -- state -------------------------------------------------------------------------------------

@dataclass
class NodeState:
    workdir: str
    kubeconfig: str = ""
    netns: bool = False
    mount_ns: bool = False
    created_dirs: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    cgroups: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NodeState:
        raw: dict[str, Any] = json.loads(text)
        procs = [ProcessRecord(**p) for p in raw.pop("processes", [])]
        known = set(cls.__dataclass_fields__)
        return cls(processes=procs, **{k: v for k, v in raw.items() if k in known})


def read_node_state(workdir: Path) -> NodeState | None:
    try:
        return NodeState.from_json((workdir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def default_dir() -> Path:
    return cache_dir() / "node"


# -- the node ----------------------------------------------------------------------------------

class LocalNode:
    """The control plane (LocalCluster in node mode) + one real node; see the module docstring."""

    def __init__(self, workdir: Path, tools: Tools, node_tools: NodeTools, images: Iterable[str] | None = None):
        """``images``: the archives to import (``<name>.oci.tar`` of hack/node-images.sh, e.g.
        ``netfence-agent-0.1.0``); None: every archive there."""
        self.workdir = workdir.resolve()
        self.tools = tools
        self.node_tools = node_tools
        self.images = None if images is None else frozenset(images)
        self.state = NodeState(workdir=str(self.workdir))
        # No CRDs applied by the test bed: the Helm chart installs (and owns) them.
        (self.workdir / "no-crds").mkdir(parents=True, exist_ok=True)
        self.cluster = LocalCluster(self.workdir / "cluster", tools, api_address=HOST_IP, node_mode=True,
                                    crd_dir=self.workdir / "no-crds")

    # -- helpers -------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    def save(self) -> None:
        self.state.kubeconfig = str(self.kubeconfig)
        tmp = self.workdir / (STATE_FILE + ".tmp")
        tmp.write_text(self.state.to_json())
        tmp.replace(self.workdir / STATE_FILE)

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> ProcessRecord:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        start = None
        for _ in range(50):
            start = proc_start_time(proc.pid)
            if start is not None:
                break
            time.sleep(0.01)
        rec = ProcessRecord(name, proc.pid, start or 0, str(log_path))
        self.state.processes.append(rec)
        self.save()
        return rec

    def _wait(self, what: str, check: Any, timeout: float, rec: ProcessRecord | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rec is not None and not rec.alive():
                tail = "\n".join(Path(rec.log).read_text(errors="replace").splitlines()[-15:])
                raise NodeError(f"{rec.name} exited during start-up (see {rec.log}):\n{tail}")
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.2)
        raise NodeError(f"{what} not within {timeout:.0f}s" + (f" (see {rec.log})" if rec else ""))

    # -- steps ---------------------------------------------------------------------------------
    def _network(self) -> None:
        add_netns(NODE_NETNS)
        self.state.netns = True
        self.save()
        ip_batch(None, [
            f"link add {HOST_IF} type veth peer name {NODE_IF} netns {NODE_NETNS}",
            f"addr add {HOST_IP}/{LINK_PREFIX} dev {HOST_IF}",
            f"link set {HOST_IF} up",
        ])
        ip_batch(NODE_NETNS, [
            "link set lo up",
            f"addr add {NODE_IP}/{LINK_PREFIX} dev {NODE_IF}",
            f"link set {NODE_IF} up",
            # Host-network pods (and the kubelet's probes) reach ClusterIPs: a route for the
            # service range makes the OUTPUT chain, where kube-proxy DNATs, see the packets.
            # On-link without a gateway: an address kube-proxy does not know is never answered.
            f"route add {SERVICE_CIDR} dev {NODE_IF}",
        ])
        ns = ["ip", "netns", "exec", NODE_NETNS]
        run([*ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        # Pods -> API server: the host has no route back to the pods; NODE_IP it knows.
        run([*ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", CLUSTER_CIDR, "-o", NODE_IF,
             "-j", "MASQUERADE"])

    def _mount_namespace(self) -> None:
        nsdir = self.workdir / "ns"
        nsdir.mkdir(parents=True, exist_ok=True)
        run(["mount", "--bind", str(nsdir), str(nsdir)])
        run(["mount", "--make-private", str(nsdir)])
        (nsdir / "mnt").touch()
        self.state.mount_ns = True
        self.save()
        script = []
        for src, target in NODE_MOUNTS.items():
            (self.workdir / "mounts" / src).mkdir(parents=True, exist_ok=True)
            if src == "run-netns":  # dead entries of an earlier node (their mounts went with it)
                for stale in (self.workdir / "mounts" / src).iterdir():
                    stale.unlink(missing_ok=True)
            if not Path(target).exists():
                Path(target).mkdir(parents=True)
                self.state.created_dirs.append(target)
            script.append(f"mount --bind {self.workdir / 'mounts' / src} {target}")
        self.save()
        run(["unshare", f"--mount={nsdir / 'mnt'}", "--propagation", "private", "sh", "-ec", " && ".join(script)])
        netd = self.workdir / "mounts" / "etc-cni" / "net.d"
        netd.mkdir(parents=True, exist_ok=True)
        (netd / "10-netfence-node.conflist").write_text(json.dumps(cni_config(), indent=2) + "\n")

    def _cgroups_and_sysctls(self) -> None:
        for key in KERNEL_SYSCTLS:
            self.state.sysctls[key] = (Path("/proc/sys") / key).read_text().strip()
        for hier in cgroup_hierarchies():
            path = hier / CGROUP_ROOT
            if not path.exists():
                path.mkdir()
            self.state.cgroups.append(str(path))
        self.save()

    def _control_plane(self) -> None:
        self.cluster.start()
        self.cluster.detach()
        wd = self.workdir
        pki = self.cluster.apiserver.pki
        self._spawn("kube-scheduler", [
            str(self.node_tools.path("kube-scheduler")), f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
        ])
        self._spawn("kube-controller-manager", [
            str(self.node_tools.path("kube-controller-manager")), f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            f"--root-ca-file={pki.ca_cert}", f"--service-account-private-key-file={pki.sa_key}",
            "--use-service-account-credentials=false", f"--cluster-cidr={CLUSTER_CIDR}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # the node's spec.podCIDRs, as kubeadm clusters have them: the first /24 is POD_CIDR, the
            # range host-local hands out (the controller publishes it as nodes/<node>)
            "--allocate-node-cidrs=true", "--node-cidr-mask-size=24",
            f"--cert-dir={wd / 'kcm-certs'}",
        ])

    def _node(self) -> None:
        wd = self.workdir
        (wd / "containerd").mkdir(parents=True, exist_ok=True)
        (wd / "containerd" / "config.toml").write_text(containerd_config(wd))
        (wd / "resolv.conf").write_text(f"# the node has no upstream DNS\nnameserver {DNS_IP}\n")
        config = wd / "containerd" / "config.toml"
        ctrd = self._spawn("containerd", in_node(wd, ["containerd", "--config", str(config)]))
        sock = wd / "containerd" / "containerd.sock"
        self._wait("containerd socket", sock.exists, 60, ctrd)
        self._wait("containerd answering", lambda: self.ctr("version").returncode == 0, 60, ctrd)
        images = wd.parent / "node-images" if not (wd / "images").is_dir() else wd / "images"
        self.import_images(images)
        kcfg = wd / "kubelet.yaml"
        kcfg.write_text(yaml.safe_dump(kubelet_config(wd, self.cluster.apiserver.pki.ca_cert), sort_keys=False))
        self._spawn("kubelet", in_node(wd, [
            str(self.node_tools.path("kubelet")), f"--config={kcfg}", f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--root-dir=/var/lib/kubelet",
            "--v=1",
        ]))
        pcfg = wd / "kube-proxy.yaml"
        pcfg.write_text(yaml.safe_dump(kube_proxy_config(self.kubeconfig), sort_keys=False))
        self._spawn("kube-proxy", in_node(wd, [str(self.node_tools.path("kube-proxy")), f"--config={pcfg}"]))

    def ctr(self, *args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", f"--address={self.workdir / 'containerd' / 'containerd.sock'}", "-n", "k8s.io", *args],
            capture_output=True, text=True, timeout=timeout, check=check,
        )

    def import_images(self, directory: Path) -> list[str]:
        """``ctr images import`` the ``*.oci.tar`` of ``directory`` (hack/node-images.sh writes them):
        the ones named in ``self.images``, or all."""
        done = []
        archives = sorted(directory.glob("*.oci.tar"))
        if self.images is not None:
            missing = self.images - {a.name.removesuffix(".oci.tar") for a in archives}
            if missing:
                raise NodeError(f"no image archive {', '.join(sorted(missing))} in {directory}: "
                                "run hack/node-images.sh with those tags")
            archives = [a for a in archives if a.name.removesuffix(".oci.tar") in self.images]
        for archive in archives:
            res = self.ctr("images", "import", "--all-platforms", str(archive))
            if res.returncode != 0:
                raise NodeError(f"ctr images import {archive} failed: {res.stderr.strip()}")
            done.append(archive.name)
        log.info("imported %d images from %s", len(done), directory)
        return done

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout)

    def _dns(self) -> None:
        docs = yaml.safe_dump_all(coredns_manifests(), sort_keys=False)
        self.kubectl("apply", "-f", "-", input=docs)

    def _wait_ready(self, timeout: float) -> None:
        self._wait(f"node {NODE_NAME} Ready", lambda: self.kubectl(
            "get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False).stdout.strip() == "True", timeout)
        self._wait("service account kube-system/default", lambda: self.kubectl(
            "-n", "kube-system", "get", "serviceaccount", "default", check=False).returncode == 0, timeout)
        self._dns()
        self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", f"--timeout={timeout:.0f}s",
                     timeout=timeout + 10)

    def up(self, timeout: float = 180.0) -> LocalNode:
        existing = read_node_state(self.workdir)
        if existing is not None and (existing.netns or any(p.alive() for p in existing.processes)):
            raise NodeError(f"a node is recorded in {self.workdir}; "
                            f"run 'netfence node down --dir {self.workdir}' first")
        problems = preflight()
        if problems:
            raise NodeError("this machine cannot run the node; missing: " + "; ".join(problems))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "mounts", "containerd", "kcm-certs"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        self.save()
        try:
            self._network()
            self._mount_namespace()
            self._cgroups_and_sysctls()
            self._control_plane()
            self._node()
            self._wait_ready(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                down(self.workdir)
            raise
        return self


# -- down --------------------------------------------------------------------------------------

def _ns_inode(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def node_pids(workdir: Path, cgroups: Iterable[str]) -> set[int]:
    """Every process of the node: in its network or mount namespace, or in its cgroups."""
    pids: set[int] = set(netns_pids(NODE_NETNS))
    mnt_file = workdir / "ns" / "mnt"
    try:
        mnt_ino = os.stat(mnt_file).st_ino
    except OSError:
        mnt_ino = None
    if mnt_ino is not None:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _ns_inode(entry, "mnt") == mnt_ino:
                pids.add(int(entry))
    for cg in cgroups:
        for dirpath, _dirs, files in os.walk(cg):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    pids.discard(os.getpid())
    return pids


def _kill_all(workdir: Path, cgroups: Sequence[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while True:
        pids = node_pids(workdir, cgroups)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if time.monotonic() > deadline:
            raise NodeError(f"processes {sorted(pids)} of the node survive SIGKILL; check them with ps")
        time.sleep(0.3)
        if time.monotonic() > deadline - timeout / 2:
            sig = signal.SIGKILL


def _rm_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _stop_record(rec: ProcessRecord, grace: float = 10.0) -> None:
    if not rec.alive():
        return
    rec.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while rec.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if rec.alive():
        rec.signal(signal.SIGKILL)


def down(workdir: Path) -> list[str]:
    """Remove everything ``node up`` recorded in ``workdir``; return what was done (one line each)."""
    workdir = workdir.resolve()
    state = read_node_state(workdir)
    if state is None:
        return []
    done: list[str] = []
    # kubelet first (so it does not restart pods), then kube-proxy, containerd and the control plane
    order = {"kubelet": 0, "kube-proxy": 1, "containerd": 2}
    for rec in sorted(state.processes, key=lambda r: order.get(r.name, 3)):
        _stop_record(rec)
    done.append("stopped " + ", ".join(r.name for r in state.processes))
    _kill_all(workdir, state.cgroups)
    cluster_state = read_state(workdir / "cluster")
    if cluster_state is not None:
        done.append("stopped " + ", ".join(stop_recorded(cluster_state)))
    if state.mount_ns:
        nsdir = workdir / "ns"
        for target in (nsdir / "mnt", nsdir):
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", str(target)], check=True, capture_output=True)
        done.append("removed the mount namespace")
    if state.netns:
        delete_netns(NODE_NETNS)  # takes the veth pair with it
        done.append(f"deleted netns {NODE_NETNS}")
    for cg in state.cgroups:
        _rm_cgroup_tree(Path(cg))
    if state.cgroups:
        done.append(f"removed cgroups /{CGROUP_ROOT}")
    for key, value in state.sysctls.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value + "\n")
    if state.sysctls:
        done.append("restored " + ", ".join(f"{k.replace('/', '.')}={v}" for k, v in state.sysctls.items()))
    for d in reversed(state.created_dirs):
        with contextlib.suppress(OSError):
            Path(d).rmdir()
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return done
