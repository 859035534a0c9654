"""The etcd layout schemas (1: whole sets, 2: chunked sets), the migration gate, and the agent's reading of both."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.fakes.store import FakeLeadership, FakeStore, MemoryEtcd

from netfence.agent.node_state import NodeState
from netfence.controller.syncer import EtcdSyncer
from netfence.model.compiler import ModelEngine
from netfence.model.enforcement import CompiledPolicy, CompiledRule, Endpoint, PeerSet
from netfence.model.policy import policy_from_k8s
from netfence.model.world import namespace_from_k8s, pod_from_k8s
from netfence.store import layout as L
from netfence.store import migration as M


def _set(members: list[str], sid: str = "pabc") -> dict[str, Any]:
    return PeerSet(sid, "pods", {"ns": "a"}, tuple(sorted(set(members)))).to_json()


def _ips(n: int, base: int = 0) -> list[str]:
    return [f"10.{(i + base) // 65536 % 256}.{(i + base) // 256 % 256}.{(i + base) % 256}" for i in range(n)]


def _enc(values: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    return {k: L.encode(v) for k, v in values.items()}


# --- controller side ----------------------------------------------------------------------


def test_schema_1_is_the_identity_and_other_keys_never_change() -> None:
    state = {"sets/pabc": _set(["10.0.0.1"]), "policies/a/b": {"schema": 1, "x": 1},
             "endpoints/n/a/p": {"schema": 1, "ips": ["10.0.0.1"]}}
    assert M.physical_state(state, 1) == state
    v2 = M.physical_state(state, 2)
    assert {k: v for k, v in v2.items() if not k.startswith("sets2/")} == {
        "policies/a/b": state["policies/a/b"], "endpoints/n/a/p": state["endpoints/n/a/p"]}


@pytest.mark.parametrize(("members", "chunks"), [(0, 1), (1, 1), (256, 1), (257, 2), (512, 2), (513, 4), (5000, 32)])
def test_chunk_count_is_a_power_of_two_with_bounded_average(members: int, chunks: int) -> None:
    assert M.chunk_count(members) == chunks


@settings(max_examples=60, deadline=None)
@given(st.lists(st.ip_addresses(v=4).map(str), max_size=1500))
def test_chunked_set_round_trips(members: list[str]) -> None:
    value = _set(members)
    stored = M.physical("sets/pabc", value, 2)
    header = stored.pop("sets2/pabc")
    assert "members" not in header and header["chunks"] == M.chunk_count(len(set(members)))
    assert header["schema"] == 2
    chunks = {}
    for key, chunk in stored.items():
        parsed = M.parse_set_key(key)
        assert parsed is not None and parsed[0] == "pabc" and parsed[1] is not None
        assert chunk["members"] == sorted(chunk["members"])
        assert len(json.dumps(chunk)) < 64 * 1024 or len(chunk["members"]) > 3 * M.CHUNK_MEMBERS
        chunks[parsed[1]] = chunk
        assert M.logical_key(key) == "sets/pabc"
    assert sorted(chunks) == list(range(header["chunks"]))
    assert PeerSet.from_json(M.assemble_set(header, chunks)) == PeerSet.from_json(value)


def test_one_member_change_in_a_big_set_rewrites_one_chunk() -> None:
    before = M.physical("sets/pbig", _set(_ips(20000), "pbig"), 2)
    after = M.physical("sets/pbig", _set([*_ips(20000), "10.200.0.1"], "pbig"), 2)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert len(before) == 1 + 128
    assert len(changed) == 1 and next(iter(changed)).startswith("sets2/pbig/")
    # The whole set as one value would be ~300 kB; each chunk is a few kB.
    assert max(len(L.encode(v)) for v in after.values()) < 8 * 1024


def test_assemble_rejects_missing_or_bad_chunks() -> None:
    stored = M.physical("sets/pabc", _set(_ips(600)), 2)
    header = stored.pop("sets2/pabc")
    chunks = {int(k.rsplit("/", 1)[1]): v for k, v in stored.items()}
    del chunks[1]
    with pytest.raises(M.SchemaError, match="chunk 1 of 4 is missing"):
        M.assemble_set(header, chunks)
    with pytest.raises(M.SchemaError, match="bad chunk count"):
        M.assemble_set({**header, "chunks": 0}, chunks)
    with pytest.raises(M.SchemaError, match="no member list"):
        M.assemble_set({**header, "chunks": 1}, {0: {"schema": 2}})


def test_keys_and_families() -> None:
    assert M.parse_set_key("sets2/pabc") == ("pabc", None)
    assert M.parse_set_key("sets2/pabc/3") == ("pabc", 3)
    assert M.parse_set_key("sets2/pabc/x") is None
    assert M.parse_set_key("sets/pabc") is None
    assert M.logical_key("policies/a/b") == "policies/a/b"
    assert M.exclusive_to("sets/p", 1) and not M.exclusive_to("sets/p", 2)
    assert M.exclusive_to("sets2/p/0", 2) and not M.exclusive_to("policies/a/b", 2)
    assert L.is_committed_key("sets2/p/0") and L.is_committed_key("sets2/p")
    assert M.required_nodes(["endpoints/n1/a/p", "endpoints/n2/a/q", "sets/x", "endpoints/n1/b/r"]) == {"n1", "n2"}
    assert M.stored_schema(None) == 1 and M.stored_schema({"schema": 2}) == 2
    assert M.stored_schema({"schema": True}) == 1
    assert M.report_schemas({"schemaSupported": [1, 2]}) == {1, 2}
    assert M.report_schemas({"node": "n"}) == {1}  # agents from before the field read schema 1
    assert M.report_schemas({"schemaSupported": ["2"]}) == {1}
    with pytest.raises(M.SchemaError):
        M.check_schema(3)


# --- the gate -----------------------------------------------------------------------------

OLD, NEW = frozenset({1}), frozenset({1, 2})


@pytest.mark.parametrize(
    ("target", "stored", "supported", "required", "expected"),
    [
        (1, 1, {"a": NEW, "b": NEW}, {"a", "b"}, 1),  # the flag is off: never migrate
        (2, 1, {"a": NEW, "b": OLD}, {"a", "b"}, 1),  # one old agent: stay on 1
        (2, 1, {"a": NEW, "b": NEW}, {"a", "b"}, 2),  # every agent reads 2: migrate
        (2, 1, {"a": NEW}, {"a", "b"}, 1),  # b must enforce but has no live agent (restarting?)
        (2, 1, {"a": NEW}, {"a"}, 2),  # b hosts nothing: its agent does not matter
        (2, 1, {"a": NEW}, None, 1),  # required nodes unknown: no upgrade
        (2, 1, {}, set(), 2),  # nothing to enforce anywhere
        (2, 2, {"a": NEW}, {"a", "b"}, 2),  # migrated: an agent restarting does not cause a fallback
        (2, 2, {"a": NEW, "b": OLD}, {"a", "b"}, 1),  # an old agent appeared: fall back
        (1, 2, {"a": NEW, "b": NEW}, {"a", "b"}, 1),  # the flag was turned off: go back to 1
        (2, 2, {}, None, 2),  # reports not read yet: keep what is stored
    ],
)
def test_decide_schema(
    target: int, stored: int, supported: dict[str, frozenset[int]], required: set[str] | None, expected: int
) -> None:
    assert M.decide_schema(target, stored, supported, required) == expected


def test_migration_holders_names_old_agents_and_nodes_without_one() -> None:
    assert M.migration_holders(2, {"b": OLD, "a": NEW, "c": OLD}, {"a", "d", "c"}) == (("b", "c"), ("d",))
    assert M.migration_holders(2, {"a": NEW}, None) == ((), ())
    assert M.migration_holders(2, {"a": NEW}, {"a"}) == ((), ())


# --- agent side ---------------------------------------------------------------------------


def _world(members: list[str]) -> dict[str, dict[str, Any]]:
    sid = PeerSet.make_id("pods", {"ns": "a"})
    policy = CompiledPolicy("a", "web", "uid", (CompiledRule(peers=(sid,), ports=None),), None)
    return {
        f"sets/{sid}": PeerSet(sid, "pods", {"ns": "a"}, tuple(sorted(members))).to_json(),
        "policies/a/web": policy.to_json(),
        "endpoints/n1/a/web": Endpoint("n1", "a", "web", ("10.0.0.9",), ("a/web",), ()).to_json(),
        "endpoints/n2/a/other": Endpoint("n2", "a", "other", ("10.0.1.9",), ("a/web",), ()).to_json(),
    }


def _model_of(values: dict[str, bytes]) -> Any:
    state = NodeState("n1")
    state.reset(values)
    return state.model()


def _v1(world: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    return _enc({**world, "meta/schema": {"schema": 1}})


def _v2(world: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    return _enc({**M.physical_state(world, 2), "meta/schema": {"schema": 2}})


def test_new_agent_reads_both_layouts_to_the_same_model() -> None:
    world = _world(_ips(700))
    one, two = NodeState("n1"), NodeState("n1")
    one.reset(_v1(world))
    two.reset(_v2(world))
    assert one.layout == 1 and two.layout == 2
    assert one.model() == two.model()
    assert len(two.model().sets) == 1 and len(next(iter(two.model().sets.values())).members) == 700
    assert not one.decode_errors and not two.decode_errors
    assert two.schemas_supported == (1, 2)
    # A state without meta/schema (written before it existed) is layout 1.
    three = NodeState("n1")
    three.reset(_enc(world))
    assert three.model() == one.model()


def test_migration_commits_switch_the_agent_atomically_and_change_nothing() -> None:
    world = _world(_ips(300))
    state = NodeState("n1")
    state.reset(_v1(world))
    before = state.model()
    # Commit 1: the schema-2 keys and meta/schema (schema-1 keys still there).
    state.update({k: v for k, v in _v2(world).items() if k.startswith(("sets2/", "meta/"))})
    assert state.layout == 2 and state.model() == before
    # Commit 2: the schema-1 set keys go away.
    state.update(dict.fromkeys(k for k in world if k.startswith("sets/")))
    assert state.model() == before
    # A membership change rewrites one chunk.
    new_world = _world([*_ips(300), "10.9.9.9"])
    old_stored, new_stored = _v2(world), _v2(new_world)
    delta = {k: v for k, v in new_stored.items() if old_stored.get(k) != v}
    assert len(delta) == 1
    state.update(delta)
    assert "10.9.9.9" in next(iter(state.model().sets.values())).members
    # Falling back to schema 1 (an old agent appeared) is atomic too.
    state.update({**{k: v for k, v in _v1(new_world).items() if k.startswith(("sets/", "meta/"))}})
    assert state.layout == 1 and state.model() == _model_of(_v1(new_world))


def test_old_agent_ignores_the_new_layout() -> None:
    world = _world(_ips(10))
    old = NodeState("n1", max_schema=1)
    assert old.schemas_supported == (1,)
    assert not old.wants("meta/schema") and not old.wants("sets2/x/0")
    old.reset({**_v1(world), **_v2(world)})  # both layouts present during a migration
    assert old.layout == 1 and old.model() == _model_of(_v1(world))
    with pytest.raises(ValueError, match="unknown layout schema"):
        NodeState("n1", max_schema=3)


def test_values_with_unknown_fields_are_read() -> None:
    world = _world(_ips(5))
    extra = {k: {**v, "futureField": {"x": [1, 2]}, "schema": 1} for k, v in world.items()}
    state = NodeState("n1")
    state.reset(_enc(extra))
    assert not state.decode_errors
    assert state.model() == _model_of(_v1(world))
    v2 = {k: {**v, "futureField": True} for k, v in M.physical_state(world, 2).items()}
    state.reset(_enc({**v2, "meta/schema": {"schema": 2, "futureField": 1}}))
    assert not state.decode_errors and state.model() == _model_of(_v1(world))


def test_a_chunk_that_does_not_add_up_keeps_the_last_good_set() -> None:
    world = _world(_ips(600))
    state = NodeState("n1")
    state.reset(_v2(world))
    good = state.model()
    chunk = next(k for k in _v2(world) if k.startswith("sets2/") and k.count("/") == 2)
    state.update({chunk: None})
    assert state.model() == good
    assert any("is missing" in e for e in state.decode_errors.values())
    state.update({chunk: _v2(world)[chunk]})
    assert state.model() == good and not state.decode_errors
    state.update({chunk: b"{not json"})
    assert state.model() == good and chunk in state.decode_errors


# --- the syncer writes the layout the gate allows (a fake store: no etcd needed) -----------------


async def settle(etcd: MemoryEtcd) -> None:
    """Until the syncer has written nothing for a while (it runs with no coalescing window)."""
    while True:
        written = len(etcd.changes_written)
        try:
            await asyncio.wait_for(etcd.until(lambda w=written: len(etcd.changes_written) > w), 0.3)  # type: ignore[misc]
        except TimeoutError:
            return


def _pod(name: str, ip: str, labels: dict[str, str], node: str = "n1") -> Any:
    return pod_from_k8s({"metadata": {"namespace": "a", "name": name, "labels": labels},
                         "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip}})


def _engine(goods: int) -> ModelEngine:
    engine = ModelEngine()
    engine.set_namespace(namespace_from_k8s({"metadata": {"name": "a"}}))
    engine.set_pod(_pod("web", "10.1.0.1", {"app": "web"}))
    engine.set_pod(_pod("web2", "10.1.0.2", {"app": "web"}, node="n2"))  # n2 must enforce too
    for i, ip in enumerate(_ips(goods, base=70000)):
        engine.set_pod(_pod(f"g{i}", ip, {"role": "good"}, node="n2"))
    engine.set_policy(policy_from_k8s({
        "metadata": {"namespace": "a", "name": "web"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "good"}}}]}]},
    }))
    return engine


def _decoded(etcd: MemoryEtcd) -> Any:
    state = NodeState("n1")
    state.reset(etcd.values())
    return state.model()


async def test_syncer_migrates_only_through_the_gate_and_writes_chunks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="netfence.controller.syncer")
    engine, etcd = _engine(1000), MemoryEtcd()
    store = FakeStore(etcd, "controller")  # the shared in-memory store (tests/fakes/store.py)
    syncer = EtcdSyncer(engine, store, FakeLeadership(etcd.elect("controller")), observed=dict, coalesce_seconds=0,
                        target_schema=2)
    task = asyncio.create_task(syncer.run())
    try:
        syncer.set_agent_report("n1", {"schemaSupported": [1, 2]})
        syncer.set_agent_report("n2", {"schemaSupported": [1]})  # an old agent: stay on schema 1
        await settle(etcd)
        assert syncer.schema == 1 and json.loads(etcd.values()["meta/schema"])["schema"] == 1
        assert not any(k.startswith("sets2/") for k in etcd.values())
        v1_model = _decoded(etcd)
        assert len(next(iter(v1_model.sets.values())).members) == 1000

        writes = len(etcd.changes_written)
        syncer.set_agent_report("n2", None)  # n2 restarts: it hosts endpoints, so no migration yet
        await settle(etcd)
        assert syncer.schema == 1 and len(etcd.changes_written) == writes
        held = [r.getMessage() for r in caplog.records if "stays at schema" in r.getMessage()]
        assert held[0].endswith("cannot read it on n2; endpoints on nodes without a live agent report: none")
        assert held[-1].endswith("cannot read it on none; endpoints on nodes without a live agent report: n2")
        syncer.set_agent_report("n2", {"schemaSupported": [1, 2]})  # ... and comes back new: migrate
        await settle(etcd)
        switch, cleanup = etcd.changes_written[writes:]
        assert json.loads(switch["meta/schema"] or b"")["schema"] == 2
        assert all(v is not None for v in switch.values()) and sum(k.startswith("sets2/") for k in switch) == 1 + 4
        assert cleanup and all(k.startswith("sets/") and v is None for k, v in cleanup.items())
        assert syncer.schema == 2 and syncer.migrations == [(1, 2, etcd.revision - 1)]
        assert _decoded(etcd) == v1_model

        # One more member: one chunk is rewritten, the status sees the logical set key.
        writes = len(etcd.changes_written)
        engine.set_pod(_pod("late", "10.99.0.1", {"role": "good"}, node="n2"))
        syncer.notify()
        await settle(etcd)
        [change] = etcd.changes_written[writes:]
        assert [k for k in change if k.startswith("sets2/")] == [k for k in change if k.startswith("sets")]
        assert len([k for k in change if k.startswith("sets2/")]) == 1
        set_key = next(k for k in v1_model.sets)
        assert syncer.key_revisions[f"sets/{set_key}"] == etcd.revision
        assert "10.99.0.1" in _decoded(etcd).sets[set_key].members
        # An old agent shows up after the migration: fall back to schema 1 (again in two commits).
        writes = len(etcd.changes_written)
        syncer.set_agent_report("n3", {"node": "n3"})
        await settle(etcd)
        back, gone = etcd.changes_written[writes:]
        assert json.loads(back["meta/schema"] or b"")["schema"] == 1 and any(k.startswith("sets/") for k in back)
        assert all(k.startswith("sets2/") and v is None for k, v in gone.items())
        assert syncer.schema == 1 and not any(k.startswith("sets2/") for k in etcd.values())
        assert "10.99.0.1" in _decoded(etcd).sets[set_key].members
        # A reconcile over matching state writes nothing.
        writes = len(etcd.changes_written)
        syncer.request_reconcile()
        await settle(etcd)
        assert len(etcd.changes_written) == writes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_flags() -> None:
    from netfence.config import ConfigError, load_agent_config
    from netfence.config import load_controller_config as load_config

    assert load_agent_config(["--node=n"], env={}).max_schema == 2
    assert load_agent_config(["--node=n", "--max-schema=1"], env={}).max_schema == 1
    assert load_agent_config(["--node=n"], env={"NETFENCE_MAX_SCHEMA": "1"}).max_schema == 1
    with pytest.raises(ConfigError, match="max schema 3"):
        load_agent_config(["--node=n", "--max-schema=3"], env={})
    assert load_config([], env={}).target_schema == 1
    assert load_config(["--target-schema=2"], env={}).target_schema == 2
    with pytest.raises(ConfigError, match="target schema 0"):
        load_config(["--target-schema=0"], env={})
