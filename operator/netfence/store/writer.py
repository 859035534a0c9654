"""The fenced writer: one change = fenced transactions ending with a commit marker (implements ``FencedWriter``).

Write protocol (one *change* = one call of :meth:`EtcdFencedWriter.write`):

* the operations are split into transactions of at most ``max_ops_per_txn``
  data operations each (etcd allows 128 per transaction by default);
* if the change needs more than one transaction, the first one also puts the
  ``pending`` marker; the last one always deletes ``pending`` and puts
  ``commit`` (``{"schema", "seq", "time", "controller", "reports"}``, ``L.commit_marker``);
* every transaction is conditioned on the fence (the ``leader`` key still has
  the create revision the writer was elected with); a failed condition raises
  :class:`NotLeaderError` and nothing further is written (the transactions
  already applied stay uncommitted: readers never see them, and the next
  leader's reconcile completes or undoes them with its own commit).

One change is written at a time; :meth:`EtcdFencedWriter.writes_settled`
waits for the one in progress. ``txn_listeners`` learn the revision of every
transaction applied (the controller tells its own writes from foreign ones).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from etcd3aio.kv import KVService

from netfence.store import layout as L
from netfence.store.access import EtcdAccess
from netfence.store.errors import CorruptValueError, NotLeaderError, StoreError
from netfence.store.types import Fence

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def split_ops(ops: list[Any], size: int) -> list[list[Any]]:
    """The data operations of one change, ``size`` per transaction (at least one transaction)."""
    return [ops[i : i + size] for i in range(0, len(ops), size)] or [[]]


class EtcdFencedWriter:
    """Fenced multi-transaction changes over a shared :class:`EtcdAccess` (see the module doc)."""

    def __init__(self, access: EtcdAccess, identity: str) -> None:
        self.access = access
        self.layout = access.layout
        self.identity = identity
        self._seq: int | None = None
        self._write_lock = asyncio.Lock()  # one change at a time (seq numbers, the pending marker)
        #: Called with the revision of every transaction of ours that etcd applied (the
        #: controller tells its own writes from foreign ones by these, controller/syncer.py).
        self.txn_listeners: list[Callable[[int], None]] = []

    async def commit_revision(self) -> int:
        current = await self.access.get(L.COMMIT)
        return current.mod_revision if current else 0

    def _fence_compares(self, fence: Fence | None) -> list[Any]:
        if fence is None:
            return []
        return [KVService.txn_compare_create_revision(fence.leader_key, fence.create_revision)]

    async def _next_seq(self) -> int:
        if self._seq is None:
            current = await self.access.get(L.COMMIT)
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

    async def writes_settled(self) -> None:
        """Return once no change of ours is being written (its revisions have reached ``txn_listeners``)."""
        async with self._write_lock:
            return

    async def _write_ops(self, ops: list[Any], fence: Fence | None) -> int:
        async with self._write_lock:
            return await self._write_ops_locked(ops, fence)

    async def _write_ops_locked(self, ops: list[Any], fence: Fence | None) -> int:
        chunks = split_ops(ops, self.access.config.max_ops_per_txn)
        seq = await self._next_seq()
        commit = L.encode(L.commit_marker(seq, now_iso(), self.identity))
        pending_key = self.layout.key(L.PENDING)
        if len(chunks) > 1:
            marker = L.encode(L.commit_marker(seq, now_iso(), self.identity))
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
                resp = await self.access.call(
                    "txn", self.access.kv.txn(compares, chunk, (), timeout=self.access.config.timeout)
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
