"""Status never freezes (issue 9, part 3), with real processes.

One two-node test bed for the module (``enforcement_helpers.build_world``: good -> web
allowed, bad -> web denied) plus a policy with 198 never-matching rules (198 "selects no
pods" warnings, more than the CRD's 64) and a few ordinary policies. Checks:

* every ClusterPolicyStatus is written and fits the CRD's schema (long lists capped, counted);
* an object the API server refuses (a status name longer than 253 characters) does not hold
  up the others: a new policy is Enforced promptly, and the failure is an Event on the policy;
* a SIGKILLed agent's policies turn Degraded, the others stay Enforced;
* status objects of policies deleted while the controller was down, and stray managed
  objects, are deleted when it comes back; objects not managed by Netfence stay.

Probes run during the faults (good -> web must stay allowed, bad -> web denied).
Every wait is on a condition, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from tests.integration.enforcement_helpers import (
    ProbeLoop,
    ProbeTally,
    World,
    allow_from,
    build_world,
    cps,
    manifest,
    report_revision,
    wait_agent_serving,
)
from tests.integration.helpers import eventually
from tests.unit.status.crd_limits import status_schema, violations

from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv

NS = "sfz"
MANY = "many-rules"
RULES = 198
OTHERS = ("web-extra-0", "web-extra-1", "web-extra-2", "bad-isolated")
LONG = "l" * (254 - len(NS) - 1)  # a valid NetworkPolicy name; "<ns>.<name>" is 254 > 253 characters
GROUP, VERSION, PLURAL = "netfence.dev", "v1alpha1", "clusterpolicystatuses"
MANAGED = {"app.kubernetes.io/managed-by": "netfence"}


def many_rules() -> dict[str, Any]:
    """web admits TCP 80 from 198 selectors that match no pod: 198 warnings, no extra access."""
    return manifest(NS, MANY, {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"never": f"n{i}"}}}],
                     "ports": [{"port": 80, "protocol": "TCP"}]} for i in range(RULES)],
    })


def others() -> list[dict[str, Any]]:
    """Ordinary policies that change no probed verdict (bad's ingress, not its egress, is isolated)."""
    out = [allow_from(NS, f"web-extra-{k}", {"app": "web"}, {"role": "good"}, port=81 + k) for k in range(3)]
    out.append(allow_from(NS, "bad-isolated", {"role": "bad"}, {"role": "good"}))
    return out


@pytest.fixture(scope="module")
async def world(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    env = NetfenceEnv(cluster, tmp_path_factory.mktemp("status-freeze"), nodes=2, report_ttl=4)
    await env.start()
    try:
        built = await build_world(env, NS)
        marks: dict[str, int] = {}
        for body in [many_rules(), *others()]:
            kind, rv = await env.apply_manifest(body)
            marks[kind] = max(marks.get(kind, 0), rv)
        await env.wait_enforced(marks, timeout=90)
        yield built
    finally:
        try:
            await env.delete_user_state()
        finally:
            await env.close()


def custom(env: NetfenceEnv) -> client.CustomObjectsApi:
    assert env.api is not None
    return client.CustomObjectsApi(env.api)


async def statuses(env: NetfenceEnv) -> dict[str, dict[str, Any]]:
    items = (await custom(env).list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]
    return {i["metadata"]["name"]: i for i in items}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def phase_of(env: NetfenceEnv, name: str, phase: str, generation: int | None = None) -> dict[str, Any] | None:
    status = (await cps(env, name)).get("status") or {}
    if status.get("phase") != phase:
        return None
    if generation is not None and status.get("policyGeneration") != generation:
        return None
    return status


async def gone(env: NetfenceEnv, name: str) -> bool:
    try:
        await cps(env, name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


async def probed(probes: ProbeLoop, n: int, since: ProbeTally | None = None) -> bool:
    now, base = probes.snapshot(), since or ProbeTally()
    return now.allowed_ok >= base.allowed_ok + n and now.denied_blocked >= base.denied_blocked + n


def assert_probes_clean(probes: ProbeLoop) -> None:
    tally = probes.snapshot()
    assert tally.denied_connected == [], f"denied connections got through at {tally.denied_connected}"
    assert tally.allowed_failed == [], f"allowed connections failed at {tally.allowed_failed}"


async def test_every_status_is_written_within_the_crd_limits(world: World) -> None:
    env = world.env
    schema = status_schema()
    listed = await statuses(env)
    names = {f"{NS}.{n}" for n in ("web-from-good", "good-from-ns", MANY, *OTHERS)}
    assert names <= set(listed), sorted(names - set(listed))
    for name in names:
        status = listed[name].get("status")
        assert status is not None, name
        assert violations(status, schema, f"{name}.status") == []
        assert status["phase"] == "Enforced", (name, status)
    many = listed[f"{NS}.{MANY}"]["status"]
    assert len(many["warnings"]) == 64
    assert many["warningsOmitted"] >= RULES - 64
    assert condition(many, "Warning")["message"].startswith(f"{64 + many['warningsOmitted']} warnings: ")
    assert many["synced"] == "1/1" and "StatusWriteFailed" not in [c["type"] for c in many["conditions"]]


async def test_a_refused_object_does_not_hold_up_a_new_policy(world: World) -> None:
    env = world.env
    assert env.api is not None
    await env.apply_manifest(allow_from(NS, LONG, {"app": "web"}, {"role": "good"}))
    created = time.monotonic()
    _, fresh_rv = await env.apply_manifest(allow_from(NS, "fresh", {"app": "web"}, {"role": "good"}, port=90))
    status = await eventually(lambda: phase_of(env, f"{NS}.fresh", "Enforced", 1), timeout=15, interval=0.05,
                              what="the new policy's status Enforced")
    seconds = time.monotonic() - created
    print(f"\nnew policy Enforced {seconds:.2f}s after creation (next to a policy whose status is refused)")
    assert status is not None and status["synced"] == "1/1"

    # The refused object's error is an Event on its NetworkPolicy (its status object cannot exist).
    core = client.CoreV1Api(env.api)

    async def refused() -> list[Any]:
        events = (await core.list_namespaced_event(NS, field_selector=f"involvedObject.name={LONG}")).items
        return [e for e in events if e.reason == "StatusWriteFailed"]

    events = await eventually(refused, timeout=15, what="a StatusWriteFailed event on the NetworkPolicy")
    assert events[0].involved_object.kind == "NetworkPolicy"
    assert "253" in events[0].message, events[0].message

    # Gone again: the barrier (which needs every policy's status) holds once more.
    await env.delete_policy(NS, LONG)
    await env.wait_enforced({"networkpolicies": fresh_rv}, timeout=60)


async def test_a_killed_agents_policies_turn_degraded(world: World) -> None:
    env = world.env
    node1 = env.agents[1].node  # hosts good and bad
    with ProbeLoop(world) as probes:
        await eventually(lambda: probed(probes, 2), what="probes running")
        before = await report_revision(env, node1)
        process = env.agents[1].process
        process.signal(signal.SIGKILL)
        assert process.proc is not None
        await asyncio.to_thread(process.proc.wait, 15)

        for name in ("good-from-ns", "bad-isolated"):
            status = await eventually(functools.partial(phase_of, env, f"{NS}.{name}", "Degraded"),
                                      timeout=env.report_ttl + 20, what=f"{name} Degraded")
            assert status is not None
            assert condition(status, "Degraded")["reason"] == "NodeReportMissing"
            assert node1 in condition(status, "Degraded")["message"]
        for name in ("web-from-good", MANY):  # node 0 enforces these: unaffected
            assert (await cps(env, f"{NS}.{name}"))["status"]["phase"] == "Enforced"
        during = probes.snapshot()
        await eventually(lambda: probed(probes, 3, during), what="probes while the agent is dead")

        env.start_agent(1)
        await wait_agent_serving(env, 1, before)
        await env.wait_enforced(timeout=60)
    assert_probes_clean(probes)


async def test_orphaned_status_objects_are_deleted_when_the_controller_returns(world: World) -> None:
    env = world.env
    _, rv = await env.apply_manifest(allow_from(NS, "doomed", {"app": "web"}, {"role": "good"}, port=91))
    await env.wait_enforced({"networkpolicies": rv}, timeout=60)
    assert (await cps(env, f"{NS}.doomed"))["status"]["phase"] == "Enforced"

    stray = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterPolicyStatus",
             "metadata": {"name": f"{NS}.never-existed", "labels": dict(MANAGED)},
             "spec": {"policy": {"namespace": NS, "name": "never-existed"}, "policyRef": f"{NS}/never-existed"}}
    foreign = {**stray, "metadata": {"name": f"{NS}.not-ours"},
               "spec": {"policy": {"namespace": NS, "name": "not-ours"}, "policyRef": f"{NS}/not-ours"}}
    with ProbeLoop(world) as probes:
        await eventually(lambda: probed(probes, 2), what="probes running")
        controller = env.controllers["controller-0"]
        await asyncio.to_thread(controller.stop)
        try:
            # While no controller runs: the policy goes (no DELETED event will ever reach it),
            # and a stray managed object appears.
            net = client.NetworkingV1Api(env.api)
            await net.delete_namespaced_network_policy("doomed", NS)
            await custom(env).create_cluster_custom_object(GROUP, VERSION, PLURAL, stray)
            await custom(env).create_cluster_custom_object(GROUP, VERSION, PLURAL, foreign)
        finally:
            env.start_controller("controller-0")
        for name in (f"{NS}.doomed", f"{NS}.never-existed"):
            await eventually(functools.partial(gone, env, name), timeout=30, interval=0.05, what=f"{name} deleted")
        assert not await gone(env, f"{NS}.not-ours")  # not managed by Netfence: left alone
        await custom(env).delete_cluster_custom_object(GROUP, VERSION, PLURAL, f"{NS}.not-ours")
        await env.wait_enforced(timeout=60)
        during = probes.snapshot()
        await eventually(lambda: probed(probes, 2, during), what="probes after the controller returned")
    assert_probes_clean(probes)
