"""``netfence conformance run``: the command-line front of the runner."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from netfence.cli import Subcommands, add_command
from netfence_lab.cli_errors import LAB_ERRORS
from netfence_lab.conformance.families import DEFAULT_MODE, MODES, parse_mode
from netfence_lab.conformance.runner import run_scenarios, summary_line, write_json
from netfence_lab.conformance.scenario import Scenario, ScenarioError, collect_files, load_scenario
from netfence_lab.peer_env import ENFORCERS

KNOWN_ERRORS = LAB_ERRORS  # netfence.cli.main reports these as one line

log = logging.getLogger(__name__)


def register(sub: Subcommands) -> None:
    conf = sub.add_parser("conformance", help="run NetworkPolicy conformance scenarios with real packets")
    conf_sub = conf.add_subparsers(dest="conformance_command", metavar="COMMAND", required=True)
    run = add_command(
        conf_sub, "run", run_command, "run scenario files (or every *.yaml under folders)", needs_root=True
    )
    run.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    run.add_argument("--nodes", type=int, default=None, help="nodes for scenarios that do not say (default 2)")
    run.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for enforcement per step")
    run.add_argument("--json", type=Path, default=None, metavar="FILE", help="write a machine-readable report")
    run.add_argument("--workdir", type=Path, default=None, help="keep logs and dumps here (default: a temp dir)")
    run.add_argument(
        "--enforcer", choices=ENFORCERS, default="netfence",
        help="who enforces: netfence (controller + agents; waits for its enforcement signal) or "
             "kube-network-policies (the comparison peer, built by hack/setup-peer.sh; one process per "
             "node, no enforcement signal: each step probes until its tables hold or --timeout passes)",
    )
    run.add_argument(
        "--ip-family", choices=MODES, default=DEFAULT_MODE,
        help="probe over IPv4 (default), IPv6 (placeholders yield IPv6 addresses) or both (dual: every cell "
        "must hold over both families)",
    )


def load_all(paths: list[Path]) -> list[Scenario | ScenarioError]:
    items: list[Scenario | ScenarioError] = []
    files = collect_files(paths)
    for path in files:
        try:
            items.append(load_scenario(path))
        except ScenarioError as exc:
            items.append(exc)
    for path in paths:
        if not path.exists():
            items.append(ScenarioError(f"{path}: no such file or folder"))
    return items


def run_command(args: argparse.Namespace) -> int:
    from netfence_lab.cluster import LocalCluster
    from netfence_lab.tools import ensure_tools

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    items = load_all(args.paths)
    if not items:
        out("no scenario files found")
        out("0 passed, 0 failed")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="netfence-conformance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tools = ensure_tools()
    cluster = LocalCluster(workdir / "cluster", tools)
    cluster.start()
    try:
        results = asyncio.run(
            run_scenarios(items, cluster, workdir, default_nodes=args.nodes, timeout=args.timeout, out=out,
                          ip_family=parse_mode(args.ip_family), enforcer=args.enforcer)
        )
    finally:
        cluster.stop()
    if args.json:
        write_json(results, args.json)
        out(f"report written to {args.json}")
    out(f"logs and dumps: {workdir}")
    out(summary_line(results))
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1
