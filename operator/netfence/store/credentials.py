"""The etcd TLS files by content: fingerprint, check, and whether to reload them.

The connection (``store/connection.py``) reads the CA, client certificate and
key files (``--etcd-ca``/``--etcd-cert``/``--etcd-key``) when it opens, every
``EtcdSettings.cert_reload_interval`` seconds and after every failed call, and
compares the SHA-256 of their *contents* with what it loaded. Contents, not
mtimes or inotify: Kubernetes updates a Secret volume by pointing its
``..data`` symlink at a new directory, which leaves the files' own paths and
inodes in place. Every read opens the paths anew, so symlinks are followed.

A changed set is only used when it is valid (:func:`inspect_material`):

* the CA file holds at least one PEM certificate (a bundle of several is fine:
  during a CA rotation it holds the old and the new CA);
* the key belongs to the client certificate (``ssl.SSLContext.load_cert_chain``);
* a TLS server trusting the CA file accepts the client certificate, checked by
  an in-memory handshake with Python's ``ssl`` module (chain, validity period,
  client-auth usage, as etcd checks it). Only required when the set in use
  passed this check too: some installations have etcd's server certificate
  and the client certificate signed by different CAs, and they keep working.

:func:`decide` says whether a set is reloaded, kept silently or rejected with
one warning line (once per rejected contents).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from netfence.store.settings import EtcdSettings

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
_TLS_FAILURE = re.compile(r"handshake|ssl_error|tsi_|certificate|tlsv1 alert|ssl routines", re.IGNORECASE)
_HANDSHAKE_ROUNDS = 16


class CertificateError(ValueError):
    """A certificate that cannot be decoded."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS files of the etcd connection."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def of(cls, settings: EtcdSettings) -> TlsFiles | None:
        """The settings' TLS files; None without TLS (no CA file)."""
        if settings.ca_file is None:
            return None
        def path(value: object) -> Path | None:
            return None if value is None else Path(str(value))
        return cls(Path(str(settings.ca_file)), path(settings.cert_file), path(settings.key_file))


@dataclass(frozen=True)
class TlsMaterial:
    """The contents of the TLS files."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the three contents; a missing file differs from an empty one."""
        digest = hashlib.sha256()
        for part in (self.ca, self.cert, self.key):
            if part is None:
                digest.update(b"\xff" * 8)
            else:
                digest.update(len(part).to_bytes(8, "big") + part)
        return digest.hexdigest()


def read_material(files: TlsFiles, attempts: int = 3) -> TlsMaterial:
    """The files' contents, read until two reads agree (a swap between the reads of
    the three files would give a mix of old and new). Raises OSError."""
    def once() -> TlsMaterial:
        return TlsMaterial(
            files.ca.read_bytes(),
            None if files.cert is None else files.cert.read_bytes(),
            None if files.key is None else files.key.read_bytes(),
        )

    material = once()
    for _ in range(attempts - 1):
        again = once()
        if again == material:
            break
        material = again
    return material


# --- certificates --------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    """What the logs and health endpoints show of a certificate."""

    serial: str  # upper-case hex, as ``openssl x509 -serial`` prints it
    not_after: datetime  # UTC

    def describe(self) -> str:
        return f"serial {self.serial}, expires {self.expiry()}"

    def expiry(self) -> str:
        return self.not_after.isoformat().replace("+00:00", "Z")


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER bytes of every PEM certificate in ``data`` (in order). CertificateError on bad base64."""
    out: list[bytes] = []
    for match in _PEM_CERT.finditer(data):
        try:
            out.append(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise CertificateError(f"a PEM certificate is not valid base64 ({exc})") from None
    return out


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, start of its value, end of its value)."""
    if pos + 2 > len(data):
        raise CertificateError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    start = pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or start + size > len(data):
            raise CertificateError("bad DER length")
        length = int.from_bytes(data[start : start + size], "big")
        start += size
    end = start + length
    if end > len(data):
        raise CertificateError("truncated DER")
    return tag, start, end


def _der_time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii", "replace")
    formats = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}  # UTCTime, GeneralizedTime
    if tag not in formats:
        raise CertificateError(f"unexpected time tag 0x{tag:02x}")
    try:
        return datetime.strptime(text, formats[tag]).replace(tzinfo=UTC)
    except ValueError:
        raise CertificateError(f"unsupported certificate time {text!r}") from None


def cert_info(der: bytes) -> CertInfo:
    """Serial number and end of validity of a DER X.509 certificate. CertificateError if malformed."""
    seq = 0x30
    tag, start, _ = _tlv(der, 0)  # Certificate
    if tag != seq:
        raise CertificateError("not a certificate")
    tag, pos, _ = _tlv(der, start)  # tbsCertificate
    if tag != seq:
        raise CertificateError("not a certificate")
    tag, value, end = _tlv(der, pos)
    if tag == 0xA0:  # [0] version
        tag, value, end = _tlv(der, end)
    if tag != 0x02:
        raise CertificateError("no serial number")
    serial = int.from_bytes(der[value:end], "big", signed=True)
    _, _, end = _tlv(der, end)  # signature algorithm
    _, _, end = _tlv(der, end)  # issuer
    tag, value, _ = _tlv(der, end)  # validity
    if tag != seq:
        raise CertificateError("no validity")
    _, _, before_end = _tlv(der, value)
    tag, value, end = _tlv(der, before_end)
    return CertInfo(f"{serial:X}", _der_time(tag, der[value:end]))


# --- checking a set ------------------------------------------------------------------


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_material` found out about a set of TLS files.

    ``problem``: why the set cannot be used at all (None: usable).
    ``verified``: a server trusting the CA file accepts the client certificate
    (True when there is no client certificate); ``verify_problem`` says why not.
    """

    fingerprint: str
    problem: str | None = None
    ca_count: int = 0
    client: CertInfo | None = None
    verified: bool = False
    verify_problem: str | None = None

    def describe(self) -> str:
        client = f"client certificate {self.client.describe()}" if self.client else "no client certificate"
        return f"{client}; CA file with {self.ca_count} certificate(s)"


@contextlib.contextmanager
def _private_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths holding ``contents`` for APIs that take file names only (memory files where the OS has them)."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("netfence-tls", os.MFD_CLOEXEC) for _ in contents]
        try:
            for fd, data in zip(fds, contents, strict=True):
                os.write(fd, data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="netfence-tls-") as tmp:  # created 0700
        paths = [os.path.join(tmp, str(i)) for i in range(len(contents))]
        for path, data in zip(paths, contents, strict=True):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as out:
                out.write(data)
        yield paths


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _client_accepted(ca: bytes, cert_path: str, key_path: str) -> str | None:
    """Whether a TLS server trusting ``ca`` accepts this client certificate: None if so, else why not.

    An in-memory handshake: the server side verifies the client certificate as
    etcd does (chain to the CA file, validity, client-auth usage); it presents
    the same certificate, which the client side does not check.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(cert_path, key_path)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, from_client, server_side=False)
    server_end = server.wrap_bio(to_server, from_server, server_side=True)
    client_done = server_done = False
    try:
        for _ in range(_HANDSHAKE_ROUNDS):
            if not client_done:
                with contextlib.suppress(ssl.SSLWantReadError):
                    client_end.do_handshake()
                    client_done = True
            to_server.write(from_client.read())
            if not server_done:
                with contextlib.suppress(ssl.SSLWantReadError):
                    server_end.do_handshake()
                    server_done = True
            to_client.write(from_server.read())
            if client_done and server_done:
                return None
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message or _one_line(exc)
    except ssl.SSLError as exc:
        return _one_line(exc)
    return "the test handshake did not complete"


def inspect_material(material: TlsMaterial) -> Inspection:
    """Check a set of TLS files (see the module doc). Never raises; the result says what is wrong."""
    fingerprint = material.fingerprint
    try:
        cas = pem_certificates(material.ca)
        if not cas:
            return Inspection(fingerprint, "the CA file holds no PEM certificate")
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        check.load_verify_locations(cadata=material.ca.decode("ascii", "replace"))
        if material.cert is None or material.key is None:
            return Inspection(fingerprint, ca_count=len(cas), verified=True)
        leaf = pem_certificates(material.cert)
        if not leaf:
            return Inspection(fingerprint, "the client certificate file holds no PEM certificate", len(cas))
        info = cert_info(leaf[0])
        with _private_files(material.cert, material.key) as (cert_path, key_path):
            try:
                check.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                return Inspection(fingerprint, f"the key does not fit the client certificate ({_one_line(exc)})",
                                  len(cas), info)
            why_not = _client_accepted(material.ca, cert_path, key_path)
    except (ssl.SSLError, CertificateError, OSError, ValueError) as exc:
        return Inspection(fingerprint, f"unusable TLS files ({_one_line(exc)})")
    return Inspection(fingerprint, None, len(cas), info, why_not is None, why_not)


def unreadable(exc: OSError) -> Inspection:
    """The inspection of files that could not be read (its fingerprint is the error, so it warns once)."""
    text = _one_line(exc)
    return Inspection("unreadable:" + text, f"cannot read the TLS files ({text})")


# --- deciding ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    reload: bool
    warning: str | None = None  # one line to log; None: nothing to say


def decide(loaded: Inspection, new: Inspection, last_rejected: str | None = None) -> Decision:
    """Reload ``new`` in place of ``loaded``? ``last_rejected``: fingerprint already warned about.

    Unchanged contents: nothing to do. A set with a ``problem`` is rejected; so
    is one whose client certificate the CA file does not verify, when the set
    in use was verified. A rejected set is warned about once.
    """
    if new.fingerprint == loaded.fingerprint:
        return Decision(False)
    problem = new.problem
    if problem is None and loaded.verified and not new.verified:
        problem = f"the CA file does not verify the client certificate ({new.verify_problem})"
    if problem is None:
        return Decision(True)
    if new.fingerprint == last_rejected:
        return Decision(False)
    return Decision(False, f"the etcd TLS files changed but are not a valid set: {problem}; "
                           f"keeping the loaded ones ({loaded.describe()})")


def looks_like_tls_failure(reason: str) -> bool:
    """Whether a failed call's message tells of a TLS handshake failure (gRPC's wording)."""
    return bool(_TLS_FAILURE.search(reason))
