"""NodeState feeds the incremental renderer: a commit changes only the objects of the keys it wrote,
so the renderer re-renders only what they touch (counted through IncrementalRenderer.rendered)."""

from __future__ import annotations

import json
from dataclasses import replace

from netfence.agent.node_state import NodeState
from netfence.dataplane.incremental import IncrementalRenderer
from netfence.dataplane.names import policy_chain
from netfence.dataplane.render import Features, render
from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint, PeerSet

NODE = "node-1"
CLIENTS = PeerSet(PeerSet.make_id("pods", {"name": "clients"}), "pods", {"name": "clients"}, ("10.244.1.11",))
ALLOW = CompiledPolicy("app", "allow", "uid-1", (CompiledRule((CLIENTS.id,), (CompiledPort("TCP", 80),)),), None)
OTHER = CompiledPolicy("app", "other", "uid-2", (CompiledRule((CLIENTS.id,), (CompiledPort("TCP", 81),)),), None)
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/allow", "app/other"), ())


def raw(value: PeerSet | CompiledPolicy | Endpoint) -> bytes:
    return json.dumps(value.to_json()).encode()


def loaded() -> tuple[NodeState, IncrementalRenderer]:
    state = NodeState(NODE, max_schema=1)
    state.reset({"policies/app/allow": raw(ALLOW), "policies/app/other": raw(OTHER),
                 f"sets/{CLIENTS.id}": raw(CLIENTS), "endpoints/node-1/app/web": raw(WEB)})
    renderer = IncrementalRenderer(Features(ipv6=False))
    assert renderer.render(state.model()) == render(state.model(), features=renderer.features)
    renderer.rendered.clear()
    return state, renderer


def test_a_commit_keeps_the_objects_of_keys_it_did_not_write() -> None:
    state, _ = loaded()
    before = state.model()
    state.update({f"sets/{CLIENTS.id}": raw(replace(CLIENTS, members=("10.244.1.11", "10.244.1.12")))})
    after = state.model()
    assert all(after.policies[k] is v for k, v in before.policies.items())
    assert all(after.endpoints[k] is v for k, v in before.endpoints.items())
    assert after.sets[CLIENTS.id] is not before.sets[CLIENTS.id]


def test_a_set_member_commit_renders_no_chain() -> None:
    state, renderer = loaded()
    state.update({f"sets/{CLIENTS.id}": raw(replace(CLIENTS, members=("10.244.1.11", "10.244.1.12")))})
    model = state.model()
    assert renderer.render(model) == render(model, features=renderer.features)
    assert not renderer.rendered


def test_a_one_policy_commit_renders_that_policy_only() -> None:
    state, renderer = loaded()
    changed = replace(ALLOW, ingress=(CompiledRule((CLIENTS.id,), (CompiledPort("TCP", 8080),)),))
    state.update({"policies/app/allow": raw(changed)})
    model = state.model()
    assert renderer.render(model) == render(model, features=renderer.features)
    assert set(renderer.rendered) == {policy_chain("ingress", "app/allow")}


def test_a_rewritten_equal_value_renders_nothing() -> None:
    state, renderer = loaded()
    state.update({"policies/app/other": raw(OTHER)})  # the controller rewrote the same value
    renderer.render(state.model())
    assert not renderer.rendered
