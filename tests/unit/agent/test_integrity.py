"""Bad keys (corrupt or foreign values): never applied, kept at their last good value or pinned, reported."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

from netfence.agent.integrity import MAX_ENTRIES, KeyState, bad_key_entries, describe, report_fields
from netfence.agent.loop import Agent
from netfence.agent.node_state import NodeState
from netfence.config import AgentConfig
from netfence.dataplane.apply import ApplyResult
from netfence.dataplane.kernel import KernelState, TableState
from netfence.dataplane.names import endpoint_chain, policy_chain, set_name
from netfence.dataplane.pins import PinKey
from netfence.dataplane.render import Features
from netfence.dataplane.render_tiers import cluster_chain
from netfence.dataplane.ruleset import Family, Ruleset
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledClusterRule,
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    PeerSet,
)

NODE = "node-1"
CLIENTS = PeerSet(PeerSet.make_id("pods", {"name": "clients"}), "pods", {"name": "clients"}, ("10.244.1.11",))
ALLOW = CompiledPolicy("app", "allow", "uid-1", (CompiledRule((CLIENTS.id,), (CompiledPort("TCP", 80),)),), None)
SCTP = CompiledPolicy("app", "sctp", "uid-3", (CompiledRule(None, (CompiledPort("SCTP", 80),)),), None)
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/allow", "app/sctp"), ())
POLICY_KEY = "policies/app/allow"
SET_KEY = f"sets/{CLIENTS.id}"
GARBAGE = b"{not json"


def raw(value: PeerSet | CompiledPolicy | CompiledClusterPolicy | Endpoint) -> bytes:
    return json.dumps(value.to_json()).encode()


def snapshot() -> dict[str, bytes]:
    return {
        POLICY_KEY: raw(ALLOW),
        "policies/app/sctp": raw(SCTP),
        SET_KEY: raw(CLIENTS),
        f"endpoints/{NODE}/app/web": raw(WEB),
    }


# --- cluster policies: an Admin Deny of bad -> web, web isolated by app/allow ----------------------

BAD = PeerSet(PeerSet.make_id("pods", {"name": "bad"}), "pods", {"name": "bad"}, ("10.244.1.12",))
DENY_BAD = CompiledClusterPolicy("deny-bad", "uid-c", "Admin", 10,
                                 (CompiledClusterRule("Deny", CompiledRule((BAD.id,), None)),), ())
CNP_KEY = "cpolicies/deny-bad"
TIERED_WEB = dataclasses.replace(WEB, ingress=("app/allow",), admin_ingress=("deny-bad",))


def cnp_snapshot() -> dict[str, bytes]:
    return {
        POLICY_KEY: raw(ALLOW),
        SET_KEY: raw(CLIENTS),
        f"sets/{BAD.id}": raw(BAD),
        CNP_KEY: raw(DENY_BAD),
        f"endpoints/{NODE}/app/web": raw(TIERED_WEB),
    }


# --- NodeState ---------------------------------------------------------------------------------


def test_a_foreign_write_is_not_applied_and_reported_until_a_committed_value_arrives() -> None:
    state = NodeState(NODE)
    state.reset(snapshot())
    before = state.model()
    state.mark_foreign({POLICY_KEY: 41, SET_KEY: 42, "endpoints/node-2/a/b": 43, "meta/observed": 44})
    assert state.model() == before  # nothing applied: the last good values stay
    assert set(state.bad_keys()) == {POLICY_KEY, SET_KEY}  # only keys this agent reads
    assert "outside a controller commit (revision 41)" in state.bad_keys()[POLICY_KEY]
    assert state.unresolved() == {}  # both have a good value
    state.update({POLICY_KEY: raw(ALLOW), SET_KEY: None})  # committed: the controller rewrote / deleted them
    assert state.bad_keys() == {}


def test_a_restarted_agent_facing_a_bad_value_has_it_unresolved() -> None:
    state = NodeState(NODE)
    state.reset({**snapshot(), POLICY_KEY: GARBAGE}, foreign={SET_KEY: 50})
    assert "app/allow" not in state.model().policies and CLIENTS.id not in state.model().sets
    assert state.unresolved() == {POLICY_KEY: ("policy", "app/allow"), SET_KEY: ("set", CLIENTS.id)}
    assert state.bad_keys()[POLICY_KEY].startswith("corrupt value: ")


def test_reset_keeps_a_known_foreign_write_while_its_value_is_unchanged() -> None:
    state = NodeState(NODE)
    state.reset(snapshot())
    state.mark_foreign({POLICY_KEY: 60})
    # a later snapshot (after a commit of something else) still holds the foreign value at revision 60
    values = {**snapshot(), POLICY_KEY: raw(SCTP)}
    state.reset(values, mod_revisions={POLICY_KEY: 60, SET_KEY: 3})
    assert state.model().policies["app/allow"] == ALLOW and POLICY_KEY in state.foreign
    # once the key has another revision (the controller rewrote it) it is taken as committed
    state.reset(snapshot(), mod_revisions={POLICY_KEY: 61})
    assert state.foreign == {} and state.bad_keys() == {}


def test_pin_keys_follow_the_layout_in_use() -> None:
    state = NodeState(NODE)
    assert state.pin_key("policies/a/b") == ("policy", "a/b")
    assert state.pin_key(f"endpoints/{NODE}/a/b") == ("endpoint", "a/b")
    assert state.pin_key("sets/p1") == ("set", "p1")
    assert state.pin_key("sets2/p1/3") is None and state.pin_key("meta/schema") is None
    assert state.pin_key("cpolicies/deny-x") == ("cluster_policy", "deny-x")
    state.reset({"meta/schema": b'{"schema": 2}'})
    assert state.layout == 2
    assert state.pin_key("sets2/p1/3") == ("set", "p1") and state.pin_key("sets/p1") is None


def test_a_corrupt_cluster_policy_without_good_value_is_unresolved_until_one_arrives() -> None:
    state = NodeState(NODE)
    state.reset({**cnp_snapshot(), CNP_KEY: GARBAGE})
    assert "deny-bad" not in state.model().cluster_policies
    assert state.unresolved() == {CNP_KEY: ("cluster_policy", "deny-bad")}
    assert not state.has_good_value(("cluster_policy", "deny-bad"))
    state.update({CNP_KEY: raw(DENY_BAD)})
    assert state.unresolved() == {} and state.bad_keys() == {}
    state.update({CNP_KEY: GARBAGE})  # bad again, but a good value is known now: nothing to pin
    assert state.unresolved() == {} and state.has_good_value(("cluster_policy", "deny-bad"))


# --- report fields -----------------------------------------------------------------------------


def test_reasons_say_what_is_enforced_meanwhile() -> None:
    pin: PinKey = ("policy", "a/b")
    assert describe("corrupt", KeyState(pin, True, None)).endswith("the last good value stays in force")
    assert "rules already in the kernel for it are kept" in describe("corrupt", KeyState(pin, False, True))
    assert describe("corrupt", KeyState(pin, False, False)).endswith("it matches nothing")
    assert describe("x\ny", KeyState(None, False, None)) == "x y"
    cluster: PinKey = ("cluster_policy", "deny-x")
    assert "rules already in the kernel for it are kept" in describe("corrupt", KeyState(cluster, False, True))
    assert describe("corrupt", KeyState(cluster, False, False)).endswith(
        "no rules in the kernel for it: traffic that reaches it on the endpoints naming it is denied")
    assert len(describe("z" * 1000, KeyState(pin, False, False))) == 300


def test_report_fields_are_sorted_and_capped_with_a_total() -> None:
    bad = {f"policies/ns/p{i:03d}": "corrupt value: x" for i in range(40)}
    entries = bad_key_entries(bad, {})
    fields = report_fields(entries, [])
    assert len(fields["badKeys"]) == MAX_ENTRIES and fields["badKeysTotal"] == 40
    assert fields["badKeys"][0] == {"key": "policies/ns/p000", "reason": "corrupt value: x"}
    assert [e["key"] for e in fields["badKeys"]] == sorted(e["key"] for e in fields["badKeys"])
    assert fields["unenforceable"] == [] and fields["unenforceableTotal"] == 0


# --- the agent: restart with a bad value (a fake kernel) ------------------------------------------


class FakeKernel:
    """Just enough of Dataplane: the kernel holds exactly the last applied Ruleset."""

    families: tuple[Family, ...] = ("v4",)

    def __init__(self, ruleset: Ruleset | None = None) -> None:
        self.ruleset = ruleset or Ruleset()
        self.reads = 0

    def read_state(self) -> KernelState:
        self.reads += 1
        rs = self.ruleset
        tables = {fam: TableState(chains=dict(rs.family_chains(fam)), hooks=(1,)) for fam in rs.families}
        return KernelState(tables=tables, set_names=frozenset(rs.sets), sets=dict(rs.sets))

    def forget_applied(self) -> None:
        pass

    def apply(self, desired: Ruleset) -> ApplyResult:
        self.ruleset = desired.restricted(self.families)
        return ApplyResult(desired.rule_count, desired.set_count, 0.0, True)


V4_ONLY = Features(ipv6=False)


def agent(kernel: FakeKernel, features: Features = V4_ONLY) -> Agent:
    return Agent(AgentConfig(node=NODE), cast(Any, None), cast(Any, kernel), features)


async def test_restart_with_a_corrupt_policy_keeps_its_kernel_rules_and_says_so() -> None:
    kernel = FakeKernel()
    first = agent(kernel)
    first.state.reset(snapshot())
    assert await first.apply()
    good = kernel.ruleset
    chain = policy_chain("ingress", "app/allow")
    assert chain in good.family_chains("v4")

    restarted = agent(kernel)  # the value went bad meanwhile; no last good value now
    restarted.state.reset({**snapshot(), POLICY_KEY: GARBAGE})
    assert await restarted.apply()
    assert kernel.ruleset == good  # the kernel's rules for the policy stay, exactly
    [entry] = restarted.report()["badKeys"]
    assert entry["key"] == POLICY_KEY and "rules already in the kernel for it are kept" in entry["reason"]
    assert restarted.report()["badKeysTotal"] == 1 and restarted.health.bad_keys == 1

    reads = kernel.reads
    assert await restarted.apply()  # pinned once: the kernel is not read again while the key stays bad
    assert kernel.reads == reads

    restarted.state.update({POLICY_KEY: raw(ALLOW)})  # the controller rewrites it
    assert await restarted.apply()
    assert kernel.ruleset == good and restarted.report()["badKeys"] == []


async def test_a_fresh_node_facing_a_corrupt_policy_denies_and_says_so() -> None:
    kernel = FakeKernel()
    fresh = agent(kernel)
    fresh.state.reset({**snapshot(), POLICY_KEY: GARBAGE})
    assert await fresh.apply()
    assert policy_chain("ingress", "app/allow") not in kernel.ruleset.family_chains("v4")
    [entry] = fresh.report()["badKeys"]
    assert entry["reason"].endswith("no rules in the kernel for it: it matches nothing")


async def test_sctp_port_rules_are_reported_unenforceable_without_kernel_support() -> None:
    kernel = FakeKernel()
    no_sctp = agent(kernel, Features(ipv6=False, sctp_port_match=False))
    no_sctp.state.reset(snapshot())
    assert await no_sctp.apply()
    report = no_sctp.report()
    assert report["unenforceable"] == [{"policy": "app/sctp", "feature": "sctp-port-match"}]
    assert report["unenforceableTotal"] == 1
    assert policy_chain("ingress", "app/sctp") not in kernel.ruleset.family_chains("v4")

    disabled = Agent(AgentConfig(node=NODE, disable_features=("sctp-port-match",)), cast(Any, None),
                     cast(Any, kernel), Features(ipv6=False))
    assert disabled.features.sctp_port_match is False


async def test_restart_with_a_corrupt_cluster_policy_keeps_its_kernel_rules_until_a_good_value() -> None:
    kernel = FakeKernel()
    first = agent(kernel)
    first.state.reset(cnp_snapshot())
    assert await first.apply()
    good = kernel.ruleset
    chain = cluster_chain("ingress", "deny-bad")
    assert chain in good.family_chains("v4")

    restarted = agent(kernel)  # the value went bad meanwhile; no last good value now
    restarted.state.reset({**cnp_snapshot(), CNP_KEY: GARBAGE})
    assert await restarted.apply()
    assert kernel.ruleset == good  # the Admin Deny stays in force, exactly
    [entry] = restarted.report()["badKeys"]
    assert entry["key"] == CNP_KEY and "no good value: the rules already in the kernel for it are kept" in entry[
        "reason"]

    changed = dataclasses.replace(DENY_BAD, ingress=(CompiledClusterRule("Deny", CompiledRule((CLIENTS.id,), None)),))
    restarted.state.update({CNP_KEY: raw(changed)})  # the controller writes a good value: the pin is dropped
    assert await restarted.apply()
    assert restarted.report()["badKeys"] == []
    clients = set_name("v4", CLIENTS.id)
    assert kernel.ruleset.family_chains("v4")[chain] == (
        f'-m set --match-set {clients} src -m comment --comment "netfence cnp deny-bad ingress rule 0 denied" -j DROP',
    )


async def test_a_fresh_node_facing_a_corrupt_cluster_policy_denies_its_endpoints_and_says_so() -> None:
    kernel = FakeKernel()
    fresh = agent(kernel)
    fresh.state.reset({**cnp_snapshot(), CNP_KEY: GARBAGE})
    assert await fresh.apply()
    chains = kernel.ruleset.family_chains("v4")
    assert cluster_chain("ingress", "deny-bad") not in chains
    assert chains[endpoint_chain("ingress", "app/web")][-1] == (
        '-m comment --comment "netfence ingress to app/web cluster policy deny-bad unknown" -j DROP')
    [entry] = fresh.report()["badKeys"]
    assert entry["reason"].endswith("traffic that reaches it on the endpoints naming it is denied")


async def test_sctp_port_rules_of_cluster_policies_are_reported_unenforceable() -> None:
    kernel = FakeKernel()
    sctp = CompiledClusterPolicy("sctp-deny", "uid-s", "Admin", 1, (
        CompiledClusterRule("Deny", CompiledRule(None, (CompiledPort("SCTP", 9),))),), ())
    web = dataclasses.replace(TIERED_WEB, admin_ingress=("sctp-deny",))
    no_sctp = agent(kernel, Features(ipv6=False, sctp_port_match=False))
    no_sctp.state.reset({**cnp_snapshot(), "cpolicies/sctp-deny": raw(sctp), f"endpoints/{NODE}/app/web": raw(web)})
    assert await no_sctp.apply()
    assert no_sctp.report()["unenforceable"] == [{"policy": "/sctp-deny", "feature": "sctp-port-match"}]
    assert kernel.ruleset.family_chains("v4")[cluster_chain("ingress", "sctp-deny")] == (
        '-p sctp -m comment --comment "netfence cnp sctp-deny ingress rule 0 denied" -j DROP',)  # any SCTP port
