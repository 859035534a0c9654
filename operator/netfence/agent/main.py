"""``netfence-agent``: program one node's netfilter from Netfence's etcd model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from netfence.config import AgentConfig, ConfigError, load_agent_config
from netfence.logs import configure_logging
from netfence.store.errors import StoreError

if TYPE_CHECKING:
    from netfence.agent.loop import Agent
    from netfence.model.enforcement import Endpoint
    from netfence.store.etcd import EtcdStore

log = logging.getLogger(__name__)


async def run(config: AgentConfig) -> None:
    from netfence.agent import health
    from netfence.agent.loop import Agent
    from netfence.agent.metrics import AgentMetrics, save_filter_table
    from netfence.dataplane.apply import Dataplane
    from netfence.dataplane.counters import read_counters
    from netfence.dataplane.runner import SubprocessRunner
    from netfence.metrics_http import metrics_server
    from netfence.store.etcd import EtcdStore

    store = EtcdStore(config.etcd)
    runner = SubprocessRunner(netns=config.netns)
    dataplane = Dataplane(runner, ipv6=config.ipv6, rewrite_all=config.bench_full_render, prefetch=True)
    features = await asyncio.to_thread(dataplane.detect_features)
    features = dataclasses.replace(features, workload_cidrs=config.pod_cidrs)
    metrics = AgentMetrics()  # a registry of this process's own, served on --metrics-port
    agent = Agent(config, store, dataplane, features, metrics)

    def local_endpoints() -> Iterable[Endpoint]:
        return agent.state.endpoints.values()  # looked up at each read

    metrics.bind(agent.health, local_endpoints, lambda family: save_filter_table(runner, family),
                 dataplane.families)
    http = await health.serve(lambda: {**agent.health.as_json(), **store.connection.tls_status()},
                              config.health_host, config.health_port,
                              counters=lambda chains, family: read_counters(runner, chains, family))
    served = contextlib.AsyncExitStack()
    await served.enter_async_context(metrics_server(
        metrics.registry, config.metrics_host, config.metrics_port, before_scrape=metrics.refresh))
    main_task = asyncio.create_task(_connect_and_run(agent, store))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Fail-static: stopping never touches the rules; they stay in force.
        loop.add_signal_handler(sig, main_task.cancel)
    log.info("agent for node %s started (netns=%s)", config.node, config.netns or "host")
    try:
        await main_task
    except asyncio.CancelledError:
        log.info("agent stopping; rules stay in force")
    finally:
        await http.cleanup()
        await served.aclose()
        with contextlib.suppress(Exception):
            await store.close()


async def _connect_and_run(agent: Agent, store: EtcdStore) -> None:
    """Connect to etcd (retrying: an agent started during an etcd outage keeps the
    node's rules as they are and waits), then run the agent."""
    from netfence.store.connection import Backoff

    backoff = Backoff()
    while True:
        try:
            await store.connect()
            break
        except StoreError as exc:
            log.warning("etcd unavailable at start (%s); the rules in force stay as they are", exc)
            await store.pause(backoff.next())  # ends early once etcd is reachable
    await agent.run()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_agent_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"netfence-agent: {exc}\n")
        return 2
    configure_logging(config.log_level, config.log_format)
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
