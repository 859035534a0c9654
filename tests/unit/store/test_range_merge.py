"""Several watch ranges never let a reader see half a commit (store/ranges.py, store/reader.py).

etcd orders events per watcher only; these tests deliver the ranges of a multi-transaction
change in every kind of order and check that the commit is released only whole, and only once
every range is known complete up to it (by its own events or a progress answer)."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator

import pytest

from netfence.store import layout as L
from netfence.store.commit_window import CommitWindow
from netfence.store.ranges import RangeMerger
from netfence.store.reader import EtcdCommittedReader
from netfence.store.types import CommitBatch, KeyRange
from netfence.store.watch import RangeEvents, RangeItem, RangeProgress, RawEvent

NODE = "node-1"
RANGES = [KeyRange(L.COMMIT, False), KeyRange(L.PENDING, False), KeyRange("policies/"), KeyRange("sets/"),
          KeyRange(f"endpoints/{NODE}/")]
MARKER = L.encode(L.commit_marker(1, "2024-01-01T00:00:00.000Z", "c"))
# A change in three transactions (revisions 10..12), as the fenced writer writes it, per range.
PER_RANGE: list[list[tuple[int, dict[str, bytes | None]]]] = [
    [(12, {L.COMMIT: MARKER})],
    [(10, {L.PENDING: b'{"schema":1}'}), (12, {L.PENDING: None})],
    [(10, {"policies/app/a": b'{"schema":1}'}), (12, {"policies/app/b": b'{"schema":1}'})],
    [(11, {"sets/x": b'{"schema":1}'})],
    [(11, {f"endpoints/{NODE}/app/web": b'{"schema":1}'})],
]
DATA_KEYS = {"policies/app/a", "policies/app/b", "sets/x", f"endpoints/{NODE}/app/web"}


def interleaving(rng: random.Random) -> list[tuple[int, int, dict[str, bytes | None]]]:
    """The ranges' events in a random order that keeps each range's own order (as etcd does)."""
    queues = [list(events) for events in PER_RANGE]
    out = []
    while any(queues):
        index = rng.choice([i for i, q in enumerate(queues) if q])
        revision, changes = queues[index].pop(0)
        out.append((index, revision, changes))
    return out


@pytest.mark.parametrize("seed", range(200))
def test_a_commit_is_released_only_whole_whatever_the_order_of_the_ranges(seed: int) -> None:
    rng = random.Random(seed)
    merger = RangeMerger(len(RANGES), after=9)
    window = CommitWindow(9)
    batches: list[CommitBatch] = []

    def drain() -> None:
        for revision, changes in merger.ready():
            batch, foreign = window.feed(revision, changes)
            assert not foreign, "a write of the change taken for a foreign one"
            if batch is not None:
                batches.append(batch)

    for index, revision, changes in interleaving(rng):
        merger.events(index, revision, changes)
        drain()
        if rng.random() < 0.3:  # a range's own progress notification (etcd's progress_notify)
            merger.range_progress(index, revision)
            drain()
        assert not batches, "a commit released before every range was known complete up to it"
    assert merger.waiting()  # the sets/endpoints ranges have shown nothing at 12: proof needed
    merger.progress(12)  # etcd's answer to the WatchProgressRequest
    drain()
    assert len(batches) == 1 and batches[0].commit_revision == 12
    assert set(batches[0].changes) == DATA_KEYS
    assert not merger.waiting()


def test_a_repeat_after_a_resumed_stream_is_ignored() -> None:
    merger = RangeMerger(2, after=4)
    merger.events(0, 5, {"policies/a": b"1"})
    merger.events(1, 6, {"sets/x": b"1"})
    merger.events(0, 5, {"policies/a": b"stale"})  # already taken: a resumed stream repeating it
    assert merger.ready() == [(5, {"policies/a": b"1"})]
    merger.progress(6)
    assert merger.ready() == [(6, {"sets/x": b"1"})]


class FakeWatch:
    """A RangeWatch whose items are scripted; progress answers come only when requested."""

    def __init__(self, items: list[RangeItem], answer: int) -> None:
        self.script = list(items)
        self.answer = answer
        self.requested = 0
        self.closed = False

    def request_progress(self) -> None:
        self.requested += 1

    def close(self) -> None:
        self.closed = True

    async def items(self) -> AsyncGenerator[RangeItem, None]:
        for item in self.script:
            yield item
        while self.requested:
            self.requested -= 1
            yield RangeProgress(None, self.answer)
        raise AssertionError("the reader waits without having asked for progress")


class FakeAccess:
    layout = L.Layout()

    def __init__(self, watch: FakeWatch) -> None:
        self.watch = watch
        self.asked: list[tuple[list[KeyRange], int]] = []

    def watch_ranges(self, ranges: list[KeyRange], after_revision: int) -> FakeWatch:
        self.asked.append((ranges, after_revision))
        return self.watch


def events(index: int, revision: int, changes: dict[str, bytes | None]) -> RangeEvents:
    prefix = L.Layout().prefix
    return RangeEvents(index, revision, [RawEvent((prefix + k).encode(), v, revision) for k, v in changes.items()])


async def test_the_reader_asks_etcd_for_progress_before_delivering_a_commit() -> None:
    """The commit marker arrives first; the policy of the same transaction later; the endpoints
    range says nothing: the reader requests progress and delivers the whole commit after it."""
    script: list[RangeItem] = [
        events(0, 12, {L.COMMIT: MARKER}),
        events(2, 12, {"policies/app/b": b'{"schema":1}'}),
    ]
    watch = FakeWatch(script, answer=12)
    access = FakeAccess(watch)
    reader = EtcdCommittedReader(access)  # type: ignore[arg-type]
    ranges = [KeyRange("policies/"), KeyRange("sets/"), KeyRange(f"endpoints/{NODE}/")]
    stream = reader.follow_commits(11, ranges=ranges)
    batch = await anext(stream)
    await stream.aclose()
    assert batch.commit_revision == 12 and set(batch.changes) == {"policies/app/b"}
    assert batch.reports_relevant and watch.closed
    asked, after = access.asked[0]
    assert after == 11 and asked[:2] == [KeyRange(L.COMMIT, False), KeyRange(L.PENDING, False)]
    assert asked[2:] == ranges
