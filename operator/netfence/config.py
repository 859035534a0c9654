"""Typed configuration of the programs, loaded and validated once at start-up.

Every setting comes from a command-line flag or, failing that, an environment
variable ``NETFENCE_<NAME>``; the defaults suit a cluster install.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_SCHEMAS = (1, 2)  # etcd layout schemas (netfence.store.migration.SCHEMAS)


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/netfence/v1/"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def validate(self) -> None:
        if not self.endpoints:
            raise ConfigError("etcd endpoints: at least one host:port is required")
        for ep in self.endpoints:
            host, _, port = ep.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"etcd endpoint {ep!r}: expected host:port")
        if not (self.prefix.startswith("/") and self.prefix.endswith("/")):
            raise ConfigError(f"etcd prefix {self.prefix!r}: must start and end with '/'")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("etcd client certificate and key must be given together")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"etcd TLS file {path} does not exist")


@dataclass(frozen=True)
class ControllerConfig:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    identity: str = field(default_factory=socket.gethostname)
    kubeconfig: Path | None = None
    lease_ttl: int = 5
    coalesce_seconds: float = 0.02
    status_interval: float = 0.2
    reconcile_seconds: float = 60.0
    health_port: int = 8080
    metrics_port: int = 9090
    log_level: str = "INFO"
    log_format: str = "text"
    namespace: str | None = None  # watch all namespaces when None
    target_schema: int = 1  # etcd layout schema to migrate to once every agent reads it

    def validate(self) -> None:
        self.etcd.validate()
        if self.target_schema not in KNOWN_SCHEMAS:
            raise ConfigError(f"target schema {self.target_schema}: known schemas are {list(KNOWN_SCHEMAS)}")
        if self.lease_ttl < 2:
            raise ConfigError("lease TTL must be at least 2 seconds")
        if self.coalesce_seconds < 0:
            raise ConfigError("coalesce window must not be negative")


@dataclass(frozen=True)
class AgentConfig:
    node: str
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    netns: str | None = None  # program this network namespace instead of the host's
    ipv6: bool = True
    resync_seconds: float = 60.0
    report_ttl: int = 10
    health_port: int = 9099
    health_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "text"
    max_schema: int = 2  # newest etcd layout schema this agent reads (1 behaves like agents before schema 2)

    def validate(self) -> None:
        self.etcd.validate()
        if self.max_schema not in KNOWN_SCHEMAS:
            raise ConfigError(f"max schema {self.max_schema}: known schemas are {list(KNOWN_SCHEMAS)}")
        if not self.node:
            raise ConfigError("node name is required (--node or NETFENCE_NODE)")
        if self.resync_seconds <= 0:
            raise ConfigError("resync period must be positive")
        if self.report_ttl < 2:
            raise ConfigError("report TTL must be at least 2 seconds")


def env_default(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    return (env if env is not None else os.environ).get(f"NETFENCE_{name}", default)


def add_etcd_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    group = parser.add_argument_group("etcd")
    group.add_argument(
        "--etcd-endpoints",
        default=env_default("ETCD_ENDPOINTS", "127.0.0.1:2379", env),
        help="comma-separated host:port list (env NETFENCE_ETCD_ENDPOINTS)",
    )
    group.add_argument("--etcd-prefix", default=env_default("ETCD_PREFIX", "/netfence/v1/", env))
    group.add_argument("--etcd-ca", default=env_default("ETCD_CA", None, env))
    group.add_argument("--etcd-cert", default=env_default("ETCD_CERT", None, env))
    group.add_argument("--etcd-key", default=env_default("ETCD_KEY", None, env))


def add_logging_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    parser.add_argument("--log-level", default=env_default("LOG_LEVEL", "INFO", env))
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=env_default("LOG_FORMAT", "text", env)
    )


def etcd_from_args(args: argparse.Namespace) -> EtcdSettings:
    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return EtcdSettings(
        endpoints=tuple(e.strip() for e in str(args.etcd_endpoints).split(",") if e.strip()),
        prefix=args.etcd_prefix,
        ca_file=path(args.etcd_ca),
        cert_file=path(args.etcd_cert),
        key_file=path(args.etcd_key),
    )


def _number(value: str | None, name: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(value) if value is not None else 0
    except ValueError as exc:
        raise ConfigError(f"{name}: expected a number, got {value!r}") from exc


def load_agent_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser(
        prog="netfence-agent", description="Program this node's netfilter from Netfence's etcd model."
    )
    parser.add_argument("--node", default=env_default("NODE", None, env), help="this node's name (env NETFENCE_NODE)")
    parser.add_argument(
        "--netns",
        default=env_default("NETNS", None, env),
        help="program the netfilter of this network namespace (test beds); default: the host's",
    )
    parser.add_argument("--no-ipv6", action="store_true", help="do not program ip6tables")
    parser.add_argument("--resync-seconds", default=env_default("RESYNC_SECONDS", "60", env))
    parser.add_argument("--report-ttl", default=env_default("REPORT_TTL", "10", env))
    parser.add_argument("--health-port", default=env_default("HEALTH_PORT", "9099", env))
    parser.add_argument("--health-host", default=env_default("HEALTH_HOST", "127.0.0.1", env))
    parser.add_argument(
        "--max-schema",
        default=env_default("MAX_SCHEMA", "2", env),
        help="newest etcd layout schema to read and report in schemaSupported (1: as agents before schema 2)",
    )
    add_etcd_arguments(parser, env)
    add_logging_arguments(parser, env)
    args = parser.parse_args(argv)
    config = AgentConfig(
        node=args.node or "",
        etcd=etcd_from_args(args),
        netns=args.netns or None,
        ipv6=not args.no_ipv6,
        resync_seconds=_number(args.resync_seconds, "resync seconds", float),
        report_ttl=int(_number(args.report_ttl, "report TTL", int)),
        health_port=int(_number(args.health_port, "health port", int)),
        health_host=args.health_host,
        log_level=args.log_level,
        log_format=args.log_format,
        max_schema=int(_number(args.max_schema, "max schema", int)),
    )
    config.validate()
    return config
