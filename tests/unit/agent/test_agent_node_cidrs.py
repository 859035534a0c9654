"""``--pod-cidrs=auto``: the agent takes its node's pod CIDRs from ``nodes/<node>`` (the controller
publishes the Node's spec.podCIDRs) and drops unknown workloads there once they are known; on the
in-memory fakes (tests/fakes/)."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.fakes.agent import running
from tests.fakes.dataplane import FakeDataplane
from tests.fakes.store import FakeStore, MemoryEtcd

from netfence.agent.commits import node_ranges
from netfence.agent.loop import Agent
from netfence.agent.node_state import NodeState
from netfence.config import AgentConfig
from netfence.dataplane.render import Features
from netfence.dataplane.ruleset import FROM_WL_CHAIN, TO_WL_CHAIN
from netfence.model.enforcement import Endpoint
from netfence.store.ranges import KeyRange

NODE = "node-1"
V4_ONLY = Features(ipv6=False)
WEB = Endpoint(NODE, "app", "web", ("10.244.1.10",), (), ())


def cidrs(*values: str) -> bytes:
    return json.dumps({"schema": 1, "podCIDRs": list(values)}).encode()


def endpoint(ep: Endpoint) -> bytes:
    return json.dumps(ep.to_json()).encode()


# --- NodeState ------------------------------------------------------------------------------------


def test_node_state_reads_its_own_node_key_only() -> None:
    state = NodeState(NODE)
    assert state.wants(f"nodes/{NODE}")
    assert not state.wants("nodes/node-2") and not state.wants(f"nodes/{NODE}x")
    assert not state.wants(f"nodes/{NODE}/x") and not state.wants(f"status/nodes/{NODE}")
    assert state.pod_cidrs is None
    state.update({f"nodes/{NODE}": cidrs("10.244.1.0/24", "fd00:1::/64"), "nodes/node-2": cidrs("10.244.2.0/24")})
    assert state.pod_cidrs == ("10.244.1.0/24", "fd00:1::/64")
    state.update({f"nodes/{NODE}": None})
    assert state.pod_cidrs is None
    state.reset({f"nodes/{NODE}": cidrs("10.244.1.0/24")})
    assert state.pod_cidrs == ("10.244.1.0/24",)
    state.reset({})  # absent from a fresh snapshot: dropped
    assert state.pod_cidrs is None


def test_a_corrupt_node_value_keeps_the_last_good_one_and_is_a_bad_key() -> None:
    state = NodeState(NODE)
    key = f"nodes/{NODE}"
    state.update({key: cidrs("10.244.1.0/24")})
    for bad in (b"not json", cidrs(), cidrs("10.244.1.7/24"), b'{"schema":1}'):
        state.update({key: bad})
        assert state.pod_cidrs == ("10.244.1.0/24",)
        assert key in state.bad_keys() and state.bad_keys()[key].startswith("corrupt value")
        assert state.pin_key(key) is None  # no rules of its own to pin
        assert key not in state.unresolved()
    state.update({key: cidrs("10.244.9.0/24")})
    assert state.pod_cidrs == ("10.244.9.0/24",) and key not in state.bad_keys()
    state.mark_foreign({key: 99})  # a foreign write: not applied, reported
    assert "written outside a controller commit" in state.bad_keys()[key]


def test_the_agent_watches_exactly_its_own_node_key() -> None:
    ranges = node_ranges(NODE, 2)
    assert KeyRange(f"nodes/{NODE}", prefix=False) in ranges
    assert not any(r.rel.startswith("nodes/") and r.prefix for r in ranges)
    assert KeyRange(f"nodes/{NODE}", prefix=False) in node_ranges(NODE, 1)


# --- the agent on the fakes --------------------------------------------------------------------------


class Setup:
    def __init__(self, pod_cidrs: str = "auto") -> None:
        self.etcd = MemoryEtcd()
        self.controller = FakeStore(self.etcd, "controller")
        self.kernel = FakeDataplane()
        auto = pod_cidrs == "auto"
        explicit = () if auto or not pod_cidrs else tuple(pod_cidrs.split(","))
        config = AgentConfig(node=NODE, resync_seconds=3600.0, pod_cidrs=explicit, pod_cidrs_auto=auto)
        features = Features(ipv6=False, workload_cidrs=explicit)  # as agent/main.py makes them
        self.agent = Agent(config, FakeStore(self.etcd, "agent"), self.kernel, features)  # type: ignore[arg-type]

    async def commit(self, changes: dict[str, bytes | None]) -> int:
        return await self.controller.write(changes, None)

    async def until(self, check: Callable[[], bool]) -> None:
        await self.etcd.until(check, timeout=10)

    async def applied(self, revision: int) -> None:
        await self.until(lambda: self.agent.health.applied_revision == revision
                         and self.agent.health.last_error is None)

    def chain(self, name: str) -> tuple[str, ...]:
        return self.kernel.kernel.family_chains("v4").get(name, ())


def drops(cidr: str) -> tuple[str, str]:
    return (f'-s {cidr} -m comment --comment "netfence egress from unknown workload" -j DROP',
            f'-d {cidr} -m comment --comment "netfence ingress to unknown workload" -j DROP')


async def test_auto_mode_follows_the_published_cidrs() -> None:
    s = Setup("auto")
    first = await s.commit({f"endpoints/{NODE}/app/web": endpoint(WEB)})
    async with running(s.agent):
        # not published yet: as without the option (no drops, no RETURN rules for known pods)
        await s.applied(first)
        assert s.chain(TO_WL_CHAIN) == () and s.chain(FROM_WL_CHAIN) == ()
        assert s.agent.features.workload_cidrs == ()

        # published: the features switch, rendered from scratch and synced in full
        applies = len(s.kernel.applies)
        published = await s.commit({f"nodes/{NODE}": cidrs("10.244.1.0/24", "fd00:1::/64")})
        await s.applied(published)
        assert s.agent.features.workload_cidrs == ("10.244.1.0/24", "fd00:1::/64")
        egress, ingress = drops("10.244.1.0/24")
        assert s.chain(TO_WL_CHAIN) == ("-d 10.244.1.10/32 -j RETURN", ingress)
        assert s.chain(FROM_WL_CHAIN) == ("-s 10.244.1.10/32 -j RETURN", egress)
        assert s.kernel.applies[applies:] and all(a.full for a in s.kernel.applies[applies:])

        # another node's key is not even received; the incremental path goes on with the new features
        other = await s.commit({"nodes/node-2": cidrs("10.244.2.0/24")})
        web2 = Endpoint(NODE, "app", "web2", ("10.244.1.11",), (), ())
        added = await s.commit({f"endpoints/{NODE}/app/web2": endpoint(web2)})
        assert other < added
        await s.applied(added)
        assert s.chain(TO_WL_CHAIN) == ("-d 10.244.1.10/32 -j RETURN", "-d 10.244.1.11/32 -j RETURN", ingress)
        assert not s.kernel.applies[-1].full

        # a corrupt value keeps the last good CIDRs (and is reported)
        corrupt = await s.commit({f"nodes/{NODE}": b'{"schema":1,"podCIDRs":["10.244.0.0/33"]}'})
        await s.applied(corrupt)
        assert s.agent.features.workload_cidrs == ("10.244.1.0/24", "fd00:1::/64")
        assert s.chain(TO_WL_CHAIN)[-1] == ingress
        assert [b["key"] for b in s.agent.report()["badKeys"]] == [f"nodes/{NODE}"]

        # changed CIDRs replace the drops
        moved = await s.commit({f"nodes/{NODE}": cidrs("10.244.8.0/22")})
        await s.applied(moved)
        assert s.chain(TO_WL_CHAIN)[-1] == drops("10.244.8.0/22")[1]
        assert len([r for r in s.chain(TO_WL_CHAIN) if "unknown workload" in r]) == 1
        assert s.agent.report()["badKeys"] == []

        # the key goes (the Node was deleted): no drops any more
        gone = await s.commit({f"nodes/{NODE}": None})
        await s.applied(gone)
        assert s.agent.features.workload_cidrs == ()
        assert s.chain(TO_WL_CHAIN) == () and s.chain(FROM_WL_CHAIN) == ()


async def test_auto_mode_with_cidrs_already_published_drops_from_the_first_apply() -> None:
    s = Setup("auto")
    first = await s.commit({f"endpoints/{NODE}/app/web": endpoint(WEB), f"nodes/{NODE}": cidrs("10.244.1.0/24")})
    async with running(s.agent):
        await s.applied(first)
        assert s.kernel.applies[0].full and s.kernel.applies[0].ok
        assert len(s.kernel.applies) == 1  # no first apply without the drops
        assert s.chain(TO_WL_CHAIN)[-1] == drops("10.244.1.0/24")[1]


async def test_without_auto_the_node_key_changes_nothing() -> None:
    for option, expected in (("", ()), ("10.244.5.0/24", ("10.244.5.0/24",))):
        s = Setup(option)
        first = await s.commit({f"endpoints/{NODE}/app/web": endpoint(WEB), f"nodes/{NODE}": cidrs("10.244.1.0/24")})
        async with running(s.agent):
            await s.applied(first)
            changed = await s.commit({f"nodes/{NODE}": cidrs("10.244.3.0/24")})
            await s.applied(changed)
            assert s.agent.features.workload_cidrs == expected
            assert [r for r in s.chain(TO_WL_CHAIN) if "unknown workload" in r] == [
                drops(c)[1] for c in expected]
