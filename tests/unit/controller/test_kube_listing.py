"""KubeApi listings read raw responses (``_preload_content=False``): non-2xx answers are errors,
and a ClusterNetworkPolicy CRD that is not installed lists as nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from netfence.controller.kube import KubeApi


class Raw:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    async def read(self) -> bytes:
        return self.body


class Custom:
    def __init__(self, answers: dict[str, Raw]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def list_cluster_custom_object(self, **kwargs: Any) -> Raw:
        self.asked.append(kwargs["version"])
        return self.answers[kwargs["version"]]


def kube_with(custom: Custom) -> KubeApi:
    api = KubeApi(client.ApiClient())
    api.custom = custom  # type: ignore[assignment]
    return api


NOT_FOUND = Raw(404, b"404 page not found\n")


async def test_no_crd_lists_no_cluster_policies() -> None:
    custom = Custom({"v1beta1": NOT_FOUND, "v1alpha2": NOT_FOUND})
    listing = await kube_with(custom).list_kind("clusternetworkpolicies")
    assert listing.items == [] and custom.asked == ["v1beta1", "v1alpha2"]


async def test_the_first_served_version_is_listed() -> None:
    body = {"kind": "ClusterNetworkPolicyList", "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "metadata": {"resourceVersion": "42"}, "items": [{"metadata": {"name": "a"}}]}
    custom = Custom({"v1beta1": NOT_FOUND, "v1alpha2": Raw(200, json.dumps(body).encode())})
    listing = await kube_with(custom).list_kind("clusternetworkpolicies")
    assert [i["metadata"]["name"] for i in listing.items] == ["a"] and listing.resource_version == 42
    assert listing.items[0]["kind"] == "ClusterNetworkPolicy"


async def test_other_errors_are_raised_with_the_answer() -> None:
    custom = Custom({"v1beta1": Raw(500, b"etcdserver: request timed out")})
    with pytest.raises(ApiException) as caught:
        await kube_with(custom).list_kind("clusternetworkpolicies")
    assert caught.value.status == 500 and "timed out" in str(caught.value.reason)
