"""The renderer's golden cases: each renders a sample NodeModel under some Features to golden/<case>.txt.

Tests only compare with the files (test_dataplane_render.py); the files are written by
hack/update_golden.py alone (``make golden``), so a change to them is always a reviewed diff.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dataplane_samples import SAMPLES, ingress_basic, shared_and_missing

from netfence.dataplane.render import Features, render
from netfence.model.enforcement import NodeModel

GOLDEN = Path(__file__).parent / "golden"

CASES: dict[str, tuple[Callable[[], NodeModel], Features]] = {
    **{name: (fn, Features()) for name, fn in SAMPLES.items()},
    "shared_and_missing_v4_no_sctp": (shared_and_missing, Features(ipv6=False, sctp_port_match=False)),
    "ingress_basic_no_invalid_drop": (ingress_basic, Features(drop_invalid=False, ipv6=False)),
    # a new pod is denied until known: known pods dispatched or returned, the rest of the CIDRs dropped
    "ingress_basic_unknown_workloads": (ingress_basic, Features(workload_cidrs=("10.244.0.0/24", "fd00::/64"))),
}


def golden_path(case: str) -> Path:
    return GOLDEN / f"{case}.txt"


def rendered(case: str) -> str:
    """What the renderer makes of ``case`` now (the text its golden file must hold)."""
    fn, features = CASES[case]
    return render(fn(), features=features).dump()


def stale_files() -> list[Path]:
    """Golden files of no case (left behind by a removed or renamed case)."""
    return sorted(p for p in GOLDEN.glob("*.txt") if p.stem not in CASES)
