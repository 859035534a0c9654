"""ClusterPolicyStatus and ``netfence status`` with real processes: writes only on change, the table views.

One two-node test bed for the module: 6 pods, 20 policies. Two pods (``c0`` on node 0,
``c1`` on node 1) have a ``flip`` label that the churn test toggles; exactly two
policies depend on it (``p00`` selects flip=on pods, ``p01`` admits them as peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes_asyncio import client, watch
from tests.integration.enforcement_helpers import manifest, store_of

from netfence_lab.cluster import LocalCluster, cluster_network_policy_crd
from netfence_lab.env import NetfenceEnv

NS = "stw"
POLICIES = 20
UPDATES = 200
CHURNED = (f"{NS}.p00", f"{NS}.p01")


def policy_manifest(i: int) -> dict[str, Any]:
    if i == 0:
        target, peers = {"flip": "on"}, {"tier": "stable"}
    elif i == 1:
        target, peers = {"app": "stable0"}, {"flip": "on"}
    elif i % 3 == 0:
        target, peers = {"tier": "stable"}, {"tier": "stable"}  # pods on both nodes
    else:
        target, peers = {"app": f"stable{i % 4}"}, {"tier": "stable"}
    return manifest(NS, f"p{i:02d}", {
        "podSelector": {"matchLabels": target},
        "ingress": [{"from": [{"podSelector": {"matchLabels": peers}}], "ports": [{"port": 80 + i}]}],
    })


@pytest.fixture(scope="module")
async def env(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NetfenceEnv]:
    environment = NetfenceEnv(cluster, tmp_path_factory.mktemp("status-env"), nodes=2, report_ttl=4)
    await environment.start()
    try:
        marks: dict[str, int] = {}

        def mark(result: tuple[str, int]) -> None:
            marks[result[0]] = max(marks.get(result[0], 0), result[1])

        mark(await environment.ensure_namespace(NS, {}))
        for k in range(4):
            mark(await environment.create_pod(NS, f"s{k}", {"app": f"stable{k}", "tier": "stable"}, [], k % 2))
        for k in range(2):
            mark(await environment.create_pod(NS, f"c{k}", {"role": "churn", "flip": "off"}, [], k))
        for i in range(POLICIES):
            mark(await environment.apply_manifest(policy_manifest(i)))
        await environment.wait_enforced(marks, timeout=90)
        yield environment
    finally:
        try:
            await environment.delete_user_state()
        finally:
            await environment.close()


@dataclass
class WriteCounter:
    """Counts ClusterPolicyStatus watch events (each one is an API write) per object."""

    events: Counter[tuple[str, str]] = field(default_factory=Counter)
    activity: asyncio.Event = field(default_factory=asyncio.Event)

    async def quiet(self, seconds: float) -> None:
        """Return once no event arrived for ``seconds``."""
        while True:
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), seconds)
            except TimeoutError:
                return

    def writes(self, name: str) -> int:
        return sum(n for (obj, _), n in self.events.items() if obj == name)

    def total(self) -> int:
        return sum(self.events.values())


async def count_writes(api: client.ApiClient, resource_version: str, counter: WriteCounter) -> None:
    custom = client.CustomObjectsApi(api)
    stream = watch.Watch().stream(custom.list_cluster_custom_object, "netfence.dev", "v1alpha1",
                                  "clusterpolicystatuses", resource_version=resource_version, timeout_seconds=600)
    async with stream:
        async for event in stream:
            counter.events[(event["object"]["metadata"]["name"], event["type"])] += 1
            counter.activity.set()


async def statuses(env: NetfenceEnv) -> dict[str, dict[str, Any]]:
    custom = client.CustomObjectsApi(env.api)
    items = (await custom.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses"))["items"]
    return {i["metadata"]["name"]: i for i in items if i["metadata"]["name"].startswith(f"{NS}.")}


async def test_status_writes_follow_relevant_changes_not_events(env: NetfenceEnv) -> None:
    assert env.api is not None
    custom = client.CustomObjectsApi(env.api)
    listed = await custom.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses")
    counter = WriteCounter()
    watcher = asyncio.create_task(count_writes(env.api, listed["metadata"]["resourceVersion"], counter))
    try:
        marks: dict[str, int] = {}
        started = time.monotonic()
        for k in range(UPDATES):  # c0 on, c1 on, c0 off, c1 off, ...
            value = "on" if (k // 2) % 2 == 0 else "off"
            kind, rv = await env.label("Pod", f"c{k % 2}", {"flip": value}, NS)
            marks[kind] = max(marks.get(kind, 0), rv)
        churn_seconds = time.monotonic() - started
        await env.wait_enforced(marks, timeout=90)
        # Nothing is left to write once everything is enforced: count until the watch goes quiet
        # (absence of writes has no signal of its own; 2 s is 20 status-writer intervals).
        await counter.quiet(2.0)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    # Only status changes are written: the 18 policies the churn does not touch get no write
    # at all, although every change moved both agents' applied revisions.
    untouched = {f"{NS}.p{i:02d}": counter.writes(f"{NS}.p{i:02d}") for i in range(2, POLICIES)}
    assert set(untouched.values()) == {0}, untouched
    assert not any(kind in ("ADDED", "DELETED") for _, kind in counter.events), counter.events
    # Each update changes what p00 and p01 select or admit: at most Pending + Enforced per (policy, update).
    affected_pairs = len(CHURNED) * UPDATES
    assert counter.total() <= 2 * affected_pairs + 10, counter.events
    assert counter.total() < UPDATES * POLICIES * 2 // 10
    assert all(counter.writes(name) > 0 for name in CHURNED), counter.events

    final = await statuses(env)
    assert final[f"{NS}.p00"]["status"]["phase"] == "Enforced"
    assert final[f"{NS}.p00"]["status"]["endpoints"] == 0  # both churned pods ended flip=off
    assert final[f"{NS}.p01"]["status"]["synced"] == "1/1"
    assert churn_seconds < 60


async def test_kubectl_get_policystatus_columns(env: NetfenceEnv) -> None:
    result = await asyncio.to_thread(env.cluster.kubectl, "get", "policystatus")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "POLICY", "PHASE", "SYNCED", "ENDPOINTS", "AGE"], lines[0]
    rows = {cells[0]: cells for cells in (line.split() for line in lines[1:])}
    # p03 (tier=stable) has pods on both nodes
    assert rows[f"{NS}.p03"][1:6] == ["NetworkPolicy", f"{NS}/p03", "Enforced", "2/2", "4"]
    assert rows[f"{NS}.p02"][1:6] == ["NetworkPolicy", f"{NS}/p02", "Enforced", "1/1", "1"]
    assert rows[f"{NS}.p00"][1:6] == ["NetworkPolicy", f"{NS}/p00", "Enforced", "0/0", "0"]
    assert all(f"{NS}.p{i:02d}" in rows for i in range(POLICIES))
    wide = await asyncio.to_thread(env.cluster.kubectl, "get", "cps", f"{NS}.p03", "-o", "wide")
    header, row = wide.stdout.splitlines()
    # -o wide adds the Ready condition's reason and headline, not an internal revision
    assert header.split() == ["NAME", "KIND", "POLICY", "PHASE", "SYNCED", "ENDPOINTS", "AGE", "REASON", "MESSAGE"], \
        header
    assert row[header.index("REASON"):].split() == ["AllNodesSynced", "enforced", "on", "2/2", "nodes"], row


def netfence_status(env: NetfenceEnv, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "netfence.cli", "status", f"--etcd-endpoints={env.cluster.netfence_etcd.endpoint}",
         f"--etcd-prefix={env.prefix}", *args],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


async def test_netfence_status_lists_every_agent(env: NetfenceEnv) -> None:
    await env.wait_enforced(timeout=60)
    store = await store_of(env)
    try:
        reports = await store.read_reports()
        commit = await store.commit_revision()
    finally:
        await store.close()

    table = (await asyncio.to_thread(netfence_status, env)).splitlines()
    assert table[0] == f"controller's last commit: revision {commit}"
    header = table[1]
    assert header.split() == ["NODE", "APPLIED", "LAG", "LAST", "SYNC", "VERSION", "LAST", "ERROR"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == {"node-0", "node-1"}
    for node, line in rows.items():
        cells = line.split()
        assert cells[1] == str(reports[node]["appliedRevision"])
        assert cells[2] == "0"  # caught up
        assert cells[4] == "ago"  # LAST SYNC: "<n>s ago"
        assert line[header.index("LAST ERROR"):].strip() == ""

    listed = json.loads(await asyncio.to_thread(netfence_status, env, "-o", "json"))
    assert listed["commitRevision"] == commit
    agents = {a["node"]: a for a in listed["agents"]}
    assert set(agents) == {"node-0", "node-1"}
    for node, row in agents.items():
        # agents report only commits that touch their node: caught up = lag 0 (model/relevance.py)
        assert row["appliedRevision"] == reports[node]["appliedRevision"] > 0
        assert row["lag"] == 0 and row["lastError"] == ""
        assert row["lastSync"] == reports[node]["time"] and row["version"] == reports[node]["version"]


async def test_observed_generation_is_the_status_objects_own(env: NetfenceEnv) -> None:
    """kstatus/Flux/Argo CD read status.observedGeneration against the object's metadata.generation;
    the NetworkPolicy's generation is status.policyGeneration. A policy edit moves both."""
    assert env.api is not None
    net = client.NetworkingV1Api(env.api)
    name = "p19"
    before = (await statuses(env))[f"{NS}.{name}"]
    policy = await net.read_namespaced_network_policy(name, NS)
    assert before["status"]["policyGeneration"] == policy.metadata.generation
    assert before["status"]["observedGeneration"] == before["metadata"]["generation"]
    assert before["spec"]["generation"] == policy.metadata.generation

    edited = policy_manifest(19)
    edited["spec"]["ingress"][0]["ports"] = [{"port": 1919}]
    kind, rv = await env.apply_manifest(edited)
    await env.wait_enforced({kind: rv}, timeout=60)  # waits for both generations to match (testbed/env.py)

    after = (await statuses(env))[f"{NS}.{name}"]
    policy = await net.read_namespaced_network_policy(name, NS)
    assert policy.metadata.generation == before["status"]["policyGeneration"] + 1
    assert after["status"]["policyGeneration"] == policy.metadata.generation
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1  # its spec followed the policy
    assert after["status"]["observedGeneration"] == after["metadata"]["generation"]
    ready = next(c for c in after["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == after["metadata"]["generation"]
    assert all(c["observedGeneration"] == after["metadata"]["generation"] for c in after["status"]["conditions"])


async def status_object(env: NetfenceEnv, name: str) -> dict[str, Any] | None:
    custom = client.CustomObjectsApi(env.api)
    items = (await custom.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses"))["items"]
    return next((i for i in items if i["metadata"]["name"] == name), None)


async def wait_for_status(
    env: NetfenceEnv, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """Poll ClusterPolicyStatus ``name`` until ``check(obj)`` holds; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        obj = await status_object(env, name)
        if obj is not None and check(obj):
            return obj
        assert time.monotonic() < deadline, f"{name} never got there: {json.dumps(obj)[:2000]}"
        await asyncio.sleep(0.1)


def clash_warned(obj: dict[str, Any], hidden: str) -> bool:
    return any(f"NetworkPolicy {hidden} " in w for w in (obj.get("status") or {}).get("warnings", []))


async def clash_events(env: NetfenceEnv, namespace: str, name: str) -> list[Any]:
    events = (await client.CoreV1Api(env.api).list_namespaced_event(namespace)).items
    return [e for e in events if e.reason == "StatusNameClash" and e.involved_object.name == name]


async def test_a_cluster_policy_owns_the_status_name_a_network_policy_also_wants(env: NetfenceEnv) -> None:
    """ClusterNetworkPolicy ``clash`` and NetworkPolicy ``cnp/clash`` both want ``cnp.clash``: the
    cluster policy takes the NetworkPolicy's object over (not deleted, not recreated), warns, and
    nothing flips between them; when it goes, the NetworkPolicy gets its status back."""
    assert cluster_network_policy_crd() is not None, "hack/build-tools.sh fetches the ClusterNetworkPolicy CRD"
    assert env.api is not None
    name, hidden = "cnp.clash", "cnp/clash"
    await env.ensure_namespace("cnp", {})
    kind, rv = await env.apply_manifest(manifest("cnp", "clash", {"podSelector": {"matchLabels": {"app": "none"}}}))
    await env.wait_enforced({kind: rv}, timeout=60)
    before = await wait_for_status(env, name, lambda o: o["spec"]["kind"] == "NetworkPolicy")
    custom = client.CustomObjectsApi(env.api)
    listed = await custom.list_cluster_custom_object("netfence.dev", "v1alpha1", "clusterpolicystatuses")
    counter = WriteCounter()
    watcher = asyncio.create_task(count_writes(env.api, listed["metadata"]["resourceVersion"], counter))
    try:
        await env.apply_manifest({
            "apiVersion": "policy.networking.k8s.io/v1beta1", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "clash"},
            "spec": {"tier": "Admin", "priority": 7,
                     "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "none-such"}}},
                     "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}]},
        })
        owned = await wait_for_status(env, name, lambda o: o["spec"]["kind"] == "ClusterNetworkPolicy"
                                      and (o.get("status") or {}).get("phase") == "Enforced"
                                      and clash_warned(o, hidden))
        assert owned["metadata"]["uid"] == before["metadata"]["uid"]  # taken over, not recreated
        assert owned["spec"]["policyRef"] == "clash"
        warning = next(c for c in owned["status"]["conditions"] if c["type"] == "Warning")
        assert "rename" in warning["message"]
        deadline = time.monotonic() + 30
        while not await clash_events(env, "cnp", "clash"):
            assert time.monotonic() < deadline, "no StatusNameClash event on the NetworkPolicy"
            await asyncio.sleep(0.2)

        # The NetworkPolicy's edits and the controller's passes do not move the object.
        await counter.quiet(2.0)
        writes = counter.writes(name)
        await env.apply_manifest(manifest("cnp", "clash", {"podSelector": {"matchLabels": {"app": "other"}}}))
        await counter.quiet(3.0)
        assert counter.writes(name) == writes, counter.events
        assert (await status_object(env, name) or {})["spec"]["kind"] == "ClusterNetworkPolicy"

        await env.delete_cluster_policy("clash")
        back = await wait_for_status(env, name, lambda o: o["spec"]["kind"] == "NetworkPolicy"
                                     and (o.get("status") or {}).get("phase") == "Enforced"
                                     and not clash_warned(o, hidden))
        assert back["metadata"]["uid"] == before["metadata"]["uid"]
        policy = await client.NetworkingV1Api(env.api).read_namespaced_network_policy("clash", "cnp")
        assert back["status"]["policyGeneration"] == policy.metadata.generation
        assert counter.events[(name, "DELETED")] == 0 and counter.events[(name, "ADDED")] == 0
        assert len(await clash_events(env, "cnp", "clash")) == 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        with contextlib.suppress(Exception):
            await env.delete_cluster_policy("clash")
        with contextlib.suppress(Exception):
            await env.delete_policy("cnp", "clash")
