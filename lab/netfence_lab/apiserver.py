"""A real kube-apiserver on loopback: client-cert auth, RBAC, a static token file."""

from __future__ import annotations

import base64
import logging
import secrets
import signal
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from netfence_lab.pki import Pki, generate_pki
from netfence_lab.process import ManagedProcess, free_port

log = logging.getLogger(__name__)

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
UNPRIVILEGED_USER = "netfence-unprivileged"
UNPRIVILEGED_GROUP = "netfence:unprivileged"


@dataclass(frozen=True)
class StaticToken:
    token: str
    user: str
    uid: str
    groups: tuple[str, ...] = ()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


class KubeApiServer:
    """kube-apiserver bound to 127.0.0.1 on a free (or given) secure port.

    ``workdir`` receives the PKI (``pki/``), the token file, the log and two
    kubeconfigs: ``admin.kubeconfig`` (cert of netfence-admin in
    system:masters) and ``unprivileged.kubeconfig`` (bearer token of a user
    with no RBAC grants). Credentials are embedded, so the files can be copied.

    Admission: the ServiceAccount plugin is disabled (no token controller or
    service-account controller runs, and it would refuse every Pod because the
    ``default`` ServiceAccount never appears). The endpoint reconciler is off
    (the ``kubernetes`` Endpoints object may not point at a loopback address).
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        etcd_url: str,
        *,
        port: int | None = None,
        pki: Pki | None = None,
        name: str = "kube-apiserver",
        etcd_prefix: str = "/registry",
        address: str = "127.0.0.1",
        node_mode: bool = False,
    ):
        self.binary = binary
        # ``address``: bind and advertise address (127.0.0.1 unless a node network
        # needs to reach the server, see testbed/node.py). ``node_mode``: real
        # kubelets and pods use this server: the ServiceAccount admission plugin
        # and the lease endpoint reconciler are on, and the server reaches the
        # kubelets with the admin client certificate.
        self.address = address
        self.node_mode = node_mode
        self.workdir = workdir
        self.etcd_url = etcd_url
        self.port = port or free_port()
        self.name = name
        self._pki = pki
        self.etcd_prefix = etcd_prefix
        self.unprivileged = StaticToken(
            token=secrets.token_hex(16), user=UNPRIVILEGED_USER, uid="netfence-unprivileged-uid",
            groups=(UNPRIVILEGED_GROUP,),
        )
        self.process: ManagedProcess | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def pki(self) -> Pki:
        return self._pki or Pki(self.workdir / "pki")

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def token_file(self) -> Path:
        return self.workdir / "tokens.csv"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def unprivileged_kubeconfig(self) -> Path:
        return self.workdir / "unprivileged.kubeconfig"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # -- files ---------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        pki = self.pki
        return [
            str(self.binary),
            f"--etcd-servers={self.etcd_url}",
            f"--etcd-prefix={self.etcd_prefix}",
            f"--secure-port={self.port}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--tls-cert-file={pki.server_cert}",
            f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={self.token_file}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            *self._mode_args(),
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={self.workdir / 'cert-dir'}",
            "--v=0",
        ]

    def _mode_args(self) -> list[str]:
        if not self.node_mode:
            return ["--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none"]
        pki = self.pki
        return [
            "--endpoint-reconciler-type=lease",
            # the node's name resolves nowhere: dial the kubelet at its InternalIP
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
        ]

    def write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._pki is None and not all(p.exists() for p in self.pki.files()):
            extra = [self.address] if self.address != "127.0.0.1" else []
            generate_pki(self.pki.dir, extra_ips=extra)
        t = self.unprivileged
        self.token_file.write_text(f'{t.token},{t.user},{t.uid},"{",".join(t.groups)}"\n')
        self.token_file.chmod(0o600)
        pki = self.pki
        self._write_kubeconfig(
            self.kubeconfig, "netfence-admin",
            {"client-certificate-data": _b64(pki.admin_cert), "client-key-data": _b64(pki.admin_key)},
        )
        self._write_kubeconfig(self.unprivileged_kubeconfig, t.user, {"token": t.token})

    def _write_kubeconfig(self, path: Path, user: str, creds: dict[str, str]) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "netfence",
                "cluster": {"server": self.url, "certificate-authority-data": _b64(self.pki.ca_cert)},
            }],
            "users": [{"name": user, "user": creds}],
            "contexts": [{"name": "netfence", "context": {"cluster": "netfence", "user": user}}],
            "current-context": "netfence",
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    # -- lifecycle -----------------------------------------------------------------------------
    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if client_cert:
            ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return ctx

    def ready(self) -> bool:
        """GET /readyz as the admin answers 200."""
        with urllib.request.urlopen(f"{self.url}/readyz", context=self.ssl_context(), timeout=2) as resp:
            return bool(resp.status == 200)

    def start(self, timeout: float = 90.0) -> KubeApiServer:
        self.write_files()
        self.process = ManagedProcess(self.name, self.argv(), self.log_path)
        self.process.start()
        self.process.wait_until(self.ready, timeout, "ready (/readyz)")
        log.info("kube-apiserver ready at %s", self.url)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=10.0)

    def kill(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> None:
        """Outage tests: send ``sig`` and wait until the server has exited (SIGKILL after
        ``timeout``); :meth:`restart` brings it back."""
        proc = self.process.proc if self.process is not None else None
        if self.process is None or proc is None:
            raise RuntimeError("kube-apiserver was never started")
        self.process.signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("kube-apiserver did not exit within %.0fs of signal %d; killing it", timeout, sig)
            self.process.signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, timeout: float = 90.0) -> None:
        """Start a stopped server again with the same arguments (port, PKI, tokens, etcd) and
        wait until /readyz answers."""
        if self.process is None:
            raise RuntimeError("kube-apiserver was never started")
        if self.process.alive():
            raise RuntimeError("kube-apiserver is still running; kill() it first")
        self.process.start()
        self.process.wait_until(self.ready, timeout, "ready (/readyz)")
        log.info("kube-apiserver ready again at %s", self.url)

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
