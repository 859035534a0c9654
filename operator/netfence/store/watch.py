"""A resilient etcd watch stream: exact resume, compaction surfaced, bounded outages.

etcd3aio's own ``WatchService.watch`` resumes after a reconnect from the last
*header* revision (which can skip events while a watcher is catching up),
silently steps over compaction and retries a dead server forever. This module
drives the gRPC Watch stream itself:

* it resumes after a reconnect from just after the last *event* delivered, so
  no event is lost or repeated;
* a compaction response raises :class:`CompactedError`;
* when the stream stays silent for ``probe_interval`` seconds it checks with
  a unary request that etcd still answers (progress requests cannot be used
  for this: etcd defers their answer while the watch start revision is in
  the future); if etcd does not answer the stream is re-established;
* if neither the stream nor a probe succeeds for ``retry_timeout`` seconds in
  a row (across reconnects) it raises :class:`EtcdUnavailable`;
* it opens each stream on the connection's current channel: a failed stream
  counts towards rebuilding the channel, a stream cancelled because its channel
  was replaced resumes at once on the new one, and the wait before a retry ends
  as soon as the channel is connected again (``store/connection.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from netfence.store.connection import RETRY_BACKOFF_MAX
from netfence.store.errors import CompactedError, EtcdUnavailable, StoreError
from netfence.store.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_EVENT_DELETE = 1
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _StreamStalled(Exception):
    pass


@dataclass(frozen=True, slots=True)
class RawEvent:
    key: bytes
    value: bytes | None  # None: deleted
    revision: int  # the mod revision of the event (the delete revision for deletes)


Probe = Callable[[], Awaitable[object]]


class ChannelSource(Protocol):
    """Where a watch gets its channel, and whom it tells how the channel does (``Connection``)."""

    @property
    def channel(self) -> grpc.aio.Channel: ...

    def succeeded(self) -> None: ...

    async def failed(self, reason: str) -> None: ...

    async def pause(self, delay: float) -> None: ...


@dataclass(frozen=True, slots=True)
class WatchSettings:
    probe_interval: float = 5.0
    retry_timeout: float = 30.0
    initial_backoff: float = 0.1
    max_backoff: float = RETRY_BACKOFF_MAX


async def _requests(create: WatchCreateRequest) -> AsyncIterator[WatchRequest]:
    yield WatchRequest(create_request=create)
    await asyncio.Future()  # keep the request side open


async def _read(call: Any, probe: Probe, interval: float) -> Any:
    """The next response; probes etcd whenever the stream is silent for ``interval`` s.

    The read is never cancelled by a timeout (grpc would cancel the whole
    call); _StreamStalled if a probe fails.
    """
    read = asyncio.ensure_future(call.read())
    try:
        while True:
            done, _ = await asyncio.wait({read}, timeout=interval)
            if done:
                return read.result()
            try:
                await probe()
            except StoreError as exc:
                raise _StreamStalled(f"stream silent and etcd not answering ({exc})") from exc
    finally:
        if not read.done():
            await cancel_and_wait(read)


async def watch_revisions(
    source: ChannelSource,
    key: bytes,
    range_end: bytes,
    start_revision: int,
    settings: WatchSettings,
    probe: Probe,
) -> AsyncGenerator[tuple[int, list[RawEvent]], None]:
    """Yield ``(revision, events of that revision)`` for ``[key, range_end)`` from ``start_revision``.

    ``start_revision`` 0 means "from now on". Events of one revision (one etcd
    transaction) are always yielded together, in transaction order.
    Raises CompactedError, EtcdUnavailable, or StoreError (watch cancelled by
    the server for another reason).
    """
    next_revision = start_revision
    silent_since = time.monotonic()
    backoff = settings.initial_backoff

    async def probe_and_mark() -> None:
        nonlocal silent_since
        await probe()
        silent_since = time.monotonic()  # etcd answers: the silence is just a quiet key range

    while True:
        create = WatchCreateRequest(
            key=key, range_end=range_end, start_revision=next_revision, progress_notify=True
        )
        channel = source.channel
        call = WatchStub(channel).Watch(_requests(create))
        try:
            while True:
                response = await _read(call, probe_and_mark, settings.probe_interval)
                if response is grpc.aio.EOF:
                    raise _StreamStalled("stream closed by the server")
                silent_since = time.monotonic()
                source.succeeded()
                if next_revision == 0 and response.header.revision > 0:
                    # "from now on": pin the position so a reconnect resumes exactly here
                    next_revision = int(response.header.revision) + 1
                backoff = settings.initial_backoff
                if response.compact_revision > 0:
                    raise CompactedError(next_revision, int(response.compact_revision))
                if response.canceled:
                    raise StoreError(f"watch cancelled by etcd: {response.cancel_reason or 'no reason'}")
                if not response.events:
                    continue
                for revision, events in _group(response.events):
                    next_revision = revision + 1
                    yield revision, events
        except (grpc.aio.AioRpcError, _StreamStalled) as exc:
            if source.channel is not channel:
                log.info("etcd channel replaced; resuming the watch from revision %d", next_revision)
                continue
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _TRANSIENT:
                raise StoreError(f"watch failed: {exc.code().name} {exc.details()}") from exc
            waited = time.monotonic() - silent_since
            reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if waited >= settings.retry_timeout:
                raise EtcdUnavailable(f"etcd watch unavailable for {waited:.1f}s ({reason})") from exc
            log.warning("etcd watch interrupted (%s); resuming from revision %d", reason, next_revision)
            await source.failed(f"watch: {reason}")
            await source.pause(backoff)
            backoff = min(backoff * 2, settings.max_backoff)
        finally:
            call.cancel()


def _group(events: Any) -> list[tuple[int, list[RawEvent]]]:
    groups: list[tuple[int, list[RawEvent]]] = []
    for ev in events:
        revision = int(ev.kv.mod_revision)
        raw = RawEvent(
            key=bytes(ev.kv.key),
            value=None if ev.type == _EVENT_DELETE else bytes(ev.kv.value),
            revision=revision,
        )
        if groups and groups[-1][0] == revision:
            groups[-1][1].append(raw)
        else:
            groups.append((revision, [raw]))
    return groups
