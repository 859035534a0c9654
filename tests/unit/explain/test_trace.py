"""The explain evaluator (pure): verdicts, the allowing rule, nearest-miss texts — table-driven."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from tests.unit.explain.worlds import Obj, connection, node_models, policy

from netfence.dataplane.render import Features
from netfence.explain.trace import (
    Connection,
    DirectionTrace,
    Party,
    applicable_directions,
    describe_selector,
    trace_connection,
    verdict,
)


def ingress(target: dict[str, str], rules: list[Obj], ns: str = "x", name: str = "p") -> Obj:
    return policy(ns, name, {"podSelector": {"matchLabels": target}, "ingress": rules})


def egress(target: dict[str, str], rules: list[Obj], ns: str = "x", name: str = "e") -> Obj:
    return policy(ns, name, {"podSelector": {"matchLabels": target}, "policyTypes": ["Egress"], "egress": rules})


A = {"pod": "a"}
FROM_B_80 = {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}


@dataclass(frozen=True)
class Case:
    id: str
    policies: list[Obj]
    src: str
    dst: str
    port: int = 80
    protocol: str = "TCP"
    allowed: bool = True
    # per direction: (direction, isolated, allowed, "policy#rule peer|port" or None, nearest-miss summary or None)
    directions: tuple[tuple[str, bool, bool, str | None, str | None], ...] = ()
    features: dict[str, Features] | None = None


def match_text(trace: DirectionTrace) -> str | None:
    m = trace.match
    return None if m is None else f"{m.policy}#{m.rule} {m.peer}|{m.port}"


CASES = [
    Case("no policy: nothing isolated", [], "x/b", "x/a",
         directions=(("egress", False, True, None, None), ("ingress", False, True, None, None))),
    Case("deny all ingress", [ingress(A, [])], "x/b", "x/a", allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None, "policy x/p: it has no ingress rules (denies all ingress)"))),
    Case("allowed by podSelector and port", [ingress(A, [FROM_B_80])], "x/b", "x/a",
         directions=(("egress", False, True, None, None),
                     ("ingress", True, True, "x/p#0 podSelector pod=b in namespace x|TCP 80", None))),
    Case("port not in the rule", [ingress(A, [FROM_B_80])], "x/b", "x/a", port=81, allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None, "policy x/p ingress rule 0: port 81 is not in [80]"))),
    Case("protocol not in the rule", [ingress(A, [FROM_B_80])], "x/b", "x/a", protocol="UDP", allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None, "policy x/p ingress rule 0: protocol UDP is not in [TCP 80]"))),
    Case("podSelector peer from another namespace", [ingress(A, [FROM_B_80])], "y/a", "x/a", allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None,
                      "policy x/p ingress rule 0: namespace y is not x (a podSelector without namespaceSelector "
                      "selects pods of the policy's namespace only)"))),
    Case("pod labels do not match", [ingress(A, [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}])],
         "x/b", "x/a", allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None,
                      "policy x/p ingress rule 0: pod x/b labels pod=b do not match podSelector pod=c"))),
    Case("namespaceSelector does not match",
         [ingress(A, [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}])], "y/a", "x/a",
         allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None,
                      "policy x/p ingress rule 0: namespace y does not match namespaceSelector team=blue"))),
    Case("namespaceSelector matches", [ingress(A, [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "team", "operator": "In", "values": ["red", "blue"]}]}}]}])], "y/a", "x/a",
         directions=(("egress", False, True, None, None),
                     ("ingress", True, True, "x/p#0 namespaceSelector team in (blue,red)|any port", None))),
    Case("both failing: peer and port", [ingress(A, [FROM_B_80])], "y/a", "x/a", port=81, allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None,
                      "policy x/p ingress rule 0: namespace y is not x (a podSelector without namespaceSelector "
                      "selects pods of the policy's namespace only) and port 81 is not in [80]"))),
    Case("nearest miss is the rule with fewer failing parts",
         [ingress(A, [FROM_B_80, {"from": [{"namespaceSelector": {}}], "ports": [{"port": 443}]}])],
         "y/a", "x/a", port=8443, allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None, "policy x/p ingress rule 1: port 8443 is not in [443]"))),
    Case("second policy allows (rules of all policies are ORed)",
         [ingress(A, [FROM_B_80], name="p1"), ingress(A, [{"ports": [{"port": 80}]}], name="p2")], "y/a", "x/a",
         directions=(("egress", False, True, None, None),
                     ("ingress", True, True, "x/p2#0 any peer|TCP 80", None))),
    Case("port range", [ingress(A, [{"ports": [{"port": 8000, "endPort": 8080}]}])], "x/b", "x/a", port=9000,
         allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None, "policy x/p ingress rule 0: port 9000 is not in [8000-8080]"))),
    Case("named port allows", [ingress(A, [{"ports": [{"port": "http"}]}])], "x/b", "x/a",
         directions=(("egress", False, True, None, None),
                     ("ingress", True, True, "x/p#0 any peer|TCP port named http", None))),
    Case("named port does not match", [ingress(A, [{"ports": [{"port": "http"}]}])], "x/b", "x/a", port=81,
         allowed=False,
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None,
                      "policy x/p ingress rule 0: port 81 is not in [http] "
                      "(x/a (10.244.0.10) declares http/TCP as 80)"))),
    Case("egress ipBlock: outside the cidr", [egress(A, [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}])],
         "x/a", "192.168.1.1", allowed=False,
         directions=(("egress", True, False, None,
                      "policy x/e egress rule 0: 192.168.1.1 is not in ipBlock 10.0.0.0/8"),)),
    Case("egress ipBlock: in an except",
         [egress(A, [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}]}])],
         "x/a", "y/a", allowed=False,
         directions=(("egress", True, False, None,
                      "policy x/e egress rule 0: 10.244.1.10 is in except 10.244.0.0/16 of ipBlock 10.0.0.0/8"),
                     ("ingress", False, True, None, None))),
    Case("egress ipBlock allows",
         [egress(A, [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}]}])],
         "x/a", "10.1.2.3",
         directions=(("egress", True, True, "x/e#0 ipBlock 10.0.0.0/8 except 10.244.0.0/16|any port", None),)),
    Case("an address is no pod for a podSelector", [ingress(A, [FROM_B_80])], "192.168.1.1", "x/a",
         allowed=False,
         directions=(("ingress", True, False, None,
                      "policy x/p ingress rule 0: 192.168.1.1 is not a pod's address "
                      "(podSelector pod=b in namespace x selects pods)"),)),
    Case("egress denies although ingress allows",
         [egress({"pod": "b"}, [{"ports": [{"port": 53, "protocol": "UDP"}]}]), ingress(A, [FROM_B_80])],
         "x/b", "x/a", allowed=False,
         directions=(("egress", True, False, None, "policy x/e egress rule 0: protocol TCP is not in [UDP 53]"),
                     ("ingress", True, True, "x/p#0 podSelector pod=b in namespace x|TCP 80", None))),
    Case("SCTP ports on a node that cannot match them", [ingress(A, [{"ports": [{"port": 80, "protocol": "SCTP"}]}])],
         "x/b", "x/a", protocol="SCTP", allowed=False, features={"n0": Features(sctp_port_match=False)},
         directions=(("egress", False, True, None, None),
                     ("ingress", True, False, None,
                      "policy x/p ingress rule 0: port 80 is not in [80] (node n0 cannot match SCTP ports "
                      "(sctp-port-match): those rules match nothing there)"))),
    Case("SCTP ports where the kernel matches them", [ingress(A, [{"ports": [{"port": 80, "protocol": "SCTP"}]}])],
         "x/b", "x/a", protocol="SCTP",
         directions=(("egress", False, True, None, None), ("ingress", True, True, "x/p#0 any peer|SCTP 80", None))),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_trace(case: Case) -> None:
    models = node_models(case.policies)
    conn = connection(case.src, case.dst, case.port, case.protocol)  # type: ignore[arg-type]
    traces = trace_connection(models, conn, case.features)
    got = tuple((t.direction, t.isolated, t.allowed, match_text(t),
                 None if t.nearest is None else t.nearest.describe(t.direction)) for t in traces)
    assert got == case.directions
    assert verdict(traces) is case.allowed


def test_isolating_policies_are_listed_in_chain_order() -> None:
    models = node_models([ingress(A, [], name="z-deny"), ingress(A, [FROM_B_80], name="a-allow")])
    [_, trace] = trace_connection(models, connection("x/b", "x/a", 81))
    assert trace.policies == ("x/a-allow", "x/z-deny")
    assert trace.nearest is not None and trace.nearest.policy == "x/a-allow"  # a rule beats "no rules"
    assert trace.reason == "no rule of the isolating policies matches"


def test_a_policy_missing_from_the_model_allows_nothing() -> None:
    models = node_models([ingress(A, [{}])])
    model = models["n0"]
    del model.policies["x/p"]
    [_, trace] = trace_connection(models, connection("x/b", "x/a"))
    assert not trace.allowed
    assert any("missing from the committed model" in n for n in trace.notes)


def test_a_peer_that_matches_but_is_not_committed_yet() -> None:
    models = node_models([ingress(A, [FROM_B_80])])
    newcomer = Party("10.244.0.99", "x", "new", "n0", {"pod": "b"}, {"ns": "x"})
    [_, trace] = trace_connection(models, Connection(newcomer, connection("x/b", "x/a").dst, 80, "TCP"))
    assert trace.nearest is not None
    assert "x/new matches podSelector pod=b in namespace x but its address 10.244.0.99 is not in" in trace.nearest.text


def test_only_pods_with_a_node_have_directions() -> None:
    assert applicable_directions(connection("x/a", "192.168.1.1")) == ["egress"]
    assert applicable_directions(connection("192.168.1.1", "x/a")) == ["ingress"]
    assert applicable_directions(Connection(Party("1.1.1.1"), Party("2.2.2.2"), 80, "TCP")) == []


@pytest.mark.parametrize(("selector", "text"), [
    (None, "{}"),
    ({"matchLabels": {}, "matchExpressions": []}, "{}"),
    ({"matchLabels": {"b": "2", "a": "1"}}, "a=1,b=2"),
    ({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["x", "y"]},
                           {"key": "e", "operator": "Exists"}, {"key": "d", "operator": "DoesNotExist"}]},
     "k notin (x,y),e,!d"),
])
def test_selectors_are_spelled_like_kubectl(selector: Any, text: str) -> None:
    assert describe_selector(selector) == text
