"""The chart's metrics wiring (docs/metrics.md), rendered by the real helm binary (``helm template``: no cluster).

* by default the controller and the agent get ``--metrics-port`` and a container port named
  ``metrics``, a Service names it (headless for the agents), and no ServiceMonitor is rendered;
* ``metrics.serviceMonitor.enabled`` renders one ``monitoring.coreos.com/v1`` ServiceMonitor per
  program whose selector finds exactly that program's metrics Service, whose port that Service
  has, and whose Service reaches the container port;
* ``metrics.enabled=false`` removes all of it; clashing ports and bad durations are refused.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from netfence.config import agent_parser, controller_parser
from netfence_lab.tools import Tools

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "netfence"
MONITOR = ("--set", "metrics.serviceMonitor.enabled=true")


@pytest.fixture(scope="module")
def helm(tools: Tools) -> Path:
    """The helm binary the test bed builds (as tests/integration/test_helm.py gets it)."""
    return tools.helm


def run(helm: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HELM_CACHE_HOME": str(home / "c"),
           "HELM_CONFIG_HOME": str(home / "f"), "HELM_DATA_HOME": str(home / "d")}
    return subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def render(helm: Path, home: Path, *values: str) -> list[dict[str, Any]]:
    result = run(helm, home, "template", "t", str(CHART), "--namespace", "nf", *values)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def one(docs: Sequence[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs])
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [ctr] = workload["spec"]["template"]["spec"]["containers"]
    return dict(ctr)


def flag(ctr: dict[str, Any], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in ctr["args"] if a.startswith(f"{name}=")]
    assert len(values) <= 1
    return values[0] if values else None


WORKLOADS = (("controller", "Deployment", "t-netfence-controller", 8082, controller_parser),
             ("agent", "DaemonSet", "t-netfence-agent", 9798, agent_parser))


@pytest.mark.parametrize(("component", "kind", "name", "port", "parser"), WORKLOADS, ids=["controller", "agent"])
def test_metrics_ports_are_exposed_by_default(
    helm: Path, tmp_path: Path, component: str, kind: str, name: str, port: int, parser: Any
) -> None:
    docs = render(helm, tmp_path)
    workload = one(docs, kind, name)
    ctr = container(workload)
    assert flag(ctr, "--metrics-port") == str(port)
    assert "--metrics-port" in {s for a in parser({})._actions for s in a.option_strings}
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in ctr["ports"]
    # Its own port: never the health (or liveness) port.
    assert int(flag(ctr, "--health-port") or 0) != port
    service = one(docs, "Service", f"{name}-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == component
    assert (service["spec"].get("clusterIP") == "None") == (component == "agent")  # one endpoint per node
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]  # off by default


def test_service_monitors_are_rendered_for_both_programs(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, *MONITOR, "--set", "metrics.serviceMonitor.labels.release=prom",
                  "--set", "metrics.serviceMonitor.interval=15s")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sorted(m["metadata"]["name"] for m in monitors) == ["t-netfence-agent-metrics",
                                                                "t-netfence-controller-metrics"]
    services = [d for d in docs if d["kind"] == "Service"]
    for component, kind, name, port, _ in WORKLOADS:
        monitor = one(monitors, "ServiceMonitor", f"{name}-metrics")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "nf"
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["nf"]}
        wanted = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert [s["metadata"]["name"] for s in selected] == [f"{name}-metrics"], component
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "10s"
        assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
        ctr = container(one(docs, kind, name))
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in ctr["ports"]
    agent_endpoint = one(monitors, "ServiceMonitor", "t-netfence-agent-metrics")["spec"]["endpoints"][0]
    assert agent_endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_node_name"],
                                              "targetLabel": "node"}]
    lint = run(helm, tmp_path, "lint", "--strict", str(CHART), *MONITOR)
    assert "0 chart(s) failed" in lint.stdout, lint.stdout + lint.stderr


def test_ports_can_be_moved(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, *MONITOR, "--set", "metrics.agent.port=9100", "--set", "metrics.controller.port=9090")
    assert flag(container(one(docs, "DaemonSet", "t-netfence-agent")), "--metrics-port") == "9100"
    assert flag(container(one(docs, "Deployment", "t-netfence-controller")), "--metrics-port") == "9090"
    assert one(docs, "Service", "t-netfence-agent-metrics")["spec"]["ports"][0]["port"] == 9100


def test_metrics_can_be_switched_off(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, "--set", "metrics.enabled=false", *MONITOR)
    for _, kind, name, _, _ in WORKLOADS:
        ctr = container(one(docs, kind, name))
        assert flag(ctr, "--metrics-port") is None
        assert "metrics" not in {p["name"] for p in ctr["ports"]}
    assert not [d for d in docs if d["kind"] == "ServiceMonitor" or d["metadata"]["name"].endswith("-metrics")]


@pytest.mark.parametrize(("values", "message"), [
    (("--set", "metrics.agent.port=9799"), "metrics.agent.port 9799 is also agent.healthPort"),
    (("--set", "metrics.controller.port=8081"), "metrics.controller.port 8081 is also the controller's health"),
    (("--set", "metrics.serviceMonitor.interval=soon"),
     "at '/metrics/serviceMonitor/interval': 'soon' does not match pattern"),
    (("--set", "metrics.agent.port=0"), "at '/metrics/agent/port': minimum: got 0, want 1"),
    (("--set", "metrics.serviceMonitor.enable=true"),
     "at '/metrics/serviceMonitor': additional properties 'enable' not allowed"),
], ids=["agent-health-port", "controller-liveness-port", "interval", "port-0", "typo"])
def test_bad_metrics_values_are_refused_clearly(helm: Path, tmp_path: Path, values: tuple[str, ...],
                                                message: str) -> None:
    result = run(helm, tmp_path, "template", "bad", str(CHART), *values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
