"""The controller's liveness endpoint: ``GET /livez`` answers 200 while the process's event loop runs.

Kopf's health endpoint (``--health-port``, ``/healthz``) runs the controller's
probes (etcd answers, writes succeed): that is *readiness*. Liveness must not
depend on etcd or the API server: restarting the controller cures neither, and
every restart during an outage costs a full re-list and a new leader election
once the outage ends. So this endpoint checks only that the process is alive
and its event loop answers; it is served by that very loop, so a wedged loop
cannot answer and the kubelet's probe times out.

The port comes from ``NETFENCE_LIVENESS_PORT`` (the chart sets it); unset or
empty, no liveness server runs (local runs with several controllers on one
machine need no extra port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)

ENV_PORT = "NETFENCE_LIVENESS_PORT"
ENV_HOST = "NETFENCE_LIVENESS_HOST"
DEFAULT_HOST = "0.0.0.0"  # probed by the kubelet through the pod IP


class LivenessConfigError(ValueError):
    """NETFENCE_LIVENESS_PORT is not a port number."""


def liveness_port(env: Mapping[str, str]) -> int | None:
    """The port to serve /livez on, or None when not configured."""
    raw = env.get(ENV_PORT, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise LivenessConfigError(f"{ENV_PORT} must be a port number, not {raw!r}") from None
    if not 1 <= port <= 65535:
        raise LivenessConfigError(f"{ENV_PORT} must be between 1 and 65535, not {port}")
    return port


@dataclass
class LoopHeartbeat:
    """Ticks every ``interval`` seconds on the event loop; ``lag`` is how late the last tick ran."""

    interval: float = 1.0
    clock: Callable[[], float] = time.monotonic
    lag: float = 0.0
    max_lag: float = 0.0
    started: float = 0.0

    def tick(self, expected: float) -> None:
        self.lag = max(0.0, self.clock() - expected)
        self.max_lag = max(self.max_lag, self.lag)

    async def run(self) -> None:
        while True:
            expected = self.clock() + self.interval
            await asyncio.sleep(self.interval)
            self.tick(expected)

    def body(self) -> dict[str, float]:
        return {"uptimeSeconds": round(self.clock() - self.started, 3), "loopLagSeconds": round(self.lag, 3),
                "maxLoopLagSeconds": round(self.max_lag, 3)}


def build_app(heartbeat: LoopHeartbeat) -> web.Application:
    async def livez(_: web.Request) -> web.Response:
        # Answering at all is the check: this handler runs on the loop that runs everything else.
        return web.Response(text=json.dumps({"alive": True, **heartbeat.body()}), content_type="application/json")

    app = web.Application()
    app.router.add_get("/livez", livez)
    return app


@contextlib.asynccontextmanager
async def liveness_server(env: Mapping[str, str], host: str | None = None) -> AsyncIterator[int | None]:
    """Serve /livez for the duration of the block when ``env`` configures a port; yields the port."""
    port = liveness_port(env)
    if port is None:
        yield None
        return
    heartbeat = LoopHeartbeat()
    heartbeat.started = heartbeat.clock()
    runner = web.AppRunner(build_app(heartbeat), access_log=None)
    await runner.setup()
    beat = asyncio.create_task(heartbeat.run(), name="liveness-heartbeat")
    try:
        site = web.TCPSite(runner, host or env.get(ENV_HOST) or DEFAULT_HOST, port)
        await site.start()
        log.info("liveness endpoint on port %d (/livez)", port)
        yield port
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        await runner.cleanup()
