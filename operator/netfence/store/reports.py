"""Node reports: ``status/nodes/<node>``, each bound to its agent's lease (implements ``ReportStore``).

The agent writes its report with :meth:`EtcdReportStore.put_report`; the
controller reads them all and then follows changes (:meth:`read_reports`,
:meth:`watch_reports`). A report that does not decode is skipped (logged),
never fatal: one corrupt report must not stop status for all nodes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from netfence.store import layout as L
from netfence.store.access import EtcdAccess
from netfence.store.errors import CorruptValueError
from netfence.store.types import Reports

log = logging.getLogger(__name__)


def decode_report(rel: str, value: bytes, revision: int) -> dict[str, Any] | None:
    """A stored report, or None (logged) when it does not decode."""
    try:
        return L.decode(value, rel)
    except CorruptValueError as exc:
        log.warning("ignoring node report at revision %d: %s", revision, exc)
        return None


class EtcdReportStore:
    """Node reports over a shared :class:`EtcdAccess`."""

    def __init__(self, access: EtcdAccess) -> None:
        self.access = access
        self.layout = access.layout

    async def put_report(self, node: str, report: Mapping[str, Any], lease_id: int) -> int:
        """Write ``status/nodes/<node>`` bound to ``lease_id``; returns the revision."""
        access = self.access
        key = self.layout.key(self.layout.node_status(node))
        put = access.kv.put(key, L.encode(dict(report)), lease=lease_id, timeout=access.config.timeout)
        resp = await access.call("put report", put)
        return int(resp.header.revision)

    async def read_reports(self) -> Reports:
        """Node reports by node (a dict) with ``.revision`` and ``.mod_revisions``; corrupt ones skipped."""
        kvs, rev = await self.access.range_latest(L.STATUS_NODES)
        reports: dict[str, dict[str, Any]] = {}
        mods: dict[str, int] = {}
        for kv in kvs:
            rel = self.layout.relative(bytes(kv.key))
            node = self.layout.parse_node_status(rel)
            data = decode_report(rel, bytes(kv.value), int(kv.mod_revision)) if node else None
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
        stream = self.access.watch_changes(L.STATUS_NODES, after_revision)
        async with contextlib.aclosing(stream):
            async for revision, changes in stream:
                for rel, value in changes.items():
                    node = self.layout.parse_node_status(rel)
                    if node is not None:
                        yield node, None if value is None else decode_report(rel, value, revision)
