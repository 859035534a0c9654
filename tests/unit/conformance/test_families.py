"""IP families of conformance runs: placeholder expansion per family, family selection, dual cell results."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from netfence_lab.conformance.families import (
    PlaceholderError,
    expand,
    family_of,
    ipv6_length,
    parse_mode,
    placeholder_pins,
    pod_addresses,
    primary_family,
    probe_families,
)
from netfence_lab.conformance.runner import (
    ScenarioResult,
    ScenarioRun,
    StepResult,
    bed_families,
    expected_addresses,
    judge_families,
    pinned_families,
    write_json,
)
from netfence_lab.conformance.scenario import ScenarioError, parse_scenario

ADDRESSES: dict[str, dict[Any, str]] = {
    "x/a": {"ipv4": "10.244.1.11", "ipv6": "fd00:10:244:1::b"},
    "x/b": {"ipv4": "10.244.0.10", "ipv6": "fd00:10:244::a"},
    "y/v4only": {"ipv4": "10.244.2.10"},
}


def test_modes_select_families() -> None:
    assert [probe_families(parse_mode(m)) for m in ("ipv4", "ipv6", "dual")] == [
        ("ipv4",), ("ipv6",), ("ipv4", "ipv6")]
    assert [primary_family(m) for m in ("ipv4", "ipv6", "dual")] == ["ipv4", "ipv6", "ipv4"]
    with pytest.raises(ValueError, match="expected one of ipv4, ipv6, dual"):
        parse_mode("inet6")
    assert (family_of("10.0.0.1"), family_of("fd00::1")) == ("ipv4", "ipv6")


def test_ipv6_length_keeps_the_same_pods() -> None:
    """For every IPv4 length, the mapped IPv6 network of a pod holds exactly the pods the IPv4 one holds."""
    assert [ipv6_length(n) for n in (0, 8, 16, 23, 24, 30, 31, 32)] == [0, 24, 48, 63, 64, 126, 127, 128]
    pods = [expected_addresses(node, k, ("ipv4", "ipv6")) for node in range(0, 6) for k in range(0, 24)]
    pods += [expected_addresses(node, k, ("ipv4", "ipv6")) for node in (15, 16, 200) for k in (0, 7, 200)]
    for length in range(33):
        for v4, v6 in pods[::7]:
            net4 = ipaddress.ip_network(f"{v4}/{length}", strict=False)
            net6 = ipaddress.ip_network(f"{v6}/{ipv6_length(length)}", strict=False)
            assert [ipaddress.ip_address(a) in net4 for a, _ in pods] == [
                ipaddress.ip_address(b) in net6 for _, b in pods], (length, v4)
    with pytest.raises(ValueError):
        ipv6_length(33)


def test_expected_addresses_follow_the_format_in_both_families() -> None:
    assert expected_addresses(1, 1, ("ipv4",)) == ("10.244.1.11",)
    assert expected_addresses(1, 1, ("ipv4", "ipv6")) == ("10.244.1.11", "fd00:10:244:1::b")
    assert expected_addresses(12, 0, ("ipv6", "ipv4")) == ("fd00:10:244:c::a", "10.244.12.10")


SHARED_STYLE = yaml.safe_load("""
ingress:
  - from:
      - ipBlock: {cidr: "${cidr:x/a/24}", except: ["${ip:x/b}/32", "${cidr:x/a/31}"]}
      - podSelector: {}
    ports: [{port: 80}]
note: "${ip:x/a}"
""")


def test_ipv4_expansion_is_the_shared_formats() -> None:
    out = expand(SHARED_STYLE, ADDRESSES, "ipv4")
    assert out["ingress"][0]["from"][0] == {
        "ipBlock": {"cidr": "10.244.1.0/24", "except": ["10.244.0.10/32", "10.244.1.10/31"]}}
    assert out["note"] == "10.244.1.11"
    assert out["ingress"][0]["from"][1] == {"podSelector": {}}


def test_ipv6_expansion_maps_lengths_to_the_same_pods() -> None:
    out = expand(SHARED_STYLE, ADDRESSES, "ipv6")
    assert out["ingress"][0]["from"][0] == {
        "ipBlock": {"cidr": "fd00:10:244:1::/64", "except": ["fd00:10:244::a/128", "fd00:10:244:1::a/127"]}}
    assert out["note"] == "fd00:10:244:1::b"


def test_dual_expansion_writes_each_ip_block_peer_once_per_family() -> None:
    out = expand(SHARED_STYLE, ADDRESSES, "dual")
    peers = out["ingress"][0]["from"]
    assert peers == [
        {"ipBlock": {"cidr": "10.244.1.0/24", "except": ["10.244.0.10/32", "10.244.1.10/31"]}},
        {"ipBlock": {"cidr": "fd00:10:244:1::/64", "except": ["fd00:10:244::a/128", "fd00:10:244:1::a/127"]}},
        {"podSelector": {}},
    ]
    assert out["ingress"][0]["ports"] == [{"port": 80}]
    assert out["note"] == "10.244.1.11"  # not in a list: the primary family
    # strings in lists (e.g. a list of networks) are written once per family, in place
    assert expand({"networks": ["${cidr:x/a/24}", "192.0.2.0/24"]}, ADDRESSES, "dual") == {
        "networks": ["10.244.1.0/24", "fd00:10:244:1::/64", "192.0.2.0/24"]}


def test_pinned_placeholders_ignore_the_mode() -> None:
    doc = {"from": [{"ipBlock": {"cidr": "${cidr4:x/a/0}", "except": ["${cidr4:x/b/32}"]}},
                    {"ipBlock": {"cidr": "${cidr6:x/a/64}", "except": ["${ip6:x/a}/128"]}}],
           "a": "${ip4:x/a}"}
    want = {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.10/32"]}},
                     {"ipBlock": {"cidr": "fd00:10:244:1::/64", "except": ["fd00:10:244:1::b/128"]}}],
            "a": "10.244.1.11"}
    for mode in ("ipv4", "ipv6", "dual"):
        assert expand(doc, ADDRESSES, mode) == want, mode
    assert placeholder_pins(doc) == {"ipv4", "ipv6"}
    assert placeholder_pins(SHARED_STYLE) == set()


@pytest.mark.parametrize(("text", "mode", "message"), [
    ("${cidr6:y/v4only/64}", "ipv4", r"placeholder \$\{cidr6:y/v4only/64\}: pod y/v4only has no IPv6 address"),
    ("${cidr:y/v4only/24}", "ipv6", r"pod y/v4only has no IPv6 address \(it has ipv4\)"),
    ("${ip:y/v4only}", "dual", None),  # not in a list: the primary (IPv4) address, which it has
    ("${ip:x/zz}", "ipv4", r"placeholder \$\{ip:x/zz\}: no such pod 'x/zz'"),
    ("${cidr:x/a/33}", "ipv4", r"expected a prefix length from 0 to 32 for IPv4, got '33'"),
    ("${cidr:x/a/64}", "ipv6", r"0 to 32 for IPv4, got '64'"),  # unpinned lengths are IPv4 lengths
    ("${cidr6:x/a/129}", "ipv4", r"0 to 128 for IPv6, got '129'"),
    ("${ip:x/a}/40", "ipv6", r"placeholder \$\{ip:x/a\}/40: expected a prefix length from 0 to 32"),
    ("${cidr:x/a}", "ipv4", r"placeholder \$\{cidr:x/a\}: expected NS/POD/LEN|no such pod"),
])
def test_bad_placeholders_are_one_line_errors(text: str, mode: Any, message: str | None) -> None:
    if message is None:
        assert expand(text, ADDRESSES, mode) == "10.244.2.10"
        return
    with pytest.raises(PlaceholderError, match=message) as info:
        expand({"spec": [text]}, ADDRESSES, mode)
    assert isinstance(info.value, ScenarioError) and "\n" not in str(info.value)


def test_dual_needs_both_families_of_every_pod_in_an_ip_block() -> None:
    with pytest.raises(PlaceholderError, match="pod y/v4only has no IPv6 address"):
        expand([{"ipBlock": {"cidr": "${ip:y/v4only}/32"}}], ADDRESSES, "dual")


def test_pod_addresses_by_family() -> None:
    handles = {"x/a": SimpleNamespace(ips=("fd00:10:244::a", "10.244.0.10")), "x/b": SimpleNamespace(ips=("10.0.0.1",))}
    assert pod_addresses(handles) == {"x/a": {"ipv6": "fd00:10:244::a", "ipv4": "10.244.0.10"},
                                      "x/b": {"ipv4": "10.0.0.1"}}


# --- judging cells over several families ----------------------------------------------

A_B, B_A = ("n/a", "n/b"), ("n/b", "n/a")


def test_dual_cell_must_hold_on_both_and_names_the_failing_family(tmp_path: Path) -> None:
    expected = {A_B: False, B_A: True}
    result = judge_families(80, "TCP", expected, {"ipv4": {A_B: False, B_A: True}, "ipv6": {A_B: True, B_A: True}})
    assert not result.passed and result.status == "failed"
    assert result.wrong == [A_B] and result.wrong_by_family == {"ipv4": [], "ipv6": [A_B]}
    assert result.wrong_families(A_B) == ["ipv6"] and result.family_note(A_B) == " over ipv6"
    assert result.observed == {A_B: True, B_A: True}  # the failing family's observation
    assert result.observed_by_family["ipv4"] == {A_B: False, B_A: True}

    both = judge_families(80, "TCP", expected, {"ipv4": {A_B: True, B_A: False}, "ipv6": {A_B: True, B_A: True}})
    assert both.wrong == [A_B, B_A] and both.family_note(A_B) == " over ipv4 and ipv6"
    assert both.family_note(B_A) == " over ipv4"

    ok = judge_families(80, "TCP", expected, {"ipv4": {A_B: False, B_A: True}, "ipv6": {A_B: False, B_A: True}})
    assert ok.passed and ok.status == "passed" and ok.wrong == []

    single = judge_families(80, "TCP", expected, {"ipv4": {A_B: True, B_A: True}})
    assert single.family_note(A_B) == ""  # IPv4 only: the shared format's wording

    write_json([ScenarioResult("s", "s.yaml", "failed", [StepResult(0, False, 0.1, [result, single])])],
               tmp_path / "r.json")
    expects = json.loads((tmp_path / "r.json").read_text())["scenarios"][0]["steps"][0]["expect"]
    assert [(e["families"], e["wrong"]) for e in expects] == [
        (["ipv4", "ipv6"], ["n/a -> n/b over ipv6"]), (["ipv4"], ["n/a -> n/b"])]


def test_sctp_without_kernel_support_stays_skipped_over_both_families() -> None:
    none = {A_B: None, B_A: None}
    result = judge_families(132, "SCTP", {A_B: True, B_A: False}, {"ipv4": none, "ipv6": dict(none)})
    assert result.passed and result.skipped and result.status == "skipped"


def test_judge_families_needs_a_family() -> None:
    with pytest.raises(ValueError, match="no family"):
        judge_families(80, "TCP", {}, {})


# --- the runner's family choices ---------------------------------------------------------

PINNED: dict[str, Any] = {
    "name": "pinned",
    "nodes": 1,
    "pods": [{"namespace": "n", "name": n, "ports": ["80/TCP"]} for n in ("a", "b")],
    "steps": [{"expect": [
        {"port": 80, "table": "-   n/a n/b\nn/a .   X\nn/b .   .\n"},
        {"port": 80, "family": "ipv6", "table": "-   n/a n/b\nn/a .   .\nn/b .   .\n"},
    ]}],
}


class AnsweringProber:
    """Answers each probe from a table by destination address; records what it was asked."""

    def __init__(self, answers: dict[str, bool]) -> None:
        self.answers = answers
        self.asked: list[Any] = []

    def probe_many(self, probes: Any, timeout: float = 1.0, **_: Any) -> dict[Any, bool | None]:
        todo = list(dict.fromkeys(probes))
        self.asked += todo
        return {p: self.answers[p.dst_ip] for p in todo}


def pinned_run(mode: Any) -> tuple[ScenarioRun, AnsweringProber]:
    scenario = parse_scenario(PINNED, Path("pinned.yaml"))
    pods = {"n/a": SimpleNamespace(netns="ns-a", ips=("10.0.0.1", "fd00::1")),
            "n/b": SimpleNamespace(netns="ns-b", ips=("10.0.0.2", "fd00::2"))}
    env: Any = SimpleNamespace(kubelet=SimpleNamespace(pods=pods))
    # IPv4 n/a -> n/b is denied as the table says; IPv6 is open both ways.
    prober = AnsweringProber({"10.0.0.2": False, "10.0.0.1": True, "fd00::2": True, "fd00::1": True})
    run = ScenarioRun(scenario, env, prober, 1.0, lambda _: None, Path("unused"), ip_family=mode)  # type: ignore[arg-type]
    return run, prober


def test_family_selection_per_table_and_mode() -> None:
    for mode, families, asked in (
        ("ipv4", [("ipv4",), ("ipv6",)], {"10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"}),
        ("ipv6", [("ipv6",), ("ipv6",)], {"fd00::1", "fd00::2"}),
        ("dual", [("ipv4", "ipv6"), ("ipv6",)], {"10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"}),
    ):
        run, prober = pinned_run(mode)
        unpinned, pinned = run.probe_step(list(run.scenario.steps[0].expect))
        assert [unpinned.families, pinned.families] == families, mode
        assert {p.dst_ip for p in prober.asked} == asked, mode
        assert pinned.passed
        # the unpinned table wants n/a -> n/b denied: true over IPv4, not over IPv6
        assert unpinned.passed == (mode == "ipv4"), mode
        assert unpinned.wrong_by_family.get("ipv6", []) == ([] if mode == "ipv4" else [A_B]), mode


def test_a_table_over_a_family_the_pods_lack_is_one_line_error() -> None:
    run, _ = pinned_run("ipv4")
    pods: Any = run.env.kubelet.pods  # type: ignore[union-attr]
    pods["n/b"] = SimpleNamespace(netns="ns-b", ips=("10.0.0.2",))
    with pytest.raises(ScenarioError, match=r"table for 80/TCP over ipv6: pods \['n/b'\] have no IPv6 address"):
        run.probe_step(list(run.scenario.steps[0].expect))


def test_bed_families() -> None:
    pinned = parse_scenario(PINNED, Path("pinned.yaml"))
    plain = parse_scenario({**PINNED, "steps": [{"expect": [PINNED["steps"][0]["expect"][0]]}]}, Path("p.yaml"))
    by_placeholder = parse_scenario({**PINNED, "steps": [{"actions": [{"apply": {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"},
        "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "${cidr6:n/a/128}"}}]}]}}}]}]}, Path("q.yaml"))
    assert pinned_families(pinned) == {"ipv6"} and pinned_families(plain) == set()
    assert pinned_families(by_placeholder) == {"ipv6"}
    assert bed_families(plain, "ipv4") == ("ipv4",)  # the shared format's IPv4-only bed, as before
    assert bed_families(pinned, "ipv4") == ("ipv4", "ipv6")
    assert bed_families(by_placeholder, "ipv4") == ("ipv4", "ipv6")
    assert bed_families(plain, "ipv6") == ("ipv6", "ipv4")
    assert bed_families(plain, "dual") == ("ipv4", "ipv6")


def test_expectation_family_is_validated() -> None:
    bad = {**PINNED, "steps": [{"expect": [{**PINNED["steps"][0]["expect"][0], "family": "inet6"}]}]}
    with pytest.raises(ScenarioError, match=r"steps\[0\]\.expect\[0\]\.family: expected ipv4 or ipv6, got 'inet6'"):
        parse_scenario(bad, Path("bad.yaml"))
