"""Fixtures for the store integration tests: one real etcd per session, a fresh prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd3aio import Etcd3Client

from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence_lab.etcd_server import EtcdServer
from netfence_lab.tools import cache_dir


def etcd_binary() -> Path:
    binary = cache_dir() / "bin" / "etcd"
    if not binary.exists():
        pytest.fail(f"etcd is missing at {binary}: run hack/build-tools.sh")
    return binary


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd shared by the session (stopped even if start-up fails half-way)."""
    server = EtcdServer(etcd_binary(), tmp_path_factory.mktemp("etcd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A prefix no other test uses, so tests sharing the etcd never collide."""
    return f"/nftest/{uuid.uuid4().hex[:12]}/"


MakeStore = Callable[..., Awaitable[EtcdStore]]


@pytest.fixture
async def make_store(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[MakeStore]:
    """Connect extra EtcdStores (own gRPC channels, like separate processes); all closed afterwards.

    ``await make_store(identity="a", server=other_etcd, timeout=1.0, ...)``: keyword
    arguments override EtcdConfig fields (prefix defaults to the test's prefix).
    """
    stores: list[EtcdStore] = []

    async def make(identity: str = "test", server: EtcdServer | None = None, **overrides: Any) -> EtcdStore:
        settings: dict[str, Any] = {
            "prefix": etcd_prefix,
            "timeout": 5.0,
            "watch_probe_interval": 1.0,
            "watch_retry_timeout": 10.0,
        }
        settings.update(overrides)
        store = EtcdStore(EtcdConfig([(server or etcd_server).endpoint], **settings), identity=identity)
        stores.append(store)
        await store.connect()
        return store

    try:
        yield make
    finally:
        for store in stores:
            await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> EtcdStore:
    """A connected EtcdStore on the test's prefix."""
    return await make_store("test-writer")


@pytest.fixture
async def etcd_client(etcd_server: EtcdServer) -> AsyncIterator[Etcd3Client]:
    """A plain etcd3aio client, for arranging situations the store API never creates."""
    client = Etcd3Client([etcd_server.endpoint])
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def private_etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test alone, which it may kill and restart."""
    server = EtcdServer(etcd_binary(), tmp_path / "etcd", name="private")
    try:
        server.start()
        yield server
    finally:
        server.stop()
