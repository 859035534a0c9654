"""A new pod is denied until its endpoint is known (agents with ``--pod-cidrs``, Calico style).

Both ways of giving an agent its node's pod CIDRs are run: explicit (``--pod-cidrs=<cidr>``, as the
test bed and the bench pass them) and ``--pod-cidrs=auto`` (as the Helm chart sets it: the controller
publishes each Node's ``spec.podCIDRs`` as ``nodes/<node>`` and the agent takes its own from there).

As with a real kubelet and CNI, the test bed's kubelet brings a pod's network up (its server
answers) before it publishes the pod's address (``status.podIPs``). Without ``--pod-cidrs`` such
a pod is reachable until the agent has programmed the rules of the policies that select it
(kube-router's hole; ``bench/e2e_bench.py`` measures it). With it:

* a pod that an existing deny policy selects is never reached: not before its address is
  published, not after, and not later (its rules take over from the unknown-workload drop);
* a pod that no policy selects is denied while unknown and reachable once the model knows it;
* a pod unknown to the model cannot send either (egress of an unknown source is dropped).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.integration.enforcement_helpers import chain_rules, connects, cps, namespace_of_test
from tests.integration.helpers import eventually

from netfence.dataplane.ruleset import TO_WL_CHAIN
from netfence_lab.cluster import LocalCluster
from netfence_lab.env import NetfenceEnv
from netfence_lab.kubelet import PodHandle
from netfence_lab.probe import Prober

PORT = 8080
DENIED_TIMEOUT = 0.3  # a denied probe waits this long for an answer that never comes
ALLOWED_TIMEOUT = 3.0


@pytest.fixture(params=["explicit", "auto"])
async def env(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[NetfenceEnv]:
    bed = NetfenceEnv(cluster, tmp_path / "env", nodes=0, report_ttl=4)
    await bed.start()
    try:
        assert bed.kubelet is not None and bed.fabric is not None
        for index in range(2):
            await bed.kubelet.add_node(index)  # a Node with spec.podCIDRs = the fabric's CIDR of the node
            option = "auto" if request.param == "auto" else bed.fabric.node(index).pod_cidr
            bed.start_agent(index, extra=(f"--pod-cidrs={option}",))
        yield bed
    finally:
        await bed.close()


class Hammer:
    """Probes ``src -> ip:PORT`` back to back on a thread; counts the probes that got through."""

    def __init__(self, prober: Prober, src: PodHandle, ip: str) -> None:
        self.prober, self.src, self.ip = prober, src, ip
        self.probes = 0
        self.through = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ok = connects(self.prober, self.src.netns, self.ip, PORT, DENIED_TIMEOUT)
            self.probes += 1
            self.through += ok

    def start(self) -> Hammer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    async def probed(self, at_least: int) -> bool:
        return self.probes >= at_least


async def test_a_new_pod_is_denied_until_its_endpoint_is_known(
    env: NetfenceEnv, prober: Prober, request: pytest.FixtureRequest
) -> None:
    kubelet = env.kubelet
    assert kubelet is not None
    ns = namespace_of_test("uw", request)
    await env.ensure_namespace(ns, {})
    client = await kubelet.create_pod(ns, "client", {"role": "client"}, [(PORT, "TCP")], 1)
    known = await kubelet.create_pod(ns, "known", {"role": "known"}, [(PORT, "TCP")], 0)
    await env.apply_manifest({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-new", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"role": "new"}}, "policyTypes": ["Ingress"], "ingress": []},
    })
    assert env.fabric is not None
    node0 = env.fabric.node(0).netns
    nodes = [env.fabric.node(i) for i in (0, 1)]

    async def both_known() -> bool:
        # both agents drop unknown workloads of their node's pod CIDR (with auto: once the controller
        # published it and the agent took it), and both pods (neither is selected) are known on their
        # nodes: the client reaches the other pod
        for node in nodes:
            dispatch = chain_rules(node.netns, TO_WL_CHAIN)
            if not dispatch or not dispatch[-1].endswith(
                    f' -d {node.pod_cidr} -m comment --comment "netfence ingress to unknown workload" -j DROP'):
                return False
        return await _connects(prober, client, known.ip)

    await eventually(both_known, timeout=120, what="agents synced with --pod-cidrs; client -> known")

    hammers: list[Hammer] = []
    before: list[bool] = []

    async def before_publish(pod: PodHandle) -> None:
        # the pod's server answers (the fabric waited for it), but no one knows the pod yet
        before.append(await _connects(prober, client, pod.ip, DENIED_TIMEOUT))
        before.append(await _connects(prober, pod, known.ip, DENIED_TIMEOUT))  # its egress too
        hammers.append(Hammer(prober, client, pod.ip).start())
        await eventually(lambda: hammers[0].probed(3), timeout=30, what="probes before publishing")

    try:
        new = await kubelet.create_pod(ns, "new", {"role": "new"}, [(PORT, "TCP")], 0,
                                       before_publish=before_publish)

        async def deny_in_force() -> bool:
            status = (await cps(env, f"{ns}.deny-new")).get("status") or {}
            return bool(status.get("phase") == "Enforced" and status.get("endpoints") == 1)

        await eventually(deny_in_force, timeout=60, what="deny-new enforced on the new pod")
        seen = hammers[0].probes
        await eventually(lambda: hammers[0].probed(seen + 5), timeout=30, what="probes after the rules")
    finally:
        for hammer in hammers:
            hammer.stop()
    assert before == [False, False], "an unknown pod was reachable (or could send) before it was published"
    assert hammers[0].through == 0, f"{hammers[0].through} of {hammers[0].probes} probes reached the new pod"
    assert any(new.ip in r and "-g nf-tw-" in r for r in chain_rules(node0, TO_WL_CHAIN))  # its own rules now

    # a pod no policy selects: denied while unknown, reachable once known
    unknown: list[bool] = []

    async def check_unknown(pod: PodHandle) -> None:
        unknown.append(await _connects(prober, client, pod.ip, DENIED_TIMEOUT))

    free = await kubelet.create_pod(ns, "free", {"role": "free"}, [(PORT, "TCP")], 0, before_publish=check_unknown)
    assert unknown == [False]
    await eventually(lambda: _connects(prober, client, free.ip), timeout=60, what="client -> free pod once known")
    await eventually(lambda: _connects(prober, free, known.ip), timeout=60, what="free pod -> known once known")


async def _connects(prober: Prober, src: PodHandle, ip: str, timeout: float = ALLOWED_TIMEOUT) -> bool:
    return await asyncio.to_thread(connects, prober, src.netns, ip, PORT, timeout)
