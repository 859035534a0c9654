"""Plain values returned by the store (re-exported by ``netfence.store.etcd``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Include = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class KeyRange:
    """A relative key (``prefix`` False) or key prefix to watch (``follow_commits(ranges=...)``)."""

    rel: str
    prefix: bool = True


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of leadership: the leader key (absolute) and its create revision."""

    leader_key: str
    create_revision: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under the prefix at one ``revision`` (relative keys, raw values).

    ``commit_revision`` is the mod revision of ``commit`` (0: none) and
    ``pending`` tells whether a multi-transaction change was in flight.
    """

    values: dict[str, bytes]
    revision: int
    mod_revisions: dict[str, int]
    commit_revision: int = 0
    pending: bool = False


@dataclass(frozen=True, slots=True)
class CommittedState:
    """Committed keys as of ``commit_revision`` (0: nothing ever committed).

    ``revision`` is the store revision the state was read at (>= commit_revision).
    ``follow_commits`` may be started from either. ``foreign``: keys written
    after the last commit, outside any controller change (key -> revision);
    they are not in ``values`` (store/commit_window.py). ``mod_revisions``:
    the mod revision of every key in ``values``.
    """

    values: dict[str, bytes]
    commit_revision: int
    revision: int
    foreign: dict[str, int] = field(default_factory=dict)
    mod_revisions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CommitBatch:
    """Committed keys changed since the previous batch (None: deleted), as of ``commit_revision``.

    ``foreign``: keys written outside a controller change since the previous
    batch (key -> revision; not in ``changes``, see store/commit_window.py).
    ``is_commit`` False: a batch reporting only foreign writes, delivered at
    once (``follow_commits(..., foreign_batches=True)``); ``commit_revision``
    is then the last commit's.
    """

    changes: dict[str, bytes | None]
    commit_revision: int
    foreign: dict[str, int] = field(default_factory=dict)
    is_commit: bool = True
    #: The commit marker's ``time`` (Unix seconds, the controller's clock); None when absent
    #: or unreadable, and in batches that are not commits (agent metrics: commit -> kernel).
    commit_time: float | None = None
    #: The commit marker says its controller counts nodes synced at the last commit relevant to
    #: them (``"reports": "relevant"``): agents the commit does not touch need not report it.
    reports_relevant: bool = False


@dataclass(frozen=True, slots=True)
class KeyVersion:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int
    revision: int  # the store revision of the read


@dataclass(frozen=True, slots=True)
class Acquired:
    """Result of ``EtcdStore.create_if_absent``: ``current`` is the key as it is now."""

    created: bool
    current: KeyVersion


class Reports(dict[str, dict[str, Any]]):
    """Node reports by node name, read at ``revision``; ``mod_revisions`` per node."""

    def __init__(self, reports: dict[str, dict[str, Any]], revision: int, mod_revisions: dict[str, int]):
        super().__init__(reports)
        self.revision = revision
        self.mod_revisions = mod_revisions
