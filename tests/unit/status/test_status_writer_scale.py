"""StatusWriter at scale (issue 11): work per report change, bounded concurrent writes.

* A node report change re-evaluates only the policies whose state on that node
  can change (status/sync_index.py): the count does not depend on how many
  policies the node is not concerned with.
* Objects are created and patched by at most ``concurrency`` writers at once;
  unchanged statuses are still never written; one failing object still holds
  up only itself.
* Driven through random report changes and commits, the indexed writer writes
  exactly the statuses of a writer that re-evaluates every policy on every
  report (the behaviour before the index).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.status.test_status_writer import Clock, FakeKube, Writer, api_error, phase, pod, policy

from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import BadKey, NodeReport, Unenforceable, strip_times

NODE = "node-0"
CONCERNED = 3  # policies that select pods on NODE


def build_world(unrelated: int) -> tuple[WorldTracker, dict[str, int]]:
    """CONCERNED policies with endpoints on NODE, ``unrelated`` policies with endpoints on 9 other nodes;
    every committed key at revision 5."""
    world = WorldTracker(ModelEngine())
    world.apply("namespaces", "ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
    rv = 10
    for i in range(CONCERNED):
        world.apply("networkpolicies", "ADDED", policy("ns", f"mine{i}", rv := rv + 1))
        world.apply("pods", "ADDED", pod("ns", f"pm{i}", {"app": f"mine{i}"}, NODE, f"10.0.0.{i + 1}", rv := rv + 1))
    for k in range(min(unrelated, 100)):  # spread over namespaces: building the world stays fast
        world.apply("namespaces", "ADDED", {"metadata": {"name": f"u{k}", "resourceVersion": str(rv := rv + 1)}})
    for i in range(unrelated):
        ns, ip = f"u{i % 100}", f"10.1.{i // 250}.{i % 250 + 1}"
        world.apply("networkpolicies", "ADDED", policy(ns, f"other{i}", rv := rv + 1))
        world.apply("pods", "ADDED", pod(ns, f"po{i}", {"app": f"other{i}"}, f"node-{1 + i % 9}", ip, rv := rv + 1))
    return world, dict.fromkeys(world.engine.drain_changes(), 5)


def make_writer(world: WorldTracker, revisions: dict[str, int], kube: FakeKube | None = None,
                **options: Any) -> tuple[Writer, FakeKube]:
    kube = kube or FakeKube()
    writer = Writer(kube, world.engine, world, revisions, lambda: True, interval=0.0, **options)  # type: ignore[arg-type]
    writer.clock = Clock()
    writer.mark_all()
    return writer, kube


async def evaluations_for(writer: Writer, node: str, report: NodeReport | None) -> int:
    before = writer.evaluations
    writer.set_report(node, report)
    await writer.flush()
    return writer.evaluations - before


async def report_change_costs(unrelated: int, **options: Any) -> tuple[list[int], Writer, FakeKube]:
    world, revisions = build_world(unrelated)
    writer, kube = make_writer(world, revisions, **options)
    for n in range(10):
        writer.set_report(f"node-{n}", NodeReport(f"node-{n}", 4))  # every node one commit behind
    await writer.flush()
    assert phase(kube, "ns.mine0") == "Pending"
    costs = [
        await evaluations_for(writer, NODE, NodeReport(NODE, 5)),  # catches up: its policies flip
        await evaluations_for(writer, NODE, NodeReport(NODE, 6, time="t")),  # a later commit: nothing flips
        await evaluations_for(writer, NODE, NodeReport(NODE, 6, rules=99)),  # fields status does not read
        await evaluations_for(writer, NODE, NodeReport(NODE, 6, last_error="iptables-restore failed")),
        await evaluations_for(writer, NODE, NodeReport(NODE, 6, bad_keys=(BadKey("sets/x", "not JSON"),))),
        await evaluations_for(writer, NODE, None),  # its lease expired
    ]
    return costs, writer, kube


@pytest.mark.parametrize("unrelated", [10, 1000])
async def test_a_report_change_costs_the_policies_of_its_node_only(unrelated: int) -> None:
    costs, writer, kube = await report_change_costs(unrelated)
    assert costs == [CONCERNED, 0, 0, CONCERNED, CONCERNED, CONCERNED]
    assert phase(kube, "ns.mine0") == "Degraded"  # no report from node-0 any more
    assert phase(kube, "u0.other0") == "Pending"  # its nodes are still one commit behind
    assert writer.index.required_on(NODE) == {("ns", f"mine{i}") for i in range(CONCERNED)}


async def test_the_baseline_switch_re_evaluates_every_policy_on_every_report() -> None:
    costs, _, _ = await report_change_costs(10, mark_all_on_report=True)
    assert costs == [CONCERNED + 10] * 6


async def test_a_commit_moving_a_pod_keeps_the_index_current() -> None:
    world, revisions = build_world(5)
    writer, kube = make_writer(world, revisions)
    for n in range(10):
        writer.set_report(f"node-{n}", NodeReport(f"node-{n}", 5))
    await writer.flush()
    assert phase(kube, "u0.other0") == "Enforced"
    # po0 moves to NODE (a new pod object in the real world; here a modification will do)
    world.apply("pods", "MODIFIED", pod("u0", "po0", {"app": "other0"}, NODE, "10.1.0.1", 500))
    changed = set(world.engine.drain_changes())
    revisions.update(dict.fromkeys(changed, 6))
    writer.on_commit(6, changed)
    await writer.flush()
    assert phase(kube, "u0.other0") == "Pending"
    assert ("u0", "other0") in writer.index.required_on(NODE)
    assert await evaluations_for(writer, NODE, NodeReport(NODE, 6)) == 1  # only other0 flips
    assert phase(kube, "u0.other0") == "Enforced"


async def test_warnings_are_recomputed_only_when_the_model_changes() -> None:
    """Warnings cost O(pods) (ipBlock rules): a report change reuses them, a commit recomputes them."""
    world, revisions = build_world(3)
    writer, _ = make_writer(world, revisions)
    asked: list[bool] = []
    original = world.engine.policy_view

    def counting(namespace: str, name: str, *, with_warnings: bool = True) -> Any:
        asked.append(with_warnings)
        return original(namespace, name, with_warnings=with_warnings)

    world.engine.policy_view = counting  # type: ignore[method-assign]
    writer.set_report(NODE, NodeReport(NODE, 4))
    await writer.flush()
    assert asked and all(asked)  # first computation: with warnings
    asked.clear()
    assert await evaluations_for(writer, NODE, NodeReport(NODE, 5)) == CONCERNED
    assert asked == [False] * CONCERNED
    asked.clear()
    writer.on_commit(6, {"policies/ns/mine0"})
    await writer.flush()
    assert asked == [True]


async def test_a_deleted_status_object_costs_its_own_policy_only() -> None:
    world, revisions = build_world(50)
    writer, kube = make_writer(world, revisions)
    await writer.flush()
    was = kube.objects.pop("u7.other7")["status"]
    before = writer.evaluations
    writer.status_deleted("u7.other7")
    await writer.flush()
    assert writer.evaluations - before == 1
    assert strip_times(kube.objects["u7.other7"]["status"]) == strip_times(was)  # recreated, the same status


# --- bounded concurrency -------------------------------------------------------------------


class SlowKube(FakeKube):
    """Every call takes a while; records how many run at once."""

    def __init__(self, delay: float = 0.005) -> None:
        super().__init__()
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0

    async def _slow(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1

    async def create_status(self, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        await self._slow()
        return await super().create_status(name, spec)

    async def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        await self._slow()
        return await super().patch_status(name, status)

    async def delete_status(self, name: str) -> None:
        await self._slow()
        await super().delete_status(name)


def many(count: int) -> WorldTracker:
    world = WorldTracker(ModelEngine())
    world.apply("namespaces", "ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
    for i in range(count):
        world.apply("networkpolicies", "ADDED", policy("ns", f"p{i}", 10 + i))
    return world


@pytest.mark.parametrize("limit", [1, 4, 16])
async def test_writes_run_concurrently_up_to_the_limit(limit: int) -> None:
    world = many(40)
    kube = SlowKube()
    writer, _ = make_writer(world, {}, kube, concurrency=limit)
    await writer.flush()
    assert kube.max_in_flight == limit
    assert all(phase(kube, f"ns.p{i}") == "Enforced" for i in range(40))
    assert kube.count("create") == kube.count("patch_status") == 40
    calls = len(kube.calls)
    writer.mark_all()
    await writer.flush()
    assert len(kube.calls) == calls  # nothing changed: still no API call at all
    # deletions are bounded the same way
    for i in range(40):
        world.apply("networkpolicies", "DELETED", policy("ns", f"p{i}", 100 + i))
    kube.max_in_flight = 0
    writer.mark_all()
    await writer.flush()
    assert kube.objects == {} and kube.max_in_flight == limit


async def test_a_failing_object_still_holds_up_only_itself_when_concurrent() -> None:
    world = many(20)
    kube = SlowKube()
    kube.fail[("patch_status", "ns.p7")] = api_error(500, "etcdserver: request timed out")
    kube.hang.add("ns.p3")
    writer, _ = make_writer(world, {}, kube, concurrency=4, call_timeout=0.2)
    await asyncio.wait_for(writer.flush(), 5)
    assert {n for n in kube.objects if phase(kube, n) == "Enforced"} == {f"ns.p{i}" for i in range(20)} - {
        "ns.p3", "ns.p7"}
    assert set(writer.failures) == {"ns.p3", "ns.p7"}
    assert writer.failures["ns.p3"].error == "TimeoutError"
    del kube.fail[("patch_status", "ns.p7")]
    kube.hang.clear()
    writer.clock.now += 1.0
    await writer.flush()
    assert all(phase(kube, f"ns.p{i}") == "Enforced" for i in range(20)) and not writer.failures


# --- equivalence with re-evaluating everything -------------------------------------------------

NODES = [f"node-{n}" for n in range(3)]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("report"), st.sampled_from(NODES), st.integers(0, 12),
                  st.sampled_from([None, "apply failed"]), st.booleans(), st.booleans()),
        st.tuples(st.just("gone"), st.sampled_from(NODES)),
        st.tuples(st.just("move"), st.integers(0, 7), st.sampled_from(NODES)),
        st.tuples(st.just("commit"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=25,
)


def statuses(kube: FakeKube) -> dict[str, Any]:
    return {name: strip_times(obj.get("status")) for name, obj in sorted(kube.objects.items())}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.randoms(use_true_random=False))
def test_indexed_writer_writes_what_re_evaluating_everything_writes(
    script: list[tuple[Any, ...]], rng: random.Random
) -> None:
    asyncio.run(_equivalence(script, rng))


async def _equivalence(script: list[tuple[Any, ...]], rng: random.Random) -> None:
    world = WorldTracker(ModelEngine())
    world.apply("namespaces", "ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
    rv = 10
    for i in range(4):
        world.apply("networkpolicies", "ADDED", policy("ns", f"p{i}", rv := rv + 1, {"app": f"a{i % 3}"}))
    for i in range(8):
        world.apply("pods", "ADDED", pod("ns", f"q{i}", {"app": f"a{i % 3}"}, NODES[i % 3], f"10.0.0.{i + 1}",
                                         rv := rv + 1))
    revisions = dict.fromkeys(world.engine.drain_changes(), 1)
    revision = 1
    indexed, kube_a = make_writer(world, revisions)
    baseline, kube_b = make_writer(world, revisions, mark_all_on_report=True)
    for step in script:
        if step[0] == "report":
            _, node, applied, error, bad, unenforceable = step
            report = NodeReport(node, applied, last_error=error,
                                bad_keys=(BadKey("policies/ns/p1", "x"),) if bad else (),
                                unenforceable=(Unenforceable("ns/p2", "sctp-port-match"),) if unenforceable else ())
            for writer in (indexed, baseline):
                writer.set_report(node, report)
        elif step[0] == "gone":
            for writer in (indexed, baseline):
                writer.set_report(step[1], None)
        else:
            if step[0] == "move":
                i, node = step[1], step[2]
                world.apply("pods", "MODIFIED", pod("ns", f"q{i}", {"app": f"a{i % 3}"}, node, f"10.0.0.{i + 1}",
                                                    rv := rv + 1))
                changed = set(world.engine.drain_changes())
            else:
                changed = set(rng.sample(sorted(revisions), k=min(step[1], len(revisions))))
            revision += 1
            revisions.update(dict.fromkeys(changed, revision))
            for writer in (indexed, baseline):
                writer.on_commit(revision, changed)
        await indexed.flush()
        await baseline.flush()
        assert statuses(kube_a) == statuses(kube_b), step
