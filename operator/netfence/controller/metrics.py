"""The controller's Prometheus metrics (every one is listed in docs/metrics.md).

Named metric objects on a ``CollectorRegistry`` of this controller's own (made
with the :class:`ControllerMetrics`, never prometheus_client's global one),
served by ``netfence.metrics_http`` on ``--metrics-port``. The orchestration
code stays as it is apart from thin hooks:

* commits, keys written per commit, API event -> commit: the syncer's
  ``on_commit`` callbacks and the store's ``txn_listeners`` (:meth:`bind`). A
  reconcile that wrote nothing calls ``on_commit`` with the commit it read:
  only a revision of one of our own transactions counts as a commit;
* API events: ``handlers._feed`` calls :meth:`ControllerMetrics.api_event`
  when an event changed the world; watch restarts and full re-lists: the
  runtime (``watch_restarts``, ``full_relists``);
* commit -> enforced: the status writer's ``on_status`` hook (a policy's
  status computed ``Enforced`` for the commit revision that last changed it);
* read at scrape time from what the runtime keeps anyway: leader, status
  writes, listings per kind, foreign writes, the commit revision.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netfence.controller.kube import CPS_PLURAL
from netfence.controller.world import KINDS

if TYPE_CHECKING:
    from netfence.controller.runtime import ControllerRuntime
    from netfence.status.aggregate import PolicyFacts
    from netfence.store.etcd import Fence

__all__ = ["FULL_RELIST_TRIGGERS", "KEY_BUCKETS", "LATENCY_BUCKETS", "ControllerMetrics"]

#: Seconds; from a few milliseconds (one coalescing window) to minutes (a node that was away).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: etcd keys per commit: a commit marker alone (0), one pod (a few), a reconcile of a big cluster.
KEY_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000, 50000)
FULL_RELIST_TRIGGERS = ("startup", "elected", "periodic")
COMMITS_REMEMBERED = 4096  # commit revision -> time, for commit -> enforced


class ControllerMetrics:
    """The controller's metrics and the hooks that move them; ``clock`` is monotonic seconds."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry() if registry is None else registry
        self.clock = clock
        reg = self.registry
        self.commits = Counter(
            "netfence_controller_commits",
            "Changes this controller committed to etcd (each ends with a commit marker).", registry=reg)
        self.commit_keys = Histogram(
            "netfence_controller_commit_keys", "etcd keys written (put or deleted) per commit.",
            buckets=KEY_BUCKETS, registry=reg)
        self.event_to_commit = Histogram(
            "netfence_controller_event_to_commit_seconds",
            "From the oldest API event (pod, namespace, NetworkPolicy, node) not yet committed to the commit "
            "that carries it, on the leader.",
            buckets=LATENCY_BUCKETS, registry=reg)
        self.commit_to_enforced = Histogram(
            "netfence_controller_commit_to_enforced_seconds",
            "From a commit that changed a policy's keys to the policy's status being computed Enforced "
            "(every required node applied that commit); one observation per policy and change.",
            buckets=LATENCY_BUCKETS, registry=reg)
        self.watch_restarts = Counter(
            "netfence_controller_watch_restarts",
            "Watches Kopf (re)listed after (re)connecting (each burst of listed objects once; the first "
            "listing at start counts too); each makes the controller re-list the kind itself.",
            ["kind"], registry=reg)
        self.full_relists = Counter(
            "netfence_controller_full_relists", "Listings of every kind requested at once, by trigger.",
            ["trigger"], registry=reg)
        for kind in (*KINDS, CPS_PLURAL):
            self.watch_restarts.labels(kind=kind)
        for trigger in FULL_RELIST_TRIGGERS:
            self.full_relists.labels(trigger=trigger)
        self.runtime: ControllerRuntime | None = None
        self._last_txn = 0  # revision of our latest etcd transaction
        self._last_commit = 0
        self._writes_seen = 0  # the syncer's key-write counter at the last commit
        self._event: tuple[float, Fence] | None = None  # oldest uncommitted event: (time, leadership term)
        self._commit_times: OrderedDict[int, float] = OrderedDict()
        self._enforced: dict[tuple[str, str], int] = {}  # policy -> revision already observed Enforced
        reg.register(_RuntimeCollector(self))

    # --- wiring ---------------------------------------------------------------------

    def bind(self, runtime: ControllerRuntime) -> None:
        """Follow ``runtime``: its store's transactions, its syncer's commits, its status writer's
        statuses; and read its state at scrape time. Once, at start-up."""
        if self.runtime is not None:
            raise RuntimeError("these metrics already follow a controller runtime")
        self.runtime = runtime
        self._writes_seen = runtime.syncer.writes
        runtime.store.txn_listeners.append(self.own_transaction)
        runtime.syncer.on_commit.append(self.on_commit)
        runtime.status.on_status.append(self.status_computed)

    def unbind(self, runtime: ControllerRuntime) -> None:
        """Stop following ``runtime`` (its start-up failed; the next attempt binds a new one)."""
        if self.runtime is not runtime:
            return
        self.runtime = None
        with contextlib.suppress(ValueError):
            runtime.store.txn_listeners.remove(self.own_transaction)
        with contextlib.suppress(ValueError):
            runtime.syncer.on_commit.remove(self.on_commit)
        with contextlib.suppress(ValueError):
            runtime.status.on_status.remove(self.status_computed)

    def _fence(self) -> Fence | None:
        """The current leadership term (None while not leading)."""
        runtime = self.runtime
        if runtime is None or not runtime.election.is_leader:
            return None
        return runtime.election.fence

    # --- hooks ----------------------------------------------------------------------

    def api_event(self) -> None:
        """An API event changed the world (handlers): the next commit carries it. Timed only on
        the leader, and only within one leadership term (a standby's events are committed by
        the reconcile that follows its election, not by a commit they caused)."""
        fence = self._fence()
        if fence is None:
            self._event = None
        elif self._event is None or self._event[1] != fence:
            self._event = (self.clock(), fence)

    def own_transaction(self, revision: int) -> None:
        """``EtcdStore.txn_listeners``: etcd applied one of our transactions at ``revision``."""
        self._last_txn = max(self._last_txn, revision)

    def on_commit(self, revision: int, keys: set[str]) -> None:
        """``EtcdSyncer.on_commit``: a change was committed at ``revision`` (or, with a revision
        not of ours, a reconcile found nothing to write: not a commit)."""
        if revision != self._last_txn or revision <= self._last_commit:
            return
        now = self.clock()
        self._last_commit = revision
        self.commits.inc()
        writes = self.runtime.syncer.writes if self.runtime is not None else self._writes_seen
        self.commit_keys.observe(max(0, writes - self._writes_seen))
        self._writes_seen = writes
        self._commit_times[revision] = now
        while len(self._commit_times) > COMMITS_REMEMBERED:
            self._commit_times.popitem(last=False)
        event, self._event = self._event, None
        if event is not None and event[1] == self._fence():
            self.event_to_commit.observe(max(0.0, now - event[0]))

    def status_computed(self, facts: PolicyFacts, status: Mapping[str, Any]) -> None:
        """``StatusWriter.on_status``: a policy's status was computed. The first time it is
        ``Enforced`` for the revision that last changed the policy's keys, observe how long
        after that commit (commits of earlier controllers are unknown here: not observed)."""
        if status.get("phase") != "Enforced" or facts.revision <= 0:
            return
        key = (facts.namespace, facts.name)
        if self._enforced.get(key, 0) >= facts.revision:
            return
        self._enforced[key] = facts.revision
        committed = self._commit_times.get(facts.revision)
        if committed is not None:
            self.commit_to_enforced.observe(max(0.0, self.clock() - committed))
        if len(self._enforced) > 2 * max(COMMITS_REMEMBERED, len(self._policies())):
            present = set(self._policies())
            self._enforced = {k: v for k, v in self._enforced.items() if k in present}

    def _policies(self) -> Collection[tuple[str, str]]:
        return self.runtime.world.policies.keys() if self.runtime is not None else ()

    def watch_restarted(self, kind: str) -> None:
        self.watch_restarts.labels(kind=kind).inc()

    def full_relist(self, trigger: str) -> None:
        self.full_relists.labels(trigger=trigger).inc()


class _RuntimeCollector(Collector):
    """Numbers the runtime keeps anyway, read at scrape time."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.metrics.runtime)

    @staticmethod
    def _families(runtime: ControllerRuntime | None) -> list[Metric]:
        leader = GaugeMetricFamily(
            "netfence_controller_leader", "1 while this controller is the leader (writes etcd and status), else 0.")
        status_writes = CounterMetricFamily(
            "netfence_controller_status_writes",
            "ClusterPolicyStatus API writes (create, spec or status patch, delete) that succeeded.")
        relists = CounterMetricFamily(
            "netfence_controller_relists",
            "Listings of a kind merged into the controller's world (start-up, after watch restarts, "
            "on election, periodic).", labels=["kind"])
        foreign = CounterMetricFamily(
            "netfence_controller_foreign_writes",
            "Writes by someone else to keys only the leader writes, noticed (and rewritten) by the leader.")
        revision = GaugeMetricFamily(
            "netfence_controller_commit_revision", "etcd revision of the last commit this controller wrote or read.")
        if runtime is not None:
            leader.add_metric([], 1.0 if runtime.election.is_leader else 0.0)
            status_writes.add_metric([], float(runtime.status.api_writes))
            for kind, count in sorted(runtime.relists.items()):
                relists.add_metric([kind], float(count))
            foreign.add_metric([], float(runtime.syncer.foreign_writes))
            revision.add_metric([], float(runtime.syncer.commit_revision))
        return [leader, status_writes, relists, foreign, revision]
