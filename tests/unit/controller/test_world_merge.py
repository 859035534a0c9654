"""WorldTracker: merging listings with watch events by resource version (tombstones, per-kind floor).

A generated "true" history of creates, updates and deletes (increasing resource versions)
is delivered as watch events in order, some of them lost; listings snapshotted at arbitrary
resource versions are merged in between. The tracker must then hold exactly the true world
at the newest state it was shown: ``max(last event rv, merged listing rv)`` per kind — with
lost events, once a listing newer than every lost event of the kind was merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s

Obj = dict[str, Any]
Key = tuple[str, str]

# A few names per kind: collisions (delete and re-create, update after delete) are the point.
NAMES: dict[str, list[Key]] = {
    "pods": [("a", "p0"), ("a", "p1"), ("b", "p2")],
    "namespaces": [("", "a"), ("", "b")],
    "networkpolicies": [("a", "np0"), ("b", "np1")],
    "nodes": [("", "n0")],
}
KINDS = tuple(NAMES)
IPS = {("a", "p0"): "10.0.0.1", ("a", "p1"): "10.0.0.2", ("b", "p2"): "10.0.0.3"}


def body(kind: str, key: Key, rv: int, variant: int) -> Obj:
    """An object of ``kind`` whose content depends on ``variant`` (so updates matter)."""
    ns, name = key
    meta: Obj = {"name": name, "resourceVersion": str(rv), "uid": f"{name}-{variant}", "generation": variant + 1}
    if ns:
        meta["namespace"] = ns
    if kind == "pods":
        meta["labels"] = {"v": str(variant % 2)}
        return {"metadata": meta, "spec": {"nodeName": "n0", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": IPS[key], "podIPs": [{"ip": IPS[key]}]}}
    if kind == "namespaces":
        meta["labels"] = {"team": str(variant % 2)}
        return {"metadata": meta}
    if kind == "networkpolicies":
        return {"metadata": meta, "spec": {
            "podSelector": {"matchLabels": {"v": str(variant % 2)}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "1"}}, "podSelector": {}}]}],
        }}
    return {"metadata": meta}


@dataclass(frozen=True)
class Event:
    rv: int
    kind: str
    type: str  # ADDED / MODIFIED / DELETED
    body: Obj


@dataclass
class History:
    """The true sequence of changes; ``at(kind, rv)`` is the world of a kind at resource version ``rv``."""

    events: list[Event] = field(default_factory=list)

    def at(self, kind: str, rv: int) -> dict[Key, Obj]:
        state: dict[Key, Obj] = {}
        for event in self.events:
            if event.rv > rv:
                break
            if event.kind != kind:
                continue
            key = (event.body["metadata"].get("namespace", ""), event.body["metadata"]["name"])
            if event.type == "DELETED":
                state.pop(key, None)
            else:
                state[key] = event.body
        return state

    @property
    def last(self) -> int:
        return self.events[-1].rv if self.events else 0


@st.composite
def history_st(draw: st.DrawFn) -> History:
    ops = draw(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2), st.booleans(), st.integers(0, 3)),
                        min_size=1, max_size=30))
    history = History()
    live: dict[tuple[str, Key], Obj] = {}
    rv = draw(st.integers(1, 5))
    for kind, index, delete, variant in ops:
        key = NAMES[kind][index % len(NAMES[kind])]
        rv += draw(st.integers(1, 3))  # other kinds' writes share the counter: gaps
        current = live.get((kind, key))
        if delete and current is not None:
            # A DELETED event carries the last state with the deletion's resource version.
            gone = {**current, "metadata": {**current["metadata"], "resourceVersion": str(rv)}}
            history.events.append(Event(rv, kind, "DELETED", gone))
            del live[(kind, key)]
        else:
            new = body(kind, key, rv, variant)
            history.events.append(Event(rv, kind, "MODIFIED" if current else "ADDED", new))
            live[(kind, key)] = new
    return history


# A step: deliver the next event, lose it, or merge a listing of a kind taken at a resource version
# ``offset`` away from the last event delivered (listings race the events near the delivery point).
Step = tuple[str, str, int]


def steps_st(lose: bool) -> st.SearchStrategy[list[Step]]:
    actions = ["deliver", "deliver", "deliver", "list"] + (["lose"] if lose else [])
    return st.lists(st.tuples(st.sampled_from(actions), st.sampled_from(KINDS), st.integers(-12, 12)),
                    min_size=1, max_size=60)


def expected_rv(tracker: WorldTracker, kind: str, cursor: int) -> int:
    return max(cursor, tracker.floor[kind])


def check(tracker: WorldTracker, history: History, cursor: int, lost: Mapping[str, int]) -> int:
    """Assert every checkable kind holds the true world; returns how many kinds were checked."""
    worlds: dict[str, dict[Key, Obj]] = {}
    for kind in KINDS:
        if lost.get(kind, 0) > tracker.floor[kind]:
            continue  # a lost event is not yet covered by a listing: nothing to promise
        truth = history.at(kind, expected_rv(tracker, kind, cursor))
        held = tracker.held(kind)
        assert held == {k: int(b["metadata"]["resourceVersion"]) for k, b in truth.items()}, (
            kind, cursor, tracker.floor[kind])
        worlds[kind] = truth
    if {"pods", "namespaces", "networkpolicies"} <= set(worlds):
        # The engine's view: what it compiled equals a fresh compile of the true world.
        expected = compile_world(
            [pod_from_k8s(b) for b in worlds["pods"].values()],
            [namespace_from_k8s(b) for b in worlds["namespaces"].values()],
            [policy_from_k8s(b) for b in worlds["networkpolicies"].values()],
        )
        assert dict(tracker.engine.desired()) == expected
        assert set(tracker.policies) == set(worlds["networkpolicies"])
    if "nodes" in worlds:
        assert tracker.nodes == {name for _, name in worlds["nodes"]}
    return len(worlds)


def run(history: History, steps: list[Step]) -> WorldTracker:
    tracker = WorldTracker(ModelEngine())
    position = 0
    cursor = 0  # rv of the last event delivered or lost
    lost: dict[str, int] = {}
    for action, kind, offset in steps:
        if action in ("deliver", "lose") and position < len(history.events):
            event = history.events[position]
            position += 1
            cursor = event.rv
            if action == "deliver":
                tracker.apply(event.kind, event.type, event.body)
            else:
                lost[event.kind] = event.rv
        elif action == "list":
            # Snapshotted at any resource version, earlier or later than the events delivered so far.
            at = min(max(cursor + offset, 0), history.last)
            tracker.merge_listing(kind, list(history.at(kind, at).values()), at)
        check(tracker, history, cursor, lost)
    return tracker


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_st(), steps_st(lose=False))
def test_events_and_listings_in_any_interleaving_give_the_newest_world(history: History, steps: list[Step]) -> None:
    run(history, steps)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_st(), steps_st(lose=True))
def test_a_listing_newer_than_every_lost_event_repairs_the_gap(history: History, steps: list[Step]) -> None:
    tracker = run(history, steps)
    # Then the watch gap is noticed: every kind is listed now (at the newest resource version).
    for kind in KINDS:
        tracker.merge_listing(kind, list(history.at(kind, history.last).values()), history.last)
    assert check(tracker, history, history.last, {}) == len(KINDS)


# --- the two bugs of issue 9, table-driven ---------------------------------------------------------


def policy(name: str, rv: int) -> Obj:
    return body("networkpolicies", ("a", name), rv, 1)


@pytest.mark.parametrize(
    ("events_before", "listing", "listing_rv", "events_after", "expected"),
    [
        pytest.param(  # issue 9.2: an object created while the listing was in flight is kept
            [("ADDED", "old", 5)], ["old@5"], 10, [], {"old": 5, "new": 12}, id="created-meanwhile-kept",
        ),
        pytest.param(  # issue 9.2: an object deleted while the listing was in flight stays deleted
            [("ADDED", "old", 5), ("DELETED", "old", 12)], ["old@5"], 10, [], {}, id="deleted-meanwhile-not-restored",
        ),
        pytest.param(  # a delayed event older than the listing does not resurrect what it showed deleted
            [], [], 10, [("MODIFIED", "old", 7)], {}, id="delayed-event-after-listing-ignored",
        ),
        pytest.param(  # issue 9.1: a deletion lost in a watch gap is removed by the next listing
            [("ADDED", "old", 5), ("ADDED", "kept", 6)], ["kept@6"], 10, [], {"kept": 6}, id="lost-delete-removed",
        ),
        pytest.param(  # updated after the snapshot: the newer version stays
            [("ADDED", "old", 5), ("MODIFIED", "old", 11)], ["old@5"], 10, [], {"old": 11},
            id="updated-meanwhile-kept",
        ),
        pytest.param(  # deleted and re-created in the gap: the listing brings the new one
            [("ADDED", "old", 5)], ["old@9"], 10, [("MODIFIED", "old", 12)], {"old": 12},
            id="recreated-in-gap",
        ),
    ],
)
def test_merge_cases(
    events_before: list[tuple[str, str, int]],
    listing: list[str],
    listing_rv: int,
    events_after: list[tuple[str, str, int]],
    expected: dict[str, int],
) -> None:
    tracker = WorldTracker(ModelEngine())
    for kind, name, rv in events_before:
        tracker.apply("networkpolicies", kind, policy(name, rv))
    if "new" in expected:  # created while the listing was in flight (after its snapshot)
        assert tracker.apply("networkpolicies", "ADDED", policy("new", 12))
    items = [policy(name, int(rv)) for name, rv in (entry.split("@") for entry in listing)]
    result = tracker.merge_listing("networkpolicies", items, listing_rv)
    for kind, name, rv in events_after:
        tracker.apply("networkpolicies", kind, policy(name, rv))
    assert {name: rv for (_, name), rv in tracker.held("networkpolicies").items()} == expected
    assert {name for _, name in tracker.policies} == set(expected)
    assert not result.stale


def test_merge_result_names_removed_objects_and_stale_listings_are_ignored() -> None:
    tracker = WorldTracker(ModelEngine())
    tracker.apply("networkpolicies", "ADDED", policy("gone", 3))
    tracker.apply("networkpolicies", "ADDED", policy("stays", 4))
    result = tracker.merge_listing("networkpolicies", [policy("stays", 4)], 8)
    assert result.removed == (("a", "gone"),) and result.changed and result.applied == 0
    assert tracker.observed["networkpolicies"] == 4  # the newest object seen (not the list's version)
    # An older listing (merged late) changes nothing, although it still shows "gone".
    older = tracker.merge_listing("networkpolicies", [policy("gone", 3), policy("stays", 4)], 6)
    assert older.stale and not older.changed
    assert set(tracker.held("networkpolicies")) == {("a", "stays")}
    # The same listing again changes nothing either.
    assert tracker.merge_listing("networkpolicies", [policy("stays", 4)], 8).stale


def test_tombstones_are_pruned_by_a_newer_listing() -> None:
    tracker = WorldTracker(ModelEngine())
    tracker.apply("pods", "ADDED", body("pods", ("a", "p0"), 3, 0))
    tracker.apply("pods", "DELETED", body("pods", ("a", "p0"), 5, 0))
    assert tracker.tombstones == {("pods", "a", "p0"): 5}
    assert not tracker.apply("pods", "MODIFIED", body("pods", ("a", "p0"), 4, 1))  # older than the deletion
    tracker.merge_listing("pods", [], 9)
    assert tracker.tombstones == {}
    assert not tracker.apply("pods", "MODIFIED", body("pods", ("a", "p0"), 4, 1))  # older than the listing
    assert tracker.apply("pods", "ADDED", body("pods", ("a", "p0"), 10, 1))  # re-created later
    assert tracker.held("pods") == {("a", "p0"): 10}


def test_repeated_and_unversioned_events() -> None:
    tracker = WorldTracker(ModelEngine())
    assert tracker.apply("pods", None, body("pods", ("a", "p0"), 3, 0))
    assert not tracker.apply("pods", None, body("pods", ("a", "p0"), 3, 0))  # a re-list repeats it: no change
    unversioned = body("namespaces", ("", "a"), 0, 0)
    del unversioned["metadata"]["resourceVersion"]
    assert tracker.apply("namespaces", None, unversioned)
    assert tracker.apply("namespaces", None, unversioned)  # no version: always applied (as before)


def test_replace_all_without_versions_uses_the_newest_object() -> None:
    tracker = WorldTracker(ModelEngine())
    tracker.replace_all({"pods": [body("pods", ("a", "p0"), 3, 0), body("pods", ("a", "p1"), 7, 0)]})
    assert tracker.floor["pods"] == 7
    assert set(tracker.held("pods")) == {("a", "p0"), ("a", "p1")}
