"""Commit batches as the agent applies them: in order, and coalesced while an apply runs.

The committed reader yields one batch per commit. Applying takes a while
(``iptables-restore``, ``ipset``), and commits keep coming meanwhile; applying
each of them on its own would put the node further and further behind. So a
background task reads the batches as they come and :func:`coalesced` hands the
consumer, each time it asks, *every* batch that arrived since it last asked,
in commit order: the consumer feeds them all to its state and applies once.

The reader's error (``CompactedError``, ``EtcdUnavailable``) is raised to the
consumer only after the batches that came before it have been handed over.

:func:`absorb` feeds such a group to the node's state and says what the node
must do: apply (the group changed its rules), only report (the controller wants
every commit reported), or nothing (the commits did not touch this node;
``model/relevance.py``). :func:`node_ranges` is what the agent watches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar

from netfence.model.enforcement import CompiledPolicy, Endpoint
from netfence.model.relevance import NodeUses, commit_relevant
from netfence.store import layout as L
from netfence.store.ranges import KeyRange
from netfence.store.tasks import cancel_and_wait
from netfence.store.types import CommitBatch

T = TypeVar("T")


class _End:
    """The reader's stream ended (normally or with ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error


class _Reader(Generic[T]):
    def __init__(self, source: AsyncIterator[T]) -> None:
        self.queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self.source = source

    async def run(self) -> None:
        try:
            async for item in self.source:
                self.queue.put_nowait(item)
        except Exception as exc:
            self.queue.put_nowait(_End(exc))
        else:
            self.queue.put_nowait(_End())


async def coalesced(source: AsyncIterator[T]) -> AsyncGenerator[list[T], None]:
    """Groups of ``source``'s items, in order: each group is every item that arrived since
    the previous one was taken (at least one). Raises ``source``'s error after the items
    before it; ends when ``source`` ends. Closing the generator stops the reading task."""
    reader: _Reader[T] = _Reader(source)
    task = asyncio.create_task(reader.run(), name="commit-reader")
    try:
        while True:
            group: list[T] = []
            item = await reader.queue.get()
            while not isinstance(item, _End):
                group.append(item)
                if reader.queue.empty():
                    break
                item = reader.queue.get_nowait()
            if group:
                yield group
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
    finally:
        await cancel_and_wait(task)


# --- what a group of commits means for this node (issue 11) -------------------------------------


class NodeView(Protocol):
    """The parts of ``agent/node_state.py`` ``NodeState`` that decide relevance."""

    node: str

    @property
    def endpoints(self) -> Mapping[str, Endpoint]: ...

    @property
    def policies(self) -> Mapping[str, CompiledPolicy]: ...

    def update(self, changes: Mapping[str, bytes | None]) -> None: ...

    def mark_foreign(self, foreign: Mapping[str, int]) -> None: ...

    def bad_keys(self) -> dict[str, str]: ...

    def uses(self) -> NodeUses:
        """What the node's rules refer to now (model/relevance.py ``node_uses``)."""
        ...


class Action(Enum):
    APPLY = "apply"  # the group changed this node's rules (or its bad keys): render, apply, report
    REPORT = "report"  # nothing changed here, but the controller wants every commit reported
    NONE = "none"  # nothing changed here and the controller counts the node synced without a report


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    revision: int  # the last commit of the group (the state now reflects it)


def absorb(state: NodeView, group: Sequence[CommitBatch], revision: int, *, every_commit: bool) -> Outcome:
    """Feed a group of batches to ``state`` in order; what the node must do about them.

    ``every_commit`` (``--watch-scope prefix``, agents before issue 11): every commit is applied.
    Otherwise a commit is applied only when it is relevant to the node (model/relevance.py),
    or when a foreign write or a value that does not decode changed the node's bad keys; a
    commit that is not relevant is still reported when its marker does not say that the
    controller counts untouched nodes as synced (a controller from before issue 11).
    """
    action = Action.APPLY if every_commit else Action.NONE
    bad_before = set(state.bad_keys())
    for batch in group:
        if batch.foreign:
            state.mark_foreign(batch.foreign)  # never applied; reported (and maybe pinned)
        if not batch.is_commit:
            continue
        revision = batch.commit_revision
        if action is Action.APPLY:
            state.update(batch.changes)
            continue
        before = state.uses() if batch.changes else None
        state.update(batch.changes)
        if before is not None and commit_relevant(batch.changes, before, state.uses()):
            action = Action.APPLY
        elif not batch.reports_relevant:
            action = Action.REPORT
    if action is not Action.APPLY and set(state.bad_keys()) != bad_before:
        action = Action.APPLY
    return Outcome(action, revision)


CLUSTER_POLICIES = "cpolicies/"  # ClusterNetworkPolicies (NodeState.wants reads them)


def node_ranges(node: str, max_schema: int) -> list[KeyRange]:
    """The key ranges an agent of ``node`` watches (besides ``commit`` and ``pending``): what
    ``NodeState.wants`` reads, and nothing else (of ``nodes/``, exactly its own key)."""
    ranges = [KeyRange(L.POLICIES), KeyRange(CLUSTER_POLICIES), KeyRange(L.SETS), KeyRange(L.Layout.endpoints_of(node)),
              KeyRange(L.Layout.node(node), prefix=False)]
    if max_schema >= 2:
        ranges += [KeyRange(L.SETS_V2), KeyRange(L.META_SCHEMA, prefix=False)]
    return ranges
