"""Rules the kernel cannot match are rendered to match nothing (fail closed) and listed as unenforceable."""

from __future__ import annotations

import pytest
from dataplane_samples import FRONTEND, endpoint, node_model, policy

from netfence.dataplane.names import policy_chain
from netfence.dataplane.render import SCTP_PORT_MATCH, Features, render, unenforceable
from netfence.model.enforcement import CompiledPort, CompiledRule, NodeModel

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
