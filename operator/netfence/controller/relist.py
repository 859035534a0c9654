"""Runs a per-kind job ("list this kind afresh and merge it") on request: debounced, one at a time
per kind, retried until it succeeds.

Requests come in bursts (Kopf re-lists a kind after a watch gap and hands every listed
object to the event handlers with ``type`` None; periodic and leadership triggers request
every kind at once). A burst becomes one run: a run starts once no request came for
``quiet`` seconds, at most ``max_delay`` after the first request. A request that arrives
while the kind's job runs causes one more run afterwards (the running listing may predate
what the request saw). A failed run (the API server is down) is retried every ``retry``
seconds, so a kind whose view may be stale is reconciled as soon as the API server answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


class KindRelister:
    def __init__(
        self,
        job: Callable[[str], Awaitable[object]],
        kinds: Iterable[str],
        *,
        quiet: float = 0.3,
        max_delay: float = 2.0,
        retry: float = 1.0,
    ):
        self.job = job
        self.quiet = quiet
        self.max_delay = max_delay
        self.retry = retry
        self._wanted = {kind: asyncio.Event() for kind in kinds}
        self._reasons: dict[str, set[str]] = {kind: set() for kind in self._wanted}
        self.runs: dict[str, int] = dict.fromkeys(self._wanted, 0)  # successful runs per kind
        self.failures: dict[str, int] = dict.fromkeys(self._wanted, 0)  # failed runs per kind
        self.running: set[str] = set()

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._wanted)

    def request(self, kind: str, reason: str) -> None:
        """Ask for a run of ``kind`` (cheap; call it for every event of a burst)."""
        wanted = self._wanted.get(kind)
        if wanted is None:
            raise ValueError(f"unknown kind {kind!r}")
        self._reasons[kind].add(reason)
        wanted.set()

    def pending(self, kind: str) -> bool:
        return self._wanted[kind].is_set() or kind in self.running

    async def run(self) -> None:
        """Serve requests for every kind until cancelled."""
        await asyncio.gather(*(self._serve(kind) for kind in self._wanted))

    async def _serve(self, kind: str) -> None:
        wanted = self._wanted[kind]
        failed = 0
        while True:
            if not failed:  # a retry goes ahead at once
                await wanted.wait()
                await self._settle(wanted)
            wanted.clear()
            reasons, self._reasons[kind] = self._reasons[kind], set()
            self.running.add(kind)
            try:
                await self.job(kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed += 1
                self.failures[kind] += 1
                # Once per outage at warning level; the retries every second at debug.
                log.log(logging.WARNING if failed == 1 else logging.DEBUG,
                        "re-listing %s (%s) failed: %s; retrying every %.1fs",
                        kind, ", ".join(sorted(reasons)), exc, self.retry)
                self._reasons[kind] |= reasons
                await asyncio.sleep(self.retry)
                continue
            finally:
                self.running.discard(kind)
            if failed:
                log.info("re-listing %s succeeded after %d failed attempts", kind, failed)
            failed = 0
            self.runs[kind] += 1
            log.info("re-listed %s (%s)", kind, ", ".join(sorted(reasons)))

    async def _settle(self, wanted: asyncio.Event) -> None:
        """Return once no request came for ``quiet`` seconds, or ``max_delay`` after the first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        while True:
            wanted.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(wanted.wait(), min(self.quiet, remaining))
            except TimeoutError:
                return
