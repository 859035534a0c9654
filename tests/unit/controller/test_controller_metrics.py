"""The controller's metrics move when the orchestration does (fakes for etcd, the API server, the election)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest

from netfence.config import ControllerConfig
from netfence.controller.kube import KindListing
from netfence.controller.metrics import ControllerMetrics
from netfence.controller.runtime import ControllerRuntime
from netfence.controller.world import WorldTracker
from netfence.metrics_http import metrics_server
from netfence.model.compiler import ModelEngine
from netfence.status.aggregate import PolicyFacts
from netfence.store.types import Fence
from netfence_lab.process import free_port


@dataclass
class FakeKube:
    calls: list[str] = field(default_factory=list)

    async def list_kind(self, kind: str) -> KindListing:
        self.calls.append(kind)
        return KindListing([], 1)


@dataclass
class FakeStore:
    txn_listeners: list[Any] = field(default_factory=list)

    def transaction(self, revision: int) -> None:
        for listener in self.txn_listeners:
            listener(revision)


@dataclass
class FakeSyncer:
    on_commit: list[Any] = field(default_factory=list)
    writes: int = 0
    commit_revision: int = 0
    foreign_writes: int = 0
    notified: int = 0
    reconciles: int = 0

    def notify(self) -> None:
        self.notified += 1

    def request_reconcile(self) -> None:
        self.reconciles += 1

    def commit(self, store: FakeStore, revision: int, keys: int) -> None:
        """What EtcdSyncer._commit does: the transaction, the write count, the callbacks."""
        store.transaction(revision)
        self.writes += keys
        self.commit_revision = revision
        for callback in self.on_commit:
            callback(revision, {f"k{i}" for i in range(keys)})

    def reconciled_nothing(self, revision: int) -> None:
        """A reconcile that found nothing to write reports the commit it read."""
        self.commit_revision = max(self.commit_revision, revision)
        for callback in self.on_commit:
            callback(self.commit_revision, set())


@dataclass
class FakeElection:
    is_leader: bool = True
    fence: Fence | None = field(default_factory=lambda: Fence("/p/leader", 7))


@dataclass
class Status:
    on_status: list[Any] = field(default_factory=list)
    api_writes: int = 0

    def policies_removed(self, keys: list[tuple[str, str]]) -> None:
        pass

    def mark_all(self) -> None:
        pass

    def request_resync(self) -> None:
        pass

    def api_answers(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Bed:
    runtime: ControllerRuntime
    metrics: ControllerMetrics
    store: FakeStore
    syncer: FakeSyncer
    election: FakeElection
    status: Status
    kube: FakeKube
    clock: Clock


def bed() -> Bed:
    clock = Clock()
    metrics = ControllerMetrics(clock=clock)
    store, syncer, election, status, kube = FakeStore(), FakeSyncer(), FakeElection(), Status(), FakeKube()
    engine = ModelEngine()
    runtime = ControllerRuntime(ControllerConfig(), kube, store, engine, WorldTracker(engine), election,  # type: ignore[arg-type]
                                syncer, status, metrics=metrics)  # type: ignore[arg-type]
    metrics.bind(runtime)
    return Bed(runtime, metrics, store, syncer, election, status, kube, clock)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def facts(revision: int, name: str = "p") -> PolicyFacts:
    return PolicyFacts("ns", name, 1, frozenset({"n1"}), 1, revision)


# --- commits ---------------------------------------------------------------------------------


def test_commits_and_keys_per_commit_follow_the_syncer() -> None:
    b = bed()
    reg = b.metrics.registry
    b.syncer.commit(b.store, 10, keys=3)
    b.syncer.commit(b.store, 11, keys=0)  # a commit marker alone (a foreign `commit` overwritten)
    assert value(reg, "netfence_controller_commits_total") == 2
    assert value(reg, "netfence_controller_commit_keys_count") == 2
    assert value(reg, "netfence_controller_commit_keys_sum") == 3
    assert value(reg, "netfence_controller_commit_keys_bucket", le="0.0") == 1


def test_a_reconcile_that_wrote_nothing_is_no_commit() -> None:
    b = bed()
    b.syncer.reconciled_nothing(42)  # at start-up: the commit an earlier controller wrote
    assert value(b.metrics.registry, "netfence_controller_commits_total") == 0
    b.syncer.commit(b.store, 43, keys=1)
    b.syncer.reconciled_nothing(43)  # the periodic reconcile afterwards: the same commit again
    assert value(b.metrics.registry, "netfence_controller_commits_total") == 1


def test_event_to_commit_times_the_oldest_uncommitted_event_on_the_leader() -> None:
    b = bed()
    reg = b.metrics.registry
    b.metrics.api_event()
    b.clock.now += 0.03
    b.metrics.api_event()  # coalesced into the same commit: the older one counts
    b.clock.now += 0.02
    b.syncer.commit(b.store, 5, keys=2)
    assert value(reg, "netfence_controller_event_to_commit_seconds_count") == 1
    assert abs(value(reg, "netfence_controller_event_to_commit_seconds_sum") - 0.05) < 1e-9
    b.syncer.commit(b.store, 6, keys=1)  # a commit no event caused (a reconcile): nothing observed
    assert value(reg, "netfence_controller_event_to_commit_seconds_count") == 1


def test_event_to_commit_ignores_events_of_a_standby_and_of_an_earlier_term() -> None:
    b = bed()
    reg = b.metrics.registry
    b.election.is_leader = False
    b.metrics.api_event()  # a standby: its events are covered by the reconcile after its election
    b.election.is_leader = True
    b.clock.now += 60
    b.syncer.commit(b.store, 5, keys=4)
    assert value(reg, "netfence_controller_event_to_commit_seconds_count") == 0

    b.metrics.api_event()
    b.election.fence = Fence("/p/leader", 99)  # lost and won again meanwhile
    b.syncer.commit(b.store, 6, keys=4)
    assert value(reg, "netfence_controller_event_to_commit_seconds_count") == 0


def handler(registry: Any, name: str) -> Any:
    """The function Kopf calls for ``name`` events (its registry's watching handlers)."""
    [found] = [h.fn for h in registry._watching.get_all_handlers() if h.fn.__name__ == name]
    return found


async def test_the_event_handlers_feed_event_to_commit() -> None:
    from netfence.controller import handlers

    b = bed()
    pod_event = handler(handlers.build_registry(ControllerConfig(), b.metrics), "pod_event")
    memo = type("Memo", (), {"runtime": b.runtime})()
    body = {"metadata": {"namespace": "ns", "name": "a", "resourceVersion": "5", "uid": "u"},
            "spec": {}, "status": {"podIP": "10.0.0.5"}}
    await pod_event(memo=memo, type="ADDED", body=body)
    await pod_event(memo=memo, type="ADDED", body=body)  # a repeat changes nothing: not an event to commit
    assert b.syncer.notified == 1
    b.clock.now += 0.2
    b.syncer.commit(b.store, 3, keys=1)
    assert value(b.metrics.registry, "netfence_controller_event_to_commit_seconds_count") == 1
    assert abs(value(b.metrics.registry, "netfence_controller_event_to_commit_seconds_sum") - 0.2) < 1e-9


# --- commit -> enforced ----------------------------------------------------------------------


def test_commit_to_enforced_is_observed_once_per_policy_and_change() -> None:
    b = bed()
    reg = b.metrics.registry
    b.syncer.commit(b.store, 20, keys=2)
    b.clock.now += 0.1
    b.metrics.status_computed(facts(20), {"phase": "Pending"})
    assert value(reg, "netfence_controller_commit_to_enforced_seconds_count") == 0
    b.clock.now += 0.3
    b.metrics.status_computed(facts(20), {"phase": "Enforced"})
    b.clock.now += 5
    b.metrics.status_computed(facts(20), {"phase": "Enforced"})  # recomputed later: already observed
    assert value(reg, "netfence_controller_commit_to_enforced_seconds_count") == 1
    assert abs(value(reg, "netfence_controller_commit_to_enforced_seconds_sum") - 0.4) < 1e-9
    # Another policy enforced by the same commit: its own observation.
    b.metrics.status_computed(facts(20, "q"), {"phase": "Enforced"})
    assert value(reg, "netfence_controller_commit_to_enforced_seconds_count") == 2


def test_commit_to_enforced_skips_commits_it_did_not_see() -> None:
    b = bed()
    b.metrics.status_computed(facts(7), {"phase": "Enforced"})  # written by an earlier controller
    assert value(b.metrics.registry, "netfence_controller_commit_to_enforced_seconds_count") == 0


def test_the_status_writer_hook_reaches_the_metrics() -> None:
    from netfence.controller.status_writer import StatusWriter

    clock = Clock()
    metrics = ControllerMetrics(clock=clock)
    engine = ModelEngine()
    writer = StatusWriter(None, engine, WorldTracker(engine), {}, lambda: True)  # type: ignore[arg-type]
    writer.on_status.append(metrics.status_computed)
    metrics.own_transaction(3)
    metrics.on_commit(3, {"policies/ns/p"})
    clock.now += 1.5
    for hook in writer.on_status:
        hook(facts(3), {"phase": "Enforced"})
    assert value(metrics.registry, "netfence_controller_commit_to_enforced_seconds_sum") == 1.5


# --- listings ---------------------------------------------------------------------------------


async def test_watch_restarts_count_each_burst_once() -> None:
    b = bed()
    reg = b.metrics.registry
    b.runtime.relister.quiet, b.runtime.relister.max_delay = 0.01, 0.05
    for _ in range(5):  # Kopf hands every listed pod to the handler after re-connecting the watch
        b.runtime.watch_listed("pods")
    assert value(reg, "netfence_controller_watch_restarts_total", kind="pods") == 1
    task = asyncio.create_task(b.runtime.relister.run())
    try:
        for _ in range(200):
            if b.kube.calls and not b.runtime.relister.pending("pods"):
                break
            await asyncio.sleep(0.01)
        assert b.kube.calls == ["pods"]
        assert value(reg, "netfence_controller_relists_total", kind="pods") == 1
        b.runtime.watch_listed("pods")  # the next restart
        assert value(reg, "netfence_controller_watch_restarts_total", kind="pods") == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_full_relists_by_trigger() -> None:
    b = bed()
    reg = b.metrics.registry
    await b.runtime.full_resync()
    assert value(reg, "netfence_controller_full_relists_total", trigger="startup") == 1
    assert all(value(reg, "netfence_controller_relists_total", kind=k) == 1
               for k in ("pods", "namespaces", "networkpolicies", "nodes"))
    b.runtime._on_elected()
    assert value(reg, "netfence_controller_full_relists_total", trigger="elected") == 1
    assert value(reg, "netfence_controller_full_relists_total", trigger="periodic") == 0


def test_state_kept_by_the_runtime_is_read_at_scrape_time() -> None:
    b = bed()
    reg = b.metrics.registry
    assert value(reg, "netfence_controller_leader") == 1
    b.election.is_leader = False
    assert value(reg, "netfence_controller_leader") == 0
    b.status.api_writes = 4
    b.syncer.foreign_writes = 2
    b.syncer.commit(b.store, 77, keys=1)
    assert value(reg, "netfence_controller_status_writes_total") == 4
    assert value(reg, "netfence_controller_foreign_writes_total") == 2
    assert value(reg, "netfence_controller_commit_revision") == 77


def test_unbound_metrics_scrape_and_registries_are_separate() -> None:
    first, second = ControllerMetrics(), ControllerMetrics()  # no global registry: any number of them
    first.commits.inc()
    assert value(second.registry, "netfence_controller_commits_total") == 0
    text = generate_latest(first.registry).decode()
    assert "netfence_controller_commits_total 1.0" in text
    assert "# TYPE netfence_controller_leader gauge" in text  # declared, no sample before bind


def test_binding_twice_is_refused() -> None:
    b = bed()
    try:
        b.metrics.bind(b.runtime)
    except RuntimeError as exc:
        assert "already" in str(exc)
    else:
        raise AssertionError("bound twice")


# --- serving ------------------------------------------------------------------------------------


async def test_metrics_are_served_over_http_on_their_own_port() -> None:
    metrics = ControllerMetrics()
    metrics.commits.inc(3)
    port = free_port()
    async with metrics_server(metrics.registry, "127.0.0.1", port) as served:
        assert served == port
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert "netfence_controller_commits_total 3.0" in await resp.text()
    async with metrics_server(metrics.registry, "127.0.0.1", 0) as served:
        assert served is None  # port 0: no server


def test_after_a_failed_start_the_metrics_can_follow_the_next_runtime() -> None:
    """Kopf retries a failed start-up with the same metrics (memo): unbinding makes that possible."""
    b = bed()
    b.metrics.unbind(b.runtime)
    assert b.metrics.runtime is None
    assert b.metrics.own_transaction not in b.runtime.store.txn_listeners
    b.metrics.bind(b.runtime)  # no "already follow" error
    assert b.metrics.runtime is b.runtime
