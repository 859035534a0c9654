"""Rules the kernel cannot match are rendered to match nothing (fail closed) and listed as unenforceable."""

from __future__ import annotations

import dataclasses

import pytest
from dataplane_samples import FRONTEND, endpoint, node_model, policy

from netfence.dataplane.names import policy_chain
from netfence.dataplane.render import SCTP_PORT_MATCH, Features, cluster_policy_id, render, unenforceable
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledClusterRule,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
)
from netfence.status.aggregate import NodeReport, PolicyFacts, unenforceable_warnings

NO_SCTP = Features(ipv6=False, sctp_port_match=False)
MARK = "-j MARK --set-xmark 0x10000/0x10000"


def sctp_world() -> NodeModel:
    only_sctp = policy("s/only-sctp", ingress=(CompiledRule((FRONTEND.id,), (CompiledPort("SCTP", 80),)),))
    mixed = policy("s/mixed", ingress=(
        CompiledRule(None, (CompiledPort("SCTP", 7000, 7010), CompiledPort("TCP", 81))),))
    any_sctp = policy("s/any-sctp", egress=(CompiledRule(None, (CompiledPort("SCTP"),)),))
    elsewhere = policy("s/elsewhere", ingress=(CompiledRule(None, (CompiledPort("SCTP", 9),)),))  # no local endpoint
    return node_model(
        [
            endpoint("s/server", "10.244.0.10", ingress=(only_sctp.key, mixed.key)),
            endpoint("s/client", "10.244.0.11", egress=(any_sctp.key,)),
        ],
        [only_sctp, mixed, any_sctp, elsewhere],
        [FRONTEND],
    )


def test_sctp_port_rules_match_nothing_without_kernel_support() -> None:
    chains = render(sctp_world(), features=NO_SCTP).family_chains("v4")
    rules = [r for rs in chains.values() for r in rs]
    assert not any("-p sctp -m sctp" in r for r in rules)
    # a rule with only SCTP ports can never match: the policy has no chain and no jump (deny)
    assert policy_chain("ingress", "s/only-sctp") not in chains
    # the TCP port of a mixed rule is still enforced; its SCTP range is not opened to any port
    assert chains[policy_chain("ingress", "s/mixed")] == (f"-p tcp -m tcp --dport 81 {MARK}",)
    # "any SCTP port" needs no port match and stays as written
    assert chains[policy_chain("egress", "s/any-sctp")] == (f"-p sctp {MARK}",)


def test_with_kernel_support_sctp_ports_are_matched() -> None:
    chains = render(sctp_world(), features=Features(ipv6=False)).family_chains("v4")
    assert chains[policy_chain("ingress", "s/mixed")] == (
        f"-p tcp -m tcp --dport 81 {MARK}",
        f"-p sctp -m sctp --dport 7000:7010 {MARK}",
    )
    assert unenforceable(sctp_world(), Features(ipv6=False)) == []


def test_unenforceable_lists_the_policies_applied_here_with_sctp_ports() -> None:
    assert unenforceable(sctp_world(), NO_SCTP) == [("s/mixed", SCTP_PORT_MATCH), ("s/only-sctp", SCTP_PORT_MATCH)]


def test_features_can_be_switched_off_by_id() -> None:
    assert Features().without([SCTP_PORT_MATCH]) == Features(sctp_port_match=False)
    assert Features().without([]) == Features()
    with pytest.raises(ValueError, match="unknown feature"):
        Features().without(["teleport"])


# --- cluster policies -------------------------------------------------------------------------------


def cnp(name: str, tier: str, *rules: CompiledClusterRule, egress: bool = False) -> CompiledClusterPolicy:
    return CompiledClusterPolicy(name, f"uid-{name}", tier, 0,  # type: ignore[arg-type]
                                 () if egress else rules, rules if egress else ())


def rule(action: str, *ports: CompiledPort) -> CompiledClusterRule:
    return CompiledClusterRule(action, CompiledRule(None, ports))  # type: ignore[arg-type]


def cnp_world() -> NodeModel:
    """Cluster policies with SCTP port rules: applied (Admin; Baseline where no NetworkPolicy
    isolates), not applied (Baseline behind a NetworkPolicy, no local endpoint), harmless (any SCTP port)."""
    isolating = policy("s/tcp", ingress=(CompiledRule(None, (CompiledPort("TCP", 80),)),))
    cnps = [
        cnp("deny-sctp", "Admin", rule("Deny", CompiledPort("SCTP", 9))),
        cnp("accept-sctp", "Admin", rule("Accept", CompiledPort("SCTP", 7000, 7010)), egress=True),
        cnp("pass-any-sctp", "Admin", rule("Pass", CompiledPort("SCTP"))),
        cnp("base-isolated", "Baseline", rule("Deny", CompiledPort("SCTP", 5))),
        cnp("base-open", "Baseline", rule("Accept", CompiledPort("SCTP", 6))),
        cnp("elsewhere", "Admin", rule("Deny", CompiledPort("SCTP", 4))),
    ]
    server = Endpoint("node-1", "s", "server", ("10.244.0.10",), (isolating.key,), (),
                      admin_ingress=("deny-sctp", "pass-any-sctp"), baseline_ingress=("base-isolated",))
    client = Endpoint("node-1", "s", "client", ("10.244.0.11",), (), (),
                      admin_egress=("accept-sctp",), baseline_ingress=("base-open",))
    model = node_model([server, client], [isolating], [FRONTEND])
    return dataclasses.replace(model, cluster_policies={c.name: c for c in cnps})


def test_cluster_policies_with_sctp_ports_are_listed_by_the_name_status_looks_up() -> None:
    assert unenforceable(cnp_world(), NO_SCTP) == [
        ("/accept-sctp", SCTP_PORT_MATCH), ("/base-open", SCTP_PORT_MATCH), ("/deny-sctp", SCTP_PORT_MATCH)]
    assert unenforceable(cnp_world(), Features(ipv6=False)) == []
    assert cluster_policy_id("deny-sctp") == "/deny-sctp"


def test_the_report_names_a_cluster_policy_as_its_status_aggregation_does() -> None:
    """status/aggregate.py looks a policy up as ``<namespace>/<name>``; a cluster policy's namespace is ""."""
    report = NodeReport.from_json({"appliedRevision": 1, "unenforceable": [
        {"policy": p, "feature": f} for p, f in unenforceable(cnp_world(), NO_SCTP)]}, "node-1")
    facts = PolicyFacts("", "deny-sctp", 1, frozenset({"node-1"}), 1, 1)
    assert unenforceable_warnings(f"{facts.namespace}/{facts.name}", facts.required_nodes, {"node-1": report}) == [
        f"node node-1 cannot enforce {SCTP_PORT_MATCH}: its Accept and Pass rules there match nothing, "
        "its Deny rules deny any such port"]
    # a NetworkPolicy's rules only ever allow: they match nothing
    assert unenforceable_warnings("ns/p", ["node-1"], {"node-1": NodeReport.from_json({"appliedRevision": 1,
        "unenforceable": [{"policy": "ns/p", "feature": SCTP_PORT_MATCH}]}, "node-1")}) == [
        f"node node-1 cannot enforce {SCTP_PORT_MATCH}: those rules match nothing there (deny)"]
