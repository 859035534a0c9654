"""StatusWriter against a fake API server: per-object failures, backoff, events, orphans, bad keys.

The fake validates every status against the CRD's schema (as the API server
does) and can be told to fail chosen calls for chosen objects.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from tests.unit.status.crd_limits import status_schema, violations

from netfence.controller.status_writer import (
    BACKOFF_MAX,
    TRANSIENT_BACKOFF_MAX,
    StatusWriter,
    backoff_delay,
    is_transient,
)
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import BadKey, NodeReport

SCHEMA = status_schema()
MANAGED = {"app.kubernetes.io/managed-by": "netfence"}


def api_error(status: int, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason={404: "Not Found", 409: "Conflict", 422: "Unprocessable Entity",
                                              500: "Internal Server Error"}.get(status, "Error"))
    exc.body = json.dumps({"kind": "Status", "message": message}).encode() if message else None
    return exc


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.fail: dict[tuple[str, str], ApiException] = {}  # (operation, name) -> raised
        self.reject_status: Any = None  # callable(status) -> message or None: a stricter server
        self.hang: set[str] = set()  # objects whose status patch never returns
        self.events: list[tuple[dict[str, str], str, str]] = []
        self.calls: list[tuple[str, str]] = []
        self.called = asyncio.Event()
        self.list_gate = asyncio.Event()  # cleared: a listing waits (a slow API server), its snapshot taken
        self.list_gate.set()

    def _call(self, op: str, name: str) -> None:
        self.calls.append((op, name))
        self.called.set()
        if (op, name) in self.fail:
            raise self.fail[(op, name)]

    async def list_statuses(self) -> dict[str, dict[str, Any]]:
        self._call("list", "")
        snapshot = json.loads(json.dumps(self.objects))
        await self.list_gate.wait()
        return snapshot  # type: ignore[no-any-return]

    async def create_status(self, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        self._call("create", name)
        if name in self.objects:
            return None
        self.objects[name] = {"metadata": {"name": name, "labels": dict(MANAGED), "generation": 1}, "spec": spec}
        return json.loads(json.dumps(self.objects[name]))  # type: ignore[no-any-return]

    def edit_spec(self, name: str, spec: dict[str, Any]) -> None:
        """A spec change as the API server makes it: metadata.generation moves only when the spec changes."""
        obj = self.objects[name]
        if obj.get("spec") != spec:
            obj["spec"] = json.loads(json.dumps(spec))
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        self._call("patch_spec", name)
        if name not in self.objects:
            raise api_error(404)
        self.edit_spec(name, spec)
        return json.loads(json.dumps(self.objects[name]))  # type: ignore[no-any-return]

    async def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        self._call("patch_status", name)
        if name in self.hang:
            await asyncio.Event().wait()  # a request that never returns
        if name not in self.objects:
            return None
        problems = violations(status, SCHEMA, ".status")
        if not problems and self.reject_status is not None and (why := self.reject_status(status)):
            problems = [why]
        if problems:
            raise api_error(422, "; ".join(problems))
        self.objects[name]["status"] = json.loads(json.dumps(status))
        return json.loads(json.dumps(self.objects[name]))  # type: ignore[no-any-return]

    async def delete_status(self, name: str) -> None:
        self._call("delete", name)
        self.objects.pop(name, None)

    async def post_event(self, involved: dict[str, str], reason: str, message: str, kind: str = "Warning") -> None:
        self.events.append((involved, reason, message))

    def count(self, op: str, name: str | None = None) -> int:
        return sum(1 for o, n in self.calls if o == op and (name is None or n == name))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


class Writer(StatusWriter):
    clock: Clock

    def _now(self) -> float:
        return self.clock.now


def policy(ns: str, name: str, rv: int, selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": f"uid-{name}", "generation": 1, "resourceVersion": str(rv)},
        "spec": {"podSelector": {"matchLabels": selector or {"app": name}},
                 "ingress": [{"from": [{"podSelector": {}}]}]},
    }


def pod(ns: str, name: str, labels: dict[str, str], node: str, ip: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels, "resourceVersion": str(rv)},
            "spec": {"nodeName": node}, "status": {"podIP": ip, "phase": "Running"}}


def setup(*names: str) -> tuple[Writer, FakeKube, WorldTracker]:
    kube = FakeKube()
    world = WorldTracker(ModelEngine())
    world.apply("namespaces", "ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
    for i, name in enumerate(names):
        world.apply("networkpolicies", "ADDED", policy("ns", name, 10 + i))
    writer = Writer(kube, world.engine, world, {}, lambda: True, interval=0.0)  # type: ignore[arg-type]
    writer.clock = Clock()
    writer.mark_all()
    return writer, kube, world


async def periodic_listing(writer: StatusWriter) -> None:
    """A pass that starts the periodic listing (beside the passes), its end, and the pass that
    takes it in."""
    await writer.flush()
    assert writer.listing is not None
    await writer.listing
    await writer.flush()


def phase(kube: FakeKube, name: str) -> str | None:
    value = kube.objects.get(name, {}).get("status", {}).get("phase")
    return None if value is None else str(value)


async def test_writes_each_object_once_and_only_on_change() -> None:
    writer, kube, _ = setup("a", "b")
    await writer.flush()
    assert phase(kube, "ns.a") == phase(kube, "ns.b") == "Enforced"
    calls = len(kube.calls)
    writer.mark_all()
    await writer.flush()
    assert len(kube.calls) == calls  # nothing changed: no API call at all


async def test_one_failing_object_never_blocks_the_others() -> None:
    writer, kube, world = setup("a", "b", "c")
    kube.fail[("patch_status", "ns.b")] = api_error(500, "etcdserver: request timed out")
    await writer.flush()
    assert phase(kube, "ns.a") == phase(kube, "ns.c") == "Enforced"
    assert phase(kube, "ns.b") is None
    failure = writer.failures["ns.b"]
    assert failure.attempts == 1 and "request timed out" in failure.error
    assert failure.due == writer.clock.now + backoff_delay(1)
    # the error shows as an Event on the object itself
    assert kube.events == [({"apiVersion": "netfence.dev/v1alpha1", "kind": "ClusterPolicyStatus", "name": "ns.b"},
                            "StatusWriteFailed",
                            "writing ClusterPolicyStatus ns.b failed: 500 Internal Server Error: "
                            "etcdserver: request timed out")]

    # Others keep being written while b backs off; b is not retried before its time.
    world.apply("networkpolicies", "ADDED", policy("ns", "d", 50))
    writer.mark_all()
    await writer.flush()
    assert phase(kube, "ns.d") == "Enforced"
    assert kube.count("patch_status", "ns.b") == 1

    writer.clock.now += backoff_delay(1)
    await writer.flush()
    assert kube.count("patch_status", "ns.b") == 2
    assert writer.failures["ns.b"].attempts == 2
    assert len(kube.events) == 1  # the same error is posted once

    del kube.fail[("patch_status", "ns.b")]
    writer.clock.now += backoff_delay(2)
    assert writer.next_due() <= writer.clock.now  # the loop would wake for it without new input
    await writer.flush()
    assert phase(kube, "ns.b") == "Enforced"
    assert "ns.b" not in writer.failures


async def test_a_hung_request_holds_up_only_its_own_object() -> None:
    writer, kube, _ = setup("a", "b", "c")
    writer.call_timeout = 0.05
    kube.hang.add("ns.a")
    await asyncio.wait_for(writer.flush(), 5)
    assert phase(kube, "ns.b") == phase(kube, "ns.c") == "Enforced"
    assert writer.failures["ns.a"].error == "TimeoutError"
    assert kube.events[0][1] == "StatusWriteFailed"


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000) == 30


async def test_an_object_that_cannot_be_created_reports_on_its_policy() -> None:
    writer, kube, _ = setup("a", "b")
    kube.fail[("create", "ns.b")] = api_error(422, "metadata.name: Invalid value: must be no more than 253 characters")
    await writer.flush()
    assert phase(kube, "ns.a") == "Enforced"
    assert "ns.b" not in kube.objects
    assert kube.events[0][0] == {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": "ns",
                                 "name": "b", "uid": "uid-b"}
    assert "must be no more than 253 characters" in kube.events[0][2]


async def test_a_rejected_status_is_replaced_by_a_reduced_one() -> None:
    writer, kube, _ = setup("a", "b")
    kube.reject_status = lambda s: "status.nodes: Forbidden: a stricter CRD" if "nodes" in s else None
    await writer.flush()
    for name in ("ns.a", "ns.b"):
        status = kube.objects[name]["status"]
        assert status["phase"] == "Enforced"
        failed = next(c for c in status["conditions"] if c["type"] == "StatusWriteFailed")
        assert "a stricter CRD" in failed["message"]
    assert [e[1] for e in kube.events] == ["StatusRejected", "StatusRejected"]
    assert not writer.failures  # not retried blindly: the same status would be rejected again
    calls = len(kube.calls)
    writer.mark_all()
    await writer.flush()
    assert len(kube.calls) == calls
    # Once the server accepts it again (e.g. CRD upgraded), the periodic listing shows the reduced
    # status, which differs from the computed one: the full status is written.
    kube.reject_status = None
    writer.clock.now += writer.resync_seconds
    await periodic_listing(writer)
    assert all(c["type"] != "StatusWriteFailed" for c in kube.objects["ns.a"]["status"]["conditions"])


async def test_status_of_a_policy_gone_from_the_world_is_deleted() -> None:
    """However the policy left (a listing without it, no DELETED event): the writer deletes its object."""
    writer, kube, world = setup("a", "b")
    await writer.flush()
    world.apply("networkpolicies", "DELETED", policy("ns", "b", 99))  # as a full listing would remove it
    writer.mark_all()  # what the runtime's full_resync does after merging a listing
    await writer.flush()
    assert set(kube.objects) == {"ns.a"}
    assert kube.count("delete", "ns.b") == 1


async def test_policies_removed_deletes_and_ignores_policies_that_came_back() -> None:
    writer, kube, world = setup("a", "b")
    await writer.flush()
    world.apply("networkpolicies", "DELETED", policy("ns", "b", 99))
    writer.policies_removed([("ns", "b"), ("ns", "a")])  # a is still in the world: kept
    await writer.flush()
    assert set(kube.objects) == {"ns.a"}
    await writer.delete("ns", "a")  # the DELETED handler's call, while the world still has it
    await writer.flush()
    assert set(kube.objects) == {"ns.a"}


async def test_listing_deletes_orphans_left_by_an_earlier_controller() -> None:
    writer, kube, _ = setup("a")
    kube.objects["ns.gone"] = {"metadata": {"name": "ns.gone", "labels": dict(MANAGED)}, "spec": {}}
    kube.objects["ns.foreign"] = {"metadata": {"name": "ns.foreign"}, "spec": {}}
    await writer.flush()
    assert set(kube.objects) == {"ns.a", "ns.foreign"}  # not ours: left alone


async def test_periodic_listing_finds_orphans() -> None:
    writer, kube, _ = setup("a")
    await writer.flush()
    kube.objects["ns.late"] = {"metadata": {"name": "ns.late", "labels": dict(MANAGED)}, "spec": {}}
    await writer.flush()
    assert "ns.late" in kube.objects  # not listed again yet
    writer.clock.now += writer.resync_seconds
    assert writer.next_due() <= writer.clock.now
    await periodic_listing(writer)
    assert "ns.late" not in kube.objects


async def test_a_failing_delete_is_retried_with_backoff() -> None:
    writer, kube, world = setup("a", "b")
    await writer.flush()
    kube.fail[("delete", "ns.b")] = api_error(500)
    world.apply("networkpolicies", "DELETED", policy("ns", "b", 99))
    writer.policies_removed([("ns", "b")])
    await writer.flush()
    await writer.flush()
    assert kube.count("delete", "ns.b") == 1
    assert kube.events[-1][0]["name"] == "ns.b"
    del kube.fail[("delete", "ns.b")]
    writer.clock.now += backoff_delay(1)
    await writer.flush()
    assert set(kube.objects) == {"ns.a"}
    assert not writer.failures


async def test_a_failed_listing_does_not_stop_writes() -> None:
    writer, kube, _ = setup("a", "b")
    kube.objects["ns.a"] = {"metadata": {"name": "ns.a", "labels": dict(MANAGED)},
                            "spec": {"policy": {"namespace": "ns", "name": "a", "uid": "old"}, "policyRef": "ns/a"}}
    kube.fail[("list", "")] = api_error(500)
    await writer.flush()
    assert phase(kube, "ns.a") == phase(kube, "ns.b") == "Enforced"
    assert kube.objects["ns.a"]["spec"]["policy"]["uid"] == "uid-a"  # adopted (409) and its spec fixed
    assert writer.failures[""].attempts == 1
    assert kube.events == []  # nothing to post a listing failure on; it is logged
    del kube.fail[("list", "")]
    writer.clock.now += backoff_delay(1)
    await writer.flush()
    assert "" not in writer.failures


async def test_a_status_object_deleted_by_someone_is_recreated() -> None:
    writer, kube, _ = setup("a")
    await writer.flush()
    del kube.objects["ns.a"]
    writer.status_deleted("ns.a")
    await writer.flush()
    assert phase(kube, "ns.a") == "Enforced"


async def test_bad_keys_in_reports_degrade_the_affected_policies() -> None:
    writer, kube, world = setup("a", "b")
    world.apply("pods", "ADDED", pod("ns", "pa", {"app": "a"}, "node-0", "10.0.0.1", 20))
    world.apply("pods", "ADDED", pod("ns", "pb", {"app": "b"}, "node-0", "10.0.0.2", 21))
    writer.set_report("node-0", NodeReport.from_json({"appliedRevision": 5, "badKeys": [
        {"key": "endpoints/node-0/ns/pa", "reason": "not JSON"}]}, "node-0"))
    await writer.flush()
    assert phase(kube, "ns.a") == "Degraded"
    degraded = next(c for c in kube.objects["ns.a"]["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "BadKey" and "node-0: endpoints/node-0/ns/pa (not JSON)" in degraded["message"]
    assert phase(kube, "ns.b") == "Enforced"
    writer.set_report("node-0", NodeReport("node-0", 5, bad_keys=(BadKey("policies/ns/b", "foreign write"),)))
    await writer.flush()
    assert phase(kube, "ns.a") == "Enforced" and phase(kube, "ns.b") == "Degraded"


async def test_the_loop_retries_a_failed_object_without_new_input() -> None:
    kube = FakeKube()
    world = WorldTracker(ModelEngine())
    world.apply("networkpolicies", "ADDED", policy("ns", "a", 10))
    kube.fail[("patch_status", "ns.a")] = api_error(500)
    writer = StatusWriter(kube, world.engine, world, {}, lambda: True, interval=0.0)  # type: ignore[arg-type]
    writer.mark_all()
    task = asyncio.create_task(writer.run())
    try:
        async def patched(times: int) -> None:
            while kube.count("patch_status", "ns.a") < times:
                kube.called.clear()
                await kube.called.wait()

        await asyncio.wait_for(patched(1), 5)
        del kube.fail[("patch_status", "ns.a")]
        await asyncio.wait_for(patched(2), 5)  # woken by the object's own retry time (0.5 s)
        assert phase(kube, "ns.a") == "Enforced"  # patch_status stored it before returning
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- generations: observedGeneration is the object's own (kstatus, Flux, Argo CD) ----------------


def generations(kube: FakeKube, name: str) -> tuple[int, int, int, set[int]]:
    """(metadata.generation, status.observedGeneration, status.policyGeneration, conditions' generations)."""
    obj = kube.objects[name]
    status = obj["status"]
    return (obj["metadata"]["generation"], status["observedGeneration"], status["policyGeneration"],
            {c["observedGeneration"] for c in status["conditions"]})


async def test_observed_generation_is_the_objects_own_and_the_policys_is_separate() -> None:
    writer, kube, world = setup("a")
    await writer.flush()
    assert generations(kube, "ns.a") == (1, 1, 1, {1})
    # The policy changes twice: its generation goes to 3, the status object's spec is patched each time.
    for generation, rv in ((2, 30), (3, 31)):
        body = policy("ns", "a", rv)
        body["metadata"]["generation"] = generation
        world.apply("networkpolicies", "MODIFIED", body)
        writer.mark_all()
        await writer.flush()
    assert kube.objects["ns.a"]["spec"]["generation"] == 3
    assert generations(kube, "ns.a") == (3, 3, 3, {3})
    calls = len(kube.calls)
    writer.mark_all()
    await writer.flush()
    assert len(kube.calls) == calls  # in step: nothing to write


async def test_a_spec_edited_by_someone_else_is_restored_and_the_status_follows() -> None:
    writer, kube, world = setup("a")
    await writer.flush()
    original = dict(kube.objects["ns.a"]["spec"])
    kube.edit_spec("ns.a", {**original, "policyRef": "someone/else"})  # generation 2, status still says 1
    # The next status write (a report arrives) sees generation 2 in the response: spec put back, status again.
    world.apply("pods", "ADDED", pod("ns", "pa", {"app": "a"}, "node-0", "10.0.0.1", 20))
    writer.on_commit(1, set(world.engine.drain_changes()))  # the syncer's commit of the new endpoint
    writer.set_report("node-0", NodeReport("node-0", 0))
    await writer.flush()
    await writer.flush()
    assert kube.objects["ns.a"]["spec"] == original
    assert generations(kube, "ns.a") == (3, 3, 1, {3})


async def test_a_listing_brings_the_generation_and_writes_nothing_when_in_step() -> None:
    writer, kube, _ = setup("a")
    await writer.flush()
    kube.objects["ns.a"]["metadata"]["generation"] = 1
    fresh = Writer(kube, writer.engine, writer.world, {}, lambda: True, interval=0.0)  # type: ignore[arg-type]
    fresh.clock = Clock()
    fresh.request_resync()
    calls = kube.count("patch_status") + kube.count("patch_spec")
    await fresh.flush()
    assert kube.count("patch_status") + kube.count("patch_spec") == calls  # a new leader rewrites nothing
    assert fresh.generations == {"ns.a": 1}
    # An object written by an older controller (observedGeneration = the policy's, 7) is rewritten.
    kube.objects["ns.a"]["status"]["observedGeneration"] = 7
    kube.objects["ns.a"]["status"].pop("policyGeneration")
    fresh.request_resync()
    await fresh.flush()
    assert generations(kube, "ns.a") == (1, 1, 1, {1})


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ApiException(status=503, reason="Service Unavailable"), True),
        (ApiException(status=429, reason="Too Many Requests"), True),
        (ApiException(status=500, reason="Internal Server Error"), True),
        (ApiException(status=422, reason="Unprocessable Entity"), False),
        (ApiException(status=403, reason="Forbidden"), False),
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (ValueError("bad"), False),
    ],
)
def test_unreachable_api_server_is_retried_within_a_second(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient
    cap = TRANSIENT_BACKOFF_MAX if transient else BACKOFF_MAX
    assert backoff_delay(20, cap=cap) == (1.0 if transient else 30.0)


async def test_enforced_is_written_at_once_and_other_statuses_once_they_held_for_the_interval() -> None:
    writer, kube, world = setup("a")
    await writer.flush()
    assert phase(kube, "ns.a") == "Enforced"
    writer.interval = 0.2
    patches = kube.count("patch_status", "ns.a")

    def commit(revision: int, *pods: tuple[str, str]) -> None:
        for name, ip in pods:
            world.apply("pods", "ADDED", pod("ns", name, {"app": "a"}, "node-0", ip, revision))
        keys = set(world.engine.drain_changes())
        writer.key_revisions.update(dict.fromkeys(keys, revision))
        writer.on_commit(revision, keys)

    # A new endpoint: not yet on node-0. Pending is held back (the written status stays Enforced) ...
    commit(5, ("pa", "10.0.0.1"))
    await writer.flush()
    assert kube.count("patch_status", "ns.a") == patches and phase(kube, "ns.a") == "Enforced"
    assert writer.next_due() == writer.clock.now + 0.2  # ... and the loop wakes for it
    # ... node-0 applies it within the interval: one write, Enforced for revision 5.
    writer.clock.now += 0.05
    writer.set_report("node-0", NodeReport("node-0", 5))
    await writer.flush()
    assert kube.count("patch_status", "ns.a") == patches + 1
    assert kube.objects["ns.a"]["status"]["phase"] == "Enforced" and kube.objects["ns.a"]["status"]["revision"] == 5

    # A change node-0 takes longer to apply: Pending is written once it held for the interval.
    commit(6, ("pb", "10.0.0.2"))
    await writer.flush()
    writer.clock.now += 0.1
    await writer.flush()
    assert kube.count("patch_status", "ns.a") == patches + 1
    writer.clock.now += 0.1
    assert writer.next_due() <= writer.clock.now
    await writer.flush()
    assert kube.count("patch_status", "ns.a") == patches + 2 and phase(kube, "ns.a") == "Pending"
    writer.set_report("node-0", NodeReport("node-0", 6))
    await writer.flush()
    assert kube.count("patch_status", "ns.a") == patches + 3 and phase(kube, "ns.a") == "Enforced"
    assert not writer._held and not writer._held_since


async def test_a_relisting_computes_again_only_objects_not_as_the_writer_left_them() -> None:
    """A periodic re-list of the objects must not put every policy into one long pass (the
    statuses of real changes would wait behind it): only missing or changed objects."""
    writer, kube, _ = setup("a", "b", "c")
    await writer.flush()
    assert {phase(kube, n) for n in ("ns.a", "ns.b", "ns.c")} == {"Enforced"}
    before, patches = writer.evaluations, kube.count("patch_status")
    writer.request_resync(full=False)
    await writer.flush()
    assert writer.evaluations == before and kube.count("patch_status") == patches  # all as left
    # Someone edits b's status and deletes c: those two (only) are computed and written again.
    kube.objects["ns.b"]["status"]["phase"] = "Pending"
    del kube.objects["ns.c"]
    writer.request_resync(full=False)
    await writer.flush()
    assert writer.evaluations - before <= 2  # b here; c's status is computed where it is created
    assert phase(kube, "ns.b") == phase(kube, "ns.c") == "Enforced"
    assert kube.count("patch_status", "ns.a") == 1
    # Becoming leader computes every status again.
    before = writer.evaluations
    writer.request_resync()
    await writer.flush()
    assert writer.evaluations - before == 3


async def test_a_new_policy_is_written_while_the_periodic_listing_is_still_running() -> None:
    """The periodic listing runs beside the passes: a slow listing (1,000 objects) must not hold a
    new policy's status; an object created meanwhile is not in the listing, yet it is known to exist."""
    writer, kube, world = setup("a")
    await writer.flush()
    kube.list_gate.clear()
    writer.clock.now += writer.resync_seconds
    await writer.flush()  # starts the listing, which hangs
    assert writer.listing is not None and not writer.listing.done()
    world.apply("networkpolicies", "ADDED", policy("ns", "b", 50))
    writer.mark_all()
    await writer.flush()
    assert phase(kube, "ns.b") == "Enforced" and not writer.listing.done()
    kube.list_gate.set()
    await writer.listing
    creates = kube.count("create", "ns.b")
    await writer.flush()
    assert "ns.b" in writer.existing and kube.count("create", "ns.b") == creates  # no second create
    assert writer.listing is None


async def test_an_object_deleted_by_someone_is_recreated_after_a_relisting() -> None:
    """A listing awaited by the pass (a re-list after a watch gap) is authoritative: an object this
    writer created earlier and someone deleted since is missing, so it is created again."""
    writer, kube, _ = setup("a")
    await writer.flush()
    del kube.objects["ns.a"]
    writer.request_resync(full=False)
    await writer.flush()
    assert phase(kube, "ns.a") == "Enforced" and kube.count("create", "ns.a") == 2
