"""Shared session fixtures: the control-plane tools and one LocalCluster per session.

Fixtures are lazy: unit tests that do not ask for ``tools`` or ``cluster`` need
neither root nor the binaries. SIGTERM/SIGHUP are turned into
KeyboardInterrupt so an interrupted run still tears its clusters down, and
failed fixture teardowns are repeated in a summary section at the end.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from netfence_lab.cluster import LocalCluster, raise_on_signals
from netfence_lab.tools import Tools, ensure_tools

_TEARDOWN_FAILURES = pytest.StashKey[list[str]]()
_RESTORE_SIGNALS = pytest.StashKey[Callable[[], None]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TEARDOWN_FAILURES] = []
    config.stash[_RESTORE_SIGNALS] = raise_on_signals()


def pytest_unconfigure(config: pytest.Config) -> None:
    restore = config.stash.get(_RESTORE_SIGNALS, None)
    if restore is not None:
        restore()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "teardown" and report.failed:
        what = call.excinfo.exconly() if call.excinfo is not None else report.longreprtext
        item.config.stash[_TEARDOWN_FAILURES].append(f"{item.nodeid}: {what}")
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    failures = config.stash.get(_TEARDOWN_FAILURES, [])
    if failures:
        terminalreporter.section("fixture teardown failures (processes or files may be left behind)",
                                 sep="!", red=True, bold=True)
        for line in failures:
            terminalreporter.line(line, red=True)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A 127.0.0.1 port some socket listens on for the test (so starting a server on it must fail)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tools() -> Tools:
    """Paths of etcd, kube-apiserver, kubectl and helm (built once per machine if missing)."""
    return ensure_tools()


@pytest.fixture(scope="session")
def cluster(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One API server (+ its etcd) and Netfence's etcd for the whole session."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster"), tools)
    local.start()
    try:
        yield local
    finally:
        local.stop()
