"""The store's shared access to etcd over one :class:`~netfence.store.connection.Connection`.

Every role of the store (``reader.py``, ``writer.py``, ``reports.py``,
``leases.py``) makes its calls through one :class:`EtcdAccess`:

* every unary call is bounded by ``EtcdSettings.timeout`` and its failure
  translated: :class:`EtcdUnavailable` when etcd does not answer (the
  connection counts it towards rebuilding the channel), :class:`CompactedError`
  for history etcd no longer has, :class:`StoreError` otherwise;
* paginated range reads at one revision, single-key reads;
* raw watches of relative keys (``store/watch.py``: exact resume, compaction
  surfaced, bounded outages);
* :meth:`EtcdAccess.pause`, the wait of retry loops, cut short when etcd is
  reachable again.

It implements :class:`~netfence.store.protocols.RawReader`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import grpc
import grpc.aio
from etcd3aio import EtcdConnectionError, EtcdTransientError, prefix_range_end
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from netfence.store import layout as L
from netfence.store.connection import Connection
from netfence.store.errors import CompactedError, EtcdUnavailable, StoreError
from netfence.store.ranges import KeyRange
from netfence.store.settings import EtcdSettings
from netfence.store.types import KeyVersion, Snapshot
from netfence.store.watch import RangeWatch, WatchSettings, watch_revisions

T = TypeVar("T")


class EtcdAccess:
    """Calls, reads and watches on the shared connection (see the module doc)."""

    def __init__(self, config: EtcdSettings, connection: Connection | None = None) -> None:
        self.config = config
        self.layout = L.Layout(config.prefix)
        self.connection = connection or Connection(config)
        self._watch_settings = WatchSettings(
            probe_interval=config.watch_probe_interval, retry_timeout=config.watch_retry_timeout
        )

    @property
    def kv(self) -> KVService:
        return self.connection.kv

    @property
    def lease(self) -> LeaseService:
        return self.connection.lease

    async def pause(self, delay: float) -> None:
        """The wait of a retry loop after an etcd error: ``delay`` seconds, or less when
        the channel was down and is connected again (see store/connection.py)."""
        await self.connection.pause(delay)

    # -- calls -----------------------------------------------------------------

    async def call(self, what: str, call: Awaitable[T], revision: int = 0) -> T:
        """Await one etcd call, errors translated; tells the connection how it went."""
        try:
            result = await self._translate(what, call, revision)
        except EtcdUnavailable as exc:
            await self.connection.failed(str(exc))
            raise
        self.connection.succeeded()
        return result

    async def _translate(self, what: str, call: Awaitable[T], revision: int) -> T:
        try:
            return await call
        except TimeoutError as exc:
            raise EtcdUnavailable(f"{what}: etcd did not answer within {self.config.timeout}s") from exc
        except (EtcdConnectionError, EtcdTransientError) as exc:
            raise EtcdUnavailable(f"{what}: {exc}") from exc
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (exc.details() or ""):
                raise CompactedError(revision) from exc
            if exc.code() == grpc.StatusCode.CANCELLED:  # its channel was closed (replaced)
                raise EtcdUnavailable(f"{what}: cancelled ({exc.details()})") from exc
            raise StoreError(f"{what}: {exc.code().name} {exc.details()}") from exc

    async def probe(self) -> None:
        """A cheap request that etcd must answer (used to check a silent watch)."""
        key = self.layout.key(L.COMMIT)
        await self.call("probe", self.kv.get(key, count_only=True, timeout=self.config.timeout))

    # -- reads -----------------------------------------------------------------

    async def range(self, rel_prefix: str = "", revision: int = 0) -> tuple[list[Any], int]:
        """All key-values under ``prefix + rel_prefix`` at one revision (paginated)."""
        start = self.layout.key(rel_prefix)
        end = prefix_range_end(start)
        kvs: list[Any] = []
        rev = revision
        while True:
            resp = await self.call(
                "range",
                self.kv.get(
                    start, end, revision=rev, limit=self.config.page_size, timeout=self.config.timeout
                ),
                revision=rev,
            )
            if rev == 0:
                rev = int(resp.header.revision)
            kvs.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                return kvs, rev
            start = bytes(resp.kvs[-1].key) + b"\x00"

    async def range_latest(self, rel_prefix: str = "") -> tuple[list[Any], int]:
        """:meth:`range` at the latest revision, started again if compacted between pages."""
        for _ in range(4):
            try:
                return await self.range(rel_prefix)
            except CompactedError:  # compacted between pages: start again
                continue
        return await self.range(rel_prefix)

    async def read_all(self) -> Snapshot:
        """Every key under the prefix at one revision (raw bytes, relative keys)."""
        kvs, rev = await self.range_latest()
        values: dict[str, bytes] = {}
        mods: dict[str, int] = {}
        for kv in kvs:
            rel = self.layout.relative(bytes(kv.key))
            values[rel] = bytes(kv.value)
            mods[rel] = int(kv.mod_revision)
        return Snapshot(values, rev, mods, mods.get(L.COMMIT, 0), L.PENDING in values)

    async def get(self, rel: str) -> KeyVersion | None:
        resp = await self.call("get", self.kv.get(self.layout.key(rel), timeout=self.config.timeout))
        if not resp.kvs:
            return None
        return key_version(resp.kvs[0], int(resp.header.revision))

    # -- watches ---------------------------------------------------------------

    async def watch_changes(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, dict[str, bytes | None]], None]:
        """Raw changes per revision under ``rel`` (a relative prefix, or one key if not ``prefix``).

        ``after_revision`` None: from now on. Raises CompactedError / EtcdUnavailable.
        """
        key = self.layout.key(rel)
        end = prefix_range_end(key) if prefix else b""
        start = 0 if after_revision is None else after_revision + 1
        stream = watch_revisions(self.connection, key, end, start, self._watch_settings, self.probe)
        async with contextlib.aclosing(stream):
            async for revision, events in stream:
                yield revision, {self.layout.relative(ev.key): ev.value for ev in events}

    def watch_ranges(self, ranges: list[KeyRange], after_revision: int) -> RangeWatch:
        """Several relative keys / prefixes on one Watch stream, after ``after_revision``
        (``store/watch.py`` ``RangeWatch``; merged by ``store/ranges.py``)."""
        bounds = []
        for r in ranges:
            key = self.layout.key(r.rel)
            bounds.append((key, prefix_range_end(key) if r.prefix else b""))
        return RangeWatch(self.connection, bounds, after_revision + 1, self._watch_settings, self.probe)


def key_version(kv: Any, revision: int) -> KeyVersion:
    """A key-value of a response as a :class:`KeyVersion` read at ``revision``."""
    return KeyVersion(
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        lease=int(kv.lease),
        revision=revision,
    )
