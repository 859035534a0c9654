"""Status follows the change (issue 11 part 1): a node counts as synced for a policy once it has
applied the policy's last change *relevant to that node* (model/relevance.py), so nodes a commit
does not touch stay synced without reporting, and touched nodes are pending until they report."""

from __future__ import annotations

from tests.unit.status.test_status_writer import Clock, FakeKube, Writer, phase, pod, policy

from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import NodeReport, PolicyFacts, compute_status
from netfence.status.sync_index import SyncIndex


def spread() -> tuple[Writer, FakeKube, WorldTracker, dict[str, int]]:
    """Policy ns/spread selects pa (node-a) and pb (node-b); pc (node-a) is in its peer set only.
    Everything committed at revision 5; both nodes report 5."""
    world = WorldTracker(ModelEngine())
    world.apply("namespaces", "ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
    world.apply("networkpolicies", "ADDED", policy("ns", "spread", 2))
    world.apply("pods", "ADDED", pod("ns", "pa", {"app": "spread"}, "node-a", "10.0.0.1", 3))
    world.apply("pods", "ADDED", pod("ns", "pb", {"app": "spread"}, "node-b", "10.0.0.2", 4))
    world.apply("pods", "ADDED", pod("ns", "pc", {"app": "none"}, "node-a", "10.0.0.3", 5))
    revisions = dict.fromkeys(world.engine.drain_changes(), 5)
    kube = FakeKube()
    writer = Writer(kube, world.engine, world, revisions, lambda: True, interval=0.0)  # type: ignore[arg-type]
    writer.clock = Clock()
    writer.mark_all()
    return writer, kube, world, revisions


async def test_an_untouched_node_stays_synced_and_a_touched_one_is_pending_until_it_reports() -> None:
    writer, kube, world, revisions = spread()
    writer.set_report("node-a", NodeReport("node-a", 5))
    writer.set_report("node-b", NodeReport("node-b", 5))
    await writer.flush()
    assert phase(kube, "ns.spread") == "Enforced"
    # pc is relabelled: it becomes an endpoint of the policy on node-a; the peer set (IPs) is unchanged
    world.apply("pods", "MODIFIED", pod("ns", "pc", {"app": "spread"}, "node-a", "10.0.0.3", 6))
    changed = set(world.engine.drain_changes())
    assert changed == {"endpoints/node-a/ns/pc"}
    revisions.update(dict.fromkeys(changed, 6))
    writer.on_commit(6, changed)
    await writer.flush()
    status = kube.objects["ns.spread"]["status"]
    assert status["phase"] == "Pending" and status["revision"] == 6
    assert {n["name"]: n["synced"] for n in status["nodes"]} == {"node-a": False, "node-b": True}
    assert writer.index.pending_on("node-b") == {}
    assert writer.index.pending_on("node-a") == {("ns", "spread"): 6}
    # node-a applies and reports 6; node-b never reports again (the commit did not touch it)
    writer.set_report("node-a", NodeReport("node-a", 6))
    await writer.flush()
    assert phase(kube, "ns.spread") == "Enforced"


async def test_a_change_every_node_uses_needs_every_node() -> None:
    writer, kube, world, revisions = spread()
    writer.set_report("node-a", NodeReport("node-a", 5))
    writer.set_report("node-b", NodeReport("node-b", 5))
    await writer.flush()
    # a new pod in the namespace joins the policy's peer set: both nodes' rules change
    world.apply("pods", "ADDED", pod("ns", "pd", {"app": "none"}, "node-c", "10.0.0.4", 7))
    changed = set(world.engine.drain_changes())
    assert any(key.startswith("sets/") for key in changed)
    revisions.update(dict.fromkeys(changed, 7))
    writer.on_commit(7, changed)
    await writer.flush()
    status = kube.objects["ns.spread"]["status"]
    assert status["phase"] == "Pending"
    assert {n["name"]: n["synced"] for n in status["nodes"]} == {"node-a": False, "node-b": False}
    writer.set_report("node-a", NodeReport("node-a", 7))
    writer.set_report("node-b", NodeReport("node-b", 7))
    await writer.flush()
    assert phase(kube, "ns.spread") == "Enforced"


def test_agents_that_report_every_commit_are_synced_too() -> None:
    """Old agents (report every commit): their applied revision is the latest commit, never
    below the per-node revision, so the per-node rule only ever relaxes the old one."""
    facts = PolicyFacts("ns", "p", 1, frozenset({"a", "b"}), 2, revision=9, node_revisions={"a": 9, "b": 4})
    assert compute_status(facts, {"a": NodeReport("a", 9), "b": NodeReport("b", 9)})["phase"] == "Enforced"
    assert compute_status(facts, {"a": NodeReport("a", 9), "b": NodeReport("b", 4)})["phase"] == "Enforced"
    waiting = compute_status(facts, {"a": NodeReport("a", 8), "b": NodeReport("b", 4)})
    assert waiting["phase"] == "Pending" and "apply revision 9" in waiting["conditions"][0]["message"]
    no_per_node = PolicyFacts("ns", "p", 1, frozenset({"a", "b"}), 2, revision=9)
    assert compute_status(no_per_node, {"a": NodeReport("a", 9), "b": NodeReport("b", 4)})["phase"] == "Pending"


def test_the_sync_index_orders_each_node_by_its_own_revision() -> None:
    index = SyncIndex()
    index.advance("a", 5)
    index.advance("b", 5)
    index.update(("ns", "p"), 9, frozenset({"a", "b"}), {"a": 9, "b": 5})
    assert index.pending_on("a") == {("ns", "p"): 9}
    assert index.pending_on("b") == {}
    assert index.advance("a", 8) == []
    assert index.advance("a", 9) == [("ns", "p")]
