"""Run the real controller (``netfence.controller.main``) with a sampling profiler attached (diagnosis).

py-spy is not available here, so this wrapper samples the main thread's stack
on SIGPROF (every 5 ms of CPU time) and watches the event loop's lag (a 10 ms
ticker; a tick late by more than 50 ms is a stall). At exit it writes
``<--probe-out>``: the stalls and the samples taken during them, summarised by
the innermost ``netfence`` frame and by the innermost frame overall. Used by
``controller_bench.py --diagnose``; everything after ``--`` goes to the controller.

    python bench/controller_probe.py --probe-out stalls.json -- --kubeconfig=... --etcd-endpoints=...
"""

from __future__ import annotations

import asyncio
import atexit
import json
import signal
import sys
import time
from collections import Counter
from types import FrameType
from typing import Any

SAMPLE_INTERVAL = 0.005
TICK = 0.01
STALL = 0.05

samples: list[tuple[float, tuple[str, ...]]] = []
stalls: list[tuple[float, float]] = []  # (end time, seconds late)


def _stack(frame: FrameType | None) -> tuple[str, ...]:
    out = []
    while frame is not None and len(out) < 60:
        code = frame.f_code
        out.append(f"{code.co_filename.rsplit('site-packages/', 1)[-1].rsplit('operator/', 1)[-1]}"
                   f":{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(out)  # innermost first


def _on_sigprof(signum: int, frame: FrameType | None) -> None:
    samples.append((time.monotonic(), _stack(frame)))


async def _ticker() -> None:
    while True:
        before = time.monotonic()
        await asyncio.sleep(TICK)
        late = time.monotonic() - before - TICK
        if late > STALL:
            stalls.append((time.monotonic(), late))


def _summary(path: str) -> None:
    signal.setitimer(signal.ITIMER_PROF, 0, 0)
    in_stall = []
    for t, stack in samples:
        if any(end - late - 0.01 <= t <= end for end, late in stalls):
            in_stall.append(stack)
    netfence = Counter(next((f for f in s if f.startswith("netfence/")), "(no netfence frame)") for s in in_stall)
    inner = Counter(s[0] for s in in_stall if s)
    outer = Counter(" <- ".join(f for f in s if f.startswith("netfence/"))[:400] for s in in_stall)
    out: dict[str, Any] = {
        "stalls": [{"end": end, "late": late} for end, late in stalls],
        "samples_total": len(samples),
        "samples_in_stalls": len(in_stall),
        "innermost_netfence": netfence.most_common(15),
        "innermost": inner.most_common(15),
        "netfence_stacks": outer.most_common(10),
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1:]
    out_path = own[own.index("--probe-out") + 1]
    import netfence.controller.main as controller_main

    original = controller_main.run

    async def run(config: Any) -> None:
        ticker = asyncio.create_task(_ticker())
        try:
            await original(config)
        finally:
            ticker.cancel()

    controller_main.run = run  # type: ignore[assignment]
    atexit.register(_summary, out_path)
    signal.signal(signal.SIGPROF, _on_sigprof)
    signal.setitimer(signal.ITIMER_PROF, SAMPLE_INTERVAL, SAMPLE_INTERVAL)
    sys.exit(controller_main.main(rest))


if __name__ == "__main__":
    main()
