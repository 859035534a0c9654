"""The dataplane against a real kernel: a node namespace forwarding between pod namespaces."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from dataplane_topology import Topology, tcp_ok, udp_ok

from netfence.dataplane.apply import ApplyError, Dataplane
from netfence.dataplane.kernel import parse_ipset_save, parse_iptables_save
from netfence.dataplane.names import endpoint_chain, policy_chain, set_name
from netfence.dataplane.pins import PinCache, PinKey
from netfence.dataplane.render import render
from netfence.dataplane.ruleset import Family, Ruleset, is_owned_chain, is_owned_set
from netfence.dataplane.runner import RecordingRunner, Result, SubprocessRunner
from netfence.model.enforcement import (
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
    PeerSet,
    SetKind,
)

pytestmark = pytest.mark.netns

A4, B4, C4 = "10.244.0.10", "10.244.0.11", "10.244.0.12"
A6, B6, C6 = "fd00::a", "fd00::b", "fd00::c"
IPS = {"a": (A4, A6), "b": (B4, B6), "c": (C4, C6)}
TOOLS: tuple[tuple[Family, str], ...] = (("v4", "iptables"), ("v6", "ip6tables"))


# ---- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology(["a", "b", "c"])
    try:
        yield t
    finally:
        t.close()
    assert t.leftovers() == []


@pytest.fixture
def node(topo: Topology) -> Iterator[Topology]:
    topo.reset_netfilter()
    yield topo
    topo.reset_netfilter()


@pytest.fixture
def rec(node: Topology) -> RecordingRunner:
    return RecordingRunner(SubprocessRunner(node.node))


@pytest.fixture
def dp(rec: RecordingRunner) -> Dataplane:
    return Dataplane(rec, ipv6=True)


# ---- models ------------------------------------------------------------------


def pset(kind: SetKind, name: str, *members: str) -> PeerSet:
    return PeerSet(PeerSet.make_id(kind, {"n": name}), kind, {"n": name}, tuple(sorted(members)))


def model(
    policies: Sequence[CompiledPolicy], sets: Sequence[PeerSet], **selected: tuple[tuple[str, ...], tuple[str, ...]]
) -> NodeModel:
    """``selected``: pod name -> (ingress policy keys, egress policy keys); every pod is an endpoint."""
    eps = {}
    for pod, ips in IPS.items():
        ingress, egress = selected.get(pod, ((), ()))
        eps[f"default/{pod}"] = Endpoint("node", "default", pod, ips, ingress, egress)
    return NodeModel("node", eps, {p.key: p for p in policies}, {s.id: s for s in sets})


def ingress_policy(name: str, peers: tuple[str, ...] | None, ports: tuple[CompiledPort, ...] | None) -> CompiledPolicy:
    return CompiledPolicy("default", name, name, (CompiledRule(peers, ports),), None)


FRONTEND = pset("pods", "frontend", B4, B6)


def web_model(port: int = 80, frontend: PeerSet = FRONTEND) -> NodeModel:
    """a accepts TCP and UDP ``port`` from the frontend set only; nothing else isolated."""
    allow = ingress_policy("allow-frontend", (frontend.id,), (CompiledPort("TCP", port), CompiledPort("UDP", port)))
    return model([allow], [frontend], a=(("default/allow-frontend",), ()))


# ---- probes and kernel reads ---------------------------------------------------


def check(topo: Topology, cases: list[tuple[str, str, str, int, bool]]) -> None:
    """cases: (proto, source pod name or "node", destination IP, port, expected); probed in parallel."""

    def one(case: tuple[str, str, str, int, bool]) -> bool:
        proto, src, dst, port, _ = case
        netns = topo.node if src == "node" else topo.pods[src].netns
        return (tcp_ok if proto == "tcp" else udp_ok)(netns, dst, port)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, cases))
    wrong = [case for case, ok in zip(cases, got, strict=True) if ok != case[4]]
    assert wrong == [], f"unexpected outcomes (expected value shown): {wrong}"


def drop_packets(topo: Topology, chain: str, tool: str = "iptables") -> int:
    listing = topo.node_sh(tool, "-w", "-L", chain, "-v", "-x", "-n")
    (line,) = [ln for ln in listing.splitlines() if " DROP " in ln and "denied" in ln]
    return int(line.split()[0])


def kernel_tables(topo: Topology, tool: str = "iptables") -> dict[str, tuple[str, ...]]:
    return parse_iptables_save(topo.node_sh(f"{tool}-save", "-t", "filter")).chains


def forward_rules(topo: Topology, tool: str = "iptables") -> list[str]:
    return [ln for ln in topo.node_sh(tool, "-w", "-S", "FORWARD").splitlines() if ln.startswith("-A")]


def foreign_state(topo: Topology) -> str:
    """Everything in the node's netfilter and ipsets that is not ours."""
    keep = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in topo.node_sh(tool).splitlines():
            parts = line.split(" ")
            if line.startswith("#") or (line.startswith(":") and is_owned_chain(parts[0][1:])):
                continue
            if line.startswith("-A ") and (is_owned_chain(parts[1]) or line == "-A FORWARD -j NETFENCE-FORWARD"):
                continue
            keep.append(re.sub(r"\[\d+:\d+\]", "", line))
    for line in topo.node_sh("ipset", "save").splitlines():
        if not is_owned_set(line.split(" ")[1]):
            keep.append(re.sub(r" initval \S+", "", line))
    return "\n".join(keep)


def add_foreign_state(topo: Topology) -> None:
    for argv in (
        ["ipset", "create", "foreign", "hash:ip"],
        ["ipset", "add", "foreign", "192.0.2.77"],
        ["ipset", "create", "nf-lookalike", "hash:net"],
        ["iptables", "-w", "-N", "FOREIGN"],
        ["iptables", "-w", "-A", "FOREIGN", "-m", "set", "--match-set", "foreign", "src", "-j", "DROP"],
        ["iptables", "-w", "-A", "FORWARD", "-s", "198.51.100.9/32", "-j", "FOREIGN"],
        ["iptables", "-w", "-N", "nf-other"],
        ["iptables", "-w", "-A", "nf-other", "-j", "RETURN"],
        ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "RETURN"],
        ["ip6tables", "-w", "-N", "FOREIGN6"],
        ["ip6tables", "-w", "-A", "FORWARD", "-s", "fd99::99/128", "-j", "FOREIGN6"],
    ):
        topo.node_sh(*argv)


# ---- tests ---------------------------------------------------------------------


def test_allowed_and_denied_tcp_udp_with_rising_drop_counter(node: Topology, dp: Dataplane) -> None:
    desired = render(web_model())
    result = dp.apply(desired)
    assert result.full and result.rules == desired.rule_count and result.sets == 2  # nf4- and nf6-frontend
    chain = endpoint_chain("ingress", "default/a")
    assert drop_packets(node, chain) == 0
    check(
        node,
        [
            ("tcp", "b", A4, 80, True),
            ("udp", "b", A4, 80, True),  # frontend -> a:80
            ("tcp", "b", A6, 80, True),
            ("udp", "b", A6, 80, True),  # ... over IPv6 too
            ("tcp", "c", A4, 80, False),
            ("udp", "c", A4, 80, False),  # not in frontend
            ("tcp", "c", A6, 80, False),
            ("tcp", "b", A4, 81, False),
            ("udp", "b", A4, 81, False),  # wrong port
            ("tcp", "c", B4, 80, True),
            ("udp", "a", C4, 81, True),  # unisolated pods / directions
            ("tcp", "node", A4, 81, True),
            ("tcp", "node", A6, 81, True),  # kubelet probes: not via FORWARD
        ],
    )
    assert drop_packets(node, chain) >= 4
    assert drop_packets(node, chain, "ip6tables") >= 1
    # the kernel spells every rule exactly as rendered (so drift checks compare plain strings)
    for fam, tool in TOOLS:
        assert kernel_tables(node, tool) == desired.family_chains(fam)
    assert forward_rules(node)[0] == "-A FORWARD -j NETFENCE-FORWARD"
    assert not dp.check_drift()


def test_stateful_replies_pass_when_the_reverse_direction_is_denied(node: Topology, dp: Dataplane) -> None:
    allow = ingress_policy("from-b", (FRONTEND.id,), None)
    no_egress = CompiledPolicy("default", "no-egress", "u", None, ())
    dp.apply(render(model([allow, no_egress], [FRONTEND], a=(("default/from-b",), ("default/no-egress",)))))
    check(
        node,
        [
            ("tcp", "b", A4, 80, True),
            ("udp", "b", A4, 80, True),
            ("tcp", "b", A6, 81, True),  # replies flow
            ("tcp", "a", B4, 80, False),
            ("udp", "a", B4, 80, False),
            ("tcp", "a", C6, 80, False),  # a may not start
        ],
    )
    assert drop_packets(node, endpoint_chain("egress", "default/a")) >= 2


def test_named_ports_ipblocks_with_except_and_egress(node: Topology, dp: Dataplane) -> None:
    net = pset("net", "pods-but-c", "10.244.0.0/24", f"!{C4}/32", "fd00::/64", f"!{C6}/128")
    http = pset("ports", "http", f"{B4},tcp:81", f"{B6},tcp:81", f"{C4},udp:81")
    egress = CompiledPolicy("default", "egress", "u", None, (CompiledRule((net.id,), (CompiledPort("TCP", 80, 81),)),))
    named = ingress_policy("named", None, (CompiledPort("TCP", named_set=http.id),))
    m = model([egress, named], [net, http], a=((), ("default/egress",)), b=(("default/named",), ()))
    desired = render(m)
    dp.apply(desired)
    check(
        node,
        [
            ("tcp", "a", B4, 81, True),
            ("tcp", "a", B6, 81, True),  # in the block, named port of b
            ("tcp", "a", B4, 80, False),  # a's egress allows, b's ingress not
            ("tcp", "a", C4, 80, False),
            ("tcp", "a", C6, 80, False),  # except
            ("udp", "a", C4, 81, False),  # block allows TCP only
            ("tcp", "c", B4, 81, True),
            ("tcp", "c", B4, 80, False),  # b: only its named port
            ("udp", "c", B4, 81, False),  # named port is TCP
        ],
    )
    for fam, tool in TOOLS:
        assert kernel_tables(node, tool) == desired.family_chains(fam)
    assert parse_ipset_save(node.node_sh("ipset", "save")) == desired.sets


def test_delta_applies_issue_only_the_expected_commands(node: Topology, dp: Dataplane, rec: RecordingRunner) -> None:
    dp.apply(render(web_model()))
    check(node, [("tcp", "c", A4, 80, False)])

    rec.clear()  # membership: c joins the frontend -> one ipset restore with add lines only
    grown = PeerSet(FRONTEND.id, "pods", FRONTEND.definition, (B4, C4, B6))
    result = dp.apply(render(web_model(frontend=grown)))
    assert not result.full
    assert rec.commands() == [("ipset", "restore", "-exist")]
    assert rec.calls[0].input == f"add {set_name('v4', FRONTEND.id)} {C4}\n"
    check(node, [("tcp", "c", A4, 80, True), ("tcp", "c", A6, 80, False)])

    rec.clear()  # one policy changes its port -> one restore per family, declaring only that chain
    dp.apply(render(web_model(port=81, frontend=grown)))
    assert rec.commands() == [("iptables-restore", "-w", "--noflush"), ("ip6tables-restore", "-w", "--noflush")]
    pi = policy_chain("ingress", "default/allow-frontend")
    for call in rec.calls:
        assert call.input is not None
        assert [ln for ln in call.input.splitlines() if ln.startswith(":")] == [f":{pi} - [0:0]"]
    check(node, [("tcp", "b", A4, 81, True), ("tcp", "b", A4, 80, False)])

    rec.clear()  # the policy goes, another stays: endpoint chain rewritten, old chain deleted, then the sets
    other = ingress_policy("from-c", None, (CompiledPort("UDP", 81),))
    dp.apply(render(model([other], [], a=(("default/from-c",), ()))))
    assert rec.commands() == [
        ("iptables-restore", "-w", "--noflush"),
        ("ip6tables-restore", "-w", "--noflush"),
        ("ipset", "restore", "-exist"),
    ]
    v4 = rec.calls[0].input or ""
    assert v4.index(f":{endpoint_chain('ingress', 'default/a')} ") < v4.index(f"-X {pi}")
    assert rec.calls[2].input == (f"destroy {set_name('v4', FRONTEND.id)}\ndestroy {set_name('v6', FRONTEND.id)}\n")
    assert not any(is_owned_set(n) for n in node.node_sh("ipset", "list", "-n").split())
    check(node, [("udp", "b", A4, 81, True), ("tcp", "b", A4, 81, False)])

    rec.clear()  # nothing changed -> nothing run
    dp.apply(render(model([other], [], a=(("default/from-c",), ()))))
    assert rec.commands() == []
    assert not dp.check_drift()


def test_failed_restore_keeps_previous_rules_and_next_apply_recovers(
    node: Topology, dp: Dataplane, rec: RecordingRunner
) -> None:
    dp.apply(render(web_model(port=80)))
    failures = iter([Result(4, "", "injected failure")])

    def fail_restore_once(argv: Sequence[str], _input: str | None) -> Result | None:
        return next(failures, None) if argv[0] == "iptables-restore" else None

    rec.fail = fail_restore_once
    with pytest.raises(ApplyError, match="injected failure"):
        dp.apply(render(web_model(port=81)))
    assert dp.applied is None and dp.check_drift()  # not in sync: next apply is a full sync
    check(node, [("tcp", "b", A4, 80, True), ("tcp", "b", A4, 81, False), ("tcp", "c", A4, 80, False)])

    # a rule the kernel rejects: iptables-restore's own error surfaces, old rules stay
    bad = render(web_model(port=81))
    pi = policy_chain("ingress", "default/allow-frontend")
    broken = Ruleset(
        sets=bad.sets,
        chains={**bad.chains, "v4": {**bad.chains["v4"], pi: ("-m set --match-set nf4-nosuchset src -j RETURN",)}},
    )
    with pytest.raises(ApplyError, match="nf4-nosuchset") as err:
        dp.apply(broken)
    assert err.value.what == "iptables-restore"
    check(node, [("tcp", "b", A4, 80, True), ("tcp", "b", A4, 81, False)])

    rec.clear()
    result = dp.apply(render(web_model(port=81)))
    assert result.full and ("iptables-save", "-t", "filter") in rec.commands()
    check(node, [("tcp", "b", A4, 81, True), ("tcp", "b", A4, 80, False), ("tcp", "c", A4, 81, False)])
    assert not dp.check_drift()


def test_drift_is_detected_and_repaired(node: Topology, dp: Dataplane) -> None:
    dp.apply(render(web_model()))
    assert not dp.check_drift()
    tw = endpoint_chain("ingress", "default/a")
    pi = policy_chain("ingress", "default/allow-frontend")

    node.node_sh("iptables", "-w", "-F", tw)  # someone flushes an endpoint chain
    check(node, [("tcp", "c", A4, 80, True)])
    assert dp.check_drift()
    assert dp.repair().full
    assert not dp.check_drift()
    check(node, [("tcp", "c", A4, 80, False), ("tcp", "b", A4, 80, True)])

    node.node_sh("iptables", "-w", "-F", pi)  # ... empties a policy chain and destroys its set
    node.node_sh("ipset", "destroy", set_name("v4", FRONTEND.id))
    check(node, [("tcp", "b", A4, 80, False)])
    assert dp.check_drift()
    dp.repair()
    check(node, [("tcp", "b", A4, 80, True)])

    node.node_sh("iptables", "-w", "-D", "FORWARD", "-j", "NETFENCE-FORWARD")  # ... unhooks us
    node.node_sh("ip6tables", "-w", "-I", "FORWARD", "1", "-j", "ACCEPT")  # ... or jumps the queue
    assert dp.check_drift()
    dp.repair()
    for tool in ("iptables", "ip6tables"):
        rules = forward_rules(node, tool)
        assert rules[0] == "-A FORWARD -j NETFENCE-FORWARD" and rules.count(rules[0]) == 1
    check(node, [("tcp", "c", A4, 80, False), ("tcp", "c", A6, 80, False)])

    node.node_sh("ipset", "add", set_name("v6", FRONTEND.id), C6)  # ... adds a set member
    assert dp.check_drift()
    dp.repair()
    assert not dp.check_drift()
    check(node, [("tcp", "c", A6, 80, False)])


def test_foreign_rules_chains_and_sets_survive_everything_and_uninstall_removes_only_ours(
    node: Topology, rec: RecordingRunner
) -> None:
    add_foreign_state(node)
    before = foreign_state(node)
    dp = Dataplane(rec)
    dp.apply(render(web_model()))
    assert foreign_state(node) == before
    assert forward_rules(node) == ["-A FORWARD -j NETFENCE-FORWARD", "-A FORWARD -s 198.51.100.9/32 -j FOREIGN"]
    dp.apply(render(web_model(frontend=PeerSet(FRONTEND.id, "pods", {}, (C4,)))))  # delta: sets
    dp.apply(render(web_model(port=81)))  # delta: chains and sets
    assert foreign_state(node) == before
    node.node_sh("iptables", "-w", "-F", endpoint_chain("ingress", "default/a"))
    assert dp.check_drift()
    dp.repair()
    assert foreign_state(node) == before
    restarted = Dataplane(SubprocessRunner(node.node))  # agent restart: rules still in force meanwhile
    check(node, [("tcp", "b", A4, 81, True), ("tcp", "c", A4, 81, False)])
    restarted.apply(render(web_model()))
    assert foreign_state(node) == before
    check(node, [("tcp", "b", A4, 80, True), ("tcp", "c", A4, 80, False)])

    restarted.uninstall()
    assert foreign_state(node) == before
    for tool in ("iptables", "ip6tables"):
        assert kernel_tables(node, tool) == {}
        assert "-A FORWARD -j NETFENCE-FORWARD" not in forward_rules(node, tool)
    assert not any(is_owned_set(n) for n in node.node_sh("ipset", "list", "-n").split())
    check(node, [("tcp", "c", A4, 80, True)])  # no longer enforced


def test_full_sync_removes_stale_state_of_a_previous_run(node: Topology, dp: Dataplane) -> None:
    for argv in (
        ["iptables", "-w", "-N", "nf-pi-0123456789abcdef"],
        ["iptables", "-w", "-N", "NETFENCE-OLD"],
        ["iptables", "-w", "-A", "NETFENCE-OLD", "-j", "nf-pi-0123456789abcdef"],
        ["iptables", "-w", "-N", "NETFENCE-FORWARD"],
        ["iptables", "-w", "-A", "FORWARD", "-j", "ACCEPT"],
        ["iptables", "-w", "-A", "FORWARD", "-j", "NETFENCE-FORWARD"],
        ["ipset", "create", "nf4-stale", "hash:ip"],
        ["ipset", "create", f"{set_name('v4', FRONTEND.id)}-t", "hash:net"],  # leftover swap temp
        ["ipset", "create", set_name("v4", FRONTEND.id), "hash:ip"],  # exists: refilled by swap
        ["ipset", "add", set_name("v4", FRONTEND.id), C4],
    ):
        node.node_sh(*argv)
    desired = render(web_model())
    dp.apply(desired)
    assert kernel_tables(node) == desired.family_chains("v4")
    assert forward_rules(node) == ["-A FORWARD -j NETFENCE-FORWARD", "-A FORWARD -j ACCEPT"]
    assert parse_ipset_save(node.node_sh("ipset", "save")) == desired.sets
    check(node, [("tcp", "c", A4, 80, False), ("tcp", "b", A4, 80, True)])
    assert not dp.check_drift()


def test_ensure_hooks_is_idempotent_and_keeps_us_first(node: Topology, dp: Dataplane) -> None:
    node.node_sh("iptables", "-w", "-A", "FORWARD", "-j", "ACCEPT")
    dp.ensure_hooks()
    dp.ensure_hooks()
    assert forward_rules(node) == ["-A FORWARD -j NETFENCE-FORWARD", "-A FORWARD -j ACCEPT"]
    assert forward_rules(node, "ip6tables") == ["-A FORWARD -j NETFENCE-FORWARD"]
    node.node_sh("iptables", "-w", "-I", "FORWARD", "1", "-j", "ACCEPT")
    dp.ensure_hooks()
    assert forward_rules(node) == ["-A FORWARD -j NETFENCE-FORWARD", "-A FORWARD -j ACCEPT", "-A FORWARD -j ACCEPT"]


def test_detect_features_probes_without_leaving_anything(node: Topology, dp: Dataplane) -> None:
    features = dp.detect_features()
    assert features.sctp_port_match  # nf_tables matches SCTP ports natively, even without SCTP in the kernel
    assert kernel_tables(node) == {}


def test_a_restart_without_good_values_carries_the_kernel_rules_over_exactly(
    node: Topology, rec: RecordingRunner
) -> None:
    """Pinned chains and sets (dataplane/pins.py) round-trip through the real tools, drift repair included."""
    full = web_model()
    Dataplane(rec, ipv6=True).apply(render(full))
    cases = [("tcp", "b", A4, 80, True), ("tcp", "c", A4, 80, False), ("tcp", "b", A6, 80, True)]
    check(node, cases)

    # A restarted agent: the policy and its peer set have no good value (corrupt in etcd).
    restarted = Dataplane(rec, ipv6=True)
    keys: list[PinKey] = [("policy", "default/allow-frontend"), ("set", FRONTEND.id)]
    cache = PinCache()
    cache.learn(restarted.read_state(), cache.needs(keys), restarted.families)
    assert all(cache.found(k) for k in keys)
    desired = render(dataclasses.replace(full, policies={}, sets={}), pinned=cache.pinned(keys))
    assert desired == render(full)  # carried over exactly as iptables-save/ipset save print it
    assert restarted.apply(desired).full
    assert not restarted.check_drift()
    check(node, cases)

    # Drift repair restores pinned rules like any other.
    node.node_sh("iptables", "-w", "-F", policy_chain("ingress", "default/allow-frontend"))
    node.node_sh("ipset", "flush", set_name("v6", FRONTEND.id))
    assert restarted.check_drift()
    restarted.repair()
    assert not restarted.check_drift()
    check(node, cases)

    # An endpoint without a good value keeps its chain and dispatch (and the policy it jumps to).
    again = Dataplane(rec, ipv6=True)
    cache = PinCache()
    ep_key: list[PinKey] = [("endpoint", "default/a")]
    cache.learn(again.read_state(), cache.needs(ep_key), again.families)
    no_a = dataclasses.replace(full, endpoints={k: v for k, v in full.endpoints.items() if k != "default/a"})
    assert again.apply(render(no_a, pinned=cache.pinned(ep_key))).full
    assert not again.check_drift()
    check(node, cases)
