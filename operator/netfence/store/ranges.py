"""Several watch ranges merged into one revision-ordered stream (pure).

An agent watches only what its node needs (docs/design.md, "Watch scope"):
the commit marker, ``pending``, policies, sets and its own endpoints — several
key ranges on one gRPC Watch stream (``store/watch.py`` ``RangeWatch``). etcd
orders the events of *one* watcher by revision, but says nothing about the
order between watchers: the commit marker of revision R may arrive before the
policy written in the same transaction, or before an earlier transaction of
the same change on another range. So a reader must not act on revision R
until every range is known complete up to R.

:class:`RangeMerger` tracks, per range, the revision up to which it has
delivered everything: a response carrying events of revision X (etcd never
splits one revision of one watcher over responses) makes that range complete
up to X; a progress notification of one watcher up to its header revision; the
answer to a ``WatchProgressRequest`` (etcd answers it only once every watcher
on the stream has sent everything up to the header revision) makes every
range complete up to it. :meth:`RangeMerger.ready` releases the buffered
revisions that every range has completed, in revision order, each with all its
events; :meth:`RangeMerger.waiting` says that something is held back (the
reader then requests progress).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from netfence.store.types import KeyRange

__all__ = ["KeyRange", "RangeMerger"]


Changes = dict[str, bytes | None]


@dataclass
class RangeMerger:
    """Buffers per-range events; releases whole revisions once every range is complete up to them.

    ``after``: every range is complete up to this revision (the watch starts after it).
    """

    count: int
    after: int
    complete: list[int] = field(default_factory=list)
    _buffer: dict[int, Changes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("a merged watch needs at least one range")
        self.complete = [self.after] * self.count

    def events(self, index: int, revision: int, changes: Mapping[str, bytes | None]) -> None:
        """Range ``index`` delivered all its events of ``revision`` (and everything before)."""
        if revision <= self.complete[index]:
            return  # a repeat (a resumed stream): already taken
        self._buffer.setdefault(revision, {}).update(changes)
        self.complete[index] = revision

    def range_progress(self, index: int, revision: int) -> None:
        """Range ``index`` has sent everything up to ``revision``."""
        self.complete[index] = max(self.complete[index], revision)

    def progress(self, revision: int) -> None:
        """Every range has sent everything up to ``revision`` (a WatchProgressRequest's answer)."""
        self.complete = [max(done, revision) for done in self.complete]

    @property
    def position(self) -> int:
        """Every range is complete up to here."""
        return min(self.complete)

    def ready(self) -> list[tuple[int, Changes]]:
        """The buffered revisions every range has completed, in order (removed from the buffer)."""
        upto = self.position
        out = [(rev, self._buffer.pop(rev)) for rev in sorted(r for r in self._buffer if r <= upto)]
        return out

    def waiting(self) -> bool:
        """Some buffered revision is held back until every range shows progress past it."""
        return bool(self._buffer)

    def resume_from(self, index: int) -> int:
        """The revision range ``index`` resumes at after a reconnect (its next unseen one)."""
        return self.complete[index] + 1
