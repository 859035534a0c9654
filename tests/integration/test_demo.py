"""The README's main job, as a user runs it: `netfence demo`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from netfence_lab.cluster import read_state
from netfence_lab.demo import PODS
from netfence_lab.runs import owner_path, podserver_pids, run_netns


def normalised(text: str) -> list[str]:
    """Lines without what changes from run to run: numbers, the fabric prefix, column widths."""
    out = []
    for raw in text.strip().splitlines():
        line = re.sub(r"network namespace \S+", "network namespace NS", raw)
        line = re.sub(r"\bN packets?\b", "N packets", re.sub(r"\d+", "N", line))
        out.append(" ".join(line.split()))
    return [line for line in out if line]


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netfence.cli", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "All connections behave as the policies say." in out
    # kubectl get policystatus, printed by the real kubectl
    status = out.split("==> kubectl get policystatus", 1)[1].split("==>", 1)[0]
    assert "PHASE" in status and "SYNCED" in status
    for name in ("default.web-deny-all", "myns.backend-from-frontend", "myns.frontend-from-bob"):
        line = next(ln for ln in status.splitlines() if name in ln)
        assert "Enforced" in line and "1/1" in line
    # kubectl get policystatus -o wide: the Ready condition's reason and headline
    header = status.split("\n", 1)[1].strip().splitlines()[0].split()
    assert header[-2:] == ["REASON", "MESSAGE"] and "REVISION" not in header
    assert "AllNodesSynced enforced on 1/1 nodes" in " ".join(status.split())
    # DROP counters rose on the nodes and name the denied endpoint
    drops = out.split("DROP counters that rose", 1)[1]
    assert "packets dropped" in drops
    assert "default/web" in drops
    # It ends with netfence explain: a denied pair (nearest miss, DROP counter), then an allowed one
    denied = out.split("==> netfence explain alice/client myns/frontend --port 443", 1)[1].split("==>", 1)[0]
    allowed = out.split("==> netfence explain bob/client myns/frontend --port 443", 1)[1]
    assert denied.strip().splitlines()[-1].strip() == "verdict: denied"
    assert ("nearest miss: policy myns/frontend-from-bob ingress rule 0: namespace alice does not match "
            "namespaceSelector user=bob") in denied
    assert "endpoint chain: " in denied and "dropped" in denied
    assert allowed.strip().splitlines()[-1].strip() == "verdict: allowed"
    assert ("allowed by policy myns/frontend-from-bob ingress rule 0: peer namespaceSelector user=bob, port TCP 443"
            in allowed)
    # The README shows this very output (numbers, ages and the run's namespace prefix aside).
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```\n$ kubectl get policystatus -o wide\n", 1)[1].split("```", 1)[0]
    shown_status, shown_explain = example.split("\n$ netfence explain alice/client myns/frontend --port 443\n")
    after_header = lambda section: section.split("\n", 1)[1]  # noqa: E731 - the rest of the step's header line
    assert normalised(shown_status) == normalised(after_header(status))
    assert normalised(shown_explain) == normalised(after_header(denied))
    assert "\033[" not in out, "no colour when stdout is not a terminal"
    assert not (tmp_path / "demo" / "demo.json").exists()
    state = read_state(tmp_path / "demo" / "cluster")
    assert state is not None and state.running() == [], "the demo left control-plane processes running"
    # The demo's pod servers logged to <prefix>-p<n>.log: that names its run, whose namespaces,
    # pod servers and owner record must all be gone.
    server_logs = sorted((tmp_path / "demo" / "env" / "fabric").glob("*-p*.log"))
    assert len(server_logs) == len(PODS), f"expected a log per demo pod, found {server_logs}"
    prefixes = {p.name.split("-")[0] for p in server_logs}
    assert len(prefixes) == 1, prefixes
    prefix = prefixes.pop()
    assert run_netns(prefix) == [], f"the demo left network namespaces of run {prefix}"
    assert podserver_pids(prefix) == {}, f"the demo left pod servers of run {prefix}"
    assert not owner_path(prefix).exists(), f"the demo left the owner record of run {prefix}"
