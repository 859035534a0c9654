"""Tests of the pure delta planner and of kernel-output parsing."""

from __future__ import annotations

from dataplane_samples import FRONTEND, endpoint, ingress_basic, node_model, peer_set, policy

from netfence.dataplane.kernel import (
    KernelState,
    TableState,
    hook_fix,
    hook_positions,
    parse_ipset_save,
    parse_iptables_save,
    parse_set_names,
)
from netfence.dataplane.names import set_name
from netfence.dataplane.plan import plan, uninstall_plan
from netfence.dataplane.render import ESTABLISHED_RETURN, render
from netfence.dataplane.ruleset import IpSet, Ruleset
from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, NodeModel, PeerSet


def _with(
    base: NodeModel,
    *,
    sets: list[PeerSet] | None = None,
    policies: list[CompiledPolicy] | None = None,
    drop_policy: str | None = None,
) -> NodeModel:
    all_sets = {s.id: s for s in base.sets.values()} | {s.id: s for s in sets or []}
    all_pols = {p.key: p for p in base.policies.values()} | {p.key: p for p in policies or []}
    eps = list(base.endpoints.values())
    if drop_policy:
        all_pols.pop(drop_policy)
        eps = [
            type(e)(
                e.node,
                e.namespace,
                e.name,
                e.ips,
                tuple(k for k in e.ingress if k != drop_policy),
                tuple(k for k in e.egress if k != drop_policy),
            )
            for e in eps
        ]
    return node_model(eps, list(all_pols.values()), list(all_sets.values()))


def test_no_change_is_an_empty_plan() -> None:
    rs = render(ingress_basic())
    assert plan(rs, render(ingress_basic())).empty


def test_membership_change_is_only_ipset_add_and_del() -> None:
    before = render(ingress_basic())
    grown = PeerSet(FRONTEND.id, "pods", FRONTEND.definition, ("10.244.0.11", "10.244.0.99"))
    after = render(_with(ingress_basic(), sets=[grown]))
    p = plan(before, after)
    name = set_name("v4", FRONTEND.id)
    assert p.ipset_restore == f"del {name} 10.244.1.20\nadd {name} 10.244.0.99\n"
    assert p.iptables_restore == {} and p.ipset_destroy == ""
    assert p.changed_sets == (name,) and not p.full


def test_nomatch_flip_deletes_the_plain_element_first() -> None:
    old = IpSet("nf4-n1", "hash:net", "inet", frozenset({"10.0.0.0/8"}))
    new = IpSet("nf4-n1", "hash:net", "inet", frozenset({"10.0.0.0/8 nomatch", "10.1.0.0/16"}))
    p = plan(Ruleset(sets={old.name: old}), Ruleset(sets={new.name: new}))
    assert p.ipset_restore.splitlines() == [
        "del nf4-n1 10.0.0.0/8",
        "add nf4-n1 10.0.0.0/8 nomatch",
        "add nf4-n1 10.1.0.0/16",
    ]


def test_one_policy_change_rewrites_only_that_chain() -> None:
    base = ingress_basic()
    allow = base.policies["default/allow-frontend"]
    changed = CompiledPolicy(
        allow.namespace, allow.name, allow.uid, (CompiledRule((FRONTEND.id,), (CompiledPort("TCP", 443),)),), None
    )
    before, after = render(base), render(_with(base, policies=[changed]))
    p = plan(before, after)
    (chain,) = p.changed_chains["v4"]
    assert chain.startswith("nf-pi-")
    assert p.iptables_restore == {
        "v4": (
            f"*filter\n:{chain} - [0:0]\n"
            f"-A {chain} -p tcp -m set --match-set {set_name('v4', FRONTEND.id)} src -m tcp --dport 443 "
            "-j MARK --set-xmark 0x10000/0x10000\nCOMMIT\n"
        )
    }
    assert p.ipset_restore == "" and p.ipset_destroy == ""


def test_removed_policy_chain_is_deleted_after_its_references_and_sets_after_that() -> None:
    ssh = policy("default/ssh", ingress=(CompiledRule(None, (CompiledPort("TCP", 22),)),))
    base = ingress_basic()
    eps = [
        e if e.name != "web" else endpoint("default/web", "10.244.0.10", ingress=(ssh.key, "default/allow-frontend"))
        for e in base.endpoints.values()
    ]
    base = node_model(eps, [*base.policies.values(), ssh], list(base.sets.values()))
    before, after = render(base), render(_with(base, drop_policy="default/allow-frontend"))
    p = plan(before, after)
    lines = p.iptables_restore["v4"].splitlines()
    (removed,) = p.removed_chains["v4"]
    (web_chain,) = p.changed_chains["v4"]
    assert removed.startswith("nf-pi-") and web_chain.startswith("nf-tw-")
    assert lines.index(f":{web_chain} - [0:0]") < lines.index(f"-F {removed}") < lines.index(f"-X {removed}")
    assert lines[-2:] == [f"-X {removed}", "COMMIT"]
    assert not any(f"-j {removed}" in ln for ln in lines)
    # the set only that policy used is destroyed, after the restore (a separate step)
    assert p.ipset_destroy == f"destroy {set_name('v4', FRONTEND.id)}\n"
    assert p.removed_sets == (set_name("v4", FRONTEND.id),)
    assert p.ipset_restore == ""


def test_endpoint_losing_its_last_policy_loses_chain_and_dispatch() -> None:
    base = ingress_basic()
    p = plan(render(base), render(_with(base, drop_policy="default/allow-frontend")))
    assert sorted(c[:6] for c in p.removed_chains["v4"]) == ["nf-pi-", "nf-tw-"]
    assert p.changed_chains["v4"] == ("NETFENCE-TO-WL",)


def test_new_set_is_created_before_rules_refer_to_it() -> None:
    base = ingress_basic()
    extra = peer_set("pods", "admins", "10.244.9.9")
    pol = policy("default/admins", ingress=(CompiledRule((extra.id,), None),))
    eps = [
        e if e.name != "db" else endpoint("default/db", "10.244.0.12", ingress=("default/deny-all", pol.key))
        for e in base.endpoints.values()
    ]
    after = render(node_model(eps, [*base.policies.values(), pol], [*base.sets.values(), extra]))
    p = plan(render(base), after)
    name = set_name("v4", extra.id)
    assert p.ipset_restore == f"create {name} hash:ip family inet maxelem 1048576\nadd {name} 10.244.9.9\n"
    assert any(name in ln for ln in p.iptables_restore["v4"].splitlines())


def test_full_sync_swaps_existing_sets_removes_stale_and_fixes_the_hook() -> None:
    desired = render(ingress_basic())
    name = set_name("v4", FRONTEND.id)
    kernel = KernelState(
        tables={"v4": TableState(chains={"nf-pi-old": ("-j RETURN",), "NETFENCE-FORWARD": ()}, hooks=(3,))},
        set_names=frozenset({name, "nf4-stale", f"{name}-t"}),
    )
    p = plan(None, desired, kernel=kernel)
    assert p.full
    assert p.ipset_restore.splitlines() == [
        f"destroy {name}-t",
        f"create {name}-t hash:ip family inet maxelem 1048576",
        f"add {name}-t 10.244.0.11",
        f"add {name}-t 10.244.1.20",
        f"swap {name}-t {name}",
        f"destroy {name}-t",
    ]
    v4 = p.iptables_restore["v4"].splitlines()
    assert v4[-5:] == ["-F nf-pi-old", "-X nf-pi-old", "-I FORWARD 1 -j NETFENCE-FORWARD", "-D FORWARD 4", "COMMIT"]
    assert all(f":{c} - [0:0]" in v4 for c in desired.family_chains("v4"))
    assert p.ipset_destroy == "destroy nf4-stale\n"
    # v6 has no stale state and no hook yet: everything declared, hook inserted
    assert p.iptables_restore["v6"].splitlines()[-2] == "-I FORWARD 1 -j NETFENCE-FORWARD"


def test_hook_fix() -> None:
    assert hook_fix([1]) == []
    assert hook_fix([]) == ["-I FORWARD 1 -j NETFENCE-FORWARD"]
    assert hook_fix([1, 4]) == ["-I FORWARD 1 -j NETFENCE-FORWARD", "-D FORWARD 5", "-D FORWARD 2"]


def test_uninstall_plan_touches_only_ours() -> None:
    kernel = KernelState(
        tables={"v4": TableState(chains={"NETFENCE-FORWARD": (), "nf-tw-a": ()}, hooks=(2,))},
        set_names=frozenset({"nf4-a"}),
    )
    p = uninstall_plan(kernel)
    assert p.iptables_restore == {
        "v4": ("*filter\n-D FORWARD 2\n-F NETFENCE-FORWARD\n-F nf-tw-a\n-X NETFENCE-FORWARD\n-X nf-tw-a\nCOMMIT\n")
    }
    assert p.ipset_destroy == "destroy nf4-a\n"


SAVE = """# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j nf-tw-nat
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:NETFENCE-FORWARD - [0:0]
:FOREIGN - [0:0]
:nf-other - [0:0]
:nf-pi-x - [0:0]
-A FORWARD -s 1.2.3.4/32 -j ACCEPT
-A FORWARD -j NETFENCE-FORWARD
-A NETFENCE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A FOREIGN -j DROP
-A nf-other -j DROP
COMMIT
"""


def test_parse_iptables_save_keeps_only_ours() -> None:
    t = parse_iptables_save(SAVE)
    assert t.chains == {"NETFENCE-FORWARD": ("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",), "nf-pi-x": ()}
    assert t.hooks == (2,)
    assert hook_positions("-P FORWARD ACCEPT\n-A FORWARD -j NETFENCE-FORWARD\n") == (1,)


def test_parse_ipset_output_keeps_only_ours() -> None:
    save = (
        "create foreign hash:ip family inet hashsize 1024 maxelem 65536\nadd foreign 1.1.1.1\n"
        "create nf6-n1 hash:net family inet6 hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1\n"
        "add nf6-n1 fd00::/8 nomatch\nadd nf6-n1 ::/1\n"
    )
    assert parse_ipset_save(save) == {
        "nf6-n1": IpSet("nf6-n1", "hash:net", "inet6", frozenset({"fd00::/8 nomatch", "::/1"}))
    }
    assert parse_set_names("foreign\nnf4-a\nnf6-b\n") == {"nf4-a", "nf6-b"}


def _kernel_holding(desired: Ruleset, v4_hooks: tuple[int, ...] = (1,)) -> KernelState:
    return KernelState(
        tables={fam: TableState(chains=dict(desired.family_chains(fam)), hooks=v4_hooks if fam == "v4" else (1,))
                for fam in desired.families},
        set_names=frozenset(desired.sets),
        sets=dict(desired.sets),
    )


def test_full_sync_against_a_kernel_read_with_contents_writes_only_what_differs() -> None:
    desired = render(ingress_basic())
    assert plan(None, desired, kernel=_kernel_holding(desired)).empty  # an agent restart on an intact kernel

    name = set_name("v4", FRONTEND.id)
    chains = dict(desired.family_chains("v4"))
    some = next(c for c in chains if c.startswith("nf-pi-"))
    kernel = _kernel_holding(desired, v4_hooks=(2,))
    kernel.tables["v4"].chains[some] = ("-j RETURN",)  # drifted
    kernel.tables["v4"].chains["nf-pi-stale"] = ()
    assert kernel.sets is not None
    kernel.sets[name] = IpSet(name, "hash:ip", "inet", frozenset({"10.9.9.9"}))
    p = plan(None, desired, kernel=kernel)
    assert p.full and p.changed_chains["v4"] == (some,) and p.removed_chains["v4"] == ("nf-pi-stale",)
    v4 = p.iptables_restore["v4"].splitlines()
    assert [ln for ln in v4 if ln.startswith(":")] == [f":{some} - [0:0]"]
    assert v4[-4:] == ["-X nf-pi-stale", "-I FORWARD 1 -j NETFENCE-FORWARD", "-D FORWARD 3", "COMMIT"]
    assert p.changed_sets == (name,) and f"swap {name}-t {name}" in p.ipset_restore  # refilled atomically
    assert "v6" not in p.iptables_restore  # nothing differs there: no transaction at all


def test_full_sync_compares_in_the_kernels_spelling() -> None:
    desired = render(ingress_basic())
    kernel = _kernel_holding(desired)
    theirs = {r: r.replace("--ctstate", "--ctstate ") for r in ESTABLISHED_RETURN}  # the kernel spells these so
    fwd = kernel.tables["v4"].chains["NETFENCE-FORWARD"]
    kernel.tables["v4"].chains["NETFENCE-FORWARD"] = tuple(theirs.get(r, r) for r in fwd)
    assert plan(None, desired, kernel=kernel).changed_chains["v4"] == ("NETFENCE-FORWARD",)

    def spell(rules: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(theirs.get(r, r) for r in rules)

    assert "v4" not in plan(None, desired, kernel=kernel, spell=spell).iptables_restore


def test_delta_skips_chains_and_sets_that_are_the_same_objects() -> None:
    desired = render(ingress_basic())
    same = Ruleset(sets=dict(desired.sets), chains=dict(desired.chains))
    assert plan(desired, same).empty
