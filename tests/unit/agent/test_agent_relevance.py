"""Agents do work only for commits that touch their node (issue 11 part 1), on in-memory fakes:
no apply and no report for a commit that is not relevant, coalescing when behind, the
old-controller gate, and the watch scope (what an agent receives at all)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.fakes.agent import running
from tests.fakes.dataplane import FakeDataplane
from tests.fakes.store import FakeStore, MemoryEtcd

from netfence.agent.commits import Action, absorb, node_ranges
from netfence.agent.loop import Agent
from netfence.agent.node_state import NodeState
from netfence.config import AgentConfig
from netfence.dataplane.render import Features
from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint, PeerSet
from netfence.model.relevance import node_uses
from netfence.store import layout as L
from netfence.store.types import CommitBatch

NODE = "node-1"
OTHER = "node-2"
CLIENTS = PeerSet(PeerSet.make_id("pods", {"name": "clients"}), "pods", {"name": "clients"}, ("10.244.1.11",))
ADMINS = PeerSet(PeerSet.make_id("pods", {"name": "admins"}), "pods", {"name": "admins"}, ("10.244.2.11",))
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/allow",), ())
DB = Endpoint(OTHER, "app", "db", ("10.244.2.10",), ("app/other",), ())
V4_ONLY = Features(ipv6=False)


def policy(name: str, peers: PeerSet, port: int = 80) -> CompiledPolicy:
    return CompiledPolicy("app", name, f"uid-{name}", (CompiledRule((peers.id,), (CompiledPort("TCP", port),)),), None)


def raw(value: PeerSet | CompiledPolicy | Endpoint) -> bytes:
    return json.dumps(value.to_json()).encode()


def world() -> dict[str, bytes | None]:
    """node-1 uses app/allow and the clients set; app/other (admins set) is used on node-2 only."""
    return {
        "policies/app/allow": raw(policy("allow", CLIENTS)),
        "policies/app/other": raw(policy("other", ADMINS)),
        f"sets/{CLIENTS.id}": raw(CLIENTS),
        f"sets/{ADMINS.id}": raw(ADMINS),
        f"endpoints/{NODE}/app/web": raw(WEB),
        f"endpoints/{OTHER}/app/db": raw(DB),
    }


class Setup:
    def __init__(self, watch_scope: str = "node") -> None:
        self.etcd = MemoryEtcd()
        self.controller = FakeStore(self.etcd, "controller")
        self.kernel = FakeDataplane()
        self.store = FakeStore(self.etcd, "agent")
        self.agent = Agent(AgentConfig(node=NODE, resync_seconds=3600.0, watch_scope=watch_scope), self.store,
                           self.kernel, V4_ONLY)  # type: ignore[arg-type]

    async def commit(self, changes: dict[str, bytes | None]) -> int:
        return await self.controller.write(changes, None)

    def report_writes(self) -> int:
        """Writes of this node's report so far."""
        key = L.Layout.node_status(NODE)
        return sum(1 for _, changes in self.etcd.history if key in changes)

    def report(self) -> dict[str, Any]:
        return self.controller.reports.reports().get(NODE, {})

    async def until(self, check: Callable[[], bool]) -> None:
        await self.etcd.until(check, timeout=10)

    async def synced(self, revision: int) -> None:
        await self.until(lambda: self.agent.health.synced_revision == revision)

    async def reported(self, revision: int) -> None:
        await self.until(lambda: self.report().get("appliedRevision") == revision)


async def test_a_commit_that_does_not_touch_the_node_is_neither_applied_nor_reported() -> None:
    s = Setup()
    first = await s.commit(world())
    async with running(s.agent):
        await s.reported(first)
        applies, writes = len(s.kernel.applies), s.report_writes()
        # another node's endpoint, a policy and a set this node does not use, controller bookkeeping
        db2 = Endpoint(OTHER, "app", "db", ("10.244.2.12",), ("app/other",), ())
        moved = await s.commit({f"endpoints/{OTHER}/app/db": raw(db2)})
        other = await s.commit({"policies/app/other": raw(policy("other", ADMINS, 443))})
        admins = PeerSet(ADMINS.id, "pods", ADMINS.definition, ("10.244.2.11", "10.244.2.13"))
        members = await s.commit({f"sets/{ADMINS.id}": raw(admins)})
        observed = await s.commit({"meta/observed": L.encode({"resourceVersions": {"pods": 7}})})
        assert moved < other < members < observed
        await s.synced(observed)
        assert len(s.kernel.applies) == applies, "no apply for commits that do not touch the node"
        assert s.report_writes() == writes, "no report for commits that do not touch the node"
        assert s.report()["appliedRevision"] == first
        assert s.agent.health.applied_revision == first and s.agent.health.as_json()["syncedRevision"] == observed


async def test_a_commit_that_touches_the_node_is_applied_and_reported() -> None:
    s = Setup()
    await s.commit(world())
    async with running(s.agent):
        await s.until(lambda: s.agent.health.applies == 1)
        applies = len(s.kernel.applies)
        # a member of a set the node's policy uses
        clients = PeerSet(CLIENTS.id, "pods", CLIENTS.definition, ("10.244.1.11", "10.244.1.12"))
        members = await s.commit({f"sets/{CLIENTS.id}": raw(clients)})
        await s.reported(members)
        assert len(s.kernel.applies) == applies + 1
        # the node's endpoint starts using the other policy: relevant (its references after)
        web2 = Endpoint(NODE, "app", "web", WEB.ips, ("app/allow", "app/other"), ())
        uses = await s.commit({f"endpoints/{NODE}/app/web": raw(web2)})
        await s.reported(uses)
        # ... so now a change of the admins set is relevant too
        admins = PeerSet(ADMINS.id, "pods", ADMINS.definition, ("10.244.2.11", "10.244.2.14"))
        later = await s.commit({f"sets/{ADMINS.id}": raw(admins)})
        await s.reported(later)
        # it stops using app/other: relevant (its references before), and after that app/other is not
        stop = await s.commit({f"endpoints/{NODE}/app/web": raw(WEB)})
        await s.reported(stop)
        writes = s.report_writes()
        after = await s.commit({"policies/app/other": raw(policy("other", ADMINS, 8443))})
        await s.synced(after)
        assert s.report_writes() == writes and s.report()["appliedRevision"] == stop


async def test_a_controller_without_the_relevance_rule_still_gets_every_commit_reported() -> None:
    """A commit marker without ``"reports": "relevant"`` (a controller from before issue 11):
    an untouched node applies nothing but reports the commit, so the old status rule holds."""
    s = Setup()
    first = await s.commit(world())
    async with running(s.agent):
        await s.reported(first)
        applies = len(s.kernel.applies)
        old_marker = L.encode({"seq": 99, "time": "2024-01-01T00:00:00.000Z", "controller": "old"})
        revision = s.etcd.apply({f"endpoints/{OTHER}/app/db": raw(DB), L.COMMIT: old_marker})
        await s.reported(revision)
        assert len(s.kernel.applies) == applies


async def test_prefix_scope_behaves_as_agents_before() -> None:
    s = Setup(watch_scope="prefix")
    first = await s.commit(world())
    async with running(s.agent):
        await s.reported(first)
        applies = len(s.kernel.applies)
        observed = await s.commit({"meta/observed": L.encode({"resourceVersions": {"pods": 7}})})
        await s.reported(observed)
        assert len(s.kernel.applies) == applies + 1


async def test_the_node_scope_receives_only_what_the_node_needs() -> None:
    """Events delivered to the agent: the commit marker and the node's keys, never other nodes'
    endpoints or bookkeeping (with the prefix scope: everything)."""
    counts = {}
    for scope in ("node", "prefix"):
        s = Setup(watch_scope=scope)
        first = await s.commit(world())
        async with running(s.agent):
            await s.reported(first)
            before = s.store.reader.delivered_events
            last = 0
            for i in range(5):  # five commits, each: another node's endpoint + meta/observed
                db = Endpoint(OTHER, "app", "db", (f"10.244.2.{20 + i}",), ("app/other",), ())
                last = await s.commit({f"endpoints/{OTHER}/app/db": raw(db),
                                       "meta/observed": L.encode({"resourceVersions": {"pods": i}})})
            await s.synced(last) if scope == "node" else await s.reported(last)
            counts[scope] = s.store.reader.delivered_events - before
    assert counts["node"] == 5  # the commit markers only
    assert counts["prefix"] >= 5 * 3  # markers and every key (and the reports of its own node)


def test_absorb_coalesces_a_group_and_judges_each_commit_with_the_state_it_met() -> None:
    state = NodeState(NODE)
    state.reset({k: v for k, v in world().items() if v is not None})
    web2 = Endpoint(NODE, "app", "web", WEB.ips, ("app/allow", "app/other"), ())
    admins = PeerSet(ADMINS.id, "pods", ADMINS.definition, ("10.244.2.11", "10.244.2.15"))
    irrelevant = CommitBatch({f"sets/{ADMINS.id}": raw(admins)}, 10, reports_relevant=True)
    assert absorb(state, [irrelevant], 9, every_commit=False).action is Action.NONE
    # behind: three commits at once; the second makes the node use app/other: one apply for all
    group = [
        CommitBatch({"meta/observed": b'{"schema":1}'}, 11, reports_relevant=True),
        CommitBatch({f"endpoints/{NODE}/app/web": raw(web2)}, 12, reports_relevant=True),
        CommitBatch({}, 13, reports_relevant=True),
    ]
    outcome = absorb(state, group, 10, every_commit=False)
    assert outcome.action is Action.APPLY and outcome.revision == 13
    assert "app/other" in state.endpoints["app/web"].ingress
    # a foreign write to a key the node reads changes its bad keys: reported (applied) at once
    foreign = CommitBatch({}, 13, foreign={"policies/app/zzz": 14}, is_commit=False)
    assert absorb(state, [foreign], 13, every_commit=False).action is Action.APPLY
    # a commit of an old controller that does not touch the node: report only
    old = CommitBatch({f"endpoints/{OTHER}/app/db": raw(DB)}, 15)
    assert absorb(state, [old], 13, every_commit=False).action is Action.REPORT


def test_node_ranges_cover_what_the_node_state_reads() -> None:
    ranges = node_ranges(NODE, max_schema=2)
    state = NodeState(NODE, max_schema=2)
    wanted = ["policies/a/b", "cpolicies/deny-all", "sets/x", "sets2/x/1", f"endpoints/{NODE}/a/b", "meta/schema"]
    unwanted = [f"endpoints/{OTHER}/a/b", "meta/observed", "status/nodes/node-1", "leader"]

    def covered(key: str) -> bool:
        return any(key.startswith(r.rel) if r.prefix else key == r.rel for r in ranges)

    for key in wanted:
        assert covered(key) and state.wants(key), key
    for key in unwanted:
        assert not covered(key) and not state.wants(key), key
    assert not any(r.rel.startswith("sets2") or r.rel == "meta/schema" for r in node_ranges(NODE, max_schema=1))


# --- the cached uses: always what a fresh computation gives ---------------------------------

_CHOICES: list[tuple[str, bytes | None]] = [
    ("policies/app/allow", raw(policy("allow", CLIENTS))),
    ("policies/app/allow", raw(policy("allow", ADMINS))),
    ("policies/app/allow", None),
    ("policies/app/other", raw(policy("other", CLIENTS))),
    ("policies/app/other", None),
    (f"endpoints/{NODE}/app/web", raw(WEB)),
    (f"endpoints/{NODE}/app/web", raw(Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/other",), ()))),
    (f"endpoints/{NODE}/app/web", None),
    (f"endpoints/{NODE}/app/web", b"{not json"),
    (f"sets/{CLIENTS.id}", raw(CLIENTS)),
    (f"sets/{CLIENTS.id}", None),
    (f"endpoints/{OTHER}/app/db", raw(DB)),
]


@given(st.lists(st.lists(st.sampled_from(range(len(_CHOICES))), max_size=4), max_size=12))
@settings(max_examples=200, deadline=None)
def test_cached_uses_match_a_fresh_computation(commits: list[list[int]]) -> None:
    """NodeState.uses() is cached (a membership commit must not recompute it): after any sequence
    of commits, resets included, it equals node_uses over the state as it is."""
    state = NodeState(NODE)
    state.reset(world())
    for indexes in commits:
        state.uses()  # fill the cache before each commit, as absorb does
        if indexes == [0, 0]:
            state.reset(world())
        else:
            state.update(dict(_CHOICES[i] for i in indexes))
        fresh = node_uses(NODE, state.endpoints.values(),
                          {"policy": state.policies, "clusterpolicy": state.cluster_policies})
        assert state.uses() == fresh
