"""ModelEngine after any sequence of changes equals compile_world of the final world,
and its drained changes, applied in order, reproduce that state exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_worlds import (
    CONTAINER_PORTS,
    NAMESPACE_NAMES,
    cluster_st,
    labels_st,
    namespace_body,
    pod_st,
    policy_st,
)

from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.world import (
    ContainerPort,
    Namespace,
    Pod,
    Policy,
    namespace_from_k8s,
    pod_from_k8s,
    policy_from_k8s,
)

OPERATIONS = [
    "set_pod",
    "relabel_pod",
    "relabel_pod",
    "readdress_pod",
    "reports_pod",
    "remove_pod",
    "set_namespace",
    "set_namespace",
    "remove_namespace",
    "set_policy",
    "retype_policy",
    "remove_policy",
]


class World:
    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], Pod] = {}
        self.namespaces: dict[str, Namespace] = {}
        self.policies: dict[tuple[str, str], Policy] = {}

    def compile(self) -> dict[str, dict[str, Any]]:
        return compile_world(self.pods.values(), self.namespaces.values(), self.policies.values())


def apply_changes(applied: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any] | None]) -> None:
    for key, value in changes.items():
        assert applied.get(key) != value, f"{key} reported without a change"
        if value is None:
            del applied[key]
        else:
            applied[key] = value


def step(data: st.DataObject, engine: ModelEngine, world: World) -> None:
    operation = data.draw(st.sampled_from(OPERATIONS))
    existing = sorted(world.pods)
    if operation == "set_pod":
        pod = pod_from_k8s(data.draw(pod_st(data.draw(st.integers(0, 7)))))
        engine.set_pod(pod)
        world.pods[pod.key] = pod
    elif operation in ("relabel_pod", "readdress_pod", "reports_pod") and existing:
        old = world.pods[data.draw(st.sampled_from(existing))]
        if operation == "relabel_pod":
            new = dataclasses.replace(old, labels=data.draw(labels_st))
        elif operation == "readdress_pod":
            ips = data.draw(st.sampled_from([(), ("10.244.3.3",), ("10.244.3.4", "fd00::34"), old.ips[:1]]))
            new = dataclasses.replace(old, ips=ips, node=data.draw(st.sampled_from([old.node, "n2", None])))
        else:
            ports = data.draw(st.lists(st.sampled_from(CONTAINER_PORTS), max_size=2, unique_by=lambda p: p[0]))
            new = dataclasses.replace(old, ports=tuple(ContainerPort(n, proto, p) for n, p, proto in ports))
        engine.set_pod(new)
        world.pods[new.key] = new
    elif operation == "remove_pod" and existing:
        key = data.draw(st.sampled_from(existing))
        engine.remove_pod(*key)
        del world.pods[key]
    elif operation == "set_namespace":
        namespace = namespace_from_k8s(
            namespace_body(data.draw(st.sampled_from(NAMESPACE_NAMES)), data.draw(labels_st))
        )
        engine.set_namespace(namespace)
        world.namespaces[namespace.name] = namespace
    elif operation == "remove_namespace" and world.namespaces:
        name = data.draw(st.sampled_from(sorted(world.namespaces)))
        engine.remove_namespace(name)
        del world.namespaces[name]
    elif operation == "set_policy":
        policy = policy_from_k8s(data.draw(policy_st(data.draw(st.sampled_from(["np0", "np1", "np2"])))))
        engine.set_policy(policy)
        world.policies[policy.key] = policy
    elif operation == "retype_policy" and world.policies:
        # same selector, different coverage/rules: exercises the "selection unchanged" path
        old_policy = world.policies[data.draw(st.sampled_from(sorted(world.policies)))]
        other = policy_from_k8s(data.draw(policy_st(old_policy.name, [old_policy.namespace])))
        policy = dataclasses.replace(other, pod_selector=old_policy.pod_selector)
        engine.set_policy(policy)
        world.policies[policy.key] = policy
    elif operation == "remove_policy" and world.policies:
        key = data.draw(st.sampled_from(sorted(world.policies)))
        engine.remove_policy(*key)
        del world.policies[key]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_engine_equals_full_compile_after_any_changes(data: st.DataObject) -> None:
    engine = ModelEngine()
    world = World()
    namespaces, pods, policies = data.draw(cluster_st())
    initial: list[Namespace | Pod | Policy] = [
        *(namespace_from_k8s(n) for n in namespaces),
        *(pod_from_k8s(p) for p in pods),
        *(policy_from_k8s(p) for p in policies),
    ]
    for item in data.draw(st.permutations(initial)):
        if isinstance(item, Namespace):
            engine.set_namespace(item)
            world.namespaces[item.name] = item
        elif isinstance(item, Pod):
            engine.set_pod(item)
            world.pods[item.key] = item
        else:
            engine.set_policy(item)
            world.policies[item.key] = item
    applied: dict[str, dict[str, Any]] = {}
    for _ in range(data.draw(st.integers(1, 20))):
        step(data, engine, world)
        check = data.draw(st.sampled_from(["none", "none", "drain", "desired"]))
        if check == "drain":
            apply_changes(applied, engine.drain_changes())
            assert applied == world.compile()
        elif check == "desired":
            assert dict(engine.desired()) == world.compile()
    expected = world.compile()
    assert dict(engine.desired()) == expected
    apply_changes(applied, engine.drain_changes())
    assert applied == expected
    assert engine.drain_changes() == {}
