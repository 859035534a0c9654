"""Bad input and failures of the ``netfence`` CLI end with one 'netfence: ...; ...' line on stderr."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netfence.cli import CliError, Parser, add_command, check_root, main, one_line
from netfence_lab.cluster import describe_failure, read_state
from netfence_lab.tools import ToolsError, ensure_tools

SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfence.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def assert_one_error_line(stderr: str, *fragments: str, what_to_do: str = "; ") -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("netfence: "), stderr
    assert what_to_do in lines[0], stderr
    assert not lines[0].startswith("netfence: netfence:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


@pytest.fixture
def no_go_env(tmp_path: Path) -> dict[str, str]:
    assert not any(Path(d, "go").exists() for d in SYSTEM_PATH.split(":")), "go must not be on SYSTEM_PATH"
    env = {k: v for k, v in os.environ.items() if k not in ("NETFENCE_BIN", "XDG_CACHE_HOME")}
    env.update(PATH=SYSTEM_PATH, NETFENCE_CACHE=str(tmp_path / "empty-cache"))
    return env


def test_go_missing_and_tools_not_built(no_go_env: dict[str, str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PATH", "NETFENCE_CACHE"):
        monkeypatch.setenv(key, no_go_env[key])
    monkeypatch.delenv("NETFENCE_BIN", raising=False)
    with pytest.raises(ToolsError, match="the Go toolchain is missing: install Go"):
        ensure_tools()

    result = run_cli("cluster", "up", "--dir", str(tmp_path / "c"), env=no_go_env)
    assert result.returncode == 1
    assert result.stdout == ""
    # tools.py words this one "<what>: <what to do>"
    assert_one_error_line(result.stderr, "Go toolchain is missing", what_to_do=": install Go")
    assert read_state(tmp_path / "c") is None


def test_failed_build(no_go_env: dict[str, str], tmp_path: Path) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "go").write_text("#!/bin/sh\necho 'go: cannot reach the module proxy' >&2\nexit 1\n")
    (fake / "go").chmod(0o755)
    env = dict(no_go_env, PATH=f"{fake}:{SYSTEM_PATH}")
    result = run_cli("cluster", "up", "--dir", str(tmp_path / "c"), env=env)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "building the control-plane tools failed", "building etcd",
                          "module proxy")
    cache = Path(env["NETFENCE_CACHE"])
    assert not (cache / "bin" / "etcd").exists()
    assert [p.name for p in (cache / "tools").iterdir()] == []  # no half-built tool left
    assert read_state(tmp_path / "c") is None


def test_port_in_use(taken_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cluster", "up", "--dir", str(tmp_path / "c"), "--port", str(taken_port)])
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, f"port {taken_port}", "already in use", "--port")
    assert read_state(tmp_path / "c") is None


def test_bad_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "up", "--port", "99999"]) == 2
    assert_one_error_line(capsys.readouterr().err, "outside 1-65535", "--help")
    assert main(["cluster", "sideways"]) == 2
    assert_one_error_line(capsys.readouterr().err, "invalid choice")


def test_needs_root(capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[str] = []

    def netns_command(args: argparse.Namespace) -> int:
        ran.append("ran")
        return 0

    parser = Parser(prog="netfence")
    sub = parser.add_subparsers(dest="command", required=True)
    add_command(sub, "fabric", netns_command, "needs network namespaces", needs_root=True)

    assert main(["fabric"], geteuid=lambda: 1000, parser=parser) == 1
    assert_one_error_line(capsys.readouterr().err, "'netfence fabric' needs root", "sudo netfence fabric")
    assert ran == []
    assert main(["fabric"], geteuid=lambda: 0, parser=parser) == 0
    assert ran == ["ran"]
    with pytest.raises(CliError, match="needs root"):
        check_root("netfence demo", geteuid=lambda: 1000)


def test_status_and_down_without_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "status", "--dir", str(tmp_path)]) == 3
    assert_one_error_line(capsys.readouterr().err, "no cluster recorded", "netfence cluster up")
    assert main(["cluster", "down", "--dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "nothing to stop" in captured.out and captured.err == ""


def test_describe_failure() -> None:
    log = Path("/x/kube-apiserver.log")
    apiserver = ('E1126 06:14:16.879280   22514 run.go:72] "command failed" err="failed to create listener: '
                 'failed to listen on 127.0.0.1:6443: listen tcp 127.0.0.1:6443: '
                 'bind: address already in use"')
    message, in_use = describe_failure("kube-apiserver", apiserver, log)
    assert in_use
    assert message.startswith(
        "kube-apiserver could not listen on 127.0.0.1:6443: the address is already in use;"
    )
    message, in_use = describe_failure("etcd", "starting\nfatal: data dir is corrupt\nbye\n", log)
    assert not in_use
    assert message == f"etcd did not start (fatal: data dir is corrupt); see {log} for the full log"


def test_one_line() -> None:
    assert one_line("netfence: a failed: netfence: b\n  c; d") == "a failed: b c; d"
