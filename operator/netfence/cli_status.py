"""``netfence status``: what every node agent has applied, and how far it lags."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from netfence.cli import CliError, Subcommands, add_command, out

if TYPE_CHECKING:
    from netfence.store.settings import EtcdSettings


def register(sub: Subcommands) -> None:
    from netfence.cli_options import add_etcd_flags

    cmd = add_command(sub, "status", status_command, "list node agents: applied revision, lag, last sync, errors")
    add_etcd_flags(cmd)  # the same connection flags as `netfence explain` (and the controller/agent)
    cmd.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _endpoints(args: argparse.Namespace) -> list[str]:
    if args.etcd_endpoints:
        return [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
    from netfence.cli_options import local_beds

    for bed in local_beds():
        return [bed.etcd_endpoint]
    raise CliError("no etcd to ask: pass --etcd-endpoints host:port or set NETFENCE_ETCD_ENDPOINTS")


def status_rows(reports: Mapping[str, Mapping[str, Any]], commit_revision: int,
                now: datetime | None = None, needed: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Pure: one row per agent report, sorted by node. ``needed``: per node, the revision of the
    last committed change that matters to it (``model/relevance.needed_revisions``; agents do not
    report commits that do not touch their node): the lag counts from there, else from the commit."""
    now = now or datetime.now(UTC)
    rows = []
    for node in sorted(reports):
        report = reports[node]
        applied = int(report.get("appliedRevision") or 0)
        when = str(report.get("time") or "")
        age = ""
        with contextlib.suppress(ValueError):
            stamp = datetime.fromisoformat(when)
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=UTC)
            age = f"{max(0.0, (now - stamp).total_seconds()):.0f}s ago"
        rows.append({
            "node": node,
            "appliedRevision": applied,
            "lag": max(0, (needed or {}).get(node, commit_revision) - applied),
            "lastSync": when,
            "age": age,
            "lastError": report.get("lastError") or "",
            "version": report.get("version") or "",
        })
    return rows


def format_rows(rows: list[dict[str, Any]], commit_revision: int) -> list[str]:
    header = ["NODE", "APPLIED", "LAG", "LAST SYNC", "VERSION", "LAST ERROR"]
    body = [[r["node"], str(r["appliedRevision"]), str(r["lag"]), r["age"] or r["lastSync"], r["version"],
             r["lastError"][:80]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    lines = [f"controller's last commit: revision {commit_revision}"]
    for row in [header, *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not body:
        lines.append("(no agent has reported)")
    return lines


async def _gather(settings: EtcdSettings) -> tuple[dict[str, dict[str, Any]], int, dict[str, int]]:
    """Reports, the last commit, and per reporting node the revision it must have applied."""
    from netfence.model.relevance import needed_revisions
    from netfence.store.etcd import EtcdStore

    store = EtcdStore(settings)
    await store.connect()
    try:
        reports = await store.read_reports()
        state = await store.committed_snapshot(max_wait=5.0)
        needed = needed_revisions(state.values, state.mod_revisions, reports)
        return dict(reports), state.commit_revision, needed
    finally:
        await store.close()


def status_command(args: argparse.Namespace) -> int:
    from netfence.cli_options import etcd_settings
    from netfence.store.errors import StoreError
    from netfence.store.settings import ConfigError

    endpoints = _endpoints(args)
    try:
        reports, commit, needed = asyncio.run(asyncio.wait_for(_gather(etcd_settings(args, endpoints)), 10))
    except TimeoutError:
        raise CliError(f"etcd at {','.join(endpoints)} did not answer within 10s; check that it runs") from None
    except ConfigError as exc:
        raise CliError(f"{exc}; fix --etcd-endpoints or --etcd-prefix") from None
    except StoreError as exc:
        raise CliError(f"cannot read node reports from etcd at {','.join(endpoints)} ({exc}); "
                       "check that it runs and the endpoints are right") from None
    rows = status_rows(reports, commit, needed=needed)
    if args.output == "json":
        out(json.dumps({"commitRevision": commit, "agents": rows}, indent=2))
    else:
        for line in format_rows(rows, commit):
            out(line)
    return 0
