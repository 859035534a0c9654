"""What the rest of Netfence needs from the store, as small protocols (no I/O here).

The concrete etcd classes implement them (``store/reader.py``, ``store/writer.py``,
``store/reports.py``, ``store/leases.py``, all composed by ``store/etcd.py``
``EtcdStore``); the orchestration depends only on these:

* the agent loop (``agent/loop.py``): :class:`AgentStore` — a
  :class:`CommittedReader`, a :class:`ReportStore` and :class:`LeaseKeeping`;
* the syncer (``controller/syncer.py``): :class:`SyncerStore` — a
  :class:`FencedWriter` and a :class:`RawReader`, and a :class:`Leadership`;
* the election (``store/election.py``): :class:`ElectionStore`; the lease
  keeper (``store/lease.py``): :class:`LeaseOps`;
* the controller's report watch: :class:`ReportStore`.

In-memory fakes of all of them are in ``tests/fakes/store.py``.

Errors are the store's (``store/errors.py``): :class:`~netfence.store.errors.EtcdUnavailable`
(no answer; a write's outcome is unknown), :class:`~netfence.store.errors.NotLeaderError`
(the fence no longer holds), :class:`~netfence.store.errors.CompactedError`
(history gone: take a fresh snapshot).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from netfence.store.layout import Layout
from netfence.store.types import (
    Acquired,
    CommitBatch,
    CommittedState,
    Fence,
    Include,
    KeyRange,
    KeyVersion,
    Reports,
    Snapshot,
)

Changes = dict[str, bytes | None]  # relative key -> value (None: deleted)


class Pausing(Protocol):
    async def pause(self, delay: float) -> None:
        """The wait of a retry loop after a store error: ``delay`` seconds, or less when the
        store was unreachable and answers again."""


class CommittedReader(Pausing, Protocol):
    """Reads only committed state: never half of a change (``store/reader.py``)."""

    async def committed_snapshot(
        self, include: Include | None = None, *, max_wait: float = 30.0, ranges: Sequence[KeyRange] | None = None
    ) -> CommittedState:
        """The committed keys (filtered by ``include``) as of the latest commit (``ranges``: only
        these keys / prefixes are read)."""
        ...

    def follow_commits(
        self,
        after_revision: int,
        include: Include | None = None,
        *,
        foreign_batches: bool = False,
        ranges: Sequence[KeyRange] | None = None,
    ) -> AsyncGenerator[CommitBatch, None]:
        """One batch per commit after ``after_revision``, in commit order; foreign writes
        never in ``changes`` (at once in an ``is_commit=False`` batch with ``foreign_batches``).
        ``ranges``: watch only these keys / prefixes (and the commit marker), never half a
        commit across them (None: the whole prefix).
        Raises CompactedError when a commit was lost to compaction, EtcdUnavailable."""
        ...

    async def commit_revision(self) -> int:
        """The revision of the latest commit marker (0: none); a cheap liveness check too."""
        ...


class RawReader(Protocol):
    """Reads every key as it is, committed or not (the controller's reconcile, the election)."""

    @property
    def layout(self) -> Layout: ...

    async def read_all(self) -> Snapshot:
        """Every key under the prefix at one revision (relative keys, raw values)."""
        ...

    async def get(self, rel: str) -> KeyVersion | None: ...

    def watch_changes(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, Changes], None]:
        """Raw changes per revision under ``rel`` (``after_revision`` None: from now on)."""
        ...


class FencedWriter(Protocol):
    """Writes one change as fenced transactions ending with a commit marker (``store/writer.py``)."""

    @property
    def layout(self) -> Layout: ...

    @property
    def txn_listeners(self) -> list[Callable[[int], None]]:
        """Called with the revision of every transaction of ours that was applied."""
        ...

    async def write(self, changes: Mapping[str, bytes | None], fence: Fence | None) -> int:
        """Puts/deletes of committed keys as one change; the commit marker's revision.
        NotLeaderError (``partial``: earlier transactions applied, left uncommitted)."""
        ...

    async def write_commit_only(self, fence: Fence | None) -> int:
        """Just a commit marker (clears a stale ``pending``); its revision."""
        ...

    async def writes_settled(self) -> None:
        """Return once no change is being written (its revisions reached ``txn_listeners``)."""
        ...


class ReportStore(Protocol):
    """Node reports under ``status/nodes/<node>``, each bound to its agent's lease (``store/reports.py``)."""

    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int: ...

    async def read_reports(self) -> Reports: ...

    def watch_reports(
        self, after_revision: int | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
        """``(node, report)`` changes; report None when gone or undecodable."""
        ...


class LeaseOps(Protocol):
    """The lease primitives (``store/leases.py``); ``store/lease.py`` keeps one alive with them."""

    async def grant_lease(self, ttl: int) -> int: ...

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke (its keys go at once); a lease that is already gone is fine."""
        ...

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        """Refresh once; the remaining TTL (<= 0: expired)."""
        ...


class HeldLease(Protocol):
    """A lease kept alive while the context is entered (``store/lease.py`` ``LeaseKeeper``)."""

    @property
    def lease_id(self) -> int: ...

    @property
    def alive(self) -> bool:
        """False once the lease is known or presumed expired."""
        ...

    @property
    def lost(self) -> asyncio.Event: ...

    async def __aenter__(self) -> HeldLease: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class LeaseKeeping(LeaseOps, Protocol):
    def keep_lease(self, lease_id: int, ttl: int) -> HeldLease:
        """Keep exactly ``lease_id`` alive while entered; ``alive`` turns False when it is lost."""
        ...


class ElectionStore(LeaseOps, RawReader, Pausing, Protocol):
    """What ``store/election.py`` needs: leases, the leader key, a watch on it."""

    async def create_if_absent(self, rel: str, value: bytes, lease_id: int) -> Acquired:
        """Create ``rel`` bound to ``lease_id`` unless it exists; the key as it is now."""
        ...


class Leadership(Protocol):
    """Whether this controller leads, and the fence its writes carry (``store/election.py``)."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def fence(self) -> Fence | None: ...


class AgentStore(CommittedReader, ReportStore, LeaseKeeping, Protocol):
    """Everything the agent loop uses."""


class SyncerStore(FencedWriter, RawReader, Pausing, Protocol):
    """Everything the controller's syncer uses."""
