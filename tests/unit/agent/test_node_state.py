"""NodeState: the agent's decoded view of the committed model, reduced to its node."""

from __future__ import annotations

import json

import pytest

from netfence.agent.node_state import NodeState
from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint, PeerSet

NODE = "node-1"
CLIENTS = PeerSet(PeerSet.make_id("pods", {"name": "clients"}), "pods", {"name": "clients"}, ("10.244.1.11",))
ALLOW = CompiledPolicy("app", "allow", "uid-1", (CompiledRule((CLIENTS.id,), (CompiledPort("TCP", 80),)),), None)
DENY = CompiledPolicy("app", "deny", "uid-2", (), None)
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/allow",), ())
OTHER = Endpoint("node-2", "app", "far", ("10.244.2.10",), ("app/allow",), ())


def raw(value: PeerSet | CompiledPolicy | Endpoint) -> bytes:
    return json.dumps(value.to_json()).encode()


def snapshot() -> dict[str, bytes]:
    return {
        "policies/app/allow": raw(ALLOW),
        "policies/app/deny": raw(DENY),
        f"sets/{CLIENTS.id}": raw(CLIENTS),
        "endpoints/node-1/app/web": raw(WEB),
        "endpoints/node-2/app/far": raw(OTHER),
        "meta/schema": b'{"schema": 1}',
    }


def loaded() -> NodeState:
    state = NodeState(NODE)
    state.reset(snapshot())
    return state


def test_reset_keeps_policies_sets_and_only_own_endpoints() -> None:
    state = loaded()
    model = state.model()
    assert model.node == NODE
    assert model.policies == {"app/allow": ALLOW, "app/deny": DENY}
    assert model.sets == {CLIENTS.id: CLIENTS}
    assert model.endpoints == {"app/web": WEB}
    assert state.decode_errors == {}


@pytest.mark.parametrize(
    ("key", "wanted"),
    [
        ("policies/a/b", True),
        ("sets/p123", True),
        (f"endpoints/{NODE}/a/b", True),
        ("endpoints/node-10/a/b", False),  # a node whose name starts with ours is not ours
        ("endpoints/node-2/a/b", False),
        ("meta/observed", False),
        ("status/nodes/node-1", False),
        ("commit", False),
    ],
)
def test_wants(key: str, wanted: bool) -> None:
    assert NodeState(NODE).wants(key) is wanted


CORRUPT = [
    b"{not json", b"null", b"[1, 2]", b'{"schema": 1}', b"\xff\xfe", b'{"kind": "bogus", "id": "x", "members": []}',
]


@pytest.mark.parametrize("bad", CORRUPT, ids=[repr(b) for b in CORRUPT])
@pytest.mark.parametrize("key", ["policies/app/allow", f"sets/{CLIENTS.id}", "endpoints/node-1/app/web"])
def test_corrupt_value_keeps_the_last_good_one(key: str, bad: bytes) -> None:
    state = loaded()
    before = state.model()
    state.update({key: bad})
    assert state.model() == before
    assert key in state.decode_errors
    # The controller rewrites it: the error goes away, the new value is used.
    fixed = CompiledPolicy("app", "allow", "uid-1", None, ()) if key.startswith("policies/") else None
    if fixed is not None:
        state.update({key: raw(fixed)})
        assert state.model().policies["app/allow"] == fixed
        assert key not in state.decode_errors


def test_corrupt_value_in_a_fresh_snapshot_keeps_the_last_good_one() -> None:
    state = loaded()
    values = snapshot()
    values["policies/app/allow"] = b"{broken"
    del values["policies/app/deny"]
    state.reset(values)
    assert state.model().policies == {"app/allow": ALLOW}
    assert list(state.decode_errors) == ["policies/app/allow"]


def test_corrupt_new_key_is_absent() -> None:
    state = loaded()
    state.update({"policies/app/new": b"{broken"})
    assert "app/new" not in state.model().policies
    assert "policies/app/new" in state.decode_errors


def test_deletes_drop() -> None:
    state = loaded()
    state.update({"policies/app/deny": None, f"sets/{CLIENTS.id}": None, "endpoints/node-1/app/web": None})
    model = state.model()
    assert model.policies == {"app/allow": ALLOW}
    assert model.sets == {}
    assert model.endpoints == {}


def test_delete_of_a_corrupt_key_clears_its_error() -> None:
    state = loaded()
    state.update({"policies/app/deny": b"{broken"})
    state.update({"policies/app/deny": None})
    assert "app/deny" not in state.model().policies
    assert state.decode_errors == {}


def test_other_nodes_endpoints_are_ignored_in_updates() -> None:
    state = loaded()
    moved = Endpoint("node-2", "app", "web", ("10.244.2.99",), (), ())
    state.update({"endpoints/node-2/app/web": raw(moved), "endpoints/node-2/app/far": None})
    assert state.model().endpoints == {"app/web": WEB}
    state.update({"endpoints/node-2/app/web": b"{garbage"})
    assert state.decode_errors == {}


def test_reset_drops_keys_gone_from_the_snapshot() -> None:
    state = loaded()
    state.reset({"policies/app/deny": raw(DENY)})
    model = state.model()
    assert model.policies == {"app/deny": DENY}
    assert model.sets == {} and model.endpoints == {}


def test_unknown_fields_are_ignored() -> None:
    state = NodeState(NODE)
    data = WEB.to_json() | {"futureField": {"x": 1}, "schema": 2}
    state.update({"endpoints/node-1/app/web": json.dumps(data).encode()})
    assert state.model().endpoints == {"app/web": WEB}
