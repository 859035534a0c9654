"""Smoke tests of the benchmarks' pure helpers (the benchmarks themselves print figures, not asserts)."""

from __future__ import annotations

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
