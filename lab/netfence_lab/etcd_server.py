"""A real etcd server on loopback, for tests, the demo and the local cluster."""

from __future__ import annotations

import logging
import shutil
import urllib.request
from pathlib import Path

from netfence_lab.process import ManagedProcess, free_port

log = logging.getLogger(__name__)


class EtcdServer:
    """One etcd member listening on 127.0.0.1 with free ports.

    Use as a context manager or call ``start()``/``stop()``. ``endpoint`` is
    ``127.0.0.1:PORT`` (what etcd3aio wants), ``url`` the http URL.
    """

    def __init__(self, binary: Path, data_dir: Path, name: str = "etcd", client_port: int | None = None):
        self.binary = binary
        self.data_dir = data_dir
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.metrics_port = free_port()
        self.process = ManagedProcess(
            name,
            [
                str(binary),
                "--name", name,
                "--data-dir", str(data_dir / "data"),
                "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"{name}=http://127.0.0.1:{self.peer_port}",
                "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}",
                "--log-level", "warn",
                "--quota-backend-bytes", str(2 * 1024**3),
            ],
            data_dir / f"{name}.log",
        )

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/health", timeout=1) as resp:
            return bool(resp.status == 200)

    def start(self, timeout: float = 30.0) -> EtcdServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        self.process.wait_until(self.healthy, timeout, "healthy")
        log.info("etcd %s ready at %s", self.name, self.endpoint)
        return self

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL, for outage tests; ``restart()`` brings it back with its data."""
        import signal

        self.process.signal(signal.SIGKILL)
        if self.process.proc is not None:
            self.process.proc.wait(timeout=10)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.process.start()
        self.process.wait_until(self.healthy, timeout, "healthy")

    def wipe(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir / "data", ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
