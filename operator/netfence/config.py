"""Typed configuration of the programs, parsed and validated here, once, at start-up.

Every setting comes from a command-line flag or, failing that, an environment
variable ``NETFENCE_<NAME>``; the defaults suit a cluster install. Each program
has one configuration type (:class:`ControllerConfig`, :class:`AgentConfig`)
whose ``etcd`` is the store's own settings type
(:class:`netfence.store.settings.EtcdSettings`), handed to the store as it is.
Invalid input raises :class:`ConfigError` with one line naming the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

from netfence.dataplane.render import Features
from netfence.store.settings import ConfigError, EtcdSettings

__all__ = [
    "KNOWN_SCHEMAS",
    "AgentConfig",
    "ConfigError",
    "ControllerConfig",
    "EtcdSettings",
    "agent_parser",
    "controller_parser",
    "load_agent_config",
    "load_controller_config",
]

KNOWN_SCHEMAS = (1, 2)  # etcd layout schemas (netfence.store.migration.SCHEMAS)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


def _check_port(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{what} {port}: expected a port number (1-65535)")


def _check_metrics(port: int, health_port: int) -> None:
    if not 0 <= port < 65536:
        raise ConfigError(f"metrics port {port}: expected a port number (1-65535), or 0 for no metrics")
    if port and port == health_port:
        raise ConfigError(f"metrics port {port}: must differ from the health port")


def _check_logging(level: str, fmt: str) -> None:
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True)
class ControllerConfig:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    identity: str = field(default_factory=socket.gethostname)
    kubeconfig: Path | None = None
    lease_ttl: int = 5
    coalesce_seconds: float = 0.02
    status_interval: float = 0.2  # a status other than Enforced is written once it held this long
    status_settle: float = 0.02  # wait after a wake-up for the rest of a burst of reports
    status_concurrency: int = 16  # ClusterPolicyStatus objects written at once
    baseline_status: bool = False  # benchmarks only: every node report re-evaluates every policy (pre-issue 11)
    reconcile_seconds: float = 60.0
    health_port: int = 8080
    metrics_port: int = 0  # Prometheus /metrics (docs/metrics.md); 0: not served
    metrics_host: str = ""  # empty: every address (IPv4 and IPv6)
    log_level: str = "INFO"
    log_format: str = "text"
    target_schema: int = 1  # etcd layout schema to migrate to once every agent reads it

    def __post_init__(self) -> None:
        if not self.identity:
            raise ConfigError("identity must not be empty")
        if self.target_schema not in KNOWN_SCHEMAS:
            raise ConfigError(f"target schema {self.target_schema}: known schemas are {list(KNOWN_SCHEMAS)}")
        if self.lease_ttl < 2:
            raise ConfigError(f"lease TTL {self.lease_ttl}: must be at least 2 seconds")
        if self.coalesce_seconds < 0:
            raise ConfigError("coalesce window must not be negative")
        if self.status_interval <= 0:
            raise ConfigError("status interval must be positive")
        if not 0 <= self.status_settle <= self.status_interval:
            raise ConfigError("status settle window must be between 0 and the status interval")
        if not 1 <= self.status_concurrency <= 1024:
            raise ConfigError(f"status concurrency {self.status_concurrency}: expected 1-1024")
        if self.reconcile_seconds <= 0:
            raise ConfigError("reconcile period must be positive")
        _check_port(self.health_port, "health port")
        _check_metrics(self.metrics_port, self.health_port)
        _check_logging(self.log_level, self.log_format)


WATCH_SCOPES = ("node", "prefix")


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
    metrics_port: int = 0  # Prometheus /metrics (docs/metrics.md); 0: not served
    metrics_host: str = ""  # empty: every address (IPv4 and IPv6)
    log_level: str = "INFO"
    log_format: str = "text"
    max_schema: int = 2  # newest etcd layout schema this agent reads (1 behaves like agents before schema 2)
    disable_features: tuple[str, ...] = ()  # kernel feature ids (dataplane/render.py) to treat as missing
    # "node": watch only what this node needs, skip commits not relevant to it (issue 11);
    # "prefix": benchmarks and upgrade tests only: behave as agents before (whole prefix, every commit).
    watch_scope: str = "node"
    #: benchmarks only (bench/agent_bench.py): the per-commit path before incremental rendering
    #: (render the whole model and diff it all; a full sync rewrites every chain and set)
    bench_full_render: bool = False
    #: this node's pod CIDRs: a pod there is denied until the model knows it (Features.workload_cidrs)
    pod_cidrs: tuple[str, ...] = ()
    #: ``--pod-cidrs=auto``: take them from the controller's ``nodes/<node>`` (the Node's spec.podCIDRs)
    pod_cidrs_auto: bool = False

    def __post_init__(self) -> None:
        if self.pod_cidrs_auto and self.pod_cidrs:
            raise ConfigError("pod CIDRs: 'auto' cannot be combined with explicit CIDRs")
        for cidr in self.pod_cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise ConfigError(f"pod CIDR {cidr!r}: {exc}") from None
        if self.watch_scope not in WATCH_SCOPES:
            raise ConfigError(f"watch scope {self.watch_scope!r}: one of {', '.join(WATCH_SCOPES)}")
        if not self.node:
            raise ConfigError("node name is required (--node or NETFENCE_NODE)")
        if self.max_schema not in KNOWN_SCHEMAS:
            raise ConfigError(f"max schema {self.max_schema}: known schemas are {list(KNOWN_SCHEMAS)}")
        if self.resync_seconds <= 0:
            raise ConfigError("resync period must be positive")
        if self.report_ttl < 2:
            raise ConfigError(f"report TTL {self.report_ttl}: must be at least 2 seconds")
        _check_port(self.health_port, "health port")
        _check_metrics(self.metrics_port, self.health_port)
        _check_logging(self.log_level, self.log_format)
        try:
            Features().without(self.disable_features)
        except ValueError as exc:
            raise ConfigError(f"disabled features: {exc}") from None


# --- parsing -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class _Options:
    """Declares flags whose default is the environment variable ``NETFENCE_<NAME>``."""

    def __init__(self, parser: argparse.ArgumentParser, env: Mapping[str, str] | None) -> None:
        self.parser = parser
        self.env = os.environ if env is None else env

    def add(self, flag: str, env_name: str, default: str | None, text: str) -> None:
        value = self.env.get(f"NETFENCE_{env_name}") or default  # an empty variable counts as unset
        self.parser.add_argument(flag, default=value, help=f"{text} (env NETFENCE_{env_name})")


N = TypeVar("N", int, float)


def _number(args: argparse.Namespace, flag: str, kind: Callable[[str], N]) -> N:
    raw = getattr(args, flag.lstrip("-").replace("-", "_"))
    try:
        return kind(str(raw).strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(f"{flag}: expected {noun}, got {raw!r}") from None


def _boolean(args: argparse.Namespace, flag: str) -> bool:
    raw = str(getattr(args, flag.lstrip("-").replace("-", "_"))).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{flag}: expected true or false, got {raw!r}")


def _add_etcd(options: _Options) -> None:
    options.add("--etcd-endpoints", "ETCD_ENDPOINTS", "127.0.0.1:2379", "comma-separated host:port list")
    options.add("--etcd-prefix", "ETCD_PREFIX", "/netfence/v1/", "key prefix of Netfence's data")
    options.add("--etcd-ca", "ETCD_CA", None, "CA certificate of etcd's server certificate (enables TLS)")
    options.add("--etcd-cert", "ETCD_CERT", None, "client certificate")
    options.add("--etcd-key", "ETCD_KEY", None, "client certificate's key")
    options.add("--etcd-cert-reload-seconds", "ETCD_CERT_RELOAD_SECONDS", "30",
                "period of re-reading the TLS files (renewed ones are used without a restart)")


def _add_metrics(options: _Options) -> None:
    options.add("--metrics-port", "METRICS_PORT", "0",
                "port of Prometheus /metrics (docs/metrics.md); 0: no metrics server")
    options.add("--metrics-host", "METRICS_HOST", "", "address of /metrics (default: every address)")


def _add_logging(options: _Options) -> None:
    options.add("--log-level", "LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    options.add("--log-format", "LOG_FORMAT", "text", "text or json")


def _etcd(args: argparse.Namespace) -> EtcdSettings:
    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    settings = EtcdSettings(
        endpoints=tuple(e.strip() for e in str(args.etcd_endpoints).split(",") if e.strip()),
        prefix=args.etcd_prefix,
        ca_file=path(args.etcd_ca),
        cert_file=path(args.etcd_cert),
        key_file=path(args.etcd_key),
        cert_reload_interval=_number(args, "--etcd-cert-reload-seconds", float),
    )
    for flag, file in (("--etcd-ca", settings.ca_file), ("--etcd-cert", settings.cert_file),
                       ("--etcd-key", settings.key_file)):
        if file is not None and not Path(file).is_file():
            raise ConfigError(f"{flag} {file}: no such file")
    return settings


def controller_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The controller's flags; defaults from ``env`` (default: os.environ)."""
    parser = _Parser(
        prog="netfence-controller",
        description="Compile NetworkPolicy, Pods and Namespaces into Netfence's enforcement model in etcd.",
    )
    opt = _Options(parser, env)
    opt.add("--kubeconfig", "KUBECONFIG", None, "kubeconfig file; default: in-cluster config, then ~/.kube/config")
    opt.add("--identity", "IDENTITY", None, "this replica's name in the leader election (default: host name)")
    opt.add("--lease-ttl", "LEASE_TTL", "5", "TTL in seconds of the leader lease")
    opt.add("--coalesce-ms", "COALESCE_MS", "20",
            "at most one etcd write per window: an isolated change is written at once; changes "
            "during or right after a write wait for the window and are written together")
    opt.add("--status-interval-ms", "STATUS_INTERVAL_MS", "200",
            "a ClusterPolicyStatus that is not Enforced (a change still spreading, progress) is written once "
            "it held this long, so at most once per interval; Enforced is written at once")
    opt.add("--status-settle-ms", "STATUS_SETTLE_MS", "20",
            "after node reports arrive, wait this long for the rest of the burst before a status pass")
    opt.add("--status-concurrency", "STATUS_CONCURRENCY", "16",
            "ClusterPolicyStatus objects created or patched at once (each object still on its own)")
    opt.add("--baseline-status", "BASELINE_STATUS", "false",
            "benchmarks only: re-evaluate every policy's status on every node report change, "
            "as before the per-node sync index (true/false)")
    opt.add("--reconcile-seconds", "RECONCILE_SECONDS", "60",
            "period of the full etcd reconcile that repairs changed or corrupt values")
    opt.add("--health-port", "HEALTH_PORT", "8080", "port of /healthz")
    opt.add("--target-schema", "TARGET_SCHEMA", "1",
            "etcd layout schema to migrate to once every live agent reads it (1: never migrate; "
            "2: chunked peer sets, see docs/design.md)")
    _add_metrics(opt)
    _add_etcd(opt)
    _add_logging(opt)
    return parser


def load_controller_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ControllerConfig:
    """The controller's configuration from ``argv`` (default: sys.argv) and ``env`` (default: os.environ)."""
    args = controller_parser(env).parse_args(argv)
    return ControllerConfig(
        etcd=_etcd(args),
        identity=args.identity or socket.gethostname(),
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        lease_ttl=_number(args, "--lease-ttl", int),
        coalesce_seconds=_number(args, "--coalesce-ms", float) / 1000,
        status_interval=_number(args, "--status-interval-ms", float) / 1000,
        status_settle=_number(args, "--status-settle-ms", float) / 1000,
        status_concurrency=_number(args, "--status-concurrency", int),
        baseline_status=_boolean(args, "--baseline-status"),
        reconcile_seconds=_number(args, "--reconcile-seconds", float),
        health_port=_number(args, "--health-port", int),
        metrics_port=_number(args, "--metrics-port", int),
        metrics_host=args.metrics_host or "",
        target_schema=_number(args, "--target-schema", int),
        log_level=str(args.log_level).upper(),
        log_format=args.log_format,
    )


def agent_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The agent's flags; defaults from ``env`` (default: os.environ)."""
    parser = _Parser(
        prog="netfence-agent", description="Program this node's netfilter from Netfence's etcd model."
    )
    opt = _Options(parser, env)
    opt.add("--node", "NODE", None, "this node's name")
    opt.add("--netns", "NETNS", None, "program the netfilter of this network namespace (test beds); "
            "default: the host's")
    parser.add_argument("--no-ipv6", action="store_true", help="do not program ip6tables")
    opt.add("--resync-seconds", "RESYNC_SECONDS", "60", "period of the drift check")
    opt.add("--report-ttl", "REPORT_TTL", "10", "TTL in seconds of the node report's lease")
    opt.add("--health-port", "HEALTH_PORT", "9099", "port of /healthz and /readyz")
    opt.add("--health-host", "HEALTH_HOST", "127.0.0.1", "address of /healthz and /readyz")
    opt.add("--max-schema", "MAX_SCHEMA", "2",
            "newest etcd layout schema to read and report in schemaSupported (1: as agents before schema 2)")
    opt.add("--disable-features", "DISABLE_FEATURES", "",
            "comma-separated kernel feature ids to treat as missing (e.g. sctp-port-match)")
    opt.add("--watch-scope", "WATCH_SCOPE", "node",
            "benchmarks and upgrade tests only: 'prefix' behaves as agents before issue 11 (watch the "
            "whole etcd prefix, apply and report every commit); default 'node'")
    parser.add_argument("--bench-full-render", action="store_true", help=argparse.SUPPRESS)
    opt.add("--pod-cidrs", "POD_CIDRS", "",
            "comma-separated pod CIDRs of this node: their addresses that are no known pod are dropped "
            "both ways (a new pod is denied until its rules exist); 'auto': the Node's spec.podCIDRs as "
            "the controller publishes them; default: none")
    _add_metrics(opt)
    _add_etcd(opt)
    _add_logging(opt)
    return parser


def load_agent_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """The agent's configuration from ``argv`` (default: sys.argv) and ``env`` (default: os.environ)."""
    args = agent_parser(env).parse_args(argv)
    pod_cidrs, auto = _pod_cidrs(str(args.pod_cidrs or ""))
    return AgentConfig(
        node=args.node or "",
        etcd=_etcd(args),
        netns=args.netns or None,
        ipv6=not args.no_ipv6,
        resync_seconds=_number(args, "--resync-seconds", float),
        report_ttl=_number(args, "--report-ttl", int),
        health_port=_number(args, "--health-port", int),
        health_host=args.health_host,
        metrics_port=_number(args, "--metrics-port", int),
        metrics_host=args.metrics_host or "",
        log_level=str(args.log_level).upper(),
        log_format=args.log_format,
        max_schema=_number(args, "--max-schema", int),
        disable_features=tuple(f.strip() for f in str(args.disable_features or "").split(",") if f.strip()),
        watch_scope=str(args.watch_scope),
        bench_full_render=bool(args.bench_full_render),
        pod_cidrs=pod_cidrs,
        pod_cidrs_auto=auto,
    )


def _pod_cidrs(raw: str) -> tuple[tuple[str, ...], bool]:
    """``--pod-cidrs``: (CIDRs, auto): ``auto`` (any case), or comma-separated CIDRs (empty: none)."""
    cidrs = tuple(c.strip() for c in raw.split(",") if c.strip())
    if any(c.lower() == "auto" for c in cidrs):
        if len(cidrs) > 1:
            raise ConfigError(f"--pod-cidrs {raw!r}: 'auto' cannot be combined with explicit CIDRs")
        return (), True
    return cidrs, False
