"""In-memory fakes of the store protocols (``netfence.store.protocols``): pure, deterministic, no etcd.

:class:`MemoryEtcd` is one in-memory etcd: keys with create/mod revisions, the
whole history (every transaction is one revision; a watch replays it exactly),
leases that delete their keys when revoked, compaction, an outage switch, and
hooks between the transactions of a change. The role fakes mirror the real
modules and implement the same protocols over it:

| fake | real | protocol |
|---|---|---|
| :class:`FakeCommittedReader` | ``store/reader.py`` | ``CommittedReader`` |
| :class:`FakeFencedWriter` | ``store/writer.py`` | ``FencedWriter`` |
| :class:`FakeReportStore` | ``store/reports.py`` | ``ReportStore`` |
| :class:`FakeLeases` | ``store/leases.py`` | ``LeaseKeeping`` (+ ``create_if_absent``) |
| :class:`FakeStore` | ``store/etcd.py`` ``EtcdStore`` | ``AgentStore``, ``SyncerStore``, ``ElectionStore`` |
| :class:`FakeLeadership` | ``store/election.py`` | ``Leadership`` |

The committed reader uses the real (pure) ``CommitWindow``, so commit batching
and foreign-write detection are the production logic. Nothing here sleeps
except :meth:`MemoryEtcd.pause` (a scaled-down wait, ended early when an outage
ends), and nothing depends on the clock.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from netfence.store import layout as L
from netfence.store.commit_window import CommitWindow, foreign_in_snapshot
from netfence.store.errors import CompactedError, CorruptValueError, EtcdUnavailable, NotLeaderError, StoreError
from netfence.store.layout import Layout
from netfence.store.ranges import KeyRange
from netfence.store.settings import MAX_OPS_PER_TXN
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

if TYPE_CHECKING:
    from netfence.store.protocols import AgentStore, ElectionStore, Leadership, SyncerStore

Changes = dict[str, bytes | None]


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Txn:
    """One transaction a fenced writer attempted (``ok`` False: the fence failed, nothing applied)."""

    writer: str
    index: int  # 0-based, within its change
    total: int  # transactions of the change
    keys: tuple[str, ...]  # relative keys put or deleted (pending/commit included)
    ok: bool
    revision: int  # the store revision after it (unchanged when refused)


TxnHook = Callable[[Txn], Awaitable[None]]


class MemoryEtcd:
    """One in-memory etcd shared by every fake client (see the module doc).

    Keys are relative to ``layout``'s prefix. Mutations are synchronous and
    each makes one revision; watches and lease holders are told at once.
    """

    def __init__(self, prefix: str = "/t/", *, max_ops_per_txn: int = MAX_OPS_PER_TXN,
                 pause_scale: float = 0.01) -> None:
        self.layout = Layout(prefix)
        self.max_ops_per_txn = max_ops_per_txn
        self.pause_scale = pause_scale
        self.revision = 0
        self.keys: dict[str, Entry] = {}
        self.history: list[tuple[int, Changes]] = []  # (revision, changes), ascending
        self.compacted = 0  # watches may not start at or before this revision
        self.leases: dict[int, int] = {}  # lease id -> ttl
        self.down = False
        self.txns: list[Txn] = []  # every fenced transaction attempted, in order
        self.changes_written: list[Changes] = []  # every change a fenced writer committed, in order
        self.pauses: list[float] = []
        self.delivered = 0  # the last revision a watch consumer has finished with (asked for more after)
        #: Awaited before every fenced transaction is checked and applied (hold writes, depose
        #: the leader between the transactions of a change...). ``Txn.ok``/``revision`` are
        #: provisional there.
        self.before_txn: TxnHook | None = None
        self._next_lease = 0x100
        self._changed = asyncio.Event()
        self._lost: dict[int, list[asyncio.Event]] = {}

    # -- mutations -------------------------------------------------------------------------

    def check(self, what: str) -> None:
        """Every call of a client starts here: waiters look again (the caller's state may have
        moved since its last call); EtcdUnavailable during an outage."""
        self.notify()
        self._raise_if_down(what)

    def _raise_if_down(self, what: str) -> None:
        if self.down:
            raise EtcdUnavailable(f"{what}: etcd is down (fake)")

    def apply(self, changes: Mapping[str, bytes | None], lease: int = 0) -> int:
        """One transaction of puts and deletes; the revision after it (unchanged if it changed nothing)."""
        recorded: Changes = {}
        revision = self.revision + 1
        for rel, value in changes.items():
            old = self.keys.get(rel)
            if value is None:
                if old is not None:
                    del self.keys[rel]
                    recorded[rel] = None
            else:
                self.keys[rel] = Entry(value, old.create_revision if old else revision, revision, lease)
                recorded[rel] = value
        if recorded:
            self.revision = revision
            self.history.append((revision, recorded))
            self.notify()
        return self.revision

    def put(self, rel: str, value: bytes, lease: int = 0) -> int:
        """A raw write, as ``etcdctl put`` would make it (no fence, no commit marker)."""
        return self.apply({rel: value}, lease)

    def delete(self, rel: str) -> int:
        return self.apply({rel: None})

    def compact(self, revision: int | None = None) -> None:
        """Forget the history up to ``revision`` (default: now) for watches."""
        self.compacted = self.revision if revision is None else revision

    def outage(self, down: bool = True) -> None:
        """Every call fails with EtcdUnavailable (and watches end with it) while down."""
        self.down = down
        self.notify()

    def notify(self) -> None:
        """Wake everyone waiting in :meth:`changed` (done by every mutation)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Until the next mutation (or outage switch)."""
        await self._changed.wait()

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until ``check()`` holds, looking again after every call and mutation,
        every watch event a consumer has finished with, and every pause."""
        async with asyncio.timeout(timeout):
            while not check():
                await self.changed()

    # -- reads -----------------------------------------------------------------------------

    def state_at(self, revision: int) -> dict[str, Entry]:
        """The keys as they were at ``revision`` (CompactedError before the compaction point)."""
        if revision >= self.revision:
            return dict(self.keys)
        if revision < self.compacted:
            raise CompactedError(revision, self.compacted)
        state: dict[str, Entry] = {}
        for rev, changes in self.history:
            if rev > revision:
                break
            for rel, value in changes.items():
                old = state.get(rel)
                if value is None:
                    state.pop(rel, None)
                else:
                    state[rel] = Entry(value, old.create_revision if old else rev, rev)
        return state

    def commit_revision(self) -> int:
        entry = self.keys.get(L.COMMIT)
        return entry.mod_revision if entry else 0

    def values(self, prefix: str = "") -> dict[str, bytes]:
        return {rel: e.value for rel, e in sorted(self.keys.items()) if rel.startswith(prefix)}

    def decoded(self, prefix: str = "") -> dict[str, Any]:
        return {rel: json.loads(raw) for rel, raw in self.values(prefix).items()}

    async def watch(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, Changes], None]:
        """Changes per revision after ``after_revision`` (None: from now on), exactly as etcd orders them."""
        self._raise_if_down("watch")
        position = self.revision if after_revision is None else after_revision
        if position < self.compacted:
            raise CompactedError(position + 1, self.compacted)
        index = bisect.bisect_right([rev for rev, _ in self.history], position)
        while True:
            while index < len(self.history):
                revision, changes = self.history[index]
                index += 1
                wanted = {k: v for k, v in changes.items() if (k.startswith(rel) if prefix else k == rel)}
                if wanted:
                    yield revision, wanted
                    # the consumer is done with it (it asks for more): tell waiters
                    self.delivered = max(self.delivered, revision)
                    self.notify()
            changed = self._changed
            self._raise_if_down("watch")
            await changed.wait()
            self._raise_if_down("watch")

    # -- leases ----------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        self._next_lease += 1
        self.leases[self._next_lease] = ttl
        return self._next_lease

    def revoke(self, lease_id: int) -> None:
        """Revoke (or let expire) a lease: its keys go in one revision and its holders learn of it."""
        if self.leases.pop(lease_id, None) is None:
            return
        self.apply({rel: None for rel, e in self.keys.items() if e.lease == lease_id})
        for lost in self._lost.pop(lease_id, []):
            lost.set()

    def watch_lease(self, lease_id: int, lost: asyncio.Event) -> None:
        if lease_id not in self.leases:
            lost.set()
        else:
            self._lost.setdefault(lease_id, []).append(lost)

    # -- the election ----------------------------------------------------------------------

    def elect(self, identity: str) -> Fence:
        """Make ``identity`` the leader now (a fresh ``leader`` key on a lease of its own)."""
        lease = self.grant(5)
        self.put(L.LEADER, L.encode({"holder": identity}), lease)
        return Fence(self.layout.key(L.LEADER).decode(), self.keys[L.LEADER].create_revision)

    def depose(self) -> None:
        """The leader key goes (its lease expired, as when a leader loses etcd)."""
        entry = self.keys.get(L.LEADER)
        if entry is not None:
            if entry.lease:
                self.revoke(entry.lease)
            else:
                self.delete(L.LEADER)

    def fence_holds(self, fence: Fence | None) -> bool:
        if fence is None:
            return True
        entry = self.keys.get(self.layout.relative(fence.leader_key.encode()))
        return entry is not None and entry.create_revision == fence.create_revision

    # -- pauses ----------------------------------------------------------------------------

    async def pause(self, delay: float) -> None:
        """A retry loop's wait: ``delay * pause_scale`` seconds, ended early when an outage ends."""
        self.pauses.append(delay)
        self.notify()
        wait = delay * self.pause_scale
        if not self.down:
            await asyncio.sleep(wait)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while self.down:
                    await self.changed()


class _Role:
    def __init__(self, etcd: MemoryEtcd) -> None:
        self.etcd = etcd

    @property
    def layout(self) -> Layout:
        return self.etcd.layout

    async def pause(self, delay: float) -> None:
        await self.etcd.pause(delay)


class FakeCommittedReader(_Role):
    """``CommittedReader`` over :class:`MemoryEtcd` (the real CommitWindow decides batches and foreign writes).

    Unlike the real reader it does not try to resume across a compaction: a
    follow from a compacted revision raises CompactedError at once.
    ``delivered_events``: watched key events handed to followers (with ``ranges``, only theirs).
    """

    def __init__(self, etcd: MemoryEtcd) -> None:
        super().__init__(etcd)
        self.delivered_events = 0

    async def commit_revision(self) -> int:
        self.etcd.check("commit revision")
        return self.etcd.commit_revision()

    async def committed_snapshot(
        self, include: Include | None = None, *, max_wait: float = 30.0, ranges: Sequence[KeyRange] | None = None
    ) -> CommittedState:
        self.etcd.check("committed snapshot")
        revision = self.etcd.revision
        pending = self.etcd.keys.get(L.PENDING)
        if pending is not None:
            revision = pending.create_revision - 1  # the state before the change in flight
        state = self.etcd.state_at(revision)
        commit = state.get(L.COMMIT)
        values = {rel: e.value for rel, e in state.items()
                  if L.is_committed_key(rel) and (include is None or include(rel))
                  and (ranges is None or any(rel.startswith(r.rel) if r.prefix else rel == r.rel for r in ranges))}
        mods = {rel: state[rel].mod_revision for rel in values}
        commit_revision = commit.mod_revision if commit else 0
        foreign = foreign_in_snapshot(mods, commit_revision)
        for rel in foreign:
            del values[rel], mods[rel]
        return CommittedState(values, commit_revision, revision, foreign, mods)

    async def follow_commits(
        self,
        after_revision: int,
        include: Include | None = None,
        *,
        foreign_batches: bool = False,
        ranges: Sequence[KeyRange] | None = None,
    ) -> AsyncGenerator[CommitBatch, None]:
        window = CommitWindow(after_revision, include)
        stream = self.etcd.watch("", after_revision)
        scope = None if ranges is None else [KeyRange(L.COMMIT, False), KeyRange(L.PENDING, False), *ranges]
        async with contextlib.aclosing(stream):
            async for revision, every in stream:
                # one revision at a time, like the real merged watch (store/ranges.py) releases them
                changes = every if scope is None else {
                    k: v for k, v in every.items() if any(k.startswith(r.rel) if r.prefix else k == r.rel
                                                          for r in scope)}
                self.delivered_events += len(changes)
                if not changes:
                    continue
                batch, foreign = window.feed(revision, changes)
                if batch is not None:
                    yield batch
                elif foreign and foreign_batches:
                    yield CommitBatch({}, window.position, foreign=foreign, is_commit=False)
        raise EtcdUnavailable("the watch ended")  # pragma: no cover - the fake watch never ends


class FakeFencedWriter(_Role):
    """``FencedWriter`` over :class:`MemoryEtcd`: the real write protocol (see ``store/writer.py``).

    The change is split into transactions of ``etcd.max_ops_per_txn`` keys; a
    change of several puts ``pending`` in its first and deletes it with the
    commit marker in its last; every transaction is checked against the fence
    (after ``etcd.before_txn``) and refused with NotLeaderError when it fails.
    """

    def __init__(self, etcd: MemoryEtcd, identity: str) -> None:
        super().__init__(etcd)
        self.identity = identity
        self.txn_listeners: list[Callable[[int], None]] = []
        self._seq = 0
        self._lock = asyncio.Lock()

    async def write(self, changes: Mapping[str, bytes | None], fence: Fence | None) -> int:
        for rel in changes:
            if not L.is_committed_key(rel):
                raise ValueError(f"{rel!r} is not a committed key")
        self.etcd.check("txn")
        if not changes:
            return self.etcd.commit_revision()
        return await self._write(dict(changes), fence)

    async def write_commit_only(self, fence: Fence | None) -> int:
        self.etcd.check("txn")
        return await self._write({}, fence)

    async def writes_settled(self) -> None:
        async with self._lock:
            return

    async def _write(self, changes: Changes, fence: Fence | None) -> int:
        async with self._lock:
            items = list(changes.items())
            size = self.etcd.max_ops_per_txn
            chunks: list[Changes] = [dict(items[i: i + size]) for i in range(0, len(items), size)] or [{}]
            seq = self._seq + 1
            marker = L.encode(L.commit_marker(seq, "2024-01-01T00:00:00.000Z", self.identity))
            if len(chunks) > 1:
                chunks[0] = {L.PENDING: marker, **chunks[0]}
            chunks[-1] = {**chunks[-1], L.PENDING: None, L.COMMIT: marker}
            revision = 0
            for index, chunk in enumerate(chunks):
                txn = Txn(self.identity, index, len(chunks), tuple(chunk), True, self.etcd.revision)
                if self.etcd.before_txn is not None:
                    await self.etcd.before_txn(txn)
                self.etcd.check("txn")
                if not self.etcd.fence_holds(fence):
                    self.etcd.txns.append(Txn(txn.writer, index, txn.total, txn.keys, False, self.etcd.revision))
                    self.etcd.notify()
                    raise NotLeaderError(f"write refused: the fence no longer holds (transaction {index + 1} "
                                         f"of {len(chunks)})", partial=index > 0)
                revision = self.etcd.apply(chunk)
                self.etcd.txns.append(Txn(txn.writer, index, txn.total, txn.keys, True, revision))
                for listener in self.txn_listeners:
                    listener(revision)
            self._seq = seq
            self.etcd.changes_written.append(changes)
            return revision


class FakeReportStore(_Role):
    """``ReportStore`` over :class:`MemoryEtcd` (reports are bound to leases, like the real ones)."""

    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int:
        self.etcd.check("put report")
        if lease_id not in self.etcd.leases:
            raise StoreError(f"put report: lease {lease_id:x} not found")
        return self.etcd.put(self.layout.node_status(node), L.encode(dict(report)), lease_id)

    def reports(self) -> dict[str, dict[str, Any]]:
        """The reports stored now (test helper)."""
        found = {}
        for rel, raw in self.etcd.values(L.STATUS_NODES).items():
            node = self.layout.parse_node_status(rel)
            if node is not None:
                with contextlib.suppress(CorruptValueError):
                    found[node] = L.decode(raw, rel)
        return found

    async def read_reports(self) -> Reports:
        self.etcd.check("read reports")
        mods = {}
        for rel, entry in self.etcd.keys.items():
            node = self.layout.parse_node_status(rel)
            if node is not None:
                mods[node] = entry.mod_revision
        reports = self.reports()
        return Reports(reports, self.etcd.revision, {n: m for n, m in mods.items() if n in reports})

    async def watch_reports(
        self, after_revision: int | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
        stream = self.etcd.watch(L.STATUS_NODES, after_revision)
        async with contextlib.aclosing(stream):
            async for _revision, changes in stream:
                for rel, value in changes.items():
                    node = self.layout.parse_node_status(rel)
                    if node is None:
                        continue
                    try:
                        yield node, None if value is None else L.decode(value, rel)
                    except CorruptValueError:
                        yield node, None


class FakeHeldLease:
    """``HeldLease``: alive until the lease is revoked or expires in the :class:`MemoryEtcd`."""

    def __init__(self, etcd: MemoryEtcd, lease_id: int) -> None:
        self.etcd = etcd
        self.lease_id = lease_id
        self.lost = asyncio.Event()

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and self.lease_id in self.etcd.leases

    async def __aenter__(self) -> FakeHeldLease:
        self.etcd.watch_lease(self.lease_id, self.lost)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class FakeLeases(_Role):
    """``LeaseKeeping`` and ``create_if_absent`` over :class:`MemoryEtcd` (leases never expire by time:
    tests end them with ``MemoryEtcd.revoke``)."""

    async def grant_lease(self, ttl: int) -> int:
        self.etcd.check("lease grant")
        return self.etcd.grant(ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        self.etcd.check("lease revoke")
        self.etcd.revoke(lease_id)

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        self.etcd.check("lease keepalive")
        return self.etcd.leases.get(lease_id, 0)

    def keep_lease(self, lease_id: int, ttl: int) -> FakeHeldLease:
        return FakeHeldLease(self.etcd, lease_id)

    async def create_if_absent(self, rel: str, value: bytes, lease_id: int) -> Acquired:
        self.etcd.check("create")
        current = self.etcd.keys.get(rel)
        created = current is None
        if created:
            self.etcd.put(rel, value, lease_id)
        entry = self.etcd.keys[rel]
        return Acquired(created, KeyVersion(entry.value, entry.create_revision, entry.mod_revision, entry.lease,
                                            self.etcd.revision))


class FakeStore(_Role):
    """All roles over one :class:`MemoryEtcd`, like ``EtcdStore`` (one per fake process)."""

    def __init__(self, etcd: MemoryEtcd | None = None, identity: str = "fake") -> None:
        super().__init__(etcd or MemoryEtcd())
        self.identity = identity
        self.reader = FakeCommittedReader(self.etcd)
        self.writer = FakeFencedWriter(self.etcd, identity)
        self.reports = FakeReportStore(self.etcd)
        self.leases = FakeLeases(self.etcd)

    # raw reads
    async def read_all(self) -> Snapshot:
        self.etcd.check("range")
        keys = self.etcd.keys
        return Snapshot({r: e.value for r, e in keys.items()}, self.etcd.revision,
                        {r: e.mod_revision for r, e in keys.items()}, self.etcd.commit_revision(),
                        L.PENDING in keys)

    async def get(self, rel: str) -> KeyVersion | None:
        self.etcd.check("get")
        entry = self.etcd.keys.get(rel)
        if entry is None:
            return None
        return KeyVersion(entry.value, entry.create_revision, entry.mod_revision, entry.lease, self.etcd.revision)

    def watch_changes(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, Changes], None]:
        return self.etcd.watch(rel, after_revision, prefix=prefix)

    # the committed reader
    async def commit_revision(self) -> int:
        return await self.reader.commit_revision()

    async def committed_snapshot(
        self, include: Include | None = None, *, max_wait: float = 30.0, ranges: Sequence[KeyRange] | None = None
    ) -> CommittedState:
        return await self.reader.committed_snapshot(include, max_wait=max_wait, ranges=ranges)

    def follow_commits(
        self,
        after_revision: int,
        include: Include | None = None,
        *,
        foreign_batches: bool = False,
        ranges: Sequence[KeyRange] | None = None,
    ) -> AsyncGenerator[CommitBatch, None]:
        return self.reader.follow_commits(after_revision, include, foreign_batches=foreign_batches, ranges=ranges)

    # the fenced writer
    @property
    def txn_listeners(self) -> list[Callable[[int], None]]:
        return self.writer.txn_listeners

    async def write(self, changes: Mapping[str, bytes | None], fence: Fence | None) -> int:
        return await self.writer.write(changes, fence)

    async def write_commit_only(self, fence: Fence | None) -> int:
        return await self.writer.write_commit_only(fence)

    async def writes_settled(self) -> None:
        await self.writer.writes_settled()

    # leases and the election
    async def grant_lease(self, ttl: int) -> int:
        return await self.leases.grant_lease(ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        await self.leases.revoke_lease(lease_id)

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        return await self.leases.keep_alive_once(lease_id, wait)

    def keep_lease(self, lease_id: int, ttl: int) -> FakeHeldLease:
        return self.leases.keep_lease(lease_id, ttl)

    async def create_if_absent(self, rel: str, value: bytes, lease_id: int) -> Acquired:
        return await self.leases.create_if_absent(rel, value, lease_id)

    # node reports
    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int:
        return await self.reports.put_report(node, report, lease_id)

    async def read_reports(self) -> Reports:
        return await self.reports.read_reports()

    def watch_reports(
        self, after_revision: int | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
        return self.reports.watch_reports(after_revision)


@dataclass
class FakeLeadership:
    """``Leadership`` set by the test: a deposed leader keeps believing it leads until told otherwise
    (its fence is what stops its writes)."""

    fence: Fence | None = None
    is_leader: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.is_leader = self.fence is not None

    def lead(self, fence: Fence) -> None:
        self.fence, self.is_leader = fence, True

    def step_down(self) -> None:
        self.fence, self.is_leader = None, False


if TYPE_CHECKING:  # the fakes implement the protocols the production code depends on (checked by mypy)

    def _conforms(store: FakeStore, leadership: FakeLeadership) -> tuple[
            AgentStore, SyncerStore, ElectionStore, Leadership]:
        return store, store, store, leadership
