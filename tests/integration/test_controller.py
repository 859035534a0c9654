"""The real controller process against the real API server and etcd (no agents needed)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from etcd3aio import Etcd3Client
from kubernetes_asyncio import client
from tests.integration.helpers import (
    committed_through,
    controller_probe,
    etcd_values,
    eventually,
    make_namespace,
    make_pod,
    open_store,
    policy,
)

from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv
from netfence_lab.process import ManagedProcess

OWNED = ("policies/", "sets/", "endpoints/", "meta/", "commit")


@pytest.fixture
async def env(cluster: LocalCluster, tmp_path: Path) -> AsyncIterator[NetfenceEnv]:
    environment = NetfenceEnv(cluster, tmp_path, nodes=0, lease_ttl=3)
    await environment.start(controllers=0)
    try:
        yield environment
    finally:
        await environment.delete_user_state()
        await environment.close()


async def _store(env: NetfenceEnv) -> Any:
    return await open_store(env.cluster.netfence_etcd.endpoint, env.prefix)


async def _seed(core: client.CoreV1Api, net: client.NetworkingV1Api, ns: str = "ctl") -> None:
    await make_namespace(core, ns, {"team": "a"})
    await make_pod(core, ns, "web", {"app": "web"}, "10.244.0.10", ports=[("http", 80, "TCP")])
    await make_pod(core, ns, "db", {"app": "db"}, "10.244.0.11")
    await net.create_namespaced_network_policy(
        ns,
        policy(ns, "web-from-db", {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": "http"}]}],
        }),
    )


async def _leader(store: Any) -> str | None:
    values = await store.read_all()
    raw = values.values.get("leader")
    return raw.decode() if raw is not None else None


async def test_compiles_into_etcd_and_never_writes_watched_objects(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    await _seed(core, net)
    before = {
        "pod": (await core.read_namespaced_pod("web", "ctl")).metadata,
        "ns": (await core.read_namespace("ctl")).metadata,
        "policy": (await net.read_namespaced_network_policy("web-from-db", "ctl")).metadata,
    }
    env.start_controller("c0")
    store = await _store(env)
    try:
        values = await eventually(
            lambda: _has(store, "policies/ctl/web-from-db"), what="the policy compiled into etcd"
        )
        assert "endpoints/node-a/ctl/web" in values
        sets = [v for k, v in values.items() if k.startswith("sets/")]
        assert any(s["kind"] == "pods" and s["members"] == ["10.244.0.11"] for s in sets)
        assert any(s["kind"] == "ports" and "10.244.0.10,tcp:80" in s["members"] for s in sets)
        assert values["commit"]["schema"] == 1
        custom = client.CustomObjectsApi(env.api)
        cps = await eventually(
            lambda: custom.get_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses",
                                                     "ctl.web-from-db"),
            what="the ClusterPolicyStatus",
        )
        assert cps["spec"]["policy"]["name"] == "web-from-db"
        after = {
            "pod": (await core.read_namespaced_pod("web", "ctl")).metadata,
            "ns": (await core.read_namespace("ctl")).metadata,
            "policy": (await net.read_namespaced_network_policy("web-from-db", "ctl")).metadata,
        }
        for what, meta in before.items():
            assert after[what].resource_version == meta.resource_version, what
            assert not after[what].finalizers
            assert not any("kopf" in k for k in (after[what].annotations or {}))
            managers = {m.manager for m in after[what].managed_fields or []}
            assert not any("kopf" in m.lower() or "netfence" in m.lower() for m in managers), managers
    finally:
        await store.close()


async def _has(store: Any, key: str) -> dict[str, Any] | None:
    values = await etcd_values(store)
    return values if key in values else None


async def test_status_object_lifecycle(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    custom = client.CustomObjectsApi(env.api)
    await _seed(core, net, "life")
    env.start_controller("c0")

    async def get() -> dict[str, Any]:
        result: dict[str, Any] = await custom.get_cluster_custom_object(
            "netfence.dev", "v1alpha1", "clusterpolicystatuses", "life.web-from-db")
        return result

    first = await eventually(get, what="the ClusterPolicyStatus to appear")
    uid = (await net.read_namespaced_network_policy("web-from-db", "life")).metadata.uid
    assert first["spec"]["policy"] == {"namespace": "life", "name": "web-from-db", "uid": uid}
    await custom.delete_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses", "life.web-from-db")

    async def recreated() -> bool:
        obj = await get()
        return bool(obj["metadata"]["uid"] != first["metadata"]["uid"])

    await eventually(recreated, what="the deleted ClusterPolicyStatus to be recreated")
    await net.delete_namespaced_network_policy("web-from-db", "life")

    async def gone() -> bool:
        items = (await custom.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses"))["items"]
        return all(i["metadata"]["name"] != "life.web-from-db" for i in items)

    await eventually(gone, what="the ClusterPolicyStatus to be deleted with its policy")


async def test_restart_writes_nothing_and_removes_state_deleted_while_down(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    await _seed(core, net, "rst")
    await net.create_namespaced_network_policy(
        "rst", policy("rst", "doomed", {"podSelector": {}, "policyTypes": ["Egress"]}))
    proc = env.start_controller("c0")
    store = await _store(env)
    try:
        await eventually(lambda: _has(store, "policies/rst/doomed"), what="the second policy in etcd")
        await env.wait_enforced(timeout=30, statuses=False)
        proc.stop()
        before = await store.read_all()
        # A restart with nothing changed writes nothing.
        c1 = env.start_controller("c1")
        await eventually(lambda: _leader_is(store, "c1"), what="c1 leading", timeout=15)
        # The signal that c1 has reconciled: as the leader it reports the commit revision it
        # found (a reconcile that wrote anything would report a later one).
        probe = await eventually(lambda: _reconciled(c1, before.commit_revision), what="c1 to reconcile",
                                 timeout=30, interval=0.2)
        assert probe["commitRevision"] == before.commit_revision, probe
        after = await store.read_all()
        changed = {k for k in set(before.values) | set(after.values)
                   if k.startswith(OWNED) and before.values.get(k) != after.values.get(k)}
        assert changed == set(), f"a restart over matching state rewrote {changed}"
        assert after.commit_revision == before.commit_revision
        env.controllers["c1"].stop()
        # Deleted while no controller ran: removed on the next start.
        await net.delete_namespaced_network_policy("doomed", "rst")
        env.start_controller("c2")

        async def removed() -> bool:
            return "policies/rst/doomed" not in (await etcd_values(store))

        await eventually(removed, what="state of a policy deleted while down to be removed", timeout=20)
    finally:
        await store.close()


async def _reconciled(proc: ManagedProcess, commit_revision: int) -> dict[str, Any] | None:
    """The controller's probe once it leads and has caught up with ``commit_revision``."""
    probe = await controller_probe(proc)
    return probe if probe and probe["leader"] and probe["commitRevision"] >= commit_revision else None


async def _leader_is(store: Any, identity: str) -> bool:
    leader = await _leader(store)
    return leader is not None and identity in leader


async def test_corrupt_and_changed_values_are_rewritten(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    await _seed(core, net, "drift")
    env.controller_extra_args = ("--reconcile-seconds=1",)
    env.start_controller("c0")
    store = await _store(env)
    try:
        good = await eventually(lambda: _has(store, "policies/drift/web-from-db"), what="policy in etcd")
        raw = Etcd3Client([env.cluster.netfence_etcd.endpoint])
        await raw.connect()
        assert raw.kv is not None
        await raw.kv.put(store.layout.key("policies/drift/web-from-db"), b"{not json")
        changed = dict(good["endpoints/node-a/drift/web"], ingress=[])
        await raw.kv.put(store.layout.key("endpoints/node-a/drift/web"), json.dumps(changed).encode())
        await raw.close()

        async def repaired() -> bool:
            now = await etcd_values(store)
            return (now.get("policies/drift/web-from-db") == good["policies/drift/web-from-db"]
                    and now.get("endpoints/node-a/drift/web") == good["endpoints/node-a/drift/web"])

        await eventually(repaired, what="corrupt and changed values rewritten", timeout=15)
        assert env.controllers["c0"].alive(), "a corrupt value must never crash the controller"
    finally:
        await store.close()


async def test_one_writer_and_failover_after_sigkill(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    await _seed(core, net, "ha")
    a = env.start_controller("ctl-a")
    store = await _store(env)
    try:
        await eventually(lambda: _leader_is(store, "ctl-a"), what="ctl-a leading")
        env.start_controller("ctl-b")
        await eventually(lambda: _has(store, "policies/ha/web-from-db"), what="compiled state")
        # Both run; only the leader writes: every commit marker names ctl-a, including the new
        # commit that covers the five changes below.
        start = (await store.read_all()).revision
        marks: dict[str, int] = {}
        for n in range(5):
            patched = await core.patch_namespaced_pod("db", "ha", {"metadata": {"labels": {"round": str(n)}}})
            marks["pods"] = int(patched.metadata.resource_version)
        covering = await committed_through(store, marks)
        assert covering > start
        writers = await _commit_writers(store, start, covering)
        assert writers and writers[-1] == (covering, "ctl-a"), writers
        assert {who for _, who in writers} == {"ctl-a"}, writers
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        await eventually(lambda: _leader_is(store, "ctl-b"), what="ctl-b to take over", timeout=15, interval=0.05)
        takeover = time.monotonic() - killed
        assert takeover < env.lease_ttl + 3, f"takeover took {takeover:.1f}s"
        await core.patch_namespaced_pod("db", "ha", {"metadata": {"labels": {"app": "other"}}})

        async def rewritten() -> bool:
            values = await etcd_values(store)
            sets = [v for k, v in values.items() if k.startswith("sets/") and v.get("kind") == "pods"]
            return all("10.244.0.11" not in s["members"] for s in sets) and "ctl-b" in json.dumps(values["commit"])

        await eventually(rewritten, what="the new leader to write the change")
    finally:
        await store.close()


async def _commit_writers(store: Any, after: int, until: int) -> list[tuple[int, str]]:
    """(revision, controller) of every commit marker written in (after, until]."""
    found: list[tuple[int, str]] = []

    async def collect() -> None:
        async for revision, changes in store.watch_changes("commit", after, prefix=False):
            raw = changes.get("commit")
            if raw is not None:
                found.append((revision, json.loads(raw)["controller"]))
            if revision >= until:
                return

    await asyncio.wait_for(collect(), 10)
    return found


async def test_label_change_rewrites_only_affected_keys(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    await make_namespace(core, "many")
    for i in range(20):
        await make_pod(core, "many", f"p{i}", {"idx": str(i), "group": f"g{i % 4}"}, f"10.244.1.{10 + i}")
    for i in range(200):
        await net.create_namespaced_network_policy("many", policy("many", f"pol{i}", {
            "podSelector": {"matchLabels": {f"sel{i}": "x"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {f"peer{i}": "yes"}}}]}],
        }))
    env.start_controller("c0")
    store = await _store(env)
    try:
        await eventually(lambda: _count(store, "policies/many/", 200), what="200 policies compiled", timeout=60)
        await env.wait_enforced(timeout=60, statuses=False)
        before = await store.read_all()
        pod = await core.patch_namespaced_pod("p3", "many", {"metadata": {"labels": {"peer7": "yes"}}})
        await env.wait_enforced({"pods": int(pod.metadata.resource_version)}, timeout=30, statuses=False)
        after = await store.read_all()
        changed = {k for k in set(before.values) | set(after.values)
                   if before.values.get(k) != after.values.get(k) and k.startswith(OWNED)}
        set_keys = {k for k in changed if k.startswith("sets/")}
        assert len(set_keys) == 1, changed
        assert json.loads(after.values[set_keys.pop()])["members"] == ["10.244.1.13"]
        assert changed - {"commit", "meta/observed"} - {k for k in changed if k.startswith("sets/")} == set()
    finally:
        await store.close()


async def _count(store: Any, prefix: str, n: int) -> bool:
    values = await store.read_all()
    return sum(k.startswith(prefix) for k in values.values) >= n


async def _health(port: int) -> int:
    import urllib.error
    import urllib.request

    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    return await asyncio.to_thread(get)


async def test_etcd_outage_reports_not_ready_and_converges(env: NetfenceEnv) -> None:
    assert env.api is not None
    core, net = client.CoreV1Api(env.api), client.NetworkingV1Api(env.api)
    await _seed(core, net, "outage")
    port = 18080 + (int(time.time()) % 1000)
    env.start_controller("c0", extra=(f"--health-port={port}",))
    store = await _store(env)
    etcd = env.cluster.netfence_etcd
    try:
        await eventually(lambda: _has(store, "policies/outage/web-from-db"), what="compiled state")
        assert await eventually(lambda: _is(_health(port), 200), what="ready before the outage")
        etcd.kill()
        try:
            await eventually(lambda: _is(_health(port), 500), what="not ready while etcd is down", timeout=30)
            # Changes made during the outage are applied when etcd returns.
            await net.create_namespaced_network_policy("outage", policy("outage", "during", {"podSelector": {}}))
            await core.patch_namespaced_pod("db", "outage", {"metadata": {"labels": {"app": "gone"}}})
        finally:
            etcd.restart()
        await eventually(lambda: _is(_health(port), 200), what="ready again", timeout=30)

        async def converged() -> bool:
            values = await etcd_values(store)
            pod_sets = [v for k, v in values.items() if k.startswith("sets/") and v.get("kind") == "pods"]
            return "policies/outage/during" in values and all("10.244.0.11" not in s["members"] for s in pod_sets)

        await eventually(converged, what="changes made during the outage in etcd", timeout=30)
        assert env.controllers["c0"].alive()
    finally:
        await store.close()


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
