"""Renewed etcd client certificates are picked up by a running controller and agents, without a restart.

A whole test bed whose Netfence etcd serves TLS and requires client certificates
(``testbed.etcd_tls``). The controller and both agents read one Secret-volume-like folder
(``ca.crt``, ``tls.crt``, ``tls.key``; updated by one rename of ``..data``, as the kubelet does)
every ``RELOAD_SECONDS``. The world of ``enforcement_helpers`` is probed throughout: good -> web
must stay allowed, bad -> web denied.

1. Renewal: a new client certificate of the same CA replaces the files. Every process reloads
   them (agents: ``etcdTlsReloads`` and the serial in /healthz; controller: its log), and a policy
   change made afterwards is enforced.
2. A new CA: the files switch to CA B, then etcd restarts with a server certificate of CA B
   trusting CA B's clients only. The SAME controller and agent processes recover: a policy
   change made after the restart is committed, applied by every agent and ``Enforced``.

The policy changes toggle ``good-from-ns`` (node 1's ingress of ``good``), checked by probing
bad -> good; the continuously probed pairs keep their verdicts throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.integration.enforcement_helpers import (
    PORT,
    ProbeLoop,
    World,
    agent_health,
    build_world,
    connects,
    manifest,
    namespace_of_test,
)
from tests.integration.helpers import eventually

from netfence.store.credentials import cert_info, pem_certificates
from netfence.store.errors import StoreError
from netfence.store.etcd import EtcdStore
from netfence.store.settings import EtcdSettings
from netfence_lab.cluster import LocalCluster
from netfence_lab.env import EtcdTls, NetfenceEnv
from netfence_lab.etcd_tls import Issued, SecretVolume, TestCa, TlsEtcdServer

pytestmark = pytest.mark.integration

RELOAD_SECONDS = 0.5  # the processes' --etcd-cert-reload-seconds
RECOVERY_TIMEOUT = 30.0  # bound of each wait for enforcement


@dataclass(frozen=True)
class Pki:
    ca_a: TestCa
    ca_b: TestCa
    server_a: Issued
    server_b: Issued
    client_a: Issued
    client_a2: Issued  # the renewal: same CA, new key
    client_b: Issued


@dataclass
class TlsBed:
    world: World
    etcd: TlsEtcdServer
    volume: SecretVolume
    pki: Pki


def secret(ca: bytes, client: Issued) -> dict[str, bytes]:
    cert, key = client.read()
    return {"ca.crt": ca, "tls.crt": cert, "tls.key": key}


def serial(client: Issued) -> str:
    return cert_info(pem_certificates(client.cert.read_bytes())[0]).serial


@pytest.fixture
async def bed(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[TlsBed]:
    base = tmp_path / "pki"
    ca_a, ca_b = TestCa(base / "a", "ca-a"), TestCa(base / "b", "ca-b")
    pki = Pki(ca_a, ca_b, ca_a.issue("etcd", server_ips=["127.0.0.1"]), ca_b.issue("etcd", server_ips=["127.0.0.1"]),
              ca_a.issue("netfence"), ca_a.issue("netfence"), ca_b.issue("netfence"))
    etcd = TlsEtcdServer(cluster.tools.etcd, tmp_path / "etcd", pki.server_a, ca_a.pem(), name="netfence-etcd-tls")
    await asyncio.to_thread(etcd.start)
    volume = SecretVolume(tmp_path / "etcd-client", secret(ca_a.pem(), pki.client_a))
    tls = EtcdTls(volume.path("ca.crt"), volume.path("tls.crt"), volume.path("tls.key"), RELOAD_SECONDS)
    env = NetfenceEnv(cluster, tmp_path / "env", nodes=2, etcd=etcd, etcd_tls=tls)
    try:
        await env.start()
        try:
            yield TlsBed(await build_world(env, namespace_of_test("cr", request)), etcd, volume, pki)
        finally:
            try:
                await env.delete_user_state()
            finally:
                await env.close()
    finally:
        await asyncio.to_thread(etcd.stop)


def pids(env: NetfenceEnv) -> dict[str, int | None]:
    out = {name: proc.pid for name, proc in env.controllers.items()}
    out.update({agent.node: agent.process.pid for agent in env.agents.values()})
    return out


def controller_log(env: NetfenceEnv) -> str:
    return "\n".join((env.workdir / f"{name}.log").read_text(errors="replace") for name in env.controllers)


async def all_healths(env: NetfenceEnv) -> dict[int, dict[str, Any] | None]:
    return {index: await agent_health(env, index) for index in env.agents}


async def wait_reloaded(env: NetfenceEnv, reloads: int, client: Issued, what: str) -> None:
    """Until every agent reports ``reloads`` TLS reloads and ``client``'s serial, and every
    controller has logged the reload of that certificate."""
    want = serial(client)

    async def agents_done() -> bool:
        bodies = await all_healths(env)
        return all(b is not None and b.get("etcdTlsReloads") == reloads and b.get("etcdClientCertSerial") == want
                   for b in bodies.values())

    async def controllers_done() -> bool:
        text = await asyncio.to_thread(controller_log, env)
        return sum(1 for line in text.splitlines() if "reloaded them" in line and want in line) >= len(env.controllers)

    bound = 10 * RELOAD_SECONDS + 10
    await eventually(agents_done, timeout=bound, interval=0.05, what=f"agents to reload the {what}")
    await eventually(controllers_done, timeout=bound, interval=0.05, what=f"the controller to reload the {what}")


def bad_reaches_good(world: World, timeout: float = 0.3) -> bool:
    return connects(world.prober, world.bad.netns, world.good.ip, PORT, timeout)


def good_from_ns(ns: str, *, only_web: bool) -> dict[str, Any]:
    peer: dict[str, Any] = {"podSelector": {"matchLabels": {"app": "web"}}} if only_web else {"podSelector": {}}
    spec = {"podSelector": {"matchLabels": {"role": "good"}}, "ingress": [{"from": [peer]}]}
    return manifest(ns, "good-from-ns", spec)


async def change_and_enforce(world: World, *, only_web: bool) -> float:
    """Toggle ``good-from-ns``; seconds until committed, applied everywhere, Enforced, and seen by a probe."""
    started = time.monotonic()
    marks = dict([await world.env.apply_manifest(good_from_ns(world.ns, only_web=only_web))])
    await world.env.wait_enforced(marks, timeout=RECOVERY_TIMEOUT)

    async def probe_agrees() -> bool:
        return await asyncio.to_thread(bad_reaches_good, world) is not only_web

    await eventually(probe_agrees, timeout=10, interval=0.05, what="bad -> good to follow the change")
    return time.monotonic() - started


async def refused(env: NetfenceEnv, volume: SecretVolume) -> bool:
    settings = EtcdSettings([env.etcd_endpoint], env.prefix, ca_file=volume.path("ca.crt"),
                            cert_file=volume.path("tls.crt"), key_file=volume.path("tls.key"), timeout=1.0)
    store = EtcdStore(settings)
    try:
        await asyncio.wait_for(store.connect(), 10)
        return False
    except (StoreError, TimeoutError):
        return True
    finally:
        await store.close()


async def test_renewed_and_rotated_certificates_are_used_by_running_processes(bed: TlsBed, tmp_path: Path) -> None:
    world, env, pki = bed.world, bed.world.env, bed.pki
    before = pids(env)
    assert all(before.values()), before
    initial = await all_healths(env)
    assert all(b is not None and b["etcdTlsReloads"] == 0 and b["etcdClientCertSerial"] == serial(pki.client_a)
               for b in initial.values()), initial
    assert await asyncio.to_thread(bad_reaches_good, world, 2.0)

    with ProbeLoop(world) as probes:
        await probes.rounds(2)

        # 1. Renewal by the same CA: the files are swapped, every process reloads them and keeps working.
        swapped = time.monotonic()
        bed.volume.update(secret(pki.ca_a.pem(), pki.client_a2))
        await wait_reloaded(env, 1, pki.client_a2, "renewed certificate")
        reloaded = time.monotonic() - swapped
        renewal = await change_and_enforce(world, only_web=True)
        await probes.rounds(2)

        # 2. A new CA: the files first, then etcd restarts with CA B's server certificate, trusting CA B only.
        swapped = time.monotonic()
        bed.volume.update(secret(pki.ca_b.pem(), pki.client_b))
        await wait_reloaded(env, 2, pki.client_b, "new CA's certificate")
        rotated_reload = time.monotonic() - swapped
        bed.etcd.use(pki.server_b, pki.ca_b.pem())
        await asyncio.to_thread(bed.etcd.restart)
        rotation = await change_and_enforce(world, only_web=False)

        async def agents_healthy() -> bool:
            bodies = await all_healths(env)
            return all(b is not None and b["etcdConnected"] and not b["lastError"] for b in bodies.values())

        await eventually(agents_healthy, timeout=RECOVERY_TIMEOUT, interval=0.05, what="agents connected, no error")
        await probes.rounds(3)
        counts = probes.check()

    print(f"\nrenewal: reloaded by every process {reloaded:.2f}s after the swap, a change enforced in {renewal:.2f}s;"
          f"\nnew CA: reloaded {rotated_reload:.2f}s after the swap; after etcd's restart a change enforced in "
          f"{rotation:.2f}s; probes {counts}")

    # The same processes throughout, still running, on the new credentials.
    assert pids(env) == before
    assert all(proc.alive() for proc in env.controllers.values())
    assert all(agent.process.alive() for agent in env.agents.values())
    final = await all_healths(env)
    for index, body in final.items():
        assert body is not None, index
        assert body["etcdTlsReloads"] == 2, body  # was 0 (checked above): one renewal, one new CA
        assert body["etcdClientCertSerial"] == serial(pki.client_b), body
    tally = probes.snapshot()
    assert tally.denied_connected == [] and tally.allowed_failed == [], tally
    # etcd really moved: CA A's credentials are refused now.
    old = SecretVolume(tmp_path / "old-client", secret(pki.ca_a.pem(), pki.client_a2))
    assert await refused(env, old)
