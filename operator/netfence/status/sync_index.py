"""Which policies a node report change can affect (pure; used by the status writer).

A policy's status depends on a node's report only if the node must enforce it
(it hosts an endpoint the policy selects), and then only through the fields
:func:`netfence.status.aggregate.compute_status` reads: whether the report
exists, its applied revision compared with the policy's revision, its error,
its bad keys and its unenforceable rules. So a report change costs work in
proportion to the policies whose state on that node flips, not to all policies:

* :func:`report_change` classifies a change: nothing status reads changed
  (``time``, ``rules``, ``sets``, ``version``) -> no policy; only the applied
  revision went up -> the policies it now covers; anything else (the report
  appeared or vanished, its error, bad keys or unenforceable rules changed, the
  revision went down, or it moved while the node reports an error, which the
  status shows as the node's ``appliedRevision``) -> every policy the node must
  enforce.
* :class:`SyncIndex` keeps, per node, the policies it must enforce and, among
  them, those it has not synced yet, in a heap ordered by the revision each
  needs *on that node* (the policy's last change relevant to the node,
  ``model/relevance.py``: a commit that touches only other nodes' endpoints
  leaves this node synced without a report). :meth:`SyncIndex.advance` pops the ones a new applied revision covers.
  The index learns a policy's revision and nodes each time its status is
  computed (:meth:`SyncIndex.update`); a commit that changes them marks the
  policy for computation anyway, so the index is never behind for long, and a
  policy whose entry is stale is already due for computation.

Heap entries are removed lazily: an entry is live while it matches the node's
``pending`` map; the heap is rebuilt when stale entries outnumber live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from enum import Enum

from netfence.status.aggregate import NodeReport

PolicyKey = tuple[str, str]

_COMPACT_SLACK = 64  # stale heap entries tolerated beyond the live ones before a rebuild


class ReportChange(Enum):
    NONE = "none"  # nothing status reads changed
    REVISION = "revision"  # only the applied revision went up: the policies it covers now
    ALL = "all"  # every policy the node must enforce may change


def _problems(report: NodeReport) -> tuple[object, ...]:
    return (report.last_error, report.bad_keys, report.bad_keys_total, report.unenforceable,
            report.unenforceable_total)


def report_change(old: NodeReport | None, new: NodeReport | None) -> ReportChange:
    """How a node's report change can affect the status of the policies it must enforce."""
    if old is None and new is None:
        return ReportChange.NONE
    if old is None or new is None or _problems(old) != _problems(new):
        return ReportChange.ALL
    if new.applied_revision == old.applied_revision:
        return ReportChange.NONE
    if new.applied_revision < old.applied_revision or new.last_error:
        return ReportChange.ALL
    return ReportChange.REVISION


class SyncIndex:
    """Per node: the policies it must enforce, and the unsynced ones ordered by needed revision."""

    def __init__(self) -> None:
        self._policies: dict[PolicyKey, tuple[int, frozenset[str]]] = {}  # policy -> (revision, nodes)
        self._required: dict[str, set[PolicyKey]] = {}  # node -> policies it must enforce
        self._pending: dict[str, dict[PolicyKey, int]] = {}  # node -> unsynced policy -> revision needed
        self._heaps: dict[str, list[tuple[int, PolicyKey]]] = {}  # node -> pending, by revision (lazy)
        self._applied: dict[str, int] = {}  # node -> applied revision of its report (absent: no report)

    # --- queries ---------------------------------------------------------------

    def required_on(self, node: str) -> frozenset[PolicyKey]:
        """The policies ``node`` must enforce (as of their last update)."""
        return frozenset(self._required.get(node, ()))

    def pending_on(self, node: str) -> dict[PolicyKey, int]:
        """The policies ``node`` has not synced yet, with the revision each needs."""
        return dict(self._pending.get(node, {}))

    def heap_size(self, node: str) -> int:
        """Heap entries of ``node``, stale ones included (bounded; for tests)."""
        return len(self._heaps.get(node, ()))

    def __contains__(self, policy: object) -> bool:
        return policy in self._policies

    # --- updates ---------------------------------------------------------------

    def update(
        self, policy: PolicyKey, revision: int, nodes: frozenset[str], node_revisions: Mapping[str, int] | None = None
    ) -> None:
        """The policy needs ``revision`` on ``nodes`` (its required nodes), as just computed;
        ``node_revisions``: per node, the revision of its last change relevant to that node
        (``PolicyFacts.needed``; a node absent there needs ``revision``)."""
        per_node = node_revisions or {}
        old = self._policies.get(policy)
        for node in (old[1] if old else frozenset()) - nodes:
            self._drop(node, policy)
        if nodes:
            self._policies[policy] = (revision, nodes)
        else:
            self._policies.pop(policy, None)
        for node in nodes:
            needed = per_node.get(node, revision)
            self._required.setdefault(node, set()).add(policy)
            applied = self._applied.get(node)
            if applied is not None and applied >= needed:
                self._unpend(node, policy)
                continue
            pending = self._pending.setdefault(node, {})
            if pending.get(policy) != needed:
                pending[policy] = needed
                heap = self._heaps.setdefault(node, [])
                heapq.heappush(heap, (needed, policy))
                if len(heap) > 2 * len(pending) + _COMPACT_SLACK:
                    self._heaps[node] = [(rev, key) for key, rev in pending.items()]
                    heapq.heapify(self._heaps[node])

    def remove(self, policy: PolicyKey) -> None:
        """The policy is gone."""
        self.update(policy, 0, frozenset())

    def advance(self, node: str, applied: int | None) -> list[PolicyKey]:
        """``node`` now reports ``applied`` (None: no report): the pending policies it now covers
        (removed from pending), in revision order."""
        if applied is None:
            self._applied.pop(node, None)
            return []
        self._applied[node] = applied
        heap = self._heaps.get(node)
        pending = self._pending.get(node)
        covered: list[PolicyKey] = []
        if not heap or pending is None:
            return covered
        while heap and heap[0][0] <= applied:
            revision, policy = heapq.heappop(heap)
            if pending.get(policy) == revision:
                del pending[policy]
                covered.append(policy)
        return covered

    def clear(self) -> None:
        self._policies.clear()
        self._required.clear()
        self._pending.clear()
        self._heaps.clear()

    def _drop(self, node: str, policy: PolicyKey) -> None:
        required = self._required.get(node)
        if required is not None:
            required.discard(policy)
            if not required:
                del self._required[node]
        self._unpend(node, policy)

    def _unpend(self, node: str, policy: PolicyKey) -> None:
        pending = self._pending.get(node)
        if pending is not None:
            pending.pop(policy, None)
            if not pending:
                del self._pending[node]
                self._heaps.pop(node, None)
