"""ClusterNetworkPolicy tiers in the rendered chains (dataplane/render_tiers.py)."""

from __future__ import annotations

import pytest

from netfence.dataplane.names import endpoint_chain, policy_chain, set_name
from netfence.dataplane.render import Features, render
from netfence.dataplane.render_tiers import (
    CNP_ACCEPT_CHAIN,
    CNP_PASS_CHAIN,
    cluster_chain,
)
from netfence.dataplane.ruleset import is_owned_chain
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledClusterRule,
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
    PeerSet,
)

PEERS = PeerSet("pabc", "pods", {}, ("10.244.1.10",))
NET = PeerSet("nabc", "net", {}, ("10.0.0.0/8",))
NP = CompiledPolicy("x", "allow", "u", (CompiledRule(peers=("pabc",), ports=None),), None)


def cnp(name: str, tier: str, priority: int, *rules: CompiledClusterRule,
        egress: bool = False) -> CompiledClusterPolicy:
    return CompiledClusterPolicy(name, "u", tier, priority,  # type: ignore[arg-type]
                                 () if egress else rules, rules if egress else ())


def rule(action: str, peers: tuple[str, ...] | None = ("pabc",), ports: tuple[CompiledPort, ...] | None = None
         ) -> CompiledClusterRule:
    return CompiledClusterRule(action, CompiledRule(peers=peers, ports=ports))  # type: ignore[arg-type]


def model(ep: Endpoint, *cnps: CompiledClusterPolicy, policies: tuple[CompiledPolicy, ...] = ()) -> NodeModel:
    return NodeModel("n0", {ep.key: ep}, {p.key: p for p in policies}, {s.id: s for s in (PEERS, NET)},
                     {c.name: c for c in cnps})


V4_ONLY = Features(ipv6=False)


def v4(m: NodeModel, features: Features = V4_ONLY) -> dict[str, tuple[str, ...]]:
    return dict(render(m, features=features).chains["v4"])


def test_admin_then_network_policy_then_drop() -> None:
    ep = Endpoint("n0", "x", "a", ("10.244.0.10",), ("x/allow",), (), admin_ingress=("deny", "pass"))
    chains = v4(model(ep, cnp("deny", "Admin", 1, rule("Deny", ports=(CompiledPort("TCP", 80),))),
                      cnp("pass", "Admin", 2, rule("Pass")), policies=(NP,)))
    tw = chains[endpoint_chain("ingress", "x/a")]
    ci_deny, ci_pass = cluster_chain("ingress", "deny"), cluster_chain("ingress", "pass")
    assert tw == (
        "-j MARK --set-xmark 0x0/0x30000",
        '-m conntrack --ctstate INVALID -m comment --comment "netfence ingress to x/a invalid" -j DROP',
        f"-m mark --mark 0x0/0x20000 -j {ci_deny}",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        f"-m mark --mark 0x0/0x20000 -j {ci_pass}",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        f"-j {policy_chain('ingress', 'x/allow')}",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        '-m comment --comment "netfence ingress to x/a denied" -j DROP',
    )
    src = set_name("v4", "pabc")
    assert chains[ci_deny] == (
        f"-p tcp -m set --match-set {src} src -m tcp --dport 80"
        ' -m comment --comment "netfence cnp deny ingress rule 0 denied" -j DROP',
    )
    assert chains[ci_pass] == (f"-m set --match-set {src} src -g {CNP_PASS_CHAIN}",)
    assert chains[CNP_PASS_CHAIN] == ("-j MARK --set-xmark 0x20000/0x20000",)
    assert CNP_ACCEPT_CHAIN not in chains
    assert all(is_owned_chain(name) for name in chains)


def test_baseline_only_where_no_network_policy_isolates() -> None:
    ep = Endpoint("n0", "x", "a", ("10.244.0.10",), (), (), admin_egress=("adm",), baseline_egress=("base",))
    chains = v4(model(ep, cnp("adm", "Admin", 0, rule("Accept", peers=("nabc",)), egress=True),
                      cnp("base", "Baseline", 0, rule("Deny", peers=None), egress=True)))
    fw = chains[endpoint_chain("egress", "x/a")]
    assert fw[2:] == (
        f"-m mark --mark 0x0/0x20000 -j {cluster_chain('egress', 'adm')}",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        "-j MARK --set-xmark 0x0/0x20000",
        f"-m mark --mark 0x0/0x20000 -j {cluster_chain('egress', 'base')}",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
    )
    assert chains[cluster_chain("egress", "adm")] == (
        f"-m set --match-set {set_name('v4', 'nabc')} dst -g {CNP_ACCEPT_CHAIN}",
    )
    assert endpoint_chain("ingress", "x/a") not in chains  # no tier and no policy in that direction
    with_np = Endpoint("n0", "x", "a", ("10.244.0.10",), (), ("x/allow",), baseline_egress=("base",))
    np_egress = CompiledPolicy("x", "allow", "u", None, ())
    chains = v4(model(with_np, cnp("base", "Baseline", 0, rule("Deny", peers=None), egress=True),
                      policies=(np_egress,)))
    assert cluster_chain("egress", "base") not in chains  # a NetworkPolicy isolates: Baseline never applies


def test_unknown_cluster_policy_denies() -> None:
    ep = Endpoint("n0", "x", "a", ("10.244.0.10",), ("x/allow",), (), admin_ingress=("gone",))
    tw = v4(model(ep, policies=(NP,)))[endpoint_chain("ingress", "x/a")]
    assert tw[-1] == '-m comment --comment "netfence ingress to x/a cluster policy gone unknown" -j DROP'
    assert not any(policy_chain("ingress", "x/allow") in line for line in tw)


@pytest.mark.parametrize(("action", "expected"), [("Deny", "-p sctp -m set"), ("Accept", None)])
def test_sctp_ports_fail_closed_without_kernel_support(action: str, expected: str | None) -> None:
    ep = Endpoint("n0", "x", "a", ("10.244.0.10",), (), (), admin_ingress=("c",))
    c = cnp("c", "Admin", 0, rule(action, ports=(CompiledPort("SCTP", 9),)))
    chains = v4(model(ep, c), Features(ipv6=False, sctp_port_match=False))
    lines = chains.get(cluster_chain("ingress", "c"), ())
    if expected is None:
        assert lines == ()  # an Accept that cannot be matched allows nothing
    else:
        assert len(lines) == 1 and lines[0].startswith(expected) and "--dport" not in lines[0]


def test_deny_with_missing_sets_denies_any_peer() -> None:
    ep = Endpoint("n0", "x", "a", ("10.244.0.10",), (), (), admin_ingress=("c",))
    chains = v4(model(ep, cnp("c", "Admin", 0, rule("Deny", peers=("missing",)))))
    assert chains[cluster_chain("ingress", "c")] == (
        '-m comment --comment "netfence cnp c ingress rule 0 denied" -j DROP',
    )


def test_endpoint_without_tiers_renders_as_before() -> None:
    plain = Endpoint("n0", "x", "a", ("10.244.0.10",), ("x/allow",), ())
    tiered_other_direction = Endpoint("n0", "x", "a", ("10.244.0.10",), ("x/allow",), (), admin_egress=("c",))
    c = cnp("c", "Admin", 0, rule("Deny"), egress=True)
    name = endpoint_chain("ingress", "x/a")
    assert v4(model(plain, policies=(NP,)))[name] == v4(model(tiered_other_direction, c, policies=(NP,)))[name]
