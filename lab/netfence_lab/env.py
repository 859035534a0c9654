"""A whole Netfence test bed on one machine: the pieces wired together.

``NetfenceEnv`` takes a running :class:`LocalCluster` and adds a network
fabric with N namespace nodes (the harness plays kubelet), one real
``netfence-agent`` process per node (programming that node's namespace), and
one or more real ``netfence-controller`` processes. Tests, the demo and the
conformance runner all use it.

Enforcement barrier (:meth:`NetfenceEnv.wait_enforced`): the system's own
signals, never a sleep. A caller passes the resource versions its API writes
returned, per kind; the controller publishes in etcd (``meta/observed``, part
of a commit) the highest resource version it has processed per kind, so the
first commit whose observed versions reach the caller's marks contains the
effect of those writes. Enforced means: every node's agent reports an applied
revision at least that commit's, and every ClusterPolicyStatus of an existing
NetworkPolicy says ``Enforced`` for the policy's current generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from netfence.model.cluster_policy import API_GROUP as CNP_GROUP
from netfence.model.cluster_policy import API_VERSIONS as CNP_VERSIONS
from netfence.model.cluster_policy import PLURAL as CNP_PLURAL
from netfence_lab.cluster import LocalCluster
from netfence_lab.etcd_server import EtcdServer
from netfence_lab.fabric import Fabric, node_pod_cidr6
from netfence_lab.kubelet import Kubelet
from netfence_lab.process import ManagedProcess, free_port

if TYPE_CHECKING:
    from netfence.store.settings import EtcdSettings

log = logging.getLogger(__name__)

SYSTEM_NAMESPACES = {"default", "kube-system", "kube-public", "kube-node-lease"}
IP_FAMILY_CHOICES: tuple[tuple[str, ...], ...] = (("ipv4",), ("ipv4", "ipv6"), ("ipv6", "ipv4"))


class EnforcementTimeout(TimeoutError):
    """The system did not report enforcement in time; the message says what lagged."""


@dataclass
class AgentProc:
    node_index: int
    node: str
    netns: str
    health_port: int
    process: ManagedProcess
    metrics_port: int = 0  # its Prometheus /metrics on 127.0.0.1 (docs/metrics.md)


@dataclass(frozen=True)
class EtcdTls:
    """Client TLS of the processes towards Netfence's etcd: the files (e.g. in a
    ``testbed.etcd_tls.SecretVolume``) and how often they are re-read."""

    ca: Path
    cert: Path
    key: Path
    reload_seconds: float = 30.0


@dataclass
class NetfenceEnv:
    cluster: LocalCluster
    workdir: Path
    nodes: int = 2
    prefix: str = field(default_factory=lambda: f"/netfence/t{uuid.uuid4().hex[:8]}/")
    resync_seconds: float = 5.0
    report_ttl: int = 4
    lease_ttl: int = 3
    agent_extra_args: tuple[str, ...] = ()
    controller_extra_args: tuple[str, ...] = ()
    # Netfence's etcd: the cluster's unless given (e.g. a ``testbed.etcd_tls.TlsEtcdServer``);
    # ``etcd_tls``: the client certificate files the processes and the barrier use.
    etcd: EtcdServer | None = None
    etcd_tls: EtcdTls | None = None
    fabric: Fabric | None = None
    kubelet: Kubelet | None = None
    # node index -> its pod CIDR (None: the fabric's default, 10.244.<i>.0/24)
    pod_cidr: Callable[[int], str] | None = None
    # IP families of nodes and pods, the primary one first: ("ipv4",) (IPv4 only; agents run with
    # --no-ipv6), ("ipv4", "ipv6") or ("ipv6", "ipv4") (dual-stack: IPv6 pod CIDRs fd00:10:244:<i>::/64,
    # both addresses per pod, agents program ip6tables too)
    ip_families: tuple[str, ...] = ("ipv4",)
    api: client.ApiClient | None = None
    agents: dict[int, AgentProc] = field(default_factory=dict)
    controllers: dict[str, ManagedProcess] = field(default_factory=dict)
    controller_metrics_ports: dict[str, int] = field(default_factory=dict)  # identity -> /metrics port
    # Deletions leave no resource version to wait for: instead the barrier waits
    # until the committed model no longer refers to what was deleted.
    _gone: list[Callable[[Mapping[str, bytes]], bool]] = field(default_factory=list)

    # --- lifecycle ---------------------------------------------------------------

    async def start_bed(self) -> tuple[Fabric, Kubelet]:
        """The API client, the fabric and the kubelet: what every enforcer's bed needs (no nodes yet)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api = await config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        # A bed starts with no pods: sweep those an earlier test left behind (it may have crashed
        # before its teardown), so that they are not endpoints on nodes this bed has no agent for.
        await delete_orphan_pods(client.CoreV1Api(self.api))
        if self.ip_families not in IP_FAMILY_CHOICES:
            raise ValueError(f"ip_families {self.ip_families}: expected one of {IP_FAMILY_CHOICES}")
        pod_cidr6 = node_pod_cidr6 if self.dual_stack else None
        if self.pod_cidr is None:
            self.fabric = Fabric(workdir=self.workdir / "fabric", pod_cidr6=pod_cidr6)
        else:
            self.fabric = Fabric(workdir=self.workdir / "fabric", pod_cidr=self.pod_cidr, pod_cidr6=pod_cidr6)
        self.kubelet = Kubelet(self.api, self.fabric, ipv6_primary=self.ip_families[0] == "ipv6")
        return self.fabric, self.kubelet

    async def start(self, controllers: int = 1) -> NetfenceEnv:
        _, kubelet = await self.start_bed()
        try:
            for index in range(self.nodes):
                await kubelet.add_node(index)
                self.start_agent(index)
            for n in range(controllers):
                self.start_controller(f"controller-{n}")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> NetfenceEnv:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for proc in self.controllers.values():
            proc.stop()
        for agent in self.agents.values():
            agent.process.stop()
        if self.kubelet is not None:
            with contextlib.suppress(Exception):
                await self.kubelet.close()
        if self.fabric is not None:
            self.fabric.close()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.close()

    @property
    def dual_stack(self) -> bool:
        return "ipv6" in self.ip_families

    def _python(self) -> list[str]:
        return [sys.executable, "-m"]

    @property
    def etcd_endpoint(self) -> str:
        return (self.etcd or self.cluster.netfence_etcd).endpoint

    def etcd_args(self) -> list[str]:
        args = [f"--etcd-endpoints={self.etcd_endpoint}", f"--etcd-prefix={self.prefix}"]
        if self.etcd_tls is not None:
            tls = self.etcd_tls
            args += [f"--etcd-ca={tls.ca}", f"--etcd-cert={tls.cert}", f"--etcd-key={tls.key}",
                     f"--etcd-cert-reload-seconds={tls.reload_seconds}"]
        return args

    def etcd_settings(self) -> EtcdSettings:
        """``EtcdSettings`` of a client of this env's etcd and prefix (with its TLS files, if any)."""
        from netfence.store.settings import EtcdSettings

        tls = self.etcd_tls
        if tls is None:
            return EtcdSettings(endpoints=[self.etcd_endpoint], prefix=self.prefix)
        return EtcdSettings(endpoints=[self.etcd_endpoint], prefix=self.prefix, ca_file=tls.ca,
                            cert_file=tls.cert, key_file=tls.key)

    def start_controller(self, identity: str, extra: tuple[str, ...] = ()) -> ManagedProcess:
        metrics_port = free_port()
        argv = [
            *self._python(), "netfence.controller.main",
            f"--kubeconfig={self.cluster.kubeconfig}",
            f"--identity={identity}",
            f"--lease-ttl={self.lease_ttl}",
            f"--health-port={free_port()}",
            "--status-interval-ms=100",
            f"--metrics-port={metrics_port}", "--metrics-host=127.0.0.1",
            *self.etcd_args(), *self.controller_extra_args, *extra,
        ]
        self.controller_metrics_ports[identity] = metrics_port
        proc = ManagedProcess(identity, argv, self.workdir / f"{identity}.log", env=self._env())
        proc.start()
        self.controllers[identity] = proc
        return proc

    def start_agent(
        self, index: int, extra: tuple[str, ...] = (), env: Mapping[str, str] | None = None
    ) -> AgentProc:
        """Start node ``index``'s agent; ``env`` adds to (or overrides) its environment."""
        assert self.fabric is not None and self.kubelet is not None
        node = self.kubelet.nodes[index]
        netns = self.fabric.node(index).netns
        port = free_port()
        metrics_port = free_port()
        argv = [
            *self._python(), "netfence.agent.main",
            f"--node={node}",
            f"--netns={netns}",
            *([] if self.dual_stack else ["--no-ipv6"]),
            f"--resync-seconds={self.resync_seconds}",
            f"--report-ttl={self.report_ttl}",
            f"--health-port={port}",
            f"--metrics-port={metrics_port}", "--metrics-host=127.0.0.1",
            *self.etcd_args(), *self.agent_extra_args, *extra,
        ]
        log_path = self.workdir / f"agent-{node}.log"
        proc = ManagedProcess(f"agent-{node}", argv, log_path, env={**self._env(), **(env or {})})
        proc.start()
        agent = AgentProc(index, node, netns, port, proc, metrics_port)
        self.agents[index] = agent
        return agent

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # --- the enforcement barrier -----------------------------------------------------

    async def _etcd_reader(self) -> Any:
        from netfence.store.etcd import EtcdStore

        store = EtcdStore(self.etcd_settings())
        await store.connect()
        return store

    async def wait_enforced(
        self, marks: Mapping[str, int] | None = None, timeout: float = 60.0, statuses: bool = True
    ) -> float:
        """Wait until everything written up to ``marks`` is enforced on every node; seconds waited.

        ``statuses=False`` skips the ClusterPolicyStatus check (controller-only test beds,
        where no agent runs, correctly report policies as Degraded).
        """
        started = time.monotonic()
        deadline = started + timeout
        store = await self._etcd_reader()
        try:
            commit = await self._wait_observed(store, dict(marks or {}), deadline)
            await self._wait_nodes(store, commit, deadline)
            if statuses:
                await self._wait_statuses(deadline)
        finally:
            await store.close()
        return time.monotonic() - started

    async def _wait_observed(self, store: Any, marks: dict[str, int], deadline: float) -> int:
        last: dict[str, Any] = {}
        while True:
            state = await store.committed_snapshot()
            raw = state.values.get("meta/observed")
            if raw is not None and state.commit_revision > 0:
                last = json.loads(raw).get("resourceVersions", {})
                caught_up = all(last.get(kind, 0) >= rv for kind, rv in marks.items())
                if caught_up and all(gone(state.values) for gone in self._gone):
                    self._gone.clear()
                    return int(state.commit_revision)
            if time.monotonic() > deadline:
                raise EnforcementTimeout(
                    f"the controller has not caught up with the API server: observed {last}, need {marks}"
                    + (f" and {len(self._gone)} deletions" if self._gone else "")
                )
            await asyncio.sleep(0.05)

    async def _wait_nodes(self, store: Any, commit: int, deadline: float) -> None:
        """Every agent enforces the committed state at ``commit``: its report says it applied
        ``commit`` or later, or — agents skip commits that do not touch their node and do not
        report them (issue 11) — its health says it has seen ``commit`` and enforces it
        (``syncedRevision``, without an error)."""
        nodes = {a.node for a in self.agents.values()}
        ports = {a.node: a.health_port for a in self.agents.values()}
        while True:
            reports = await store.read_reports()
            lagging = {
                n: (reports.get(n) or {}).get("appliedRevision", 0)
                for n in nodes
                if (reports.get(n) or {}).get("appliedRevision", 0) < commit
            }
            for node in sorted(lagging):
                health = await _agent_health(ports[node])
                if health and not health.get("lastError") and int(health.get("syncedRevision") or 0) >= commit:
                    del lagging[node]
            if not lagging:
                return
            if time.monotonic() > deadline:
                errors = {n: (reports.get(n) or {}).get("lastError") for n in lagging}
                raise EnforcementTimeout(
                    f"nodes have not applied revision {commit}: {lagging} (errors: {errors})"
                )
            await asyncio.sleep(0.05)

    async def _wait_statuses(self, deadline: float) -> None:
        assert self.api is not None
        net = client.NetworkingV1Api(self.api)
        custom = client.CustomObjectsApi(self.api)
        while True:
            policies = (await net.list_network_policy_for_all_namespaces()).items
            cluster_policies = await _list_cluster_policies(custom)
            statuses = {
                s["metadata"]["name"]: s
                for s in (await custom.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses"))[
                    "items"
                ]
            }
            pending = []
            cluster_names = {cnp["metadata"]["name"] for cnp in cluster_policies}
            for policy in policies:
                name = f"{policy.metadata.namespace}.{policy.metadata.name}"
                if policy.metadata.namespace == "cnp" and policy.metadata.name in cluster_names:
                    continue  # its status name is the ClusterNetworkPolicy's, which owns it (docs/design.md)
                obj = statuses.get(name, {})
                status = obj.get("status") or {}
                # policyGeneration: the NetworkPolicy's; observedGeneration: the status object's own
                current = (
                    status.get("policyGeneration") == policy.metadata.generation
                    and status.get("observedGeneration") == obj.get("metadata", {}).get("generation")
                )
                if status.get("phase") != "Enforced" or not current:
                    pending.append(f"{name}={status.get('phase', 'missing')}")
            for cnp in cluster_policies:  # ClusterNetworkPolicy: status object cnp.<name>
                name = f"cnp.{cnp['metadata']['name']}"
                obj = statuses.get(name, {})
                status = obj.get("status") or {}
                current = (
                    status.get("policyGeneration") == cnp["metadata"].get("generation")
                    and status.get("observedGeneration") == obj.get("metadata", {}).get("generation")
                )
                if status.get("phase") != "Enforced" or not current:
                    pending.append(f"{name}={status.get('phase', 'missing')}")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise EnforcementTimeout(f"ClusterPolicyStatus not Enforced: {', '.join(pending)}")
            await asyncio.sleep(0.05)

    # --- API helpers that return the resource version of the write ------------------

    async def apply_manifest(self, manifest: dict[str, Any]) -> tuple[str, int]:
        """Create or replace a NetworkPolicy or ClusterNetworkPolicy; returns (kind marker, resourceVersion)."""
        assert self.api is not None
        if manifest.get("kind") == "ClusterNetworkPolicy":
            return await self._apply_cluster_policy(manifest)
        if manifest.get("kind") != "NetworkPolicy":
            raise ValueError(f"only NetworkPolicy manifests can be applied, got {manifest.get('kind')!r}")
        net = client.NetworkingV1Api(self.api)
        ns = manifest["metadata"].get("namespace", "default")
        name = manifest["metadata"]["name"]
        try:
            current = await net.read_namespaced_network_policy(name, ns)
            body = dict(manifest)
            body["metadata"] = {**manifest["metadata"], "resourceVersion": current.metadata.resource_version}
            result = await net.replace_namespaced_network_policy(name, ns, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            result = await net.create_namespaced_network_policy(ns, manifest)
        return "networkpolicies", int(result.metadata.resource_version)

    async def _apply_cluster_policy(self, manifest: dict[str, Any]) -> tuple[str, int]:
        custom = client.CustomObjectsApi(self.api)
        group, _, version = str(manifest.get("apiVersion", "")).partition("/")
        if group != CNP_GROUP or not version:
            raise ValueError(
                f"a ClusterNetworkPolicy has apiVersion {CNP_GROUP}/<version>, got {manifest.get('apiVersion')!r}"
            )
        name = manifest["metadata"]["name"]
        try:
            current = await custom.get_cluster_custom_object(group, version, CNP_PLURAL, name)
            body = dict(manifest)
            body["metadata"] = {**manifest["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
            result = await custom.replace_cluster_custom_object(group, version, CNP_PLURAL, name, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            result = await custom.create_cluster_custom_object(group, version, CNP_PLURAL, manifest)
        return "clusternetworkpolicies", int(result["metadata"]["resourceVersion"])

    async def delete_cluster_policy(self, name: str) -> tuple[str, int]:
        assert self.api is not None
        await client.CustomObjectsApi(self.api).delete_cluster_custom_object(
            CNP_GROUP, CNP_VERSIONS[0], CNP_PLURAL, name
        )
        key = f"cpolicies/{name}"
        self._gone.append(lambda values: key not in values)
        return "clusternetworkpolicies", 0

    async def delete_policy(self, namespace: str, name: str) -> tuple[str, int]:
        assert self.api is not None
        net = client.NetworkingV1Api(self.api)
        await net.delete_namespaced_network_policy(name, namespace)
        key = f"policies/{namespace}/{name}"
        self._gone.append(lambda values: key not in values)
        return "networkpolicies", 0

    async def label(
        self, kind: str, name: str, labels: Mapping[str, str | None], namespace: str | None = None
    ) -> tuple[str, int]:
        assert self.api is not None
        core = client.CoreV1Api(self.api)
        patch = {"metadata": {"labels": dict(labels)}}
        if kind == "Pod":
            assert namespace is not None
            result = await core.patch_namespaced_pod(name, namespace, patch)
            return "pods", int(result.metadata.resource_version)
        result = await core.patch_namespace(name, patch)
        return "namespaces", int(result.metadata.resource_version)

    async def ensure_namespace(self, name: str, labels: Mapping[str, str]) -> tuple[str, int]:
        assert self.api is not None and self.kubelet is not None
        await self.kubelet.ensure_namespace(name, labels)
        ns = await client.CoreV1Api(self.api).read_namespace(name)
        return "namespaces", int(ns.metadata.resource_version)

    async def create_pod(
        self, namespace: str, name: str, labels: Mapping[str, str], ports: list[tuple[int, str]], node: int
    ) -> tuple[str, int]:
        assert self.api is not None and self.kubelet is not None
        await self.kubelet.create_pod(namespace, name, labels, ports, node)
        pod = await client.CoreV1Api(self.api).read_namespaced_pod(name, namespace)
        return "pods", int(pod.metadata.resource_version)

    async def delete_pod(self, namespace: str, name: str) -> tuple[str, int]:
        assert self.api is not None and self.kubelet is not None
        ips = self.kubelet.pod(namespace, name).ips
        await self.kubelet.delete_pod(namespace, name)
        self._gone.append(lambda values: not any(_refers_to_pod(values, namespace, name, ip) for ip in ips))
        return "pods", 0

    # --- reset between scenarios ---------------------------------------------------

    async def delete_user_state(self) -> None:
        """Delete all NetworkPolicies, pods and non-system namespaces (finalizing them ourselves:
        no namespace controller runs in the test bed)."""
        assert self.api is not None and self.kubelet is not None
        core = client.CoreV1Api(self.api)
        net = client.NetworkingV1Api(self.api)
        for policy in (await net.list_network_policy_for_all_namespaces()).items:
            with contextlib.suppress(ApiException):
                await net.delete_namespaced_network_policy(policy.metadata.name, policy.metadata.namespace)
        custom = client.CustomObjectsApi(self.api)
        for cnp in await _list_cluster_policies(custom):
            with contextlib.suppress(ApiException):
                await custom.delete_cluster_custom_object(
                    CNP_GROUP, CNP_VERSIONS[0], CNP_PLURAL, cnp["metadata"]["name"]
                )
        for handle in list(self.kubelet.pods.values()):
            await self.kubelet.delete_pod(handle.namespace, handle.name)
        await delete_orphan_pods(core)
        for ns in (await core.list_namespace()).items:
            if ns.metadata.name in SYSTEM_NAMESPACES:
                continue
            await finalize_namespace(core, ns.metadata.name)


async def _list_cluster_policies(custom: client.CustomObjectsApi) -> list[dict[str, Any]]:
    """Every ClusterNetworkPolicy; none when the CRD is not installed."""
    try:
        listing = await custom.list_cluster_custom_object(CNP_GROUP, CNP_VERSIONS[0], CNP_PLURAL)
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise
    return list(listing.get("items", []))


def _refers_to_pod(values: Mapping[str, bytes], namespace: str, name: str, ip: str) -> bool:
    """Whether the committed model still has an endpoint of the pod or its address in a set."""
    suffix = f"/{namespace}/{name}"
    for key, raw in values.items():
        if key.startswith("endpoints/") and key.endswith(suffix):
            return True
        if key.startswith(("sets/", "sets2/")):  # whole sets (schema 1) or chunks (schema 2)
            members = json.loads(raw).get("members", [])
            if any(m == ip or m.startswith(ip + ",") for m in members):
                return True
    return False


async def delete_orphan_pods(core: client.CoreV1Api) -> None:
    """Delete, at once, every pod outside the system namespaces that no kubelet of ours runs.

    Tests that write pods straight to the API (bound to nodes without a kubelet) leave pods that
    no kubelet ever confirms deleted, and finalizing their namespace does not remove them (no
    namespace controller runs here). Left behind, they are endpoints on nodes without an agent
    for every later test in the same cluster, e.g. holding the layout migration gate closed.
    """
    for pod in (await core.list_pod_for_all_namespaces()).items:
        if pod.metadata.namespace in ("kube-system", "kube-public", "kube-node-lease"):
            continue
        with contextlib.suppress(ApiException):  # already gone
            await core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)


async def finalize_namespace(core: client.CoreV1Api, name: str) -> None:
    """Delete a namespace and finalize it (the job of the namespace controller, absent here)."""
    with contextlib.suppress(ApiException):
        await core.delete_namespace(name)
    with contextlib.suppress(ApiException):
        await core.replace_namespace_finalize(
            name, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "spec": {"finalizers": []}}
        )
    for _ in range(100):
        try:
            await core.read_namespace(name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        await asyncio.sleep(0.05)


async def _agent_health(port: int) -> dict[str, Any] | None:
    """An agent's ``/healthz`` body on 127.0.0.1 (None when it does not answer)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session, \
                session.get(f"http://127.0.0.1:{port}/healthz") as response:
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return body if isinstance(body, dict) else None
