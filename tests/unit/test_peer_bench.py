"""The pure parts of bench/peer_bench.py: statistics, verdict detection, the table, the JSON shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def pb() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import importlib

    return importlib.import_module("peer_bench")


def figures(pb: ModuleType) -> dict[str, dict[str, Any]]:
    def enforce(p50: float, p99: float) -> dict[str, Any]:
        stats = pb.summary([p50 / 1e3] * 98 + [p99 / 1e3] * 2)
        return {**stats, "deny": dict(stats), "allow": dict(stats)}

    return {
        pb.NETFENCE: {"enforce_100": enforce(100, 200), "enforce_1000": enforce(120, 300),
                      "label": pb.summary([0.08, 0.09]), "conn_rate": 1200.0, "added_latency_us": 20.0,
                      "cpu_per_100": 5.0, "kernel_objects": {"node-1": {"rules": 8000, "sets": 200, "members": 3}}},
        pb.PEER: {"enforce_100": enforce(40, 100), "enforce_1000": enforce(50, 100),
                  "label": pb.summary([0.05, 0.2]), "conn_rate": 300.0, "added_latency_us": 4000.0,
                  "cpu_per_100": 2.5, "kernel_objects": {"node-1": {"rules": 6, "sets": 0, "members": 0}}},
        pb.NONE: {"conn_rate": 1300.0, "conn_mean_us": 900.0},
    }


def test_summary_reports_milliseconds_count_and_misses(pb: ModuleType) -> None:
    stats = pb.summary([0.010, 0.020, 0.030, 0.040], missed=2)
    assert stats == {"p50_ms": 30.0, "p99_ms": 40.0, "max_ms": 40.0, "n": 4, "missed": 2}
    assert pb.summary([]) == {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0, "missed": 0}


@pytest.mark.parametrize(
    ("samples", "want", "confirm", "expected"),
    [
        # the first allowed probe in launch order counts, even if a later one finished first
        ([(1.0, False), (2.0, True), (3.0, True)], True, 0, 2.0),
        # an earlier probe still pending: undecided
        ([(1.0, None), (2.0, True)], True, 0, None),
        # a denied verdict needs the next two denied as well
        ([(1.0, True), (2.0, False), (3.0, False), (4.0, False)], False, 2, 2.0),
        ([(1.0, False), (2.0, True), (3.0, False), (4.0, False), (5.0, False)], False, 2, 3.0),
        # not enough confirming probes yet
        ([(1.0, False), (2.0, False)], False, 2, None),
        ([(1.0, False), (2.0, False), (3.0, None)], False, 2, None),
        # nothing shows the verdict
        ([(1.0, True), (2.0, True)], False, 2, None),
        ([], True, 0, None),
    ],
)
def test_first_confirmed(pb: ModuleType, samples: list[tuple[float, bool | None]], want: bool, confirm: int,
                         expected: float | None) -> None:
    assert pb.first_confirmed(samples, want, confirm) == expected


def test_ratio_is_netfence_over_peer_and_none_when_unknown(pb: ModuleType) -> None:
    assert pb.ratio(300.0, 100.0) == 3.0
    assert pb.ratio(None, 1.0) is None
    assert pb.ratio(1.0, None) is None
    assert pb.ratio(1.0, 0.0) is None


def test_table_has_both_columns_and_the_ratio(pb: ModuleType) -> None:
    rows = pb.table_rows(figures(pb), (100, 1000))
    by_what = {row[0]: row[1:] for row in rows}
    assert by_what["policy create -> new verdict, p50 / p99, 1,000 policies"] == (
        "120 / 300 ms", "50 / 100 ms", "2.40x / 3.00x")
    assert by_what["new TCP connections / s across nodes, 1,000 policies"] == ("1,200", "300", "4.00x")
    assert by_what["CPU seconds per 100 policy writes"] == ("5.00 s", "2.50 s", "2.00x")
    assert by_what["kernel objects on node-1, 1,000 policies"][:2] == (
        "8,000 rules, 200 sets, 3 members", "6 rules, 0 sets, 0 members")
    assert "  of which a deny appearing" in by_what
    text = pb.format_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| what") and "kube-network-policies" in lines[0] and "Netfence / peer" in lines[0]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert len(lines) == len(rows) + 2


def test_table_shows_dashes_for_missing_figures(pb: ModuleType) -> None:
    rows = pb.table_rows({pb.NETFENCE: {}, pb.PEER: {}}, (100,))
    assert all(cell == "-" for row in rows for cell in row[1:])


def test_json_report_shape(pb: ModuleType) -> None:
    doc = pb.report(figures(pb), (100, 1000), {"machine": {"cpus": 2}, "load": {"start": [1.0, 1.0, 1.0]}})
    json.dumps(doc)  # serialisable
    assert doc["conn_rate_ratio"] == 4.0
    assert doc["enforce_p99_ratio"] == 3.0
    assert set(doc["systems"]) == {pb.NETFENCE, pb.PEER, pb.NONE}
    assert doc["machine"] == {"cpus": 2}
    assert doc["ratios"]["enforce_p50_100"] == 2.5
    assert doc["ratios"]["cpu_per_100"] == 2.0
    assert doc["goals"] == {"conn_rate_ratio_at_least": 3.0, "conn_rate_met": True,
                            "enforce_p99_ratio_at_most": 2.0, "enforce_p99_met": False}


def test_policies_are_valid_networkpolicies(pb: ModuleType) -> None:
    from netfence.model.world import policy_from_k8s

    bodies = [pb.filler_policy(7), pb.deny_policy(1), pb.allow_policy(1), pb.granted_policy(), *pb.base_policies()]
    names = {(b["metadata"]["namespace"], b["metadata"]["name"]) for b in bodies}
    assert len(names) == len(bodies)
    for body in bodies:
        policy_from_k8s(body)
    assert pb.filler_policy(3)["spec"]["podSelector"] == {"matchLabels": {"app": "server"}}
    assert pb.filler_policy(3) != pb.filler_policy(4)
