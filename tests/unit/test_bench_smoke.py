"""Smoke tests of the benchmarks' pure helpers (the benchmarks themselves print figures, not asserts)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(autouse=True)
def bench_on_path() -> None:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))


def _import(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(name)


def test_synthetic_world_parses_and_the_engine_matches_compile_world() -> None:
    synthetic, model_bench = _import("synthetic"), _import("model_bench")
    from netfence.model.compiler import compile_world
    from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s

    sizes = synthetic.Sizes(namespaces=5, pods=60, policies=25, nodes=3)
    world = model_bench.listing(sizes)
    assert len(world["pods"]) == 60 and len(world["networkpolicies"]) == 25
    engine, times = model_bench.cold_build(world)
    expected = compile_world(
        [pod_from_k8s(b) for b in world["pods"]],
        [namespace_from_k8s(b) for b in world["namespaces"]],
        [policy_from_k8s(b) for b in world["networkpolicies"]],
    )
    assert dict(engine.desired()) == expected
    assert times["keys"] == len(expected)
    assert {k.split("/")[0] for k in expected} == {"policies", "sets", "endpoints"}
    assert synthetic.flip_track({"track": "stable"}) == {"track": "canary"}


def test_percentiles() -> None:
    benchlib = _import("benchlib")
    samples = [i / 1000 for i in range(1, 101)]
    assert benchlib.pct(samples, 0.5) == pytest.approx(0.0505, abs=0.001)
    assert benchlib.pct(samples, 0.99) == pytest.approx(0.099, abs=0.0011)
    assert benchlib.pct([], 0.5) == 0.0
    assert "p99" in benchlib.ms_summary(samples)


def test_agent_bench_changes_touch_one_key() -> None:
    agent_bench = _import("agent_bench")
    model = agent_bench.model_of(20)
    base = agent_bench.etcd_values(model)
    key, sid = agent_bench.local_policy_and_set(model)
    changed, _, present = agent_bench.membership_change(model, sid, 0)
    assert present
    assert set(agent_bench.delta(base, agent_bench.etcd_values(changed))) == {f"sets/{sid}"}
    changed_policy, _ = agent_bench.policy_change(model, key, 1)
    assert set(agent_bench.delta(base, agent_bench.etcd_values(changed_policy))) == {f"policies/{key}"}
    assert agent_bench.delta(base, {}) == dict.fromkeys(base)


def test_scale_bench_helpers() -> None:
    """bench/scale_bench.py's pure parts (the bench itself needs a local cluster and minutes)."""
    scale, synthetic = _import("scale_bench"), _import("synthetic")
    sizes = synthetic.Sizes(namespaces=3, pods=30, policies=5, nodes=4)
    bodies = scale.scale_pod_bodies(sizes)
    for i, (body, status) in enumerate(bodies):
        node = i % 4
        assert body["spec"]["nodeName"] == synthetic.node_name(node)
        ip = status["status"]["podIP"]
        assert ipaddress.ip_address(ip) in scale.node_cidr(node)  # its node's CIDR
    assert len({s["status"]["podIP"] for _, s in bodies}) == 30
    policies = scale.scale_policy_bodies(sizes, 0, 12)
    assert [p["metadata"]["namespace"] for p in policies[:5]] == [scale.PROBE_NAMESPACE] * 5
    assert all(p["metadata"]["namespace"] != scale.PROBE_NAMESPACE for p in policies[5:])
    assert policies[7] == scale.scale_policy_bodies(sizes, 7, 8)[0]  # the same at every count
    text = ('# TYPE etcd_debugging_mvcc_events_total counter\netcd_debugging_mvcc_events_total 12\n'
            'etcd_mvcc_put_total{a="1"} 3\netcd_mvcc_put_total{a="2"} 4\nother_total 9\n')
    assert scale.parse_counters(text) == {"etcd_debugging_mvcc_events_total": 12.0, "etcd_mvcc_put_total": 7.0}
    result = scale.RoundResult("new", 100, 10, label_latencies=[0.1, 0.2], label_noop=2, commits=4, events=80,
                               reports=40, change_cpu=[0.2, 0.1, 0.3], change_reports=[20, 10, 10],
                               status_writes=6)
    summary = result.summary()
    assert summary["events_per_commit"] == 20 and summary["events_per_agent_per_commit"] == 2
    assert summary["controller_cpu_per_commit_s"] == 0.2 and summary["controller_cpu_per_report_change_s"] == 0.01
    assert summary["status_writes_per_change"] == 1.5
    figures = scale.figures([result], "new", 100)
    assert figures["controller_cpu_per_report_change_s"] == {"100": 0.01}
    assert {"policy_enforced_p50_s", "label_enforced_p99_s", "events_per_agent_per_commit"} <= figures.keys()
    assert scale.controller_argv("baseline", type("C", (), {"kubeconfig": "k", "netfence_etcd": type(
        "E", (), {"endpoint": "e"})()})(), "/p/", "c")[-2:] == ["--baseline-status=true", "--status-concurrency=1"]


def test_ip_family_bench_alternates_modes_and_computes_ratios() -> None:
    bench = _import("ip_family_bench")
    assert [bench.mode_order(i, ["ipv4", "dual"]) for i in range(3)] == [
        ["ipv4", "dual"], ["dual", "ipv4"], ["ipv4", "dual"]]
    assert bench.ratio_summary({"ipv4": 100.0, "dual": 130.0}, "ipv4") == {"ipv4": 1.0, "dual": 1.3}
