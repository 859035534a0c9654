"""The agent's HTTP health endpoint (aiohttp): /healthz (alive) and /readyz (in sync)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web


def build_app(health: Callable[[], dict[str, Any]]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Alive even when etcd is down: the agent keeps enforcing its last state
        # and says so in the body ("enforcingStale": true).
        return web.Response(text=json.dumps(health()), content_type="application/json")

    async def readyz(_: web.Request) -> web.Response:
        body = health()
        ok = body["etcdConnected"] and body["appliedRevision"] > 0 and not body["lastError"]
        return web.Response(
            status=200 if ok else 503, text=json.dumps(body), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(health: Callable[[], dict[str, Any]], host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_app(health), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
