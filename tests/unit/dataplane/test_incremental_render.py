"""Incremental rendering: what a commit re-renders (counted through ``IncrementalRenderer.rendered``,
the seam every chain render goes through), and that the result always equals a full ``render()``."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from dataplane_samples import endpoint, node_model, peer_set, policy
from hypothesis import given, settings
from hypothesis import strategies as st

from netfence.dataplane import incremental
from netfence.dataplane.incremental import IncrementalRenderer, ModelChanges
from netfence.dataplane.names import endpoint_chain, policy_chain, set_name
from netfence.dataplane.pins import Pinned
from netfence.dataplane.render import Features, render
from netfence.dataplane.ruleset import Ruleset
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
    PeerSet,
    SetKind,
)

FRONT = peer_set("pods", "front", "10.244.0.11", "10.244.1.20", "fd00::11")
NETS = peer_set("net", "nets", "10.0.0.0/8", "!10.1.0.0/16")
HTTP = peer_set("ports", "http", "10.244.0.11,tcp:8080")


def _web(port: int = 80) -> CompiledPolicy:
    return policy("ns/web", ingress=(CompiledRule((FRONT.id,), (CompiledPort("TCP", port),)),),
                  egress=(CompiledRule((NETS.id,), None),))


def _db() -> CompiledPolicy:
    return policy("ns/db", ingress=(CompiledRule((FRONT.id, NETS.id), (CompiledPort("TCP", 5432),)),
                                    CompiledRule(None, (CompiledPort("TCP", named_set=HTTP.id),))))


def _model() -> NodeModel:
    return node_model(
        [
            endpoint("ns/a", "10.244.0.5", "fd00::5", ingress=("ns/web", "ns/db"), egress=("ns/web",)),
            endpoint("ns/b", "10.244.0.6", ingress=("ns/db",)),
            endpoint("ns/c", "10.244.0.7", ingress=("ns/web",)),
        ],
        [_web(), _db()],
        [FRONT, NETS, HTTP],
    )


def _check(renderer: IncrementalRenderer, model: NodeModel) -> Ruleset:
    got = renderer.render(model)
    want = render(model, features=renderer.features)
    assert got == want
    assert got.dump() == want.dump()
    return got


def test_first_render_equals_a_full_render_and_counts_every_chain_once() -> None:
    renderer = IncrementalRenderer(Features())
    ruleset = _check(renderer, _model())
    # each chain once per family it is in (ns/a is dual-stack), nothing else
    assert renderer.rendered == Counter(c for fam in ruleset.families for c in ruleset.family_chains(fam)
                                        if c.startswith("nf-"))
    assert renderer.full_renders == 0


def test_a_membership_commit_renders_no_chain_and_rewrites_only_that_set() -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    before = _check(renderer, model)
    renderer.rendered.clear()
    grown = replace(FRONT, members=(*FRONT.members, "10.244.2.2"))
    after = _check(renderer, replace(model, sets={**model.sets, FRONT.id: grown}))
    assert not renderer.rendered  # no chain rendered at all
    for fam in after.families:
        assert after.family_chains(fam) is before.family_chains(fam)  # the very same chains: plan() skips them
    changed = [name for name, s in after.sets.items() if before.sets.get(name) is not s]
    assert changed == [set_name("v4", FRONT.id)]  # the v6 half of the set did not change


def test_a_one_policy_commit_renders_that_policys_chains_only() -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    _check(renderer, model)
    renderer.rendered.clear()
    _check(renderer, replace(model, policies={**model.policies, "ns/web": _web(port=81)}))
    # both directions of ns/web, in both families; never ns/db's chains nor an endpoint chain
    assert set(renderer.rendered) == {policy_chain("ingress", "ns/web"), policy_chain("egress", "ns/web")}
    assert renderer.rendered[policy_chain("ingress", "ns/web")] == 2


def test_a_policy_that_turns_empty_also_renders_the_endpoint_chains_that_jump_to_it() -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    _check(renderer, model)
    renderer.rendered.clear()
    deny_all = policy("ns/web", ingress=(), egress=(CompiledRule((NETS.id,), None),))
    _check(renderer, replace(model, policies={**model.policies, "ns/web": deny_all}))
    assert set(renderer.rendered) == {
        policy_chain("ingress", "ns/web"), policy_chain("egress", "ns/web"),
        endpoint_chain("ingress", "ns/a"), endpoint_chain("ingress", "ns/c"),  # they no longer jump to it
    }


def test_an_endpoint_commit_renders_its_own_chains_only() -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    _check(renderer, model)
    renderer.rendered.clear()
    moved = endpoint("ns/b", "10.244.0.66", ingress=("ns/db",))
    model = replace(model, endpoints={**model.endpoints, "ns/b": moved})
    _check(renderer, model)
    assert set(renderer.rendered) == {endpoint_chain("ingress", "ns/b")}
    renderer.rendered.clear()
    _check(renderer, replace(model, endpoints={**model.endpoints, "ns/d": endpoint("ns/d", "10.244.0.9",
                                                                                       ingress=("ns/web",))}))
    assert set(renderer.rendered) == {endpoint_chain("ingress", "ns/d")}  # ns/web's chain is reused


def test_a_set_that_appears_or_changes_kind_renders_the_policies_naming_it() -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    without = replace(model, sets={k: v for k, v in model.sets.items() if k != NETS.id})
    _check(renderer, without)  # ns/web egress and ns/db name a missing set: those peers match nothing
    renderer.rendered.clear()
    _check(renderer, model)
    assert set(renderer.rendered) == {
        policy_chain("ingress", "ns/db"), policy_chain("egress", "ns/web"),
        endpoint_chain("egress", "ns/a"),  # ns/web's egress chain was empty, now it is jumped to
    }
    renderer.rendered.clear()
    _check(renderer, replace(model, sets={**model.sets, NETS.id: replace(NETS, kind="pods", members=())}))
    assert policy_chain("ingress", "ns/web") not in renderer.rendered


def test_pins_and_cluster_policies_take_the_full_render() -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    pinned = Pinned(chains={"v4": {"nf-pi-x": ("-j RETURN",)}})
    assert renderer.render(model, pinned=pinned) == render(model, pinned=pinned)
    assert renderer.full_renders == 1 and not renderer.rendered
    with_cnp = replace(model, cluster_policies={"deny": CompiledClusterPolicy("deny", "uid", "Admin", 10, (), ())})
    assert renderer.render(with_cnp) == render(with_cnp)
    assert renderer.full_renders == 2
    _check(renderer, model)  # and back: everything rendered afresh
    assert renderer.full_renders == 2 and renderer.rendered
    tiered = replace(model.endpoints["ns/b"], admin_ingress=("unknown-cnp",))
    with_tiers = replace(model, endpoints={**model.endpoints, "ns/b": tiered})
    assert renderer.render(with_tiers) == render(with_tiers)
    assert renderer.full_renders == 3
    _check(renderer, model)
    assert renderer.full_renders == 3


def test_full_switch_and_reset() -> None:
    full = IncrementalRenderer(Features(), full=True)
    _check(full, _model())
    assert full.full_renders == 1 and not full.rendered
    renderer = IncrementalRenderer(Features())
    _check(renderer, _model())
    renderer.reset()
    renderer.rendered.clear()
    _check(renderer, _model())
    assert renderer.rendered  # rendered again from scratch


def test_model_changes_compare_identity_then_value() -> None:
    model = _model()
    same = replace(model, policies={k: replace(v) for k, v in model.policies.items()})  # equal copies
    assert ModelChanges.between(model, same).empty
    changed = ModelChanges.between(model, replace(model, sets={**model.sets, NETS.id: replace(NETS, kind="pods")}))
    assert changed.sets == (NETS.id,) and changed.set_kinds == (NETS.id,)


# --- property: incremental == full render, for random sequences of model changes ----------------

POLICY_KEYS = ("ns/p0", "ns/p1", "ns/p2", "other/p3")
SET_IDS = ("s0", "s1", "s2", "a-long-set-id-that-is-hashed-in-names")
ENDPOINT_KEYS = ("ns/e0", "ns/e1", "ns/e2", "other/e3")
KINDS: tuple[SetKind, ...] = ("pods", "net", "ports")
MEMBERS: dict[SetKind, tuple[str, ...]] = {
    "pods": ("10.244.0.1", "10.244.0.2", "fd00::1", "bogus"),
    "net": ("10.0.0.0/8", "!10.1.0.0/16", "0.0.0.0/0", "fd00::/64", "10.9.9.9/32"),
    "ports": ("10.244.0.1,tcp:80", "fd00::1,udp:53", "10.244.0.2,sctp:9"),
}

ports = st.one_of(
    st.builds(CompiledPort, st.sampled_from(("TCP", "UDP", "SCTP")),
              st.one_of(st.none(), st.integers(1, 70000)), st.one_of(st.none(), st.integers(1, 65535))),
    st.builds(CompiledPort, st.just("TCP"), named_set=st.sampled_from(SET_IDS)),
)
rules = st.builds(
    CompiledRule,
    st.one_of(st.none(), st.lists(st.sampled_from(SET_IDS), max_size=3).map(tuple)),
    st.one_of(st.none(), st.lists(ports, max_size=4).map(tuple)),
)
rule_lists = st.one_of(st.none(), st.lists(rules, max_size=3).map(tuple))


@st.composite
def policies(draw: st.DrawFn) -> CompiledPolicy:
    return policy(draw(st.sampled_from(POLICY_KEYS)), draw(rule_lists), draw(rule_lists))


@st.composite
def peer_sets(draw: st.DrawFn) -> PeerSet:
    kind = draw(st.sampled_from(KINDS))
    members = draw(st.lists(st.sampled_from(MEMBERS[kind]), unique=True))
    return PeerSet(draw(st.sampled_from(SET_IDS)), kind, {}, tuple(sorted(members)))


@st.composite
def endpoints(draw: st.DrawFn) -> Endpoint:
    keys = st.lists(st.sampled_from((*POLICY_KEYS, "ns/unknown")), max_size=3).map(tuple)
    ips = draw(st.lists(st.sampled_from(("10.244.1.1", "10.244.1.2", "fd00::9", "not-an-ip")), max_size=2))
    return endpoint(draw(st.sampled_from(ENDPOINT_KEYS)), *ips, ingress=draw(keys), egress=draw(keys))


Change = tuple[str, object]
changes = st.one_of(
    st.tuples(st.just("policy"), policies()),
    st.tuples(st.just("set"), peer_sets()),
    st.tuples(st.just("endpoint"), endpoints()),
    st.tuples(st.just("drop-policy"), st.sampled_from(POLICY_KEYS)),
    st.tuples(st.just("drop-set"), st.sampled_from(SET_IDS)),
    st.tuples(st.just("drop-endpoint"), st.sampled_from(ENDPOINT_KEYS)),
    st.tuples(st.just("copy"), st.just(None)),  # every value replaced by an equal copy (a resync)
)


def _step(model: NodeModel, change: Change) -> NodeModel:
    """The model after one committed change; unchanged values stay the same objects (as NodeState)."""
    kind, value = change
    if kind == "policy" and isinstance(value, CompiledPolicy):
        return replace(model, policies={**model.policies, value.key: value})
    if kind == "set" and isinstance(value, PeerSet):
        return replace(model, sets={**model.sets, value.id: value})
    if kind == "endpoint" and isinstance(value, Endpoint):
        return replace(model, endpoints={**model.endpoints, value.key: value})
    if kind == "drop-policy":
        return replace(model, policies={k: v for k, v in model.policies.items() if k != value})
    if kind == "drop-set":
        return replace(model, sets={k: v for k, v in model.sets.items() if k != value})
    if kind == "drop-endpoint":
        return replace(model, endpoints={k: v for k, v in model.endpoints.items() if k != value})
    return replace(model, policies={k: replace(v) for k, v in model.policies.items()},
                   sets={k: replace(v) for k, v in model.sets.items()},
                   endpoints={k: replace(v) for k, v in model.endpoints.items()})


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.lists(changes, min_size=1, max_size=3), min_size=1, max_size=12),
    features=st.builds(Features, ipv6=st.booleans(), sctp_port_match=st.booleans(), drop_invalid=st.booleans(),
                       workload_cidrs=st.sampled_from(((), ("10.244.1.0/24",), ("10.244.1.0/24", "fd00::/64")))),
)
def test_incremental_state_equals_a_full_render_after_every_commit(
    steps: list[list[Change]], features: Features
) -> None:
    renderer = IncrementalRenderer(features)
    model = NodeModel("node-1", {}, {}, {})
    _check(renderer, model)
    for commit in steps:  # a commit may carry several changes
        for change in commit:
            model = _step(model, change)
        _check(renderer, model)
    assert renderer.full_renders == 0


def test_a_failing_incremental_update_falls_back_to_a_full_render(monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = IncrementalRenderer(Features())
    model = _model()
    _check(renderer, model)

    def boom(*_args: object) -> None:
        raise RuntimeError("bug")

    changed = replace(model, policies={**model.policies, "ns/web": _web(port=81)})
    with monkeypatch.context() as patched:
        patched.setattr(incremental._FamilyState, "update", boom)
        assert renderer.render(changed) == render(changed)
    assert renderer.full_renders == 1
    _check(renderer, model)  # state was dropped, not half-updated: rendered afresh and right
