"""kube-network-policies, the comparison peer, on the test bed's namespace nodes.

SIG Network's reference NetworkPolicy enforcer (``sigs.k8s.io/kube-network-policies``
v0.8.0, built by ``hack/build-tools.sh --peer`` into the tools cache) runs here the
way its DaemonSet runs it: one process per node, *inside* that node's network
namespace, with in-cluster credentials (a ServiceAccount token and the cluster CA
under ``/var/run/secrets/kubernetes.io/serviceaccount``, ``KUBERNETES_SERVICE_HOST``
and ``_PORT``: its ``cmd/main.go`` has no kubeconfig flag) and
``--hostname-override=<node>``. It watches Pods, Namespaces and NetworkPolicies and
decides every new connection in user space: an nftables rule queues the first
packet of each connection to/from a selected local pod (nfqueue), its evaluator
answers accept or drop.

What this module adds around the unmodified binary, and why:

* **API relay.** A node's namespace has no route to the host's loopback, where the
  local API server listens. A small relay process (``python -m netfence_lab.peer
  relay``) listens on ``127.0.0.1:<api port>`` *inside* the node's namespace and
  forwards each connection to the API server from the host's namespace; the
  server certificate (SAN 127.0.0.1) stays valid. Its CPU is reported apart.
* **Credentials without touching the host.** The process starts in a private mount
  namespace with a tmpfs over ``/run`` holding only the token and CA file.
* **The queue hook (a kernel gap of this machine).** The peer writes one nftables
  table whose rules use the ``queue`` expression (``CONFIG_NFT_QUEUE``). A kernel
  built without it refuses the whole table (``Could not process rule: No such file
  or directory``) and the peer then enforces nothing. Where :func:`kernel_has_nft_queue`
  says so, :class:`PeerNodes` installs the same hook with iptables' ``NFQUEUE``
  target (xtables, through nft_compat): postrouting, established/related and
  root-owned local traffic pass, the first packet of every other connection from
  or to the node's pod CIDR goes to queue 100. The peer's own set holds only the
  local pods that policies select; queueing every local pod sends it more packets
  than it would see on its own, never fewer, and every verdict is still its own.

Nothing here sends traffic anywhere but between the test bed's namespaces and to
the API server on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netfence_lab.netns import in_netns
from netfence_lab.process import ManagedProcess, StartupError
from netfence_lab.tools import cache_dir

if TYPE_CHECKING:  # the relay process imports this module: keep its start-up light
    from kubernetes_asyncio import client

log = logging.getLogger(__name__)

TOOL = "kube-network-policies"
VERSION = "v0.8.0"
QUEUE_ID = 100
SA_NAMESPACE = "kube-system"
SA_NAME = "kube-network-policies"
SECRETS_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SHIM_CHAIN = "NFPEER-POSTROUTING"
TOKEN_SECONDS = 24 * 3600
READY_TIMEOUT = 60.0
METRICS_ADDRESS = "127.0.0.1:9080"  # inside the node's namespace


class PeerError(RuntimeError):
    """The peer cannot run here; one line: what is wrong and what to do."""


def peer_binary() -> Path:
    """The built kube-network-policies (``hack/setup-peer.sh`` builds it)."""
    path = cache_dir() / "bin" / TOOL
    if not os.access(path, os.X_OK):
        raise PeerError(f"{path} is missing: run hack/setup-peer.sh (builds {TOOL} {VERSION}, installs nftables)")
    return path


# -- pure parts ----------------------------------------------------------------------------------

def rbac_objects() -> list[dict[str, Any]]:
    """The ServiceAccount and RBAC of the peer's own install.yaml (v0.8.0), unchanged."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SA_NAME, "namespace": SA_NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": SA_NAME},
         "rules": [
             {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
             {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": SA_NAME},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SA_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": SA_NAME, "namespace": SA_NAMESPACE}]},
    ]


def shim_rules(pod_cidr: str, queue: int = QUEUE_ID) -> str:
    """``iptables-restore --noflush`` (or ``ip6tables-restore`` for an IPv6 ``pod_cidr``)
    input: the peer's postrouting hook with the xtables NFQUEUE target (see the module
    docstring). DNS is not queued (as the peer does on postrouting); no ``--queue-bypass``:
    with the peer gone packets are dropped, as the peer's own rule (without
    ``--fail-open``) does."""
    chain = SHIM_CHAIN
    return "\n".join([
        "*mangle",
        f":{chain} - [0:0]",
        f"-A POSTROUTING -j {chain}",
        f"-A {chain} -p udp --dport 53 -j RETURN",
        f"-A {chain} -m owner --uid-owner 0 -j RETURN",
        f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {chain} -s {pod_cidr} -j NFQUEUE --queue-num {queue}",
        f"-A {chain} -d {pod_cidr} -j NFQUEUE --queue-num {queue}",
        "COMMIT",
        "",
    ])


def launch_script(binary: Path, secrets: Path, node: str, api_port: int) -> str:
    """The shell run in the node's namespace and a private mount namespace: put the
    credentials where ``rest.InClusterConfig`` reads them, then exec the peer."""
    q = shlex.quote
    return "; ".join([
        "set -e",
        "mount -t tmpfs -o size=1m,mode=0755 netfence-peer /run",
        f"mkdir -p {SECRETS_DIR}",
        f"cp {q(str(secrets / 'token'))} {q(str(secrets / 'ca.crt'))} {q(str(secrets / 'namespace'))} {SECRETS_DIR}/",
        f"export KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT={api_port}",
        f"exec {q(str(binary))} --hostname-override={q(node)} --nfqueue-id={QUEUE_ID}"
        f" --metrics-bind-address={METRICS_ADDRESS} --netfilter-bug-1766-fix=false --disable-nri",
    ])


def parse_queue_table(text: str) -> dict[int, int]:
    """``/proc/net/netfilter/nfnetlink_queue`` -> {queue number: listener port id}."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            out[int(fields[0])] = int(fields[1])
    return out


def count_kernel_objects(iptables_save: str, ipset_save: str, nft_ruleset: str = "") -> dict[str, int]:
    """Rules, sets and set members of one node (pure): iptables rules (``-A`` lines of
    ``iptables-save``), ipsets and their members (``ipset save``), and nftables rules
    and set elements of tables iptables does not own (``nft list ruleset``)."""
    rules = sum(1 for line in iptables_save.splitlines() if line.startswith("-A "))
    sets = sum(1 for line in ipset_save.splitlines() if line.startswith("create "))
    members = sum(1 for line in ipset_save.splitlines() if line.startswith("add "))
    nft_rules = nft_sets = nft_elements = 0
    table_kind = ""
    in_elements = False
    for raw in nft_ruleset.splitlines():
        line = raw.strip()
        if line.startswith("table "):
            name = line.split()[2]
            table_kind = "iptables" if name in ("filter", "mangle", "nat", "raw", "security") else "own"
            continue
        if table_kind != "own":
            continue
        if line.startswith("set "):
            nft_sets += 1
        elif line.startswith("elements = {"):
            in_elements = not line.endswith("}")
            nft_elements += line.removeprefix("elements = {").count(",") + 1
        elif in_elements:
            nft_elements += line.count(",") + (0 if line.endswith(",") else 1) - (1 if line.endswith("}") else 0)
            in_elements = not line.endswith("}")
        elif line and not line.startswith(("chain ", "type ", "policy", "}", "flags ", "#")):
            nft_rules += 1
    return {"rules": rules + nft_rules, "sets": sets + nft_sets, "members": members + nft_elements}


# -- edges ---------------------------------------------------------------------------------------

def kernel_has_nft_queue(netns: str) -> tuple[bool, str]:
    """Whether an nftables ``queue`` rule can be added in ``netns`` (a throwaway table); the
    error text when not."""
    table = "netfence-peer-probe"
    script = (f"table inet {table} {{\n chain c {{\n  type filter hook postrouting priority 100;\n"
              f"  queue num {QUEUE_ID} bypass\n }}\n}}\n")
    res = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script,
                         capture_output=True, text=True, check=False)
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", table],
                   capture_output=True, check=False)
    return res.returncode == 0, (res.stderr or res.stdout).strip()


def netns_run(netns: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    res = subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True,
                         text=True, check=False)
    if check and res.returncode != 0:
        raise PeerError(f"{' '.join(argv)} in {netns} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def node_kernel_objects(netns: str) -> dict[str, int]:
    """Rules, sets and members in ``netns`` now (whichever enforcer programmed them)."""
    return count_kernel_objects(netns_run(netns, "iptables-save", check=False),
                                netns_run(netns, "ipset", "save", check=False),
                                netns_run(netns, "nft", "list", "ruleset", check=False))


def reset_node_netfilter(netns: str) -> None:
    """Remove every netfilter rule and ipset of a node's namespace (the test bed's node
    namespaces hold nothing but an enforcer's rules): switching enforcers on the same
    nodes starts from a clean kernel. Netfence's agents leave their rules in place on
    stop (fail-static), so this is the only way they go."""
    netns_run(netns, "nft", "flush", "ruleset")
    netns_run(netns, "ipset", "destroy", check=False)
    left = node_kernel_objects(netns)
    if left["rules"] or left["sets"]:
        raise PeerError(f"netfilter of {netns} not empty after reset: {left}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its waited-for children, in seconds (0 when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


async def ensure_credentials(api: client.ApiClient, ca_file: Path, directory: Path) -> Path:
    """Create the peer's ServiceAccount and RBAC (kept if present), request a token, and
    write ``token``, ``ca.crt`` and ``namespace`` into ``directory`` (mode 0700)."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    rbac = client.RbacAuthorizationV1Api(api)
    core = client.CoreV1Api(api)
    sa, role, binding = rbac_objects()
    for kind, body in (("ServiceAccount", sa), ("ClusterRole", role), ("ClusterRoleBinding", binding)):
        try:
            if kind == "ServiceAccount":
                await core.create_namespaced_service_account(SA_NAMESPACE, body)
            elif kind == "ClusterRole":
                await rbac.create_cluster_role(body)
            else:
                await rbac.create_cluster_role_binding(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": TOKEN_SECONDS}}
    token = await core.create_namespaced_service_account_token(SA_NAME, SA_NAMESPACE, request)
    write_secrets(directory, str(token.status.token), ca_file)
    return directory


def write_secrets(directory: Path, token: str, ca_file: Path) -> None:
    """What ``rest.InClusterConfig`` reads, in ``directory`` (mode 0700)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(ca_file.read_bytes())
    (directory / "namespace").write_text(SA_NAMESPACE)


@dataclass(frozen=True)
class PeerNode:
    """A node the peer runs on: its Node name, network namespace and pod CIDR(s)."""

    name: str
    netns: str
    pod_cidr: str
    pod_cidr6: str | None = None


@dataclass
class PeerProc:
    node: str
    netns: str
    process: ManagedProcess
    relay: ManagedProcess


@dataclass
class PeerNodes:
    """kube-network-policies on namespace nodes: ``start(nodes)``, ``stop()``.

    ``api_port``: the local API server's port on 127.0.0.1; ``ca_file``: the cluster CA.
    """

    api: client.ApiClient
    api_port: int
    ca_file: Path
    workdir: Path
    python: str = "python3"
    procs: dict[str, PeerProc] = field(default_factory=dict)
    shimmed: list[tuple[str, str]] = field(default_factory=list)  # (netns, iptables or ip6tables)
    hook: str = ""  # "nft" (the peer's own table works) or "xt" (the shim)

    async def start(self, nodes: Sequence[PeerNode], timeout: float = READY_TIMEOUT) -> None:
        binary = peer_binary()
        secrets = await ensure_credentials(self.api, self.ca_file, self.workdir / "peer-secrets")
        try:
            for node in nodes:
                relay = self._start_relay(node.name, node.netns)
                argv = ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation", "private",
                        "sh", "-c", launch_script(binary, secrets, node.name, self.api_port)]
                proc = ManagedProcess(f"{TOOL}-{node.name}", argv, self.workdir / f"{TOOL}-{node.name}.log")
                proc.start()
                self.procs[node.name] = PeerProc(node.name, node.netns, proc, relay)
                ok, detail = kernel_has_nft_queue(node.netns)
                self.hook = "nft" if ok else "xt"
                if not ok:
                    log.info("node %s: the kernel refuses nftables queue rules (%s); installing the "
                             "xtables NFQUEUE hook", node.name, detail.splitlines()[-1] if detail else "")
                    cidrs = [("iptables", node.pod_cidr)]
                    if node.pod_cidr6:
                        cidrs.append(("ip6tables", node.pod_cidr6))
                    for tool, cidr in cidrs:
                        self.shimmed.append((node.netns, tool))
                        netns_run(node.netns, f"{tool}-restore", "--noflush", stdin=shim_rules(cidr))
            for peer in self.procs.values():
                self._wait_queue(peer, timeout)
        except BaseException:
            self.stop()
            raise

    def _start_relay(self, node: str, netns: str) -> ManagedProcess:
        ready = self.workdir / f"relay-{node}.ready"
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        argv = [self.python, "-m", "netfence_lab.peer", "relay", "--netns", netns,
                "--port", str(self.api_port), "--ready-file", str(ready)]
        relay = ManagedProcess(f"relay-{node}", argv, self.workdir / f"relay-{node}.log")
        relay.start()
        relay.wait_until(ready.exists, 20.0, "listening")
        return relay

    def _wait_queue(self, peer: PeerProc, timeout: float) -> None:
        """Ready: the peer's nfqueue has a listener in the node's namespace (it binds it only
        after its informers have synced)."""
        def bound() -> bool:
            text = in_netns(peer.netns, lambda: Path("/proc/thread-self/net/netfilter/nfnetlink_queue").read_text())
            return QUEUE_ID in parse_queue_table(text)

        try:
            peer.process.wait_until(bound, timeout, f"bound to nfqueue {QUEUE_ID}")
        except StartupError as exc:
            raise PeerError(f"{TOOL} on {peer.node} did not start: {exc}") from exc

    def pids(self) -> dict[str, int]:
        return {p.node: p.process.pid for p in self.procs.values() if p.process.pid is not None}

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the peer processes, their relays)."""
        peers = sum(cpu_seconds(p.process.pid) for p in self.procs.values() if p.process.pid)
        relays = sum(cpu_seconds(p.relay.pid) for p in self.procs.values() if p.relay.pid)
        return peers, relays

    def stop(self) -> None:
        """Stop the peers and relays, remove the hooks this started (the peer's own table, if
        the kernel took it, goes with ``reset_node_netfilter``)."""
        for peer in self.procs.values():
            peer.process.stop(grace=10.0)
            peer.relay.stop()
        for netns, tool in self.shimmed:
            with contextlib.suppress(PeerError):
                netns_run(netns, tool, "-t", "mangle", "-D", "POSTROUTING", "-j", SHIM_CHAIN)
                netns_run(netns, tool, "-t", "mangle", "-F", SHIM_CHAIN)
                netns_run(netns, tool, "-t", "mangle", "-X", SHIM_CHAIN)
        self.procs.clear()
        self.shimmed.clear()


# -- the relay process ---------------------------------------------------------------------------

def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


def _write_ready(path: Path, port: int) -> None:
    path.write_text(json.dumps({"pid": os.getpid(), "port": port, "at": time.time()}))


async def relay(netns: str, port: int, target: tuple[str, int], ready_file: Path | None) -> None:
    """Accept on 127.0.0.1:``port`` inside ``netns``; connect to ``target`` from this
    process's own (the host's) namespace; copy bytes both ways until SIGTERM."""
    sock = in_netns(netns, _listener, port)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            log.warning("relay: cannot reach %s:%d: %s", *target, exc)
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    server = await asyncio.start_server(handle, sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        _write_ready(ready_file, port)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netfence_lab.peer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("relay", help="forward 127.0.0.1:PORT inside a namespace to 127.0.0.1:PORT on the host")
    rel.add_argument("--netns", required=True)
    rel.add_argument("--port", type=int, required=True)
    rel.add_argument("--target-port", type=int, default=None, help="default: --port")
    rel.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(levelname)s %(message)s")
    asyncio.run(relay(args.netns, args.port, ("127.0.0.1", args.target_port or args.port), args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
