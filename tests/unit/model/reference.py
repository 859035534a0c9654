"""A deliberately simple NetworkPolicy evaluator, written straight from the spec.

It works on raw Kubernetes dicts and shares no code with netfence (its own
selector matcher, its own policyTypes defaulting, its own port and ipBlock
logic), so a bug in the compiler is not repeated here.

Spec summary (networking.k8s.io/v1 NetworkPolicy):

* A pod is isolated for ingress (egress) if any policy in its namespace
  selects it and has Ingress (Egress) in its policyTypes. policyTypes defaults
  to [Ingress] plus Egress when spec.egress is non-empty.
* Traffic is allowed iff the source's egress allows it and the destination's
  ingress allows it. A non-isolated side allows everything; an isolated side
  allows what at least one rule of one selecting policy allows.
* A rule allows a connection when some peer matches (no/empty peer list = any)
  and some port matches (no/empty port list = any).
* Peers: podSelector alone = pods in the policy's namespace; namespaceSelector
  (with optional podSelector) = pods in matching namespaces; ipBlock = the
  address is in cidr and in no except.
* Only running pods with an IP and not on the host network take part.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Obj = dict[str, Any]


def selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key = expression["key"]
        operator = expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and (key not in labels or labels[key] not in values):
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def pod_ips(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    ips = [entry["ip"] for entry in status.get("podIPs") or []]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return [str(ipaddress.ip_address(ip)) for ip in ips]


def takes_part(pod: Obj) -> bool:
    spec = pod.get("spec") or {}
    phase = (pod.get("status") or {}).get("phase")
    return bool(pod_ips(pod)) and not spec.get("hostNetwork") and phase not in ("Succeeded", "Failed")


def policy_types(policy: Obj) -> list[str]:
    spec = policy["spec"]
    types = spec.get("policyTypes") or []
    if types:
        return list(types)
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


class Cluster:
    def __init__(self, namespaces: list[Obj], pods: list[Obj], policies: list[Obj]) -> None:
        self.namespace_labels = {ns["metadata"]["name"]: ns["metadata"].get("labels") or {} for ns in namespaces}
        self.pods = [pod for pod in pods if takes_part(pod)]
        self.policies = policies

    def pod_at(self, ip: str) -> Obj | None:
        for pod in self.pods:
            if ip in pod_ips(pod):
                return pod
        return None

    def _selecting(self, pod: Obj, direction: str) -> list[Obj]:
        meta = pod["metadata"]
        return [
            policy
            for policy in self.policies
            if policy["metadata"]["namespace"] == meta["namespace"]
            and selector_matches(policy["spec"].get("podSelector") or {}, meta.get("labels") or {})
            and direction in policy_types(policy)
        ]

    def _peer_matches(self, policy_namespace: str, peer: Obj, ip: str, pod: Obj | None) -> bool:
        if "ipBlock" in peer:
            address = ipaddress.ip_address(ip)
            cidr = ipaddress.ip_network(peer["ipBlock"]["cidr"], strict=False)
            if address.version != cidr.version or address not in cidr:
                return False
            return all(
                address not in ipaddress.ip_network(e, strict=False) for e in peer["ipBlock"].get("except") or []
            )
        if pod is None:
            return False
        namespace = pod["metadata"]["namespace"]
        labels = pod["metadata"].get("labels") or {}
        pod_selector = peer.get("podSelector")
        namespace_selector = peer.get("namespaceSelector")
        if namespace_selector is None:
            return namespace == policy_namespace and selector_matches(pod_selector or {}, labels)
        if namespace not in self.namespace_labels:
            return False
        if not selector_matches(namespace_selector, self.namespace_labels[namespace]):
            return False
        return pod_selector is None or selector_matches(pod_selector, labels)

    @staticmethod
    def _port_matches(entry: Obj, dst_pod: Obj | None, port: int, protocol: str) -> bool:
        if entry.get("protocol", "TCP") != protocol:
            return False
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, int):
            return wanted <= port <= int(entry.get("endPort", wanted))
        if dst_pod is None:
            return False
        for container in dst_pod["spec"].get("containers") or []:
            for declared in container.get("ports") or []:
                if (
                    declared.get("name") == wanted
                    and declared.get("protocol", "TCP") == protocol
                    and declared["containerPort"] == port
                ):
                    return True
        return False

    def _side_allows(
        self, pod: Obj, direction: str, peer_ip: str, dst_pod: Obj | None, port: int, protocol: str
    ) -> bool:
        policies = self._selecting(pod, direction)
        if not policies:
            return True
        peer_pod = self.pod_at(peer_ip)
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in policies:
            for rule in policy["spec"].get(rules_key) or []:
                peers = rule.get(peers_key) or []
                ports = rule.get("ports") or []
                peer_ok = not peers or any(
                    self._peer_matches(policy["metadata"]["namespace"], p, peer_ip, peer_pod) for p in peers
                )
                port_ok = not ports or any(self._port_matches(e, dst_pod, port, protocol) for e in ports)
                if peer_ok and port_ok:
                    return True
        return False

    def allowed(self, src_ip: str, dst_ip: str, port: int, protocol: str) -> bool:
        src_ip, dst_ip = str(ipaddress.ip_address(src_ip)), str(ipaddress.ip_address(dst_ip))
        src_pod = self.pod_at(src_ip)
        dst_pod = self.pod_at(dst_ip)
        if src_pod is not None and not self._side_allows(src_pod, "Egress", dst_ip, dst_pod, port, protocol):
            return False
        return dst_pod is None or self._side_allows(dst_pod, "Ingress", src_ip, dst_pod, port, protocol)
