"""A deterministic synthetic cluster for the benchmarks: namespaces, pods, NetworkPolicies as API bodies.

Shared by ``controller_bench.py`` (created through the API server) and
``model_bench.py`` (fed to the model in process). Labels are drawn from small
alphabets so selectors overlap the way they do in real clusters (many
policies share peer sets; one label change touches a few selectors).

Namespaces ``ns-<k>`` carry ``team`` (10 values) and ``env`` (3 values).
Pods ``pod-<i>`` carry ``app`` (20 values), ``tier`` (web/api/db/cache) and
``track`` (stable 90 % / canary 10 %); web/api pods declare the named port
``http``, half of all pods declare ``metrics``. Policy ``pol-<j>`` lives in
``ns-<j % N>`` and its shape is ``(j // N) % 5`` so each namespace gets every
shape: plain podSelector peers, namespaceSelector(+podSelector) peers,
ipBlock + egress to a named port, named-port ingress from a namespaceSelector
and from ``track=canary`` pods, and a namespace-wide default policy.
``track`` (the label the benchmarks flip) is referenced by two shapes only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

Body = dict[str, Any]

APPS = tuple(f"app{i}" for i in range(20))
TIERS = ("web", "api", "db", "cache")
TEAMS = tuple(f"team{i}" for i in range(10))
ENVS = ("prod", "staging", "dev")
CIDRS = {  # ipBlock cidr -> its except
    "10.0.0.0/8": "10.1.0.0/16",
    "172.16.0.0/12": "172.16.1.0/24",
    "192.168.0.0/16": "192.168.1.0/24",
    "100.64.0.0/10": "100.64.0.0/16",
}


@dataclass(frozen=True)
class Sizes:
    namespaces: int = 100
    pods: int = 5000
    policies: int = 1000
    nodes: int = 10


def node_name(index: int) -> str:
    return f"bench-node-{index}"


def pod_ip(i: int) -> str:
    return f"10.{100 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


def namespace_bodies(sizes: Sizes, seed: int = 1) -> list[Body]:
    rng = random.Random(seed)
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": f"ns-{k}", "labels": {"team": rng.choice(TEAMS), "env": rng.choice(ENVS)}},
        }
        for k in range(sizes.namespaces)
    ]


def pod_labels(rng: random.Random) -> dict[str, str]:
    return {
        "app": rng.choice(APPS),
        "tier": rng.choice(TIERS),
        "track": "canary" if rng.random() < 0.1 else "stable",
    }


def pod_bodies(sizes: Sizes, seed: int = 2) -> list[tuple[Body, Body]]:
    """(Pod body to create, status to patch through the status subresource)."""
    rng = random.Random(seed)
    out = []
    for i in range(sizes.pods):
        labels = pod_labels(rng)
        ports = []
        if labels["tier"] in ("web", "api"):
            ports.append({"name": "http", "containerPort": 8080, "protocol": "TCP"})
        if rng.random() < 0.5:
            ports.append({"name": "metrics", "containerPort": 9090, "protocol": "TCP"})
        ns = f"ns-{i % sizes.namespaces}"
        body: Body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"pod-{i}", "namespace": ns, "labels": labels},
            "spec": {
                "nodeName": node_name(i % sizes.nodes),
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "app", "image": "netfence/pause", "ports": ports}],
            },
        }
        ip = pod_ip(i)
        status: Body = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        out.append((body, status))
    return out


def _policy_spec(shape: int, rng: random.Random) -> Body:
    app, tier = rng.choice(APPS), rng.choice(TIERS)
    if shape == 0:  # podSelector peers in the policy's namespace, numeric port
        return {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080}]}],
        }
    if shape == 1:  # namespaceSelector + podSelector peers
        return {
            "podSelector": {"matchLabels": {"tier": "db"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": rng.choice(TEAMS)}},
                                   "podSelector": {"matchLabels": {"app": app}}}],
                         "ports": [{"protocol": "TCP", "port": 5432}]}],
        }
    if shape == 2:  # ipBlock ingress, egress to a named port in prod namespaces; selects on track
        cidr = rng.choice(sorted(CIDRS))
        return {
            "podSelector": {"matchLabels": {"app": app, "track": "stable"},
                            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": cidr, "except": [CIDRS[cidr]]}}],
                         "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}]}],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                        "ports": [{"protocol": "TCP", "port": "http"}]}],
        }
    if shape == 3:  # named-port ingress from a namespaceSelector and from canary pods
        return {
            "podSelector": {"matchLabels": {"tier": tier}},
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"env": rng.choice(ENVS)}}}],
                 "ports": [{"protocol": "TCP", "port": "metrics"}]},
                {"from": [{"podSelector": {"matchLabels": {"track": "canary"}}}]},
            ],
        }
    # shape 4: namespace-wide policy: every pod, from its own app peers and the team's namespaces
    return {
        "podSelector": {},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}},
                              {"namespaceSelector": {"matchLabels": {"team": rng.choice(TEAMS)}},
                               "podSelector": {"matchLabels": {"tier": "api"}}}]}],
    }


def policy_bodies(sizes: Sizes, seed: int = 3) -> list[Body]:
    rng = random.Random(seed)
    out = []
    for j in range(sizes.policies):
        ns = f"ns-{j % sizes.namespaces}"
        shape = (j // sizes.namespaces) % 5
        out.append({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"pol-{j}", "namespace": ns},
            "spec": _policy_spec(shape, rng),
        })
    return out


def node_bodies(sizes: Sizes) -> list[Body]:
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(i)}}
        for i in range(sizes.nodes)
    ]


def with_status(pod: Body, status: Body, resource_version: int = 0) -> Body:
    """A pod body as the API returns it after the status patch (for in-process use)."""
    out = {**pod, "status": status["status"]}
    meta = dict(pod["metadata"])
    meta.setdefault("uid", f"uid-{meta['namespace']}-{meta['name']}")
    if resource_version:
        meta["resourceVersion"] = str(resource_version)
    out["metadata"] = meta
    return out


def flip_track(labels: dict[str, str]) -> dict[str, str]:
    """The label patch the label-change benchmarks apply (stable <-> canary)."""
    return {"track": "canary" if labels.get("track") == "stable" else "stable"}
