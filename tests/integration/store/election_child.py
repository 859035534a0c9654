"""A separate process that wins an election and holds it (used by test_store_election.py).

Usage: python election_child.py ENDPOINT PREFIX IDENTITY TTL. Prints "LEADER" once elected.
"""

from __future__ import annotations

import asyncio
import sys

from netfence.store.election import LeaderElection
from netfence.store.etcd import EtcdConfig, EtcdStore


async def main(endpoint: str, prefix: str, identity: str, ttl: int) -> None:
    store = EtcdStore(EtcdConfig([endpoint], prefix), identity=identity)
    await store.connect()
    election = LeaderElection(store, identity, ttl=ttl)
    task = asyncio.create_task(election.run())
    await election.became_leader.wait()
    sys.stdout.write("LEADER\n")
    sys.stdout.flush()
    await task


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
