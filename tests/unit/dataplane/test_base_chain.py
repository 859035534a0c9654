"""The NETFENCE-FORWARD base chain: the conntrack shortcut lets established TCP through both ways,
UDP only in the reply direction (docs/design.md, "Established flows"), and agents upgrading from
the old single-rule base chain rewrite it."""

from __future__ import annotations

import pytest
from dataplane_samples import SAMPLES

from netfence.dataplane.kernel import KernelState, TableState
from netfence.dataplane.plan import plan
from netfence.dataplane.render import ESTABLISHED_RETURN, Features, render
from netfence.dataplane.ruleset import FORWARD_CHAIN, FROM_WL_CHAIN, TO_WL_CHAIN, Ruleset

OLD_BASE = ("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", f"-j {FROM_WL_CHAIN}", f"-j {TO_WL_CHAIN}")


def test_the_shortcut_returns_udp_replies_only_and_everything_else_both_ways() -> None:
    # spelled exactly as iptables-save (nft and legacy) prints them: the drift check compares strings
    assert ESTABLISHED_RETURN == (
        "-p udp -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j RETURN",
        "! -p udp -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    )


@pytest.mark.parametrize("sample", sorted(SAMPLES))
@pytest.mark.parametrize("features", [Features(), Features(ipv6=False, drop_invalid=False)])
def test_every_family_gets_the_same_base_chain(sample: str, features: Features) -> None:
    rs = render(SAMPLES[sample](), features=features)
    assert rs.families == (("v4", "v6") if features.ipv6 else ("v4",))
    for fam in rs.families:
        assert rs.family_chains(fam)[FORWARD_CHAIN] == (*ESTABLISHED_RETURN, f"-j {FROM_WL_CHAIN}", f"-j {TO_WL_CHAIN}")


def old_base(rs: Ruleset) -> Ruleset:
    return Ruleset(sets=rs.sets, chains={f: {**c, FORWARD_CHAIN: OLD_BASE} for f, c in rs.chains.items()})


def test_an_agent_that_applied_the_old_base_chain_rewrites_it_by_delta() -> None:
    new = render(SAMPLES["ingress_basic"]())
    p = plan(old_base(new), new)
    assert not p.full
    for fam in ("v4", "v6"):
        assert p.changed_chains[fam] == (FORWARD_CHAIN,)
        text = p.iptables_restore[fam]
        assert f":{FORWARD_CHAIN} - [0:0]" in text
        assert [ln for ln in text.splitlines() if ln.startswith(f"-A {FORWARD_CHAIN} ")] == [
            f"-A {FORWARD_CHAIN} {r}" for r in new.family_chains(fam)[FORWARD_CHAIN]
        ]


def test_an_upgraded_agent_s_full_sync_rewrites_the_old_base_chain() -> None:
    new = render(SAMPLES["ingress_basic"]())
    kernel = KernelState(tables={f: TableState(chains={FORWARD_CHAIN: OLD_BASE}, hooks=(1,)) for f in ("v4", "v6")})
    p = plan(None, new, kernel=kernel)
    assert p.full
    for fam in ("v4", "v6"):
        lines = p.iptables_restore[fam].splitlines()
        assert f":{FORWARD_CHAIN} - [0:0]" in lines
        assert f"-A {FORWARD_CHAIN} {ESTABLISHED_RETURN[0]}" in lines
        assert f"-A {FORWARD_CHAIN} {OLD_BASE[0]}" not in lines
