"""I/O for ``netfence explain``: pods from the API server, the committed model and node
reports from etcd, live counters from the nodes. Read-only everywhere.

* Pods (``namespace/pod``) are read from the API server (kubeconfig): address, node,
  labels, and their namespace's labels (for the nearest-miss texts). An address that
  belongs to a pod is treated as that pod.
* The model is the *committed* state (``EtcdStore.committed_snapshot``: never half a
  change), decoded per node by the agent's own ``NodeState``, so the verdict comes from
  exactly the values the node's agent renders. Node reports give applied revisions and
  the kernel features a node lacks.
* Counters: in the test bed from the node's network namespace (``ip netns exec <netns>
  iptables-save -c``); in a cluster from the node's agent, ``GET /counters`` on its
  health port. Counters that cannot be read are reported as unavailable, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netfence.dataplane.counters import CounterError, counters_from_json, read_counters
from netfence.dataplane.render import SCTP_PORT_MATCH, Features
from netfence.dataplane.ruleset import Family
from netfence.explain.report import CounterRead, chains_of, explanation, family_of
from netfence.explain.trace import Connection, DirectionTrace, Party, trace_connection
from netfence.model.enforcement import PROTOCOLS, NodeModel, Protocol
from netfence.store.settings import EtcdSettings

log = logging.getLogger(__name__)

API_TIMEOUT = 10.0
ETCD_TIMEOUT = 10.0
AGENT_TIMEOUT = 3.0
DEFAULT_AGENT_PORT = 9799  # the chart's agent.healthPort
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class ExplainError(Exception):
    """A failure to report as one line: '<what is wrong>; <what to do>'."""


@dataclass(frozen=True)
class Target:
    """Where explain looks: the API server, Netfence's etcd, and how to read each node's counters."""

    etcd: EtcdSettings
    kubeconfig: Path | None = None  # None: $KUBECONFIG, ~/.kube/config, in-cluster
    node_netns: Mapping[str, str] = field(default_factory=dict)  # node -> network namespace (test beds)
    agent_urls: Mapping[str, str] = field(default_factory=dict)  # node -> base URL of its agent's health port
    agent_port: int = DEFAULT_AGENT_PORT  # other nodes: http://<InternalIP>:<agent_port>
    counters: bool = True


# --- arguments -------------------------------------------------------------------------------


def parse_endpoint_arg(text: str, role: str) -> tuple[str, str] | str:
    """``(namespace, pod)`` for ``namespace/pod``, the normalised address for an IP (pure)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text.strip()))
    namespace, sep, name = text.strip().partition("/")
    if not sep or not _NAME.match(namespace) or not _NAME.match(name) or "/" in name:
        raise ExplainError(f"{role} {text!r} is neither namespace/pod nor an IP address; "
                           f"write it as e.g. default/web or 10.244.0.10")
    return namespace, name


def parse_port(text: str | None) -> int | None:
    """The --port value as a number (pure); a port *name* is refused with what to do instead."""
    if text is None:
        return None
    value = text.strip()
    if not value.isdigit():
        raise ExplainError(f"--port {text!r} is not a port number; explain takes the number (1-65535): look it "
                           "up with kubectl get pod -n NAMESPACE POD -o jsonpath='{..ports}'")
    port = int(value)
    if not 1 <= port <= 65535:
        raise ExplainError(f"--port {port} is out of range; give a port number from 1 to 65535")
    return port


def parse_mapping(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``NODE=VALUE`` flags (repeatable) as a dict (pure)."""
    out: dict[str, str] = {}
    for raw in values or ():
        node, sep, value = raw.partition("=")
        if not sep or not node or not value:
            raise ExplainError(f"{flag} {raw!r} is not NODE=VALUE; write it as e.g. {flag} node-0=...")
        out[node] = value
    return out


# --- the API server ------------------------------------------------------------------------------


async def connect_api(kubeconfig: Path | None) -> Any:
    """A kubernetes_asyncio ApiClient (ExplainError when no configuration can be loaded)."""
    from kubernetes_asyncio import client, config

    try:
        if kubeconfig is not None:
            if not await asyncio.to_thread(kubeconfig.is_file):
                raise ExplainError(f"kubeconfig {kubeconfig} does not exist; pass the right --kubeconfig")
            return await config.new_client_from_config(config_file=str(kubeconfig))
        try:
            return await config.new_client_from_config()
        except (config.ConfigException, OSError, TypeError):
            config.load_incluster_config()
            return client.ApiClient()
    except config.ConfigException as exc:
        raise ExplainError(f"no usable kubeconfig ({_first_line(exc)}); pass --kubeconfig or set KUBECONFIG") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


async def _api_call(what: str, call: Any, server: str) -> Any:
    """Run one API request with a timeout; ExplainError (one line) when the server cannot be asked."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        return await asyncio.wait_for(call, API_TIMEOUT)
    except ApiException:
        raise
    except TimeoutError:
        raise ExplainError(f"the API server at {server} did not answer within {API_TIMEOUT:.0f}s ({what}); "
                           "check that it runs and that the kubeconfig points at it") from None
    except Exception as exc:
        raise ExplainError(f"cannot reach the API server at {server} ({what}: {_first_line(exc)}); "
                           "check that it runs and that the kubeconfig points at it") from None


def _denied(exc: Any, what: str) -> ExplainError:
    return ExplainError(f"the API server refused to {what} ({exc.status} {exc.reason}); explain needs "
                        "get/list on pods, namespaces and nodes: use a kubeconfig that may read them")


def _ips(pod: Any) -> list[str]:
    status = pod.status
    raw = [p.ip for p in (status.pod_ips or []) if p and p.ip] if status is not None else []
    if not raw and status is not None and status.pod_ip:
        raw = [status.pod_ip]
    out = []
    for text in raw:
        with contextlib.suppress(ValueError):
            out.append(str(ipaddress.ip_address(text)))
    return out


class PartyResolver:
    """Resolves SRC/DST arguments to :class:`Party` values through the API server (cached)."""

    def __init__(self, api: Any) -> None:
        from kubernetes_asyncio import client

        self.core = client.CoreV1Api(api)
        self.server = str(getattr(api.configuration, "host", "") or "the API server")
        self._namespaces: dict[str, dict[str, str] | None] = {}
        self._pods: dict[tuple[str, str], Any] = {}
        self._node_ips: dict[str, str | None] = {}

    async def pod(self, namespace: str, name: str) -> Any:
        from kubernetes_asyncio.client.exceptions import ApiException

        key = (namespace, name)
        if key not in self._pods:
            try:
                self._pods[key] = await _api_call(f"reading pod {namespace}/{name}",
                                                  self.core.read_namespaced_pod(name, namespace), self.server)
            except ApiException as exc:
                if exc.status == 404:
                    raise ExplainError(f"pod {namespace}/{name} not found; check the name with "
                                       f"kubectl get pods -n {namespace}") from None
                if exc.status in (401, 403):
                    raise _denied(exc, f"read pod {namespace}/{name}") from None
                raise ExplainError(f"reading pod {namespace}/{name} failed ({exc.status} {exc.reason}); "
                                   "check the API server") from None
        return self._pods[key]

    async def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        if namespace not in self._namespaces:
            try:
                ns = await _api_call(f"reading namespace {namespace}", self.core.read_namespace(namespace),
                                     self.server)
                self._namespaces[namespace] = dict(ns.metadata.labels or {})
            except ApiException as exc:
                if exc.status in (401, 403):
                    raise _denied(exc, f"read namespace {namespace}") from None
                self._namespaces[namespace] = None
        return self._namespaces[namespace]

    async def pod_with_ip(self, ip: str) -> Any | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            listed = await _api_call(f"looking up the pod with address {ip}",
                                     self.core.list_pod_for_all_namespaces(field_selector=f"status.podIP={ip}"),
                                     self.server)
        except ApiException as exc:
            if exc.status in (401, 403):
                raise _denied(exc, "list pods") from None
            raise ExplainError(f"looking up address {ip} failed ({exc.status} {exc.reason}); "
                               "check the API server") from None
        live = [p for p in listed.items if p.spec and not p.spec.host_network
                and (p.status.phase if p.status else None) not in ("Succeeded", "Failed")]
        return live[0] if live else None

    async def node_ip(self, node: str) -> str | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        if node not in self._node_ips:
            address = None
            with contextlib.suppress(ApiException, ExplainError):
                obj = await _api_call(f"reading node {node}", self.core.read_node(node), self.server)
                for entry in (obj.status.addresses or []) if obj.status else []:
                    if entry.type == "InternalIP":
                        address = entry.address
                        break
            self._node_ips[node] = address
        return self._node_ips[node]

    async def _party_of(self, pod: Any, ip: str | None, role: str) -> Party:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        ips = _ips(pod)
        if not ips:
            phase = pod.status.phase if pod.status else "unknown"
            raise ExplainError(f"pod {key} ({role}) has no IP address yet (phase {phase}); wait until it runs "
                               f"(kubectl get pod -n {pod.metadata.namespace} {pod.metadata.name} -o wide)")
        return Party(
            ip=ip or ips[0],
            namespace=pod.metadata.namespace,
            name=pod.metadata.name,
            node=pod.spec.node_name if pod.spec else None,
            labels=dict(pod.metadata.labels or {}),
            namespace_labels=await self.namespace_labels(pod.metadata.namespace),
            host_network=bool(pod.spec and pod.spec.host_network),
        )

    async def resolve(self, text: str, role: str) -> Party:
        parsed = parse_endpoint_arg(text, role)
        if isinstance(parsed, str):
            pod = await self.pod_with_ip(parsed)
            return Party(parsed) if pod is None else await self._party_of(pod, parsed, role)
        return await self._party_of(await self.pod(*parsed), None, role)

    async def declared_ports(self, party: Party) -> list[tuple[int, Protocol]]:
        """The container ports a pod declares (for a default --port)."""
        if not party.is_pod:
            return []
        assert party.namespace is not None and party.name is not None
        pod = await self.pod(party.namespace, party.name)
        out: list[tuple[int, Protocol]] = []
        for container in (pod.spec.containers or []) if pod.spec else []:
            for cp in container.ports or []:
                proto = (cp.protocol or "TCP").upper()
                if proto in PROTOCOLS and (int(cp.container_port), proto) not in out:
                    out.append((int(cp.container_port), proto))
        return out


def same_family(src: Party, dst: Party, pods: Mapping[str, Sequence[str]]) -> tuple[Party, Party]:
    """Pick addresses of the same IP family for both ends (a dual-stack pod has one of each)."""
    version = ipaddress.ip_address(dst.ip).version
    if ipaddress.ip_address(src.ip).version == version:
        return src, dst
    for ip in pods.get(src.key or "", ()):
        if ipaddress.ip_address(ip).version == version:
            return Party(ip, src.namespace, src.name, src.node, src.labels, src.namespace_labels,
                         src.host_network), dst
    for ip in pods.get(dst.key or "", ()):
        if ipaddress.ip_address(ip).version == ipaddress.ip_address(src.ip).version:
            return src, Party(ip, dst.namespace, dst.name, dst.node, dst.labels, dst.namespace_labels,
                              dst.host_network)
    raise ExplainError(f"{src.describe()} and {dst.describe()} have no addresses of the same IP family; "
                       "give the address you mean instead of the pod")


# --- the committed model ------------------------------------------------------------------------


@dataclass
class ModelView:
    """The committed model and the node reports, read once; per-node models decoded on demand."""

    values: dict[str, bytes]
    mod_revisions: dict[str, int]
    foreign: dict[str, int]
    commit_revision: int
    reports: dict[str, dict[str, Any]]
    _models: dict[str, NodeModel] = field(default_factory=dict)

    def model(self, node: str) -> NodeModel:
        """``node``'s model exactly as its agent decodes it (agent/node_state.py)."""
        from netfence.agent.node_state import NodeState

        if node not in self._models:
            state = NodeState(node)
            state.reset(self.values, self.foreign, self.mod_revisions)
            self._models[node] = state.model()
        return self._models[node]

    def features(self, node: str) -> Features:
        """What the node's kernel cannot do, as its report says (rules it renders to match nothing)."""
        report = self.reports.get(node) or {}
        lacking = {str(u.get("feature")) for u in report.get("unenforceable") or () if isinstance(u, dict)}
        return Features(sctp_port_match=SCTP_PORT_MATCH not in lacking)

    def trace(self, conn: Connection) -> list[DirectionTrace]:
        nodes = {p.node for p in (conn.src, conn.dst) if p.is_pod and p.node}
        models = {n: self.model(n) for n in nodes}
        return trace_connection(models, conn, {n: self.features(n) for n in nodes})


async def read_model(settings: EtcdSettings) -> ModelView:
    """The committed model and node reports (ExplainError, one line, when etcd cannot be read)."""
    from netfence.store.errors import StoreError
    from netfence.store.etcd import EtcdStore
    from netfence.store.settings import ConfigError

    where = ",".join(settings.endpoints)

    async def gather() -> ModelView:
        store = EtcdStore(settings)
        try:
            await store.connect()
            committed = await store.committed_snapshot(max_wait=5.0)
            reports = await store.read_reports()
        finally:
            await store.close()
        return ModelView(dict(committed.values), dict(committed.mod_revisions), dict(committed.foreign),
                         committed.commit_revision, dict(reports))

    try:
        view = await asyncio.wait_for(gather(), ETCD_TIMEOUT)
    except TimeoutError:
        raise ExplainError(f"etcd at {where} did not answer within {ETCD_TIMEOUT:.0f}s; check that it runs and "
                           "that --etcd-endpoints (and the TLS flags) are right") from None
    except ConfigError as exc:
        raise ExplainError(f"{exc}; fix --etcd-endpoints, --etcd-prefix or the TLS flags") from None
    except StoreError as exc:
        raise ExplainError(f"cannot read the committed model from etcd at {where} ({_first_line(exc)}); check "
                           "that it runs and that --etcd-endpoints (and the TLS flags) are right") from None
    if view.commit_revision == 0:
        raise ExplainError(f"etcd at {where} holds no committed model under {settings.prefix}; check "
                           "--etcd-prefix and that netfence-controller runs")
    return view


# --- counters --------------------------------------------------------------------------------------


async def read_node_counters(node: str, chains: list[str], family: Family, target: Target,
                             resolver: PartyResolver | None) -> CounterRead:
    """The live counters of ``chains`` on ``node``; errors become ``CounterRead.error``."""
    if node in target.node_netns:
        from netfence.dataplane.runner import SubprocessRunner

        netns = target.node_netns[node]
        source = f"network namespace {netns}"
        try:
            found = await asyncio.to_thread(read_counters, SubprocessRunner(netns=netns, timeout=10.0), chains, family)
        except CounterError as exc:
            return CounterRead(source, error=str(exc))
        return CounterRead(source, found)
    url = target.agent_urls.get(node)
    if url is None:
        ip = await resolver.node_ip(node) if resolver is not None else None
        if ip is None:
            return CounterRead("the node's agent", error=f"no address known for node {node}; "
                               f"pass --agent-url {node}=http://HOST:PORT")
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{target.agent_port}"
    return await _agent_counters(node, url.rstrip("/"), chains, family)


async def _agent_counters(node: str, base: str, chains: list[str], family: Family) -> CounterRead:
    import aiohttp

    query = {"chains": ",".join(chains), "family": family}
    try:
        timeout = aiohttp.ClientTimeout(total=AGENT_TIMEOUT)
        async with (aiohttp.ClientSession(timeout=timeout) as session,
                    session.get(f"{base}/counters", params=query) as resp):
            text = await resp.text()
            if resp.status != 200:
                return CounterRead(base, error=f"the agent answered {resp.status}: {text.strip()[:200]}")
            data = json.loads(text)
        return CounterRead(base, counters_from_json(data.get("chains")))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return CounterRead(base, error=(
            f"the agent of {node} at {base} did not answer ({_first_line(exc) or type(exc).__name__}); its health "
            f"port listens on the node's loopback by default: forward it (kubectl port-forward -n NAMESPACE "
            f"pod/AGENT-POD {DEFAULT_AGENT_PORT}) and pass --agent-url {node}=http://127.0.0.1:{DEFAULT_AGENT_PORT}"))
    except (ValueError, AttributeError, CounterError) as exc:
        return CounterRead(base, error=f"the agent's answer is not understood ({_first_line(exc)})")


# --- the whole flow --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    src: str
    dst: str
    port: int | None = None
    protocol: Protocol | None = None


async def resolve_connection(resolver: PartyResolver, question: Question) -> Connection:
    src = await resolver.resolve(question.src, "SRC")
    dst = await resolver.resolve(question.dst, "DST")
    addresses = {}
    for party in (src, dst):
        if party.is_pod:
            assert party.namespace is not None and party.name is not None
            addresses[party.key or ""] = _ips(await resolver.pod(party.namespace, party.name))
    src, dst = same_family(src, dst, addresses)
    port, protocol = question.port, question.protocol
    if port is None:
        declared = await resolver.declared_ports(dst)
        if protocol is not None:
            declared = [d for d in declared if d[1] == protocol]
        if len(declared) != 1:
            listed = ", ".join(f"{p}/{proto}" for p, proto in declared) or "none"
            raise ExplainError(f"which port? {dst.describe()} declares {listed}; pass --port N "
                               "(and --protocol if not TCP)")
        port, protocol = declared[0]
    return Connection(src, dst, port, protocol or "TCP")


async def explain(target: Target, question: Question) -> dict[str, Any]:
    """Everything ``netfence explain`` prints, as data (see report.format_text)."""
    view = await read_model(target.etcd)
    api = await connect_api(target.kubeconfig)
    try:
        resolver = PartyResolver(api)
        conn = await resolve_connection(resolver, question)
        return await explain_connection(view, conn, target, resolver)
    finally:
        with contextlib.suppress(Exception):
            await api.close()


async def explain_connection(view: ModelView, conn: Connection, target: Target,
                             resolver: PartyResolver | None) -> dict[str, Any]:
    """The explanation of one resolved connection over an already read model (reads counters)."""
    traces = view.trace(conn)
    family = family_of(conn)
    reads: dict[str, CounterRead] = {}
    if target.counters:
        wanted: dict[str, list[str]] = {}
        for trace in traces:
            wanted.setdefault(trace.node, []).extend(c for c, _, _ in chains_of(trace))
        for node, chains in wanted.items():
            if chains:
                reads[node] = await read_node_counters(node, list(dict.fromkeys(chains)), family, target, resolver)
    notes: list[str] = []
    if conn.src.is_pod and conn.dst.is_pod and conn.src.key == conn.dst.key:
        notes.append("source and destination are the same pod: that traffic never leaves the pod "
                     "and is not filtered")
    foreign = sorted(view.foreign)
    if foreign:
        notes.append(f"{len(foreign)} committed keys were written outside a controller commit and are left out "
                     f"(agents keep their last good value): {', '.join(foreign[:4])}")
    models = {t.node: view.model(t.node) for t in traces}
    return explanation(conn, traces, models, view.reports, view.mod_revisions, view.commit_revision, reads,
                       tuple(notes))
