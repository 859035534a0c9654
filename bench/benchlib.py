"""Small helpers shared by the benchmarks (percentiles, process memory, formatting)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def pct(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``samples``; 0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms_summary(samples: Sequence[float]) -> str:
    """``p50 / p99 / max`` of durations in seconds, printed in milliseconds."""
    if not samples:
        return "no samples"
    return (f"p50 {pct(samples, 0.5) * 1e3:7.1f} ms  p99 {pct(samples, 0.99) * 1e3:7.1f} ms  "
            f"max {max(samples) * 1e3:7.1f} ms  (n={len(samples)})")


def vm_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM in kB from /proc/<pid>/status (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def load_note() -> str:
    """One line on how busy the machine is (the benchmarks share it with other work)."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} (1 min) / {five:.2f} (5 min)"


def verdict(ok: bool) -> str:
    return "meets goal" if ok else "MISSES goal"
