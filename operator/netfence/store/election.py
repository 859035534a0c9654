"""Lease-based leader election on the ``leader`` key.

A candidate grants a lease and creates ``leader`` bound to it only if the key
is absent (``create_revision == 0``). The winner's :class:`Fence` (the key's
create revision) conditions every write, so a deposed leader cannot write
even before it notices. Losers watch the key until it is deleted (resign,
revoke or lease expiry) and try again.

A leader that loses etcd steps down once its lease is presumed expired; its
revoke fails then, and etcd, when it comes back, restores the lease (and the
``leader`` key with it) with a fresh TTL. So the lease is remembered and
revoked before the next campaign: the old key goes at once instead of a TTL
after etcd's return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from netfence.store import layout as L
from netfence.store.errors import CompactedError, CorruptValueError, StoreError
from netfence.store.lease import LeaseKeeper
from netfence.store.protocols import ElectionStore
from netfence.store.tasks import first_of
from netfence.store.types import Fence

log = logging.getLogger(__name__)


class LeaderElection:
    """Campaign for ``leader`` under the store's prefix; see the module doc.

    ``on_elected()`` / ``on_lost()`` are called synchronously from the
    election task (``fence`` is already set / already None when they run);
    ``became_leader`` is set while leading. ``is_leader`` turns False the
    moment the lease is known or presumed lost, before ``on_lost`` runs.
    It is the syncer's ``Leadership`` (``store/protocols.py``); ``store`` is
    any ``ElectionStore``.
    """

    def __init__(
        self,
        store: ElectionStore,
        identity: str,
        ttl: int = 5,
        *,
        on_elected: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        retry_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.identity = identity
        self.ttl = ttl
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.retry_interval = retry_interval
        self.became_leader = asyncio.Event()
        self._fence: Fence | None = None
        self._keeper: LeaseKeeper | None = None
        self._lease_id = 0
        self._unrevoked: set[int] = set()  # our leases whose revoke failed (etcd was away)
        self._stop = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        keeper = self._keeper
        return self._fence is not None and keeper is not None and keeper.alive

    @property
    def fence(self) -> Fence | None:
        return self._fence if self.is_leader else None

    async def current_leader(self) -> str | None:
        """The identity of the current holder, if any."""
        current = await self.store.get(L.LEADER)
        if current is None:
            return None
        try:
            return str(L.decode(current.value, L.LEADER).get("holder"))
        except CorruptValueError:
            return None

    async def run(self) -> None:
        """Campaign until :meth:`resign` (or cancellation)."""
        while not self._stop.is_set():
            try:
                await self._campaign()
            except StoreError as exc:
                self._step_down(f"etcd error: {exc}")
                log.warning("election %s: %s; retrying in %.1fs", self.identity, exc, self.retry_interval)
                # the wait ends early when etcd is reachable again (or when stopping)
                await first_of(self._stop.wait(), self.store.pause(self.retry_interval))

    async def resign(self) -> None:
        """Stop campaigning and hand leadership over at once (revokes the lease)."""
        self._stop.set()
        lease_id = self._lease_id
        self._step_down("resigned")
        if lease_id:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(lease_id)

    def _step_down(self, reason: str) -> None:
        was_leader = self._fence is not None
        self._fence = None
        self.became_leader.clear()
        if was_leader:
            log.warning("election %s: no longer leader (%s)", self.identity, reason)
            if self.on_lost is not None:
                self.on_lost()

    async def _campaign(self) -> None:
        for stale in sorted(self._unrevoked):
            await self.store.revoke_lease(stale)  # releases a leader key etcd restored with it
            self._unrevoked.discard(stale)
        lease_id = await self.store.grant_lease(self.ttl)
        self._lease_id = lease_id
        keeper = LeaseKeeper(self.store, self.ttl, lease_id=lease_id, regrant=False)
        try:
            async with keeper:
                self._keeper = keeper
                create_revision = await self._acquire(keeper, lease_id)
                if create_revision is None:
                    return
                self._fence = Fence(self.store.layout.key(L.LEADER).decode(), create_revision)
                self.became_leader.set()
                log.info("election %s: elected (create revision %d)", self.identity, create_revision)
                if self.on_elected is not None:
                    self.on_elected()
                which = await first_of(
                    keeper.lost.wait(),
                    self._stop.wait(),
                    self._wait_gone(create_revision, create_revision),
                )
                self._step_down(("lease lost", "stopping", "leader key deleted")[which])
        finally:
            self._lease_id = 0
            self._step_down("campaign ended")
            try:
                await self.store.revoke_lease(lease_id)
            except StoreError:
                self._unrevoked.add(lease_id)

    async def _acquire(self, keeper: LeaseKeeper, lease_id: int) -> int | None:
        """Create the leader key; None if the lease was lost or we are stopping first."""
        value = L.encode({"holder": self.identity, "since": datetime.now(UTC).isoformat()})
        while True:
            result = await self.store.create_if_absent(L.LEADER, value, lease_id)
            if result.created:
                return result.current.create_revision
            holder = result.current
            log.debug("election %s: leader key held (lease %x); waiting", self.identity, holder.lease)
            which = await first_of(
                self._wait_gone(holder.create_revision, holder.revision),
                keeper.lost.wait(),
                self._stop.wait(),
            )
            if which != 0:
                return None

    async def _wait_gone(self, create_revision: int, after_revision: int) -> None:
        """Return once the leader key with ``create_revision`` no longer exists."""
        while True:
            try:
                stream = self.store.watch_changes(L.LEADER, after_revision, prefix=False)
                async with contextlib.aclosing(stream):
                    async for _rev, changes in stream:
                        if L.LEADER in changes and changes[L.LEADER] is None:
                            return
            except CompactedError:
                current = await self.store.get(L.LEADER)
                if current is None or current.create_revision != create_revision:
                    return
                after_revision = current.revision
