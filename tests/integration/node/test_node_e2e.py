"""CI's real-node run: ``python -m netfence_lab.node_e2e --reduced`` (docs/design.md "Node test bed").

Sets up what it needs (hack/setup-node.sh: Debian's containerd, runc, CNI plugins,
podman, mmdebstrap and the node tools; hack/node-images.sh: the images of two tags of
the same code), then runs the reduced flow: node up, ``helm install`` with default
values, one policy ``Enforced`` with real probes both ways, one ``helm upgrade`` to
the second tag with probes every 100 ms during the rollout (zero wrong), node down.
The full flow is ``make node-e2e``.

The node is taken down (``netfence node down``) whatever happens, and the machine
must be left as it was for the tests after this one: no node network namespace,
mount, cgroup or process left, the kubelet's sysctls restored, the host's
iptables and addresses/routes unchanged. A machine that cannot run the node fails
here with exactly what it lacks (``netfence_lab.node.preflight``), never skips.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netfence_lab.node import CGROUP_BASE, CGROUP_ROOT, KERNEL_SYSCTLS, NODE_NETNS, default_dir, preflight

REPO = Path(__file__).resolve().parents[3]
TAGS = ("0.1.0", "0.1.0-b")  # the install tag and an upgrade tag of the same code
# node up, install, pods Ready, workloads Ready, policy Enforced, real connections, probers, upgrade
REDUCED_CHECKS = 8
# Warm caches (tools, image layers): ~4 min; a change of operator/ adds ~1-2 min of image
# build; a fresh machine builds the node tools and the images' dependency layers first.
BUDGET = 1500.0
CLEANUP_MARGIN = 120.0

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def host_iptables() -> str:
    """The host namespace's rules in every table of both families, without counters."""
    parts = []
    for tool in ("iptables-save", "ip6tables-save"):
        res = subprocess.run([tool], capture_output=True, text=True, check=True)
        parts.append("\n".join(_COUNTERS.sub("", line) for line in res.stdout.splitlines()
                               if not line.startswith("#")))
    return "\n".join(parts)


def sysctls() -> dict[str, str]:
    return {key: (Path("/proc/sys") / key).read_text().strip() for key in KERNEL_SYSCTLS}


def leftovers(workdir: Path) -> list[str]:
    """What of the node is still on the machine once it is down."""

    def names_workdir(text: str) -> bool:  # the node's folder, not a sibling such as node-images
        return f"{workdir}/" in text or text.endswith(str(workdir)) or f"{workdir} " in text

    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    if NODE_NETNS in netns.split():
        found.append(f"netns {NODE_NETNS}")
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if names_workdir(line.split()[4])]
    found += [f"mount {m}" for m in mounts]
    found += [f"cgroup {p}" for p in CGROUP_BASE.glob(f"*/{CGROUP_ROOT}")]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if names_workdir(cmdline):
            found.append(f"process {entry.name}: {cmdline.strip()[:160]}")
    return found


def run_step(argv: list[str], deadline: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run a set-up step within the budget; its failure fails the test with its last output lines."""
    timeout = deadline - time.monotonic() - CLEANUP_MARGIN
    if timeout <= 0:
        pytest.fail(f"no time left for {what}")
    try:
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout:.0f}s")
    if res.returncode != 0:
        pytest.fail(f"{what} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return res


def run_e2e(deadline: float) -> tuple[int, str]:
    """The reduced flow; on running out of time it gets SIGTERM, on which it takes the node down."""
    argv = [sys.executable, "-m", "netfence_lab.node_e2e", "--reduced", "--tags", ",".join(TAGS)]
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            output, _ = proc.communicate(timeout=deadline - time.monotonic() - CLEANUP_MARGIN)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=CLEANUP_MARGIN / 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            pytest.fail(f"node-e2e --reduced did not finish in time; its output:\n{output[-6000:]}")
        return proc.returncode, output


@pytest.mark.timeout(BUDGET + 60)
def test_reduced_node_e2e(host_network_snapshot: Callable[[], str]) -> None:
    deadline = time.monotonic() + BUDGET
    problems = preflight()
    # commands and CNI plugins come from hack/setup-node.sh; everything else the machine must have
    if [p for p in problems if not p.startswith(("commands ", "CNI plugins "))]:
        pytest.fail("this machine cannot run the node test bed; missing:\n  " + "\n  ".join(problems))
    run_step(["bash", "hack/setup-node.sh"], deadline, "hack/setup-node.sh")
    problems = preflight()
    assert not problems, "after hack/setup-node.sh, still missing:\n  " + "\n  ".join(problems)
    workdir = default_dir().resolve()
    run_step(["bash", "hack/node-images.sh", str(workdir.parent / "node-images"), *TAGS], deadline,
             "hack/node-images.sh")

    iptables_before, network_before, sysctls_before = host_iptables(), host_network_snapshot(), sysctls()
    try:
        code, output = run_e2e(deadline)
    finally:
        down = subprocess.run([str(Path(sys.executable).parent / "netfence"), "node", "down", "--dir", str(workdir)],
                              capture_output=True, text=True, timeout=CLEANUP_MARGIN, check=False)
        assert down.returncode == 0, down.stdout + down.stderr
    print(output)  # the report, for the CI log
    # the machine as before, for the tests after this one (checked whatever the run's outcome)
    dirty = [*leftovers(workdir)]
    if sysctls() != sysctls_before:
        dirty.append(f"sysctls {sysctls()} != {sysctls_before} before")
    if host_iptables() != iptables_before:
        dirty.append("the host's iptables changed")
    if host_network_snapshot() != network_before:
        dirty.append("the host's addresses, routes or links changed")
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert code == 0 and summary == f"{REDUCED_CHECKS} passed, 0 failed", (
        f"exit {code}; left on the machine: {dirty or 'nothing'}\n{output[-6000:]}")
    assert dirty == []
