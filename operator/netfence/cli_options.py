"""Connection flags shared by the ``netfence`` commands that read Netfence's etcd (status, explain).

The same flags and ``NETFENCE_*`` variables as the controller and the agent
(``netfence/config.py``): ``--etcd-endpoints``, ``--etcd-prefix``, and for TLS
``--etcd-ca``, ``--etcd-cert``, ``--etcd-key``. Without endpoints, the commands
use the local test bed (``netfence demo --keep`` or ``netfence cluster up``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from netfence.cli import CliError
from netfence.store.settings import ConfigError, EtcdSettings


def add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--etcd-endpoints", default=env("NETFENCE_ETCD_ENDPOINTS"),
                        help="host:port list (default: $NETFENCE_ETCD_ENDPOINTS, else the local test bed)")
    parser.add_argument("--etcd-prefix", default=env("NETFENCE_ETCD_PREFIX") or "/netfence/v1/",
                        help="key prefix of Netfence's data (default: $NETFENCE_ETCD_PREFIX or /netfence/v1/)")
    parser.add_argument("--etcd-ca", default=env("NETFENCE_ETCD_CA"),
                        help="CA certificate of etcd's server certificate (enables TLS; env NETFENCE_ETCD_CA)")
    parser.add_argument("--etcd-cert", default=env("NETFENCE_ETCD_CERT"),
                        help="client certificate (env NETFENCE_ETCD_CERT)")
    parser.add_argument("--etcd-key", default=env("NETFENCE_ETCD_KEY"),
                        help="client certificate's key (env NETFENCE_ETCD_KEY)")


def split_endpoints(raw: str | None) -> list[str]:
    return [e.strip() for e in (raw or "").split(",") if e.strip()]


def etcd_settings(args: argparse.Namespace, endpoints: list[str]) -> EtcdSettings:
    """Settings from the flags (CliError, one line, when invalid or a TLS file is missing)."""
    files: dict[str, Path | None] = {}
    for flag in ("etcd_ca", "etcd_cert", "etcd_key"):
        value = getattr(args, flag, None)
        path = Path(value) if value else None
        if path is not None and not path.is_file():
            raise CliError(f"--{flag.replace('_', '-')} {path}: no such file; give the right path")
        files[flag] = path
    try:
        return EtcdSettings(endpoints=endpoints, prefix=args.etcd_prefix, ca_file=files["etcd_ca"],
                            cert_file=files["etcd_cert"], key_file=files["etcd_key"])
    except ConfigError as exc:
        raise CliError(f"{exc}; fix --etcd-endpoints, --etcd-prefix or the TLS flags") from None


@dataclass(frozen=True)
class LocalBed:
    """A local test bed that runs: ``netfence demo --keep`` (with nodes) or ``netfence cluster up``."""

    etcd_endpoint: str
    kubeconfig: Path
    node_netns: dict[str, str]
    what: str


LOCAL_BEDS_GROUP = "netfence.local_beds"  # entry points: callables (demo_dir | None) -> list[LocalBed]


def local_beds(demo_dir: Path | None = None) -> list[LocalBed]:
    """The running local test beds, the kept demo first: asked of the installed test bed
    (``lab/``, entry point group ``netfence.local_beds``); none where only the runtime is installed."""
    from importlib.metadata import entry_points

    beds: list[LocalBed] = []
    for entry in sorted(entry_points(group=LOCAL_BEDS_GROUP), key=lambda e: e.name):
        beds.extend(entry.load()(demo_dir))
    return beds
