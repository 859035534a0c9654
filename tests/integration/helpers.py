"""Small helpers for integration tests: API objects, etcd reads, the controller's probe; no fixtures."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from netfence.store.errors import StoreError
from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence.store.settings import EtcdSettings
from netfence_lab.process import ManagedProcess

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll an async check until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
            if last:
                return last
        except (ApiException, KeyError, AssertionError, StoreError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


async def make_namespace(core: client.CoreV1Api, name: str, labels: dict[str, str] | None = None) -> None:
    try:
        await core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    except ApiException as exc:
        if exc.status != 409:
            raise


async def make_pod(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    labels: dict[str, str],
    ip: str | None,
    node: str = "node-a",
    ports: list[tuple[str, int, str]] | None = None,
) -> dict[str, Any]:
    """A bound, Running pod with ``ip`` (no network namespace: controller tests only)."""
    body = {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "app",
                    "image": "netfence/pause",
                    "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports or []],
                }
            ],
        },
    }
    await core.create_namespaced_pod(namespace, body)
    if ip is not None:
        await core.patch_namespaced_pod_status(
            name, namespace, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        )
    pod = await core.read_namespaced_pod(name, namespace, _preload_content=False)
    data: dict[str, Any] = json.loads(await pod.read())
    return data


def policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }


async def open_store(endpoint: str, prefix: str) -> EtcdStore:
    store = EtcdStore(EtcdConfig(endpoints=[endpoint], prefix=prefix))
    await store.connect()
    return store


async def etcd_values(store: EtcdStore) -> dict[str, Any]:
    """Everything under the prefix, decoded (undecodable values as raw bytes)."""
    snapshot = await store.read_all()
    out: dict[str, Any] = {}
    for key, raw in snapshot.values.items():
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


async def committed_through(store: EtcdStore, marks: Mapping[str, int], timeout: float = 30.0) -> int:
    """A commit revision whose ``meta/observed`` covers ``marks`` (the controller has processed those writes)."""

    async def check() -> int:
        state = await store.committed_snapshot()
        raw = state.values.get("meta/observed")
        seen = json.loads(raw)["resourceVersions"] if raw else {}
        return state.commit_revision if all(seen.get(k, 0) >= v for k, v in marks.items()) else 0

    return await eventually(check, timeout=timeout, interval=0.05, what=f"a commit covering {dict(marks)}")


def health_port(proc: ManagedProcess) -> int:
    return int(next(a for a in proc.argv if a.startswith("--health-port=")).split("=", 1)[1])


async def controller_probe(proc: ManagedProcess) -> dict[str, Any] | None:
    """The controller's etcd probe from its health endpoint (``leader``, ``commitRevision``, ``lastError``).

    None while it does not answer or reports itself unhealthy. Kopf caches probe results for
    up to 10 s, so wait on this with a timeout well above that.
    """
    url = f"http://127.0.0.1:{health_port(proc)}/healthz"

    def get() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError):  # not listening yet, an error status, not JSON
            return None
        probe = body.get("etcd") if isinstance(body, dict) else None
        return probe if isinstance(probe, dict) else None

    return await asyncio.to_thread(get)


async def first_answer(endpoint: str, prefix: str) -> float:
    """Poll etcd with fresh connections; the monotonic time of its first answer."""
    while True:
        store = EtcdStore(EtcdSettings([endpoint], prefix, timeout=0.3))
        try:
            await store.connect()
            return time.monotonic()
        except StoreError:
            pass
        finally:
            await store.close()
        await asyncio.sleep(0.02)
