"""A ClusterNetworkPolicy ``x`` and a NetworkPolicy ``x`` in namespace ``cnp`` both want the
ClusterPolicyStatus ``cnp.x``: the cluster policy owns it (whichever came first), stably.

Before the rule, the writer wrote both policies' statuses into the one object in turn: every
pass that marked both (a reconcile, a listing, a report) patched the spec to the other kind and
wrote the other status (two writes per pass, generation moving each time), and when the cluster
policy went, the object kept its status until the NetworkPolicy happened to be marked again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from tests.unit.status.test_cluster_policy_status import cnp
from tests.unit.status.test_status_writer import (
    MANAGED,
    Clock,
    FakeKube,
    Writer,
    periodic_listing,
    phase,
    pod,
    policy,
    setup,
)

from netfence.controller import status_writer
from netfence.controller.kube import cps_claimants
from netfence.controller.world import WorldTracker
from netfence.status.aggregate import NodeReport, PolicyFacts, compute_status

NAME = "cnp.x"
CLUSTER = ("", "x")
NAMESPACED = ("cnp", "x")
WRITES = ("create", "patch_spec", "patch_status", "delete")


class WallClock:
    """Stands in for the writer's ``datetime`` (transition times)."""

    def __init__(self, now: datetime) -> None:
        self.now_value = now

    def now(self, tz: Any = None) -> datetime:
        return self.now_value


def writes(kube: FakeKube) -> int:
    return sum(kube.count(op, NAME) for op in WRITES)


def add_namespaced(writer: Writer, world: WorldTracker, rv: int = 20) -> None:
    """The NetworkPolicy cnp/x appears (as the event handler feeds it)."""
    world.apply("namespaces", "ADDED", {"metadata": {"name": "cnp", "resourceVersion": "2"}})
    world.apply("networkpolicies", "ADDED", policy("cnp", "x", rv))
    writer.mark({NAMESPACED})


def add_cluster(writer: Writer, world: WorldTracker, rv: int = 30) -> None:
    world.apply("clusternetworkpolicies", "ADDED", cnp("x", rv, []))
    writer.mark({CLUSTER})


def delete(writer: Writer, world: WorldTracker, key: tuple[str, str], rv: int) -> None:
    """A DELETED event: the world drops the policy, the handler tells the writer."""
    if key == CLUSTER:
        world.apply("clusternetworkpolicies", "DELETED", cnp("x", rv, []))
    else:
        world.apply("networkpolicies", "DELETED", policy(*key, rv))
    writer.policies_removed([key])


def warning(kube: FakeKube) -> dict[str, Any] | None:
    conditions = kube.objects[NAME]["status"]["conditions"]
    return next((c for c in conditions if c["type"] == "Warning"), None)


def clash_warned(kube: FakeKube) -> bool:
    """Whether the object's status carries the name-clash warning."""
    return any("same status object name" in w for w in kube.objects[NAME]["status"].get("warnings", []))


def clash_events(kube: FakeKube) -> list[tuple[dict[str, str], str, str]]:
    return [e for e in kube.events if e[1] == "StatusNameClash"]


def clash_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "wants the same name" in r.getMessage()]


def assert_cluster_owns(kube: FakeKube) -> None:
    obj = kube.objects[NAME]
    assert obj["spec"]["kind"] == "ClusterNetworkPolicy" and obj["spec"]["policyRef"] == "x"
    assert obj["spec"]["policy"] == {"namespace": "", "name": "x", "uid": "uid-x"}
    assert obj["metadata"]["labels"] == MANAGED
    assert obj["status"]["policyGeneration"] == 2  # the cluster policy's (the NetworkPolicy's is 1)
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    found = warning(kube)
    assert found is not None and found["reason"] == "StatusNameClash"
    assert "NetworkPolicy cnp/x" in found["message"] and "rename" in found["message"]
    assert clash_warned(kube)


def test_claimants_of_a_status_name() -> None:
    assert cps_claimants("cnp.x") == (CLUSTER, NAMESPACED)  # the cluster policy first: it owns the name
    assert cps_claimants("cnp.a.b") == (("", "a.b"), ("cnp", "a.b"))
    assert cps_claimants("ns.a.b") == (("ns", "a.b"),)


def test_the_clash_warning_is_a_warning_condition() -> None:
    facts = PolicyFacts("", "x", 1, frozenset(), 0, 0, hides="cnp/x")
    status = compute_status(facts, {})
    assert status["phase"] == "Enforced"
    [cond] = [c for c in status["conditions"] if c["type"] == "Warning"]
    assert cond["reason"] == "StatusNameClash" and "NetworkPolicy cnp/x" in cond["message"]
    assert status["warnings"] == [cond["message"]]
    # Model warnings keep their reason; the clash is listed with them.
    status = compute_status(PolicyFacts("", "x", 1, frozenset(), 0, 0, warnings=("odd",), hides="cnp/x"), {})
    [cond] = [c for c in status["conditions"] if c["type"] == "Warning"]
    assert cond["reason"] == "SuspiciousPolicy" and len(status["warnings"]) == 2


async def test_cluster_policy_first_keeps_the_object_and_the_network_policy_gets_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer, kube, world = setup()
    add_cluster(writer, world)
    await writer.flush()
    assert phase(kube, NAME) == "Enforced" and warning(kube) is None
    before = writes(kube)
    caplog.set_level(logging.INFO, logger="netfence.controller.status_writer")
    add_namespaced(writer, world)
    await writer.flush()
    assert_cluster_owns(kube)
    assert kube.count("patch_spec", NAME) == 0 and kube.count("create", NAME) == 1
    assert writes(kube) == before + 1  # the cluster policy's status gains the warning; nothing else
    assert set(kube.objects) == {NAME}  # no object for the NetworkPolicy under another name
    [(involved, _, message)] = clash_events(kube)
    assert involved == {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": "cnp",
                        "name": "x", "uid": "uid-x"}
    assert "ClusterNetworkPolicy x" in message and "rename" in message
    assert len(clash_logs(caplog)) == 1


async def test_network_policy_first_its_object_is_taken_over_by_the_cluster_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = WallClock(datetime(2026, 1, 1, tzinfo=UTC))
    monkeypatch.setattr(status_writer, "datetime", clock)
    writer, kube, world = setup()
    add_namespaced(writer, world)
    await writer.flush()
    assert kube.objects[NAME]["spec"]["policyRef"] == "cnp/x" and phase(kube, NAME) == "Enforced"
    clock.now_value = datetime(2026, 1, 2, tzinfo=UTC)
    add_cluster(writer, world)
    await writer.flush()
    assert_cluster_owns(kube)
    assert kube.count("create", NAME) == 1 and kube.count("delete", NAME) == 0  # taken over, not recreated
    assert kube.count("patch_spec", NAME) == 1
    assert len(clash_events(kube)) == 1
    # The conditions are the cluster policy's own: the NetworkPolicy's transition times are not kept
    # (Ready was True for both).
    times = {c["lastTransitionTime"] for c in kube.objects[NAME]["status"]["conditions"]}
    assert times == {"2026-01-02T00:00:00Z"}


async def test_cluster_policy_deleted_gives_the_network_policy_its_status_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer, kube, world = setup()
    add_namespaced(writer, world)
    add_cluster(writer, world)
    await writer.flush()
    assert_cluster_owns(kube)
    caplog.set_level(logging.INFO, logger="netfence.controller.status_writer")
    delete(writer, world, CLUSTER, 40)
    await writer.flush()
    await writer.flush()
    obj = kube.objects[NAME]
    assert obj["spec"]["kind"] == "NetworkPolicy" and obj["spec"]["policyRef"] == "cnp/x"
    assert obj["status"]["policyGeneration"] == 1 and not clash_warned(kube)
    assert phase(kube, NAME) == "Enforced"
    assert kube.count("delete", NAME) == 0 and kube.count("create", NAME) == 1  # never deleted/recreated
    assert any("is over" in r.getMessage() for r in caplog.records)
    before = writes(kube)
    writer.mark_all()
    await writer.flush()
    assert writes(kube) == before


async def test_network_policy_deleted_leaves_the_cluster_policys_object_and_drops_the_warning() -> None:
    writer, kube, world = setup()
    add_cluster(writer, world)
    add_namespaced(writer, world)
    await writer.flush()
    assert_cluster_owns(kube)
    spec, generation = dict(kube.objects[NAME]["spec"]), kube.objects[NAME]["metadata"]["generation"]
    before = {op: kube.count(op, NAME) for op in WRITES}
    delete(writer, world, NAMESPACED, 40)
    await writer.flush()
    await writer.flush()
    after = {op: kube.count(op, NAME) for op in WRITES}
    assert after == {**before, "patch_status": before["patch_status"] + 1}  # only the warning goes
    assert kube.objects[NAME]["spec"] == spec and kube.objects[NAME]["metadata"]["generation"] == generation
    assert warning(kube) is None and not clash_warned(kube) and phase(kube, NAME) == "Enforced"


async def test_no_writes_while_the_clash_holds(caplog: pytest.LogCaptureFixture) -> None:
    """Every input that marks both policies (reconciles, listings, reports, a new leader's full
    pass) leaves the object alone: no spec flips, no status writes, one log line, one Event."""
    caplog.set_level(logging.INFO, logger="netfence.controller.status_writer")
    writer, kube, world = setup()
    world.apply("pods", "ADDED", pod("cnp", "px", {"app": "x"}, "node-0", "10.0.0.1", 15))
    add_namespaced(writer, world)
    add_cluster(writer, world)
    writer.set_report("node-0", NodeReport("node-0", 0))
    await writer.flush()
    before, generation = writes(kube), kube.objects[NAME]["metadata"]["generation"]
    kinds = []
    for _ in range(5):
        writer.mark_all()  # a reconcile, a merged listing
        await writer.flush()
        kinds.append(kube.objects[NAME]["spec"]["kind"])
        writer.mark({NAMESPACED, CLUSTER})  # events of both
        await writer.flush()
        kinds.append(kube.objects[NAME]["spec"]["kind"])
        writer.set_report("node-0", None)
        writer.set_report("node-0", NodeReport("node-0", 0))
        await writer.flush()
    writer.request_resync(full=False)
    await writer.flush()
    writer.clock.now += writer.resync_seconds
    await periodic_listing(writer)
    writer.request_resync()  # as on becoming leader: every status computed again
    await writer.flush()
    # (Before the rule: 2 writes per marking pass, the spec's kind alternating, generation + 1 each.)
    assert writes(kube) - before == 0
    assert kinds == ["ClusterNetworkPolicy"] * 10
    assert kube.objects[NAME]["metadata"]["generation"] == generation
    assert_cluster_owns(kube)
    assert len(clash_events(kube)) == 1 and len(clash_logs(caplog)) == 1


async def test_a_new_leader_keeps_the_object_for_the_cluster_policy() -> None:
    """The object as an earlier controller left it (the NetworkPolicy's): the listing neither
    deletes it as an orphan nor lets the NetworkPolicy keep it."""
    writer, kube, world = setup()
    add_namespaced(writer, world)
    await writer.flush()
    add_cluster(writer, world)  # while no controller led
    fresh = Writer(kube, writer.engine, world, {}, lambda: True, interval=0.0)  # type: ignore[arg-type]
    fresh.clock = Clock()
    fresh.request_resync()
    await fresh.flush()
    await fresh.flush()
    assert_cluster_owns(kube)
    assert kube.count("delete", NAME) == 0 and kube.count("create", NAME) == 1


async def test_an_object_deleted_by_someone_is_recreated_for_its_owner() -> None:
    writer, kube, world = setup()
    add_cluster(writer, world)
    await writer.flush()
    del kube.objects[NAME]  # no clash: the cluster policy's own object comes back
    writer.status_deleted(NAME)
    await writer.flush()
    assert kube.objects[NAME]["spec"]["kind"] == "ClusterNetworkPolicy" and phase(kube, NAME) == "Enforced"
    add_namespaced(writer, world)
    await writer.flush()
    del kube.objects[NAME]  # while they clash: recreated for the cluster policy
    writer.status_deleted(NAME)
    await writer.flush()
    assert_cluster_owns(kube)
    assert kube.count("create", NAME) == 3 and kube.count("delete", NAME) == 0


async def test_the_object_goes_only_when_both_policies_are_gone() -> None:
    writer, kube, world = setup()
    add_cluster(writer, world)
    add_namespaced(writer, world)
    await writer.flush()
    delete(writer, world, CLUSTER, 40)
    writer.mark_all()  # a merged listing as well: the orphan sweep compares every object
    await writer.flush()
    await writer.flush()
    assert kube.objects[NAME]["spec"]["kind"] == "NetworkPolicy" and kube.count("delete", NAME) == 0
    delete(writer, world, NAMESPACED, 41)
    await writer.flush()
    await writer.flush()
    assert NAME not in kube.objects and kube.count("delete", NAME) == 1
    assert not writer._clashes
