"""The Prober binds probes to allocated source ports (on loopback, no namespaces needed)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from netfence_lab.netns import NetnsSwitcher
from netfence_lab.ports import SourcePorts
from netfence_lab.probe import Probe, Prober

T = TypeVar("T")


class HereSwitcher(NetnsSwitcher):
    """Creates sockets in the current namespace (``netns`` is ignored)."""

    def call(self, netns: str, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)


class UdpEcho:
    """Answers every datagram and remembers its source port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.sources: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                _, peer = self.sock.recvfrom(64)
            except OSError:
                continue
            self.sources.append(peer[1])
            self.sock.sendto(b"echo\n", peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    try:
        yield server
    finally:
        server.close()


def free_block(size: int) -> int:
    """The first port of ``size`` consecutive ports below the ephemeral range that are free now."""
    for low in range(20000, 32000, size):
        socks = []
        try:
            for port in range(low, low + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return low
    raise RuntimeError("no free port block")


def test_every_probe_gets_a_fresh_source_port_and_taken_ports_are_skipped(echo: UdpEcho) -> None:
    low = free_block(8)
    ports = SourcePorts(low, low + 7, quarantine=300)
    prober = Prober(HereSwitcher(), source_ports=ports)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("0.0.0.0", low + 1))  # taken in the "namespace": EADDRINUSE, the prober moves on
        probe = Probe("here", "127.0.0.1", echo.port, "UDP")
        assert [prober.exchange(probe) for _ in range(3)] == ["echo"] * 3
    assert echo.sources == [low, low + 2, low + 3]


def test_the_destination_port_is_never_a_source_port(echo: UdpEcho) -> None:
    low = free_block(4)
    ports = SourcePorts(low, low + 3, quarantine=300)
    prober = Prober(HereSwitcher(), source_ports=ports)
    # a probe *to* low+1 (nobody listens: refused) reserves it as a source port
    assert prober.exchange(Probe("here", "127.0.0.1", low + 1, "UDP"), timeout=0.3) is None
    assert prober.exchange(Probe("here", "127.0.0.1", echo.port, "UDP")) == "echo"
    assert prober.exchange(Probe("here", "127.0.0.1", echo.port, "UDP")) == "echo"
    assert echo.sources == [low + 2, low + 3]  # low went to the refused probe


def test_ports_are_released_into_quarantine_even_when_the_probe_fails() -> None:
    low = free_block(2)
    ports = SourcePorts(low, low + 1, quarantine=300, max_wait=0.05)
    prober = Prober(HereSwitcher(), source_ports=ports)
    dead = Probe("here", "127.0.0.1", 9, "TCP")  # discard port: nothing listens, refused
    assert prober.exchange(dead, timeout=0.3) is None
    assert prober.exchange(dead, timeout=0.3) is None
    with pytest.raises(RuntimeError, match="quarantine"):  # both quarantined: an error, never a verdict
        prober.exchange(dead, timeout=0.3)


def test_without_source_ports_the_kernel_chooses(echo: UdpEcho) -> None:
    prober = Prober(HereSwitcher())
    assert prober.exchange(Probe("here", "127.0.0.1", echo.port, "UDP")) == "echo"
    assert echo.sources and echo.sources[0] >= 1024
