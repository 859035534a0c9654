"""Renewed TLS files are used without a restart: a running store, its watch and its lease ride through a
certificate renewal and a move of etcd to a new CA, with the files swapped as Kubernetes swaps a Secret
volume (one rename of the ``..data`` symlink)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.integration.helpers import eventually

from netfence.store import layout as L
from netfence.store.errors import StoreError
from netfence.store.etcd import EtcdStore
from netfence.store.settings import EtcdSettings
from netfence.store.tasks import cancel_and_wait
from netfence.store.types import CommitBatch
from netfence_lab.etcd_tls import Issued, SecretVolume, TestCa, TlsEtcdServer
from netfence_lab.tools import cache_dir

pytestmark = pytest.mark.integration

RELOAD_PERIOD = 0.5  # the short period of the renewal test
REBUILD_AFTER = 60.0  # so a recovery within seconds is not the failure-driven channel rebuild


@dataclass(frozen=True)
class Pki:
    ca_a: TestCa
    ca_b: TestCa
    server_a: Issued
    server_b: Issued
    client_a: Issued
    client_a2: Issued  # a renewal by the same CA (new key), as cert-manager does
    client_b: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("etcd-tls")
    ca_a, ca_b = TestCa(base / "a", "ca-a"), TestCa(base / "b", "ca-b")
    return Pki(ca_a, ca_b, ca_a.issue("etcd", server_ips=["127.0.0.1"]), ca_b.issue("etcd", server_ips=["127.0.0.1"]),
               ca_a.issue("netfence"), ca_a.issue("netfence"), ca_b.issue("netfence"))


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    async def check() -> bool:
        return predicate()

    await eventually(check, timeout=timeout, interval=0.05, what=what)


@pytest.fixture
def tls_etcd(tmp_path: Path, pki: Pki) -> Iterator[TlsEtcdServer]:
    """An etcd of this test alone, serving with CA A's certificate and trusting CA A's clients."""
    binary = cache_dir() / "bin" / "etcd"
    if not binary.exists():
        pytest.fail(f"etcd is missing at {binary}: run hack/build-tools.sh")
    server = TlsEtcdServer(binary, tmp_path / "etcd", pki.server_a, pki.ca_a.pem())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def secret(ca: bytes, client: Issued) -> dict[str, bytes]:
    cert, key = client.read()
    return {"ca.crt": ca, "tls.crt": cert, "tls.key": key}


def settings(endpoint: str, prefix: str, volume: SecretVolume, **overrides: float) -> EtcdSettings:
    values = {"timeout": 2.0, "watch_probe_interval": 0.5, "watch_retry_timeout": 120.0,
              "rebuild_after": REBUILD_AFTER, "cert_reload_interval": RELOAD_PERIOD, **overrides}
    return EtcdSettings([endpoint], prefix, ca_file=volume.path("ca.crt"), cert_file=volume.path("tls.crt"),
                        key_file=volume.path("tls.key"), **values)


def serial(client: Issued) -> str:
    from netfence.store.credentials import cert_info, pem_certificates

    return cert_info(pem_certificates(client.cert.read_bytes())[0]).serial


class Follower:
    """The store's committed-change watch, running in the background; batches arrive on a queue."""

    def __init__(self, store: EtcdStore, after: int) -> None:
        self.batches: list[CommitBatch] = []
        self.queue: asyncio.Queue[CommitBatch] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(store, after))

    async def _run(self, store: EtcdStore, after: int) -> None:
        async for batch in store.follow_commits(after):
            self.batches.append(batch)
            self.queue.put_nowait(batch)

    async def next(self, timeout: float = 20.0) -> CommitBatch:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def write_retrying(store: EtcdStore, changes: dict[str, bytes | None], timeout: float = 20.0) -> int:
    """A write through the store's own retry wait (the callers' pattern); fails after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await store.write(changes, None)
            except StoreError:
                await store.pause(0.5)


async def refused(endpoint: str, prefix: str, volume: SecretVolume) -> bool:
    store = EtcdStore(settings(endpoint, prefix, volume, timeout=1.0))
    try:
        await asyncio.wait_for(store.connect(), 10)
        return False
    except (StoreError, TimeoutError):
        return True
    finally:
        await store.close()


async def test_a_renewal_and_a_new_ca_are_used_without_a_restart(
    tls_etcd: TlsEtcdServer, pki: Pki, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="netfence.store.connection")
    volume = SecretVolume(tmp_path / "client", secret(pki.ca_a.pem(), pki.client_a))
    store = EtcdStore(settings(tls_etcd.endpoint, etcd_prefix, volume), identity="reloading")
    await store.connect()
    conn = store.connection
    assert conn.client_certificate is not None and conn.client_certificate.serial == serial(pki.client_a)
    follower = Follower(store, (await store.committed_snapshot()).revision)
    lease_id = await store.grant_lease(20)
    await store.put_report("node-1", {"up": True}, lease_id)
    try:
        async with store.keep_lease(lease_id, 20) as keeper:
            revisions = [await store.write({"sets/a": L.encode({"v": 1})}, None)]
            assert (await follower.next()).commit_revision == revisions[0]

            # 1. cert-manager renews the client certificate (same CA, new key): picked up by the periodic check.
            volume.update(secret(pki.ca_a.pem(), pki.client_a2))
            await until(lambda: conn.reloads == 1, 10 * RELOAD_PERIOD + 5, "the renewed files to be loaded")
            assert conn.client_certificate is not None and conn.client_certificate.serial == serial(pki.client_a2)
            revisions.append(await store.write({"sets/b": L.encode({"v": 2})}, None))  # on the new channel
            assert (await follower.next()).commit_revision == revisions[1]

            # 2. A new CA: the files hold CA B and a certificate of CA B; etcd restarts trusting CA B only.
            volume.update(secret(pki.ca_b.pem(), pki.client_b))
            await until(lambda: conn.reloads == 2, 10 * RELOAD_PERIOD + 5, "the new CA's files to be loaded")
            tls_etcd.use(pki.server_b, pki.ca_b.pem())
            await asyncio.to_thread(tls_etcd.restart)
            back = time.monotonic()
            revisions.append(await write_retrying(store, {"sets/a": None, "sets/c": L.encode({"v": 3})}))
            written = time.monotonic() - back
            batch = await follower.next()
            watched = time.monotonic() - back
            print(f"\nafter etcd's restart with the new CA: a write {written:.2f}s, the watch {watched:.2f}s")
            assert written < 10 and watched < 15

            # The same store, watch and lease throughout: no commit missed or repeated, the lease held.
            assert batch.commit_revision == revisions[2]
            assert [b.commit_revision for b in follower.batches] == revisions
            assert [b.changes for b in follower.batches] == [
                {"sets/a": L.encode({"v": 1})}, {"sets/b": L.encode({"v": 2})},
                {"sets/a": None, "sets/c": L.encode({"v": 3})},
            ]
            assert not follower.task.done()
            assert keeper.alive and not keeper.lost.is_set()
            assert await store.keep_alive_once(lease_id) > 0
            assert (await store.read_reports())["node-1"]["up"] is True  # bound to the lease
            assert conn.reloads == 2 and conn.rebuilds == 0
            status = conn.tls_status()
            assert status["etcdClientCertSerial"] == serial(pki.client_b) and status["etcdTlsReloads"] == 2

            # etcd really moved: the old credentials are refused now.
            old = SecretVolume(tmp_path / "old-client", secret(pki.ca_a.pem(), pki.client_a))
            assert await refused(tls_etcd.endpoint, etcd_prefix, old)
    finally:
        await cancel_and_wait(follower.task)
        await store.close()
    reloaded = [r.getMessage() for r in caplog.records if "reloaded them" in r.getMessage()]
    assert len(reloaded) == 2 and serial(pki.client_b) in reloaded[1], reloaded


async def test_a_tls_failure_reads_the_files_at_once(
    tls_etcd: TlsEtcdServer, pki: Pki, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """etcd moves to the new CA first; the files follow. With a periodic check of 5 minutes and a rebuild
    after a minute, only the re-read after each failed call can bring the store back within seconds."""
    caplog.set_level(logging.INFO, logger="netfence.store.connection")
    volume = SecretVolume(tmp_path / "client", secret(pki.ca_a.pem(), pki.client_a))
    store = EtcdStore(settings(tls_etcd.endpoint, etcd_prefix, volume, cert_reload_interval=300.0))
    await store.connect()
    follower = Follower(store, (await store.committed_snapshot()).revision)
    answered: list[float] = []
    answer = asyncio.Event()

    async def poll() -> None:
        """Like the agent's connectivity check: a call every 0.2 s, the retry wait after a failure."""
        while True:
            try:
                await store.commit_revision()
                answered.append(time.monotonic())
                answer.set()
                await asyncio.sleep(0.2)
            except StoreError:
                await store.pause(0.5)

    poller = asyncio.create_task(poll())
    try:
        first = await store.write({"sets/a": L.encode({"v": 1})}, None)
        assert (await follower.next()).commit_revision == first

        tls_etcd.use(pki.server_b, pki.ca_b.pem())
        await asyncio.to_thread(tls_etcd.restart)
        failures = len(caplog.records)
        answer.clear()
        await until(lambda: any("TLS handshake" in r.getMessage() for r in caplog.records[failures:]),
                    20, "a call failing in the TLS handshake")
        assert not answer.is_set()

        swapped = time.monotonic()
        volume.update(secret(pki.ca_b.pem(), pki.client_b))
        await asyncio.wait_for(answer.wait(), 15)
        recovered = min(t for t in answered if t > swapped) - swapped
        second = await write_retrying(store, {"sets/b": L.encode({"v": 2})})
        assert (await follower.next()).commit_revision == second
        print(f"\ncalls answered {recovered:.2f}s after the files were swapped")
        assert recovered < 5
        assert store.connection.reloads == 1 and store.connection.rebuilds == 0
        assert [b.commit_revision for b in follower.batches] == [first, second]
        assert not follower.task.done() and not poller.done()
    finally:
        await cancel_and_wait(poller, follower.task)
        await store.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("reloaded them" in m and "after a" in m for m in messages), messages
