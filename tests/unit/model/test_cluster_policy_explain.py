"""With ClusterNetworkPolicies, ``netfence explain`` agrees with an independent reference evaluator.

The reference reads the raw objects (the API's tier semantics: Admin by priority, Accept/Deny
decide, Pass hands over; then NetworkPolicy; then Baseline where no NetworkPolicy isolates);
explain traces the per-node models that agents decode from the compiled state, following the
renderer's chain layout (dataplane/render_tiers.py). So compile, decode and the tier layout are
checked together on random worlds.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from model_worlds import NODES, PROBE_PORTS, cluster_st
from reference import Cluster, selector_matches
from test_cluster_policy import cnp_st
from test_explain_agrees import parties

from netfence.agent.node_state import NodeState
from netfence.explain.trace import Connection, trace_connection, verdict
from netfence.model.cluster_policy import cluster_policy_from_k8s
from netfence.model.compiler import compile_world
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s

Obj = dict[str, Any]
PROTOCOL_FIELDS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}


class TieredCluster(Cluster):
    def __init__(self, namespaces: list[Obj], pods: list[Obj], policies: list[Obj], cnps: list[Obj]) -> None:
        super().__init__(namespaces, pods, policies)
        self.cnps = sorted(cnps, key=lambda c: (c["spec"]["priority"], c["metadata"]["name"]))

    def _in(self, pod: Obj | None, ns_selector: Obj, pod_selector: Obj) -> bool:
        if pod is None:
            return False
        namespace = pod["metadata"]["namespace"]
        if namespace not in self.namespace_labels:
            return False
        return selector_matches(ns_selector, self.namespace_labels[namespace]) and selector_matches(
            pod_selector, pod["metadata"].get("labels") or {}
        )

    def _subject(self, cnp: Obj, pod: Obj) -> bool:
        subject = cnp["spec"]["subject"]
        if "namespaces" in subject:
            return self._in(pod, subject["namespaces"], {})
        return self._in(pod, subject["pods"]["namespaceSelector"], subject["pods"]["podSelector"])

    def _cnp_peer(self, peer: Obj, ip: str) -> bool:
        if "networks" in peer:
            address = ipaddress.ip_address(ip)
            return any(address.version == (n := ipaddress.ip_network(c)).version and address in n
                       for c in peer["networks"])
        pod = self.pod_at(ip)
        if "namespaces" in peer:
            return self._in(pod, peer["namespaces"], {})
        return self._in(pod, peer["pods"]["namespaceSelector"], peer["pods"]["podSelector"])

    @staticmethod
    def _cnp_port(entry: Obj, dst_pod: Obj | None, port: int, protocol: str) -> bool:
        if "destinationNamedPort" in entry:
            if dst_pod is None:
                return False
            return any(
                declared.get("name") == entry["destinationNamedPort"]
                and declared.get("protocol", "TCP") == protocol and declared["containerPort"] == port
                for container in dst_pod["spec"].get("containers") or []
                for declared in container.get("ports") or []
            )
        (kind, body), = entry.items()
        if PROTOCOL_FIELDS[kind] != protocol:
            return False
        dest = body["destinationPort"]
        if "number" in dest:
            return bool(dest["number"] == port)
        return bool(dest["range"]["start"] <= port <= dest["range"]["end"])

    def _tier(self, tier: str, pod: Obj, direction: str, peer_ip: str, dst_pod: Obj | None, port: int,
              protocol: str) -> str | None:
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for cnp in self.cnps:
            if cnp["spec"]["tier"] != tier or not self._subject(cnp, pod):
                continue
            for rule in cnp["spec"].get(rules_key) or []:
                if not any(self._cnp_peer(p, peer_ip) for p in rule[peers_key]):
                    continue
                if "protocols" in rule and not any(self._cnp_port(e, dst_pod, port, protocol)
                                                   for e in rule["protocols"]):
                    continue
                if rule["action"] == "Pass":
                    return None
                return str(rule["action"])
        return None

    def _side_allows(
        self, pod: Obj, direction: str, peer_ip: str, dst_pod: Obj | None, port: int, protocol: str
    ) -> bool:
        admin = self._tier("Admin", pod, direction, peer_ip, dst_pod, port, protocol)
        if admin is not None:
            return admin == "Accept"
        if self._selecting(pod, direction):
            return super()._side_allows(pod, direction, peer_ip, dst_pod, port, protocol)
        return self._tier("Baseline", pod, direction, peer_ip, dst_pod, port, protocol) != "Deny"


@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cluster_st(), st.data())
def test_explain_with_cluster_policies_matches_the_reference(
    cluster: tuple[list[Obj], list[Obj], list[Obj]], data: st.DataObject
) -> None:
    namespaces, pods, policies = cluster
    cnps = [data.draw(cnp_st(f"c{i}")) for i in range(data.draw(st.integers(1, 3)))]
    desired = compile_world([pod_from_k8s(p) for p in pods], [namespace_from_k8s(n) for n in namespaces],
                            [policy_from_k8s(p) for p in policies], [cluster_policy_from_k8s(c) for c in cnps])
    values = {k: json.dumps(v).encode() for k, v in desired.items()}
    models = {}
    for node in NODES:
        state = NodeState(node)
        state.reset(values)
        models[node] = state.model()
    reference = TieredCluster(namespaces, pods, policies, cnps)
    everyone = [p for p in parties(namespaces, pods) if p.is_pod]
    checked = 0
    for src in everyone:
        for dst in everyone:
            if src.ip == dst.ip or (":" in src.ip) != (":" in dst.ip):
                continue
            for port, protocol in PROBE_PORTS:
                traces = trace_connection(models, Connection(src, dst, port, protocol))  # type: ignore[arg-type]
                expected = reference.allowed(src.ip, dst.ip, port, protocol)
                assert verdict(traces) == expected, (src, dst, port, protocol, [t.reason for t in traces])
                checked += 1
    event(f"pairs traced: {'some' if checked else 'none (no two pods of one family)'}")
