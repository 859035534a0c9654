"""In-process model benchmark: the controller's pure path on the synthetic world (prints figures).

Feeds the same world as ``controller_bench.py`` (5,000 pods, 100 namespaces,
1,000 NetworkPolicies by default) through the controller's own code path
(``WorldTracker.replace_all`` -> ``ModelEngine``), times the cold build, the
first drain and the syncer's value encoding, checks the result equals
``compile_world``, then times single pod label changes. ``--profile`` prints
a cProfile of the cold build (py-spy is not available here).

    .venv/bin/python bench/model_bench.py [--changes 200] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import pct, vm_status
from netfence.controller.world import WorldTracker
from netfence.model.compiler import ModelEngine, compile_world
from netfence.model.world import namespace_from_k8s, pod_from_k8s, policy_from_k8s
from netfence.store.layout import encode
from synthetic import (
    Sizes,
    flip_track,
    namespace_bodies,
    node_bodies,
    pod_bodies,
    policy_bodies,
    with_status,
)


def listing(sizes: Sizes) -> dict[str, list[dict[str, Any]]]:
    rv = 1000
    pods = []
    for body, status in pod_bodies(sizes):
        rv += 1
        pods.append(with_status(body, status, rv))
    namespaces = namespace_bodies(sizes)
    policies = []
    for body in policy_bodies(sizes):
        rv += 1
        meta = {**body["metadata"], "uid": f"uid-{body['metadata']['name']}", "generation": 1,
                "resourceVersion": str(rv)}
        policies.append({**body, "metadata": meta})
    return {"pods": pods, "namespaces": namespaces, "networkpolicies": policies, "nodes": node_bodies(sizes)}


def cold_build(world: dict[str, list[dict[str, Any]]]) -> tuple[ModelEngine, dict[str, float]]:
    times: dict[str, float] = {}
    engine = ModelEngine()
    tracker = WorldTracker(engine)
    t0 = time.perf_counter()
    tracker.replace_all(world)
    t1 = time.perf_counter()
    desired = engine.drain_changes()
    t2 = time.perf_counter()
    encoded = {k: encode(v) for k, v in desired.items() if v is not None}
    t3 = time.perf_counter()
    times["replace_all (parse + incremental build)"] = t1 - t0
    times["first drain (render every key)"] = t2 - t1
    times["encode every value (syncer)"] = t3 - t2
    times["total"] = t3 - t0
    times["keys"] = len(encoded)
    return engine, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="cProfile the cold build and a label change")
    args = parser.parse_args()
    sizes = Sizes(namespaces=args.namespaces, pods=args.pods, policies=args.policies)
    world = listing(sizes)
    rss0 = vm_status()
    print(f"synthetic world: {sizes.pods} pods, {sizes.namespaces} namespaces, {sizes.policies} policies, "
          f"{sizes.nodes} nodes (python {sys.version.split()[0]})")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        engine, times = cold_build(world)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    else:
        engine, times = cold_build(world)
    rss1 = vm_status()
    print("\nCold build through WorldTracker.replace_all -> ModelEngine:")
    for label, value in times.items():
        print(f"  {label:<42} {value:10.0f}" if label == "keys" else f"  {label:<42} {value * 1000:8.0f} ms")
    print(f"  {'RSS of this process':<42} {rss0['VmRSS'] / 1024:6.0f} MB before, "
          f"{rss1['VmRSS'] / 1024:.0f} MB after (HWM {rss1['VmHWM'] / 1024:.0f} MB)")

    t0 = time.perf_counter()
    expected = compile_world(
        [pod_from_k8s(b) for b in world["pods"]],
        [namespace_from_k8s(b) for b in world["namespaces"]],
        [policy_from_k8s(b) for b in world["networkpolicies"]],
    )
    t1 = time.perf_counter()
    desired = dict(engine.desired())
    kinds = {k: sum(1 for key in expected if key.startswith(k)) for k in ("policies/", "sets/", "endpoints/")}
    same = desired == expected
    print(f"  compile_world from scratch (reference)     {(t1 - t0) * 1000:8.0f} ms; engine == compile_world: {same}")
    print(f"  keys: {kinds['policies/']} policies, {kinds['sets/']} sets, {kinds['endpoints/']} endpoints")
    if not same:
        raise SystemExit("the incremental engine disagrees with compile_world")

    # --- one full status pass: what StatusWriter.facts() costs for every policy --------
    for with_warnings in (True, False):
        t0 = time.perf_counter()
        for ns, name in sorted(engine._policies):
            engine.policy_view(ns, name, with_warnings=with_warnings)
        elapsed = time.perf_counter() - t0
        print(f"  policy_view for all {sizes.policies} policies (one status pass), "
              f"warnings={with_warnings!s:<5}: {elapsed * 1000:6.0f} ms")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for ns, name in sorted(engine._policies):
            engine.policy_view(ns, name)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())

    # --- single pod label changes -------------------------------------------------------
    rng = random.Random(7)
    tracker = WorldTracker(engine)
    pods = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in world["pods"]}
    for body in world["pods"]:
        tracker.versions[("pods", body["metadata"]["namespace"], body["metadata"]["name"])] = int(
            body["metadata"]["resourceVersion"])
    rv = 10**6
    samples: list[float] = []
    key_counts: list[int] = []
    evaluations: list[int] = []
    prof = cProfile.Profile() if args.profile else None
    for _ in range(args.changes):
        key = rng.choice(sorted(pods))
        body = pods[key]
        labels = {**body["metadata"]["labels"], **flip_track(body["metadata"]["labels"])}
        rv += 1
        body = {**body, "metadata": {**body["metadata"], "labels": labels, "resourceVersion": str(rv)}}
        pods[key] = body
        before = engine.selector_evaluations
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        tracker.apply("pods", "MODIFIED", body)
        changes = engine.drain_changes()
        _ = {k: None if v is None else encode(v) for k, v in changes.items()}
        samples.append(time.perf_counter() - t0)
        if prof:
            prof.disable()
        key_counts.append(len(changes))
        evaluations.append(engine.selector_evaluations - before)
    print(f"\nPod label change (track stable<->canary) x{args.changes}: apply + drain + encode")
    print(f"  latency p50 {pct(samples, 0.5) * 1e3:.3f} ms, p99 {pct(samples, 0.99) * 1e3:.3f} ms, "
          f"max {max(samples) * 1e3:.3f} ms")
    print(f"  keys changed per label change: p50 {pct(key_counts, 0.5):.0f}, max {max(key_counts)}, "
          f"distribution {sorted(set(key_counts))}")
    print(f"  selector evaluations per change: p50 {pct(evaluations, 0.5):.0f}, max {max(evaluations)}")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())
    if dict(engine.desired()) != compile_world(
        [pod_from_k8s(b) for b in pods.values()],
        [namespace_from_k8s(b) for b in world["namespaces"]],
        [policy_from_k8s(b) for b in world["networkpolicies"]],
    ):
        raise SystemExit("after the label changes the engine disagrees with compile_world")
    print("  engine == compile_world after the changes: True")


if __name__ == "__main__":
    main()
