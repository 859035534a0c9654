"""Leases and keys bound to them (implements ``LeaseKeeping`` and the election's ``create_if_absent``).

A lease is granted with a TTL and refreshed by keepalives; when it expires
or is revoked, etcd deletes every key bound to it (the ``leader`` key, node
reports). ``store/lease.py`` ``LeaseKeeper`` keeps one alive in the background.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
from etcd3aio.kv import KVService

from netfence.store.access import EtcdAccess, key_version
from netfence.store.errors import EtcdUnavailable, StoreError
from netfence.store.lease import LeaseKeeper
from netfence.store.types import Acquired, KeyVersion


class EtcdLeases:
    """Lease operations and lease-bound creation over a shared :class:`EtcdAccess`."""

    def __init__(self, access: EtcdAccess) -> None:
        self.access = access
        self.layout = access.layout

    async def grant_lease(self, ttl: int) -> int:
        access = self.access
        resp = await access.call("lease grant", access.lease.grant(ttl, timeout=access.config.timeout))
        return int(resp.ID)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted at once); a lease that is already gone is fine."""
        access = self.access
        try:
            await access.call("lease revoke", access.lease.revoke(lease_id, timeout=access.config.timeout))
        except StoreError as exc:
            if "not found" not in str(exc):
                raise

    async def keep_alive_once(self, lease_id: int, wait: float | None = None) -> int:
        """Refresh a lease once (waiting at most ``wait`` s); returns its TTL (<= 0: expired)."""
        limit = self.access.config.timeout if wait is None else wait
        return await self.access.call("lease keepalive", self._keep_alive_read(lease_id, limit))

    async def _keep_alive_read(self, lease_id: int, limit: float) -> int:
        call = self.access.lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(limit):
                resp = await call.read()
        except TimeoutError as exc:
            raise EtcdUnavailable(f"lease keepalive: no answer within {limit}s") from exc
        except grpc.aio.AioRpcError as exc:
            raise EtcdUnavailable(f"lease keepalive: {exc.code().name} {exc.details()}") from exc
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:
            raise EtcdUnavailable("lease keepalive: stream closed")
        return int(resp.TTL)

    def keep_lease(self, lease_id: int, ttl: int) -> LeaseKeeper:
        """An async context manager keeping exactly ``lease_id`` alive.

        Its ``alive`` turns False (and ``lost`` is set) once the lease is
        expired or presumed expired; the owner then grants a new lease. For a
        keeper that re-grants by itself, use ``LeaseKeeper(store, ttl, on_new_lease=...)``.
        """
        return LeaseKeeper(self, ttl, lease_id=lease_id, regrant=False)

    async def create_if_absent(self, rel: str, value: bytes, lease_id: int) -> Acquired:
        """Create ``rel`` bound to ``lease_id`` unless it exists; report the key as it is now."""
        access = self.access
        key = self.layout.key(rel)
        resp = await access.call(
            "create",
            access.kv.txn(
                [KVService.txn_compare_create_revision(key, 0)],
                [KVService.txn_op_put(key, value, lease=lease_id)],
                [KVService.txn_op_get(key)],
                timeout=access.config.timeout,
            ),
        )
        revision = int(resp.header.revision)
        if resp.succeeded:
            return Acquired(True, KeyVersion(value, revision, revision, lease_id, revision))
        kvs = resp.responses[0].response_range.kvs
        if not kvs:  # cannot happen (the compare failed because it exists); be safe
            raise StoreError(f"{rel}: exists but could not be read")
        return Acquired(False, key_version(kvs[0], revision))
