"""docs/metrics.md documents exactly the metrics the controller and the agent serve, with their type and labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from netfence.agent.metrics import AgentMetrics
from netfence.controller.metrics import ControllerMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"^\| `(netfence_[a-z_]+)` \| (counter|gauge|histogram) \|([^|]*)\|", re.M)


def documented() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) from the tables of docs/metrics.md."""
    rows = {}
    for name, kind, labels in _ROW.findall(DOC.read_text()):
        names = re.sub(r"\([^)]*\)", "", labels)  # label values are listed in parentheses
        rows[name] = (kind, set(re.findall(r"`([a-z_]+)`", names)))
    return rows


def served(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    """name (as scraped: counters with ``_total``) -> (type, label names) of every metric family."""
    out = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        out[name] = (family.type, labels)
    return out


@pytest.mark.parametrize("metrics", [ControllerMetrics, AgentMetrics], ids=["controller", "agent"])
def test_every_served_metric_is_documented_with_its_type(metrics: type[ControllerMetrics | AgentMetrics]) -> None:
    docs = documented()
    for name, (kind, labels) in served(metrics().registry).items():
        assert name in docs, f"{name} is not in docs/metrics.md"
        assert docs[name][0] == kind, (name, docs[name][0], kind)
        assert labels <= docs[name][1], (name, labels, docs[name][1])  # families without samples have none


def test_every_documented_metric_is_served() -> None:
    names = set(served(ControllerMetrics().registry)) | set(served(AgentMetrics().registry))
    assert set(documented()) == names


def test_the_denied_counters_have_exactly_the_documented_labels() -> None:
    docs = documented()
    for name in ("netfence_agent_denied_packets_total", "netfence_agent_denied_bytes_total"):
        assert docs[name][1] == {"namespace", "pod", "direction"}


def test_readme_links_the_metrics_page() -> None:
    assert "docs/metrics.md" in (DOC.parents[1] / "README.md").read_text()
