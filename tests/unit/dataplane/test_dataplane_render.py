"""Golden-file and property tests of the pure renderer (golden files: `make golden` rewrites them)."""

from __future__ import annotations

import re

import pytest
from dataplane_samples import (
    EXTERNAL,
    FRONTEND,
    egress_mixed,
    endpoint,
    ingress_basic,
    node_model,
    policy,
)
from golden_cases import CASES, golden_path, rendered, stale_files

from netfence.dataplane.names import MAX_CHAIN_NAME, MAX_SET_NAME, set_name, temp_set_name
from netfence.dataplane.render import render
from netfence.dataplane.ruleset import is_owned_chain
from netfence.model.enforcement import CompiledPort, CompiledRule


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case: str) -> None:
    """Compare only: hack/update_golden.py (`make golden`) is the one writer of golden files."""
    path = golden_path(case)
    assert path.is_file(), f"no golden file {path.name}: run `make golden` and review the new file"
    assert rendered(case) == path.read_text(), f"{path.name} differs: if the change is meant, run `make golden`"


def test_every_golden_file_belongs_to_a_case() -> None:
    assert stale_files() == [], "golden files of no case: `make golden` removes them"


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_is_deterministic_and_names_are_bounded(case: str) -> None:
    fn, features = CASES[case]
    a, b = render(fn(), features=features), render(fn(), features=features)
    assert a == b and a.dump() == b.dump()
    for fam in a.families:
        for chain, rules in a.family_chains(fam).items():
            assert len(chain) <= MAX_CHAIN_NAME and is_owned_chain(chain)
            for rule in rules:  # every jump/goto target exists in the same family
                for target in re.findall(r"-[jg] (\S+)", rule):
                    assert target in a.family_chains(fam) or target in ("MARK", "RETURN", "DROP")
                for ref in re.findall(r"--match-set (\S+) ", rule):
                    assert ref in a.sets and ref.startswith("nf4-" if fam == "v4" else "nf6-")
    for s in a.sets.values():
        assert len(temp_set_name(s.name)) <= MAX_SET_NAME


def test_set_names_are_bounded_for_any_id() -> None:
    long_id = "x" * 80 + "/weird id"
    assert len(temp_set_name(set_name("v6", long_id))) <= MAX_SET_NAME
    assert set_name("v4", long_id) != set_name("v4", long_id + "2")
    assert set_name("v4", "p0123456789ab") == "nf4-p0123456789ab"


def test_unisolated_endpoints_get_no_chains() -> None:
    rs = render(ingress_basic())
    v4 = rs.family_chains("v4")
    assert not any("10.244.0.13" in r for rules in v4.values() for r in rules)  # cache
    assert not any(c.startswith("nf-fw-") for c in v4)  # nobody is egress-isolated
    assert rs.family_chains("v6") == {c: r for c, r in rs.family_chains("v6").items() if c.startswith("NETFENCE-")}


def test_denial_drop_is_last_and_names_the_endpoint() -> None:
    rs = render(ingress_basic())
    tw = [r for c, r in rs.family_chains("v4").items() if c.startswith("nf-tw-")]
    assert sorted(rules[-1] for rules in tw) == [
        '-m comment --comment "netfence ingress to default/db denied" -j DROP',
        '-m comment --comment "netfence ingress to default/web denied" -j DROP',
    ]


def test_empty_peers_or_ports_never_match_and_none_means_any() -> None:
    never = policy("x/never", ingress=(CompiledRule((), None), CompiledRule(None, ())))
    anyp = policy("x/any", egress=(CompiledRule(None, None),))
    model = node_model([endpoint("x/a", "10.0.0.1", ingress=(never.key,), egress=(anyp.key,))], [never, anyp], [])
    v4 = render(model).family_chains("v4")
    tw = next(r for c, r in v4.items() if c.startswith("nf-tw-"))
    assert not any(r.startswith("-j nf-pi-") for r in tw)  # nothing can allow: straight to DROP
    po = next(r for c, r in v4.items() if c.startswith("nf-po-"))
    assert po == ("-j MARK --set-xmark 0x10000/0x10000",)


def test_ipblock_members_split_zero_prefix_and_use_nomatch() -> None:
    rs = render(egress_mixed())
    v4 = rs.sets[set_name("v4", EXTERNAL.id)]
    assert v4.type == "hash:net" and v4.family == "inet"
    assert v4.members == {"0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8 nomatch", "192.168.1.7"}
    v6 = rs.sets[set_name("v6", EXTERNAL.id)]
    assert v6.members == {"::/1", "8000::/1"} and v6.family == "inet6"


def test_sets_only_in_families_that_use_them() -> None:
    rs = render(ingress_basic())  # web is IPv4-only; the frontend set has a v6 member too
    assert set_name("v4", FRONTEND.id) in rs.sets
    assert set_name("v6", FRONTEND.id) not in rs.sets


def test_a_policy_change_changes_only_its_chain() -> None:
    base = ingress_basic()
    allow = base.policies["default/allow-frontend"]
    changed = type(allow)(
        allow.namespace,
        allow.name,
        allow.uid,
        (CompiledRule((FRONTEND.id,), (CompiledPort("TCP", 8080),)),),
        None,
    )
    after = node_model(
        list(base.endpoints.values()), [changed, base.policies["default/deny-all"]], list(base.sets.values())
    )
    a, b = render(base).family_chains("v4"), render(after).family_chains("v4")
    assert set(a) == set(b)
    assert [c for c in a if a[c] != b[c]] == [next(c for c in a if c.startswith("nf-pi-"))]
