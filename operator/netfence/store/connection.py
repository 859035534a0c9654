"""The gRPC channel to etcd: bounded reconnection, dead connections noticed, rebuilt when calls keep failing.

gRPC reconnects a broken channel by itself, but with its default backoff
(1 s growing by 1.6x to 120 s) a channel that failed for a minute waits up to
two minutes before it tries again, so a process noticed a recovered etcd
16-43 s late. Here:

* **bounded reconnect backoff** (:func:`channel_options`): reconnection
  attempts start after 0.2 s and are never more than
  ``RECONNECT_BACKOFF_MAX_MS`` (1 s, +-20 % jitter) apart; a connection
  attempt may take ``CONNECT_TIMEOUT_MS`` (``grpc.min_reconnect_backoff_ms``);
* **keepalive**: pings every ``KEEPALIVE_TIME_MS`` while calls are active, the
  connection is dropped when one is not answered within
  ``KEEPALIVE_TIMEOUT_MS`` (etcd refuses pings more often than every 5 s);
* **rebuild** (:class:`RebuildPolicy`): when every call has failed for
  ``EtcdSettings.rebuild_after`` seconds (at least three failures, no success
  in between) the channel is replaced by a new one (endpoint host names are
  resolved again). New calls and watch streams use the new one at once; the
  old one is closed ``rebuild_after`` seconds later (a stream still on it by
  then — keepalive drops a dead connection sooner — is cancelled and resumes
  on the new one). Closing it at once would cancel streams in the middle of
  gRPC's request handling, which leaves tasks behind that asyncio logs as
  errors;
* **waking retries** (:meth:`Connection.pause`): a retry loop that waits
  after a failure returns as soon as the channel is connected again, so the
  retry does not sleep through etcd's return.

Retry loops of the callers back off by at most ``RETRY_BACKOFF_MAX`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from netfence.store.errors import EtcdUnavailable, StoreError
from netfence.store.settings import EtcdSettings, PathLike, split_endpoint
from netfence.store.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_INITIAL_MS = 200
RECONNECT_BACKOFF_MAX_MS = 1000
CONNECT_TIMEOUT_MS = 3000
KEEPALIVE_TIME_MS = 6000  # etcd's --grpc-keepalive-min-time is 5 s: more frequent pings get a GOAWAY
KEEPALIVE_TIMEOUT_MS = 3000
RETRY_BACKOFF_MAX = 1.0  # seconds; the longest pause of a retry loop on etcd errors

ChannelOption = tuple[str, str | int]


def channel_options(tls_server_name: str | None = None) -> list[ChannelOption]:
    """The gRPC channel arguments of every channel to etcd (see the module doc)."""
    options: list[ChannelOption] = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # etcd counts pings on a connection without streams as abuse (and closes it)
        ("grpc.keepalive_permit_without_calls", 0),
        # keep pinging a long-silent watch stream (the default stops after two pings without data)
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
        # a rebuilt channel must not share the old one's (possibly wedged) connections
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if tls_server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


@dataclass
class Backoff:
    """Exponential retry delays: ``initial``, doubling, at most ``maximum``; ``reset()`` after a success."""

    initial: float = 0.2
    maximum: float = RETRY_BACKOFF_MAX
    factor: float = 2.0
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay = self._next
        self._next = min(delay * self.factor, self.maximum)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class RebuildPolicy:
    """When to replace the channel: calls have failed for ``after`` seconds, none succeeded meanwhile.

    A streak of failures starts at the first failure after a success; it
    needs at least ``min_failures`` failures and a span of ``after`` seconds.
    A gap of more than ``after`` seconds without calls starts a new streak
    (nothing was learnt meanwhile). After a rebuild the new channel gets a
    whole ``after`` before the next one.
    """

    after: float
    min_failures: int = 3
    _since: float | None = field(default=None, init=False)
    _last: float = field(default=0.0, init=False)
    _failures: int = field(default=0, init=False)

    def succeeded(self) -> None:
        self._since = None
        self._failures = 0

    def failed(self, now: float) -> bool:
        """Record a failed call at ``now``; True when the channel should be rebuilt now."""
        if self._since is None or now - self._last > self.after:
            self._since = now
            self._failures = 0
        self._last = now
        self._failures += 1
        return self._failures >= self.min_failures and now - self._since >= self.after

    def rebuilt(self, now: float) -> None:
        self._since = now
        self._last = now
        self._failures = 0


Resolver = Callable[[str, int], list[str]]


def _resolve_ipv4(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def resolve_endpoints(
    endpoints: Sequence[str], resolver: Resolver = _resolve_ipv4
) -> tuple[list[str], str | None]:
    """``host:port`` endpoints as ``ip:port`` targets, plus the TLS server name to verify.

    The channel dials an ``ipv4:`` target, which takes addresses only; host
    names (a Service name, an external etcd's DNS name) are resolved here,
    every address becoming a round-robin target, and the first host name is
    what the server certificate is checked against.
    """
    targets: list[str] = []
    server_name: str | None = None
    for raw in endpoints:
        host, port = split_endpoint(raw)
        try:
            ipaddress.ip_address(host)
            targets.append(f"{host}:{port}")
            continue
        except ValueError:
            pass
        try:
            addresses = resolver(host, int(port))
        except OSError as exc:
            raise EtcdUnavailable(f"cannot resolve etcd endpoint {raw!r}: {exc}") from exc
        targets.extend(f"{address}:{port}" for address in addresses)
        server_name = server_name or host
    return targets, server_name


class Connection:
    """The channel to etcd and the etcd3aio services on it. ``open()`` before use, ``close()`` after."""

    def __init__(
        self,
        settings: EtcdSettings,
        *,
        resolver: Resolver = _resolve_ipv4,
        clock: Callable[[], float] = time.monotonic,
        retire_after: float | None = None,
    ) -> None:
        self.settings = settings
        self.rebuilds = 0  # how many times the channel was replaced
        self.retire_after = settings.rebuild_after if retire_after is None else retire_after
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._resolver = resolver
        self._clock = clock
        self._policy = RebuildPolicy(settings.rebuild_after)
        self._lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise StoreError("EtcdStore is not connected")
        return self._channel

    @property
    def kv(self) -> KVService:
        if self._kv is None:
            raise StoreError("EtcdStore is not connected")
        return self._kv

    @property
    def lease(self) -> LeaseService:
        if self._lease is None:
            raise StoreError("EtcdStore is not connected")
        return self._lease

    async def open(self) -> None:
        """Create the channel if there is none (EtcdUnavailable if a host name does not resolve)."""
        async with self._lock:
            if self._channel is None:
                self._install(await self._build())

    async def close(self) -> None:
        async with self._lock:
            channel, self._channel = self._channel, None
            self._kv = self._lease = None
        retiring, self._retiring = self._retiring, {}
        await cancel_and_wait(*retiring)
        for old in retiring.values():  # replaced channels close now
            with contextlib.suppress(Exception):
                await old.close()
        if channel is not None:
            await channel.close()

    async def _build(self) -> grpc.aio.Channel:
        cfg = self.settings

        async def read(path: PathLike | None) -> bytes | None:
            return None if path is None else await asyncio.to_thread(Path(path).read_bytes)

        targets, server_name = await asyncio.to_thread(resolve_endpoints, cfg.endpoints, self._resolver)
        target = "ipv4:" + ",".join(targets)
        if cfg.ca_file is None:
            return grpc.aio.insecure_channel(target, options=channel_options())
        credentials = grpc.ssl_channel_credentials(
            root_certificates=await read(cfg.ca_file),
            private_key=await read(cfg.key_file),
            certificate_chain=await read(cfg.cert_file),
        )
        options = channel_options(cfg.tls_server_name or server_name)
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _install(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._kv = KVService(channel)
        self._lease = LeaseService(channel)

    # -- health of the channel -------------------------------------------------------

    def succeeded(self) -> None:
        """A call (or a watch response) got through."""
        self._policy.succeeded()

    async def failed(self, reason: str) -> None:
        """A call failed for want of etcd; rebuilds the channel when they keep failing. Never raises."""
        if self._channel is None or not self._policy.failed(self._clock()):
            return
        generation = self.rebuilds
        async with self._lock:
            if self._channel is None or self.rebuilds != generation:
                return  # closed, or rebuilt by another caller meanwhile
            started = self._clock()
            try:
                channel = await self._build()
            except Exception as exc:  # a host name that no longer resolves, unreadable TLS files
                self._policy.rebuilt(self._clock())  # try again after another whole period
                log.warning("rebuilding the etcd channel failed (%s); keeping the old one", exc)
                return
            old = self._channel
            self._install(channel)
            self.rebuilds += 1
            self._policy.rebuilt(started)
        log.warning(
            "etcd calls have failed for %.0fs (%s); replaced the gRPC channel (rebuild %d)",
            self.settings.rebuild_after, reason, self.rebuilds,
        )
        task = asyncio.create_task(self._retire(old), name="etcd-channel-retire")
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        """Close a replaced channel once what still used it has moved to the new one."""
        await asyncio.sleep(self.retire_after)
        with contextlib.suppress(Exception):
            await channel.close()

    async def pause(self, delay: float) -> None:
        """Wait ``delay`` seconds after a failure, returning early once the channel is connected again.

        When the channel is connected already (the failure was not about the
        connection) the whole delay is waited.
        """
        ready = grpc.ChannelConnectivity.READY
        channel = self._channel
        if channel is None or channel.get_state(try_to_connect=True) == ready:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                while True:
                    channel = self._channel
                    if channel is None:
                        await asyncio.sleep(delay)
                        return
                    state = channel.get_state(try_to_connect=True)
                    if state == ready:
                        return
                    if state == grpc.ChannelConnectivity.SHUTDOWN:
                        await asyncio.sleep(0.05)  # replaced (or closing): look at the new one
                        continue
                    await channel.wait_for_state_change(state)
