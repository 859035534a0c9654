"""Representative NodeModels for the dataplane tests (shared with integration tests)."""

from __future__ import annotations

from netfence.model.enforcement import (
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
    PeerSet,
    SetKind,
)


def peer_set(kind: SetKind, name: str, *members: str) -> PeerSet:
    definition = {"name": name}
    return PeerSet(PeerSet.make_id(kind, definition), kind, definition, tuple(sorted(members)))


def endpoint(key: str, *ips: str, ingress: tuple[str, ...] = (), egress: tuple[str, ...] = ()) -> Endpoint:
    ns, name = key.split("/")
    return Endpoint("node-1", ns, name, ips, ingress, egress)


def policy(
    key: str,
    ingress: tuple[CompiledRule, ...] | None = None,
    egress: tuple[CompiledRule, ...] | None = None,
) -> CompiledPolicy:
    ns, name = key.split("/")
    return CompiledPolicy(ns, name, f"uid-{name}", ingress, egress)


def node_model(endpoints: list[Endpoint], policies: list[CompiledPolicy], sets: list[PeerSet]) -> NodeModel:
    return NodeModel(
        "node-1",
        {e.key: e for e in endpoints},
        {p.key: p for p in policies},
        {s.id: s for s in sets},
    )


TCP = "TCP"

FRONTEND = peer_set("pods", "frontend", "10.244.0.11", "10.244.1.20", "fd00::11")
EXTERNAL = peer_set("net", "external", "0.0.0.0/0", "!10.0.0.0/8", "!10.0.0.0/8", "::/0", "192.168.1.7/32")
HTTP_PORTS = peer_set("ports", "http", "10.244.0.10,tcp:8080", "10.244.1.5,TCP:80", "fd00::10,tcp:8080")


def empty() -> NodeModel:
    return node_model([], [], [])


def ingress_basic() -> NodeModel:
    """web allows TCP 80 from frontend; db denies all ingress; cache is not isolated."""
    allow = policy("default/allow-frontend", ingress=(CompiledRule((FRONTEND.id,), (CompiledPort("TCP", 80),)),))
    deny = policy("default/deny-all", ingress=())
    return node_model(
        [
            endpoint("default/web", "10.244.0.10", ingress=(allow.key,)),
            endpoint("default/db", "10.244.0.12", ingress=(deny.key,)),
            endpoint("default/cache", "10.244.0.13"),
        ],
        [allow, deny],
        [FRONTEND],
    )


def egress_mixed() -> NodeModel:
    """A dual-stack endpoint with every kind of egress rule."""
    dns = CompiledRule((EXTERNAL.id,), (CompiledPort("UDP", 53), CompiledPort("TCP", 53)))
    ports = CompiledRule(
        None,
        (
            CompiledPort("TCP", 8000, 8100),
            CompiledPort("TCP", 443),
            CompiledPort("SCTP", 9000),
            CompiledPort("TCP", named_set=HTTP_PORTS.id),
            CompiledPort("UDP"),
        ),
    )
    never_peer = CompiledRule((), (CompiledPort("TCP", 22),))
    never_port = CompiledRule((FRONTEND.id,), ())
    pol = policy("apps/egress", egress=(dns, ports, never_peer, never_port))
    allow_all_in = policy("apps/allow-all-in", ingress=(CompiledRule(None, None),))
    return node_model(
        [endpoint("apps/client", "10.244.0.20", "fd00::20", ingress=(allow_all_in.key,), egress=(pol.key,))],
        [pol, allow_all_in],
        [EXTERNAL, HTTP_PORTS, FRONTEND],
    )


def shared_and_missing() -> NodeModel:
    """Two endpoints share a policy; a missing policy and a missing set; many ports."""
    many = (*(CompiledPort("TCP", p) for p in range(1000, 1020)), CompiledPort("TCP", 2000, 2010))
    shared = policy("team/shared", ingress=(CompiledRule((FRONTEND.id, "p-missing"), many),))
    sctp = policy("team/sctp", ingress=(CompiledRule(None, (CompiledPort("SCTP", 7000, 7010),)),))
    return node_model(
        [
            endpoint("team/a", "10.244.0.30", ingress=(shared.key, "team/missing", sctp.key)),
            endpoint("team/b", "10.244.0.31", ingress=(shared.key,), egress=("team/missing",)),
        ],
        [shared, sctp],
        [FRONTEND],
    )


SAMPLES = {
    "empty": empty,
    "ingress_basic": ingress_basic,
    "egress_mixed": egress_mixed,
    "shared_and_missing": shared_and_missing,
}
