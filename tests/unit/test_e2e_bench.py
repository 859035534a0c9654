"""bench/e2e_bench.py's pure parts: addresses, probe-log analysis, statistics, the JSON it writes."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def e2e() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import importlib

    return importlib.import_module("e2e_bench")


def test_node_cidrs_are_disjoint_and_hold_the_api_pods(e2e: ModuleType) -> None:
    cidrs = [ipaddress.ip_network(e2e.node_cidr(i)) for i in range(6)]
    assert str(cidrs[0]) == "10.244.0.0/21" and str(cidrs[1]) == "10.244.8.0/21"
    assert not any(a.overlaps(b) for i, a in enumerate(cidrs) for b in cidrs[i + 1:])
    ips = [ipaddress.ip_address(e2e.api_pod_ip(i % 6, i // 6)) for i in range(5000)]
    assert len(set(ips)) == 5000
    assert all(ip in cidrs[i % 6] for i, ip in enumerate(ips))
    # API-only pods stay above the real pods' addresses (host 10, 11, ... of the same CIDR)
    assert all(int(ip) - int(cidrs[i % 6].network_address) >= e2e.FIRST_API_HOST for i, ip in enumerate(ips))
    with pytest.raises(ValueError):
        e2e.api_pod_ip(0, 5000)


def _log(e2e: ModuleType, *points: tuple[float, bool]) -> list[object]:
    return [e2e.ProbeResult(t, ok) for t, ok in points]


def test_probe_log_analysis(e2e: ModuleType) -> None:
    log = _log(e2e, (0.0, True), (1.0, True), (2.0, False), (3.0, True), (4.0, False), (5.0, False),
               (6.0, False), (7.0, False), (8.0, False))
    first = e2e.first_verdict(log, 1.5, False)
    assert first is not None and first.start == 2.0
    assert e2e.first_verdict(log, 9.0, False) is None
    assert e2e.flaps(log, first, False) == 1  # the probe at 3.0 still got through
    assert e2e.settled(log, 1.5, False, stable=5)
    assert not e2e.settled(log, 1.5, True, stable=5)
    assert not e2e.settled(log, 7.5, False, stable=5)  # too few probes since then
    assert e2e.count_through(log, 0.5, 4.0) == 2


def test_new_pod_sample_counts_the_hole(e2e: ModuleType) -> None:
    # network up at 0, address published at 10, rules in force from 12.5
    log = _log(e2e, (8.0, True), (9.0, True), (10.5, True), (11.0, True), (12.5, False), (13.0, False))
    sample = e2e.new_pod_sample(2, 10.0, log, expect_through=False)
    assert sample.window_s == pytest.approx(2.5)
    assert (sample.through_before_publish, sample.through_after_publish, sample.probes) == (2, 2, 6)
    never = e2e.new_pod_sample(0, 10.0, _log(e2e, (10.5, True)), expect_through=False)
    assert never.window_s is None and never.through_after_publish == 1
    # a pod no policy selects: the window is to the first probe through; nothing counts as a hole
    free = e2e.new_pod_sample(1, 10.0, _log(e2e, (9.0, False), (10.2, False), (10.4, True)), expect_through=True)
    assert free.window_s == pytest.approx(0.4)
    assert (free.through_before_publish, free.through_after_publish) == (0, 0)


def test_stats_and_json_shape(e2e: ModuleType) -> None:
    assert e2e.stats([]) == {"n": 0, "p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    samples = [i / 1000 for i in range(1, 101)]
    s = e2e.stats(samples)
    assert s["n"] == 100 and s["max_s"] == 0.1 and s["p50_s"] < s["p99_s"] <= s["max_s"]
    f = e2e.Figures(enforced=[0.1, 0.2], deny_seen=[0.05], allow_seen=[0.4],
                    new_denied=[e2e.NewPodSample(0, 1.0, 0.1, 0, 0, 10), e2e.NewPodSample(1, 2.0, 0.2, 1, 3, 10)],
                    new_free=[e2e.NewPodSample(0, 1.0, 0.02, 0, 0, 5)])
    out = json.loads(json.dumps(e2e.figures_json(f)))  # plain JSON
    for key in ("policy_enforced_p50_s", "policy_enforced_p99_s", "policy_probe_p50_s", "policy_probe_p99_s",
                "new_pod_denied_p50_s", "new_pod_denied_p99_s", "new_pod_reachable_before_rules", "goals_met",
                "policy_probe_deny", "policy_probe_allow", "new_free_pod_allowed", "sizes", "load"):
        assert key in out
    assert out["policy_probe"]["n"] == 2 and out["policy_probe_p99_s"] == 0.4
    assert out["new_pod_through_after_publish"] == 3 and out["new_pod_through_before_publish"] == 1
    assert out["new_pods_reachable_after_publish"] == 1
    assert out["new_pod_reachable_before_rules"] is True
    assert out["goals_met"] == {"policy_enforced": True, "policy_probe": False, "new_pod_denied": True,
                                "new_pod_not_reachable_before_rules": False}
    assert e2e.figures_json(e2e.Figures())["goals_met"]["policy_enforced"] is False  # no samples: not met


def test_modes_json_puts_the_last_mode_on_top(e2e: ModuleType) -> None:
    before = e2e.Figures(new_denied=[e2e.NewPodSample(0, 1.0, 0.1, 2, 5, 10)])
    after = e2e.Figures(new_denied=[e2e.NewPodSample(0, 1.0, 0.0, 0, 0, 10)])
    out = json.loads(json.dumps(e2e.modes_json({"baseline": before, "pod-cidrs": after})))
    assert out["mode"] == "pod-cidrs" and list(out["modes"]) == ["baseline", "pod-cidrs"]
    assert out["new_pod_reachable_before_rules"] is False
    assert out["modes"]["baseline"]["new_pod_reachable_before_rules"] is True
    assert set(e2e.MODES) == {"baseline", "pod-cidrs"}
    assert e2e.parser().parse_args(["--modes", "pod-cidrs"]).modes == ["pod-cidrs"]
