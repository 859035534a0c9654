"""Certificates and keys for the local control plane, made with the ``openssl`` CLI.

Everything lands in one folder:

* ``ca.crt``/``ca.key``          the cluster CA (signs the serving and client certs)
* ``apiserver.crt``/``.key``     the API server's serving cert; SANs 127.0.0.1,
  localhost, the service IP (10.96.0.1) and the in-cluster DNS names
* ``admin.crt``/``.key``         client cert CN=netfence-admin, O=system:masters
* ``sa.key``/``sa.pub``          the service-account token signing key pair

Certificates use ECDSA P-256 (fast to make, accepted by Go and Python);
the service-account key is RSA-2048 (RS256, what every client expects).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ADMIN_USER = "netfence-admin"
ADMIN_GROUP = "system:masters"
DEFAULT_SERVICE_IP = "10.96.0.1"
DEFAULT_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


class PkiError(RuntimeError):
    """openssl is missing or failed; the message says what to do."""


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def files(self) -> list[Path]:
        return [
            self.ca_cert, self.ca_key, self.server_cert, self.server_key,
            self.admin_cert, self.admin_key, self.sa_key, self.sa_pub,
        ]


def openssl(*args: str, cwd: Path) -> None:
    """Run the openssl command in ``cwd``; a failure is one PkiError line."""
    exe = shutil.which("openssl")
    if exe is None:
        raise PkiError("the openssl command is missing; install OpenSSL (e.g. apt-get install openssl)")
    result = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PkiError(f"openssl {args[0]} failed: {last}; check the OpenSSL installation")


def new_ec_key(path: Path, cwd: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=cwd)


def _sign(
    pki: Pki, name: str, subject: str, extensions: Sequence[str], days: int
) -> None:
    """Make ``<name>.key`` and a CA-signed ``<name>.crt`` with the given v3 extensions."""
    key = pki.dir / f"{name}.key"
    csr = pki.dir / f"{name}.csr"
    ext = pki.dir / f"{name}.ext"
    new_ec_key(key, pki.dir)
    openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), cwd=pki.dir)
    ext.write_text("[v3]\n" + "\n".join(extensions) + "\n")
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
        "-CAcreateserial", "-days", str(days), "-sha256",
        "-extfile", str(ext), "-extensions", "v3", "-out", str(pki.dir / f"{name}.crt"),
        cwd=pki.dir,
    )
    csr.unlink()
    ext.unlink()


def generate_pki(
    directory: Path,
    *,
    service_ip: str = DEFAULT_SERVICE_IP,
    extra_ips: Sequence[str] = (),
    extra_dns: Sequence[str] = (),
    days: int = 3650,
) -> Pki:
    """Create a fresh CA, API server serving cert, admin client cert and SA key pair in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    # CA: a self-signed cert with our own minimal config so no distro defaults leak in.
    ca_conf = directory / "ca.cnf"
    ca_conf.write_text(
        "[req]\ndistinguished_name = dn\nx509_extensions = v3\nprompt = no\n"
        "[dn]\nCN = netfence-ca\n"
        "[v3]\nbasicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n"
        "subjectKeyIdentifier = hash\n"
    )
    new_ec_key(pki.ca_key, directory)
    openssl(
        "req", "-x509", "-new", "-key", str(pki.ca_key), "-config", str(ca_conf), "-days", str(days),
        "-sha256", "-out", str(pki.ca_cert), cwd=directory,
    )
    ca_conf.unlink()

    ips = ["127.0.0.1", service_ip, *extra_ips]
    dns = [*DEFAULT_DNS_NAMES, *extra_dns]
    san = ", ".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{d}" for d in dns)])
    _sign(
        pki, "apiserver", "/CN=kube-apiserver",
        [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature, keyEncipherment",
            "extendedKeyUsage = serverAuth",
            f"subjectAltName = {san}",
            "authorityKeyIdentifier = keyid",
        ],
        days,
    )
    _sign(
        pki, "admin", f"/O={ADMIN_GROUP}/CN={ADMIN_USER}",
        [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature, keyEncipherment",
            "extendedKeyUsage = clientAuth",
            "authorityKeyIdentifier = keyid",
        ],
        days,
    )
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki.sa_key),
             cwd=directory)
    openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub), cwd=directory)
    for path in pki.files():
        if path.name.endswith(".key"):
            path.chmod(0o600)
    log.debug("PKI generated in %s", directory)
    return pki
