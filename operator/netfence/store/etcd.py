"""The etcd store: fenced multi-transaction writes, commit markers, the committed reader, leases, reports.

Write protocol (one *change* = one call of :meth:`EtcdStore.write`):

* the operations are split into transactions of at most ``max_ops_per_txn``
  data operations each (etcd allows 128 per transaction by default);
* if the change needs more than one transaction, the first one also puts the
  ``pending`` marker; the last one always deletes ``pending`` and puts
  ``commit`` (``{"schema", "seq", "time", "controller"}``);
* every transaction is conditioned on the fence (the ``leader`` key still has
  the create revision the writer was elected with); a failed condition raises
  :class:`NotLeaderError` and nothing further is written.

Committed reader protocol:

* :meth:`EtcdStore.committed_snapshot` reads the prefix at the latest revision
  R; if ``pending`` is absent there, every change begun before R has committed,
  so the state at R *is* the committed state. Otherwise it reads at the
  revision just before ``pending`` was created (the state before the in-flight
  change). Reading at R instead of at the commit's revision keeps snapshots
  working when the commit key's revision has been compacted away.
* :meth:`EtcdStore.follow_commits` watches from the snapshot's revision,
  buffers events and yields them only when a ``commit`` put is seen.

Only *committed* keys (``policies/``, ``sets/``, ``endpoints/``, ``meta/``)
appear in committed states and batches.

Failure behaviour: every unary call is bounded by ``EtcdSettings.timeout`` and
raises :class:`EtcdUnavailable` when etcd does not answer; watches reconnect
transparently and raise :class:`EtcdUnavailable` after
``watch_retry_timeout`` seconds without a response. The gRPC channel
(``store/connection.py``) reconnects at most 1 s apart and is rebuilt when
calls keep failing; :meth:`EtcdStore.pause` is the wait of retry loops, cut
short when etcd is reachable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
import grpc.aio
from etcd3aio import EtcdConnectionError, EtcdTransientError, prefix_range_end
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from netfence.store import layout as L
from netfence.store.commit_window import CommitWindow, foreign_in_snapshot
from netfence.store.connection import Connection, resolve_endpoints
from netfence.store.errors import (
    CompactedError,
    CorruptValueError,
    EtcdUnavailable,
    NotLeaderError,
    StoreError,
)
from netfence.store.lease import LeaseKeeper
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
from netfence.store.watch import WatchSettings, watch_revisions

log = logging.getLogger(__name__)

T = TypeVar("T")

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


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")



class EtcdStore:
    """Async etcd access for Netfence. ``connect()`` before use, ``close()`` after."""

    def __init__(self, config: EtcdSettings, identity: str | None = None) -> None:
        self.config = config
        self.layout = L.Layout(config.prefix)
        self.identity = identity or f"{socket.gethostname()}/{os.getpid()}"
        self.connection = Connection(config)
        self._seq: int | None = None
        self._write_lock = asyncio.Lock()  # one change at a time (seq numbers, the pending marker)
        #: Called with the revision of every transaction of ours that etcd applied (the
        #: controller tells its own writes from foreign ones by these, controller/syncer.py).
        self.txn_listeners: list[Callable[[int], None]] = []
        self._watch_settings = WatchSettings(
            probe_interval=config.watch_probe_interval, retry_timeout=config.watch_retry_timeout
        )

    # -- lifecycle -------------------------------------------------------------

    async def connect(self) -> None:
        """Open the channel (if not open) and check that etcd answers (EtcdUnavailable if not).

        May be called again after a failure: the channel stays and keeps reconnecting.
        """
        await self.connection.open()
        key = self.layout.key(L.COMMIT)
        await self._call("connect", self._kv.get(key, timeout=self.config.timeout))

    async def close(self) -> None:
        await self.connection.close()

    async def pause(self, delay: float) -> None:
        """The wait of a retry loop after an etcd error: ``delay`` seconds, or less when
        the channel was down and is connected again (see store/connection.py)."""
        await self.connection.pause(delay)

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _kv(self) -> KVService:
        return self.connection.kv

    @property
    def _lease(self) -> LeaseService:
        return self.connection.lease

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.connection.channel

    async def _call(self, what: str, call: Awaitable[T], revision: int = 0) -> T:
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

    async def _probe(self) -> None:
        """A cheap request that etcd must answer (used to check a silent watch)."""
        key = self.layout.key(L.COMMIT)
        await self._call("probe", self._kv.get(key, count_only=True, timeout=self.config.timeout))

    # -- reads -----------------------------------------------------------------

    async def _range(self, rel_prefix: str = "", revision: int = 0) -> tuple[list[Any], int]:
        """All key-values under ``prefix + rel_prefix`` at one revision (paginated)."""
        start = self.layout.key(rel_prefix)
        end = prefix_range_end(start)
        kvs: list[Any] = []
        rev = revision
        while True:
            resp = await self._call(
                "range",
                self._kv.get(
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

    async def _range_latest(self, rel_prefix: str = "") -> tuple[list[Any], int]:
        for _ in range(4):
            try:
                return await self._range(rel_prefix)
            except CompactedError:  # compacted between pages: start again
                continue
        return await self._range(rel_prefix)

    async def read_all(self) -> Snapshot:
        """Every key under the prefix at one revision (raw bytes, relative keys)."""
        kvs, rev = await self._range_latest()
        values: dict[str, bytes] = {}
        mods: dict[str, int] = {}
        for kv in kvs:
            rel = self.layout.relative(bytes(kv.key))
            values[rel] = bytes(kv.value)
            mods[rel] = int(kv.mod_revision)
        return Snapshot(values, rev, mods, mods.get(L.COMMIT, 0), L.PENDING in values)

    async def get(self, rel: str) -> KeyVersion | None:
        resp = await self._call("get", self._kv.get(self.layout.key(rel), timeout=self.config.timeout))
        if not resp.kvs:
            return None
        return self._version(resp.kvs[0], int(resp.header.revision))

    @staticmethod
    def _version(kv: Any, revision: int) -> KeyVersion:
        return KeyVersion(
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            lease=int(kv.lease),
            revision=revision,
        )

    async def commit_revision(self) -> int:
        """The mod revision of the ``commit`` key (0 if none)."""
        current = await self.get(L.COMMIT)
        return current.mod_revision if current else 0

    # -- the committed reader --------------------------------------------------

    def _committed(self, kvs: list[Any], revision: int, include: Include | None) -> CommittedState:
        values: dict[str, bytes] = {}
        mods: dict[str, int] = {}
        commit_revision = 0
        for kv in kvs:
            rel = self.layout.relative(bytes(kv.key))
            if rel == L.COMMIT:
                commit_revision = int(kv.mod_revision)
            elif L.is_committed_key(rel) and (include is None or include(rel)):
                values[rel] = bytes(kv.value)
                mods[rel] = int(kv.mod_revision)
        foreign = foreign_in_snapshot(mods, commit_revision)
        for rel in foreign:
            log.warning("%s was written outside a controller change (revision %d); not taken as committed",
                        rel, foreign[rel])
            del values[rel], mods[rel]
        return CommittedState(values, commit_revision, revision, foreign, mods)

    async def committed_snapshot(
        self, include: Include | None = None, *, max_wait: float = 30.0
    ) -> CommittedState:
        """The committed keys (filtered by ``include``) as of the latest commit.

        Never shows part of a change. Raises CompactedError only if a change
        has been in flight for longer than etcd keeps history and it does not
        complete within ``max_wait`` seconds.
        """
        deadline = time.monotonic() + max_wait
        delay = 0.1
        while True:
            kvs, rev = await self._range_latest()
            pending = next((kv for kv in kvs if bytes(kv.key) == self.layout.key(L.PENDING)), None)
            if pending is None:
                return self._committed(kvs, rev, include)
            before = int(pending.create_revision) - 1
            try:
                old, _ = await self._range(revision=before)
                return self._committed(old, before, include)
            except CompactedError:
                if time.monotonic() >= deadline:
                    raise
                log.info("a change is in flight and revision %d is compacted; waiting for its commit", before)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def watch_changes(
        self, rel: str = "", after_revision: int | None = None, *, prefix: bool = True
    ) -> AsyncGenerator[tuple[int, dict[str, bytes | None]], None]:
        """Raw changes per revision under ``rel`` (a relative prefix, or one key if not ``prefix``).

        ``after_revision`` None: from now on. Raises CompactedError / EtcdUnavailable.
        """
        key = self.layout.key(rel)
        end = prefix_range_end(key) if prefix else b""
        start = 0 if after_revision is None else after_revision + 1
        stream = watch_revisions(self.connection, key, end, start, self._watch_settings, self._probe)
        async with contextlib.aclosing(stream):
            async for revision, events in stream:
                yield revision, {self.layout.relative(ev.key): ev.value for ev in events}

    async def follow_commits(
        self, after_revision: int, include: Include | None = None, *, foreign_batches: bool = False
    ) -> AsyncGenerator[CommitBatch, None]:
        """Committed changes after ``after_revision``, one batch per commit marker.

        ``after_revision`` is a committed state's ``revision`` or
        ``commit_revision``. Every commit yields a batch (possibly without
        changes, so readers can advance their applied revision). If etcd has
        compacted the history after ``after_revision`` and a commit happened
        since, CompactedError is raised (take a new snapshot and follow from
        it); compacted history that held no commit is skipped safely.

        A committed-key write outside a controller change window (see
        store/commit_window.py) is *foreign*: it is never in ``changes``; it is
        listed in the next batch's ``foreign``, or at once in a batch with
        ``is_commit`` False when ``foreign_batches`` is set.
        """
        window = CommitWindow(after_revision, include)
        start = after_revision
        while True:
            try:
                stream = self.watch_changes("", start)
                async with contextlib.aclosing(stream):
                    async for revision, changes in stream:
                        batch, foreign = window.feed(revision, changes)
                        for rel, rev in foreign.items():
                            log.warning("%s was written outside a controller change (revision %d); "
                                        "not applied", rel, rev)
                        if batch is not None:
                            start = revision
                            yield batch
                        elif foreign and foreign_batches:
                            yield CommitBatch({}, window.position, foreign=foreign, is_commit=False)
                raise EtcdUnavailable("the etcd watch ended")  # watch_changes never ends normally
            except CompactedError as exc:
                start = await self._resume_after(window.position, exc)
                window.restart()

    async def _resume_after(self, position: int, exc: CompactedError) -> int:
        """Where to resume a commit watch positioned at ``position`` after a compaction.

        Safe only if no commit happened after ``position``; then every
        committed-key event after it belongs to the in-flight change that
        created ``pending`` (if any), so resume just before that, else now.
        """
        resp = await self._call(
            "read commit marker",
            self._kv.txn(
                [],
                [
                    KVService.txn_op_get(self.layout.key(L.COMMIT)),
                    KVService.txn_op_get(self.layout.key(L.PENDING)),
                ],
                (),
                timeout=self.config.timeout,
            ),
        )
        commit_kvs = resp.responses[0].response_range.kvs
        pending_kvs = resp.responses[1].response_range.kvs
        commit_revision = int(commit_kvs[0].mod_revision) if commit_kvs else 0
        if commit_revision > position:
            raise exc
        resume = int(pending_kvs[0].create_revision) - 1 if pending_kvs else int(resp.header.revision)
        if resume < position:
            raise exc
        log.info("history after %d was compacted but held no commit; resuming after %d", position, resume)
        return resume

    # -- fenced writes ---------------------------------------------------------

    def _fence_compares(self, fence: Fence | None) -> list[Any]:
        if fence is None:
            return []
        return [KVService.txn_compare_create_revision(fence.leader_key, fence.create_revision)]

    async def _next_seq(self) -> int:
        if self._seq is None:
            current = await self.get(L.COMMIT)
            seq = 0
            if current is not None:
                try:
                    seq = int(L.decode(current.value, L.COMMIT).get("seq", 0))
                except (CorruptValueError, TypeError, ValueError):
                    log.warning("the commit marker does not decode; restarting its sequence")
            self._seq = seq
        return self._seq + 1

    async def write(self, changes: Mapping[str, bytes | None], fence: Fence | None) -> int:
        """Apply puts (bytes) and deletes (None) of committed keys as one change.

        Returns the revision of the commit marker. Empty ``changes``: nothing is
        written and the current commit revision is returned (0 if none).
        Raises NotLeaderError if the fence no longer holds (nothing further is
        written), EtcdUnavailable if etcd does not answer (outcome unknown).
        """
        if not changes:
            return await self.commit_revision()
        ops: list[Any] = []
        for rel, value in changes.items():
            if not L.is_committed_key(rel):
                raise ValueError(f"{rel!r} is not a committed key (policies/, sets/, endpoints/, meta/)")
            key = self.layout.key(rel)
            ops.append(KVService.txn_op_delete(key) if value is None else KVService.txn_op_put(key, value))
        return await self._write_ops(ops, fence)

    async def write_commit_only(self, fence: Fence | None) -> int:
        """Write just a commit marker (clears a stale ``pending``); returns its revision."""
        return await self._write_ops([], fence)

    async def _write_ops(self, ops: list[Any], fence: Fence | None) -> int:
        async with self._write_lock:
            return await self._write_ops_locked(ops, fence)

    async def writes_settled(self) -> None:
        """Return once no change of ours is being written (its revisions have reached ``txn_listeners``)."""
        async with self._write_lock:
            return

    async def _write_ops_locked(self, ops: list[Any], fence: Fence | None) -> int:
        size = self.config.max_ops_per_txn
        chunks = [ops[i : i + size] for i in range(0, len(ops), size)] or [[]]
        seq = await self._next_seq()
        commit = L.encode({"seq": seq, "time": _now_iso(), "controller": self.identity})
        pending_key = self.layout.key(L.PENDING)
        if len(chunks) > 1:
            marker = L.encode({"seq": seq, "time": _now_iso(), "controller": self.identity})
            chunks[0] = [KVService.txn_op_put(pending_key, marker), *chunks[0]]
        chunks[-1] = [
            *chunks[-1],
            KVService.txn_op_delete(pending_key),
            KVService.txn_op_put(self.layout.key(L.COMMIT), commit),
        ]
        compares = self._fence_compares(fence)
        revision = 0
        for index, chunk in enumerate(chunks):
            try:
                resp = await self._call(
                    "txn", self._kv.txn(compares, chunk, (), timeout=self.config.timeout)
                )
            except StoreError:
                self._seq = None
                raise
            if not resp.succeeded:
                self._seq = None
                raise NotLeaderError(
                    f"write refused: {fence.leader_key if fence else 'leader'} is no longer held "
                    f"with create revision {fence.create_revision if fence else '?'} "
                    f"(transaction {index + 1} of {len(chunks)})",
                    partial=index > 0,
                )
            revision = int(resp.header.revision)
            for listener in self.txn_listeners:
                listener(revision)
        self._seq = seq
        log.debug("committed change seq %d at revision %d in %d txn(s)", seq, revision, len(chunks))
        return revision

    # -- primitives for leader election ---------------------------------------

    async def create_if_absent(self, rel: str, value: bytes, lease_id: int) -> Acquired:
        """Create ``rel`` bound to ``lease_id`` unless it exists; report the key as it is now."""
        key = self.layout.key(rel)
        resp = await self._call(
            "create",
            self._kv.txn(
                [KVService.txn_compare_create_revision(key, 0)],
                [KVService.txn_op_put(key, value, lease=lease_id)],
                [KVService.txn_op_get(key)],
                timeout=self.config.timeout,
            ),
        )
        revision = int(resp.header.revision)
        if resp.succeeded:
            return Acquired(True, KeyVersion(value, revision, revision, lease_id, revision))
        kvs = resp.responses[0].response_range.kvs
        if not kvs:  # cannot happen (the compare failed because it exists); be safe
            raise StoreError(f"{rel}: exists but could not be read")
        return Acquired(False, self._version(kvs[0], revision))

    # -- leases ----------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._call("lease grant", self._lease.grant(ttl, timeout=self.config.timeout))
        return int(resp.ID)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted at once); a lease that is already gone is fine."""
        try:
            await self._call("lease revoke", self._lease.revoke(lease_id, timeout=self.config.timeout))
        except StoreError as exc:
            if "not found" not in str(exc):
                raise

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        """Refresh a lease once (waiting at most ``wait`` s); returns its TTL (<= 0: expired)."""
        limit = self.config.timeout if wait is None else wait
        return await self._call("lease keepalive", self._keep_alive_read(lease_id, limit))

    async def _keep_alive_read(self, lease_id: int, limit: float) -> int:
        call = self._lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(limit):
                resp = await call.read()
        except TimeoutError as exc:
            raise EtcdUnavailable(f"lease keepalive: no answer within {limit}s") from exc
        except grpc.aio.AioRpcError as exc:
            raise EtcdUnavailable(f"lease keepalive: {exc.code().name} {exc.details()}") from exc
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:
            raise EtcdUnavailable("lease keepalive: stream closed")
        return int(resp.TTL)

    def keep_lease(self, lease_id: int, ttl: int) -> LeaseKeeper:
        """An async context manager keeping exactly ``lease_id`` alive.

        Its ``alive`` turns False (and ``lost`` is set) once the lease is
        expired or presumed expired; the owner then grants a new lease. For a
        keeper that re-grants by itself, use ``LeaseKeeper(store, ttl, on_new_lease=...)``.
        """
        return LeaseKeeper(self, ttl, lease_id=lease_id, regrant=False)

    # -- node reports ----------------------------------------------------------

    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int:
        """Write ``status/nodes/<node>`` bound to ``lease_id``; returns the revision."""
        key = self.layout.key(self.layout.node_status(node))
        put = self._kv.put(key, L.encode(dict(report)), lease=lease_id, timeout=self.config.timeout)
        resp = await self._call("put report", put)
        return int(resp.header.revision)

    def _report(self, rel: str, value: bytes, revision: int) -> dict[str, Any] | None:
        try:
            return L.decode(value, rel)
        except CorruptValueError as exc:
            log.warning("ignoring node report at revision %d: %s", revision, exc)
            return None

    async def read_reports(self) -> Reports:
        """Node reports by node (a dict) with ``.revision`` and ``.mod_revisions``; corrupt ones skipped."""
        kvs, rev = await self._range_latest(L.STATUS_NODES)
        reports: dict[str, dict[str, Any]] = {}
        mods: dict[str, int] = {}
        for kv in kvs:
            rel = self.layout.relative(bytes(kv.key))
            node = self.layout.parse_node_status(rel)
            data = self._report(rel, bytes(kv.value), int(kv.mod_revision)) if node else None
            if node and data is not None:
                reports[node] = data
                mods[node] = int(kv.mod_revision)
        return Reports(reports, rev, mods)

    async def watch_reports(
        self, after_revision: int | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
        """``(node, report)`` changes after ``after_revision`` (None: from now on).

        ``report`` is None when the report is gone (deleted, its lease expired)
        or does not decode. Raises CompactedError / EtcdUnavailable.
        """
        stream = self.watch_changes(L.STATUS_NODES, after_revision)
        async with contextlib.aclosing(stream):
            async for revision, changes in stream:
                for rel, value in changes.items():
                    node = self.layout.parse_node_status(rel)
                    if node is not None:
                        yield node, None if value is None else self._report(rel, value, revision)
