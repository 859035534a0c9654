"""The probe source-port allocator: no port is reused while a flow that used it may live."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netfence_lab.ports import (
    CONNTRACK_TIMEOUTS,
    QUARANTINE_MARGIN,
    PortAllocator,
    PortsExhausted,
    SourcePorts,
    conntrack_quarantine,
)


def test_never_used_ports_come_first_in_ascending_order_skipping_reserved() -> None:
    alloc = PortAllocator(5000, 5009, quarantine=100, reserved={5001, 5004})
    ports = [alloc.take(0.0) for _ in range(8)]
    assert ports == [5000, 5002, 5003, 5005, 5006, 5007, 5008, 5009]
    for p in ports:
        alloc.release(p, 1.0)
    # every port is in quarantine now, although some were free for longer than the others
    with pytest.raises(PortsExhausted) as exc:
        alloc.take(100.9)
    assert exc.value.retry_after == pytest.approx(0.1)


def test_no_reuse_within_quarantine_and_wrap_around_in_release_order() -> None:
    alloc = PortAllocator(7000, 7002, quarantine=60)
    a, b, c = (alloc.take(0.0) for _ in range(3))
    alloc.release(b, 10.0)
    alloc.release(a, 20.0)
    with pytest.raises(PortsExhausted) as exc:  # c in use, b and a quarantined
        alloc.take(69.9)
    assert exc.value.retry_after == pytest.approx(0.1)
    assert alloc.take(70.0) == b  # wrapped around: the port released first comes back first
    with pytest.raises(PortsExhausted):
        alloc.take(79.0)
    assert alloc.take(80.0) == a
    with pytest.raises(PortsExhausted) as exc:  # nothing released any more: no time to wait for
        alloc.take(1000.0)
    assert exc.value.retry_after is None
    assert alloc.in_use == {a, b, c}


def test_a_port_is_not_reused_while_unused_ones_remain() -> None:
    alloc = PortAllocator(1024, 1123, quarantine=0)
    seen = []
    for t in range(100):
        port = alloc.take(float(t))
        alloc.release(port, float(t))
        seen.append(port)
    assert sorted(seen) == list(range(1024, 1124))
    assert alloc.take(100.0) == 1024


def test_reserve_and_misuse() -> None:
    alloc = PortAllocator(10, 12, quarantine=0)
    assert alloc.take(0.0) == 10
    alloc.reserve(10)  # in use: stays in use, never comes back
    alloc.reserve(11)
    alloc.release(10, 0.0)
    assert alloc.take(0.0) == 12
    with pytest.raises(PortsExhausted):
        alloc.take(5.0)
    with pytest.raises(ValueError, match="not in use"):
        alloc.release(11, 1.0)
    with pytest.raises(ValueError):
        PortAllocator(0, 10, 1)
    with pytest.raises(ValueError):
        PortAllocator(10, 9, 1)
    with pytest.raises(ValueError):
        PortAllocator(10, 20, -1)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 8),
    quarantine=st.sampled_from([0.0, 1.0, 5.0]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from([0.0, 0.5, 1.0, 3.0])), max_size=60),
)
def test_property_quarantine_and_freshness(
    size: int, quarantine: float, ops: list[tuple[bool, int, float]]
) -> None:
    """Whatever the order of takes and releases: a handed-out port is not in use, was released
    at least ``quarantine`` ago, and is a reused port only when every port has been used."""
    alloc = PortAllocator(100, 99 + size, quarantine)
    now = 0.0
    in_use: list[int] = []
    released_at: dict[int, float] = {}
    for take, pick, step in ops:
        now += step
        if take or not in_use:
            try:
                port = alloc.take(now)
            except PortsExhausted as exc:
                waiting = [released_at[p] + quarantine - now for p in released_at]
                assert len(in_use) + len(released_at) == size
                if exc.retry_after is None:
                    assert not released_at
                else:
                    assert exc.retry_after == pytest.approx(min(waiting))
                    assert exc.retry_after > 0
                continue
            assert port not in in_use and 100 <= port < 100 + size
            if port in released_at:
                assert now - released_at.pop(port) >= quarantine
                assert len(in_use) + len(released_at) + 1 == size  # reused only when all were used
            in_use.append(port)
        else:
            port = in_use.pop(pick % len(in_use))
            alloc.release(port, now)
            released_at[port] = now
    assert alloc.in_use == set(in_use)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_source_ports_per_protocol_lease_and_reserve() -> None:
    ports = SourcePorts(2000, 2002, quarantine=30, clock=FakeClock(), max_wait=0)
    with ports.lease("udp") as u, ports.lease("TCP") as t:
        assert u == t == 2000  # the protocol is part of the 5-tuple: one sequence each
    ports.reserve(2001)
    assert ports.take("UDP") == 2002
    with pytest.raises(PortsExhausted):  # 2000 quarantined, 2001 reserved, 2002 in use; no waiting
        ports.take("UDP")
    assert ports.take("SCTP") == 2000  # a new protocol's allocator knows the reservations too
    assert ports.take("SCTP") == 2002


def test_source_ports_wait_for_the_end_of_a_quarantine() -> None:
    """Exhaustion blocks (up to max_wait) until a port's quarantine is over, then hands that one out."""
    clock = FakeClock()
    ports = SourcePorts(3000, 3001, quarantine=30, clock=clock, max_wait=120)
    a, b = ports.take("UDP"), ports.take("UDP")
    ports.release("UDP", a)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(ports.take("UDP")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # a is in quarantine, b in use
    clock.now = 30.0
    ports.release("UDP", b)  # wakes the waiter: a's quarantine is over, b's just began
    waiter.join(5)
    assert got == [a]

    exhausted = SourcePorts(3000, 3000, quarantine=30, clock=clock, max_wait=0.05)
    exhausted.take("UDP")
    with pytest.raises(PortsExhausted):  # nothing will be released: it gives up after max_wait
        exhausted.take("UDP")


def test_quarantine_covers_the_conntrack_timeouts(tmp_path: Path) -> None:
    assert conntrack_quarantine(tmp_path) == max(CONNTRACK_TIMEOUTS.values()) + QUARANTINE_MARGIN
    (tmp_path / "nf_conntrack_udp_timeout_stream").write_text("900\n")  # a host with longer timeouts
    (tmp_path / "nf_conntrack_tcp_timeout_time_wait").write_text("5\n")  # shorter ones never lower it
    (tmp_path / "nf_conntrack_udp_timeout").write_text("garbage\n")
    assert conntrack_quarantine(tmp_path) == 900 + QUARANTINE_MARGIN
    assert conntrack_quarantine() >= 300 + QUARANTINE_MARGIN  # this host, at least the defaults


def test_for_run_stays_below_the_namespaces_ephemeral_range() -> None:
    ports = SourcePorts.for_run(reserved={1024, 1025})
    assert (ports.low, ports.high) == (1024, 32767)
    assert ports.quarantine == conntrack_quarantine()
    assert ports.take("UDP") == 1026
