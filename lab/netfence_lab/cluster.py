"""A local Kubernetes control plane for tests, the demo and ``netfence cluster up``.

``LocalCluster`` runs three real processes on 127.0.0.1, each on free ports:

* ``api-etcd``       -- the etcd behind kube-apiserver,
* ``kube-apiserver`` -- client-cert auth, RBAC, a static token for an
  unprivileged user, the Netfence CRDs applied and Established,
* ``netfence-etcd``  -- a SEPARATE etcd that holds Netfence's own data.

Why a separate etcd for Netfence: the controller writes the compiled model
(policies, peer sets, endpoints per node) and every agent holds a watch on it
and reports through leased keys. That write and watch load, its compaction
schedule, its quota and its backups are then independent of the API server's
etcd: a burst of pod churn compiled into thousands of set updates cannot slow
down or fill the etcd that Kubernetes itself depends on, Netfence can be
compacted aggressively (agents only need recent revisions) without touching
the API server's history, and the API server's etcd never has to be exposed
to the agents on every node. It is also what the Calico/etcd model this
design follows does. The price is one more small process.

State: ``<workdir>/state.json`` records pids (with their start times, so a
reused pid is never signalled), ports and paths. ``stop_recorded()`` stops a
cluster from another process (``netfence cluster down``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from netfence_lab.apiserver import KubeApiServer
from netfence_lab.etcd_server import EtcdServer
from netfence_lab.process import ManagedProcess, StartupError, port_in_use
from netfence_lab.tools import Tools, cache_dir

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
# Things LocalCluster creates in its workdir; a fresh start removes exactly these.
_OWNED = (
    STATE_FILE, "pki", "cert-dir", "api-etcd", "netfence-etcd", "kube-cache", "tokens.csv",
    "admin.kubeconfig", "unprivileged.kubeconfig", "kube-apiserver.log",
)
_PORT_ATTEMPTS = 3
_ADDR_IN_USE = re.compile(r"listen tcp ([0-9.:\[\]a-f]+): bind: address already in use")


class ClusterError(RuntimeError):
    """The cluster could not be started or stopped; one line: what is wrong; what to do."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; the message includes its stderr."""

    def __str__(self) -> str:
        argv = [str(a) for a in self.cmd] if isinstance(self.cmd, list) else [str(self.cmd)]
        args = " ".join(a for a in argv[1:] if not a.startswith("--kubeconfig="))
        return f"kubectl {args} exited {self.returncode}: {(self.stderr or '').strip()}"


def packaged_crd_dir() -> Path:
    """The CRDs shipped as package data (``netfence/crds/*.yaml``)."""
    return Path(str(importlib.resources.files("netfence") / "crds"))


def cluster_network_policy_crd() -> Path | None:
    """The ClusterNetworkPolicy CRD of the pinned network-policy-api module, as hack/build-tools.sh
    (hack/fetch-cnp-crd.sh) put it in the tool cache; None when it was never fetched."""
    path = cache_dir() / "crds" / "clusternetworkpolicies.yaml"
    return path if path.is_file() else None


def crd_names(crd_dir: Path) -> list[tuple[str, str]]:
    """(``<plural>.<group>``, a short name or the plural) for every CRD under ``crd_dir``."""
    names = []
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                short = (spec["names"].get("shortNames") or [spec["names"]["plural"]])[0]
                names.append((f"{spec['names']['plural']}.{spec['group']}", short))
    return names


# -- processes recorded in the state file ------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_time: int
    log: str
    ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start_time

    def signal(self, sig: int) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # started with start_new_session: the pid leads its own process group
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)


@dataclass
class ClusterState:
    workdir: str
    kubeconfig: str
    unprivileged_kubeconfig: str
    api_url: str
    netfence_etcd: str
    api_etcd: str
    processes: list[ProcessRecord]
    owner_pid: int
    started_at: float
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        raw: dict[str, Any] = json.loads(text)
        procs = [ProcessRecord(**p) for p in raw.pop("processes", [])]
        known = set(cls.__dataclass_fields__)
        return cls(processes=procs, **{k: v for k, v in raw.items() if k in known})

    def running(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.alive()]


def read_state(workdir: Path) -> ClusterState | None:
    path = workdir / STATE_FILE
    try:
        return ClusterState.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        raise ClusterError(
            f"the state file {path} is unreadable ({exc}); stop the processes by hand and delete it"
        ) from exc


def stop_recorded(state: ClusterState, grace: float = 10.0) -> list[str]:
    """Stop every recorded process that still runs (last started first); return their names."""
    stopped = []
    for rec in reversed(state.processes):
        if not rec.alive():
            continue
        rec.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while rec.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if rec.alive():
            rec.signal(signal.SIGKILL)
            deadline = time.monotonic() + 5
            while rec.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if rec.alive():
            raise ClusterError(
                f"{rec.name} (pid {rec.pid}) survived SIGKILL; check it with 'ps -p {rec.pid}'"
            )
        stopped.append(rec.name)
    return stopped


# -- start-up failures -------------------------------------------------------------------------

def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def describe_failure(name: str, log_text: str, log_path: Path) -> tuple[str, bool]:
    """One line for a component that did not start, and whether a port was already in use."""
    m = _ADDR_IN_USE.search(log_text)
    if m:
        return (f"{name} could not listen on {m.group(1)}: the address is already in use; "
                "stop the program using that port or choose another port", True)
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|fatal|failed|invalid", ln, re.IGNORECASE)]
    detail = (errors or lines or ["no output"])[-1]
    if len(detail) > 240:
        detail = detail[:237] + "..."
    return f"{name} did not start ({detail}); see {log_path} for the full log", False


def start_etcd(binary: Path, directory: Path, name: str, client_port: int | None = None) -> EtcdServer:
    """Start an EtcdServer; on a port clash retry with new free ports unless ``client_port`` was given."""
    attempts = 1 if client_port else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        if client_port and port_in_use(client_port):
            raise ClusterError(
                f"port {client_port} on 127.0.0.1 is already in use; choose another port for {name} "
                "or stop the program using it"
            )
        etcd = EtcdServer(binary, directory, name=name, client_port=client_port)
        offset = _size(etcd.process.log_path)
        try:
            return etcd.start()
        except BaseException as exc:
            etcd.stop()
            if not isinstance(exc, StartupError):
                raise
            message, in_use = describe_failure(name, _read_from(etcd.process.log_path, offset),
                                               etcd.process.log_path)
            if in_use and attempt < attempts:
                log.warning("%s: port clash, retrying with new ports", name)
                continue
            raise ClusterError(message) from exc
    raise AssertionError("unreachable")


# -- the cluster -------------------------------------------------------------------------------

class LocalCluster:
    """API server + its etcd + Netfence's etcd, in ``workdir``; see the module docstring.

    Use as a context manager, or ``start()`` / ``stop()``. A failed or
    interrupted ``start()`` stops what it started. Until ``stop()`` or
    ``detach()``, an atexit hook stops the cluster when the interpreter exits.
    """

    def __init__(
        self,
        workdir: Path,
        tools: Tools,
        *,
        api_port: int | None = None,
        crd_dir: Path | None = None,
        api_address: str = "127.0.0.1",
        node_mode: bool = False,
    ):
        self.workdir = workdir.resolve()
        # See KubeApiServer: the API server's address, and real nodes (testbed/node.py).
        self.api_address = api_address
        self.node_mode = node_mode
        self.tools = tools
        self.api_port = api_port
        self.crd_dir = crd_dir or packaged_crd_dir()
        self.api_etcd: EtcdServer | None = None
        self._netfence_etcd: EtcdServer | None = None
        self._apiserver: KubeApiServer | None = None
        self._started_at = 0.0
        self._atexit_registered = False

    # -- accessors -----------------------------------------------------------------------------
    @property
    def apiserver(self) -> KubeApiServer:
        if self._apiserver is None:
            raise ClusterError("the cluster is not started; call start() first")
        return self._apiserver

    @property
    def netfence_etcd(self) -> EtcdServer:
        if self._netfence_etcd is None:
            raise ClusterError("the cluster is not started; call start() first")
        return self._netfence_etcd

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def unprivileged_kubeconfig(self) -> Path:
        return self.workdir / "unprivileged.kubeconfig"

    @property
    def unprivileged_token(self) -> str:
        return self.apiserver.unprivileged.token

    @property
    def unprivileged_user(self) -> str:
        return self.apiserver.unprivileged.user

    @property
    def api_url(self) -> str:
        return self.apiserver.url

    @property
    def state_file(self) -> Path:
        return self.workdir / STATE_FILE

    def _components(self) -> list[tuple[str, ManagedProcess]]:
        out = []
        if self.api_etcd is not None:
            out.append(("api-etcd", self.api_etcd.process))
        if self._apiserver is not None and self._apiserver.process is not None:
            out.append(("kube-apiserver", self._apiserver.process))
        if self._netfence_etcd is not None:
            out.append(("netfence-etcd", self._netfence_etcd.process))
        return out

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._components() if p.pid is not None}

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG (and a private kubectl cache dir)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["KUBECACHEDIR"] = str(self.workdir / "kube-cache")
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin; with ``check`` a non-zero exit raises (stderr in the message)."""
        argv = [str(self.tools.kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> LocalCluster:
        if self.api_port is not None and port_in_use(self.api_port):
            raise ClusterError(
                f"port {self.api_port} on 127.0.0.1 is already in use; choose another with --port "
                "or stop the program using it"
            )
        existing = read_state(self.workdir)
        if existing is not None and existing.running():
            names = ", ".join(f"{p.name} pid {p.pid}" for p in existing.running())
            raise ClusterError(
                f"a cluster is already running in {self.workdir} ({names}); stop it with "
                f"'netfence cluster down --dir {self.workdir}' or use another directory"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in _OWNED:
            path = self.workdir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self._started_at = time.time()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self.api_etcd = start_etcd(self.tools.etcd, self.workdir / "api-etcd", "api-etcd")
            self.write_state()
            self._start_apiserver(timeout)
            self.write_state()
            self._netfence_etcd = start_etcd(self.tools.etcd, self.workdir / "netfence-etcd", "netfence-etcd")
            self.write_state()
            self.apply_crds(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        log.info("local cluster up: %s, netfence etcd %s", self.api_url, self.netfence_etcd.endpoint)
        return self

    def _start_apiserver(self, timeout: float) -> None:
        assert self.api_etcd is not None
        attempts = 1 if self.api_port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self._apiserver = KubeApiServer(
                self.tools.kube_apiserver, self.workdir, self.api_etcd.url, port=self.api_port,
                address=self.api_address, node_mode=self.node_mode,
            )
            offset = _size(self._apiserver.log_path)
            try:
                self._apiserver.start(timeout=timeout)
                return
            except StartupError as exc:
                self._apiserver.stop()
                message, in_use = describe_failure(
                    "kube-apiserver", _read_from(self._apiserver.log_path, offset), self._apiserver.log_path
                )
                if in_use and attempt < attempts:
                    log.warning("kube-apiserver: port clash, retrying with a new port")
                    continue
                if in_use and self.api_port:
                    message = (f"port {self.api_port} on 127.0.0.1 is already in use; choose another "
                               "with --port or stop the program using it")
                raise ClusterError(message) from exc

    def restart_apiserver(self, timeout: float = 90.0) -> None:
        """Start the API server again after ``apiserver.kill()`` (same arguments and port) and
        record its new pid in the state file."""
        self.apiserver.restart(timeout)
        self.write_state()

    def apply_crds(self, timeout: float = 60.0) -> None:
        """kubectl apply the CRDs, wait until Established and until kubectl resolves their short names."""
        if not any(self.crd_dir.glob("*.yaml")):
            return
        cnp_crd = cluster_network_policy_crd() if self.crd_dir == packaged_crd_dir() else None
        if cnp_crd is not None:  # the test bed serves ClusterNetworkPolicy too (issue 16)
            self.kubectl("apply", "-f", str(cnp_crd))
            self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "-f", str(cnp_crd),
                         timeout=timeout + 10)
        self.kubectl("apply", "-f", str(self.crd_dir))
        self.kubectl(
            "wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "-f", str(self.crd_dir),
            timeout=timeout + 10,
        )
        deadline = time.monotonic() + timeout
        for _full, short in crd_names(self.crd_dir):
            while True:
                result = self.kubectl("get", short, check=False)
                if result.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the API server does not serve '{short}' after applying the CRDs "
                        f"({result.stderr.strip()}); see {self.apiserver.log_path}"
                    )
                time.sleep(0.2)

    def state(self) -> ClusterState:
        records = []
        for name, proc in self._components():
            if proc.pid is None:
                continue
            start_time = proc_start_time(proc.pid)
            if start_time is None:
                continue
            if name == "kube-apiserver":
                ports = {"secure": self.apiserver.port}
            else:
                etcd = self.api_etcd if name == "api-etcd" else self._netfence_etcd
                assert etcd is not None
                ports = {"client": etcd.client_port, "peer": etcd.peer_port, "metrics": etcd.metrics_port}
            records.append(ProcessRecord(name, proc.pid, start_time, str(proc.log_path), ports))
        return ClusterState(
            workdir=str(self.workdir),
            kubeconfig=str(self.kubeconfig),
            unprivileged_kubeconfig=str(self.unprivileged_kubeconfig),
            api_url=self._apiserver.url if self._apiserver else "",
            netfence_etcd=self._netfence_etcd.endpoint if self._netfence_etcd else "",
            api_etcd=self.api_etcd.endpoint if self.api_etcd else "",
            processes=records,
            owner_pid=os.getpid(),
            started_at=self._started_at,
        )

    def write_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(self.state().to_json())
        tmp.replace(self.state_file)

    def detach(self) -> None:
        """Leave the processes running after this interpreter exits (``netfence cluster up``)."""
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def stop(self) -> None:
        """Stop the API server first, then both etcds; raise if a process survives."""
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        errors: list[str] = []
        for name, proc in reversed(self._components()):
            try:
                proc.stop(grace=10.0)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        survivors = [f"{name} pid {proc.pid}" for name, proc in self._components()
                     if proc.pid is not None and proc_start_time(proc.pid) is not None]
        if survivors:
            errors.append("still running: " + ", ".join(survivors))
        if errors:
            raise ClusterError(f"stopping the cluster in {self.workdir} failed ({'; '.join(errors)}); "
                               "kill the listed processes by hand")

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- signals -----------------------------------------------------------------------------------

def raise_on_signals(signals: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)) -> Callable[[], None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so context managers and finalizers stop clusters.

    Only replaces default handlers; returns a function that restores them. Main thread only.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in signals:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore

