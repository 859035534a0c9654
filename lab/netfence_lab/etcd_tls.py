"""TLS for test etcds: throwaway CAs and certificates, Secret-volume-like folders, an etcd with client-cert auth.

* :class:`TestCa` makes a CA and issues server or client certificates with the
  ``openssl`` CLI (ECDSA P-256, like ``testbed/pki.py``);
* :class:`SecretVolume` lays files out as the kubelet lays out a Secret volume
  (``name -> ..data/name``, ``..data -> ..<timestamp>/``) and updates them the
  way it does: a new folder, then one atomic rename of the ``..data`` symlink;
* :class:`TlsEtcdServer` is an :class:`EtcdServer` that serves clients over
  TLS and requires client certificates signed by its client CA. Its
  certificate files are copies: :meth:`TlsEtcdServer.use` replaces them, a
  restart makes etcd load them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from netfence_lab.etcd_server import EtcdServer
from netfence_lab.pki import new_ec_key
from netfence_lab.pki import openssl as _openssl

_CLIENT_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE",
    "keyUsage = critical, digitalSignature, keyEncipherment",
    "extendedKeyUsage = clientAuth",
    "authorityKeyIdentifier = keyid",
)
_counter = itertools.count()


def _new_key(path: Path, cwd: Path) -> None:
    new_ec_key(path, cwd)
    path.chmod(0o600)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


class TestCa:
    """A throwaway CA in ``directory`` (``<name>.crt``/``<name>.key``) that issues certificates next to it."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "ca", days: int = 30) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.name = name
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"
        conf = directory / f"{name}.cnf"
        conf.write_text(
            "[req]\ndistinguished_name = dn\nx509_extensions = v3\nprompt = no\n"
            f"[dn]\nCN = {name}\n"
            "[v3]\nbasicConstraints = critical, CA:TRUE\n"
            "keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n"
            "subjectKeyIdentifier = hash\n"
        )
        _new_key(self.key, directory)
        _openssl("req", "-x509", "-new", "-key", str(self.key), "-config", str(conf), "-days", str(days),
                 "-sha256", "-out", str(self.cert), cwd=directory)
        conf.unlink()

    def pem(self) -> bytes:
        return self.cert.read_bytes()

    def issue(self, name: str, *, server_ips: Sequence[str] = (), days: int = 30) -> Issued:
        """A certificate for client auth, or (with ``server_ips``) for server and client auth.

        ``days`` may be negative: the certificate expired that many days ago.
        """
        stem = f"{name}-{next(_counter)}"
        key, csr, ext, crt = (self.dir / f"{stem}.{suffix}" for suffix in ("key", "csr", "ext", "crt"))
        _new_key(key, self.dir)
        _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr), cwd=self.dir)
        extensions = list(_CLIENT_EXTENSIONS)
        if server_ips:
            extensions[2] = "extendedKeyUsage = serverAuth, clientAuth"
            extensions.append("subjectAltName = " + ", ".join(f"IP:{ip}" for ip in server_ips))
        ext.write_text("[v3]\n" + "\n".join(extensions) + "\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", str(ext), "-extensions", "v3",
                 "-out", str(crt), cwd=self.dir)
        csr.unlink()
        ext.unlink()
        return Issued(crt, key)


class SecretVolume:
    """Files laid out and updated as the kubelet does for a Secret volume (see the module doc)."""

    def __init__(self, directory: Path, files: Mapping[str, bytes]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.updates = 0
        self._current: Path | None = None
        self.update(files)

    def path(self, name: str) -> Path:
        return self.dir / name

    def update(self, files: Mapping[str, bytes]) -> None:
        """Write ``files`` into a new folder and switch ``..data`` to it with one rename."""
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        folder = self.dir / f"..{stamp}.{os.getpid()}{self.updates}"
        folder.mkdir(mode=0o755)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            (folder / name).chmod(0o600)
        tmp = self.dir / "..data_tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name)
        os.rename(tmp, self.dir / "..data")  # atomic: readers see the old set or the new one
        for name in files:
            link = self.dir / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        old, self._current = self._current, folder
        if old is not None:
            shutil.rmtree(old)
        self.updates += 1


class TlsEtcdServer(EtcdServer):
    """An etcd on loopback serving clients over TLS with client-certificate auth (see the module doc)."""

    def __init__(self, binary: Path, data_dir: Path, server: Issued, client_ca: bytes,
                 name: str = "etcd-tls") -> None:
        super().__init__(binary, data_dir, name=name)
        self.tls_dir = data_dir / "tls"
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        self.use(server, client_ca)
        http, https = f"http://127.0.0.1:{self.client_port}", f"https://127.0.0.1:{self.client_port}"
        argv = [https if arg == http else arg for arg in self.process.argv]
        argv += [
            "--cert-file", str(self.tls_dir / "server.crt"),
            "--key-file", str(self.tls_dir / "server.key"),
            "--trusted-ca-file", str(self.tls_dir / "client-ca.crt"),
            "--client-cert-auth",
        ]
        self.process.argv = argv

    def use(self, server: Issued, client_ca: bytes) -> None:
        """Serve with ``server`` and trust client certificates of ``client_ca`` (from the next start)."""
        cert, key = server.read()
        (self.tls_dir / "server.crt").write_bytes(cert)
        (self.tls_dir / "server.key").write_bytes(key)
        (self.tls_dir / "server.key").chmod(0o600)
        (self.tls_dir / "client-ca.crt").write_bytes(client_ca)
