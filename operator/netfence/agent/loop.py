"""The agent's main loop: committed etcd state -> rendered rules -> the node's netfilter.

* Reads a consistent snapshot at the last commit marker, then follows the
  watch, applying only at commit markers (never half a change). Commits that
  arrive while an apply runs are applied together, in order, by the next one
  (agent/commits.py). The store is known only as an ``AgentStore``
  (store/protocols.py).
* Fan-out (issue 11): the agent watches only the commit marker, policies, sets
  and its own node's endpoints (``agent/commits.py`` ``node_ranges``). A commit
  that does not touch this node (``model/relevance.py``) is neither applied nor
  reported — unless its marker comes from a controller that wants every commit
  reported; then only the report moves. ``--watch-scope prefix`` restores the
  behaviour of agents before (benchmarks, upgrade tests).
* Fail-static: nothing is ever flushed on start, stop or error. The first apply
  after start replaces whatever is in the kernel atomically; until then the
  previous rules stay in force.
* A failed apply keeps the previous rules, is reported, and retried with
  backoff. Drift (someone changed our chains or sets) is repaired every
  ``resync_seconds``. An etcd outage keeps the last state enforced; when etcd
  returns the agent resumes, or resyncs from a snapshot if its revision was
  compacted.
* Integrity: a value that does not decode, or a write outside a controller
  change (foreign), is never applied; the last good value stays, and the key
  is listed in the report's ``badKeys``. A key with no good value at all (an
  agent restarted while it is bad) keeps the rules the kernel already holds
  for it (dataplane/pins.py). Rules the kernel cannot express match nothing
  and are listed in ``unenforceable``.
* ``--pod-cidrs=auto``: the node's pod CIDRs (``Features.workload_cidrs``: a pod there is
  denied until the model knows it) come from ``nodes/<node>``, which the controller writes
  from the Node's ``spec.podCIDRs``. When they appear or change, the next apply renders
  with them from scratch (a new renderer, a full sync); until they are known the agent
  behaves as without the option.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from netfence import __version__
from netfence.agent.commits import Action, absorb, coalesced, node_ranges
from netfence.agent.integrity import KeyState, bad_key_entries, nothing_pinned, report_fields, unenforceable_entries
from netfence.agent.metrics import AgentMetrics
from netfence.agent.node_state import NodeState
from netfence.config import AgentConfig
from netfence.dataplane.apply import ApplyError, Dataplane
from netfence.dataplane.incremental import IncrementalRenderer
from netfence.dataplane.pins import PinCache, PinKey, Pinned
from netfence.dataplane.render import Features, unenforceable
from netfence.store.connection import RETRY_BACKOFF_MAX
from netfence.store.errors import CompactedError
from netfence.store.protocols import AgentStore

log = logging.getLogger(__name__)


@dataclass
class AgentHealth:
    node: str = ""
    etcd_connected: bool = False
    applied_revision: int = 0  # the last commit applied (and reported)
    #: the last commit whose state the kernel enforces, commits that did not touch this node
    #: included (they are neither applied nor reported; model/relevance.py)
    synced_revision: int = 0
    target_revision: int = 0
    last_error: str | None = None
    last_sync: str | None = None
    rules: int = 0
    sets: int = 0
    applies: int = 0
    drift_repairs: int = 0
    bad_keys: int = 0
    unenforceable: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "version": __version__,
            "etcdConnected": self.etcd_connected,
            "appliedRevision": self.applied_revision,
            "targetRevision": self.target_revision,
            "syncedRevision": self.synced_revision,
            "lastError": self.last_error,
            "lastSync": self.last_sync,
            "rules": self.rules,
            "sets": self.sets,
            "applies": self.applies,
            "driftRepairs": self.drift_repairs,
            "badKeys": self.bad_keys,
            "unenforceable": self.unenforceable,
            "enforcingStale": not self.etcd_connected,
        }


class Agent:
    def __init__(self, config: AgentConfig, store: AgentStore, dataplane: Dataplane, features: Features,
                 metrics: AgentMetrics | None = None):
        self.config = config
        self.metrics = metrics if metrics is not None else AgentMetrics()  # /metrics (agent/metrics.py)
        self.store = store
        self.dataplane = dataplane
        self.features = features.without(config.disable_features)
        if self.features != features:
            log.warning("kernel features switched off by configuration: %s", ", ".join(config.disable_features))
        self.state = NodeState(config.node, max_schema=config.max_schema)
        # re-renders only the chains and sets a commit touches (dataplane/incremental.py)
        self.renderer = IncrementalRenderer(self.features, full=config.bench_full_render)
        self._pins = PinCache()
        self._unenforceable: list[tuple[str, str]] = []
        self._waiting_for_cidrs_logged = False  # --pod-cidrs=auto: "not known yet" is logged once
        self.health = AgentHealth(node=config.node)
        self._revision = 0
        self._apply_lock = asyncio.Lock()
        self._kernel_epoch = 0  # applies started (each may change the kernel): a drift check spanning one is void
        self._retry: asyncio.Task[None] | None = None
        self._report_wake = asyncio.Event()
        self._lease_id: int | None = None
        self.retry_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the apply retry's wait (tests)
        self.resync_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the drift check's period (tests)

    # --- main loop -----------------------------------------------------------

    async def run(self) -> None:
        await asyncio.to_thread(self.dataplane.ensure_hooks)
        tasks = [
            asyncio.create_task(self._follow(), name="follow-commits"),
            asyncio.create_task(self._drift_loop(), name="drift-repair"),
            asyncio.create_task(self._report_loop(), name="node-report"),
            asyncio.create_task(self._connectivity_loop(), name="etcd-connectivity"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if self._retry:
                self._retry.cancel()

    async def _follow(self) -> None:
        backoff = 0.2
        while True:
            try:
                every_commit = self.config.watch_scope == "prefix"  # as agents before issue 11
                ranges = None if every_commit else node_ranges(self.config.node, self.config.max_schema)
                snapshot = await self.store.committed_snapshot(include=self.state.wants, ranges=ranges)
                self.health.etcd_connected = True
                self.state.reset(snapshot.values, snapshot.foreign, snapshot.mod_revisions)
                self._revision = snapshot.commit_revision
                await self.apply()
                backoff = 0.2
                batches = self.store.follow_commits(
                    self._revision, include=self.state.wants, foreign_batches=True, ranges=ranges)
                # Commits that arrive while an apply runs are applied together, in order (agent/commits.py);
                # commits that do not touch this node are neither applied nor reported (model/relevance.py).
                async with contextlib.aclosing(coalesced(batches)) as groups:
                    async for group in groups:
                        self.health.etcd_connected = True
                        outcome = absorb(self.state, group, self._revision, every_commit=every_commit)
                        for batch in group:
                            if batch.is_commit:
                                self.metrics.committed(batch.commit_revision, batch.commit_time)
                        self._revision = outcome.revision
                        if outcome.action is Action.APPLY:
                            await self.apply()
                        else:
                            await self._unchanged(report=outcome.action is Action.REPORT)
                raise ConnectionError("watch ended")
            except asyncio.CancelledError:
                raise
            except CompactedError:
                log.warning("revision %d was compacted; taking a fresh snapshot", self._revision)
            except Exception as exc:
                self.health.etcd_connected = False
                log.warning("etcd unavailable (%s); enforcing the last applied state", exc)
                self._report_wake.set()
                await self.store.pause(backoff)  # ends early once etcd is reachable again
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX)

    async def apply(self, full: bool = False) -> bool:
        """Render the current state and apply it; True on success."""
        async with self._apply_lock:
            self._kernel_epoch += 1
            revision = self._revision
            self.health.target_revision = revision
            model = self.state.model()
            if self._adopt_node_cidrs():
                full = True  # every chain ends differently: render and sync everything afresh
            try:
                pinned = await self._pinned(self.state.unresolved())
                if full:
                    self.renderer.reset()  # a repair or retry also renders everything afresh
                ruleset = self.renderer.render(model, pinned=pinned)
                self._unenforceable = unenforceable(model, self.features)
                self.health.bad_keys = len(self.state.bad_keys())
                self.health.unenforceable = len(self._unenforceable)
                if full:
                    self.dataplane.forget_applied()
                result = await asyncio.to_thread(self.dataplane.apply, ruleset)
            except ApplyError as exc:
                self.health.last_error = str(exc)[:1000]
                log.error("apply of revision %d failed, previous rules stay: %s", revision, exc)
                self.metrics.apply_failed()
                self._report_wake.set()
                self._schedule_retry()
                return False
            self.health.applied_revision = revision
            self.health.synced_revision = revision
            self.health.last_error = None
            self.health.last_sync = datetime.now(UTC).isoformat(timespec="milliseconds")
            self.health.rules = result.rules
            self.health.sets = result.sets
            self.health.applies += 1
            self.metrics.applied(revision, result)
            self._report_wake.set()
            return True

    def _adopt_node_cidrs(self) -> bool:
        """``--pod-cidrs=auto``: take the pod CIDRs of ``nodes/<node>`` into the features when they
        differ from the ones rendered; True when the features changed (the renderer is new then).
        Call under the apply lock."""
        if not self.config.pod_cidrs_auto:
            return False
        cidrs = self.state.pod_cidrs
        if cidrs is None and not self._waiting_for_cidrs_logged:
            self._waiting_for_cidrs_logged = True
            log.info("--pod-cidrs=auto: the controller has published no pod CIDRs of node %s yet (nodes/%s); "
                     "unknown workloads are not dropped until it does", self.config.node, self.config.node)
        wanted = cidrs or ()
        if wanted == self.features.workload_cidrs:
            return False
        log.info("pod CIDRs of node %s: %s (from nodes/%s); unknown workloads there are %s",
                 self.config.node, ", ".join(wanted) or "none", self.config.node,
                 "dropped" if wanted else "no longer dropped")
        self.features = dataclasses.replace(self.features, workload_cidrs=wanted)
        self.renderer = IncrementalRenderer(self.features, full=self.config.bench_full_render)
        return True

    async def _unchanged(self, report: bool) -> None:
        """Commits up to ``self._revision`` left this node's rules as they are: the kernel already
        enforces that state. ``report``: say so in the report (the controller wants every
        commit reported); otherwise only health's ``syncedRevision`` moves."""
        async with self._apply_lock:
            if self.health.last_error is not None or self.health.applies == 0:
                return  # not enforcing a known state: the retry's apply reports
            self.health.target_revision = self._revision
            self.health.synced_revision = self._revision
            if report:
                self.health.applied_revision = self._revision
                self._report_wake.set()

    async def _pinned(self, unresolved: dict[str, PinKey]) -> Pinned:
        """The kernel's rules for keys without a good value, read (once) before our apply replaces them."""
        needs = self._pins.needs(unresolved.values())
        if needs:
            kernel = await asyncio.to_thread(self.dataplane.read_state)
            self._pins.learn(kernel, needs, self.dataplane.families)
            for key, pin in sorted(unresolved.items()):
                if pin in needs:
                    kept = self._pins.found(pin)
                    log.warning(
                        "%s has no good value (%s); %s", key, self.state.bad_keys().get(key, "bad"),
                        "keeping the rules the kernel holds for it" if kept
                        else f"the kernel holds no rules for it: {nothing_pinned(pin)}",
                    )
        return self._pins.pinned(unresolved.values())

    def _schedule_retry(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_loop(), name="apply-retry")

    async def _retry_loop(self) -> None:
        """Retry a failed apply (a full sync) with backoff, at least once per resync period."""
        delay = 0.5
        limit = min(30.0, max(1.0, self.config.resync_seconds))
        while self.health.last_error is not None:
            await self.retry_sleep(delay)
            delay = min(delay * 2, limit)
            if await self.apply(full=True):
                log.info("apply succeeded again at revision %d", self.health.applied_revision)
                return

    async def _drift_loop(self) -> None:
        while True:
            await self.resync_sleep(self.config.resync_seconds)
            if self.health.applies == 0 or self.health.last_error is not None:
                continue  # nothing applied yet, or the retry loop is already re-applying
            # The kernel is read outside the apply lock (a read of tens of thousands of rules
            # takes a second or more: commits must not wait for it). A read that overlapped an
            # apply may see new rules against the old record and "repair" a kernel that was
            # right, so such a check is void (the next period checks again).
            async with self._apply_lock:  # an apply in flight finishes first
                epoch = self._kernel_epoch
            try:
                drifted = await asyncio.to_thread(self.dataplane.check_drift)
            except Exception as exc:
                log.warning("drift check failed: %s", exc)
                continue
            async with self._apply_lock:  # waits for an apply in flight, which voids the check
                if self._kernel_epoch != epoch or self.health.last_error is not None:
                    log.debug("drift check overlapped an apply; checking again in %.0fs",
                              self.config.resync_seconds)
                    continue
            if drifted:
                log.warning("netfilter state drifted from what was applied; repairing")
                self.health.drift_repairs += 1
                await self.apply(full=True)

    async def _connectivity_loop(self, interval: float = 1.0) -> None:
        """Keep ``etcdConnected`` current: a silent watch can take long to notice an outage."""
        while True:
            try:
                await asyncio.wait_for(self.store.commit_revision(), interval * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.health.etcd_connected:
                    log.warning("etcd does not answer (%s); enforcing the last applied state", exc)
                self.health.etcd_connected = False
            else:
                self.health.etcd_connected = True
            await asyncio.sleep(interval)

    # --- reporting -----------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "node": self.config.node,
            "appliedRevision": self.health.applied_revision,
            "time": self.health.last_sync or datetime.now(UTC).isoformat(timespec="milliseconds"),
            "rules": self.health.rules,
            "sets": self.health.sets,
            "lastError": self.health.last_error,
            "version": __version__,
            "schemaSupported": list(self.state.schemas_supported),
            **report_fields(self.bad_key_entries(), unenforceable_entries(self._unenforceable)),
        }

    def bad_key_entries(self) -> list[dict[str, str]]:
        """The report's ``badKeys`` (uncapped): each bad key, why, and what is enforced for it."""
        bad = self.state.bad_keys()
        states: dict[str, KeyState] = {}
        for key in bad:
            pin = self.state.pin_key(key)
            good = pin is not None and self.state.has_good_value(pin)
            states[key] = KeyState(pin, good, None if pin is None or good else self._pins.found(pin))
        return bad_key_entries(bad, states)

    async def _report_loop(self) -> None:
        """Keep the node report current, bound to a lease that expires if this agent dies."""
        last: dict[str, Any] | None = None
        while True:
            try:
                lease_id = await self.store.grant_lease(self.config.report_ttl)
                last = None
                async with self.store.keep_lease(lease_id, self.config.report_ttl) as keeper:
                    while keeper.alive:
                        self._report_wake.clear()  # before reading: a later apply wakes us again
                        current = self.report()
                        if current != last and self.health.applies > 0:
                            await self.store.put_report(self.config.node, current, lease_id)
                            last = current
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._report_wake.wait(), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("writing the node report failed (%s); retrying", exc)
                await self.store.pause(1.0)  # ends early once etcd is reachable again
