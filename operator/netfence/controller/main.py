"""``netfence-controller``: the Kopf operator that compiles NetworkPolicy into etcd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from netfence.config import ConfigError, ControllerConfig, load_controller_config
from netfence.logs import configure_logging

log = logging.getLogger(__name__)


async def run(config: ControllerConfig) -> None:
    import kopf

    from netfence.controller.handlers import build_registry
    from netfence.controller.health import liveness_server
    from netfence.controller.metrics import ControllerMetrics
    from netfence.metrics_http import metrics_server

    metrics = ControllerMetrics()  # a registry of this process's own, served on --metrics-port
    # /livez (NETFENCE_LIVENESS_PORT): alive while the loop answers, whatever etcd does;
    # Kopf's /healthz below runs the probes (etcd) and is the readiness endpoint.
    async with (
        liveness_server(os.environ),
        metrics_server(metrics.registry, config.metrics_host, config.metrics_port),
    ):
        await kopf.operator(
            registry=build_registry(config, metrics),
            standalone=True,  # leadership is decided in etcd, not by Kopf peering
            clusterwide=True,
            liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
        )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_controller_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"netfence-controller: {exc}\n")
        return 2
    configure_logging(config.log_level, config.log_format)
    if config.kubeconfig is not None:
        # Kopf's login reads KUBECONFIG through kubernetes_asyncio, which takes it at import time.
        os.environ["KUBECONFIG"] = str(config.kubeconfig)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
