"""The README's main job, as a user runs it: `netfence demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from netfence.demo import PODS
from netfence.testbed.cluster import read_state
from netfence.testbed.runs import owner_path, podserver_pids, run_netns


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
    # DROP counters rose on the nodes and name the denied endpoint
    drops = out.split("DROP counters that rose", 1)[1]
    assert "packets dropped" in drops
    assert "default/web" in drops
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
