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
  retry does not sleep through etcd's return;
* **renewed certificates** (:meth:`Connection.reload_credentials`): the TLS
  files are re-read every ``EtcdSettings.cert_reload_interval`` seconds and
  after every failed call (a TLS handshake failure included), compared by the
  SHA-256 of their contents (``store/credentials.py``); a changed, valid set
  replaces the channel at once the same way a rebuild does (new calls and
  streams use the new credentials, watches resume from their last revision,
  leases are untouched), an invalid set is warned about once and the loaded
  credentials stay. The channel is always built from the contents that were
  checked, never from a second read of the files.

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

import grpc
import grpc.aio
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from netfence.store.credentials import (
    CertInfo,
    Inspection,
    TlsFiles,
    TlsMaterial,
    decide,
    inspect_material,
    looks_like_tls_failure,
    read_material,
    unreadable,
)
from netfence.store.errors import EtcdUnavailable, StoreError
from netfence.store.settings import EtcdSettings, split_endpoint
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
        self.rebuilds = 0  # how many times the channel was replaced because calls kept failing
        self.reloads = 0  # how many times it was replaced because the TLS files changed
        self.reload_interval = settings.cert_reload_interval
        self.retire_after = settings.rebuild_after if retire_after is None else retire_after
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._resolver = resolver
        self._clock = clock
        self._policy = RebuildPolicy(settings.rebuild_after)
        self._lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._generation = 0  # channels installed so far
        self._files = TlsFiles.of(settings)
        self._material: TlsMaterial | None = None  # what the current channel's credentials were made from
        self._loaded: Inspection | None = None
        self._rejected: str | None = None  # fingerprint of the last set warned about
        self._hinted: str | None = None  # loaded fingerprint last named after a TLS failure
        self._last_seen: str | None = None  # fingerprint of the files at the last check
        self._unbuilt: str | None = None  # fingerprint of a valid set no channel could be made with
        self._checking = asyncio.Lock()
        self._reloader: asyncio.Task[None] | None = None

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
                if self._files is not None and self._material is None:
                    await self._load_initial(self._files)
                self._install(await self._build())
            if self._files is not None and self._reloader is None:
                self._reloader = asyncio.create_task(self._check_periodically(), name="etcd-tls-reload")

    async def close(self) -> None:
        async with self._lock:
            channel, self._channel = self._channel, None
            self._kv = self._lease = None
            reloader, self._reloader = self._reloader, None
        if reloader is not None:
            await cancel_and_wait(reloader)
        retiring, self._retiring = self._retiring, {}
        await cancel_and_wait(*retiring)
        for old in retiring.values():  # replaced channels close now
            with contextlib.suppress(Exception):
                await old.close()
        if channel is not None:
            await channel.close()

    async def _build(self) -> grpc.aio.Channel:
        cfg = self.settings
        targets, server_name = await asyncio.to_thread(resolve_endpoints, cfg.endpoints, self._resolver)
        target = "ipv4:" + ",".join(targets)
        if self._files is None:
            return grpc.aio.insecure_channel(target, options=channel_options())
        material = self._material
        if material is None:
            material = await asyncio.to_thread(read_material, self._files)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
        )
        options = channel_options(cfg.tls_server_name or server_name)
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _install(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._kv = KVService(channel)
        self._lease = LeaseService(channel)
        self._generation += 1

    def _replace(self, channel: grpc.aio.Channel) -> None:
        """Install ``channel`` in place of the current one, which is closed ``retire_after`` seconds later."""
        old = self._channel
        self._install(channel)
        if old is None:
            return
        task = asyncio.create_task(self._retire(old), name="etcd-channel-retire")
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    # -- TLS files -------------------------------------------------------------------

    @property
    def client_certificate(self) -> CertInfo | None:
        """Serial and expiry of the client certificate in use (None without one, or if it does not decode)."""
        return self._loaded.client if self._loaded else None

    def tls_status(self) -> dict[str, str | int | None]:
        """The TLS credentials in use, for health endpoints (empty without TLS)."""
        if self._files is None:
            return {}
        client = self.client_certificate
        return {
            "etcdClientCertSerial": client.serial if client else None,
            "etcdClientCertExpiry": client.expiry() if client else None,
            "etcdTlsReloads": self.reloads,
        }

    async def _load_initial(self, files: TlsFiles) -> None:
        material = await asyncio.to_thread(read_material, files)  # unreadable: open() fails, as it always did
        inspection = await asyncio.to_thread(inspect_material, material)
        self._material, self._loaded = material, inspection
        if inspection.problem is not None:
            log.warning("the etcd TLS files look unusable: %s; trying them anyway", inspection.problem)
        elif not inspection.verified:
            log.info("the etcd CA file does not verify the client certificate (%s); "
                     "reloads will not require it", inspection.verify_problem)
        log.info("etcd TLS files loaded: %s", inspection.describe())

    async def reload_credentials(self, trigger: str = "check") -> bool:
        """Re-read the TLS files; if their contents changed and are a valid set, replace the channel with
        one using them (True). Never raises. Concurrent calls: all but the first return False at once."""
        files, loaded = self._files, self._loaded
        if files is None or loaded is None or self._channel is None or self._checking.locked():
            return False
        async with self._checking:
            try:
                return await self._reload(files, loaded, trigger)
            except Exception as exc:
                log.warning("checking the etcd TLS files failed: %s", exc)
                return False

    async def _reload(self, files: TlsFiles, loaded: Inspection, trigger: str) -> bool:
        material: TlsMaterial | None
        try:
            material = await asyncio.to_thread(read_material, files)
        except OSError as exc:  # a file missing, for one: keep what works
            material, inspection = None, unreadable(exc)
        else:
            self._last_seen = material.fingerprint
            if material.fingerprint == loaded.fingerprint:
                self._rejected = None  # back to the loaded set: warn again about a bad one
                return False
            inspection = await asyncio.to_thread(inspect_material, material)
        decision = decide(loaded, inspection, self._rejected)
        if material is None or not decision.reload:
            if decision.warning is not None:
                log.warning("%s", decision.warning)
            self._rejected = inspection.fingerprint
            return False
        async with self._lock:
            if self._channel is None:
                return False  # closed meanwhile
            previous = self._material, self._loaded
            self._material, self._loaded = material, inspection
            try:
                channel = await self._build()
            except Exception as exc:  # a host name that does not resolve now: the next check tries again
                self._material, self._loaded = previous
                if self._unbuilt != inspection.fingerprint:
                    self._unbuilt = inspection.fingerprint
                    log.warning("the etcd TLS files changed but no channel could be made with them (%s); "
                                "keeping the loaded ones", exc)
                return False
            self._replace(channel)
            self.reloads += 1
            self._rejected = self._unbuilt = None
            self._policy.rebuilt(self._clock())
        log.info("etcd TLS files changed (%s); reloaded them into a new gRPC channel: %s",
                 trigger, inspection.describe())
        return True

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            await self.reload_credentials("periodic check")

    def _hint_unchanged(self, reason: str) -> None:
        """After a TLS failure with unchanged files, say once (per loaded set) what is loaded."""
        loaded = self._loaded
        if loaded is None or self._hinted == loaded.fingerprint or self._last_seen != loaded.fingerprint:
            return
        self._hinted = loaded.fingerprint
        log.warning("a call to etcd failed in the TLS handshake (%s) and the TLS files are unchanged (%s)",
                    reason, loaded.describe())

    # -- health of the channel -------------------------------------------------------

    def succeeded(self) -> None:
        """A call (or a watch response) got through."""
        self._policy.succeeded()

    async def failed(self, reason: str) -> None:
        """A call failed for want of etcd: re-reads the TLS files (reloading changed ones at once);
        rebuilds the channel when calls keep failing. Never raises."""
        if self._channel is None:
            return
        tls_failure = looks_like_tls_failure(reason)
        if self._files is not None:
            trigger = "after a TLS handshake failure" if tls_failure else "after a failed call"
            if await self.reload_credentials(trigger):
                return
            if tls_failure:
                self._hint_unchanged(reason)
        if not self._policy.failed(self._clock()):
            return
        generation = self._generation
        async with self._lock:
            if self._channel is None or self._generation != generation:
                return  # closed, or replaced by another caller meanwhile
            started = self._clock()
            try:
                channel = await self._build()
            except Exception as exc:  # a host name that no longer resolves, unreadable TLS files
                self._policy.rebuilt(self._clock())  # try again after another whole period
                log.warning("rebuilding the etcd channel failed (%s); keeping the old one", exc)
                return
            self._replace(channel)
            self.rebuilds += 1
            self._policy.rebuilt(started)
        log.warning(
            "etcd calls have failed for %.0fs (%s); replaced the gRPC channel (rebuild %d)",
            self.settings.rebuild_after, reason, self.rebuilds,
        )

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
