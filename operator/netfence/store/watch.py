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

:class:`RangeWatch` does the same for several key ranges on one stream (an
agent's watch scope, issue 11), each resuming from its own next revision, and
sends progress requests (``WatchProgressRequest``) on demand: etcd answers one only once every
watch on the stream has sent everything up to the answer's revision, which is
what ``store/ranges.py`` needs to release a commit whole. etcd drops (never
answers) a request made while some watch on the stream is not synced, so an
unanswered one is sent again (50 ms, doubling up to 1 s). (A reader asks for
progress only about revisions it has already seen: no watch starts in the
future then.)
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


# --- several ranges on one stream ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeEvents:
    """All events of one revision on range ``index`` (everything before it on that range came earlier)."""

    index: int
    revision: int
    events: list[RawEvent]


@dataclass(frozen=True, slots=True)
class RangeProgress:
    """Range ``index`` (None: every range on the stream) has sent everything up to ``revision``."""

    index: int | None
    revision: int


RangeItem = RangeEvents | RangeProgress

_PROGRESS_WATCH_ID = -1  # etcd's answer to a WatchProgressRequest (clientv3.InvalidWatchID)
PROGRESS_RESEND_FIRST = 0.05  # seconds before an unanswered progress request is sent again
PROGRESS_RESEND_MAX = 1.0


class RangeWatch:
    """Several key ranges watched on one gRPC Watch stream (the module's guarantees, per range).

    Each range resumes after a reconnect from just after the last event or progress it
    delivered. :meth:`request_progress` sends a ``WatchProgressRequest``; etcd answers it
    (a :class:`RangeProgress` with ``index`` None) once every watcher on the stream has sent
    everything up to the answer's revision. A request outstanding when the stream is
    re-established is sent again on the new stream. ``start_revision`` > 0 (a position to
    resume from; the ranges need a common known start for ``store/ranges.py``).
    """

    def __init__(
        self,
        source: ChannelSource,
        ranges: list[tuple[bytes, bytes]],
        start_revision: int,
        settings: WatchSettings,
        probe: Probe,
    ) -> None:
        if not ranges or start_revision < 1:
            raise ValueError("a range watch needs ranges and a start revision")
        self.source = source
        self.ranges = ranges
        self.settings = settings
        self.probe = probe
        self.next = [start_revision] * len(ranges)  # per range: the next revision it must deliver
        self._requests: asyncio.Queue[WatchRequest] | None = None
        self._progress_wanted = False
        self._resend: asyncio.TimerHandle | None = None
        self._resend_delay = PROGRESS_RESEND_FIRST
        self.progress_requests = 0  # sent (for tests and benchmarks)

    def request_progress(self) -> None:
        """Ask etcd to confirm progress of every range, until it answers.

        etcd drops a progress request (no answer at all) when some watch on the stream is
        not synced at that moment (catching up, or held back because its send buffer was
        full: ``watchableStore.progressIfSync``), so an unanswered request is sent again
        after 50 ms, doubling up to 1 s, until an answer arrives."""
        if self._progress_wanted:
            return
        self._progress_wanted = True
        self._resend_delay = PROGRESS_RESEND_FIRST
        self._send_progress()
        self._arm()

    def _arm(self) -> None:
        self._resend = asyncio.get_running_loop().call_later(self._resend_delay, self._resend_progress)

    def _resend_progress(self) -> None:
        self._resend = None
        if not self._progress_wanted:
            return
        self._send_progress()
        self._resend_delay = min(self._resend_delay * 2, PROGRESS_RESEND_MAX)
        self._arm()

    def _progress_answered(self) -> None:
        self._progress_wanted = False
        if self._resend is not None:
            self._resend.cancel()
            self._resend = None

    def _send_progress(self) -> None:
        if self._requests is not None:
            self.progress_requests += 1
            self._requests.put_nowait(WatchRequest(progress_request={}))

    async def _request_stream(self, queue: asyncio.Queue[WatchRequest]) -> AsyncIterator[WatchRequest]:
        while True:
            yield await queue.get()

    async def items(self) -> AsyncGenerator[RangeItem, None]:
        """Events per range and revision, and progress. Raises CompactedError, EtcdUnavailable,
        StoreError as :func:`watch_revisions` does."""
        settings = self.settings
        silent_since = time.monotonic()
        backoff = settings.initial_backoff

        async def probe_and_mark() -> None:
            nonlocal silent_since
            await self.probe()
            silent_since = time.monotonic()

        while True:
            queue: asyncio.Queue[WatchRequest] = asyncio.Queue()
            for (key, end), start in zip(self.ranges, self.next, strict=True):
                queue.put_nowait(WatchRequest(create_request=WatchCreateRequest(
                    key=key, range_end=end, start_revision=start, progress_notify=True)))
            self._requests = queue
            if self._progress_wanted:
                self._send_progress()  # outstanding on the stream that was lost
            ids: dict[int, int] = {}  # watch id -> range index (created in request order)
            channel = self.source.channel
            call = WatchStub(channel).Watch(self._request_stream(queue))
            try:
                while True:
                    response = await _read(call, probe_and_mark, settings.probe_interval)
                    if response is grpc.aio.EOF:
                        raise _StreamStalled("stream closed by the server")
                    silent_since = time.monotonic()
                    self.source.succeeded()
                    backoff = settings.initial_backoff
                    if response.compact_revision > 0:
                        raise CompactedError(min(self.next), int(response.compact_revision))
                    if response.canceled:
                        raise StoreError(f"watch cancelled by etcd: {response.cancel_reason or 'no reason'}")
                    watch_id = int(response.watch_id)
                    if response.created:
                        ids[watch_id] = len(ids)
                        continue
                    revision = int(response.header.revision)
                    if watch_id == _PROGRESS_WATCH_ID and not response.events:
                        # etcd handled our create requests before the progress request: the
                        # answer covers every range, even if a created response is still due.
                        self._progress_answered()
                        self.next = [max(n, revision + 1) for n in self.next]
                        yield RangeProgress(None, revision)
                        continue
                    index = ids.get(watch_id)
                    if index is None:
                        continue  # not one of ours
                    if not response.events:
                        self.next[index] = max(self.next[index], revision + 1)
                        yield RangeProgress(index, revision)
                        continue
                    for rev, events in _group(response.events):
                        self.next[index] = rev + 1
                        yield RangeEvents(index, rev, events)
            except (grpc.aio.AioRpcError, _StreamStalled) as exc:
                if self.source.channel is not channel:
                    log.info("etcd channel replaced; resuming the range watch")
                    continue
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _TRANSIENT:
                    raise StoreError(f"watch failed: {exc.code().name} {exc.details()}") from exc
                waited = time.monotonic() - silent_since
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                if waited >= settings.retry_timeout:
                    raise EtcdUnavailable(f"etcd watch unavailable for {waited:.1f}s ({reason})") from exc
                log.warning("etcd range watch interrupted (%s); resuming", reason)
                await self.source.failed(f"watch: {reason}")
                await self.source.pause(backoff)
                backoff = min(backoff * 2, settings.max_backoff)
            finally:
                self._requests = None
                call.cancel()
                if self._resend is not None and not self._progress_wanted:
                    self._resend.cancel()
                    self._resend = None

    def close(self) -> None:
        """Stop re-sending progress requests (the stream is no longer read)."""
        self._progress_wanted = False
        if self._resend is not None:
            self._resend.cancel()
            self._resend = None
