"""Keeps one ClusterPolicyStatus per NetworkPolicy, with aggregated node status.

Runs on the leader only. Objects are created when a policy appears, deleted
when it goes (a DELETED event, a full listing that no longer has it, or this
writer's own listing finding an object whose policy is not in the world),
recreated when someone deletes them. ``.status`` is computed by the pure
:func:`netfence.status.aggregate.compute_status` and written only when it
differs from what this writer wrote last.

Generations: ``status.observedGeneration`` is the ClusterPolicyStatus object's
own ``metadata.generation`` (as kstatus, Flux and Argo CD read it), taken from
the listing and from every create/patch response; ``status.policyGeneration``
is the NetworkPolicy's. A response showing a generation other than the one just
written (someone changed the spec) marks the object for another write.

Every object is written on its own: an API error on one object is recorded for
that object, which is retried with its own backoff (0.5 s doubling, capped at
30 s) while the others proceed. The error is posted once as a Kubernetes Event
(on the ClusterPolicyStatus, or on the NetworkPolicy while its status object
does not exist). When the API server rejects a status as invalid, a reduced
status (phase, counters, conditions and a ``StatusWriteFailed`` condition with
the error) is written instead, so the object's phase stays true.

Names: ``<namespace>.<name>`` for a NetworkPolicy, ``cnp.<name>`` for a
ClusterNetworkPolicy, so the NetworkPolicy ``x`` of a namespace ``cnp`` wants the
cluster policy ``x``'s object. That object is the ClusterNetworkPolicy's while it
exists (whichever came first); the NetworkPolicy then has no status object, the
cluster policy's status carries a warning naming it, and the clash is logged and
posted as an Event on the NetworkPolicy once. When the cluster policy goes, the
NetworkPolicy gets the object back (``cps_claimants``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from netfence.controller.kube import (
    CLUSTER_STATUS_PREFIX,
    KubeApi,
    api_error_text,
    cps_claimants,
    cps_name,
    cps_reference,
    policy_reference,
)
from netfence.controller.world import PolicyMeta, WorldTracker
from netfence.model.compiler import ModelEngine
from netfence.model.relevance import node_revisions
from netfence.status.aggregate import (
    BadKeyHit,
    NodeReport,
    PolicyFacts,
    compute_status,
    reduced_status,
    strip_times,
    with_transition_times,
)
from netfence.status.badkeys import bad_key_hits
from netfence.status.sync_index import ReportChange, SyncIndex, report_change

log = logging.getLogger(__name__)

PolicyKey = tuple[str, str]
Evaluated = tuple[PolicyFacts, dict[str, Any]]  # a policy's facts and its status (without times)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
CALL_TIMEOUT = 10.0  # one object's API calls; a hung request must not hold up the others
CONCURRENCY = 16  # objects written at once (ControllerConfig.status_concurrency)


def backoff_delay(attempts: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait after ``attempts`` consecutive failures (>= 1) of one object."""
    return min(cap, first * 2.0 ** min(max(attempts - 1, 0), 30))


TRANSIENT_BACKOFF_MAX = 1.0  # API server unreachable or restarting: retry soon, it answers again any moment


def is_transient(exc: BaseException) -> bool:
    """True for failures that say nothing about the object: no connection, a timeout, or an
    API server that is (re)starting or overloaded (5xx, 429). Those retry at least every
    second, so status follows within a second of the API server answering again."""
    if isinstance(exc, ApiException):
        return exc.status is None or exc.status == 429 or exc.status >= 500
    return isinstance(exc, (OSError, TimeoutError, aiohttp.ClientError))


@dataclass
class ObjectFailure:
    """Consecutive failures of one object's writes (or of the listing, under ``""``)."""

    attempts: int = 0
    due: float = 0.0  # loop time of the next attempt
    error: str = ""
    reported: str = ""  # the error last posted as an Event (each distinct error once)


class StatusWriter:
    def __init__(
        self,
        kube: KubeApi,
        engine: ModelEngine,
        world: WorldTracker,
        key_revisions: dict[str, int],
        is_leader: Callable[[], bool],
        interval: float = 0.2,
        settle: float = 0.02,
        resync_seconds: float = 120.0,
        call_timeout: float = CALL_TIMEOUT,
        concurrency: int = CONCURRENCY,
        mark_all_on_report: bool = False,
    ):
        self.kube = kube
        self.engine = engine
        self.world = world
        self.key_revisions = key_revisions
        self.is_leader = is_leader
        self.interval = interval  # how long a status other than Enforced must hold before it is written
        self.settle = settle  # after a wake-up, wait this long for the rest of a burst (one commit's reports)
        self.resync_seconds = resync_seconds
        self.call_timeout = call_timeout
        self.concurrency = max(1, concurrency)
        # Benchmarks only (--baseline-status): every report change re-evaluates every policy,
        # as before the sync index (issue 11), so before/after figures come from one build.
        self.mark_all_on_report = mark_all_on_report
        self.index = SyncIndex()  # per node: policies it must enforce, unsynced ones by revision
        self.evaluations = 0  # statuses computed (for tests and benchmarks)
        # The model's warnings per policy, kept until the policy is marked (they cost O(pods) for
        # ipBlock rules; a report change does not change them).
        self._warnings: dict[PolicyKey, tuple[str, ...]] = {}
        self.reports: dict[str, NodeReport] = {}
        self.written: dict[str, dict[str, Any]] = {}  # name -> status without times
        self.full_status: dict[str, dict[str, Any]] = {}
        self.existing: set[str] = set()
        self.generations: dict[str, int] = {}  # name -> the object's metadata.generation, as last seen
        self.failures: dict[str, ObjectFailure] = {}  # object name -> its failures ("" = the listing)
        self.api_writes = 0
        # Called with every status computed (controller/metrics.py: commit -> enforced).
        self.on_status: list[Callable[[PolicyFacts, Mapping[str, Any]], None]] = []
        self._last_spec: dict[str, dict[str, Any]] = {}
        self._dirty: set[PolicyKey] = set()
        self._deleting: set[str] = set()  # names whose policy went away (until deleted)
        self._rejections: dict[str, str] = {}  # name -> API error last posted for a rejected status
        self._resync = True
        self._next_resync = 0.0
        self._check_orphans = True  # compare existing objects with the world in the next pass
        self._wake = asyncio.Event()
        # name -> loop time since which a computed status other than Enforced differs from the
        # written one (see _held_back)
        self._held_since: dict[str, float] = {}
        self._held: dict[str, PolicyKey] = {}  # the same names -> their policy, while held back
        self._listing: asyncio.Task[None] | None = None  # the periodic listing, while it runs
        self._created_during_listing: set[str] = set()  # objects it may have missed
        # Names x of ClusterNetworkPolicies whose status object cnp.x the NetworkPolicy cnp/x also
        # wants (as last seen: each clash is logged and posted once, see _track_clashes).
        self._clashes: set[str] = set()

    # --- inputs ---------------------------------------------------------

    def mark_all(self) -> None:
        """The model may have changed anywhere (a listing merged, a commit of unknown keys):
        compute every status again, warnings included."""
        self._warnings.clear()
        self._mark_every()

    def _mark_every(self) -> None:
        """Compute every status again (the model did not change: warnings are kept)."""
        self._dirty.update(self.world.policies)
        self._check_orphans = True
        # Clashes neither of whose policies is left (a marked survivor updates the others).
        self._clashes = {n for n in self._clashes if any(k in self.world.policies for k in clash_keys(n))}
        self._wake.set()

    def mark(self, keys: Iterable[PolicyKey]) -> None:
        """Something about these policies changed in the model (a commit, an event): compute
        their status, warnings included."""
        keys = set(keys)
        for key in keys:
            self._warnings.pop(key, None)
        self._mark_flipped(keys)

    def _mark_flipped(self, keys: Iterable[PolicyKey]) -> None:
        """A report changed these policies' state on a node: compute their status (the model,
        and so their warnings, did not change)."""
        before = len(self._dirty)
        self._dirty.update(keys)
        if len(self._dirty) != before:
            self._wake.set()

    def request_resync(self, full: bool = True) -> None:
        """List existing objects again: recreate missing ones, delete orphans, rewrite the ones
        someone changed. ``full`` (on becoming leader): also compute every status again. Without
        it (a re-list of the objects, periodic or after a watch gap) only objects whose listed
        state differs from what this writer knows are computed again: a pass over every policy
        would hold up the statuses of real changes behind it (seconds at 1,000 policies)."""
        self._resync = True
        if full:
            self._mark_every()
        else:
            self._wake.set()

    def policies_removed(self, keys: Iterable[PolicyKey]) -> None:
        """These policies left the world (a DELETED event or a full listing without them):
        delete their status objects. Keys that are (again) in the world are ignored at
        write time, so calling this for a policy that came back is harmless. Not leading:
        nothing to remember (becoming leader lists the objects and deletes orphans)."""
        if self.is_leader():
            keys = set(keys)
            self._deleting.update(cps_name(ns, name) for ns, name in keys)
            # A clash over a cnp.<name> object may have ended: the other policy takes the object
            # (back), or loses its warning (_track_clashes). The object stays while one exists.
            self._dirty.update(k for k in keys if k[0] in ("", CLUSTER_STATUS_PREFIX))
            self._wake.set()

    def on_commit(self, revision: int, keys: set[str]) -> None:
        if keys:
            self.mark(set(self.engine.policies_affected_by(keys)))
        else:
            self.mark_all()

    def set_report(self, node: str, report: NodeReport | None) -> None:
        """A node's report changed (None: gone). Marks only the policies whose status it can
        change (status/sync_index.py): those its new applied revision covers, or, when
        liveness, the error, bad keys or unenforceable rules changed, those the node must
        enforce. Cost: the policies that flip on that node, not all policies."""
        old = self.reports.get(node)
        if report is None:
            self.reports.pop(node, None)
        else:
            self.reports[node] = report
        if self.mark_all_on_report:
            self.mark_all()
            return
        change = report_change(old, report)
        covered = self.index.advance(node, None if report is None else report.applied_revision)
        if change is ReportChange.ALL:
            self._mark_flipped(self.index.required_on(node))
        self._mark_flipped(covered)

    def replace_reports(self, reports: dict[str, NodeReport]) -> None:
        """All node reports as read afresh (after a watch failure): reports that
        vanished meanwhile (expired leases) must not linger."""
        for node in sorted(self.reports.keys() | reports.keys()):
            if self.reports.get(node) != reports.get(node):
                self.set_report(node, reports.get(node))

    def status_deleted(self, name: str) -> None:
        """Someone deleted a status object: forget it so it is recreated (only it: ``<ns>.<name>``,
        and a namespace name has no dot; ``cnp.<name>`` by whichever policy owns it)."""
        self._forget(name)
        self._mark_flipped(set(cps_claimants(name)))

    async def delete(self, namespace: str, name: str) -> None:
        """The policy was deleted: its status object goes (asynchronously, retried on errors)."""
        self.policies_removed([(namespace, name)])

    def api_answers(self) -> None:
        """The API server answered the controller's own listing (after a watch gap or an
        outage): retry failed objects now instead of after their grown backoff, so status
        catches up within a second of the API server's return (issue 9.1; added by H1)."""
        if not self.failures:
            return
        now = self._now()
        for failure in self.failures.values():
            failure.due = min(failure.due, now)
        self._wake.set()

    # --- loop -----------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def next_due(self) -> float:
        """Loop time by which the loop must run again even without new input (a retry
        coming due, the periodic listing)."""
        due = [self._next_resync] + [f.due for f in self.failures.values()]
        due += [since + self.interval for name, since in self._held_since.items() if name in self._held]
        return min(due)

    async def run(self) -> None:
        while True:
            # Not leading: nothing is due (becoming leader requests a resync, which wakes us).
            timeout = max(0.0, self.next_due() - self._now()) if self.is_leader() else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            await asyncio.sleep(self.settle)
            if not self.is_leader():
                self._resync = True
                continue
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug, not an API error (those are handled per object)
                log.exception("status writer pass failed; retrying")
                self._resync = True
                await asyncio.sleep(1.0)
                self._wake.set()

    async def flush(self) -> None:
        """One pass: list if due, delete orphans, write every dirty object whose retry is due.

        Statuses are computed in the pass; the objects that need an API call (create, spec,
        a changed status) are written by up to ``concurrency`` writers at once, each object
        on its own: its failure and backoff are its own."""
        now = self._now()
        if self._resync:
            if self._listing is not None:  # superseded by this one
                self._listing.cancel()
                self._listing = None
            self._created_during_listing = set()  # nothing runs beside it: the listing is authoritative
            await self._resync_objects(now)  # becoming leader, a re-list: know what exists first
        elif now >= self._next_resync and self._listing is None:
            # The periodic listing (1,000 objects take the API server a second or more) runs
            # beside the passes: a pass must not wait for it to write a new policy's status.
            self._created_during_listing = set()
            self._listing = asyncio.create_task(self._resync_objects(now), name="status-listing")
            self._listing.add_done_callback(lambda _: self._wake.set())
        if self._listing is not None and self._listing.done():
            listing, self._listing = self._listing, None
            listing.result()  # its errors are handled inside (recorded, retried)
        await self._delete_orphans(now)
        for name, since in list(self._held_since.items()):
            if since + self.interval <= now and name in self._held:
                self._dirty.add(self._held.pop(name))
        dirty, self._dirty = self._dirty, set()
        hidden = self._track_clashes(dirty)
        hits = bad_key_hits(self.reports, self.engine) if dirty else {}
        async with asyncio.TaskGroup() as group:
            writers = BoundedTasks(group, self.concurrency)
            for hidden_policy in hidden:
                await writers.start(functools.partial(self._clash_event, hidden_policy))
            for key in sorted(dirty):
                name = cps_name(*key)
                meta = self.world.policies.get(key)
                owner = self._owner(name)
                if meta is None or owner != key:
                    self._not_written(key, name, owner)
                    continue
                failure = self.failures.get(name)
                if failure is not None and failure.due > now:
                    self._dirty.add(key)  # its own backoff; the others go on
                    continue
                bad_keys = tuple(hits.get(key, ()))
                # An object that exists with our spec: compute its status here and call the API
                # only if it changed. Others are created / get their spec first (in the writer).
                in_step = name in self.existing and self._last_spec.get(name) == status_spec(meta)
                evaluated = self._evaluate(meta, bad_keys) if in_step else None
                if evaluated is not None and self.written.get(name) == evaluated[1]:
                    self.failures.pop(name, None)  # nothing to write
                    self._release(name)
                elif evaluated is not None and self._held_back(name, evaluated[1], now):
                    self._held[name] = key  # computed again when it comes due, or when marked
                else:
                    self._release(name)
                    await writers.start(functools.partial(self._write_guarded, meta, bad_keys, evaluated))
                # facts() is CPU work (policy warnings); when no status changes nothing above awaits
                # I/O, so yield: a pass over many policies must not stall the syncer's commits.
                await asyncio.sleep(0)

    def _owner(self, name: str) -> PolicyKey | None:
        """The policy whose status object ``name`` is (on a clash the ClusterNetworkPolicy's);
        None when no policy in the world wants it."""
        return next((key for key in cps_claimants(name) if key in self.world.policies), None)

    def _not_written(self, key: PolicyKey, name: str, owner: PolicyKey | None) -> None:
        """``key`` is gone, or the object of its name is another policy's (``owner``, a name
        clash): forget its status. The object itself goes only when no policy owns it."""
        self.index.remove(key)
        self._warnings.pop(key, None)
        if owner is not None:
            return
        self._release(name)
        if name in self.existing:
            self._deleting.add(name)  # gone without policies_removed: the next pass deletes it
            self._wake.set()
        elif name not in self._deleting:
            self.failures.pop(name, None)  # nothing left to retry for it

    def _track_clashes(self, dirty: set[PolicyKey]) -> list[PolicyMeta]:
        """Note which ClusterNetworkPolicies among ``dirty`` now share their status object with
        a NetworkPolicy (``cnp.<x>``: the cluster policy ``x`` and the NetworkPolicy ``cnp/x``).
        Where that changed, both are added to ``dirty`` (the object changes hands, the cluster
        policy's warning comes or goes) and it is logged, once per change. Returns the
        NetworkPolicies that just lost their status object (an Event is posted on each)."""
        hidden: list[PolicyMeta] = []
        for policy in sorted({name for ns, name in dirty if ns in ("", CLUSTER_STATUS_PREFIX)}):
            cluster, namespaced = clash_keys(policy)
            clash = cluster in self.world.policies and namespaced in self.world.policies
            if clash == (policy in self._clashes):
                continue
            dirty.update((cluster, namespaced))
            self._release(cps_name(*cluster))  # a status held back was the other policy's
            if clash:
                self._clashes.add(policy)
                hidden.append(self.world.policies[namespaced])
                log.warning("ClusterPolicyStatus %s is ClusterNetworkPolicy %s's: NetworkPolicy %s/%s, which "
                            "wants the same name, gets no status until one of them is renamed or deleted",
                            cps_name(*cluster), policy, CLUSTER_STATUS_PREFIX, policy)
            else:
                self._clashes.discard(policy)
                log.info("ClusterPolicyStatus %s: name clash between ClusterNetworkPolicy %s and NetworkPolicy "
                         "%s/%s is over", cps_name(*cluster), policy, CLUSTER_STATUS_PREFIX, policy)
        return hidden

    async def _clash_event(self, meta: PolicyMeta) -> None:
        name = cps_name(meta.namespace, meta.name)
        await self._event(
            policy_reference(meta.namespace, meta.name, meta.uid),
            "StatusNameClash",
            f"ClusterPolicyStatus {name} belongs to ClusterNetworkPolicy {meta.name} (same name): this "
            "NetworkPolicy gets no status while that exists; rename it to get one (enforcement is not affected)",
        )

    @property
    def listing(self) -> asyncio.Task[None] | None:
        """The periodic listing of the objects while it runs beside the passes (its result is
        taken in at the start of the first pass after it ended)."""
        return self._listing

    def _held_back(self, name: str, status: Mapping[str, Any], now: float) -> bool:
        """Whether to hold back a changed status for now.

        ``Enforced`` is written at the next pass: it is what users and rollouts wait for. Any
        other status (a new change not yet on every node, or progress while it spreads) is
        written once it has held for ``interval``: a change that every node enforces within
        that time costs one write (its ``Enforced``), and progress on a slow rollout is
        written at most once per ``interval``."""
        if status.get("phase") == "Enforced":
            return False
        since = self._held_since.setdefault(name, now)
        return now < since + self.interval

    def _release(self, name: str) -> None:
        self._held_since.pop(name, None)
        self._held.pop(name, None)

    async def _write_guarded(
        self, meta: PolicyMeta, bad_keys: tuple[BadKeyHit, ...], evaluated: Evaluated | None
    ) -> None:
        """Write one object; its failure is recorded for it alone (retried with its backoff)."""
        key = (meta.namespace, meta.name)
        name = cps_name(*key)
        try:
            await asyncio.wait_for(self._write_one(meta, bad_keys, evaluated), self.call_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._dirty.add(key)
            await self._failed(name, exc, policy_reference(meta.namespace, meta.name, meta.uid))
        else:
            self.failures.pop(name, None)

    async def _resync_objects(self, now: float) -> None:
        """List every ClusterPolicyStatus. A failed listing is retried with backoff but does
        not stop the writes: objects are then created (409 = adopted) and patched blind."""
        listing_failure = self.failures.get("")
        if listing_failure is not None and listing_failure.due > now:
            return
        try:
            listed = await asyncio.wait_for(self.kube.list_statuses(), self.call_timeout * 6)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed("", exc, None)
            return
        self.failures.pop("", None)
        wanted = self._wanted()
        for name, obj in listed.items():
            if name not in wanted and obj.get("metadata", {}).get("labels", {}).get(
                "app.kubernetes.io/managed-by"
            ) == "netfence":
                self._deleting.add(name)
        known_written, known_spec, known_generations = self.written, self._last_spec, self.generations
        # Objects created while a background listing ran may be missing from it: they exist, as
        # this writer knows them.
        carried = (self._created_during_listing & self.existing & wanted) - listed.keys()
        self._created_during_listing = set()
        found = {n for n in listed if n in wanted}
        self.existing = found | carried
        self.written = {n: s for n in found if (s := strip_times(listed[n].get("status"))) is not None} | {
            n: known_written[n] for n in carried if n in known_written}
        self.full_status = {n: listed[n]["status"] for n in found if listed[n].get("status")} | {
            n: self.full_status[n] for n in carried if n in self.full_status}
        self._last_spec = {n: listed[n].get("spec", {}) for n in found} | {
            n: known_spec[n] for n in carried if n in known_spec}
        self.generations = {n: object_generation(listed[n]) for n in found} | {
            n: known_generations[n] for n in carried if n in known_generations}
        self._resync = False
        self._next_resync = now + self.resync_seconds
        # Compute again the objects that are missing or not as this writer left them (someone
        # changed or deleted them, or they are new to it); the others keep their marks.
        for key in self.world.policies:
            name = cps_name(*key)
            if (name not in self.existing or known_written.get(name) != self.written.get(name)
                    or known_spec.get(name) != self._last_spec.get(name)
                    or known_generations.get(name) != self.generations.get(name)):
                self._dirty.add(key)

    def _wanted(self) -> set[str]:
        return {cps_name(ns, name) for ns, name in self.world.policies}

    async def _delete_orphans(self, now: float) -> None:
        """Delete status objects whose policy is not in the world (however it left).

        Compares every existing object with the world only after ``mark_all`` (a listing
        was merged, a resync); otherwise just the names queued for deletion: a pass that
        deletes nothing costs nothing here."""
        if not self._check_orphans and not self._deleting:
            return
        wanted = self._wanted()
        if self._check_orphans:
            self._deleting |= self.existing - wanted
            self._check_orphans = False
        self._deleting -= wanted
        async with asyncio.TaskGroup() as group:
            writers = BoundedTasks(group, self.concurrency)
            for name in sorted(self._deleting):
                failure = self.failures.get(name)
                if failure is None or failure.due <= now:
                    await writers.start(functools.partial(self._delete_one, name))

    async def _delete_one(self, name: str) -> None:
        try:
            await asyncio.wait_for(self.kube.delete_status(name), self.call_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._deleting.add(name)
            await self._failed(name, exc, cps_reference(name))
            return
        self.api_writes += 1
        self._forget(name)

    def _forget(self, name: str) -> None:
        self._release(name)
        self.existing.discard(name)
        self._deleting.discard(name)
        self.written.pop(name, None)
        self.full_status.pop(name, None)
        self._last_spec.pop(name, None)
        self.generations.pop(name, None)
        self.failures.pop(name, None)
        self._rejections.pop(name, None)

    async def _failed(self, name: str, exc: BaseException, involved: dict[str, str] | None) -> None:
        """Record a failure of one object (``""``: the listing); post each distinct error once."""
        failure = self.failures.setdefault(name, ObjectFailure())
        failure.attempts += 1
        cap = TRANSIENT_BACKOFF_MAX if is_transient(exc) else BACKOFF_MAX
        failure.due = self._now() + backoff_delay(failure.attempts, cap=cap)
        failure.error = api_error_text(exc)
        what = f"ClusterPolicyStatus {name}" if name else "listing ClusterPolicyStatus objects"
        log.warning("%s failed (attempt %d, retry in %.1fs): %s", what, failure.attempts,
                    failure.due - self._now(), failure.error)
        if involved is None or failure.reported == failure.error:
            return
        if name in self.existing:
            involved = cps_reference(name)
        failure.reported = failure.error
        await self._event(involved, "StatusWriteFailed", f"writing ClusterPolicyStatus {name} failed: {failure.error}")

    async def _event(self, involved: dict[str, str], reason: str, message: str) -> None:
        try:
            await asyncio.wait_for(self.kube.post_event(involved, reason, message), self.call_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("posting event %s about %s failed: %s", reason, involved.get("name"), api_error_text(exc))

    def facts(self, meta: PolicyMeta, bad_keys: tuple[BadKeyHit, ...] = ()) -> PolicyFacts:
        key = (meta.namespace, meta.name)
        cached = self._warnings.get(key)
        view = self.engine.policy_view(meta.namespace, meta.name, with_warnings=cached is None)
        if view is not None:
            if cached is None:
                self._warnings[key] = view.warnings
            else:
                view = dataclasses.replace(view, warnings=cached)
        warnings: list[str] = []
        error = self.world.policy_errors.get((meta.namespace, meta.name))
        if error:
            warnings.append(f"invalid policy, not compiled: {error}")
        object_gen = self.generations.get(cps_name(meta.namespace, meta.name), 0)
        hides = ""  # a ClusterNetworkPolicy's: the NetworkPolicy whose status object it takes
        if not meta.namespace and clash_keys(meta.name)[1] in self.world.policies:
            hides = f"{CLUSTER_STATUS_PREFIX}/{meta.name}"
        if view is None:
            return PolicyFacts(meta.namespace, meta.name, meta.generation, frozenset(), 0, 0, tuple(warnings),
                               object_generation=object_gen, hides=hides)
        revision = max((self.key_revisions.get(k, 0) for k in view.relevant_keys), default=0)
        warnings.extend(view.warnings)
        # per node: the last change relevant to it (model/relevance.py); agents skip the others
        per_node = node_revisions(view.relevant_keys, lambda k: self.key_revisions.get(k, 0), view.nodes)
        return PolicyFacts(
            namespace=meta.namespace,
            name=meta.name,
            generation=meta.generation,
            required_nodes=frozenset(view.nodes),
            endpoints=len(view.endpoints),
            revision=revision,
            warnings=tuple(warnings),
            bad_keys=bad_keys,
            object_generation=object_gen,
            node_revisions=per_node,
            hides=hides,
        )

    def _evaluate(self, meta: PolicyMeta, bad_keys: tuple[BadKeyHit, ...] = ()) -> Evaluated:
        """Compute the policy's status (without times); the sync index learns its revision and nodes."""
        facts = self.facts(meta, bad_keys)
        status = compute_status(facts, self.reports)
        self.evaluations += 1
        self.index.update((meta.namespace, meta.name), facts.revision, facts.required_nodes, facts.node_revisions)
        for hook in self.on_status:
            hook(facts, status)
        return facts, status

    async def _write_one(
        self, meta: PolicyMeta, bad_keys: tuple[BadKeyHit, ...] = (), evaluated: Evaluated | None = None
    ) -> None:
        """Create the object / put our spec back if needed, then write its status if it changed.
        ``evaluated``: the status as computed by the pass (used unless the object changed here)."""
        name = cps_name(meta.namespace, meta.name)
        spec = status_spec(meta)
        if name not in self.existing:
            created = await self.kube.create_status(name, spec)
            self.api_writes += 1
            self.existing.add(name)
            self._created_during_listing.add(name)
            self.written.pop(name, None)
            self.full_status.pop(name, None)
            self._last_spec[name] = spec if created is not None else {}  # 409: adopt, and fix its spec
            if created is not None:
                self.generations[name] = object_generation(created)
            evaluated = None  # the object's generation is known only now
        if self._last_spec.get(name) != spec:
            if (self._last_spec.get(name) or {}).get("policyRef", spec["policyRef"]) != spec["policyRef"]:
                # The object changes hands (a name clash began or ended): its conditions'
                # transition times were the other policy's.
                self.full_status.pop(name, None)
            patched = await self.kube.patch_spec(name, spec)
            self.api_writes += 1
            self._last_spec[name] = spec
            self.generations[name] = object_generation(patched)
            evaluated = None
        _facts, status = evaluated if evaluated is not None else self._evaluate(meta, bad_keys)
        if self.written.get(name) == status:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        full = with_transition_times(status, self.full_status.get(name), now)
        try:
            present = await self.kube.patch_status(name, full)
        except ApiException as exc:
            if exc.status not in (400, 422):
                raise
            # The status itself is invalid for this API server (e.g. a CRD with other limits):
            # writing it again would fail again. Write what surely fits, with the error.
            error = api_error_text(exc)
            full = with_transition_times(reduced_status(status, error), self.full_status.get(name), now)
            present = await self.kube.patch_status(name, full)
            if present and self._rejections.get(name) != error:
                self._rejections[name] = error
                await self._event(cps_reference(name), "StatusRejected", f"status of {name} rejected: {error}")
        else:
            self._rejections.pop(name, None)
        if present is None:
            self._forget(name)
            self._dirty.add((meta.namespace, meta.name))
            self._wake.set()
            return
        self.api_writes += 1
        self.written[name] = status  # also after a reduced write: retried only when the status changes
        self.full_status[name] = full
        now_generation = object_generation(present)
        if now_generation and now_generation != status["observedGeneration"]:
            # Someone changed the object's spec meanwhile: put our spec back and write again.
            self.generations[name] = now_generation
            self._last_spec[name] = present.get("spec") or {}
            self._dirty.add((meta.namespace, meta.name))
            self._wake.set()


def clash_keys(name: str) -> tuple[PolicyKey, PolicyKey]:
    """The ClusterNetworkPolicy ``name`` and the NetworkPolicy ``cnp/<name>``: both want ``cnp.<name>``."""
    return ("", name), (CLUSTER_STATUS_PREFIX, name)


def status_spec(meta: PolicyMeta) -> dict[str, Any]:
    """The ``spec`` of a policy's ClusterPolicyStatus object."""
    if not meta.namespace:  # a ClusterNetworkPolicy
        return {
            "kind": "ClusterNetworkPolicy",
            "policy": {"namespace": "", "name": meta.name, "uid": meta.uid},
            "policyRef": meta.name,
            "generation": meta.generation,
        }
    return {
        "kind": "NetworkPolicy",
        "policy": {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid},
        "policyRef": f"{meta.namespace}/{meta.name}",
        "generation": meta.generation,
    }


class BoundedTasks:
    """Runs jobs as tasks of ``group``, at most ``limit`` at once: :meth:`start` waits for a free
    slot (so the caller's loop is held back, not the event loop). The group waits for them all."""

    def __init__(self, group: asyncio.TaskGroup, limit: int) -> None:
        self._group = group
        self._slots = asyncio.Semaphore(max(1, limit))

    async def start(self, job: Callable[[], Awaitable[None]]) -> None:
        await self._slots.acquire()
        self._group.create_task(self._run(job))

    async def _run(self, job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        finally:
            self._slots.release()


def object_generation(obj: Mapping[str, Any] | None) -> int:
    """``metadata.generation`` of an API object (0 when absent or not a number)."""
    value = ((obj or {}).get("metadata") or {}).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
