"""Which watched writes belong to a controller change, and which are foreign (pure).

The controller writes a change as one or more transactions (``store/etcd.py``):
a single transaction puts its keys together with ``commit``; a change of
several transactions puts ``pending`` in its first one and deletes it, and
puts ``commit``, in its last one. So every committed-key write of the leading
controller lies in a *change window*: the revision of the commit itself, or
the revisions from the one that created ``pending`` up to the commit.

A committed-key event at any other revision was written by someone else (a
person with ``etcdctl``, a broken tool, an old controller without a fence): a
*foreign write*. Readers do not apply it; they keep the last committed value
and report the key until a committed value arrives.

What a revision-window check cannot see: a foreign write that lands inside a
window (between ``pending`` and the commit of a multi-transaction change) is
indistinguishable from the controller's own; the controller itself notices it
(it knows the revisions of its own transactions, see ``controller/syncer.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from netfence.store import layout as L
from netfence.store.types import CommitBatch, Include


@dataclass
class CommitWindow:
    """Classifies a watch's per-revision changes into committed batches and foreign writes.

    Feed every revision in order with :meth:`feed`; it returns the batch to
    deliver when the revision holds a commit, and the foreign writes found in
    it (key -> revision). ``position`` is the last commit revision delivered.
    """

    position: int
    include: Include | None = None
    window_start: int | None = None  # revision that created ``pending`` (a change in flight)
    buffer: dict[str, bytes | None] = field(default_factory=dict)
    foreign: dict[str, int] = field(default_factory=dict)  # seen since the last batch

    def wanted(self, rel: str) -> bool:
        return L.is_committed_key(rel) and (self.include is None or self.include(rel))

    def feed(self, revision: int, changes: Mapping[str, bytes | None]) -> tuple[CommitBatch | None, dict[str, int]]:
        committed = changes.get(L.COMMIT) is not None
        if changes.get(L.PENDING) is not None and self.window_start is None:
            self.window_start = revision
        inside = committed or self.window_start is not None
        found: dict[str, int] = {}
        for rel, value in changes.items():
            if not self.wanted(rel):
                continue
            if inside:
                self.buffer[rel] = value
            else:
                found[rel] = revision
        self.foreign.update(found)
        if not committed:
            return None, found
        batch = CommitBatch(
            self.buffer,
            revision,
            foreign={k: r for k, r in self.foreign.items() if k not in self.buffer},
            commit_time=commit_time(changes.get(L.COMMIT)),
            reports_relevant=reports_relevant(changes.get(L.COMMIT)),
        )
        self.position = revision
        self.window_start = None
        self.buffer = {}
        self.foreign = {}
        return batch, found

    def restart(self) -> None:
        """Forget the half-seen change (the watch restarts before it; see ``follow_commits``)."""
        self.window_start = None
        self.buffer = {}


def commit_time(raw: bytes | None) -> float | None:
    """The ``time`` of a commit marker value as Unix seconds; None when it has none or does not decode."""
    if raw is None:
        return None
    try:
        text = L.decode(raw, L.COMMIT).get("time")
        return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None
    except (L.CorruptValueError, ValueError):
        return None


def reports_relevant(raw: bytes | None) -> bool:
    """Whether a commit marker value says agents may skip reporting commits not relevant to them."""
    if raw is None:
        return False
    try:
        return L.decode(raw, L.COMMIT).get(L.COMMIT_REPORTS) == L.REPORTS_RELEVANT
    except L.CorruptValueError:
        return False


def foreign_in_snapshot(mod_revisions: Mapping[str, int], commit_revision: int) -> dict[str, int]:
    """Keys of a committed snapshot written after its last commit: foreign writes.

    A snapshot is read where no change is in flight (no ``pending``), so every
    committed key written after the commit marker was written outside a
    controller change. (A foreign write *before* the last commit cannot be told
    from a committed value without history; the controller rewrites it.)
    """
    return {key: rev for key, rev in mod_revisions.items() if rev > commit_revision}
