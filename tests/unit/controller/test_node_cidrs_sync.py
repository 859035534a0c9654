"""The controller publishes each Node's pod CIDRs as ``nodes/<node>``: from Node events and listings
(controller/world.py) through the engine to etcd (controller/syncer.py), like its other keys:
written when they appear or change, deleted when the Node goes or loses them, rewritten after a
foreign write, and removed by a reconcile when stale."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from tests.fakes.agent import running
from tests.fakes.store import FakeLeadership, FakeStore, MemoryEtcd

from netfence.controller.syncer import EtcdSyncer, is_guarded
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.store import layout as L


def node(name: str, rv: int, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv)}, "spec": spec or {}}


def test_node_events_and_listings_drive_the_node_keys(caplog: pytest.LogCaptureFixture) -> None:
    engine = ModelEngine()
    world = WorldTracker(engine)
    assert world.apply("nodes", "ADDED", node("n1", 1, {"podCIDR": "10.244.1.0/24"}))
    assert world.apply("nodes", "ADDED", node("n2", 2))  # no CIDRs (yet): no key
    assert world.nodes == {"n1", "n2"}
    assert engine.drain_changes() == {"nodes/n1": {"schema": 1, "podCIDRs": ["10.244.1.0/24"]}}

    # a status update of a Node (new resource version, same CIDRs) writes nothing
    assert world.apply("nodes", "MODIFIED", node("n1", 3, {"podCIDR": "10.244.1.0/24"}))
    assert engine.drain_changes() == {}

    # CIDRs assigned later; a malformed one is skipped with one warning, the others published
    with caplog.at_level(logging.WARNING, logger="netfence.controller.world"):
        spec = {"podCIDRs": ["10.244.2.0/24", "10.244.2.1/16", "fd00:2::/64"]}
        assert world.apply("nodes", "MODIFIED", node("n2", 4, spec))
        assert world.apply("nodes", "MODIFIED", node("n2", 5, spec))  # the same again: not warned again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'10.244.2.1/16'" in warnings[0] and "n2" in warnings[0], warnings
    assert engine.drain_changes() == {"nodes/n2": {"schema": 1, "podCIDRs": ["10.244.2.0/24", "fd00:2::/64"]}}

    # the Node goes: its key goes; a stale event does not bring it back
    assert world.apply("nodes", "DELETED", node("n1", 6))
    assert not world.apply("nodes", "MODIFIED", node("n1", 3, {"podCIDR": "10.244.1.0/24"}))
    assert engine.drain_changes() == {"nodes/n1": None}

    # a listing without n2 (known at a version <= the listing's) removes it; n3 is new
    result = world.merge_listing("nodes", [node("n3", 7, {"podCIDRs": ["10.244.3.0/24"]})], 8)
    assert result.removed == (("", "n2"),)
    assert engine.drain_changes() == {"nodes/n2": None, "nodes/n3": {"schema": 1, "podCIDRs": ["10.244.3.0/24"]}}
    assert world.nodes == {"n3"}


def test_node_keys_are_the_controllers_committed_keys() -> None:
    assert is_guarded("nodes/n1")
    assert L.is_committed_key("nodes/n1") and L.is_committed_key(L.Layout.node("n1"))
    assert L.Layout.node("n1") == "nodes/n1" and L.Layout.parse_node("nodes/n1") == "n1"
    assert L.Layout.parse_node("status/nodes/n1") is None and not L.is_committed_key("status/nodes/n1")
    with pytest.raises(ValueError):
        L.Layout.node("a/b")


async def test_the_syncer_writes_and_deletes_node_keys_and_reconciles_them() -> None:
    etcd = MemoryEtcd()
    engine = ModelEngine()
    world = WorldTracker(engine)
    world.apply("nodes", "ADDED", node("n1", 1, {"podCIDRs": ["10.244.1.0/24"]}))
    sync = EtcdSyncer(engine, FakeStore(etcd, "A"), FakeLeadership(etcd.elect("A")), observed=dict,
                      coalesce_seconds=0.0)

    def stored(key: str) -> Any:
        raw = etcd.values().get(key)
        return None if raw is None else json.loads(raw)

    async with running(sync):
        await etcd.until(lambda: stored("nodes/n1") is not None)
        assert stored("nodes/n1") == {"schema": 1, "podCIDRs": ["10.244.1.0/24"]}

        world.apply("nodes", "MODIFIED", node("n1", 2, {"podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]}))
        sync.notify()
        await etcd.until(lambda: stored("nodes/n1") == {"schema": 1, "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]})

        # a foreign write (someone with etcdctl) to a node key is noticed and rewritten at once; the
        # reconcile it causes deletes a node key the engine does not have
        etcd.put("nodes/n1", b'{"schema":1,"podCIDRs":["0.0.0.0/0"]}')
        etcd.put("nodes/gone", b'{"schema":1,"podCIDRs":["10.9.0.0/16"]}')
        await etcd.until(lambda: sync.foreign_writes >= 2 and stored("nodes/gone") is None
                         and stored("nodes/n1") == {"schema": 1, "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]})

        world.apply("nodes", "DELETED", node("n1", 3))
        sync.notify()
        await etcd.until(lambda: stored("nodes/n1") is None)
