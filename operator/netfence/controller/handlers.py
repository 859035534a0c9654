"""Kopf wiring: thin handlers that feed events into the runtime.

The controller never writes to the objects it watches: it uses only event
handlers (no progress or diff-base storage, no finalizers), and Kopf's
persistence is switched to memory so nothing is ever stored on users' objects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import kopf

from netfence.config import ControllerConfig
from netfence.controller.kube import CNP_GROUP, CNP_PLURAL, CPS_GROUP, CPS_PLURAL, CPS_VERSION
from netfence.controller.metrics import ControllerMetrics
from netfence.controller.runtime import ControllerRuntime
from netfence.controller.world import CLUSTER_POLICIES

log = logging.getLogger(__name__)


class _NoStorage(kopf.ProgressStorage):  # type: ignore[misc]
    """Progress storage that stores nothing (event handlers need none)."""

    def fetch(self, **_: Any) -> None:
        return None

    def store(self, **_: Any) -> None:
        return None

    def purge(self, **_: Any) -> None:
        return None

    def touch(self, **_: Any) -> None:
        return None

    def clear(self, *, essence: Any) -> Any:
        return essence


class _NoDiffBase(kopf.DiffBaseStorage):  # type: ignore[misc]
    """No change detection: every handler here is an ``on.event`` handler, which Kopf calls
    for every event whatever the diff. Kopf still builds an "essence" of each object per
    event (a deep copy of the whole body) for its diff; an empty one costs nothing (that
    copy was about 1 ms of CPU per event, a tenth of the controller's cold start)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, **_: Any) -> None:
        return None

    def store(self, **_: Any) -> None:
        return None


class RetryBackoffs:
    """Kopf's ``networking.error_backoffs``: 0.25 s, 0.5 s, then every second, never giving up.

    Kopf sleeps these (uninterruptibly) between attempts of one request; when the list
    is exhausted the request fails. A watch request that fails with a connection error
    is simply repeated, but one failing with a 5xx/403/429 escalates and kills that
    resource's watcher for good. So: short (the watch is re-established within about a
    second of the API server answering, however long it was down) and endless. Iterable
    again and again (Kopf iterates it once per request), deliberately without ``len()``.
    """

    def __init__(self, first: tuple[float, ...] = (0.25, 0.5), then: float = 1.0):
        self.first = first
        self.then = then

    def __iter__(self) -> Iterator[float]:
        return itertools.chain(self.first, itertools.repeat(self.then))


def _runtime(memo: Any) -> ControllerRuntime:
    runtime: ControllerRuntime = memo.runtime
    return runtime


def build_registry(config: ControllerConfig, metrics: ControllerMetrics | None = None) -> kopf.OperatorRegistry:
    """All handlers of the controller, registered on a fresh registry (no import-time effects);
    ``metrics``: where the runtime counts (served by main; default: a registry of its own)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> Any:
        # In a pod: the service account; elsewhere: the kubeconfig (KUBECONFIG set by main).
        return await kopf.login_via_async_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.progress_storage = _NoStorage()
        settings.persistence.diffbase_storage = _NoDiffBase()
        settings.persistence.finalizer = "netfence.dev/unused"  # never added: no deletion handlers
        settings.posting.level = logging.WARNING
        settings.scanning.disabled = True  # resources are fixed; no need to list CRDs (and no RBAC for it)
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.error_backoffs = RetryBackoffs()
        settings.watching.reconnect_backoff = 0.1  # pause before a re-list after 410 Gone (Kopf's default)
        memo.runtime = await ControllerRuntime.start(config, metrics)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        runtime = getattr(memo, "runtime", None)
        if runtime is not None:
            await runtime.stop()

    @kopf.on.probe(id="etcd", registry=registry)
    async def probe_etcd(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        """Not ready (the health endpoint fails) while etcd does not answer or writes fail."""
        runtime = _runtime(memo)
        syncer = runtime.syncer
        try:
            await asyncio.wait_for(runtime.store.get("meta/schema"), 2.0)
        except Exception as exc:
            raise kopf.PermanentError(f"etcd unreachable: {exc}") from exc
        if runtime.election.is_leader and not syncer.healthy and syncer.last_error:
            raise kopf.PermanentError(f"etcd writes failing: {syncer.last_error}")
        return {
            "leader": runtime.election.is_leader,
            "commitRevision": syncer.commit_revision,
            "lastError": syncer.last_error,
        }

    # Every event handler is ``async``: Kopf runs plain ``def`` handlers in a thread pool, but
    # the world, the engine and the syncer's asyncio.Event may only be touched from the loop.
    #
    # ``type`` None marks an object from Kopf's listing: Kopf lists a kind before watching it,
    # at start-up and again whenever it has to restart the watch (410 Gone after an API server
    # restart or a long disconnect, watch errors). A re-list reports only objects that exist,
    # so deletions in the gap would be lost: every such burst makes the runtime reconcile the
    # kind against a listing of its own (kopf/_cogs/clients/watching.py: continuous_watch).
    def _feed(memo: Any, kind: str, event_type: str | None, body: Any) -> bool:
        """Apply one event to the world; False when it was stale or a repeat."""
        runtime = _runtime(memo)
        if event_type is None:
            runtime.watch_listed(kind)
        if not runtime.world.apply(kind, event_type, dict(body)):
            return False
        runtime.metrics.api_event()
        runtime.syncer.notify()
        return True

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def pod_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
        _feed(memo, "pods", type, body)

    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def namespace_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
        _feed(memo, "namespaces", type, body)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
        _feed(memo, "nodes", type, body)

    def _policy_event(memo: Any, kind: str, key: tuple[str, str], event_type: str | None, body: Any,
                      invalid: str) -> None:
        """A NetworkPolicy or ClusterNetworkPolicy event: the world, its status, its warning Event."""
        runtime = _runtime(memo)
        changed = _feed(memo, kind, event_type, body)
        if event_type == "DELETED":
            # Not when the event was stale and a newer policy of that name exists.
            if key not in runtime.world.policies:
                runtime.policies_removed([key])
            return
        if key not in runtime.world.policies:
            return  # a stale event of a policy already gone
        if not changed and key in runtime.warnings_posted:
            return  # a repeat (Kopf's listing after a (re)connect): its status and warnings are current
        runtime.status.mark({key})
        if not runtime.election.is_leader:
            return
        view = runtime.engine.policy_view(*key)
        warnings = tuple(view.warnings) if view else ()
        error = runtime.world.policy_errors.get(key)
        if error:
            warnings = (f"{invalid}: {error}", *warnings)
        if warnings and runtime.warnings_posted.get(key) != warnings:
            kopf.warn(body, reason="NetfencePolicyWarning", message="; ".join(warnings)[:1000])
        runtime.warnings_posted[key] = warnings

    @kopf.on.event("networking.k8s.io", "v1", "networkpolicies", registry=registry)
    async def policy_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        _policy_event(memo, "networkpolicies", key, type, body, "invalid policy")

    # ClusterNetworkPolicy (optional CRD, served version preferred by the API server). Without
    # the CRD, Kopf logs once that the resource is unresolved and never calls this handler; the
    # runtime's own listings of the kind find nothing (controller/kube.py). Scanning is disabled,
    # so a CRD installed later is watched after a controller restart (until then the runtime
    # lists the kind every 10 s once a listing found it: ControllerRuntime._note_cluster_policy_crd).
    @kopf.on.event(CNP_GROUP, CNP_PLURAL, registry=registry)
    async def cluster_policy_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
        _policy_event(memo, CLUSTER_POLICIES, ("", body["metadata"]["name"]), type, body, "cannot be enforced")

    @kopf.on.event(CPS_GROUP, CPS_VERSION, CPS_PLURAL, registry=registry)
    async def status_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            _runtime(memo).status.status_deleted(body["metadata"]["name"])
        elif type is None:
            _runtime(memo).watch_listed(CPS_PLURAL)

    return registry
