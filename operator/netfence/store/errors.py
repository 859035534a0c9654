"""Errors raised by the store layer (``netfence.store``)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``netfence.store``."""


class EtcdUnavailable(StoreError):
    """etcd did not answer within the configured time (or refused the request).

    A write that fails this way has an *unknown* outcome: some of its
    transactions may have been applied. The writer must re-read and resync.
    """


class NotLeaderError(StoreError):
    """A fenced write was refused because the writer no longer holds the leader key.

    ``partial`` is True when earlier transactions of the same change were
    already applied (they stay uncommitted: readers never see them until the
    next leader writes its own commit marker).
    """

    def __init__(self, message: str, *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


class CompactedError(StoreError):
    """A watch or read asked for history that etcd has compacted away.

    The caller must take a fresh snapshot and follow from its revision.
    """

    def __init__(self, requested_revision: int, compact_revision: int = 0) -> None:
        upto = f" (compacted up to {compact_revision})" if compact_revision else ""
        super().__init__(f"revision {requested_revision} has been compacted{upto}; take a fresh snapshot")
        self.requested_revision = requested_revision
        self.compact_revision = compact_revision


class CorruptValueError(StoreError, ValueError):
    """A stored value is not a JSON object with a supported ``schema``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt value at {key!r}: {reason}")
        self.key = key
        self.reason = reason
