"""The agent loop's orchestration on in-memory fakes (tests/fakes/): commit ordering and coalescing,
apply failure and backoff, fail-static on errors, the node report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import pytest
from tests.fakes.agent import running
from tests.fakes.dataplane import FakeDataplane
from tests.fakes.store import FakeStore, MemoryEtcd

from netfence.agent.commits import coalesced
from netfence.agent.loop import Agent
from netfence.config import AgentConfig
from netfence.dataplane.names import policy_chain
from netfence.dataplane.render import Features
from netfence.dataplane.render_tiers import cluster_chain
from netfence.model.enforcement import (
    CompiledClusterPolicy,
    CompiledClusterRule,
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    PeerSet,
)

NODE = "node-1"
CLIENTS = PeerSet(PeerSet.make_id("pods", {"name": "clients"}), "pods", {"name": "clients"}, ("10.244.1.11",))
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), ("app/allow",), ())
POLICY_KEY = "policies/app/allow"
SET_KEY = f"sets/{CLIENTS.id}"
V4_ONLY = Features(ipv6=False)


def allow(port: int) -> CompiledPolicy:
    return CompiledPolicy("app", "allow", "uid-1", (CompiledRule((CLIENTS.id,), (CompiledPort("TCP", port),)),), None)


def raw(value: PeerSet | CompiledPolicy | CompiledClusterPolicy | Endpoint) -> bytes:
    return json.dumps(value.to_json()).encode()


def world(port: int = 80) -> dict[str, bytes | None]:
    return {POLICY_KEY: raw(allow(port)), SET_KEY: raw(CLIENTS), f"endpoints/{NODE}/app/web": raw(WEB)}


def policy_rules(kernel: FakeDataplane) -> tuple[str, ...]:
    return kernel.kernel.family_chains("v4").get(policy_chain("ingress", "app/allow"), ())


def opens(kernel: FakeDataplane, port: int) -> bool:
    return any(f"--dport {port} " in rule for rule in policy_rules(kernel))


class Setup:
    def __init__(self, resync_seconds: float = 3600.0) -> None:
        self.etcd = MemoryEtcd()
        self.controller = FakeStore(self.etcd, "controller")
        self.kernel = FakeDataplane()
        self.agent = Agent(AgentConfig(node=NODE, resync_seconds=resync_seconds), FakeStore(self.etcd, "agent"),
                           self.kernel, V4_ONLY)  # type: ignore[arg-type]
        self.retries: list[float] = []
        self._permits: asyncio.Queue[None] = asyncio.Queue()
        self.agent.retry_sleep = self._retry_sleep

    async def _retry_sleep(self, delay: float) -> None:
        self.retries.append(delay)
        self.etcd.notify()
        await self._permits.get()

    def allow_retry(self) -> None:
        self._permits.put_nowait(None)

    async def commit(self, changes: dict[str, bytes | None]) -> int:
        return await self.controller.write(changes, None)

    def report(self) -> dict[str, Any]:
        return self.controller.reports.reports().get(NODE, {})

    async def until(self, check: Callable[[], bool]) -> None:
        await self.etcd.until(check, timeout=10)

    async def applied(self, revision: int) -> None:
        """Until the agent has applied ``revision`` and reported it."""
        await self.until(lambda: self.agent.health.applied_revision == revision
                         and self.report().get("appliedRevision") == revision)


# --- coalescing: the pure part --------------------------------------------------------------------


async def test_coalesced_hands_over_everything_that_arrived_in_order_then_the_error() -> None:
    queue: asyncio.Queue[int | Exception] = asyncio.Queue()

    async def source() -> AsyncGenerator[int, None]:
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    groups: list[list[int]] = []
    stream = coalesced(source())
    async with contextlib.aclosing(stream):
        queue.put_nowait(1)
        groups.append(await anext(stream))
        for item in (2, 3, 4):
            queue.put_nowait(item)
        queue.put_nowait(ValueError("watch broke"))
        for _ in range(5):  # let the reader take all of it
            await asyncio.sleep(0)
        groups.append(await anext(stream))
        with pytest.raises(ValueError, match="watch broke"):
            await anext(stream)
    assert groups == [[1], [2, 3, 4]]


async def test_closing_coalesced_stops_its_reader() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.Event().wait()
        finally:
            closed.set()
        yield 2  # pragma: no cover

    stream = coalesced(source())
    assert await anext(stream) == [1]
    await stream.aclose()
    assert closed.is_set()


# --- commits: order and coalescing -----------------------------------------------------------------


async def test_first_apply_is_a_full_sync_of_the_committed_snapshot() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
    assert [(a.full, a.ok) for a in s.kernel.applies] == [(True, True)]
    assert opens(s.kernel, 80) and s.kernel.hooks_ensured == 1


async def test_commits_queued_during_an_apply_are_applied_as_one_in_commit_order() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        s.kernel.hold()
        second = await s.commit({POLICY_KEY: raw(allow(81))})
        await asyncio.to_thread(s.kernel.entered.wait, 5)  # applying the second commit, held
        third = await s.commit({POLICY_KEY: raw(allow(82))})
        deleted = await s.commit({SET_KEY: None})
        last = await s.commit({POLICY_KEY: raw(allow(83)), SET_KEY: raw(CLIENTS)})  # later wins, in order
        # the agent's reader has taken all three meanwhile (its watch asked for more after each)
        await s.until(lambda: s.etcd.delivered >= last)
        assert s.agent.health.target_revision == second
        s.kernel.release()
        await s.applied(last)
    assert third < deleted < last
    assert [a.ok for a in s.kernel.applies] == [True, True, True]  # the snapshot, the second, the rest at once
    assert opens(s.kernel, 83) and not opens(s.kernel, 82)
    assert s.agent.health.applies == 3


async def test_a_foreign_write_is_never_applied_and_is_reported() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        applies = len(s.kernel.applies)
        s.etcd.put(POLICY_KEY, raw(allow(9999)))  # etcdctl, outside any controller change
        await s.until(lambda: [e["key"] for e in s.report().get("badKeys", [])] == [POLICY_KEY])
        assert opens(s.kernel, 80) and not opens(s.kernel, 9999)
        assert all(a.ruleset == s.kernel.applies[applies - 1].ruleset for a in s.kernel.applies[applies:])
        fixed = await s.commit({POLICY_KEY: raw(allow(80))})  # the controller rewrites it
        await s.applied(fixed)
        await s.until(lambda: s.report().get("badKeys") == [])


# --- apply failure: backoff, full-sync retry, lastError, fail-static --------------------------------


async def test_a_failed_apply_keeps_the_rules_reports_the_error_and_retries_as_full_sync() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        good = s.kernel.kernel
        s.kernel.fail("iptables-restore: line 7 failed", "iptables-restore: line 9 failed")
        second = await s.commit({POLICY_KEY: raw(allow(81))})
        await s.until(lambda: "line 7 failed" in (s.report().get("lastError") or ""))
        assert s.kernel.kernel == good and s.kernel.uninstalls == 0  # previous rules in force
        assert s.report()["appliedRevision"] == first and s.agent.health.target_revision == second
        await s.until(lambda: s.retries == [0.5])  # the retry waits its backoff
        s.allow_retry()
        await s.until(lambda: "line 9 failed" in (s.report().get("lastError") or ""))
        assert s.kernel.kernel == good
        await s.until(lambda: s.retries == [0.5, 1.0])
        s.allow_retry()
        await s.applied(second)
        await s.until(lambda: s.report().get("lastError") is None)
    assert [(a.full, a.ok) for a in s.kernel.applies] == [
        (True, True), (False, False), (True, False), (True, True)]  # every retry is a full sync
    assert opens(s.kernel, 81) and s.kernel.uninstalls == 0


async def test_retry_backoff_doubles_up_to_the_resync_period() -> None:
    s = Setup(resync_seconds=2.0)
    s.kernel.fail(*(f"failure {i}" for i in range(5)))
    first = await s.commit(world(80))
    async with running(s.agent):
        for expected in ([0.5], [0.5, 1.0], [0.5, 1.0, 2.0], [0.5, 1.0, 2.0, 2.0], [0.5, 1.0, 2.0, 2.0, 2.0]):
            await s.until(lambda e=expected: s.retries == e)  # type: ignore[misc]
            s.allow_retry()
        await s.until(lambda: s.agent.health.applied_revision == first and s.agent.health.last_error is None)
    assert [a.full for a in s.kernel.applies] == [True] * 6
    assert [a.ok for a in s.kernel.applies] == [False] * 5 + [True]


async def test_a_commit_during_the_retry_backoff_is_applied_by_it_or_before_it() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        s.kernel.fail("boom")
        second = await s.commit({POLICY_KEY: raw(allow(81))})
        await s.until(lambda: s.retries == [0.5])
        third = await s.commit({POLICY_KEY: raw(allow(82))})  # applied at once (a full sync: after a failure)
        await s.applied(third)
        assert s.kernel.applies[-1].full and opens(s.kernel, 82)
        applies = len(s.kernel.applies)
        s.allow_retry()  # the retry loop's own full sync: the same state again
        await s.until(lambda: len(s.kernel.applies) > applies and s.report().get("appliedRevision") == third)
    assert second < third and s.agent.health.last_error is None
    assert [a.full for a in s.kernel.applies[-3:]] == [False, True, True]


# --- fail-static on etcd errors --------------------------------------------------------------------


async def test_an_etcd_outage_keeps_the_rules_and_the_agent_resumes_after_it() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        good, applies = s.kernel.kernel, len(s.kernel.applies)
        s.etcd.outage()
        await s.until(lambda: not s.agent.health.etcd_connected and len(s.etcd.pauses) >= 3)
        assert s.kernel.kernel == good and len(s.kernel.applies) == applies and s.kernel.uninstalls == 0
        assert s.agent.health.as_json()["enforcingStale"] is True
        s.etcd.outage(False)
        second = await s.commit({POLICY_KEY: raw(allow(81))})
        await s.applied(second)
        assert s.agent.health.etcd_connected and opens(s.kernel, 81)


async def test_stopping_the_agent_leaves_the_rules_in_place() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        good = s.kernel.kernel
    assert s.kernel.kernel == good and s.kernel.uninstalls == 0


async def test_the_report_is_republished_on_a_new_lease_when_its_lease_is_lost() -> None:
    s = Setup()
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        lease = s.etcd.keys[f"status/nodes/{NODE}"].lease
        s.etcd.revoke(lease)  # expired (the agent was cut off for a TTL)
        assert s.report() == {}
        await s.until(lambda: s.report().get("appliedRevision") == first)
        assert s.etcd.keys[f"status/nodes/{NODE}"].lease not in (0, lease)


async def test_a_drift_check_that_overlaps_an_apply_repairs_nothing() -> None:
    """The drift check reads the kernel outside the apply lock (commits must not wait for a long
    read); a read that overlapped an apply sees new rules against the old record, so its result
    is void: no "repair" of a kernel that was right."""
    s = Setup()
    periods: asyncio.Queue[None] = asyncio.Queue()
    sleeping = asyncio.Event()

    async def resync_sleep(_: float) -> None:
        sleeping.set()
        await periods.get()

    s.agent.resync_sleep = resync_sleep
    first = await s.commit(world(80))
    async with running(s.agent):
        await s.applied(first)
        s.kernel.hold_drift()
        sleeping.clear()
        periods.put_nowait(None)  # the resync period ends: the check starts reading the kernel ...
        await asyncio.to_thread(s.kernel.drift_entered.wait, 5)
        second = await s.commit({POLICY_KEY: raw(allow(81))})
        await s.applied(second)  # ... an apply runs meanwhile (it does not wait for the read) ...
        s.kernel.drifted = True  # ... and the read, torn, sees a kernel unlike the record
        s.kernel.release_drift()
        await asyncio.wait_for(sleeping.wait(), 10)  # the drift loop decided and sleeps again
        applies = len(s.kernel.applies)
        assert s.agent.health.drift_repairs == 0
        # A check that overlaps nothing and finds the kernel changed does repair.
        sleeping.clear()
        periods.put_nowait(None)
        await asyncio.wait_for(sleeping.wait(), 10)
        assert s.agent.health.drift_repairs == 1 and s.kernel.applies[-1].full
    assert applies == 2  # the overlapping check voided: no repair apply


# --- a restart facing a corrupt cluster policy (cpolicies/): the kernel's rules are pinned ----------


async def test_a_restarted_agent_keeps_the_kernel_rules_of_a_corrupt_cluster_policy_until_a_good_value() -> None:
    bad = PeerSet(PeerSet.make_id("pods", {"name": "bad"}), "pods", {"name": "bad"}, ("10.244.1.12",))
    deny = CompiledClusterPolicy("deny-bad", "uid-c", "Admin", 10,
                                 (CompiledClusterRule("Deny", CompiledRule((bad.id,), None)),), ())
    web = dataclasses.replace(WEB, admin_ingress=("deny-bad",))
    cnp_key, chain = "cpolicies/deny-bad", cluster_chain("ingress", "deny-bad")
    s = Setup()
    first = await s.commit({**world(80), f"sets/{bad.id}": raw(bad), cnp_key: raw(deny),
                            f"endpoints/{NODE}/app/web": raw(web)})
    async with running(s.agent):
        await s.applied(first)
    good = s.kernel.kernel
    assert chain in good.family_chains("v4")

    broken = await s.commit({cnp_key: b"{not json"})  # committed by a broken controller while the agent is down
    s.agent = Agent(AgentConfig(node=NODE, resync_seconds=3600.0), FakeStore(s.etcd, "agent"),
                    s.kernel, V4_ONLY)  # type: ignore[arg-type]
    async with running(s.agent):
        await s.applied(broken)
        assert s.kernel.kernel == good  # the Admin Deny (and everything else) stays exactly
        [entry] = s.report()["badKeys"]
        assert entry["key"] == cnp_key and "the rules already in the kernel for it are kept" in entry["reason"]
        fixed = await s.commit({cnp_key: raw(deny)})
        await s.applied(fixed)
        await s.until(lambda: s.report().get("badKeys") == [])
        assert s.kernel.kernel == good
