"""Dataplane benchmark: render + plan + apply timings and rule/set growth (prints figures).

Runs as root inside a throwaway network namespace (``nftest-bench-<random>``)
that it deletes at the end; the host's netfilter is never touched.

    .venv/bin/python bench/dataplane_bench.py [--iterations 50] [--ipv6]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace

from netfence.dataplane.apply import Dataplane
from netfence.dataplane.incremental import IncrementalRenderer
from netfence.dataplane.plan import plan
from netfence.dataplane.render import Features, render
from netfence.dataplane.ruleset import Ruleset
from netfence.dataplane.runner import SubprocessRunner
from netfence.model.enforcement import (
    CompiledPolicy,
    CompiledPort,
    CompiledRule,
    Endpoint,
    NodeModel,
    PeerSet,
)

N_NAMESPACES = 10
N_POD_SETS = 200
N_NET_SETS = 20
N_PORT_SETS = 10


def _pod_set(k: int, extra: tuple[str, ...] = ()) -> PeerSet:
    definition = {"ns": f"ns{k % N_NAMESPACES}", "sel": k}
    members = tuple(sorted({f"10.244.{1 + (k + i) % 50}.{(k * 7 + i) % 250 + 2}" for i in range(30)} | set(extra)))
    return PeerSet(PeerSet.make_id("pods", definition), "pods", definition, members)


def _net_set(k: int) -> PeerSet:
    definition = {"cidr": k}
    return PeerSet(PeerSet.make_id("net", definition), "net", definition, (f"10.{k}.0.0/16", f"!10.{k}.1.0/24"))


def _port_set(k: int) -> PeerSet:
    definition = {"port": f"http{k}"}
    members = tuple(sorted(f"10.244.{1 + i % 50}.{i % 250 + 2},tcp:{8000 + k}" for i in range(50)))
    return PeerSet(PeerSet.make_id("ports", definition), "ports", definition, members)


def _policy(i: int, sets: list[PeerSet], port_shift: int = 0) -> CompiledPolicy:
    pods, nets, named = sets[:N_POD_SETS], sets[N_POD_SETS : N_POD_SETS + N_NET_SETS], sets[-N_PORT_SETS:]
    ingress = [
        CompiledRule(
            (pods[i % N_POD_SETS].id, pods[(i * 7) % N_POD_SETS].id),
            (CompiledPort("TCP", 80 + (i + port_shift) % 50), CompiledPort("UDP", 53)),
        ),
        CompiledRule((nets[i % N_NET_SETS].id,), (CompiledPort("TCP", 443),)),
    ]
    if i % 10 == 0:
        ingress.append(CompiledRule(None, (CompiledPort("TCP", named_set=named[i % N_PORT_SETS].id),)))
    egress = (CompiledRule((pods[(i * 3) % N_POD_SETS].id,), (CompiledPort("TCP", 5432),)),) if i % 4 == 0 else None
    return CompiledPolicy(f"ns{i % N_NAMESPACES}", f"pol{i}", f"uid{i}", tuple(ingress), egress)


def synthetic_model(n_policies: int, n_endpoints: int = 100, applied: int | None = None) -> NodeModel:
    """``n_policies`` policies in the model, the first ``applied`` of them select local endpoints."""
    applied = n_policies if applied is None else applied
    sets = [_pod_set(k) for k in range(N_POD_SETS)] + [_net_set(k) for k in range(N_NET_SETS)]
    sets += [_port_set(k) for k in range(N_PORT_SETS)]
    policies = [_policy(i, sets) for i in range(n_policies)]
    ingress: dict[int, list[str]] = {j: [] for j in range(n_endpoints)}
    egress: dict[int, list[str]] = {j: [] for j in range(n_endpoints)}
    for i, pol in enumerate(policies[:applied]):
        ingress[i % n_endpoints].append(pol.key)
        if pol.egress is not None:
            egress[i % n_endpoints].append(pol.key)
    endpoints = {}
    for j in range(n_endpoints):
        ep = Endpoint(
            "bench",
            f"ns{j % N_NAMESPACES}",
            f"pod{j}",
            (f"10.244.0.{j + 2}", f"fd00::{j + 2:x}"),
            tuple(ingress[j]),
            tuple(egress[j]),
        )
        endpoints[ep.key] = ep
    return NodeModel("bench", endpoints, {p.key: p for p in policies}, {s.id: s for s in sets})


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def _row(label: str, samples: list[float]) -> str:
    return f"  {label:<26} p50 {_pct(samples, 0.5):8.2f} ms   p99 {_pct(samples, 0.99):8.2f} ms"


def _timed_changes(
    dp: Dataplane, base: NodeModel, change: Callable[[NodeModel, int], NodeModel], iterations: int,
    renderer: Callable[[NodeModel], Ruleset],
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"render": [], "plan": [], "apply (incl. plan)": [], "total": []}
    renderer(base)
    for it in range(iterations):
        model = change(base, it)
        t0 = time.perf_counter()
        desired = renderer(model)
        t1 = time.perf_counter()
        plan(dp.applied, desired)
        t2 = time.perf_counter()
        result = dp.apply(desired)
        t3 = time.perf_counter()
        assert not result.full
        times["render"].append(t1 - t0)
        times["plan"].append(t2 - t1)
        times["apply (incl. plan)"].append(t3 - t2)
        times["total"].append(t3 - t0 - (t2 - t1))
    return times


def _membership_change(base: NodeModel, it: int) -> NodeModel:
    extra = (f"10.244.99.{it % 200 + 2}",) if it % 2 == 0 else ()
    changed = _pod_set(0, extra)
    return replace(base, sets={**base.sets, changed.id: changed})


def _policy_change(base: NodeModel, it: int) -> NodeModel:
    sets = list(base.sets.values())
    changed = _policy(0, sets, port_shift=1 + it % 2)
    return replace(base, policies={**base.policies, changed.key: changed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--ipv6", action="store_true", help="dual-stack endpoints (ip6tables too)")
    args = parser.parse_args()
    features = Features(ipv6=args.ipv6)
    netns = "nftest-bench-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        dp = Dataplane(SubprocessRunner(netns), ipv6=args.ipv6)
        print(f"families: {'v4+v6' if args.ipv6 else 'v4'}; throwaway netns {netns}")
        print("\nGrowth (100 local endpoints):")
        print(f"  {'policies in model':>18} {'applied locally':>16} {'rules':>8} {'chains':>7} {'sets':>6}")
        for n, applied in ((100, 100), (1000, 1000), (5000, 5000), (5000, 1000)):
            rs = render(synthetic_model(n, applied=applied), features=features)
            chains = sum(len(c) for c in rs.chains.values())
            print(f"  {n:>18} {applied:>16} {rs.rule_count:>8} {chains:>7} {rs.set_count:>6}")

        base = synthetic_model(1000)
        t0 = time.perf_counter()
        first = dp.apply(render(base, features=features))
        print(
            f"\nInitial full sync, 1,000 policies: {first.rules} rules, {first.sets} sets, "
            f"{(time.perf_counter() - t0) * 1000:.0f} ms"
        )
        for label, change in (("set-membership change", _membership_change), ("one-policy change", _policy_change)):
            modes: dict[str, Callable[[NodeModel], Ruleset]] = {
                "full render (before)": lambda m: render(m, features=features),
                "incremental": IncrementalRenderer(features).render,
            }
            print(f"\n{label} x{args.iterations} (1,000 policies, 100 endpoints):")
            totals = {}
            for mode, renderer in modes.items():
                times = _timed_changes(dp, base, change, args.iterations, renderer)
                totals[mode] = times["total"]
                print(f"  {mode}:")
                for key, samples in times.items():
                    print(_row(key, samples))
            old, new = totals["full render (before)"], totals["incremental"]
            print(f"  total ratio full/incremental: p50 {_pct(old, 0.5) / _pct(new, 0.5):.1f}x, "
                  f"p99 {_pct(old, 0.99) / _pct(new, 0.99):.1f}x")

        big_n = 1000
        while render(synthetic_model(big_n), features=features).rule_count < 20000:
            big_n += 500
        big = render(synthetic_model(big_n), features=features)
        dp.apply(big)
        print(f"\nFull resync ({big_n} policies, {big.rule_count} rules, {big.set_count} sets) on a kernel that"
              " already holds them, incl. kernel read-before (and read-back when something was written):")
        medians = {}
        for rewrite_all, label in ((True, "rewrite everything (before)"), (False, "write what differs")):
            dp.rewrite_all = rewrite_all
            full_times = []
            for _ in range(3):
                t0 = time.perf_counter()
                dp.repair()
                full_times.append(time.perf_counter() - t0)
            medians[rewrite_all] = statistics.median(full_times)
            print(f"  {label:<28} median {medians[rewrite_all] * 1000:.0f} ms over {len(full_times)}")
        print(f"  ratio: {medians[True] / medians[False]:.1f}x")
        print("drift check at that size: ", end="")
        t0 = time.perf_counter()
        drift = dp.check_drift()
        print(f"{(time.perf_counter() - t0) * 1000:.0f} ms (drift={drift})")
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
