"""The agent's Prometheus metrics (every one is listed in docs/metrics.md).

Named metric objects on a ``CollectorRegistry`` of this agent's own, served by
``netfence.metrics_http`` on ``--metrics-port``. Hooks in the agent loop:
:meth:`AgentMetrics.committed` (a commit batch arrived, with the commit
marker's time), :meth:`AgentMetrics.applied` / :meth:`AgentMetrics.apply_failed`.
Read at scrape time from :class:`~netfence.agent.loop.AgentHealth`: rules,
sets, etcd connected, drift repairs, the applied revision.

Denied packets and bytes per local endpoint come from the counters of the
final ``... denied`` DROP rule of each endpoint chain (``nf-tw-*`` ingress,
``nf-fw-*`` egress; dataplane/render.py), read with one ``iptables-save -c``
per family and scrape (:meth:`AgentMetrics.refresh`, at most once per
``min_read_interval``), labelled with the endpoint's namespace, pod and
direction. Only this node's endpoints that are isolated in that direction have
such a chain, so the label set is bounded by the node's pods. The kernel's
counters restart at 0 when the chain is rewritten (the endpoint's policies
change, a full sync); Prometheus' ``rate``/``increase`` treat that as a counter
reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netfence.dataplane.counters import parse_counters
from netfence.dataplane.names import Direction, endpoint_chain
from netfence.dataplane.ruleset import Family
from netfence.dataplane.runner import CommandRunner

if TYPE_CHECKING:
    from netfence.agent.loop import AgentHealth
    from netfence.dataplane.apply import ApplyResult
    from netfence.model.enforcement import Endpoint

log = logging.getLogger(__name__)

__all__ = ["APPLY_BUCKETS", "LATENCY_BUCKETS", "AgentMetrics", "DeniedKey", "denied_counters", "endpoint_chains"]

#: Seconds an apply takes: a small delta (milliseconds) to a full sync of a big node.
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds from the controller's commit to the node's kernel.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PENDING_COMMITS = 4096  # commits received but not yet applied, remembered for commit -> kernel
_SAVE = {"v4": "iptables-save", "v6": "ip6tables-save"}


class DeniedKey(NamedTuple):
    namespace: str
    pod: str
    direction: Direction


#: Reads ``iptables-save -c -t filter`` of one family (blocking).
FilterTableReader = Callable[[Family], str]


def save_filter_table(runner: CommandRunner, family: Family) -> str:
    """``iptables-save -c -t filter`` (or ip6tables-save) through ``runner``; OSError when it fails."""
    result = runner.run([_SAVE[family], "-c", "-t", "filter"])
    if not result.ok:
        raise OSError(f"{_SAVE[family]} failed (exit {result.returncode}): {result.stderr.strip()[:300]}")
    return result.stdout


def endpoint_chains(endpoints: Iterable[Endpoint]) -> dict[str, DeniedKey]:
    """The endpoint chain of every endpoint isolated in a direction -> its labels."""
    chains: dict[str, DeniedKey] = {}
    directions: tuple[Direction, ...] = ("ingress", "egress")
    for ep in endpoints:
        for direction in directions:
            if ep.ingress if direction == "ingress" else ep.egress:
                chains[endpoint_chain(direction, ep.key)] = DeniedKey(ep.namespace, ep.name, direction)
    return chains


def denied_counters(save_text: str, chains: Mapping[str, DeniedKey]) -> dict[DeniedKey, tuple[int, int]]:
    """(packets, bytes) of each chain's ``... denied`` DROP rule in ``iptables-save -c`` output
    (chains absent from it are left out)."""
    out: dict[DeniedKey, tuple[int, int]] = {}
    for chain, rules in parse_counters(save_text, chains).items():
        if not rules:
            continue
        last = rules[-1]  # the rendered chain ends with it (its comment may be cut for long names)
        if last.rule.endswith("-j DROP") and "INVALID" not in last.rule:
            packets, octets = out.get(chains[chain], (0, 0))
            out[chains[chain]] = (packets + last.packets, octets + last.bytes)
    return out


class AgentMetrics:
    """The agent's metrics and the hooks that move them; ``wall_clock`` is Unix seconds (the
    commit marker's time is the controller's wall clock), ``clock`` monotonic seconds."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        min_read_interval: float = 1.0,
    ):
        self.registry = CollectorRegistry() if registry is None else registry
        self.wall_clock = wall_clock
        self.clock = clock
        self.min_read_interval = min_read_interval
        reg = self.registry
        self.applies = Counter(
            "netfence_agent_applies", "Successful applies to the node's netfilter, by kind (delta or full sync).",
            ["kind"], registry=reg)
        self.apply_duration = Histogram(
            "netfence_agent_apply_duration_seconds",
            "Time the dataplane took to apply one Ruleset (ipset and iptables-restore runs, and the kernel "
            "read-back of a full sync), by kind.", ["kind"], buckets=APPLY_BUCKETS, registry=reg)
        self.apply_failures = Counter(
            "netfence_agent_apply_failures",
            "Applies that failed (the previous rules stay in force; retried as a full sync).", registry=reg)
        self.commit_to_kernel = Histogram(
            "netfence_agent_commit_to_kernel_seconds",
            "From the commit marker's time (the controller's clock) to the commit being in this node's kernel.",
            buckets=LATENCY_BUCKETS, registry=reg)
        self.counter_read_failures = Counter(
            "netfence_agent_counter_read_failures",
            "Reads of the DROP counters (iptables-save -c) that failed; the last values read are served.",
            registry=reg)
        for kind in ("delta", "full"):
            self.applies.labels(kind=kind)
            self.apply_duration.labels(kind=kind)
        self._pending: OrderedDict[int, float] = OrderedDict()  # commit revision -> commit time
        self._health: AgentHealth | None = None
        self._endpoints: Callable[[], Iterable[Endpoint]] = lambda: ()
        self._reader: FilterTableReader | None = None
        self._families: tuple[Family, ...] = ("v4",)
        self._denied: dict[DeniedKey, tuple[int, int]] = {}
        self._last_read: float | None = None
        self._read_lock = asyncio.Lock()
        reg.register(_AgentCollector(self))

    # --- wiring ---------------------------------------------------------------------

    def bind(
        self,
        health: AgentHealth,
        endpoints: Callable[[], Iterable[Endpoint]],
        reader: FilterTableReader | None = None,
        families: tuple[Family, ...] = ("v4",),
    ) -> None:
        """Read ``health`` at scrape time; ``endpoints`` (this node's) and ``reader`` for the DROP counters."""
        self._health = health
        self._endpoints = endpoints
        self._reader = reader
        self._families = families

    # --- hooks ----------------------------------------------------------------------

    def committed(self, revision: int, commit_time: float | None) -> None:
        """A commit batch arrived (the agent loop); its kernel latency is observed once applied."""
        if commit_time is None:
            return
        self._pending[revision] = commit_time
        while len(self._pending) > PENDING_COMMITS:
            self._pending.popitem(last=False)

    def applied(self, revision: int, result: ApplyResult) -> None:
        """The state as of commit ``revision`` is in the kernel: every commit up to it is."""
        kind = "full" if result.full else "delta"
        self.applies.labels(kind=kind).inc()
        self.apply_duration.labels(kind=kind).observe(result.duration)
        if not self._pending:
            return
        now = self.wall_clock()
        for done in [r for r in self._pending if r <= revision]:
            self.commit_to_kernel.observe(max(0.0, now - self._pending.pop(done)))

    def apply_failed(self) -> None:
        self.apply_failures.inc()

    # --- the DROP counters ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the DROP counters of this node's endpoint chains (before a scrape): one
        ``iptables-save -c`` per family, at most once per ``min_read_interval``. A failed
        read is counted and logged; the last values read stay."""
        if self._reader is None:
            return
        async with self._read_lock:
            now = self.clock()
            if self._last_read is not None and now - self._last_read < self.min_read_interval:
                return
            self._last_read = now
            chains = endpoint_chains(self._endpoints())
            totals: dict[DeniedKey, tuple[int, int]] = {}
            try:
                for family in self._families:
                    text = await asyncio.to_thread(self._reader, family)
                    for key, (packets, octets) in denied_counters(text, chains).items():
                        had = totals.get(key, (0, 0))
                        totals[key] = (had[0] + packets, had[1] + octets)
            except Exception as exc:
                self.counter_read_failures.inc()
                log.warning("reading the DROP counters failed: %s", exc)
                return
            self._denied = totals

    @property
    def denied(self) -> dict[DeniedKey, tuple[int, int]]:
        """(packets, bytes) denied per local endpoint and direction, as last read."""
        return dict(self._denied)


class _AgentCollector(Collector):
    """The agent's health numbers and the DROP counters as last read, at scrape time."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families(None, {})

    def collect(self) -> Iterable[Metric]:
        return self._families(self.metrics._health, self.metrics._denied)

    @staticmethod
    def _families(health: AgentHealth | None, denied: Mapping[DeniedKey, tuple[int, int]]) -> list[Metric]:
        rules = GaugeMetricFamily("netfence_agent_rules", "Rules in Netfence's chains in this node's kernel.")
        sets = GaugeMetricFamily("netfence_agent_sets", "Netfence's ipsets in this node's kernel.")
        connected = GaugeMetricFamily(
            "netfence_agent_etcd_connected", "1 while etcd answers (probed every second), else 0 (enforcing stale).")
        drift = CounterMetricFamily(
            "netfence_agent_drift_repairs", "Times the drift check found the kernel changed and re-applied.")
        revision = GaugeMetricFamily(
            "netfence_agent_applied_revision", "etcd revision of the commit this node's kernel enforces.")
        labels = ["namespace", "pod", "direction"]
        packets = CounterMetricFamily(
            "netfence_agent_denied_packets",
            "Packets dropped by the final DROP rule of a local endpoint's chain (no policy allowed them).",
            labels=labels)
        octets = CounterMetricFamily(
            "netfence_agent_denied_bytes", "Bytes of those packets.", labels=labels)
        if health is not None:
            rules.add_metric([], float(health.rules))
            sets.add_metric([], float(health.sets))
            connected.add_metric([], 1.0 if health.etcd_connected else 0.0)
            drift.add_metric([], float(health.drift_repairs))
            revision.add_metric([], float(health.applied_revision))
        for key, (count, size) in sorted(denied.items()):
            packets.add_metric(list(key), float(count))
            octets.add_metric(list(key), float(size))
        return [rules, sets, connected, drift, revision, packets, octets]
