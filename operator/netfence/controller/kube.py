"""Thin adapter over the Kubernetes API (kubernetes_asyncio): listings and ClusterPolicyStatus I/O.

Objects are handled as plain dicts (the same shape Kopf hands to handlers), so
the pure model parsers serve both the Kopf event stream and full listings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from netfence.model.cluster_policy import API_GROUP as CNP_API_GROUP
from netfence.model.cluster_policy import API_VERSIONS as CNP_API_VERSIONS
from netfence.model.cluster_policy import PLURAL as CNP_API_PLURAL

log = logging.getLogger(__name__)

CPS_GROUP = "netfence.dev"
CPS_VERSION = "v1alpha1"
CPS_PLURAL = "clusterpolicystatuses"
CPS_KIND = "ClusterPolicyStatus"
# ClusterNetworkPolicy (sigs.k8s.io/network-policy-api v0.3.0); its CRD is optional.
CNP_GROUP = CNP_API_GROUP
CNP_VERSIONS = CNP_API_VERSIONS
CNP_PLURAL = CNP_API_PLURAL
# Seconds for one page (2000 objects) of a listing: a request to a starting or dying API server
# must not hold up the re-list that follows a watch gap (it is retried).
LIST_PAGE_TIMEOUT = 30.0


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# ClusterPolicyStatus names of ClusterNetworkPolicies start with this and a dot: a NetworkPolicy in
# a namespace of this name wants the same name as the cluster policy of its name (see cps_claimants).
CLUSTER_STATUS_PREFIX = "cnp"


def cps_name(namespace: str, name: str) -> str:
    """ClusterPolicyStatus name of a NetworkPolicy: ``<namespace>.<name>``; of a
    ClusterNetworkPolicy (empty namespace): ``cnp.<name>``."""
    return f"{namespace}.{name}" if namespace else f"{CLUSTER_STATUS_PREFIX}.{name}"


def cps_claimants(name: str) -> tuple[tuple[str, str], ...]:
    """The policies (``(namespace, name)``, ``""`` for a ClusterNetworkPolicy) whose status object
    would be called ``name``, the one that owns it when both exist first: ``cnp.<x>`` is wanted by
    the ClusterNetworkPolicy ``x`` and by the NetworkPolicy ``x`` of namespace ``cnp``; any other
    name by one NetworkPolicy (a namespace name has no dot)."""
    namespace, _, policy = name.partition(".")
    if namespace == CLUSTER_STATUS_PREFIX:
        return ("", policy), (namespace, policy)
    return ((namespace, policy),)


@dataclass
class KindListing:
    """The objects of one kind at one snapshot: ``resource_version`` is the list's own
    ``metadata.resourceVersion`` (of the first page; continue tokens keep later pages in
    the same snapshot), 0 if the server sent none."""

    items: list[dict[str, Any]] = field(default_factory=list)
    resource_version: int = 0


@dataclass
class Listing:
    """A full listing of the objects the controller compiles (one snapshot per kind)."""

    pods: list[dict[str, Any]] = field(default_factory=list)
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    resource_versions: dict[str, int] = field(default_factory=dict)  # kind (KINDS spelling) -> list rv


class KubeApi:
    """The controller's only door to the API server (besides Kopf's watches)."""

    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        # Whether the last listing of ClusterNetworkPolicies found the CRD (None: not listed yet).
        self.cluster_policies_served: bool | None = None

    @classmethod
    async def connect(cls, kubeconfig: Path | None) -> KubeApi:
        if kubeconfig is not None:
            api_client = await config.new_client_from_config(config_file=str(kubeconfig))
        else:
            try:
                config.load_incluster_config()
                api_client = client.ApiClient()
            except config.ConfigException:
                api_client = await config.new_client_from_config()
        return cls(api_client)

    async def close(self) -> None:
        await self.api_client.close()

    async def _list(self, call: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return (await self._list_snapshot(call, **kwargs)).items

    async def _list_snapshot(self, call: Any, **kwargs: Any) -> KindListing:
        listing = KindListing()
        token: str | None = None
        while True:
            resp = await call(_preload_content=False, limit=2000, _continue=token,
                              _request_timeout=LIST_PAGE_TIMEOUT, **kwargs)
            body = await resp.read()
            if not 200 <= resp.status <= 299:
                # _preload_content=False leaves the status check to us: a 404 for a kind whose CRD is
                # not installed answers "404 page not found", which is not JSON.
                raise ApiException(status=resp.status, reason=body[:200].decode(errors="replace").strip())
            data = json.loads(body)
            kind = str(data.get("kind", "")).removesuffix("List")
            version = data.get("apiVersion", "v1")
            meta = data.get("metadata", {})
            if token is None:
                listing.resource_version = _int(meta.get("resourceVersion"))
            for item in data.get("items", []):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", version)
                listing.items.append(item)
            token = meta.get("continue") or None
            if not token:
                return listing

    async def list_kind(self, kind: str) -> KindListing:
        """One kind the controller compiles (``pods``, ``namespaces``, ``networkpolicies``, ``nodes``)."""
        calls = {
            "pods": self.core.list_pod_for_all_namespaces,
            "namespaces": self.core.list_namespace,
            "networkpolicies": self.networking.list_network_policy_for_all_namespaces,
            "nodes": self.core.list_node,
        }
        if kind == CNP_PLURAL:
            return await self._list_cluster_policies()
        if kind not in calls:
            raise ValueError(f"unknown kind {kind!r}")
        return await self._list_snapshot(calls[kind])

    async def _list_cluster_policies(self) -> KindListing:
        """ClusterNetworkPolicies at the first API version served; none when the CRD is not installed."""
        for version in CNP_VERSIONS:
            try:
                listing = await self._list_snapshot(
                    self.custom.list_cluster_custom_object, group=CNP_GROUP, version=version, plural=CNP_PLURAL
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
            else:
                self.cluster_policies_served = True
                return listing
        log.debug("no ClusterNetworkPolicy CRD (%s, versions %s): nothing to list", CNP_GROUP, CNP_VERSIONS)
        self.cluster_policies_served = False
        return KindListing()

    async def list_world(self) -> Listing:
        """Every kind, one after the other (each at its own snapshot; merge them per kind)."""
        pods = await self.list_kind("pods")
        namespaces = await self.list_kind("namespaces")
        policies = await self.list_kind("networkpolicies")
        nodes = await self.list_kind("nodes")
        return Listing(
            pods=pods.items,
            namespaces=namespaces.items,
            policies=policies.items,
            nodes=nodes.items,
            resource_versions={
                "pods": pods.resource_version,
                "namespaces": namespaces.resource_version,
                "networkpolicies": policies.resource_version,
                "nodes": nodes.resource_version,
            },
        )

    # --- ClusterPolicyStatus -------------------------------------------------

    async def list_statuses(self) -> dict[str, dict[str, Any]]:
        items = await self._list(
            self.custom.list_cluster_custom_object, group=CPS_GROUP, version=CPS_VERSION, plural=CPS_PLURAL
        )
        return {item["metadata"]["name"]: item for item in items}

    async def create_status(self, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        body = {
            "apiVersion": f"{CPS_GROUP}/{CPS_VERSION}",
            "kind": CPS_KIND,
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "netfence"}},
            "spec": spec,
        }
        try:
            result: dict[str, Any] = await self.custom.create_cluster_custom_object(
                CPS_GROUP, CPS_VERSION, CPS_PLURAL, body
            )
            return result
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Merge ``spec`` into the object's spec; returns the object as the API server has it now
        (its ``metadata.generation`` moves when the spec changed)."""
        result: dict[str, Any] = await self.custom.patch_cluster_custom_object(
            CPS_GROUP, CPS_VERSION, CPS_PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
        )
        return result

    async def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Set ``.status`` (one JSON-patch ``add``: it replaces an existing member and creates
        a missing one, so a 422 means the status itself was rejected); returns the object as
        written (None when the object is gone)."""
        try:
            result: dict[str, Any] = await self.custom.patch_cluster_custom_object_status(
                CPS_GROUP,
                CPS_VERSION,
                CPS_PLURAL,
                name,
                [{"op": "add", "path": "/status", "value": status}],
                _content_type="application/json-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def delete_status(self, name: str) -> None:
        try:
            await self.custom.delete_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def post_event(self, involved: dict[str, str], reason: str, message: str, kind: str = "Warning") -> None:
        """Post a core/v1 Event about ``involved`` (an ObjectReference; cluster-scoped
        objects' events go to ``default``, as kubectl describe expects)."""
        namespace = involved.get("namespace") or "default"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "netfence-", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "netfence-controller"},
            "reportingComponent": "netfence-controller",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.core.create_namespaced_event(namespace, body)


def cps_reference(name: str) -> dict[str, str]:
    """ObjectReference of a ClusterPolicyStatus, for events."""
    return {"apiVersion": f"{CPS_GROUP}/{CPS_VERSION}", "kind": CPS_KIND, "name": name}


def policy_reference(namespace: str, name: str, uid: str = "") -> dict[str, str]:
    """ObjectReference of a NetworkPolicy (of a ClusterNetworkPolicy when ``namespace`` is empty), for events."""
    if not namespace:
        ref = {"apiVersion": f"{CNP_GROUP}/{CNP_VERSIONS[0]}", "kind": "ClusterNetworkPolicy", "name": name}
        if uid:
            ref["uid"] = uid
        return ref
    ref = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": namespace, "name": name}
    if uid:
        ref["uid"] = uid
    return ref


def api_error_text(exc: BaseException) -> str:
    """One line saying why an API call failed: the server's Status message when there is one."""
    if isinstance(exc, ApiException):
        message = ""
        try:
            body = json.loads(exc.body or "{}")
            message = str(body.get("message") or "") if isinstance(body, dict) else ""
        except (TypeError, ValueError):
            pass
        return f"{exc.status} {exc.reason}: {message}" if message else f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
