"""Features.workload_cidrs: a pod of this node's CIDRs is denied until the model knows it (Calico style)."""

from __future__ import annotations

from dataplane_samples import endpoint, node_model, policy

from netfence.dataplane.incremental import IncrementalRenderer
from netfence.dataplane.render import Features, render
from netfence.dataplane.ruleset import FROM_WL_CHAIN, TO_WL_CHAIN
from netfence.model.enforcement import NodeModel

CIDRS = ("10.244.0.0/24", "fd00:0:0:1::/64")


def _model() -> NodeModel:
    return node_model(
        [
            endpoint("ns/isolated", "10.244.0.5", "fd00:0:0:1::5", ingress=("ns/deny",)),
            endpoint("ns/open", "10.244.0.6"),  # no policy selects it: known, not isolated
        ],
        [policy("ns/deny", ingress=())],
        [],
    )


def test_without_cidrs_nothing_changes() -> None:
    ruleset = render(_model())
    for family in ("v4", "v6"):
        chains = ruleset.chains[family]
        assert not any("RETURN" in r or "unknown" in r for r in (*chains[FROM_WL_CHAIN], *chains[TO_WL_CHAIN]))
    (only,) = ruleset.chains["v4"][TO_WL_CHAIN]  # the isolated pod only; the other one falls through
    assert only.startswith("-d 10.244.0.5/32 -g nf-tw-")


def test_known_pods_are_dispatched_and_unknown_ones_dropped_both_ways() -> None:
    ruleset = render(_model(), features=Features(workload_cidrs=CIDRS))
    to_wl = ruleset.chains["v4"][TO_WL_CHAIN]
    from_wl = ruleset.chains["v4"][FROM_WL_CHAIN]
    assert to_wl[0].startswith("-d 10.244.0.5/32 -g nf-tw-")
    assert to_wl[1:] == (
        "-d 10.244.0.6/32 -j RETURN",
        '-d 10.244.0.0/24 -m comment --comment "netfence ingress to unknown workload" -j DROP',
    )
    assert from_wl == (  # neither has an egress policy: both return; the rest of the CIDR is dropped
        "-s 10.244.0.5/32 -j RETURN",
        "-s 10.244.0.6/32 -j RETURN",
        '-s 10.244.0.0/24 -m comment --comment "netfence egress from unknown workload" -j DROP',
    )
    # each family drops only its own CIDRs
    assert ruleset.chains["v6"][TO_WL_CHAIN][-1] == (
        '-d fd00:0:0:1::/64 -m comment --comment "netfence ingress to unknown workload" -j DROP')
    assert not any("10.244." in r for r in ruleset.chains["v6"][TO_WL_CHAIN])


def test_an_empty_model_drops_the_whole_cidr() -> None:
    ruleset = render(NodeModel("node-1", {}, {}, {}), features=Features(ipv6=False, workload_cidrs=CIDRS[:1]))
    assert ruleset.chains["v4"][TO_WL_CHAIN] == (
        '-d 10.244.0.0/24 -m comment --comment "netfence ingress to unknown workload" -j DROP',)


def test_incremental_rendering_agrees_as_pods_become_known() -> None:
    features = Features(workload_cidrs=CIDRS)
    renderer = IncrementalRenderer(features)
    model = NodeModel("node-1", {}, {}, {})
    assert renderer.render(model) == render(model, features=features)
    model = _model()
    assert renderer.render(model) == render(model, features=features)
    known = endpoint("ns/new", "10.244.0.7")
    model = NodeModel("node-1", {**model.endpoints, known.key: known}, model.policies, model.sets)
    got = renderer.render(model)
    assert got == render(model, features=features)
    assert "-d 10.244.0.7/32 -j RETURN" in got.chains["v4"][TO_WL_CHAIN]
    assert renderer.full_renders == 0
