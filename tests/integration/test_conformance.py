"""The conformance scenarios, for real: one test per scenario file, plus the runner's own contract.

Every file of ``tests/conformance`` (Netfence's own scenarios) and of the shared
folder ``../shared/conformance/scenarios`` (laid out next to the repository, in
CI too) runs in-process on the session's control plane, with real agents,
controller, namespaces and packets. Then: a malformed file is reported (file and
key named) without stopping the others, the ``--json`` report has its shape, and
the real ``netfence conformance run`` command passes and fails as it should.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netfence_lab.cluster import LocalCluster
from netfence_lab.conformance.command import load_all
from netfence_lab.conformance.runner import ScenarioResult, run_scenarios, summary_line, write_json
from netfence_lab.conformance.scenario import Scenario, ScenarioError, collect_files, load_scenario

REPO = Path(__file__).resolve().parents[2]
OWN = REPO / "tests" / "conformance"
SHARED = REPO.parent / "shared" / "conformance" / "scenarios"
SCENARIO_FILES = collect_files([OWN, *([SHARED] if SHARED.is_dir() else [])])


def kernel_has_sctp() -> bool:
    """Whether this kernel offers SCTP sockets (probes of SCTP are skipped otherwise)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError:
        return False
    return True


HAS_SCTP = kernel_has_sctp()


def sctp_only(scenario: Scenario) -> bool:
    protocols = {e.protocol for step in scenario.steps for e in step.expect}
    return protocols == {"SCTP"}


def test_scenario_folders_are_there() -> None:
    """Both folders exist and hold scenarios, so the parametrized tests below cannot silently vanish."""
    assert SHARED.is_dir(), f"the shared scenarios are expected at {SHARED}"
    assert collect_files([SHARED]), SHARED
    assert len(collect_files([OWN])) >= 25, OWN


def describe(lines: list[str], result: ScenarioResult) -> str:
    """The runner's output plus its dumps (the work folder may be gone when someone reads a CI log)."""
    output = "\n".join(lines)
    for step in result.steps:
        if step.dump and Path(step.dump).is_file():
            output += f"\n--- {step.dump}\n{Path(step.dump).read_text()}"
    return output


@pytest.mark.parametrize(
    "path", SCENARIO_FILES, ids=lambda p: f"{'own' if p.is_relative_to(OWN) else 'shared'}/{p.stem}"
)
async def test_scenario(path: Path, cluster: LocalCluster, tmp_path: Path) -> None:
    """Dual-stack: every cell must hold over IPv4 and over IPv6 (``--ip-family dual``)."""
    scenario = load_scenario(path)
    lines: list[str] = []
    [result] = await run_scenarios([scenario], cluster, tmp_path, out=lines.append, ip_family="dual")
    output = describe(lines, result)
    expected = "skipped" if sctp_only(scenario) and not HAS_SCTP else "passed"
    assert result.status == expected, f"{path}: {result.status} ({result.error})\n{output}"
    assert len(result.steps) == len(scenario.steps), output
    for step, step_result in zip(scenario.steps, result.steps, strict=True):
        assert step_result.enforce_seconds is not None, output
        assert [(e.port, e.protocol) for e in step.expect] == [(e.port, e.protocol) for e in step_result.expects]
        for table, expect in zip(step.expect, step_result.expects, strict=True):
            assert expect.families == ((table.family,) if table.family else ("ipv4", "ipv6")), output
            # SCTP without kernel support is reported as skipped, never as passed.
            want = "skipped" if expect.protocol == "SCTP" and not HAS_SCTP else "passed"
            assert expect.status == want, f"step {step_result.index} {expect.port}/{expect.protocol}\n{output}"
            assert all(v is not None for v in expect.observed.values()) == (want == "passed")


# --- the runner's contract --------------------------------------------------------

SMALL = """\
name: {name}
description: web accepts nothing, client stays open (one node, two pods).
nodes: 1
namespaces:
  - name: small
pods:
  - {{namespace: small, name: web, labels: {{app: web}}, ports: ["80/TCP"{extra_port}]}}
  - {{namespace: small, name: client, labels: {{app: client}}, ports: ["80/TCP"{extra_port}]}}
steps:
  - expect:
      - port: 80
        protocol: {protocol}
        table: |
          -            small/web small/client
          small/web    .         .
          small/client .         .
  - actions:
      - apply:
          apiVersion: networking.k8s.io/v1
          kind: NetworkPolicy
          metadata: {{namespace: small, name: web-deny}}
          spec:
            podSelector: {{matchLabels: {{app: web}}}}
            policyTypes: [Ingress]
    expect:
      - port: 80
        protocol: {protocol}
        table: |
          -            small/web small/client
          small/web    .         .
          small/client {cell}         .
"""


def small_scenario(
    path: Path, name: str = "small", *, protocol: str = "TCP", cell: str = "X", extra_port: str = ""
) -> Path:
    path.write_text(SMALL.format(name=name, protocol=protocol, cell=cell, extra_port=extra_port))
    return path


BAD = """\
name: broken
preset: e2e
steps:
  - expect:
      - port: 80
        protocol: ICMP
        table: |
          -   x/a
          x/a .
"""


@pytest.fixture(scope="module")
async def mixed_run(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[ScenarioResult], str]:
    """One runner call over: a malformed file, a good scenario, an SCTP-only scenario."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "a-broken.yaml").write_text(BAD)
    small_scenario(folder / "b-good.yaml", "good")
    small_scenario(folder / "c-sctp.yaml", "sctp-only", protocol="SCTP", extra_port=', "80/SCTP"')
    items = load_all([folder])
    assert [type(i) for i in items] == [ScenarioError, Scenario, Scenario]
    lines: list[str] = []
    results = await run_scenarios(items, cluster, folder / "work", out=lines.append)
    return results, "\n".join(lines)


def test_malformed_file_is_reported_and_the_others_still_run(mixed_run: tuple[list[ScenarioResult], str]) -> None:
    results, output = mixed_run
    broken, good, sctp = results
    assert broken.status == "error"
    assert broken.error is not None
    assert "a-broken.yaml" in broken.error
    assert "steps[0].expect[0].protocol" in broken.error and "ICMP" in broken.error
    assert f"ERROR {broken.error}" in output
    assert good.status == "passed", output
    assert [s.status for s in good.steps] == ["passed", "passed"]
    assert sctp.status == ("passed" if HAS_SCTP else "skipped"), output
    assert summary_line(results) == ("2 passed, 1 failed" if HAS_SCTP else "1 passed, 1 failed, 1 skipped")


def test_sctp_only_step_is_reported_as_skipped(mixed_run: tuple[list[ScenarioResult], str]) -> None:
    results, output = mixed_run
    sctp = results[2]
    if HAS_SCTP:
        assert all(s.status == "passed" for s in sctp.steps), output
        return
    assert [s.status for s in sctp.steps] == ["skipped", "skipped"]
    assert all(e.status == "skipped" and e.skipped for s in sctp.steps for e in s.expects)
    assert "step 1: skipped (enforced in" in output
    assert "80/SCTP: no SCTP in this kernel" in output
    assert "PASSED sctp-only" not in output and "SKIPPED sctp-only" in output


def test_json_report_shape(mixed_run: tuple[list[ScenarioResult], str], tmp_path: Path) -> None:
    results, _ = mixed_run
    write_json(results, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"summary", "scenarios", "steps", "enforceSeconds"}
    assert report["summary"] == summary_line(results)
    assert report["steps"] == 4  # the broken file has none
    assert [s["status"] for s in report["scenarios"]] == [r.status for r in results]
    broken, good, _ = report["scenarios"]
    assert set(good) == {"name", "path", "status", "error", "seconds", "steps"}
    assert good["name"] == "good" and good["path"].endswith("b-good.yaml") and good["error"] is None
    assert good["seconds"] > 0
    assert broken["steps"] == [] and "steps[0].expect[0].protocol" in broken["error"]
    for step in good["steps"]:
        assert set(step) == {"index", "status", "passed", "enforceSeconds", "error", "dump", "expect"}
        assert isinstance(step["enforceSeconds"], float) and 0 <= step["enforceSeconds"] < 60
        assert step["status"] == "passed" and step["passed"] is True and step["dump"] is None
        [expect] = step["expect"]
        assert expect == {"port": 80, "protocol": "TCP", "status": "passed", "passed": True, "skipped": False,
                          "wrong": [], "families": ["ipv4"]}
    enforce = sorted(s["enforceSeconds"] for r in report["scenarios"] for s in r["steps"])
    assert report["enforceSeconds"] == {"p50": enforce[len(enforce) // 2], "max": enforce[-1]}


V4_ONLY_ALLOW = """\
name: v4-only-allow
description: web admits client by its IPv4 address only; the table claims the cell open, so it fails over IPv6.
nodes: 2
namespaces:
  - name: fam
pods:
  - {namespace: fam, name: web, labels: {app: web}, ports: ["80/TCP"]}
  - {namespace: fam, name: client, labels: {app: client}, ports: ["80/TCP"]}
steps:
  - actions:
      - apply:
          apiVersion: networking.k8s.io/v1
          kind: NetworkPolicy
          metadata: {namespace: fam, name: web-from-client-v4}
          spec:
            podSelector: {matchLabels: {app: web}}
            ingress:
              - from:
                  - ipBlock: {cidr: "${cidr4:fam/client/32}"}
    expect:
      - port: 80
        table: |
          -          fam/web fam/client
          fam/web    .       .
          fam/client .       .
"""


async def test_dual_reports_the_family_that_fails(cluster: LocalCluster, tmp_path: Path) -> None:
    """A cell open over IPv4 and closed over IPv6 fails under ``dual`` and says so; it passes under ipv4."""
    path = tmp_path / "v4-only-allow.yaml"
    path.write_text(V4_ONLY_ALLOW)
    scenario = load_scenario(path)
    lines: list[str] = []
    ipv4, dual = [
        (await run_scenarios([scenario], cluster, tmp_path / mode, out=lines.append, ip_family=mode))[0]
        for mode in ("ipv4", "dual")
    ]
    output = "\n".join(lines)
    assert ipv4.status == "passed", output
    assert dual.status == "failed", output
    [expect] = dual.steps[0].expects
    cell = ("fam/client", "fam/web")
    assert expect.wrong == [cell] and expect.wrong_by_family == {"ipv4": [], "ipv6": [cell]}
    assert expect.observed_by_family["ipv4"][cell] is True and expect.observed_by_family["ipv6"][cell] is False
    assert "80/TCP over ipv6: 1 wrong cells" in output
    assert "observed over ipv6:" in output and "observed over ipv4:" not in output
    assert "fam/client -> fam/web over ipv6: expected allowed, observed the opposite" in output
    assert dual.steps[0].dump is not None
    assert "ip6tables-save" in describe(lines, dual)  # the dump holds both families' rules


# --- the real command ---------------------------------------------------------------


def netfence_cli(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netfence.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_cli_passes_and_fails(tmp_path: Path) -> None:
    good = small_scenario(tmp_path / "good.yaml", "cli-good")
    ok = netfence_cli("conformance", "run", "--json", tmp_path / "ok.json", "--workdir", tmp_path / "ok", good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[-1] == "1 passed, 0 failed"
    assert "PASSED cli-good" in ok.stdout
    assert json.loads((tmp_path / "ok.json").read_text())["summary"] == "1 passed, 0 failed"

    # client -> web is claimed to be allowed, but web denies all ingress.
    wrong = small_scenario(tmp_path / "wrong.yaml", "cli-wrong", cell=".")
    bad = netfence_cli("conformance", "run", "--workdir", tmp_path / "bad", wrong)
    out = bad.stdout
    assert bad.returncode == 1, out + bad.stderr
    assert out.splitlines()[-1] == "0 passed, 1 failed"
    assert "step 0: pass" in out and "step 1: FAIL" in out and "FAILED cli-wrong" in out
    failure = out.split("step 1: FAIL", 1)[1]
    assert "80/TCP: 1 wrong cells" in failure
    assert "small/client -> small/web: expected allowed, observed the opposite" in failure
    expected = failure.split("expected:", 1)[1].split("observed:", 1)[0]
    observed = failure.split("observed:", 1)[1].split("differences:", 1)[0]
    differences = failure.split("differences:", 1)[1].split("small/client -> small/web", 1)[0]
    assert row(expected, "small/client") == [".", "-"]
    assert row(observed, "small/client") == ["X", "-"]
    assert row(differences, "small/client") == ["!", "-"]
    assert row(differences, "small/web") == ["-", "."]
    dump = Path(failure.split("netfilter dump of the nodes: ", 1)[1].splitlines()[0].strip())
    assert dump.is_file() and dump.is_relative_to(tmp_path / "bad")
    text = dump.read_text()
    assert "### node node-0" in text and "NETFENCE-FORWARD" in text
    assert "netfence ingress to small/web denied" in text


def row(table: str, client: str) -> list[str]:
    """The cells of one client's row in a printed table (after its header line)."""
    rows = [ln.split() for ln in table.splitlines() if ln.strip()][1:]
    return next(r[1:] for r in rows if r[0] == client)


def test_small_scenario_template_is_valid(tmp_path: Path) -> None:
    """The template the tests above write parses, and in the wrong variant only the one cell differs."""
    good = load_scenario(small_scenario(tmp_path / "g.yaml"))
    wrong = load_scenario(small_scenario(tmp_path / "w.yaml", cell="."))
    cells = good.steps[1].expect[0].cells
    assert cells[("small/client", "small/web")] is False
    assert {k for k, v in wrong.steps[1].expect[0].cells.items() if cells[k] != v} == {("small/client", "small/web")}
