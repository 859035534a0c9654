"""A test bed enforced by kube-network-policies instead of Netfence (see :mod:`netfence_lab.peer`).

``PeerEnv`` is a :class:`~netfence_lab.env.NetfenceEnv` with the same control plane,
namespace nodes, "kubelet", pods and API helpers, but no Netfence controller and no
agents: one kube-network-policies process per node enforces instead. The peer
publishes no signal that says a change is in force (no status, no applied revision),
so :meth:`PeerEnv.wait_enforced` refuses; the conformance runner waits by probing
for such an *external enforcer* (``external_enforcer = True``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from netfence_lab.env import EnforcementTimeout, NetfenceEnv
from netfence_lab.peer import TOOL, PeerNode, PeerNodes, netns_run
from netfence_lab.process import ManagedProcess

ENFORCERS = ("netfence", TOOL)


@dataclass
class PeerEnv(NetfenceEnv):
    peers: PeerNodes | None = None

    #: The runner's enforcement barrier does not apply: wait by probing.
    external_enforcer = True

    async def start(self, controllers: int = 0) -> PeerEnv:
        """Nodes, then one peer per node; ``controllers`` is ignored (no Netfence runs)."""
        fabric, kubelet = await self.start_bed()
        try:
            for index in range(self.nodes):
                await kubelet.add_node(index)
            self.peers = PeerNodes(self.api, self.cluster.apiserver.port, self.cluster.apiserver.pki.ca_cert,
                                   self.workdir, python=sys.executable)
            await self.peers.start([
                PeerNode(kubelet.nodes[i], fabric.node(i).netns, fabric.node(i).pod_cidr, fabric.node(i).pod_cidr6)
                for i in range(self.nodes)
            ])
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self.peers is not None:
            with contextlib.suppress(Exception):
                self.peers.stop()
        await super().close()

    def enforcer_processes(self) -> list[ManagedProcess]:
        """The peer processes (for the runner's failure dumps)."""
        if self.peers is None:
            return []
        return [p.process for p in self.peers.procs.values()]

    def dump_nodes(self) -> list[str]:
        """Every node's queue hook (the shim's chain, or the peer's own nftables table)."""
        parts: list[str] = []
        if self.fabric is None:
            return parts
        for node in self.fabric.nodes.values():
            text = netns_run(node.netns, "nft", "list", "ruleset", check=False)
            parts.append(f"### node node-{node.index} ({node.netns}): nft list ruleset\n{text}\n")
        return parts

    async def wait_enforced(
        self, marks: Mapping[str, int] | None = None, timeout: float = 60.0, statuses: bool = True
    ) -> float:
        raise EnforcementTimeout(f"{TOOL} publishes no enforcement signal; wait by probing instead")
