"""Rules the kernel cannot match are denied, reported and flagged (issue 9, item 6).

Real agents run with ``--disable-features=sctp-port-match`` (as on a kernel
whose iptables cannot match SCTP ports). The standard world
(``enforcement_helpers.build_world``: good -> web TCP 80 allowed, bad -> web
denied, probed continuously) gets one more policy, ``web-sctp-80``, allowing
SCTP to web's port 80 from anyone. That rule cannot be expressed, so it must
match nothing: SCTP to web:80 is dropped (never "any SCTP port"), the node
report lists the policy as unenforceable, and its ClusterPolicyStatus carries
a ``Warning`` naming the node and the feature.

This machine's kernel may have no SCTP at all, so SCTP is sent as raw IP
packets (protocol 132: an SCTP INIT with a valid CRC32c) and observed with a
raw socket in the destination pod: the kernel delivers protocol-132 packets to
raw sockets whether or not it has SCTP. A control — SCTP from bad to good,
which ``good-from-ns`` allows (any protocol) — shows the method sees packets
that are allowed.

A ClusterNetworkPolicy is rendered differently there: an Admin Deny of SCTP
port 9 to ``good`` cannot be matched by port, so it denies *any* SCTP port
(never less than written); the node reports it unenforceable as ``/<name>``
(the key status aggregation looks a cluster policy up by) and its
ClusterPolicyStatus ``cnp.<name>`` carries the ``Warning``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import select
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.enforcement_helpers import (
    PORT,
    ProbeLoop,
    ProbeTally,
    World,
    cps,
    drop_packets,
    manifest,
    namespace_of_test,
    node_reports,
    running_world,
)
from tests.integration.helpers import eventually

from netfence.dataplane.render_tiers import cluster_chain
from netfence.model.cluster_policy import API_GROUP as CNP_GROUP
from netfence.model.cluster_policy import API_VERSIONS as CNP_VERSIONS
from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv
from netfence_lab.probe import Probe, Prober

SCTP_PORT = 80
FEATURE = "sctp-port-match"
_source_ports = itertools.count(41000)


@pytest.fixture
async def world(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=2, report_ttl=4,
                      agent_extra_args=(f"--disable-features={FEATURE}",))
    async with running_world(env, namespace_of_test("ur", request)) as world:
        yield world


# --- raw SCTP ----------------------------------------------------------------------------------


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def sctp_init(src_port: int, dst_port: int, tag: int) -> bytes:
    """An SCTP packet with one INIT chunk (RFC 9260), checksum included."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65535, 1, 1, 1)
    packet = struct.pack("!HHII", src_port, dst_port, 0, 0) + chunk
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


def sctp_arrivals(prober: Prober, src_netns: str, dst_netns: str, dst_ip: str, count: int,
                  wait: float = 1.0, port: int = SCTP_PORT) -> int:
    """Send ``count`` SCTP INITs to dst_ip:``port``; how many reached the destination pod."""
    tag = int.from_bytes(hashlib.sha256(f"{src_netns}{time.monotonic()}".encode()).digest()[:4]) or 1
    receiver = prober.open_socket(dst_netns, socket.SOCK_RAW, socket.IPPROTO_SCTP)
    sender = prober.open_socket(src_netns, socket.SOCK_RAW, socket.IPPROTO_SCTP)
    seen = 0
    with receiver, sender:
        receiver.setblocking(False)
        for _ in range(count):
            sender.sendto(sctp_init(next(_source_ports), port, tag), (dst_ip, 0))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and seen < count:
            ready, _, _ = select.select([receiver], [], [], left)
            if not ready:
                break
            data = receiver.recv(4096)
            header = (data[0] & 0x0F) * 4
            payload = data[header:]
            if len(payload) >= 20 and struct.unpack("!H", payload[2:4])[0] == port and \
                    struct.unpack("!I", payload[16:20])[0] == tag:
                seen += 1
    return seen


async def _probed(probes: ProbeLoop, n: int, since: ProbeTally | None = None) -> bool:
    now, base = probes.snapshot(), since or ProbeTally()
    return now.allowed_ok >= base.allowed_ok + n and now.denied_blocked >= base.denied_blocked + n


def warning(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Warning"), None)


async def warned_about(env: Any, status_name: str, node: str) -> dict[str, Any]:
    """The status object's Warning condition once it names ``node`` and the feature."""

    async def warned() -> dict[str, Any] | None:
        cond = warning((await cps(env, status_name)).get("status") or {})
        text = json.dumps(cond or {})
        return cond if cond and cond.get("status") == "True" and node in text and FEATURE in text else None

    condition: dict[str, Any] = await eventually(warned, timeout=20, what="a Warning naming the node and the feature")
    print(f"\nWarning condition: {condition}")
    return condition


async def test_sctp_port_rule_without_kernel_support_is_denied_reported_and_warned(world: World) -> None:
    env, ns = world.env, world.ns
    node0, node1 = env.agents[0].node, env.agents[1].node
    with ProbeLoop(world) as probes:
        await eventually(lambda: _probed(probes, 2), what="probes running")
        marks = dict([await env.apply_manifest(manifest(ns, "web-sctp-80", {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [{"protocol": "SCTP", "port": SCTP_PORT}]}]}))])
        await env.wait_enforced(marks, timeout=60)

        # The node that enforces it says the rule is unenforceable; the other node has nothing to say.
        reports = await node_reports(env)
        assert reports[node0]["unenforceable"] == [{"policy": f"{ns}/web-sctp-80", "feature": FEATURE}]
        assert reports[node0]["unenforceableTotal"] == 1
        assert reports[node1]["unenforceable"] == []

        # SCTP to web:80 is dropped by web's final DROP, from anyone.
        web_drop = world.web_chain
        before = drop_packets(world.node0, web_drop)
        for src in (world.bad, world.good):
            arrived = await asyncio.to_thread(sctp_arrivals, world.prober, src.netns, world.web.netns,
                                              world.web.ip, 3)
            assert arrived == 0, f"SCTP from {src.name} reached web:{SCTP_PORT}"
        assert drop_packets(world.node0, web_drop) >= before + 6
        # The control: SCTP that a policy does allow (good-from-ns: any protocol) arrives.
        arrived = await asyncio.to_thread(sctp_arrivals, world.prober, world.bad.netns, world.good.netns,
                                          world.good.ip, 3)
        assert arrived == 3, "the raw SCTP method must see allowed packets"

        await warned_about(env, f"{ns}.web-sctp-80", node0)  # the status names the node and the feature
        mark = probes.snapshot()
        await eventually(lambda: _probed(probes, 3, mark), what="probes after the checks")
    tally = probes.snapshot()
    assert tally.denied_connected == [] and tally.allowed_failed == [], tally


def admin_deny_sctp(ns: str, name: str, port: int) -> dict[str, Any]:
    """Admin tier: good denies SCTP ``port`` from the pods of ``ns``."""
    in_ns = {"matchLabels": {"name": ns}}
    return {
        "apiVersion": f"{CNP_GROUP}/{CNP_VERSIONS[0]}", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": 10,
                 "subject": {"pods": {"namespaceSelector": in_ns, "podSelector": {"matchLabels": {"role": "good"}}}},
                 "ingress": [{"name": "no-sctp", "action": "Deny", "from": [{"namespaces": in_ns}],
                              "protocols": [{"sctp": {"destinationPort": {"number": port}}}]}]},
    }


async def test_sctp_port_deny_of_a_cluster_policy_denies_any_sctp_port_reported_and_warned(world: World) -> None:
    env, ns = world.env, world.ns
    node0, node1 = env.agents[0].node, env.agents[1].node
    name = f"{ns}-deny-sctp"  # cluster-scoped: a name of this test alone
    with ProbeLoop(world) as probes:
        await eventually(lambda: _probed(probes, 2), what="probes running")
        # Before: good-from-ns lets bad send good anything, SCTP to port 80 included.
        arrived = await asyncio.to_thread(sctp_arrivals, world.prober, world.bad.netns, world.good.netns,
                                          world.good.ip, 3)
        assert arrived == 3, "the raw SCTP method must see allowed packets"
        marks = dict([await env.apply_manifest(admin_deny_sctp(ns, name, 9))])
        await env.wait_enforced(marks, timeout=60)

        # The node that enforces it (good's) says it is unenforceable, by the name status looks up.
        reports = await node_reports(env)
        assert reports[node1]["unenforceable"] == [{"policy": f"/{name}", "feature": FEATURE}]
        assert reports[node0]["unenforceable"] == []

        # Port 9 cannot be matched: the Deny covers every SCTP port (80 here), counted by its rule ...
        chain = cluster_chain("ingress", name)
        before = drop_packets(env.agents[1].netns, chain)
        for port in (9, SCTP_PORT):
            arrived = await asyncio.to_thread(sctp_arrivals, world.prober, world.bad.netns, world.good.netns,
                                              world.good.ip, 3, 1.0, port)
            assert arrived == 0, f"SCTP from bad reached good:{port}"
        assert drop_packets(env.agents[1].netns, chain) >= before + 6
        # ... and nothing else: TCP from bad to good is still allowed (good-from-ns).
        assert world.prober.exchange(Probe(world.bad.netns, world.good.ip, PORT), 3.0) is not None

        await warned_about(env, f"cnp.{name}", node1)  # the cluster policy's status names node and feature
        mark = probes.snapshot()
        await eventually(lambda: _probed(probes, 3, mark), what="probes after the checks")
    tally = probes.snapshot()
    assert tally.denied_connected == [] and tally.allowed_failed == [], tally
