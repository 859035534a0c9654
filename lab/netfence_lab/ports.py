"""Source ports for probes: no probe reuses a flow whose conntrack entry may still exist.

A probe is a flow ``(protocol, source ip, source port, destination ip, destination port)``.
When the kernel picks the source port, two probes between the same pair can get
the same port; if the first one's conntrack entry is still alive, the second is
not a new flow at all but a packet of an *established* one (that is how the
conformance runner once saw a UDP probe pass a policy that denied it). So the
runner binds each probe's socket to a port from a per-run allocator that hands
a port out again only after a *quarantine* longer than every conntrack timeout
a finished probe can leave behind:

* :class:`PortAllocator` is the pure part (no I/O, no clock: the caller passes
  the time). Never-used ports come first, in ascending order; after that the
  port released longest ago, once its quarantine is over. A port is never
  reused within a run while unused ones remain.
* :class:`SourcePorts` is the thread-safe edge the :class:`~netfence_lab.probe.Prober`
  uses: one allocator per protocol (the protocol is part of the 5-tuple), waiting
  (bounded) when every port is in quarantine.

The ports come from *below* the pod namespaces' ephemeral range, so sockets whose
port the kernel picks (other probers, servers' clients) never take one of ours, and
never from the destination ports probed in the run: a flow ``A:s -> B:d`` has the
reply tuple ``B:d -> A:s``, and a later probe ``B:d -> A:s`` would be its reply.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

log = logging.getLogger(__name__)

LOWEST_PORT = 1024  # below needs CAP_NET_BIND_SERVICE and collides with well-known services
#: The lowest ephemeral port of a *new* network namespace (the kernel default: a namespace
#: does not inherit the host's ``ip_local_port_range``), where the probes' sockets live.
NETNS_EPHEMERAL_LOW = 32768
#: Conntrack timeouts (seconds, kernel defaults, the larger of old and new kernels) of the
#: states a *finished* probe can leave behind: UDP entries, TCP after connect/close or a lost
#: handshake, SCTP after shutdown. TCP/SCTP ESTABLISHED are not among them: a probe always
#: closes its socket, and a SYN on a closed or TIME_WAIT entry starts a new flow anyway.
CONNTRACK_TIMEOUTS: dict[str, float] = {
    "nf_conntrack_udp_timeout": 30,
    "nf_conntrack_udp_timeout_stream": 180,
    "nf_conntrack_tcp_timeout_syn_sent": 120,
    "nf_conntrack_tcp_timeout_syn_recv": 60,
    "nf_conntrack_tcp_timeout_fin_wait": 120,
    "nf_conntrack_tcp_timeout_close_wait": 60,
    "nf_conntrack_tcp_timeout_last_ack": 30,
    "nf_conntrack_tcp_timeout_time_wait": 120,
    "nf_conntrack_tcp_timeout_close": 10,
    "nf_conntrack_tcp_timeout_max_retrans": 300,
    "nf_conntrack_tcp_timeout_unacknowledged": 300,
    "nf_conntrack_sctp_timeout_closed": 10,
    "nf_conntrack_sctp_timeout_cookie_wait": 3,
    "nf_conntrack_sctp_timeout_cookie_echoed": 3,
    "nf_conntrack_sctp_timeout_shutdown_sent": 3,
    "nf_conntrack_sctp_timeout_shutdown_recd": 3,
    "nf_conntrack_sctp_timeout_shutdown_ack_sent": 3,
    "nf_conntrack_sctp_timeout_heartbeat_sent": 30,
}
#: Added to the longest timeout: a probe's last packet can follow its release a little
#: (a FIN retransmitted by the kernel after close()), and clocks are not perfectly aligned.
QUARANTINE_MARGIN = 30.0
#: How long :meth:`SourcePorts.take` waits for a port out of quarantine before giving up.
DEFAULT_MAX_WAIT = 600.0


class PortsExhausted(RuntimeError):
    """No port can be handed out now; ``retry_after`` seconds until one can (None: none will
    until a port in use is released)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PortAllocator:
    """Ports ``low..high`` (inclusive, minus ``reserved``), each reused only ``quarantine``
    seconds after its release. Pure and not thread-safe; times are the caller's clock."""

    def __init__(self, low: int, high: int, quarantine: float, reserved: Iterable[int] = ()) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        if quarantine < 0:
            raise ValueError(f"negative quarantine {quarantine}")
        self.low, self.high, self.quarantine = low, high, quarantine
        self._reserved: set[int] = set(reserved)
        self._in_use: set[int] = set()
        # A heap of (free at, sequence, port). Never-used ports are free at -inf, in ascending
        # order (a sorted list is a heap); the sequence keeps release order among equal times.
        self._ready: list[tuple[float, int, int]] = [
            (float("-inf"), port, port) for port in range(low, high + 1) if port not in self._reserved
        ]
        self._seq = high + 1

    def reserve(self, port: int) -> None:
        """Never hand ``port`` out from now on (a port already in use stays so until released)."""
        self._reserved.add(port)

    def take(self, now: float) -> int:
        """The next port; raises :class:`PortsExhausted` when every port is in use or quarantined."""
        while self._ready:
            free_at, _, port = self._ready[0]
            if port in self._reserved:
                heapq.heappop(self._ready)
                continue
            if free_at > now:
                raise PortsExhausted(
                    f"every port of {self.low}-{self.high} is in use or in its {self.quarantine:.0f}s quarantine",
                    free_at - now,
                )
            heapq.heappop(self._ready)
            self._in_use.add(port)
            return port
        raise PortsExhausted(f"every port of {self.low}-{self.high} is in use or reserved", None)

    def release(self, port: int, now: float) -> None:
        """``port``'s flow is over at ``now``: it may be handed out again after the quarantine."""
        if port not in self._in_use:
            raise ValueError(f"port {port} is not in use")
        self._in_use.discard(port)
        if port not in self._reserved:
            heapq.heappush(self._ready, (now + self.quarantine, self._seq, port))
            self._seq += 1

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._in_use)


def conntrack_quarantine(
    proc: Path = Path("/proc/sys/net/netfilter"), defaults: dict[str, float] = CONNTRACK_TIMEOUTS
) -> float:
    """The longest relevant conntrack timeout (this host's value where larger than the
    default: new namespaces start with the defaults) plus :data:`QUARANTINE_MARGIN`."""
    longest = 0.0
    for name, default in defaults.items():
        value = default
        with suppress(OSError, ValueError, IndexError):
            value = max(value, float((proc / name).read_text().split()[0]))
        longest = max(longest, value)
    return longest + QUARANTINE_MARGIN


class SourcePorts:
    """Thread-safe source ports for probes: one :class:`PortAllocator` per protocol."""

    def __init__(
        self,
        low: int,
        high: int,
        quarantine: float,
        reserved: Iterable[int] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self.low, self.high, self.quarantine = low, high, quarantine
        self.max_wait = max_wait
        self._reserved = set(reserved)
        self._clock = clock
        self._allocators: dict[str, PortAllocator] = {}
        self._cond = threading.Condition()

    @classmethod
    def for_run(cls, reserved: Iterable[int] = (), *, max_wait: float = DEFAULT_MAX_WAIT) -> SourcePorts:
        """Ports 1024-32767 (just below the pod namespaces' ephemeral range), each quarantined
        for the longest conntrack timeout a probe can leave behind (:func:`conntrack_quarantine`):
        with 330 s that is ~95 probes per second per protocol, sustained, before any waits."""
        return cls(LOWEST_PORT, NETNS_EPHEMERAL_LOW - 1, conntrack_quarantine(), reserved, max_wait=max_wait)

    def _allocator(self, protocol: str) -> PortAllocator:
        alloc = self._allocators.get(protocol)
        if alloc is None:
            alloc = self._allocators[protocol] = PortAllocator(self.low, self.high, self.quarantine, self._reserved)
        return alloc

    def reserve(self, port: int) -> None:
        """Never use ``port`` as a source port (of any protocol) from now on."""
        with self._cond:
            if port in self._reserved:
                return
            self._reserved.add(port)
            for alloc in self._allocators.values():
                alloc.reserve(port)

    def take(self, protocol: str) -> int:
        """A port for a new ``protocol`` flow; waits (at most ``max_wait``) while all are quarantined."""
        protocol = protocol.upper()
        deadline = time.monotonic() + self.max_wait  # real time, whatever clock the allocator runs on
        warned = False
        with self._cond:
            while True:
                try:
                    return self._allocator(protocol).take(self._clock())
                except PortsExhausted as exc:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    if not warned:
                        log.warning("%s source ports: %s; waiting for one (up to %.0fs)", protocol, exc, left)
                        warned = True
                    wait = left if exc.retry_after is None else min(left, exc.retry_after)
                    self._cond.wait(max(wait, 0.01))

    def release(self, protocol: str, port: int) -> None:
        with self._cond:
            self._allocator(protocol.upper()).release(port, self._clock())
            self._cond.notify_all()

    @contextmanager
    def lease(self, protocol: str) -> Iterator[int]:
        """A port for the duration of one flow (released, into quarantine, on exit)."""
        port = self.take(protocol)
        try:
            yield port
        finally:
            self.release(protocol, port)
