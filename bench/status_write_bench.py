"""What one ClusterPolicyStatus write costs this machine's API server (prints figures; not a test).

Issue 11 asks for 1,000 statuses written within 5 s of a cold start. Each new
status is two API requests: a create (the CRD has a ``status`` subresource, so
a create cannot carry the status) and a status patch. This bench measures the
CPU each request costs every process involved, with nothing else running: a
real kube-apiserver and its etcd (``LocalCluster``) and the controller's own
client calls (``KubeApi.create_status`` / ``patch_status``, kubernetes_asyncio,
``--concurrency`` requests in flight). From the per-request CPU it prints the
least wall time 1,000 new statuses can take on this machine's cores even if the
controller did nothing else, which is what the 5 s goal has to be read against.

    .venv/bin/python bench/status_write_bench.py [--objects 500] [--concurrency 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import config

from benchlib import load_note
from netfence.controller.kube import CPS_GROUP, CPS_PLURAL, CPS_VERSION, KubeApi
from netfence_lab.cluster import LocalCluster
from netfence_lab.tools import ensure_tools

#: A status as the writer writes it for an Enforced NetworkPolicy on 100 nodes.
STATUS: dict[str, Any] = {
    "phase": "Enforced", "observedGeneration": 1, "policyGeneration": 1, "revision": 10,
    "nodesRequired": 100, "nodesEnforced": 100,
    "conditions": [{"type": "Ready", "status": "True", "reason": "Enforced",
                    "message": "enforced on 100 of 100 nodes", "lastTransitionTime": "2026-11-28T00:00:00Z"}],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spec(i: int) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "policy": {"namespace": f"ns-{i}", "name": f"p{i}", "uid": f"u{i}"},
            "policyRef": f"ns-{i}/p{i}", "generation": 1}


async def measure(label: str, count: int, concurrency: int, pids: dict[str, int],
                  call: Callable[[int], Awaitable[object]]) -> dict[str, Any]:
    """``count`` requests, ``concurrency`` at once: wall time and CPU per request of every process."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            await call(i)

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    mine, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.monotonic() - t0
    per_request = {name: (cpu_seconds(pid) - before[name]) / count * 1e3 for name, pid in pids.items()}
    per_request["controller client"] = (time.process_time() - mine) / count * 1e3
    print(f"  {label:<28} {count} in {wall:5.2f} s; CPU per request: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in per_request.items()), flush=True)
    return {"wall_s": wall, "cpu_ms_per_request": per_request}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="netfence-statusbench-"))
    cluster = LocalCluster(workdir / "cluster", ensure_tools())
    print(f"status write bench: {args.objects} objects, {args.concurrency} requests in flight; "
          f"machine: {load_note()}", flush=True)
    try:
        await asyncio.to_thread(cluster.start)
        api = await config.new_client_from_config(config_file=str(cluster.kubeconfig))
        try:
            kube = KubeApi(api)
            pids = {name: pid for name, pid in cluster.pids().items() if name in ("kube-apiserver", "api-etcd")}
            n, c = args.objects, args.concurrency
            out = {
                "create": await measure("create", n, c, pids, lambda i: kube.create_status(f"ns-{i}.p{i}", spec(i))),
                "patch_status": await measure("status patch (new status)", n, c, pids,
                                              lambda i: kube.patch_status(f"ns-{i}.p{i}", STATUS)),
                "patch_same": await measure("status patch (same status)", n, c, pids,
                                            lambda i: kube.patch_status(f"ns-{i}.p{i}", STATUS)),
                "get": await measure("get", n, c, pids, lambda i: kube.custom.get_cluster_custom_object(
                    CPS_GROUP, CPS_VERSION, CPS_PLURAL, f"ns-{i}.p{i}")),
            }
        finally:
            await api.close()
    finally:
        await asyncio.to_thread(cluster.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    cores = os.cpu_count() or 1
    server_ms = sum(ms for name, ms in out["create"]["cpu_ms_per_request"].items() if name != "controller client")
    server_ms += sum(ms for name, ms in out["patch_status"]["cpu_ms_per_request"].items()
                     if name != "controller client")
    floor = 1000 * server_ms / 1e3 / cores
    print(f"API server + its etcd per new status (create + status patch): {server_ms:.1f} ms of CPU; "
          f"1,000 new statuses need at least {floor:.1f} s on {cores} cores with nothing else running "
          f"(goal: all written < 5 s after a cold start)")
    print(f"machine at the end: {load_note()}")
    return {**out, "server_cpu_ms_per_new_status": server_ms, "floor_s_for_1000": floor, "cores": cores,
            "machine": load_note()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
