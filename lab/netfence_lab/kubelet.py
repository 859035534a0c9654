"""The test bed's "kubelet": Kubernetes Node and Pod objects backed by the namespace fabric.

It registers Nodes (pod CIDR, InternalIP, Ready), creates pods in two halves
(the pod's network namespace and servers via :class:`~netfence_lab.fabric.Fabric`,
then the Pod object bound to its node with ``spec.nodeName``, then its status
through the status subresource) and deletes them again.

Addresses follow the conformance format: the k-th pod placed on node ``i``
(counting from 0, in creation order) gets ``10.244.i.(10+k)``; an address is
never reused within one Kubelet's life, even after its pod is deleted. On a
dual-stack fabric it also gets host number ``10+k`` of the node's IPv6 pod CIDR
(``fd00:10:244:i::a`` for k=0), and Node and Pod list both families, the primary
one first (``spec.podCIDRs``, ``status.podIPs``; IPv4 unless ``ipv6_primary``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from netfence_lab.fabric import Fabric, NodeNet

__all__ = ["Kubelet", "PodHandle", "cidr_pod_ip", "node_name", "pod_ip", "port_name"]

log = logging.getLogger(__name__)

FIRST_HOST = 10
LAST_HOST = 254
CONTAINER = "app"
IMAGE = "netfence/pause"


def node_name(index: int) -> str:
    return f"node-{index}"


def pod_ip(node_index: int, k: int) -> str:
    """Address of the k-th pod (from 0) placed on node ``node_index``."""
    host = FIRST_HOST + k
    if host > LAST_HOST:
        raise ValueError(f"node {node_index} has no pod addresses left (k={k})")
    return f"10.244.{node_index}.{host}"


def cidr_pod_ip(pod_cidr: str, k: int) -> str:
    """Address of the k-th pod (from 0) in ``pod_cidr``: host number ``10 + k`` of the CIDR (for
    ``10.244.i.0/24`` the same as :func:`pod_ip`)."""
    net = ipaddress.ip_network(pod_cidr)
    host = FIRST_HOST + k
    if host >= net.num_addresses - 1:
        raise ValueError(f"pod CIDR {pod_cidr} has no pod addresses left (k={k})")
    return str(net.network_address + host)


def port_name(port: int, protocol: str) -> str:
    """Container port name from the conformance format, e.g. ``serve-80-tcp``."""
    return f"serve-{port}-{protocol.lower()}"


@dataclass(frozen=True)
class PodHandle:
    ip: str
    netns: str
    node: str  # Node object name
    namespace: str = ""
    name: str = ""
    node_index: int = 0
    ips: tuple[str, ...] = ()  # every address, primary first (``ip``); () means (ip,)

    def __post_init__(self) -> None:
        if not self.ips:
            object.__setattr__(self, "ips", (self.ip,))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    """Plays kubelet for every node of one fabric. Use from one event loop."""

    def __init__(self, api_client: ApiClient, fabric: Fabric, ipv6_primary: bool = False) -> None:
        self.api = CoreV1Api(api_client)
        self.fabric = fabric
        self.ipv6_primary = ipv6_primary  # dual-stack fabrics: IPv6 first in podCIDRs and podIPs
        self.nodes: dict[int, str] = {}
        self.pods: dict[str, PodHandle] = {}  # "ns/name" -> handle
        self._placed: dict[int, int] = {}  # node index -> pods placed so far (addresses used)

    # -- nodes ---------------------------------------------------------------

    async def add_node(self, index: int) -> str:
        """Create the node's namespace and register (or adopt) Node ``node-<index>`` as Ready."""
        name = node_name(index)
        net = await asyncio.to_thread(self.fabric.add_node, index)
        cidrs = self._primary_first(net.pod_cidr, net.pod_cidr6)
        body: Any = {  # plain JSON bodies: the client's typed stubs only know its model classes
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": list(cidrs)},
        }
        try:
            await self.api.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Left over from an earlier test in the same cluster: adopt it. podCIDRs are immutable
            # once set, so an old Node with other CIDRs (or another family order) is replaced.
            old = await self.api.read_node(name)
            if old.spec.pod_cidrs not in (None, [], list(cidrs)):
                await self.api.delete_node(name)
                await self.api.create_node(body)
            else:
                await self.api.patch_node(name, body)
        await self.api.patch_node_status(name, self._node_status(name, net))
        self.nodes[index] = name
        return name

    @staticmethod
    def _node_status(name: str, net: NodeNet) -> dict[str, Any]:
        now = _now()
        return {"status": {
            "addresses": [{"type": "InternalIP", "address": net.underlay_ip},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "netfence test-bed kubelet is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "240"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "240"},
        }}

    # -- namespaces ----------------------------------------------------------

    async def ensure_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Create the namespace, or merge ``labels`` into an existing one."""
        body: Any = {"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": name, "labels": dict(labels or {})}}
        try:
            await self.api.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            if labels:
                await self.api.patch_namespace(name, {"metadata": {"labels": dict(labels)}})

    # -- pods ----------------------------------------------------------------

    def _primary_first(self, ipv4: str, ipv6: str | None) -> tuple[str, ...]:
        if ipv6 is None:
            return (ipv4,)
        return (ipv6, ipv4) if self.ipv6_primary else (ipv4, ipv6)

    def allocate_ip(self, node_index: int) -> str:
        return self.allocate_ips(node_index)[0]

    def allocate_ips(self, node_index: int) -> tuple[str, str | None]:
        """The next pod's (IPv4, IPv6) addresses on the node (IPv6 None on an IPv4-only fabric)."""
        k = self._placed.get(node_index, 0)
        net = self.fabric.nodes.get(node_index)
        ip = pod_ip(node_index, k) if net is None else cidr_pod_ip(net.pod_cidr, k)
        ip6 = None if net is None or net.pod_cidr6 is None else cidr_pod_ip(net.pod_cidr6, k)
        self._placed[node_index] = k + 1
        return ip, ip6

    async def create_pod(self, namespace: str, name: str, labels: Mapping[str, str],
                         ports: Sequence[tuple[int, str]], node_index: int,
                         before_publish: Callable[[PodHandle], Awaitable[None]] | None = None) -> PodHandle:
        """Create the pod's namespace and servers, then its Pod object, bound and Running.

        As with a real kubelet and CNI, the pod's network exists and its servers answer
        before its address is published (``status.podIPs``); ``before_publish`` is awaited
        in between (the Pod object exists, without an address).
        """
        key = f"{namespace}/{name}"
        if key in self.pods:
            raise ValueError(f"pod {key} already exists")
        if node_index not in self.nodes:
            raise ValueError(f"node {node_index} is not registered (call add_node first)")
        ip, ip6 = self.allocate_ips(node_index)
        net = await asyncio.to_thread(self.fabric.add_pod, node_index, key, ip, ports, name=key, ip6=ip6)
        ips = self._primary_first(ip, ip6)
        handle = PodHandle(ip=ips[0], netns=net.netns, node=self.nodes[node_index], namespace=namespace,
                           name=name, node_index=node_index, ips=ips)
        try:
            body: Any = self._pod_body(handle, labels, ports)
            await self.api.create_namespaced_pod(namespace, body)
            if before_publish is not None:
                await before_publish(handle)
            await self.api.patch_namespaced_pod_status(name, namespace, self._pod_status(handle, net.node))
        except BaseException:
            await asyncio.to_thread(self.fabric.remove_pod, key)
            with contextlib.suppress(ApiException):
                await self.api.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
            raise
        self.pods[key] = handle
        return handle

    @staticmethod
    def _pod_body(handle: PodHandle, labels: Mapping[str, str],
                  ports: Sequence[tuple[int, str]]) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": handle.name, "namespace": handle.namespace, "labels": dict(labels)},
            "spec": {
                "nodeName": handle.node,
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 0,
                "containers": [{
                    "name": CONTAINER, "image": IMAGE,
                    "ports": [{"name": port_name(p, proto), "containerPort": p, "protocol": proto.upper()}
                              for p, proto in ports],
                }],
            },
        }

    @staticmethod
    def _pod_status(handle: PodHandle, node: NodeNet) -> dict[str, Any]:
        now = _now()
        conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                      for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        return {"status": {
            "phase": "Running",
            "podIP": handle.ip, "podIPs": [{"ip": ip} for ip in handle.ips],
            "hostIP": node.underlay_ip, "hostIPs": [{"ip": node.underlay_ip}],
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": [{
                "name": CONTAINER, "image": IMAGE, "imageID": "", "ready": True, "started": True,
                "restartCount": 0, "state": {"running": {"startedAt": now}},
            }],
        }}

    def pod(self, namespace: str, name: str) -> PodHandle:
        return self.pods[f"{namespace}/{name}"]

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Delete the Pod object (grace period 0) and the pod's namespace. Its address is not reused."""
        key = f"{namespace}/{name}"
        try:
            await self.api.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise
        await asyncio.to_thread(self.fabric.remove_pod, key)
        self.pods.pop(key, None)

    async def close(self, delete_nodes: bool = True) -> None:
        """Delete every pod this kubelet created (objects and namespaces), and its Node objects."""
        for handle in list(self.pods.values()):
            try:
                await self.delete_pod(handle.namespace, handle.name)
            except ApiException as exc:
                log.warning("cannot delete pod %s: %s", handle.key, exc)
                await asyncio.to_thread(self.fabric.remove_pod, handle.key)
                self.pods.pop(handle.key, None)
        if delete_nodes:
            for name in list(self.nodes.values()):
                with contextlib.suppress(ApiException):
                    await self.api.delete_node(name)
            self.nodes.clear()
