"""free_port hands out listen ports outside the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from netfence_lab import process
from netfence_lab.process import ephemeral_range, free_port


def test_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50, "one process never gets the same port twice"
    assert all(1024 <= p < low for p in ports), (low, ports)
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", ports[0]))


def test_a_port_taken_on_any_address_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, busy + 1 if busy < 65535 else busy - 1])
        monkeypatch.setattr(process, "ephemeral_range", lambda: (65536, 65536))
        monkeypatch.setattr(process.random.SystemRandom, "randint", lambda self, a, b: next(picks))
        assert free_port() != busy


def test_ephemeral_range_reads_proc_and_falls_back(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_range(str(tmp_path / "range")) == (40000, 50000)
    assert ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
