"""The committed reader: never shows half of a change (implements ``CommittedReader``).

* :meth:`EtcdCommittedReader.committed_snapshot` reads the prefix at the
  latest revision R; if ``pending`` is absent there, every change begun before
  R has committed, so the state at R *is* the committed state. Otherwise it
  reads at the revision just before ``pending`` was created (the state before
  the in-flight change). Reading at R instead of at the commit's revision keeps
  snapshots working when the commit key's revision has been compacted away.
* :meth:`EtcdCommittedReader.follow_commits` watches from the snapshot's
  revision, buffers events and yields them only when a ``commit`` put is seen
  (``store/commit_window.py`` tells them from foreign writes). By default it
  watches the whole prefix; with ``ranges`` it watches only those key ranges
  plus ``commit`` and ``pending``, on one Watch stream, and acts on a revision
  only once every range is known complete up to it (``store/ranges.py``; a
  ``WatchProgressRequest`` proves it when the ranges themselves do not), so a
  commit is never delivered before all of its keys on every range.

Only *committed* keys (``policies/``, ``sets/``, ``sets2/``, ``endpoints/``,
``meta/``) appear in committed states and batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from etcd3aio.kv import KVService

from netfence.store import layout as L
from netfence.store.access import EtcdAccess
from netfence.store.commit_window import CommitWindow, foreign_in_snapshot
from netfence.store.errors import CompactedError, EtcdUnavailable
from netfence.store.ranges import KeyRange, RangeMerger
from netfence.store.types import CommitBatch, CommittedState, Include
from netfence.store.watch import RangeEvents

log = logging.getLogger(__name__)


class EtcdCommittedReader:
    """Committed snapshots and commit batches over a shared :class:`EtcdAccess`."""

    def __init__(self, access: EtcdAccess) -> None:
        self.access = access
        self.layout = access.layout

    async def pause(self, delay: float) -> None:
        await self.access.pause(delay)

    async def commit_revision(self) -> int:
        """The mod revision of the ``commit`` key (0 if none)."""
        current = await self.access.get(L.COMMIT)
        return current.mod_revision if current else 0

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
        self, include: Include | None = None, *, max_wait: float = 30.0, ranges: Sequence[KeyRange] | None = None
    ) -> CommittedState:
        """The committed keys (filtered by ``include``) as of the latest commit.

        Never shows part of a change. Raises CompactedError only if a change
        has been in flight for longer than etcd keeps history and it does not
        complete within ``max_wait`` seconds. ``ranges``: read only these keys /
        prefixes (an agent's watch scope), at one revision, instead of the whole prefix.
        """
        if ranges is not None:
            return await self._ranged_snapshot(list(ranges), include, max_wait)
        deadline = time.monotonic() + max_wait
        delay = 0.1
        while True:
            kvs, rev = await self.access.range_latest()
            pending = next((kv for kv in kvs if bytes(kv.key) == self.layout.key(L.PENDING)), None)
            if pending is None:
                return self._committed(kvs, rev, include)
            before = int(pending.create_revision) - 1
            try:
                old, _ = await self.access.range(revision=before)
                return self._committed(old, before, include)
            except CompactedError:
                if time.monotonic() >= deadline:
                    raise
                log.info("a change is in flight and revision %d is compacted; waiting for its commit", before)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _ranged_snapshot(self, ranges: list[KeyRange], include: Include | None,
                               max_wait: float) -> CommittedState:
        """:meth:`committed_snapshot` over ``ranges`` only: ``commit`` and ``pending`` read in one
        transaction at revision R; the ranges (and ``commit``) read at R when no change is in
        flight, else just before ``pending`` was created."""
        deadline = time.monotonic() + max_wait
        delay = 0.1
        while True:
            commit_kvs, pending_kvs, latest = await self._markers()
            at = latest if not pending_kvs else int(pending_kvs[0].create_revision) - 1
            try:
                kvs = list(commit_kvs) if not pending_kvs else await self._exact(L.COMMIT, at)
                for r in ranges:
                    kvs += await self._exact(r.rel, at) if not r.prefix else (await self.access.range(r.rel, at))[0]
                return self._committed(kvs, at, include)
            except CompactedError:
                if time.monotonic() >= deadline:
                    raise
                log.info("revision %d is compacted; reading the committed state again", at)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _exact(self, rel: str, revision: int) -> list[Any]:
        kvs, _ = await self.access.range(rel, revision)
        return [kv for kv in kvs if self.layout.relative(bytes(kv.key)) == rel]

    async def _markers(self) -> tuple[list[Any], list[Any], int]:
        """``commit`` and ``pending`` (key-values, possibly empty) and the revision they were read at."""
        access = self.access
        resp = await access.call(
            "read commit marker",
            access.kv.txn(
                [],
                [
                    KVService.txn_op_get(self.layout.key(L.COMMIT)),
                    KVService.txn_op_get(self.layout.key(L.PENDING)),
                ],
                (),
                timeout=access.config.timeout,
            ),
        )
        return (list(resp.responses[0].response_range.kvs), list(resp.responses[1].response_range.kvs),
                int(resp.header.revision))

    async def follow_commits(
        self,
        after_revision: int,
        include: Include | None = None,
        *,
        foreign_batches: bool = False,
        ranges: Sequence[KeyRange] | None = None,
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

        ``ranges``: watch only these relative keys / prefixes (plus ``commit`` and
        ``pending``) instead of the whole prefix; several watches on one stream, merged
        so that no commit is delivered before every range has delivered everything up
        to it.
        """
        window = CommitWindow(after_revision, include)
        start = after_revision
        while True:
            try:
                stream = (self.access.watch_changes("", start) if ranges is None
                          else self._merged(list(ranges), start))
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

    async def _merged(
        self, ranges: list[KeyRange], after: int
    ) -> AsyncGenerator[tuple[int, dict[str, bytes | None]], None]:
        """Changes per revision over ``ranges`` + ``commit`` + ``pending``, in revision order, each
        revision released only once every range is complete up to it (``store/ranges.py``)."""
        wanted = [KeyRange(L.COMMIT, prefix=False), KeyRange(L.PENDING, prefix=False), *ranges]
        watch = self.access.watch_ranges(wanted, after)
        merger = RangeMerger(len(wanted), after)
        relative = self.layout.relative
        items = watch.items()
        async with contextlib.aclosing(items):
            try:
                async for item in items:
                    if isinstance(item, RangeEvents):
                        merger.events(item.index, item.revision,
                                      {relative(ev.key): ev.value for ev in item.events})
                    elif item.index is None:
                        merger.progress(item.revision)
                    else:
                        merger.range_progress(item.index, item.revision)
                    for revision, changes in merger.ready():
                        yield revision, changes
                    if merger.waiting():
                        watch.request_progress()  # etcd answers once every range has caught up
            finally:
                watch.close()

    async def _resume_after(self, position: int, exc: CompactedError) -> int:
        """Where to resume a commit watch positioned at ``position`` after a compaction.

        Safe only if no commit happened after ``position``; then every
        committed-key event after it belongs to the in-flight change that
        created ``pending`` (if any), so resume just before that, else now.
        """
        commit_kvs, pending_kvs, header_revision = await self._markers()
        commit_revision = int(commit_kvs[0].mod_revision) if commit_kvs else 0
        if commit_revision > position:
            raise exc
        resume = int(pending_kvs[0].create_revision) - 1 if pending_kvs else header_revision
        if resume < position:
            raise exc
        log.info("history after %d was compacted but held no commit; resuming after %d", position, resume)
        return resume
