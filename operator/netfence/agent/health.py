"""The agent's HTTP health endpoint (aiohttp): /healthz (alive), /readyz (in sync), /counters (read-only).

``GET /counters?chains=A,B[&family=v4|v6]``: the live packet counters of those
Netfence chains in this node's kernel (``iptables-save -c``), for ``netfence
explain``: ``{"node", "family", "chains": {name: [{"packets", "bytes", "rule"}] | null}}``
(null: no such chain). Only Netfence's own chains, at most 64 per request
(400 otherwise); one read at a time. Nothing is ever changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from netfence.dataplane.counters import CounterError, Counters, check_chain_names, counters_json
from netfence.dataplane.ruleset import Family

#: Reads the counters of the named chains in one family (blocking: runs iptables-save).
CounterReader = Callable[[list[str], Family], Counters]


def build_app(health: Callable[[], dict[str, Any]], counters: CounterReader | None = None,
              node: str = "") -> web.Application:
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

    read_lock = asyncio.Lock()

    async def read_counters(request: web.Request) -> web.Response:
        if counters is None:
            return _error(404, "this agent serves no counters")
        family = request.query.get("family", "v4")
        if family not in ("v4", "v6"):
            return _error(400, f"family {family!r}: expected v4 or v6")
        try:
            names = check_chain_names(request.query.get("chains", "").split(","))
        except CounterError as exc:
            return _error(400, str(exc))
        if not names:
            return _error(400, "name the chains: /counters?chains=NAME[,NAME...]")
        fam: Family = "v4" if family == "v4" else "v6"
        async with read_lock:
            try:
                found = await asyncio.to_thread(counters, names, fam)
            except CounterError as exc:
                return _error(500, str(exc))
        body = {"node": node or health().get("node", ""), "family": family, "chains": counters_json(found)}
        return web.Response(text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/counters", read_counters)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")


async def serve(health: Callable[[], dict[str, Any]], host: str, port: int,
                counters: CounterReader | None = None) -> web.AppRunner:
    runner = web.AppRunner(build_app(health, counters), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
