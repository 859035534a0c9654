"""Keeping an etcd lease alive in the background (agents' reports, the election)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from netfence.store.errors import StoreError
from netfence.store.protocols import LeaseOps
from netfence.store.tasks import cancel_and_wait

log = logging.getLogger(__name__)

OnNewLease = Callable[[int], Awaitable[None]]


class LeaseKeeper:
    """Async context manager that keeps a lease alive.

    ``lease_id`` is the current lease; ``alive`` is False while the lease is
    known (TTL <= 0 reported) or presumed (no successful keepalive for a whole
    TTL) to be expired; ``lost`` is an Event set at the same moment.

    With ``regrant`` (the default) an expired lease is replaced by a new one
    and ``on_new_lease(new_id)`` is awaited so the owner can re-put its keys.
    Without it (the election), the keeper stops at the first loss.
    """

    def __init__(
        self,
        store: LeaseOps,
        ttl: int,
        *,
        lease_id: int | None = None,
        regrant: bool = True,
        on_new_lease: OnNewLease | None = None,
        revoke_on_exit: bool = False,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.lease_id = lease_id or 0
        self.regrant = regrant
        self.on_new_lease = on_new_lease
        self.revoke_on_exit = revoke_on_exit
        self.alive = False
        self.lost = asyncio.Event()
        self._interval = max(ttl / 3, 0.2)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseKeeper:
        if not self.lease_id:
            self.lease_id = await self.store.grant_lease(self.ttl)
        self.alive = True
        self.lost.clear()
        self._task = asyncio.create_task(self._run(), name=f"lease-keeper-{self.lease_id:x}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await cancel_and_wait(task)
        if self.revoke_on_exit and self.lease_id:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(self.lease_id)
            self.alive = False

    def _mark_lost(self, why: str) -> None:
        if self.alive:
            log.warning("lease %x lost: %s", self.lease_id, why)
        self.alive = False
        self.lost.set()

    async def _run(self) -> None:
        last_ok = time.monotonic()  # when the last successful keepalive was sent
        while True:
            await asyncio.sleep(self._interval)
            sent = time.monotonic()
            try:
                remaining = await self.store.keep_alive_once(self.lease_id, wait=self._interval)
            except StoreError as exc:
                log.debug("keepalive of lease %x failed: %s", self.lease_id, exc)
                if time.monotonic() - last_ok >= self.ttl:
                    self._mark_lost(f"no successful keepalive for {self.ttl}s ({exc})")
                    if not self.regrant:
                        return
                continue
            if remaining > 0:
                last_ok = sent
                if not self.alive and self.regrant:  # it survived an outage after all
                    self.alive = True
                    self.lost.clear()
                continue
            self._mark_lost("expired")
            if not self.regrant:
                return
            await self._regrant()
            last_ok = time.monotonic()

    async def _regrant(self) -> None:
        while True:
            try:
                self.lease_id = await self.store.grant_lease(self.ttl)
                break
            except StoreError as exc:
                log.debug("re-granting a lease failed: %s", exc)
                await asyncio.sleep(self._interval)
        log.info("granted new lease %x", self.lease_id)
        self.alive = True
        self.lost.clear()
        if self.on_new_lease is not None:
            try:
                await self.on_new_lease(self.lease_id)
            except Exception:
                log.exception("on_new_lease callback failed")
