"""Pinned rules: a key without a good value keeps exactly what the kernel holds for it."""

from __future__ import annotations

import dataclasses

import pytest
from dataplane_samples import (
    FRONTEND,
    HTTP_PORTS,
    SAMPLES,
    egress_mixed,
    ingress_basic,
    node_model,
    shared_and_missing,
)

from netfence.dataplane.kernel import KernelState, TableState
from netfence.dataplane.names import policy_chain, set_name
from netfence.dataplane.pins import PinCache, PinKey, Pinned, carry, merge
from netfence.dataplane.plan import plan
from netfence.dataplane.render import render
from netfence.dataplane.ruleset import FAMILIES, FROM_WL_CHAIN, TO_WL_CHAIN, Ruleset
from netfence.model.enforcement import CompiledPort, CompiledRule, NodeModel


def kernel_of(ruleset: Ruleset) -> KernelState:
    """The kernel after ``ruleset`` was applied (what `iptables-save`/`ipset save` read back)."""
    tables = {fam: TableState(chains=dict(ruleset.family_chains(fam)), hooks=(1,)) for fam in ruleset.families}
    return KernelState(tables=tables, set_names=frozenset(ruleset.sets), sets=dict(ruleset.sets))


def without(model: NodeModel, *, policy: str = "", set_id: str = "", endpoint: str = "") -> NodeModel:
    return dataclasses.replace(
        model,
        policies={k: v for k, v in model.policies.items() if k != policy},
        sets={k: v for k, v in model.sets.items() if k != set_id},
        endpoints={k: v for k, v in model.endpoints.items() if k != endpoint},
    )


def pinned_for(kernel: KernelState, *keys: PinKey) -> Pinned:
    cache = PinCache()
    cache.learn(kernel, cache.needs(keys), FAMILIES)
    return cache.pinned(keys)


def with_dispatch_sorted(ruleset: Ruleset) -> dict[str, dict[str, tuple[str, ...]]]:
    """Chains per family, dispatch chains as sorted lines (a pinned endpoint's dispatch comes last)."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for fam in ruleset.families:
        chains = dict(ruleset.family_chains(fam))
        for wl in (FROM_WL_CHAIN, TO_WL_CHAIN):
            chains[wl] = tuple(sorted(chains[wl]))
        out[fam] = chains
    return out


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_restart_with_a_policy_without_good_value_keeps_its_kernel_rules(sample: str) -> None:
    model = SAMPLES[sample]()
    before = render(model)
    kernel = kernel_of(before)
    for key in model.policies:
        pinned = pinned_for(kernel, ("policy", key))
        after = render(without(model, policy=key), pinned=pinned)
        assert after == before, key
        # ... so the full sync rewrites it to exactly what was there, and a delta changes nothing
        assert plan(before, after).empty


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_restart_with_a_set_without_good_value_keeps_its_kernel_members(sample: str) -> None:
    model = SAMPLES[sample]()
    before = render(model)
    kernel = kernel_of(before)
    for sid in model.sets:
        after = render(without(model, set_id=sid), pinned=pinned_for(kernel, ("set", sid)))
        assert after == before, sid


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_restart_with_an_endpoint_without_good_value_keeps_its_chains_and_dispatch(sample: str) -> None:
    model = SAMPLES[sample]()
    before = render(model)
    kernel = kernel_of(before)
    for key in model.endpoints:
        pinned = pinned_for(kernel, ("endpoint", key))
        after = render(without(model, endpoint=key), pinned=pinned)
        assert with_dispatch_sorted(after) == with_dispatch_sorted(before), key
        assert after.sets == before.sets


def test_a_fresh_node_has_nothing_to_keep_so_the_policy_matches_nothing() -> None:
    model = ingress_basic()
    key = "default/allow-frontend"
    pinned = pinned_for(KernelState(), ("policy", key))
    assert pinned.empty and pinned.found == frozenset()
    after = render(without(model, policy=key), pinned=pinned)
    assert after == render(without(model, policy=key))
    assert policy_chain("ingress", key) not in after.family_chains("v4")
    web = next(rules for rules in after.family_chains("v4").values() if rules and "default/web denied" in rules[-1])
    assert not any(r.startswith("-j nf-pi-") for r in web)  # straight to the DROP: deny


def test_pins_of_several_keys_merge_and_record_what_was_found() -> None:
    model = shared_and_missing()
    kernel = kernel_of(render(model))
    keys: list[PinKey] = [("policy", "team/shared"), ("policy", "team/missing"), ("set", FRONTEND.id)]
    cache = PinCache()
    cache.learn(kernel, cache.needs(keys), FAMILIES)
    assert cache.found(("policy", "team/shared")) is True
    assert cache.found(("policy", "team/missing")) is False  # never rendered: nothing in the kernel
    assert cache.found(("set", FRONTEND.id)) is True
    assert cache.found(("set", "other")) is None  # not read
    pinned = cache.pinned(keys)
    assert pinned == merge(carry(kernel, k, FAMILIES) for k in sorted(keys))
    assert set_name("v4", FRONTEND.id) in pinned.sets
    # keys no longer requested are forgotten (read anew if they turn bad again)
    cache.pinned(keys[:1])
    assert cache.needs(keys) == set(keys[1:])


def test_a_pinned_endpoint_uses_the_fresh_chain_of_a_policy_with_a_good_value() -> None:
    model = ingress_basic()
    kernel = kernel_of(render(model))
    allow = model.policies["default/allow-frontend"]
    changed = dataclasses.replace(allow, ingress=(CompiledRule((FRONTEND.id,), (CompiledPort("TCP", 8080),)),))
    later = node_model([e for k, e in model.endpoints.items() if k != "default/web"],
                       [changed, model.policies["default/deny-all"]], [FRONTEND])
    pinned = pinned_for(kernel, ("endpoint", "default/web"))
    chains = render(later, pinned=pinned).family_chains("v4")
    assert chains[policy_chain("ingress", allow.key)] == (
        f"-p tcp -m set --match-set {set_name('v4', FRONTEND.id)} src -m tcp --dport 8080 "
        "-j MARK --set-xmark 0x10000/0x10000",
    )
    assert any(line.startswith("-d 10.244.0.10/32 -g nf-tw-") for line in chains[TO_WL_CHAIN])


def test_a_pinned_endpoint_jumping_to_a_policy_that_now_matches_nothing_gets_the_empty_chain() -> None:
    model = ingress_basic()
    kernel = kernel_of(render(model))
    allow = model.policies["default/allow-frontend"]
    never = dataclasses.replace(allow, ingress=())
    later = node_model([e for k, e in model.endpoints.items() if k != "default/web"],
                       [never, model.policies["default/deny-all"]], [FRONTEND])
    rendered = render(later, pinned=pinned_for(kernel, ("endpoint", "default/web")))
    assert rendered.family_chains("v4")[policy_chain("ingress", allow.key)] == ()  # exists (jumped to), empty


def test_a_pinned_set_is_used_only_for_its_kind() -> None:
    model = egress_mixed()
    kernel = kernel_of(render(model))
    pinned = pinned_for(kernel, ("set", HTTP_PORTS.id))
    # the named-port set's kernel copy is hash:ip,port: it serves the named port as before ...
    assert render(without(model, set_id=HTTP_PORTS.id), pinned=pinned) == render(model)
    # ... but never as a peer set (a rule naming it as peers matches nothing)
    egress = model.policies["apps/egress"]
    misuse = dataclasses.replace(egress, egress=(CompiledRule((HTTP_PORTS.id,), None),))
    odd = dataclasses.replace(without(model, set_id=HTTP_PORTS.id), policies={egress.key: misuse})
    assert policy_chain("egress", egress.key) not in render(odd, pinned=pinned).family_chains("v4")
