"""One typed configuration per program: flags and environment, validated in one place, one error line each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from netfence.agent import main as agent_main
from netfence.config import (
    AgentConfig,
    ConfigError,
    ControllerConfig,
    agent_parser,
    controller_parser,
    load_agent_config,
    load_controller_config,
)
from netfence.controller import main as controller_main
from netfence.store.etcd import EtcdStore
from netfence.store.settings import EtcdSettings

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "helm" / "netfence" / "templates"


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN-----\n")
    return files


# --- defaults, flags, environment ------------------------------------------------------------


def test_controller_defaults() -> None:
    config = load_controller_config([], env={})
    assert config.etcd == EtcdSettings()
    assert config.etcd.endpoints == ("127.0.0.1:2379",) and config.etcd.prefix == "/netfence/v1/"
    assert (config.lease_ttl, config.coalesce_seconds, config.status_interval) == (5, 0.02, 0.2)
    assert (config.reconcile_seconds, config.health_port, config.target_schema) == (60.0, 8080, 1)
    assert (config.log_level, config.log_format, config.kubeconfig) == ("INFO", "text", None)
    assert config.identity


def test_agent_defaults() -> None:
    config = load_agent_config(["--node=n1"], env={})
    assert config == AgentConfig(node="n1")
    assert config.watch_scope == "node"


def test_agent_watch_scope_for_benchmarks_and_upgrade_tests() -> None:
    assert load_agent_config(["--node=n1", "--watch-scope=prefix"], env={}).watch_scope == "prefix"
    assert load_agent_config(["--node=n1"], env={"NETFENCE_WATCH_SCOPE": "prefix"}).watch_scope == "prefix"


def test_agent_pod_cidrs() -> None:
    assert load_agent_config(["--node=n1"], env={}).pod_cidrs == ()
    config = load_agent_config(["--node=n1", "--pod-cidrs=10.244.0.0/24, fd00::/64"], env={})
    assert config.pod_cidrs == ("10.244.0.0/24", "fd00::/64")
    assert load_agent_config(["--node=n1"], env={"NETFENCE_POD_CIDRS": "10.1.0.0/16"}).pod_cidrs == ("10.1.0.0/16",)
    with pytest.raises(ConfigError, match=r"pod CIDR '10\.244\.0\.1/24'"):  # host bits set: one clear line
        load_agent_config(["--node=n1", "--pod-cidrs=10.244.0.1/24"], env={})


def test_agent_pod_cidrs_auto_takes_them_from_the_controller() -> None:
    """``auto``: the node's CIDRs come from ``nodes/<node>`` (the chart sets NETFENCE_POD_CIDRS=auto)."""
    default = load_agent_config(["--node=n1"], env={})
    assert default.pod_cidrs == () and default.pod_cidrs_auto is False  # default: no drops, as before
    for config in (load_agent_config(["--node=n1", "--pod-cidrs=auto"], env={}),
                   load_agent_config(["--node=n1"], env={"NETFENCE_POD_CIDRS": "auto"}),
                   load_agent_config(["--node=n1", "--pod-cidrs= AUTO "], env={})):
        assert config.pod_cidrs_auto is True and config.pod_cidrs == ()
    explicit = load_agent_config(["--node=n1", "--pod-cidrs=10.244.0.0/24"], env={"NETFENCE_POD_CIDRS": "auto"})
    assert explicit.pod_cidrs == ("10.244.0.0/24",) and explicit.pod_cidrs_auto is False  # the flag wins
    with pytest.raises(ConfigError, match="'auto' cannot be combined"):
        load_agent_config(["--node=n1", "--pod-cidrs=auto,10.244.0.0/24"], env={})
    with pytest.raises(ConfigError, match="'auto' cannot be combined"):
        AgentConfig(node="n1", pod_cidrs=("10.244.0.0/24",), pod_cidrs_auto=True)


def test_controller_flags_as_the_test_bed_and_chart_pass_them(tls: dict[str, Path]) -> None:
    config = load_controller_config([
        "--kubeconfig=/k/config", "--identity=controller-0", "--lease-ttl=3", "--health-port=18080",
        "--status-interval-ms=100", "--coalesce-ms=50", "--reconcile-seconds=30", "--target-schema=2",
        "--etcd-endpoints=10.0.0.1:2379, https://etcd.ns.svc:2379", "--etcd-prefix=/netfence/t1/",
        f"--etcd-ca={tls['ca']}", f"--etcd-cert={tls['cert']}", f"--etcd-key={tls['key']}",
        "--log-level=debug", "--log-format=json",
    ], env={})
    assert config.kubeconfig == Path("/k/config") and config.identity == "controller-0"
    assert (config.lease_ttl, config.health_port, config.status_interval) == (3, 18080, 0.1)
    assert (config.coalesce_seconds, config.reconcile_seconds, config.target_schema) == (0.05, 30.0, 2)
    assert config.etcd.endpoints == ("10.0.0.1:2379", "https://etcd.ns.svc:2379")
    assert config.etcd.prefix == "/netfence/t1/"
    assert (config.etcd.ca_file, config.etcd.cert_file, config.etcd.key_file) == (tls["ca"], tls["cert"], tls["key"])
    assert (config.log_level, config.log_format) == ("DEBUG", "json")


def test_agent_flags_as_the_test_bed_and_chart_pass_them() -> None:
    config = load_agent_config([
        "--node=node-1", "--netns=nf-node-1", "--no-ipv6", "--resync-seconds=2", "--report-ttl=4",
        "--health-port=19099", "--health-host=0.0.0.0", "--max-schema=1", "--disable-features=sctp-port-match",
        "--etcd-endpoints=127.0.0.1:23790", "--etcd-prefix=/netfence/t2/", "--log-level=WARNING",
    ], env={})
    assert (config.node, config.netns, config.ipv6) == ("node-1", "nf-node-1", False)
    assert (config.resync_seconds, config.report_ttl, config.max_schema) == (2.0, 4, 1)
    assert (config.health_port, config.health_host) == (19099, "0.0.0.0")
    assert config.disable_features == ("sctp-port-match",)
    assert config.etcd.endpoints == ("127.0.0.1:23790",) and config.etcd.prefix == "/netfence/t2/"


def test_environment_variables_are_the_defaults_of_flags() -> None:
    env = {
        "NETFENCE_NODE": "env-node", "NETFENCE_ETCD_ENDPOINTS": "a:1,b:2", "NETFENCE_ETCD_PREFIX": "/p/",
        "NETFENCE_RESYNC_SECONDS": "7", "NETFENCE_REPORT_TTL": "6", "NETFENCE_HEALTH_PORT": "9100",
        "NETFENCE_HEALTH_HOST": "::1", "NETFENCE_MAX_SCHEMA": "1", "NETFENCE_LOG_LEVEL": "ERROR",
        "NETFENCE_LOG_FORMAT": "json", "NETFENCE_NETNS": "ns1", "NETFENCE_DISABLE_FEATURES": "sctp-port-match",
    }
    config = load_agent_config([], env=env)
    assert (config.node, config.etcd.endpoints, config.etcd.prefix) == ("env-node", ("a:1", "b:2"), "/p/")
    assert (config.resync_seconds, config.report_ttl, config.health_port) == (7.0, 6, 9100)
    assert (config.health_host, config.max_schema, config.netns) == ("::1", 1, "ns1")
    assert (config.log_level, config.log_format) == ("ERROR", "json")
    assert config.disable_features == ("sctp-port-match",)
    # a flag wins over its variable
    assert load_agent_config(["--node=flag-node"], env=env).node == "flag-node"

    controller = load_controller_config([], env={
        "NETFENCE_IDENTITY": "c-1", "NETFENCE_KUBECONFIG": "/kc", "NETFENCE_LEASE_TTL": "9",
        "NETFENCE_COALESCE_MS": "0", "NETFENCE_STATUS_INTERVAL_MS": "500", "NETFENCE_RECONCILE_SECONDS": "15",
        "NETFENCE_HEALTH_PORT": "8081", "NETFENCE_TARGET_SCHEMA": "2",
    })
    assert (controller.identity, controller.kubeconfig, controller.lease_ttl) == ("c-1", Path("/kc"), 9)
    assert (controller.coalesce_seconds, controller.status_interval) == (0.0, 0.5)
    assert (controller.reconcile_seconds, controller.health_port, controller.target_schema) == (15.0, 8081, 2)


def test_an_empty_variable_counts_as_unset() -> None:
    config = load_controller_config([], env={"NETFENCE_LEASE_TTL": "", "NETFENCE_ETCD_ENDPOINTS": ""})
    assert config.lease_ttl == 5 and config.etcd.endpoints == ("127.0.0.1:2379",)


def _chart_flags(template: str) -> set[str]:
    text = (TEMPLATES / template).read_text() + (TEMPLATES / "_helpers.tpl").read_text()
    helpers = re.search(r'define "netfence.etcd.args".*?end -}}', text, re.S)
    assert helpers is not None
    body = (TEMPLATES / template).read_text() + helpers.group(0)
    return set(re.findall(r"^\s*- (--[a-z0-9-]+)", body, re.M))


@pytest.mark.parametrize(("template", "parser"), [
    ("controller-deployment.yaml", controller_parser), ("agent-daemonset.yaml", agent_parser),
])
def test_every_flag_the_chart_passes_is_accepted(template: str, parser: object) -> None:
    flags = _chart_flags(template)
    assert "--etcd-endpoints" in flags and "--log-level" in flags
    known = {s for action in parser({})._actions for s in action.option_strings}  # type: ignore[operator]
    assert flags <= known, flags - known


# --- one store settings type -----------------------------------------------------------


def test_the_store_takes_the_configuration_s_etcd_settings_as_they_are() -> None:
    config = load_agent_config(["--node=n", "--etcd-endpoints=10.1.1.1:2379"], env={})
    assert EtcdStore(config.etcd).config is config.etcd


def test_the_settings_keep_endpoints_as_a_tuple() -> None:
    assert EtcdSettings(endpoints=["a:1", "b:2"]).endpoints == ("a:1", "b:2")


# --- errors: one clear line each --------------------------------------------------------------

CONTROLLER_ERRORS = [
    (["--lease-ttl=abc"], {}, "--lease-ttl: expected an integer, got 'abc'"),
    ([], {"NETFENCE_LEASE_TTL": "x"}, "--lease-ttl: expected an integer, got 'x'"),
    (["--lease-ttl=1"], {}, "lease TTL 1: must be at least 2 seconds"),
    (["--coalesce-ms=-1"], {}, "coalesce window must not be negative"),
    (["--status-interval-ms=0"], {}, "status interval must be positive"),
    (["--reconcile-seconds=0"], {}, "reconcile period must be positive"),
    (["--health-port=70000"], {}, "health port 70000: expected a port number"),
    (["--target-schema=0"], {}, "target schema 0: known schemas are [1, 2]"),
    (["--log-level=loud"], {}, "log level 'LOUD': expected one of"),
    (["--log-format=xml"], {}, "log format 'xml': expected one of text, json"),
    (["--identity="], {"NETFENCE_IDENTITY": ""}, None),  # empty identity falls back to the host name
    (["--metrics-port=70000"], {}, "metrics port 70000: expected a port number (1-65535), or 0 for no metrics"),
    (["--metrics-port=8080"], {}, "metrics port 8080: must differ from the health port"),
    ([], {"NETFENCE_METRICS_PORT": "x"}, "--metrics-port: expected an integer, got 'x'"),
]

AGENT_ERRORS = [
    ([], {}, "node name is required (--node or NETFENCE_NODE)"),
    (["--node=n", "--resync-seconds=soon"], {}, "--resync-seconds: expected a number, got 'soon'"),
    (["--node=n", "--resync-seconds=0"], {}, "resync period must be positive"),
    (["--node=n", "--report-ttl=1"], {}, "report TTL 1: must be at least 2 seconds"),
    (["--node=n", "--max-schema=3"], {}, "max schema 3: known schemas are [1, 2]"),
    (["--node=n", "--watch-scope=cluster"], {}, "watch scope 'cluster': one of node, prefix"),
    (["--node=n", "--health-port=0"], {}, "health port 0: expected a port number"),
    (["--node=n", "--disable-features=warp-drive"], {}, "disabled features: unknown feature 'warp-drive'"),
    (["--node=n", "--etcd-endpoints= , "], {}, "etcd endpoints: at least one host:port is required"),
    (["--node=n", "--etcd-endpoints=etcd"], {}, "etcd endpoint 'etcd': expected host:port"),
    (["--node=n", "--etcd-endpoints=etcd:99999"], {}, "etcd endpoint 'etcd:99999': expected host:port"),
    (["--node=n", "--etcd-prefix=netfence"], {}, "etcd prefix 'netfence': must start and end with '/'"),
    (["--node=n", "--etcd-cert=/c.pem"], {}, "etcd client certificate and key must be given together"),
    (["--node=n", "--etcd-cert=/c.pem", "--etcd-key=/k.pem"], {}, "without a CA file"),
    (["--node=n", "--etcd-ca=/nonexistent/ca.pem"], {}, "--etcd-ca /nonexistent/ca.pem: no such file"),
    (["--node=n", "--no-ipv6=yes"], {}, "--no-ipv6: ignored explicit argument 'yes'"),
]


@pytest.mark.parametrize(("argv", "env", "message"), CONTROLLER_ERRORS)
def test_controller_errors(argv: list[str], env: dict[str, str], message: str | None) -> None:
    if message is None:
        assert load_controller_config(argv, env=env).identity
        return
    with pytest.raises(ConfigError) as info:
        load_controller_config(argv, env=env)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("argv", "env", "message"), AGENT_ERRORS)
def test_agent_errors(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_config(argv, env=env)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"timeout": 0}, {"watch_probe_interval": -1}, {"watch_retry_timeout": 0}, {"rebuild_after": 0},
    {"page_size": 0}, {"max_ops_per_txn": 0}, {"max_ops_per_txn": 127}, {"endpoints": "a:1"},
])
def test_settings_errors_name_the_setting(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        EtcdSettings(**kwargs)  # type: ignore[arg-type]
    words = next(iter(kwargs)).replace("_", " ").replace("max ops per txn", "max operations per transaction")
    assert words.split()[0] in str(info.value) and "\n" not in str(info.value)


def test_config_types_validate_when_made() -> None:
    with pytest.raises(ConfigError, match="lease TTL 0"):
        ControllerConfig(lease_ttl=0)
    with pytest.raises(ConfigError, match="node name is required"):
        AgentConfig(node="")


def test_programs_print_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NETFENCE_NODE", raising=False)
    assert agent_main.main([]) == 2
    assert capsys.readouterr().err == "netfence-agent: node name is required (--node or NETFENCE_NODE)\n"
    assert controller_main.main(["--lease-ttl=x"]) == 2
    assert capsys.readouterr().err == "netfence-controller: --lease-ttl: expected an integer, got 'x'\n"


def test_status_writer_settings() -> None:
    """Bounded concurrent status writes (issue 11) and the benchmarks' baseline switch."""
    assert (ControllerConfig().status_concurrency, ControllerConfig().baseline_status) == (16, False)
    config = load_controller_config(["--status-concurrency=4"], env={"NETFENCE_BASELINE_STATUS": "true"})
    assert (config.status_concurrency, config.baseline_status) == (4, True)
    assert load_controller_config([], env={"NETFENCE_STATUS_CONCURRENCY": "32"}).status_concurrency == 32
    with pytest.raises(ConfigError, match=r"^status concurrency 0: expected 1-1024$"):
        load_controller_config(["--status-concurrency=0"], env={})
    with pytest.raises(ConfigError, match=r"^--baseline-status: expected true or false, got 'maybe'$"):
        load_controller_config(["--baseline-status=maybe"], env={})
