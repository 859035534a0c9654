"""The compiled-model evaluator, on hand-written desired states."""

from __future__ import annotations

from typing import Any

import pytest

from netfence.model.evaluate import CompiledState, is_allowed


def policy(name: str, ingress: Any = None, egress: Any = None) -> dict[str, Any]:
    return {"schema": 1, "namespace": "x", "name": name, "uid": "", "ingress": ingress, "egress": egress}


def endpoint(name: str, ips: list[str], ingress: list[str], egress: list[str]) -> dict[str, Any]:
    return {"schema": 1, "node": "n0", "namespace": "x", "name": name, "ips": ips, "ingress": ingress, "egress": egress}


def peer_set(sid: str, kind: str, members: list[str]) -> dict[str, Any]:
    return {"schema": 1, "id": sid, "kind": kind, "definition": {}, "members": members}


def rule(peers: list[str] | None = None, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"peers": peers, "ports": ports}


A, B, C = "10.244.0.10", "10.244.0.11", "10.244.1.10"


def test_unknown_addresses_and_unlisted_directions_are_unrestricted() -> None:
    state = {
        "policies/x/deny": policy("deny", ingress=[]),
        "endpoints/n0/x/a": endpoint("a", [A], ["x/deny"], []),
    }
    assert not is_allowed(state, B, A, 80, "TCP")
    assert is_allowed(state, A, B, 80, "TCP")  # a has no egress policy
    assert is_allowed(state, B, C, 80, "TCP")  # neither is an endpoint
    assert is_allowed({}, A, B, 80, "UDP")


def test_both_egress_and_ingress_must_allow() -> None:
    state = {
        "policies/x/out": policy("out", egress=[rule(ports=[{"protocol": "TCP", "port": 80}])]),
        "policies/x/in": policy("in", ingress=[rule(ports=[{"protocol": "TCP", "port": 81}])]),
        "endpoints/n0/x/a": endpoint("a", [A], [], ["x/out"]),
        "endpoints/n0/x/b": endpoint("b", [B], ["x/in"], []),
    }
    assert not is_allowed(state, A, B, 80, "TCP")  # ingress of b denies 80
    assert not is_allowed(state, A, B, 81, "TCP")  # egress of a denies 81
    assert is_allowed(state, A, C, 80, "TCP")
    assert is_allowed(state, C, B, 81, "TCP")
    assert not is_allowed(state, C, B, 81, "UDP")


def test_rules_of_all_listed_policies_are_ored() -> None:
    state = {
        "policies/x/p1": policy("p1", ingress=[rule(ports=[{"protocol": "TCP", "port": 80}])]),
        "policies/x/p2": policy("p2", ingress=[rule(ports=[{"protocol": "UDP"}])]),
        "endpoints/n0/x/a": endpoint("a", [A], ["x/p1", "x/p2"], []),
    }
    assert is_allowed(state, B, A, 80, "TCP")
    assert is_allowed(state, B, A, 5353, "UDP")
    assert not is_allowed(state, B, A, 81, "TCP")


def test_port_ranges_are_inclusive() -> None:
    state = {
        "policies/x/p": policy("p", ingress=[rule(ports=[{"protocol": "TCP", "port": 1000, "endPort": 2000}])]),
        "endpoints/n0/x/a": endpoint("a", [A], ["x/p"], []),
    }
    allowed = CompiledState(state)
    assert [allowed.allows(B, A, p, "TCP") for p in (999, 1000, 1500, 2000, 2001)] == [
        False,
        True,
        True,
        True,
        False,
    ]


def test_pods_sets_match_by_address_including_ipv6() -> None:
    state = {
        "policies/x/p": policy("p", ingress=[rule(peers=["pb"])]),
        "sets/pb": peer_set("pb", "pods", [B, "fd00::b"]),
        "endpoints/n0/x/a": endpoint("a", [A, "fd00::a"], ["x/p"], []),
    }
    assert is_allowed(state, B, A, 80, "TCP")
    assert is_allowed(state, "fd00:0::b", "fd00::a", 80, "TCP")
    assert not is_allowed(state, C, A, 80, "TCP")


@pytest.mark.parametrize(
    ("members", "address", "expected"),
    [
        (["10.0.0.0/8", "!10.1.0.0/16"], "10.2.0.1", True),
        (["10.0.0.0/8", "!10.1.0.0/16"], "10.1.0.1", False),
        (["10.0.0.0/8", "!10.1.0.0/16", "10.1.2.0/24"], "10.1.2.3", True),  # more specific match wins
        (["10.0.0.0/8", "!10.1.0.0/16", "10.1.2.0/24"], "10.1.3.3", False),
        (["!10.1.0.0/16"], "10.1.0.1", False),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["0.0.0.0/0"], "fd00::1", False),  # families never mix
        (["::/0", "!fd00::/64"], "fd00::1", False),
        (["::/0", "!fd00::/64"], "fd01::1", True),
    ],
)
def test_net_sets_follow_ipset_nomatch_semantics(members: list[str], address: str, expected: bool) -> None:
    state = {
        "policies/x/p": policy("p", egress=[rule(peers=["n1"])]),
        "sets/n1": peer_set("n1", "net", members),
        "endpoints/n0/x/a": endpoint("a", [A], [], ["x/p"]),
    }
    assert is_allowed(state, A, address, 80, "TCP") is expected


def test_named_port_sets_match_destination_address_protocol_and_port() -> None:
    state = {
        "policies/x/in": policy("in", ingress=[rule(ports=[{"protocol": "TCP", "namedSet": "qh"}])]),
        "policies/x/out": policy("out", egress=[rule(ports=[{"protocol": "TCP", "namedSet": "qh"}])]),
        "sets/qh": peer_set("qh", "ports", [f"{A},tcp:80", f"{C},tcp:8080", "fd00::a,tcp:80"]),
        "endpoints/n0/x/a": endpoint("a", [A, "fd00::a"], ["x/in"], []),
        "endpoints/n0/x/b": endpoint("b", [B], [], ["x/out"]),
    }
    assert is_allowed(state, C, A, 80, "TCP")
    assert is_allowed(state, "fd00::c", "fd00::a", 80, "TCP")
    assert not is_allowed(state, C, A, 8080, "TCP")
    assert not is_allowed(state, C, A, 80, "UDP")
    assert is_allowed(state, B, C, 8080, "TCP")  # egress: C declares http=8080
    assert not is_allowed(state, B, C, 80, "TCP")


def test_empty_peer_or_port_lists_never_match() -> None:
    state = {
        "policies/x/p": policy("p", ingress=[rule(peers=[]), rule(ports=[])]),
        "endpoints/n0/x/a": endpoint("a", [A], ["x/p"], []),
    }
    assert not is_allowed(state, B, A, 80, "TCP")
