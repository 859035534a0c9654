"""Bad keys (corrupt or foreign values): never applied, kept at their last good value or pinned, reported."""

from __future__ import annotations

import json
from typing import Any, cast

from netfence.agent.integrity import MAX_ENTRIES, KeyState, bad_key_entries, describe, report_fields
from netfence.agent.loop import Agent
from netfence.agent.node_state import NodeState
from netfence.config import AgentConfig
from netfence.dataplane.apply import ApplyResult
from netfence.dataplane.kernel import KernelState, TableState
from netfence.dataplane.names import policy_chain
from netfence.dataplane.pins import PinKey
from netfence.dataplane.render import Features
from netfence.dataplane.ruleset import Family, Ruleset
from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint, PeerSet

NODE = "node-1"
CLIENTS = PeerSet(PeerSet.make_id("pods", {"name": "clients"}), "pods", {"name": "clients"}, ("10.244.1.11",))
ALLOW = CompiledPolicy("app", "allow", "uid-1", (CompiledRule((CLIENTS.id,), (CompiledPort("TCP", 80),)),), None)
SCTP = CompiledPolicy("app", "sctp", "uid-3", (CompiledRule(None, (CompiledPort("SCTP", 80),)),), None)
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/allow", "app/sctp"), ())
POLICY_KEY = "policies/app/allow"
SET_KEY = f"sets/{CLIENTS.id}"
GARBAGE = b"{not json"


def raw(value: PeerSet | CompiledPolicy | Endpoint) -> bytes:
    return json.dumps(value.to_json()).encode()


def snapshot() -> dict[str, bytes]:
    return {
        POLICY_KEY: raw(ALLOW),
        "policies/app/sctp": raw(SCTP),
        SET_KEY: raw(CLIENTS),
        f"endpoints/{NODE}/app/web": raw(WEB),
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
    state.reset({"meta/schema": b'{"schema": 2}'})
    assert state.layout == 2
    assert state.pin_key("sets2/p1/3") == ("set", "p1") and state.pin_key("sets/p1") is None


# --- report fields -----------------------------------------------------------------------------


def test_reasons_say_what_is_enforced_meanwhile() -> None:
    pin: PinKey = ("policy", "a/b")
    assert describe("corrupt", KeyState(pin, True, None)).endswith("the last good value stays in force")
    assert "rules already in the kernel for it are kept" in describe("corrupt", KeyState(pin, False, True))
    assert describe("corrupt", KeyState(pin, False, False)).endswith("it matches nothing")
    assert describe("x\ny", KeyState(None, False, None)) == "x y"
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
