"""ClusterPolicyStatus of ClusterNetworkPolicies: name ``cnp.<name>``, KIND, nodes, Warning on bad input."""

from __future__ import annotations

from typing import Any

from tests.unit.status.test_status_writer import phase, pod, setup

from netfence.controller.kube import cps_name, policy_reference
from netfence.controller.status_writer import status_spec
from netfence.controller.world import PolicyMeta
from netfence.status.aggregate import NodeReport


def cnp(name: str, rv: int, egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "policy.networking.k8s.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 2, "resourceVersion": str(rv)},
        "spec": {"tier": "Admin", "priority": 5,
                 "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
                 "egress": egress},
    }


def test_names_spec_and_reference_tell_the_kinds_apart() -> None:
    assert cps_name("", "deny-all") == "cnp.deny-all" and cps_name("ns", "a") == "ns.a"
    spec = status_spec(PolicyMeta("", "deny-all", "u", 3))
    assert spec == {"kind": "ClusterNetworkPolicy", "policy": {"namespace": "", "name": "deny-all", "uid": "u"},
                    "policyRef": "deny-all", "generation": 3}
    assert status_spec(PolicyMeta("ns", "a", "u", 1))["kind"] == "NetworkPolicy"
    assert policy_reference("", "deny-all")["kind"] == "ClusterNetworkPolicy"


async def test_cluster_policy_status_follows_its_nodes_and_warns_on_unsupported_fields() -> None:
    writer, kube, world = setup()
    world.apply("pods", "ADDED", pod("ns", "web", {"app": "web"}, "n1", "10.244.1.10", 20))
    world.apply("clusternetworkpolicies", "ADDED", cnp("deny-nodes", 30, [
        {"action": "Deny", "to": [{"nodes": {}}]},
        {"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}]},
    ]))
    writer.mark_all()
    await writer.flush()
    obj = kube.objects["cnp.deny-nodes"]
    assert obj["spec"]["kind"] == "ClusterNetworkPolicy"
    # n1 must enforce it and has no report yet: not Enforced (Degraded: NodeReportMissing, as for NetworkPolicies)
    assert phase(kube, "cnp.deny-nodes") == "Degraded"
    assert [n["name"] for n in obj["status"]["nodes"]] == ["n1"]
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conditions["Warning"]["status"] == "True"
    assert "nodes" in conditions["Warning"]["message"] and "Deny all" in conditions["Warning"]["message"]
    assert obj["status"]["policyGeneration"] == 2

    revision = max(writer.key_revisions.values(), default=0)
    writer.set_report("n1", NodeReport.from_json({"schema": 1, "node": "n1", "appliedRevision": revision}, "n1"))
    await writer.flush()
    assert phase(kube, "cnp.deny-nodes") == "Enforced"

    world.apply("clusternetworkpolicies", "DELETED", cnp("deny-nodes", 40, []))
    writer.policies_removed([("", "deny-nodes")])
    await writer.flush()
    assert "cnp.deny-nodes" not in kube.objects


async def test_a_bad_key_of_a_cluster_policy_degrades_its_status() -> None:
    writer, kube, world = setup()
    world.apply("pods", "ADDED", pod("ns", "web", {"app": "web"}, "n1", "10.244.1.10", 20))
    world.apply("clusternetworkpolicies", "ADDED", cnp("deny-web", 30, [
        {"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}]},
    ]))
    writer.mark_all()
    revision = max(writer.key_revisions.values(), default=0)
    writer.set_report("n1", NodeReport.from_json({"appliedRevision": revision, "badKeys": [
        {"key": "cpolicies/deny-web", "reason": "not JSON; the rules already in the kernel for it are kept"}]}, "n1"))
    await writer.flush()
    assert phase(kube, "cnp.deny-web") == "Degraded"
    degraded = next(c for c in kube.objects["cnp.deny-web"]["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "BadKey" and "n1: cpolicies/deny-web (not JSON" in degraded["message"]
    writer.set_report("n1", NodeReport.from_json({"appliedRevision": revision}, "n1"))
    await writer.flush()
    assert phase(kube, "cnp.deny-web") == "Enforced"
