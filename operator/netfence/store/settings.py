"""How to reach etcd: the one settings type of the store, validated when it is made.

Pure (no I/O): ``netfence.config`` builds it from flags and environment (and
checks that TLS files exist, which is I/O); ``netfence.store.etcd`` and
``netfence.store.connection`` use it as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from netfence.store.layout import DEFAULT_PREFIX

MAX_OPS_PER_TXN = 120
ETCD_MAX_TXN_OPS = 128
PROTOCOL_OPS = 2  # the pending marker (first txn) / pending delete + commit put (last txn)

PathLike = str | os.PathLike[str]


class ConfigError(ValueError):
    """A setting is missing or invalid; the message (one line) names it."""


def split_endpoint(raw: str) -> tuple[str, str]:
    """``(host, port)`` of ``host:port``, ``http(s)://host:port[/]`` or ``[v6]:port`` (unchecked)."""
    url = raw.strip()
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    host, _, port = url.rstrip("/").rpartition(":")
    return host, port


@dataclass(frozen=True)
class EtcdSettings:
    """Where etcd is and how the store talks to it. Raises ConfigError when invalid.

    ``endpoints`` may be given as any sequence; it is kept as a tuple.
    ``rebuild_after``: when every call has failed for this long (at least three
    failures), the gRPC channel is replaced by a new one (host names resolved
    again); see ``netfence.store.connection``.
    ``cert_reload_interval``: how often the TLS files are re-read (also after
    every failed call); changed valid contents replace the channel's
    credentials without a restart (``netfence.store.credentials``).
    """

    endpoints: Sequence[str] = ("127.0.0.1:2379",)
    prefix: str = DEFAULT_PREFIX
    ca_file: PathLike | None = None
    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    tls_server_name: str | None = None
    timeout: float = 5.0
    max_ops_per_txn: int = MAX_OPS_PER_TXN
    page_size: int = 1000
    watch_probe_interval: float = 5.0
    watch_retry_timeout: float = 30.0
    rebuild_after: float = 10.0
    cert_reload_interval: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            raise ConfigError("etcd endpoints: expected a list of host:port, got one string")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        for problem in self.problems():
            raise ConfigError(problem)

    def problems(self) -> list[str]:
        """Every reason these settings are invalid (empty when they are valid)."""
        out: list[str] = []
        if not self.endpoints:
            out.append("etcd endpoints: at least one host:port is required")
        for ep in self.endpoints:
            host, port = split_endpoint(ep)
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                out.append(f"etcd endpoint {ep!r}: expected host:port")
        if not (self.prefix.startswith("/") and self.prefix.endswith("/")):
            out.append(f"etcd prefix {self.prefix!r}: must start and end with '/'")
        if (self.cert_file is None) != (self.key_file is None):
            out.append("etcd client certificate and key must be given together")
        if self.cert_file is not None and self.ca_file is None:
            out.append("etcd client certificate given without a CA file (TLS needs the CA)")
        if not 1 <= self.max_ops_per_txn <= ETCD_MAX_TXN_OPS - PROTOCOL_OPS:
            out.append(f"max operations per transaction must be in 1..{ETCD_MAX_TXN_OPS - PROTOCOL_OPS}")
        for name in ("timeout", "watch_probe_interval", "watch_retry_timeout", "rebuild_after",
                     "cert_reload_interval"):
            if not getattr(self, name) > 0:
                out.append(f"etcd {name.replace('_', ' ')} must be positive")
        if self.page_size < 1:
            out.append("etcd page size must be at least 1")
        return out
