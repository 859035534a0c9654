"""Fixtures for tests that build namespace fabrics (nodes and pods as network namespaces)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator

import pytest

from netfence_lab.fabric import Fabric, cleanup_stale
from netfence_lab.probe import Prober
from netfence_lab.runs import owned_runs, remove_run


@pytest.fixture(scope="session", autouse=True)
def _netns_session_guard() -> Iterator[None]:
    """Remove fabrics of crashed earlier runs first; at the end, fail if this session left any behind."""
    cleanup_stale()
    yield
    left = owned_runs()
    for prefix in left:
        remove_run(prefix)
    assert not left, f"test fabrics left open by this session (now removed): {left}"


@pytest.fixture
def make_fabric() -> Iterator[Callable[[], Fabric]]:
    """Factory for fabrics that are closed (and checked for leftovers) after the test."""
    made: list[Fabric] = []

    def make() -> Fabric:
        fabric = Fabric()
        made.append(fabric)
        return fabric

    yield make
    for fabric in made:
        fabric.close()
    assert all(not f.leftovers() for f in made), [f.leftovers() for f in made]


@pytest.fixture(scope="session")
def prober() -> Prober:
    return Prober()


_VOLATILE = re.compile(r"(valid_lft|preferred_lft|expires) \S+")


def _host_network_snapshot() -> str:
    """The host namespace's addresses, routes and links (no counters), to compare before/after."""
    parts = []
    for argv in (["ip", "-o", "addr"], ["ip", "route"], ["ip", "-6", "route"], ["ip", "-o", "link"],
                 ["ip", "rule"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        out = _VOLATILE.sub("", out)
        parts.append(" ".join(argv) + "\n" + out)
    return "\n".join(parts)


@pytest.fixture
def host_network_snapshot() -> Callable[[], str]:
    """Returns a function that snapshots the host namespace's addresses, routes and links."""
    return _host_network_snapshot
