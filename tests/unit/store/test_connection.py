"""The etcd channel's pure parts: options, retry backoff, the rebuild policy; pause and rebuild with fakes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netfence.store import connection as C
from netfence.store.connection import Backoff, Connection, RebuildPolicy, channel_options
from netfence.store.settings import EtcdSettings

ETCD_KEEPALIVE_MIN_MS = 5000  # etcd's --grpc-keepalive-min-time default: more frequent pings are abuse


# --- channel options ---------------------------------------------------------------------


def test_reconnect_backoff_is_bounded_and_dead_connections_are_noticed() -> None:
    options = dict(channel_options())
    assert options["grpc.max_reconnect_backoff_ms"] <= 1000
    assert 100 <= options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]
    # the connect timeout: long enough for a TLS handshake, short enough to retry soon
    assert 1000 <= options["grpc.min_reconnect_backoff_ms"] <= 5000
    assert ETCD_KEEPALIVE_MIN_MS < options["grpc.keepalive_time_ms"] <= 10_000
    assert 0 < options["grpc.keepalive_timeout_ms"] <= 5000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.use_local_subchannel_pool"] == 1
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert "grpc.ssl_target_name_override" not in options


def test_tls_server_name_is_an_option_only_when_given() -> None:
    assert ("grpc.ssl_target_name_override", "etcd.example") in channel_options("etcd.example")
    names = [name for name, _ in channel_options("etcd.example")]
    assert len(names) == len(set(names))


def test_options_are_accepted_by_grpc() -> None:
    async def build() -> None:
        channel = grpc.aio.insecure_channel("ipv4:127.0.0.1:1", options=channel_options())
        await channel.close()

    asyncio.run(build())


# --- retry backoff -------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    backoff = Backoff(initial=0.2, maximum=1.0)
    assert [backoff.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.2


@given(st.floats(0.01, 5), st.floats(0.01, 5), st.integers(1, 40))
def test_backoff_never_exceeds_its_maximum_and_never_shrinks(initial: float, maximum: float, n: int) -> None:
    backoff = Backoff(initial=initial, maximum=maximum)
    delays = [backoff.next() for _ in range(n)]
    assert all(0 < d <= maximum for d in delays)
    assert delays == sorted(delays)


def test_default_retry_pause_is_at_most_a_second() -> None:
    assert Backoff().maximum == C.RETRY_BACKOFF_MAX <= 1.0


# --- rebuild policy ------------------------------------------------------------------------


def test_rebuild_needs_a_whole_period_of_failures() -> None:
    policy = RebuildPolicy(after=10)
    assert not policy.failed(0)
    assert not policy.failed(5)
    assert not policy.failed(9.9)
    assert policy.failed(10)


def test_rebuild_needs_several_failures() -> None:
    policy = RebuildPolicy(after=10, min_failures=3)
    assert not policy.failed(0)
    assert not policy.failed(10)  # two failures, although ten seconds apart
    assert policy.failed(10.5)


def test_a_success_starts_over() -> None:
    policy = RebuildPolicy(after=10)
    for t in (0, 4, 8):
        assert not policy.failed(t)
    policy.succeeded()
    for t in (11, 15, 20):
        assert not policy.failed(t)
    assert policy.failed(21)


def test_a_quiet_gap_starts_over() -> None:
    """Failures an hour apart say nothing about the channel in between."""
    policy = RebuildPolicy(after=10)
    assert not policy.failed(0)
    assert not policy.failed(1)
    assert not policy.failed(3600)
    assert not policy.failed(3601)
    assert not policy.failed(3605)
    assert policy.failed(3610)


def test_after_a_rebuild_the_new_channel_gets_a_whole_period() -> None:
    policy = RebuildPolicy(after=10)
    for t in (0, 5):
        policy.failed(t)
    assert policy.failed(10)
    policy.rebuilt(10)
    for t in (11, 15, 19):
        assert not policy.failed(t)
    assert policy.failed(20)


@given(st.lists(st.tuples(st.floats(0, 30), st.booleans()), max_size=60))
def test_a_rebuild_is_always_preceded_by_a_period_of_failures(steps: list[tuple[float, bool]]) -> None:
    """Property: whenever the policy says "rebuild", the last ``after`` seconds held at least
    three failures, no success, no rebuild, and no gap longer than ``after``."""
    after = 10.0
    policy = RebuildPolicy(after=after)
    now = 0.0
    streak: list[float] = []  # failures since the last success, rebuild or long gap
    for advance, ok in steps:
        now += advance
        if ok:
            policy.succeeded()
            streak = []
            continue
        if streak and now - streak[-1] > after:
            streak = []
        streak.append(now)
        if policy.failed(now):
            assert len(streak) >= 3 and now - streak[0] >= after
            policy.rebuilt(now)
            streak = []
        else:
            assert len(streak) < 3 or now - streak[0] < after


# --- Connection with a fake channel -----------------------------------------------------------


class FakeChannel:
    """Connectivity states driven by the test; ``close()`` is recorded."""

    def __init__(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state
        self.changed = asyncio.Event()
        self.closed = False

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.state

    async def wait_for_state_change(self, last: grpc.ChannelConnectivity) -> None:
        while self.state == last:
            self.changed.clear()
            await self.changed.wait()

    def set(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state
        self.changed.set()

    async def close(self) -> None:
        self.closed = True
        self.set(grpc.ChannelConnectivity.SHUTDOWN)

    def _method(self, *args: Any, **kwargs: Any) -> None:
        return None  # the etcd3aio stubs bind methods at construction; these tests make no calls

    unary_unary = unary_stream = stream_unary = stream_stream = _method


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def connection(channels: list[FakeChannel], clock: FakeClock | None = None, after: float = 10) -> Connection:
    conn = Connection(EtcdSettings(rebuild_after=after), clock=clock or FakeClock(), retire_after=0.05)
    built = iter(channels)

    async def build() -> Any:
        return next(built)

    conn._build = build  # type: ignore[method-assign]
    return conn


async def test_pause_ends_when_the_channel_is_connected_again() -> None:
    channel = FakeChannel(grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    conn = connection([channel])
    await conn.open()
    asyncio.get_running_loop().call_later(0.1, channel.set, grpc.ChannelConnectivity.CONNECTING)
    asyncio.get_running_loop().call_later(0.2, channel.set, grpc.ChannelConnectivity.READY)
    started = time.monotonic()
    await conn.pause(5.0)
    assert 0.15 < time.monotonic() - started < 2.0


async def test_pause_waits_the_whole_delay_when_the_channel_is_up() -> None:
    """The failure was not about the connection: back off as asked."""
    conn = connection([FakeChannel(grpc.ChannelConnectivity.READY)])
    await conn.open()
    started = time.monotonic()
    await conn.pause(0.3)
    assert time.monotonic() - started >= 0.29


async def test_pause_is_bounded_while_etcd_stays_away() -> None:
    conn = connection([FakeChannel(grpc.ChannelConnectivity.TRANSIENT_FAILURE)])
    await conn.open()
    started = time.monotonic()
    await conn.pause(0.3)
    assert 0.29 <= time.monotonic() - started < 1.5


async def test_calls_failing_for_the_whole_period_rebuild_the_channel_once() -> None:
    clock = FakeClock()
    old, new = FakeChannel(grpc.ChannelConnectivity.TRANSIENT_FAILURE), FakeChannel(grpc.ChannelConnectivity.READY)
    conn = connection([old, new], clock, after=10)
    await conn.open()
    assert conn.channel is old
    for t in (0, 5, 9):
        clock.now = t
        await conn.failed("unavailable")
    assert conn.channel is old and conn.rebuilds == 0
    clock.now = 10
    await asyncio.gather(conn.failed("unavailable"), conn.failed("unavailable"))  # concurrent callers: one rebuild
    assert conn.channel is new and conn.rebuilds == 1
    assert not old.closed  # streams still on it move over first
    await asyncio.sleep(0.2)
    assert old.closed
    clock.now = 12
    await conn.failed("unavailable")
    assert conn.rebuilds == 1


async def test_successes_keep_the_channel() -> None:
    clock = FakeClock()
    old = FakeChannel(grpc.ChannelConnectivity.READY)
    conn = connection([old], clock, after=10)
    await conn.open()
    for t in range(0, 60, 2):
        clock.now = t
        await conn.failed("deadline exceeded")
        conn.succeeded()
    assert conn.channel is old and conn.rebuilds == 0


async def test_a_rebuild_that_fails_keeps_the_old_channel() -> None:
    clock = FakeClock()
    old = FakeChannel(grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    conn = Connection(EtcdSettings(rebuild_after=10), clock=clock)
    calls = 0

    async def build() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return old
        raise C.EtcdUnavailable("cannot resolve etcd endpoint")

    conn._build = build  # type: ignore[method-assign]
    await conn.open()
    for t in (0, 5, 10):
        clock.now = t
        await conn.failed("unavailable")
    assert calls == 2 and conn.channel is old and not old.closed


async def test_closing_closes_replaced_channels_too() -> None:
    clock = FakeClock()
    old, new = FakeChannel(grpc.ChannelConnectivity.TRANSIENT_FAILURE), FakeChannel(grpc.ChannelConnectivity.READY)
    conn = Connection(EtcdSettings(rebuild_after=10), clock=clock)  # retired after 10 s
    built = iter([old, new])

    async def build() -> Any:
        return next(built)

    conn._build = build  # type: ignore[method-assign]
    await conn.open()
    for t in (0, 5, 10):
        clock.now = t
        await conn.failed("unavailable")
    assert conn.channel is new and not old.closed
    await conn.close()
    assert old.closed and new.closed


def test_not_connected_is_a_store_error() -> None:
    conn = Connection(EtcdSettings())
    with pytest.raises(C.StoreError, match="not connected"):
        _ = conn.kv
