"""Serving a program's Prometheus registry: ``GET /metrics`` on a port of its own (aiohttp, on the
program's event loop), separate from health.

Each program (controller/metrics.py, agent/metrics.py) keeps its metrics in a
``CollectorRegistry`` of its own, made at start-up (never prometheus_client's
global default registry, so nothing happens at import time and tests can make
as many as they like). The text is prometheus_client's own exposition
(``make_aiohttp_handler``: the Prometheus text format, or OpenMetrics when the
scraper asks for it). ``before_scrape`` runs first (the agent reads the
kernel's DROP counters there); its failure is its own business and never
fails the scrape.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

log = logging.getLogger(__name__)

BeforeScrape = Callable[[], Awaitable[None]]


def build_app(registry: CollectorRegistry, before_scrape: BeforeScrape | None = None) -> web.Application:
    expose = make_aiohttp_handler(registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        if before_scrape is not None:
            await before_scrape()
        return await expose(request)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


@contextlib.asynccontextmanager
async def metrics_server(
    registry: CollectorRegistry, host: str, port: int, before_scrape: BeforeScrape | None = None
) -> AsyncIterator[int | None]:
    """Serve ``/metrics`` on ``host``:``port`` for the duration of the block (``host`` empty: every
    address, IPv4 and IPv6); port 0: not served (yields None)."""
    if not port:
        yield None
        return
    runner = web.AppRunner(build_app(registry, before_scrape), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host or None, port)
        await site.start()
        log.info("Prometheus metrics on %s:%d (/metrics)", host or "*", port)
        yield port
    finally:
        await runner.cleanup()
