"""``EtcdStore``: the store's roles composed over one connection to etcd.

The roles live in their own modules, each behind a protocol of
``store/protocols.py``:

| role | module | protocol |
|---|---|---|
| calls, range reads, raw watches, ``pause`` | ``store/access.py`` | ``RawReader`` |
| committed snapshots and commit batches | ``store/reader.py`` | ``CommittedReader`` |
| fenced multi-transaction changes, commit markers | ``store/writer.py`` | ``FencedWriter`` |
| node reports | ``store/reports.py`` | ``ReportStore`` |
| leases, lease-bound creation (election) | ``store/leases.py`` | ``LeaseKeeping``, ``ElectionStore`` |

``EtcdStore`` offers all of their methods (it satisfies ``AgentStore``,
``SyncerStore`` and ``ElectionStore``), plus the lifecycle: ``connect()``
before use, ``close()`` after. Processes make one and hand it to the agent
loop, the syncer and the election, which know it only by those protocols.

Failure behaviour: every unary call is bounded by ``EtcdSettings.timeout`` and
raises :class:`EtcdUnavailable` when etcd does not answer; watches reconnect
transparently and raise :class:`EtcdUnavailable` after
``watch_retry_timeout`` seconds without a response. The gRPC channel
(``store/connection.py``) reconnects at most 1 s apart and is rebuilt when
calls keep failing; :meth:`EtcdStore.pause` is the wait of retry loops, cut
short when etcd is reachable again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import grpc.aio

from netfence.store import layout as L
from netfence.store.access import EtcdAccess
from netfence.store.connection import resolve_endpoints
from netfence.store.lease import LeaseKeeper
from netfence.store.leases import EtcdLeases
from netfence.store.ranges import KeyRange
from netfence.store.reader import EtcdCommittedReader
from netfence.store.reports import EtcdReportStore
from netfence.store.settings import MAX_OPS_PER_TXN, EtcdSettings
from netfence.store.types import (
    Acquired,
    CommitBatch,
    CommittedState,
    Fence,
    Include,
    KeyVersion,
    Reports,
    Snapshot,
)
from netfence.store.writer import EtcdFencedWriter

# The store's settings are netfence.store.settings.EtcdSettings (pure, shared with
# netfence.config); EtcdConfig is the name it had here before.
EtcdConfig = EtcdSettings

__all__ = [
    "MAX_OPS_PER_TXN",
    "Acquired",
    "CommitBatch",
    "CommittedState",
    "EtcdConfig",
    "EtcdSettings",
    "EtcdStore",
    "Fence",
    "KeyVersion",
    "Reports",
    "Snapshot",
    "resolve_endpoints",  # lives in store/connection.py
]


class EtcdStore:
    """Async etcd access for Netfence. ``connect()`` before use, ``close()`` after."""

    def __init__(self, config: EtcdSettings, identity: str | None = None) -> None:
        self.config = config
        self.identity = identity or f"{socket.gethostname()}/{os.getpid()}"
        self.access = EtcdAccess(config)
        self.layout = self.access.layout
        self.connection = self.access.connection
        self.reader = EtcdCommittedReader(self.access)
        self.writer = EtcdFencedWriter(self.access, self.identity)
        self.reports = EtcdReportStore(self.access)
        self.leases = EtcdLeases(self.access)

    # -- lifecycle -------------------------------------------------------------

    async def connect(self) -> None:
        """Open the channel (if not open) and check that etcd answers (EtcdUnavailable if not).

        May be called again after a failure: the channel stays and keeps reconnecting.
        """
        await self.connection.open()
        key = self.layout.key(L.COMMIT)
        await self.access.call("connect", self.access.kv.get(key, timeout=self.config.timeout))

    async def close(self) -> None:
        await self.connection.close()

    async def pause(self, delay: float) -> None:
        """The wait of a retry loop after an etcd error: ``delay`` seconds, or less when
        the channel was down and is connected again (see store/connection.py)."""
        await self.access.pause(delay)

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.connection.channel

    # -- raw reads and watches (access.py) --------------------------------------

    async def read_all(self) -> Snapshot:
        """Every key under the prefix at one revision (raw bytes, relative keys)."""
        return await self.access.read_all()

    async def get(self, rel: str) -> KeyVersion | None:
        return await self.access.get(rel)

    def watch_changes(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, dict[str, bytes | None]], None]:
        """Raw changes per revision under ``rel`` (a relative prefix, or one key if not ``prefix``).

        ``after_revision`` None: from now on. Raises CompactedError / EtcdUnavailable.
        """
        return self.access.watch_changes(rel, after_revision, prefix=prefix)

    # -- the committed reader (reader.py) ---------------------------------------

    async def commit_revision(self) -> int:
        """The mod revision of the ``commit`` key (0 if none)."""
        return await self.reader.commit_revision()

    async def committed_snapshot(
        self, include: Include | None = None, *, max_wait: float = 30.0, ranges: Sequence[KeyRange] | None = None
    ) -> CommittedState:
        """The committed keys (filtered by ``include``) as of the latest commit (store/reader.py)."""
        return await self.reader.committed_snapshot(include, max_wait=max_wait, ranges=ranges)

    def follow_commits(
        self,
        after_revision: int,
        include: Include | None = None,
        *,
        foreign_batches: bool = False,
        ranges: Sequence[KeyRange] | None = None,
    ) -> AsyncGenerator[CommitBatch, None]:
        """Committed changes after ``after_revision``, one batch per commit marker (store/reader.py)."""
        return self.reader.follow_commits(after_revision, include, foreign_batches=foreign_batches, ranges=ranges)

    # -- the fenced writer (writer.py) ------------------------------------------

    @property
    def txn_listeners(self) -> list[Callable[[int], None]]:
        """Called with the revision of every transaction of ours that etcd applied."""
        return self.writer.txn_listeners

    async def write(self, changes: Mapping[str, bytes | None], fence: Fence | None) -> int:
        """Apply puts (bytes) and deletes (None) of committed keys as one change (store/writer.py)."""
        return await self.writer.write(changes, fence)

    async def write_commit_only(self, fence: Fence | None) -> int:
        """Write just a commit marker (clears a stale ``pending``); returns its revision."""
        return await self.writer.write_commit_only(fence)

    async def writes_settled(self) -> None:
        """Return once no change of ours is being written (its revisions have reached ``txn_listeners``)."""
        await self.writer.writes_settled()

    # -- leases and the election's primitive (leases.py) ------------------------

    async def create_if_absent(self, rel: str, value: bytes, lease_id: int) -> Acquired:
        """Create ``rel`` bound to ``lease_id`` unless it exists; report the key as it is now."""
        return await self.leases.create_if_absent(rel, value, lease_id)

    async def grant_lease(self, ttl: int) -> int:
        return await self.leases.grant_lease(ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted at once); a lease that is already gone is fine."""
        await self.leases.revoke_lease(lease_id)

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        """Refresh a lease once (waiting at most ``wait`` s); returns its TTL (<= 0: expired)."""
        return await self.leases.keep_alive_once(lease_id, wait)

    def keep_lease(self, lease_id: int, ttl: int) -> LeaseKeeper:
        """An async context manager keeping exactly ``lease_id`` alive (store/leases.py)."""
        return self.leases.keep_lease(lease_id, ttl)

    # -- node reports (reports.py) ----------------------------------------------

    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int:
        """Write ``status/nodes/<node>`` bound to ``lease_id``; returns the revision."""
        return await self.reports.put_report(node, report, lease_id)

    async def read_reports(self) -> Reports:
        """Node reports by node (a dict) with ``.revision`` and ``.mod_revisions``; corrupt ones skipped."""
        return await self.reports.read_reports()

    def watch_reports(
        self, after_revision: int | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
        """``(node, report)`` changes after ``after_revision`` (None: from now on); report None when gone."""
        return self.reports.watch_reports(after_revision)
