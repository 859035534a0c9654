"""Thin adapter over the Kubernetes API (kubernetes_asyncio): listings and ClusterPolicyStatus I/O.

Objects are handled as plain dicts (the same shape Kopf hands to handlers), so
the pure model parsers serve both the Kopf event stream and full listings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

CPS_GROUP = "netfence.dev"
CPS_VERSION = "v1alpha1"
CPS_PLURAL = "clusterpolicystatuses"
CPS_KIND = "ClusterPolicyStatus"


def cps_name(namespace: str, name: str) -> str:
    """ClusterPolicyStatus name of a NetworkPolicy: ``<namespace>.<name>``."""
    return f"{namespace}.{name}"


@dataclass
class Listing:
    """A full listing of the objects the controller compiles."""

    pods: list[dict[str, Any]] = field(default_factory=list)
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)


class KubeApi:
    """The controller's only door to the API server (besides Kopf's watches)."""

    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

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
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            resp = await call(_preload_content=False, limit=2000, _continue=token, **kwargs)
            data = json.loads(await resp.read())
            kind = str(data.get("kind", "")).removesuffix("List")
            version = data.get("apiVersion", "v1")
            for item in data.get("items", []):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", version)
                items.append(item)
            token = data.get("metadata", {}).get("continue") or None
            if not token:
                return items

    async def list_world(self) -> Listing:
        return Listing(
            pods=await self._list(self.core.list_pod_for_all_namespaces),
            namespaces=await self._list(self.core.list_namespace),
            policies=await self._list(self.networking.list_network_policy_for_all_namespaces),
            nodes=await self._list(self.core.list_node),
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

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        await self.custom.patch_cluster_custom_object(
            CPS_GROUP, CPS_VERSION, CPS_PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
        )

    async def patch_status(self, name: str, status: dict[str, Any]) -> bool:
        """Replace ``.status``; False when the object is gone."""
        try:
            await self.custom.patch_cluster_custom_object_status(
                CPS_GROUP,
                CPS_VERSION,
                CPS_PLURAL,
                name,
                [{"op": "replace", "path": "/status", "value": status}],
                _content_type="application/json-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 422:  # no status yet: "replace" needs an existing path
                await self.custom.patch_cluster_custom_object_status(
                    CPS_GROUP,
                    CPS_VERSION,
                    CPS_PLURAL,
                    name,
                    [{"op": "add", "path": "/status", "value": status}],
                    _content_type="application/json-patch+json",
                )
                return True
            raise
        return True

    async def delete_status(self, name: str) -> None:
        try:
            await self.custom.delete_cluster_custom_object(CPS_GROUP, CPS_VERSION, CPS_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
