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
    peer_set,
    policy,
    shared_and_missing,
)

from netfence.dataplane.incremental import IncrementalRenderer
from netfence.dataplane.kernel import KernelState, TableState
from netfence.dataplane.names import endpoint_chain, policy_chain, set_name
from netfence.dataplane.pins import PinCache, PinKey, Pinned, carry, merge
from netfence.dataplane.plan import plan
from netfence.dataplane.render import Features, render
from netfence.dataplane.render_tiers import CNP_ACCEPT_CHAIN, FIXED_CHAINS, cluster_chain
from netfence.dataplane.ruleset import FAMILIES, FROM_WL_CHAIN, TO_WL_CHAIN, Ruleset
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledClusterRule,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
)


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


# --- cluster policies (cpolicies/<name>): pinned like NetworkPolicies ------------------------------

NET = peer_set("net", "outside", "192.0.2.0/24")


def cnp_rule(action: str, peers: tuple[str, ...] | None, *ports: CompiledPort) -> CompiledClusterRule:
    return CompiledClusterRule(action, CompiledRule(peers, ports or None))  # type: ignore[arg-type]


def cnp(name: str, tier: str, priority: int, ingress: tuple[CompiledClusterRule, ...] = (),
        egress: tuple[CompiledClusterRule, ...] = ()) -> CompiledClusterPolicy:
    return CompiledClusterPolicy(name, f"uid-{name}", tier, priority, ingress, egress)  # type: ignore[arg-type]


def tiered() -> NodeModel:
    """Admin Deny/Pass/Accept and a Baseline policy around a NetworkPolicy; only ``adm-accept``
    uses NETFENCE-CNP-ACCEPT."""
    allow = policy("x/allow", ingress=(CompiledRule((FRONTEND.id,), (CompiledPort("TCP", 80),)),))
    cnps = (
        cnp("adm-deny", "Admin", 1, ingress=(cnp_rule("Deny", (FRONTEND.id,), CompiledPort("TCP", 22)),)),
        cnp("adm-pass", "Admin", 2, ingress=(cnp_rule("Pass", (NET.id,)),)),
        cnp("adm-accept", "Admin", 3, egress=(cnp_rule("Accept", (NET.id,), CompiledPort("TCP", 443)),)),
        cnp("base", "Baseline", 0, ingress=(cnp_rule("Deny", None),)),
    )
    a = Endpoint("node-1", "x", "a", ("10.244.0.10", "fd00::10"), (allow.key,), (),
                 admin_ingress=("adm-deny", "adm-pass"), admin_egress=("adm-accept",))
    b = Endpoint("node-1", "x", "b", ("10.244.0.11",), (), (), admin_ingress=("adm-pass",), baseline_ingress=("base",))
    model = node_model([a, b], [allow], [FRONTEND, NET])
    return dataclasses.replace(model, cluster_policies={c.name: c for c in cnps})


def without_cnp(model: NodeModel, name: str) -> NodeModel:
    return dataclasses.replace(model, cluster_policies={k: v for k, v in model.cluster_policies.items() if k != name})


@pytest.mark.parametrize("name", ["adm-deny", "adm-pass", "adm-accept", "base"])
def test_restart_with_a_cluster_policy_without_good_value_keeps_its_kernel_rules(name: str) -> None:
    model = tiered()
    before = render(model)
    kernel = kernel_of(before)
    pinned = pinned_for(kernel, ("cluster_policy", name))
    assert pinned.found == {("cluster_policy", name)}
    after = render(without_cnp(model, name), pinned=pinned)
    assert after == before  # its chains, the jumps to them and the fixed chains they go to
    assert plan(before, after).empty
    assert IncrementalRenderer(Features()).render(without_cnp(model, name), pinned=pinned) == before


def test_the_fixed_chains_pinned_rules_go_to_are_rendered_not_taken_from_the_kernel() -> None:
    model = tiered()
    before = render(model)
    assert CNP_ACCEPT_CHAIN in before.family_chains("v4")  # only adm-accept's rule goes there
    tampered = kernel_of(before)
    for table in tampered.tables.values():
        table.chains[CNP_ACCEPT_CHAIN] = ("-j ACCEPT",)  # someone changed it meanwhile
    after = render(without_cnp(model, "adm-accept"), pinned=pinned_for(tampered, ("cluster_policy", "adm-accept")))
    assert after.family_chains("v4")[CNP_ACCEPT_CHAIN] == FIXED_CHAINS[CNP_ACCEPT_CHAIN]
    assert after == before
    # also when a pinned endpoint's chain leads there (through the kernel's chain of a policy without value)
    both_bad = dataclasses.replace(without_cnp(model, "adm-accept"),
                                   endpoints={k: v for k, v in model.endpoints.items() if k != "x/a"})
    pinned = pinned_for(tampered, ("endpoint", "x/a"), ("cluster_policy", "adm-accept"))
    assert with_dispatch_sorted(render(both_bad, pinned=pinned)) == with_dispatch_sorted(before)


def test_a_pinned_cluster_policy_carries_the_sets_its_rules_name() -> None:
    model = tiered()
    kernel = kernel_of(render(model))
    pinned = pinned_for(kernel, ("cluster_policy", "adm-accept"), ("set", NET.id))
    assert set_name("v4", NET.id) in pinned.sets
    gone = dataclasses.replace(without_cnp(model, "adm-accept"),
                               sets={k: v for k, v in model.sets.items() if k != NET.id})
    # adm-pass (a good value) names the pinned set too: it uses the kernel's copy
    assert render(gone, pinned=pinned) == render(model)


def test_a_cluster_policy_with_nothing_in_the_kernel_still_denies() -> None:
    model = tiered()
    pinned = pinned_for(KernelState(), ("cluster_policy", "adm-deny"))
    assert pinned.empty and pinned.found == frozenset()
    after = render(without_cnp(model, "adm-deny"), pinned=pinned)
    assert after == render(without_cnp(model, "adm-deny"))
    tw = after.family_chains("v4")[endpoint_chain("ingress", "x/a")]
    assert tw[-1] == '-m comment --comment "netfence ingress to x/a cluster policy adm-deny unknown" -j DROP'


def test_a_cluster_policy_pinned_in_one_direction_only_denies_in_the_other() -> None:
    model = tiered()
    kernel = kernel_of(render(model))
    pinned = pinned_for(kernel, ("cluster_policy", "adm-deny"))  # the kernel has its ingress chain only
    a = model.endpoints["x/a"]
    both = dataclasses.replace(a, admin_egress=("adm-deny", "adm-accept"))
    later = dataclasses.replace(without_cnp(model, "adm-deny"), endpoints={**model.endpoints, a.key: both})
    chains = render(later, pinned=pinned).family_chains("v4")
    assert f"-m mark --mark 0x0/0x20000 -j {cluster_chain('ingress', 'adm-deny')}" in chains[
        endpoint_chain("ingress", "x/a")]
    fw = chains[endpoint_chain("egress", "x/a")]
    assert fw[-1] == '-m comment --comment "netfence egress from x/a cluster policy adm-deny unknown" -j DROP'
    assert cluster_chain("egress", "adm-accept") not in chains  # never reached after the DROP


def test_a_good_value_drops_the_cluster_policy_pin() -> None:
    model = tiered()
    kernel = kernel_of(render(model))
    cache = PinCache()
    key: PinKey = ("cluster_policy", "adm-deny")
    cache.learn(kernel, cache.needs([key]), FAMILIES)
    assert cache.found(key) is True
    assert cache.pinned([]).empty and cache.needs([key]) == {key}  # forgotten once no longer requested
    changed = cnp("adm-deny", "Admin", 1, ingress=(cnp_rule("Deny", (FRONTEND.id,), CompiledPort("TCP", 23)),))
    fresh = dataclasses.replace(model, cluster_policies={**model.cluster_policies, "adm-deny": changed})
    assert "--dport 23" in render(fresh, pinned=cache.pinned([])).family_chains("v4")[
        cluster_chain("ingress", "adm-deny")][0]


def test_a_pinned_endpoint_uses_the_fresh_chain_of_a_cluster_policy_with_a_good_value() -> None:
    model = tiered()
    kernel = kernel_of(render(model))
    changed = cnp("adm-accept", "Admin", 3, egress=(cnp_rule("Accept", (NET.id,), CompiledPort("TCP", 8443)),))
    later = dataclasses.replace(
        model, endpoints={k: v for k, v in model.endpoints.items() if k != "x/a"},
        cluster_policies={**model.cluster_policies, "adm-accept": changed})
    chains = render(later, pinned=pinned_for(kernel, ("endpoint", "x/a"))).family_chains("v4")
    assert chains[cluster_chain("egress", "adm-accept")] == (
        f"-p tcp -m set --match-set {set_name('v4', NET.id)} dst -m tcp --dport 8443 -g {CNP_ACCEPT_CHAIN}",
    )
    assert chains[CNP_ACCEPT_CHAIN] == FIXED_CHAINS[CNP_ACCEPT_CHAIN]
