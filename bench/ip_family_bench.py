"""What running conformance scenarios over both IP families costs: ``--ip-family ipv4`` vs ``dual``.

One control plane; every scenario runs once per mode, back to back, the order of the modes
alternating from one scenario to the next, so both modes see the same machine load. Each
run is timed from test-bed start to clean-up (agents, controller, pods, probes, deletion),
as ``netfence conformance run`` spends it. Prints per-scenario seconds and the ratio, the
totals, and the load average before and after; ``--json FILE`` writes them.

    .venv/bin/python bench/ip_family_bench.py [--json FILE] [--modes ipv4,dual] PATH...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import load_note
from netfence_lab.cluster import LocalCluster
from netfence_lab.conformance.command import load_all
from netfence_lab.conformance.families import Mode, parse_mode
from netfence_lab.conformance.runner import run_scenarios
from netfence_lab.conformance.scenario import Scenario
from netfence_lab.tools import ensure_tools


def ratio_summary(totals: dict[str, float], base: str) -> dict[str, float]:
    """Each mode's total over the base mode's (pure)."""
    return {mode: round(total / totals[base], 3) if totals[base] else 0.0 for mode, total in totals.items()}


def mode_order(index: int, modes: Sequence[Mode]) -> list[Mode]:
    """Modes for the ``index``-th scenario: the given order on even ones, reversed on odd ones (pure)."""
    return list(modes) if index % 2 == 0 else list(reversed(modes))


async def measure(paths: list[Path], modes: Sequence[Mode], workdir: Path) -> dict[str, Any]:
    items = [i for i in load_all(paths) if isinstance(i, Scenario)]
    cluster = LocalCluster(workdir / "cluster", ensure_tools())
    cluster.start()
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        for index, scenario in enumerate(items):
            row: dict[str, Any] = {"scenario": scenario.name}
            for mode in mode_order(index, modes):
                started = time.monotonic()
                [result] = await run_scenarios([scenario], cluster, workdir / f"{index}-{mode}", out=lambda _: None,
                                               ip_family=mode)
                row[mode] = {"seconds": round(time.monotonic() - started, 2), "status": result.status}
            base = row[modes[0]]["seconds"]
            print(f"{scenario.name:40} " + "  ".join(
                f"{m} {row[m]['seconds']:6.1f}s {row[m]['status']:7}" for m in modes)
                + "  " + "  ".join(f"{m}/{modes[0]} {row[m]['seconds'] / base:4.2f}" for m in modes[1:]), flush=True)
            rows.append(row)
    finally:
        cluster.stop()
    totals = {m: round(sum(r[m]["seconds"] for r in rows), 1) for m in modes}
    return {"scenarios": rows, "totals": totals, "ratios": ratio_summary(totals, modes[0]),
            "loadBefore": [round(x, 2) for x in load_before], "loadAfter": [round(x, 2) for x in os.getloadavg()]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--modes", default="ipv4,dual", help="comma-separated, the first is the base")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    modes = [parse_mode(m) for m in args.modes.split(",")]
    print(f"before: {load_note()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="netfence-ipfam-bench-") as tmp:
        report = asyncio.run(measure(args.paths, modes, Path(tmp)))
    print(f"after:  {load_note()}")
    print("totals: " + ", ".join(f"{m} {s:.1f}s" for m, s in report["totals"].items())
          + "; ratios to " + modes[0] + ": " + ", ".join(f"{m} {r:.2f}x" for m, r in report["ratios"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(r[m]["status"] in ("passed", "skipped") for r in report["scenarios"] for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
