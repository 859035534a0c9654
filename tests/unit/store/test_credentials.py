"""The etcd TLS files: fingerprints by content (through Secret-volume symlinks), checks, reload decisions,
and the connection reloading them into a new channel (fake channels)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netfence.store import connection as C
from netfence.store.connection import Connection
from netfence.store.credentials import (
    CertificateError,
    Inspection,
    TlsFiles,
    TlsMaterial,
    cert_info,
    decide,
    inspect_material,
    looks_like_tls_failure,
    pem_certificates,
    read_material,
    unreadable,
)
from netfence.store.settings import EtcdSettings
from netfence_lab.etcd_tls import Issued, SecretVolume, TestCa


@dataclass(frozen=True)
class Pki:
    ca_a: TestCa
    ca_b: TestCa
    client_a: Issued
    client_a2: Issued  # a renewal: same CA, new key
    client_b: Issued
    expired_a: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("tls")
    ca_a, ca_b = TestCa(base / "a", "ca-a"), TestCa(base / "b", "ca-b")
    return Pki(ca_a, ca_b, ca_a.issue("client"), ca_a.issue("client"), ca_b.issue("client"),
               ca_a.issue("client", days=-1))


def material(ca: bytes, client: Issued | None) -> TlsMaterial:
    if client is None:
        return TlsMaterial(ca)
    cert, key = client.read()
    return TlsMaterial(ca, cert, key)


def openssl_x509(cert: Path, *fields: str) -> dict[str, str]:
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", *fields],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


# --- fingerprints and reading ----------------------------------------------------------


parts = st.one_of(st.none(), st.binary(max_size=8))


@given(st.binary(max_size=8), parts, parts, st.binary(max_size=8), parts, parts)
def test_equal_fingerprints_mean_equal_contents(a1: bytes, b1: bytes | None, c1: bytes | None,
                                                a2: bytes, b2: bytes | None, c2: bytes | None) -> None:
    first, second = TlsMaterial(a1, b1, c1), TlsMaterial(a2, b2, c2)
    assert (first.fingerprint == second.fingerprint) == (first == second)


def test_a_missing_file_differs_from_an_empty_one_and_contents_do_not_shift() -> None:
    assert TlsMaterial(b"ca", None, None).fingerprint != TlsMaterial(b"ca", b"", b"").fingerprint
    assert TlsMaterial(b"ca", b"xy", b"z").fingerprint != TlsMaterial(b"ca", b"x", b"yz").fingerprint


def test_a_symlink_swap_is_seen_under_the_same_paths(tmp_path: Path) -> None:
    """Kubernetes replaces the ``..data`` symlink: same paths, same link inodes, new contents."""
    volume = SecretVolume(tmp_path / "secret", {"ca.crt": b"ca-1", "tls.crt": b"cert-1", "tls.key": b"key-1"})
    files = TlsFiles(volume.path("ca.crt"), volume.path("tls.crt"), volume.path("tls.key"))
    before = read_material(files)
    link_inode = files.cert.lstat().st_ino if files.cert else 0
    volume.update({"ca.crt": b"ca-1", "tls.crt": b"cert-2", "tls.key": b"key-2"})
    after = read_material(files)
    assert files.cert is not None and files.cert.lstat().st_ino == link_inode
    assert before == TlsMaterial(b"ca-1", b"cert-1", b"key-1")
    assert after == TlsMaterial(b"ca-1", b"cert-2", b"key-2")
    assert before.fingerprint != after.fingerprint


def test_files_of_the_settings() -> None:
    assert TlsFiles.of(EtcdSettings()) is None
    files = TlsFiles.of(EtcdSettings(ca_file="/t/ca.crt", cert_file="/t/tls.crt", key_file="/t/tls.key"))
    assert files == TlsFiles(Path("/t/ca.crt"), Path("/t/tls.crt"), Path("/t/tls.key"))
    assert TlsFiles.of(EtcdSettings(ca_file="/t/ca.crt")) == TlsFiles(Path("/t/ca.crt"))


# --- certificates ------------------------------------------------------------------------


def test_serial_and_expiry_match_openssl(pki: Pki) -> None:
    for cert in (pki.client_a.cert, pki.ca_a.cert, pki.expired_a.cert):
        info = cert_info(pem_certificates(cert.read_bytes())[0])
        fields = openssl_x509(cert, "-serial", "-enddate")
        assert info.serial == fields["serial"].lstrip("0")
        expected = datetime.strptime(fields["notAfter"], "%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC)
        assert info.not_after == expected
        assert info.expiry().endswith("Z")


def test_a_bundle_holds_several_certificates(pki: Pki) -> None:
    bundle = pki.ca_a.pem() + b"\n# a comment\n" + pki.ca_b.pem()
    assert len(pem_certificates(bundle)) == 2
    assert pem_certificates(b"no pem here") == []


@given(st.binary(max_size=200))
def test_garbage_is_a_certificate_error_never_another(data: bytes) -> None:
    with contextlib.suppress(CertificateError):
        cert_info(data)


def test_truncated_certificates_are_certificate_errors(pki: Pki) -> None:
    der = pem_certificates(pki.client_a.cert.read_bytes())[0]
    for cut in (1, 2, 10, 40, len(der) // 2):
        with pytest.raises(CertificateError):
            cert_info(der[:cut])


# --- checking a set ----------------------------------------------------------------------


def test_a_matching_set_is_valid_and_verified(pki: Pki) -> None:
    found = inspect_material(material(pki.ca_a.pem(), pki.client_a))
    assert found.problem is None and found.verified and found.ca_count == 1
    assert found.client is not None
    assert found.client.serial == openssl_x509(pki.client_a.cert, "-serial")["serial"].lstrip("0")
    assert "client certificate serial" in found.describe()


def test_a_ca_bundle_verifies_certificates_of_either_ca(pki: Pki) -> None:
    bundle = pki.ca_a.pem() + pki.ca_b.pem()
    for client in (pki.client_a, pki.client_b):
        found = inspect_material(material(bundle, client))
        assert found.problem is None and found.verified and found.ca_count == 2


def test_a_key_of_another_certificate_is_a_problem(pki: Pki) -> None:
    cert, _ = pki.client_a.read()
    _, other_key = pki.client_a2.read()
    found = inspect_material(TlsMaterial(pki.ca_a.pem(), cert, other_key))
    assert found.problem is not None and "does not fit" in found.problem


def test_a_certificate_of_another_ca_is_usable_but_not_verified(pki: Pki) -> None:
    found = inspect_material(material(pki.ca_a.pem(), pki.client_b))
    assert found.problem is None and not found.verified
    assert found.verify_problem is not None and "issuer" in found.verify_problem


def test_an_expired_certificate_is_not_verified(pki: Pki) -> None:
    found = inspect_material(material(pki.ca_a.pem(), pki.expired_a))
    assert not found.verified and found.verify_problem is not None and "expired" in found.verify_problem


@pytest.mark.parametrize("ca", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_a_bad_ca_file_is_a_problem(pki: Pki, ca: bytes) -> None:
    found = inspect_material(material(ca, pki.client_a))
    assert found.problem is not None and not found.verified


def test_a_half_written_certificate_is_a_problem(pki: Pki) -> None:
    cert, key = pki.client_a.read()
    found = inspect_material(TlsMaterial(pki.ca_a.pem(), cert[: len(cert) // 2], key))
    assert found.problem is not None


def test_a_ca_alone_is_valid(pki: Pki) -> None:
    found = inspect_material(material(pki.ca_a.pem(), None))
    assert found.problem is None and found.verified and found.client is None


def test_unreadable_files_are_a_problem_with_a_stable_fingerprint() -> None:
    error = FileNotFoundError(2, "No such file or directory", "/t/tls.crt")
    assert unreadable(error).problem is not None
    assert unreadable(error).fingerprint == unreadable(error).fingerprint


# --- deciding --------------------------------------------------------------------------


LOADED = Inspection("old", ca_count=1, verified=True)


def test_unchanged_contents_are_not_reloaded() -> None:
    assert decide(LOADED, Inspection("old", ca_count=1, verified=True)).reload is False
    assert decide(LOADED, Inspection("old", ca_count=1, verified=True)).warning is None


def test_a_changed_valid_set_is_reloaded() -> None:
    assert decide(LOADED, Inspection("new", ca_count=2, verified=True)) .reload


def test_an_invalid_set_is_warned_about_once() -> None:
    bad = Inspection("new", problem="the key does not fit the client certificate")
    first = decide(LOADED, bad)
    assert not first.reload and first.warning is not None and "does not fit" in first.warning
    assert decide(LOADED, bad, last_rejected="new").warning is None


def test_an_unverified_certificate_replaces_only_an_unverified_one() -> None:
    """Separate client and server CAs keep working; a verified set is never replaced by an unverified one."""
    unverified = Inspection("new", ca_count=1, verified=False, verify_problem="unable to get local issuer")
    refused = decide(LOADED, unverified)
    assert not refused.reload and refused.warning is not None and "does not verify" in refused.warning
    assert decide(Inspection("old", ca_count=1, verified=False), unverified).reload


@pytest.mark.parametrize(("reason", "tls"), [
    ("range: get failed after 1 attempts: UNAVAILABLE (failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:2379: Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
     "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED)", True),
    ("get failed: UNAVAILABLE (failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: "
     "Handshake failed)", True),
    ("get failed: UNAVAILABLE (recvmsg:Connection reset by peer: tlsv1 alert unknown ca)", True),
    ("get: etcd did not answer within 5.0s", False),
    ("get failed after 1 attempts: UNAVAILABLE (failed to connect to all addresses; last error: UNAVAILABLE: "
     "ipv4:127.0.0.1:2379: Connection refused)", False),
    ("watch: UNAVAILABLE", False),
])
def test_tls_failures_are_recognised(reason: str, tls: bool) -> None:
    assert looks_like_tls_failure(reason) is tls


# --- the connection with fake channels ---------------------------------------------------


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False
        self.closed_event = asyncio.Event()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    async def close(self) -> None:
        self.closed = True
        self.closed_event.set()

    def _method(self, *args: Any, **kwargs: Any) -> None:
        return None

    unary_unary = unary_stream = stream_unary = stream_stream = _method


@dataclass
class Setup:
    conn: Connection
    volume: SecretVolume
    channels: list[FakeChannel]
    second_built: asyncio.Event


def volume_files(ca: bytes, client: Issued) -> dict[str, bytes]:
    cert, key = client.read()
    return {"ca.crt": ca, "tls.crt": cert, "tls.key": key}


async def open_connection(tmp_path: Path, pki: Pki, *, interval: float = 3600) -> Setup:
    volume = SecretVolume(tmp_path / "secret", volume_files(pki.ca_a.pem(), pki.client_a))
    settings = EtcdSettings(ca_file=volume.path("ca.crt"), cert_file=volume.path("tls.crt"),
                            key_file=volume.path("tls.key"), rebuild_after=10, cert_reload_interval=interval)
    conn = Connection(settings, retire_after=0.05)
    channels: list[FakeChannel] = []
    second_built = asyncio.Event()

    async def build() -> Any:
        channels.append(FakeChannel())
        if len(channels) > 1:
            second_built.set()
        return channels[-1]

    conn._build = build  # type: ignore[method-assign]
    await conn.open()
    return Setup(conn, volume, channels, second_built)


async def test_changed_files_replace_the_channel_and_retire_the_old_one(tmp_path: Path, pki: Pki) -> None:
    s = await open_connection(tmp_path, pki)
    try:
        first = s.conn.channel
        serial_a = s.conn.client_certificate.serial if s.conn.client_certificate else ""
        assert not await s.conn.reload_credentials()  # unchanged
        s.volume.update(volume_files(pki.ca_a.pem() + pki.ca_b.pem(), pki.client_a2))
        assert await s.conn.reload_credentials()
        assert s.conn.channel is not first and s.conn.reloads == 1 and s.conn.rebuilds == 0
        assert s.conn.client_certificate is not None and s.conn.client_certificate.serial != serial_a
        status = s.conn.tls_status()
        assert status["etcdClientCertSerial"] == s.conn.client_certificate.serial
        assert status["etcdTlsReloads"] == 1 and str(status["etcdClientCertExpiry"]).endswith("Z")
        await asyncio.wait_for(s.channels[0].closed_event.wait(), 5)  # retired after retire_after
    finally:
        await s.conn.close()
    assert all(channel.closed for channel in s.channels)


async def test_an_invalid_set_keeps_the_channel_and_warns_once(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    s = await open_connection(tmp_path, pki)
    try:
        first = s.conn.channel
        cert, _ = pki.client_a2.read()
        _, wrong_key = pki.client_b.read()
        s.volume.update({"ca.crt": pki.ca_a.pem(), "tls.crt": cert, "tls.key": wrong_key})
        with caplog.at_level(logging.WARNING, logger="netfence.store.connection"):
            for _ in range(3):
                assert not await s.conn.reload_credentials()
                await s.conn.failed("get: etcd did not answer within 5.0s")
        warnings = [r for r in caplog.records if "not a valid set" in r.getMessage()]
        assert len(warnings) == 1 and "does not fit" in warnings[0].getMessage()
        assert s.conn.channel is first and s.conn.reloads == 0
        # a CA that does not verify the new certificate: refused too
        s.volume.update(volume_files(pki.ca_b.pem(), pki.client_a2))
        assert not await s.conn.reload_credentials()
        s.volume.update(volume_files(pki.ca_a.pem(), pki.client_a2))  # then a good set
        assert await s.conn.reload_credentials() and s.conn.reloads == 1
    finally:
        await s.conn.close()


async def test_a_failed_call_reloads_changed_files_at_once(tmp_path: Path, pki: Pki) -> None:
    """No waiting for rebuild_after (10 s) nor for the periodic check (an hour)."""
    s = await open_connection(tmp_path, pki)
    try:
        first = s.conn.channel
        s.volume.update(volume_files(pki.ca_b.pem(), pki.client_b))  # a new CA and certificate
        await s.conn.failed("get failed: UNAVAILABLE (Ssl handshake failed: CERTIFICATE_VERIFY_FAILED)")
        assert s.conn.channel is not first and s.conn.reloads == 1 and s.conn.rebuilds == 0
    finally:
        await s.conn.close()


async def test_a_tls_failure_with_unchanged_files_says_what_is_loaded_once(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    s = await open_connection(tmp_path, pki)
    try:
        with caplog.at_level(logging.WARNING, logger="netfence.store.connection"):
            for _ in range(3):
                await s.conn.failed("get failed: UNAVAILABLE (Handshake failed)")
        hints = [r for r in caplog.records if "TLS files are unchanged" in r.getMessage()]
        assert len(hints) == 1 and "serial" in hints[0].getMessage()
        assert s.conn.reloads == 0
    finally:
        await s.conn.close()


async def test_the_periodic_check_reloads_by_itself(tmp_path: Path, pki: Pki) -> None:
    s = await open_connection(tmp_path, pki, interval=0.05)
    try:
        s.volume.update(volume_files(pki.ca_a.pem(), pki.client_a2))
        await asyncio.wait_for(s.second_built.wait(), 5)
        await asyncio.sleep(0)  # the check installs the channel it built
        assert len(s.channels) == 2 and s.conn.channel is s.channels[1] and s.conn.reloads == 1
    finally:
        await s.conn.close()
    assert s.conn._reloader is None


def test_without_tls_there_is_no_status() -> None:
    assert Connection(EtcdSettings()).tls_status() == {}
    assert Connection(EtcdSettings()).client_certificate is None


async def test_a_channel_that_cannot_be_made_keeps_the_loaded_set_and_is_retried(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    s = await open_connection(tmp_path, pki)
    try:
        first = s.conn.channel
        serial_a = s.conn.client_certificate.serial if s.conn.client_certificate else ""
        working_build = s.conn._build

        async def failing_build() -> Any:
            raise C.EtcdUnavailable("cannot resolve etcd endpoint 'etcd.example:2379'")

        s.conn._build = failing_build  # type: ignore[method-assign]
        s.volume.update(volume_files(pki.ca_a.pem(), pki.client_a2))
        with caplog.at_level(logging.WARNING, logger="netfence.store.connection"):
            for _ in range(3):
                assert not await s.conn.reload_credentials()
        assert len([r for r in caplog.records if "no channel could be made" in r.getMessage()]) == 1
        assert s.conn.channel is first and s.conn.client_certificate is not None
        assert s.conn.client_certificate.serial == serial_a
        s.conn._build = working_build  # type: ignore[method-assign]
        assert await s.conn.reload_credentials() and s.conn.reloads == 1
    finally:
        await s.conn.close()


def test_the_reload_period_is_a_flag_and_must_be_positive() -> None:
    from netfence.config import ConfigError, load_agent_config, load_controller_config

    assert load_agent_config(["--node=n"], env={}).etcd.cert_reload_interval == 30
    assert load_agent_config(["--node=n", "--etcd-cert-reload-seconds=5"], env={}).etcd.cert_reload_interval == 5
    env = {"NETFENCE_ETCD_CERT_RELOAD_SECONDS": "2.5"}
    assert load_controller_config([], env=env).etcd.cert_reload_interval == 2.5
    with pytest.raises(ConfigError, match="cert reload interval"):
        load_agent_config(["--node=n", "--etcd-cert-reload-seconds=0"], env={})
