"""``netfence-controller``: the Kopf operator that compiles NetworkPolicy into etcd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from netfence.config import (
    ConfigError,
    ControllerConfig,
    add_etcd_arguments,
    add_logging_arguments,
    env_default,
    etcd_from_args,
)
from netfence.logs import configure_logging

log = logging.getLogger(__name__)


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ControllerConfig:
    parser = argparse.ArgumentParser(
        prog="netfence-controller",
        description="Compile NetworkPolicy, Pods and Namespaces into Netfence's enforcement model in etcd.",
    )
    parser.add_argument("--kubeconfig", default=env_default("KUBECONFIG", None, env),
                        help="kubeconfig file; default: in-cluster config, then ~/.kube/config")
    parser.add_argument("--identity", default=env_default("IDENTITY", None, env),
                        help="this replica's name in the leader election (default: host name)")
    parser.add_argument("--lease-ttl", type=int, default=int(env_default("LEASE_TTL", "5", env) or 5))
    parser.add_argument("--coalesce-ms", type=float, default=float(env_default("COALESCE_MS", "20", env) or 20))
    parser.add_argument("--status-interval-ms", type=float,
                        default=float(env_default("STATUS_INTERVAL_MS", "200", env) or 200))
    parser.add_argument("--reconcile-seconds", type=float,
                        default=float(env_default("RECONCILE_SECONDS", "60", env) or 60),
                        help="period of the full etcd reconcile that repairs changed or corrupt values")
    parser.add_argument("--health-port", type=int, default=int(env_default("HEALTH_PORT", "8080", env) or 8080))
    parser.add_argument(
        "--target-schema", type=int, default=int(env_default("TARGET_SCHEMA", "1", env) or 1),
        help="etcd layout schema to migrate to once every live agent reads it (1: never migrate; "
        "2: chunked peer sets, see docs/design.md)",
    )
    add_etcd_arguments(parser, env)
    add_logging_arguments(parser, env)
    args = parser.parse_args(argv)
    defaults = ControllerConfig()
    config = ControllerConfig(
        etcd=etcd_from_args(args),
        identity=args.identity or defaults.identity,
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        lease_ttl=args.lease_ttl,
        coalesce_seconds=args.coalesce_ms / 1000,
        status_interval=args.status_interval_ms / 1000,
        health_port=args.health_port,
        reconcile_seconds=args.reconcile_seconds,
        target_schema=args.target_schema,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    config.validate()
    return config


async def run(config: ControllerConfig) -> None:
    import kopf

    from netfence.controller.handlers import build_registry

    await kopf.operator(
        registry=build_registry(config),
        standalone=True,  # leadership is decided in etcd, not by Kopf peering
        clusterwide=True,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"netfence-controller: {exc}\n")
        return 2
    configure_logging(config.log_level, config.log_format)
    if config.kubeconfig is not None:
        # Kopf's login reads KUBECONFIG through kubernetes_asyncio, which takes it at import time.
        os.environ["KUBECONFIG"] = str(config.kubeconfig)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
