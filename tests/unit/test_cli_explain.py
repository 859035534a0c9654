"""``netfence explain`` bad input: one 'netfence: ...; ...' line, a non-zero exit, nothing else."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netfence.cli import build_parser, main
from netfence.explain.gather import ExplainError, parse_endpoint_arg, parse_mapping, parse_port


@pytest.fixture(autouse=True)
def no_test_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No kept demo, no local cluster, no connection variables."""
    monkeypatch.setenv("NETFENCE_CACHE", str(tmp_path / "cache"))
    for name in ("NETFENCE_ETCD_ENDPOINTS", "NETFENCE_KUBECONFIG", "NETFENCE_ETCD_CA", "NETFENCE_ETCD_CERT",
                 "NETFENCE_ETCD_KEY", "NETFENCE_ETCD_PREFIX"):
        monkeypatch.delenv(name, raising=False)


def one_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("netfence: ") and "; " in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("args", "code", "fragments"), [
    (["x/a", "x/b", "--port", "http"], 2, ["--port 'http' is not a port number", "look it up"]),
    (["x/a", "x/b", "--port", "70000"], 2, ["out of range"]),
    (["just-a-name", "x/b", "--port", "80"], 2, ["SRC 'just-a-name' is neither namespace/pod nor an IP"]),
    (["x/a", "x/b/c", "--port", "80"], 2, ["DST 'x/b/c'"]),
    (["x/a", "x/b", "--protocol", "icmp"], 2, ["invalid choice"]),
    (["x/a", "x/b", "--port", "80"], 1, ["no cluster to ask", "--etcd-endpoints", "netfence demo --keep"]),
    (["x/a", "x/b", "--kubeconfig", "/nonexistent"], 1, ["--kubeconfig given without --etcd-endpoints"]),
    (["x/a", "x/b", "--etcd-endpoints", "127.0.0.1:2379", "--node-netns", "node-0"], 2, ["is not NODE=VALUE"]),
    (["x/a", "x/b", "--etcd-endpoints", "nonsense"], 1, ["expected host:port"]),
    (["x/a", "x/b", "--etcd-endpoints", "127.0.0.1:2379", "--etcd-ca", "/nonexistent/ca.pem"], 1, ["no such file"]),
])
def test_bad_input_is_one_line(args: list[str], code: int, fragments: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", *args]) == code
    one_error(capsys, *fragments)


def test_unreachable_etcd(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = closed_port()
    assert main(["explain", "x/a", "x/b", "--port", "80", "--etcd-endpoints", f"127.0.0.1:{port}",
                 "--kubeconfig", str(tmp_path / "unused")]) == 1
    one_error(capsys, f"etcd at 127.0.0.1:{port}", "check that it runs")


@pytest.mark.parametrize(("text", "parsed"), [
    ("default/web", ("default", "web")), ("10.244.0.10", "10.244.0.10"), (" fd00::0a ", "fd00::a"),
])
def test_endpoint_arguments(text: str, parsed: object) -> None:
    assert parse_endpoint_arg(text, "SRC") == parsed


def test_port_and_mapping_arguments() -> None:
    assert parse_port(None) is None and parse_port("443") == 443
    for bad in ("0", "http", "-1", "80/TCP"):
        with pytest.raises(ExplainError):
            parse_port(bad)
    assert parse_mapping(["n0=ns-a", "n1=ns=b"], "--node-netns") == {"n0": "ns-a", "n1": "ns=b"}


def test_kubectl_plugin_is_the_same_command() -> None:
    assert build_parser("kubectl netfence").prog == "kubectl netfence"
    plugin = Path(sys.executable).with_name("kubectl-netfence")
    assert plugin.is_file(), "pip install -e . creates the kubectl plugin (pyproject [project.scripts])"
    result = subprocess.run([str(plugin), "explain", "--help"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kubectl netfence explain")
    assert "--etcd-endpoints" in result.stdout and "--protocol" in result.stdout


def test_with_no_connection_flags_the_kept_demo_is_asked(tmp_path: Path) -> None:
    """`netfence demo --keep` leaves demo.json (with the nodes' namespaces) next to its cluster's state."""
    import json
    import os

    from netfence.cli_options import local_beds
    from netfence_lab.cluster import ClusterState, ProcessRecord, proc_start_time

    demo = tmp_path / "demo"
    (demo / "cluster").mkdir(parents=True)
    start = proc_start_time(os.getpid())
    assert start is not None
    alive = ProcessRecord("netfence-etcd", os.getpid(), start, "log")  # "running": this very process
    state = ClusterState(str(demo / "cluster"), str(demo / "cluster" / "admin.kubeconfig"), "", "https://x",
                         "http://127.0.0.1:23790", "http://127.0.0.1:23791", [alive], os.getpid(), 0.0)
    (demo / "cluster" / "state.json").write_text(state.to_json())
    (demo / "demo.json").write_text(json.dumps({"fabric": "nfab12", "nodes": {"node-0": "nfab12-n0"}}))
    [bed] = local_beds(demo)
    assert bed.etcd_endpoint == "127.0.0.1:23790"
    assert bed.kubeconfig == demo / "cluster" / "admin.kubeconfig"
    assert bed.node_netns == {"node-0": "nfab12-n0"}
    # demo.json of an earlier version: only the fabric prefix
    (demo / "demo.json").write_text(json.dumps({"fabric": "nfab12"}))
    assert local_beds(demo)[0].node_netns == {"node-0": "nfab12-n0", "node-1": "nfab12-n1"}
    # a demo that is not running any more is not asked
    dead = ProcessRecord("netfence-etcd", os.getpid(), start + 1, "log")
    (demo / "cluster" / "state.json").write_text(
        ClusterState(**{**state.__dict__, "processes": [dead]}).to_json())
    assert local_beds(demo) == []
