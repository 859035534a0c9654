"""Connectivity probes between pod namespaces, without a process per probe.

A socket belongs to the network namespace it was created in, whichever thread
uses it later. So the :class:`Prober` creates each probe's socket inside the
source pod's namespace on the switcher thread (:mod:`netfence_lab.netns`)
and does the (blocking, timed) exchange on the caller's thread. Probes are
therefore safe to run concurrently; :meth:`Prober.probe_many` does so with
bounded concurrency.

Probe semantics follow the conformance format: TCP/SCTP connect, send a line
and read the reply line; UDP send a datagram and await a reply; all within the
timeout (1 s by default). SCTP probes return ``None`` when the kernel has no
SCTP, meaning "skipped", never "passed".

Source ports: by default the kernel picks them. A prober given
:class:`~netfence_lab.ports.SourcePorts` (the conformance runner's, one per
run) binds every probe's socket to a port of its own instead, so no probe
reuses the 5-tuple of an earlier one whose conntrack entry may still exist: a
probe is always a new flow, judged by the policy in force now.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from netfence_lab.netns import NetnsSwitcher, default_switcher
from netfence_lab.ports import SourcePorts

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0
DEFAULT_CONCURRENCY = 64
PROTOCOLS = ("TCP", "UDP", "SCTP")
_REQUEST = b"netfence-probe\n"
_NO_SCTP = {errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT, errno.EPROTOTYPE}
BIND_ATTEMPTS = 64  # source ports tried per probe when they are taken in its namespace


class Probe(NamedTuple):
    """One probe: from the namespace ``src_netns`` to ``dst_ip:port/protocol`` (IPv4 or IPv6)."""

    src_netns: str
    dst_ip: str
    port: int
    protocol: str = "TCP"


class SctpUnsupported(OSError):
    """The kernel of this machine has no SCTP."""


class Prober:
    """Runs probes from inside named network namespaces. Thread-safe.

    ``source_ports``: bind each probe to a port from this allocator (see the module
    docstring); None lets the kernel choose.
    """

    def __init__(self, switcher: NetnsSwitcher | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 source_ports: SourcePorts | None = None) -> None:
        self._switcher = switcher or default_switcher()
        self.concurrency = concurrency
        self.source_ports = source_ports

    # -- sockets -----------------------------------------------------------

    def open_socket(self, netns: str, kind: int, proto: int = 0, family: int = socket.AF_INET) -> socket.socket:
        """A new socket of ``family`` (AF_INET or AF_INET6) living in ``netns``."""
        sock: socket.socket = self._switcher.call(netns, socket.socket, family, kind, proto)
        if family == socket.AF_INET6:  # its source port must not hold the IPv4 one too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock

    def _sctp_socket(self, netns: str, family: int) -> socket.socket:
        try:
            return self.open_socket(netns, socket.SOCK_STREAM, socket.IPPROTO_SCTP, family)
        except OSError as exc:
            if exc.errno in _NO_SCTP:
                raise SctpUnsupported(exc.errno, f"no SCTP in this kernel: {exc.strerror}") from exc
            raise

    # -- exchanges (reply text, None on failure) ---------------------------

    def exchange(self, probe: Probe, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """Do the probe and return the server's reply (the pod name), or None if it failed.

        Raises :class:`SctpUnsupported` for SCTP probes on a kernel without SCTP.
        """
        proto = probe.protocol.upper()
        family = socket.AF_INET6 if ":" in probe.dst_ip else socket.AF_INET
        if proto == "UDP":
            sock = self.open_socket(probe.src_netns, socket.SOCK_DGRAM, family=family)
        elif proto == "TCP":
            sock = self.open_socket(probe.src_netns, socket.SOCK_STREAM, family=family)
        elif proto == "SCTP":
            sock = self._sctp_socket(probe.src_netns, family)
        else:
            raise ValueError(f"unknown protocol {probe.protocol!r} (want one of {PROTOCOLS})")
        source: int | None = None
        try:
            with sock:
                if self.source_ports is not None:
                    source = self._bind_source(sock, proto, probe.port)
                try:
                    if proto == "UDP":
                        return _udp_exchange(sock, probe.dst_ip, probe.port, timeout)
                    return _stream_exchange(sock, probe.dst_ip, probe.port, timeout)
                except OSError:  # refused, unreachable, timed out, reset
                    return None
        finally:  # after close(): the flow is over, its port goes into quarantine
            if source is not None and self.source_ports is not None:
                self.source_ports.release(proto, source)

    def _bind_source(self, sock: socket.socket, proto: str, dst_port: int) -> int:
        """Bind ``sock`` to a port of :attr:`source_ports` (skipping ports taken in its namespace).

        A failure here is the test bed's, not a verdict: it raises instead of returning None.
        """
        ports = self.source_ports
        assert ports is not None
        ports.reserve(dst_port)  # never a source port: a later flow from it could be an earlier one's reply
        for _ in range(BIND_ATTEMPTS):
            port = ports.take(proto)
            try:
                sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", port))
            except OSError as exc:
                ports.release(proto, port)
                if exc.errno != errno.EADDRINUSE:
                    raise
                log.debug("%s source port %d is taken in the source namespace; trying the next", proto, port)
                continue
            return port
        raise OSError(errno.EADDRINUSE, f"no free {proto} source port after {BIND_ATTEMPTS} attempts")

    # -- boolean probes ----------------------------------------------------

    def probe_tcp(self, src_netns: str, dst_ip: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> bool:
        return self.exchange(Probe(src_netns, dst_ip, port, "TCP"), timeout) is not None

    def probe_udp(self, src_netns: str, dst_ip: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> bool:
        return self.exchange(Probe(src_netns, dst_ip, port, "UDP"), timeout) is not None

    def probe_sctp(self, src_netns: str, dst_ip: str, port: int,
                   timeout: float = DEFAULT_TIMEOUT) -> bool | None:
        """True/False like TCP; None when the kernel has no SCTP (report it as skipped)."""
        return self.probe(Probe(src_netns, dst_ip, port, "SCTP"), timeout)

    def probe(self, probe: Probe, timeout: float = DEFAULT_TIMEOUT) -> bool | None:
        try:
            return self.exchange(probe, timeout) is not None
        except SctpUnsupported:
            return None

    def probe_many(self, probes: Iterable[Probe], timeout: float = DEFAULT_TIMEOUT,
                   concurrency: int | None = None) -> dict[Probe, bool | None]:
        """Run probes in parallel (at most ``concurrency`` at once); result per probe (None = skipped)."""
        todo = list(dict.fromkeys(probes))
        if not todo:
            return {}
        workers = max(1, min(concurrency or self.concurrency, len(todo)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
            results = pool.map(lambda p: self.probe(p, timeout), todo)
            return dict(zip(todo, results, strict=True))


def _stream_exchange(sock: socket.socket, ip: str, port: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    sock.connect((ip, port))
    sock.sendall(_REQUEST)
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip() or None


def _udp_exchange(sock: socket.socket, ip: str, port: int, timeout: float) -> str | None:
    sock.settimeout(timeout)
    sock.connect((ip, port))  # connected: ICMP errors surface as OSError
    sock.send(_REQUEST)
    data = sock.recv(4096)
    return data.decode(errors="replace").strip() or None
