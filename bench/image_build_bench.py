"""Image rebuild after a code-only change: the Dockerfile against a baseline Dockerfile (prints figures).

What `hack/node-images.sh` pays whenever operator/ changes: both targets
(controller, agent) rebuilt by podman, then saved as OCI archives for
containerd. The same code change is built with the baseline Dockerfile (by
default the one of git revision 4f9d3a7, before the dependency layers were
put ahead of the code layer; saved gzip-compressed as node-images.sh did) and
with the current one (saved uncompressed, as node-images.sh does now), in a
copy of the build context and in node-images.sh's podman store, so both use
the same cache. Each round changes one comment in the copy's
operator/netfence/__init__.py first; round 1 of each variant also fills the
cache (its dependency layers), later rounds are the code-only figure.

    sudo .venv/bin/python bench/image_build_bench.py [--rounds 2] [--baseline-rev REV] [--json FILE]

Needs hack/setup-node.sh (podman) and the local base image of hack/node-images.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/netfence/python:3.11-bookworm"
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "operator", "image")


def podman_env() -> dict[str, str]:
    cache = Path(os.environ.get("NETFENCE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache") / "netfence")
    conf = cache / "podman" / "storage.conf"
    if not conf.exists():
        raise SystemExit(f"{conf} missing: run hack/node-images.sh once (it makes the store and the base)")
    return os.environ | {"CONTAINERS_STORAGE_CONF": str(conf)}


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.monotonic()
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed:\n{res.stderr[-2000:]}")
    return time.monotonic() - start


def copy_context(dest: Path, dockerfile: str) -> None:
    dest.mkdir(parents=True)
    for name in CONTEXT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "Dockerfile").write_text(dockerfile)


def change_code(context: Path, token: str) -> None:
    init = context / "operator" / "netfence" / "__init__.py"
    lines = [ln for ln in init.read_text().splitlines() if not ln.startswith("# bench change ")]
    init.write_text("\n".join([*lines, f"# bench change {token}"]) + "\n")


def round_figures(context: Path, env: dict[str, str], compress: bool, out: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    for target in ("controller", "agent"):
        image = f"localhost/netfence-bench/{target}:latest"
        figures[f"build {target}"] = timed(
            ["podman", "build", "--quiet", "--network=host", "--pull=never", "--build-arg",
             f"PYTHON_IMAGE={BASE_IMAGE}", "--target", target, "-t", image, "-f", "Dockerfile", "."], env, context)
        archive = out / f"{target}.oci.tar"
        archive.unlink(missing_ok=True)
        figures[f"save {target}"] = timed(
            ["podman", "save", "--quiet", "--format", "oci-archive", *([] if compress else ["--uncompressed"]),
             "-o", str(archive), image], env, context)
    figures["total"] = sum(figures.values())
    return figures


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2, help="code changes per variant (default 2)")
    parser.add_argument("--baseline-rev", default="4f9d3a7", help="git revision of the baseline Dockerfile")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    env = podman_env()
    baseline = subprocess.run(["git", "show", f"{args.baseline_rev}:Dockerfile"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
    variants = {"baseline": (baseline, True), "current": ((REPO / "Dockerfile").read_text(), False)}
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="nf-image-bench-") as tmp:
        for name, (dockerfile, compress) in variants.items():
            context = Path(tmp) / name
            copy_context(context, dockerfile)
            results[name] = []
            for n in range(args.rounds):
                change_code(context, f"{name}-{n}-{time.time_ns()}")
                figures = round_figures(context, env, compress, Path(tmp))
                results[name].append(figures)
                print(f"{name:8} round {n + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in figures.items())
                      + f"  (load {load()})")
    subprocess.run(["podman", "rmi", "-f", "localhost/netfence-bench/controller:latest",
                    "localhost/netfence-bench/agent:latest"], env=env, capture_output=True, check=False)
    subprocess.run(["podman", "image", "prune", "-f"], env=env, capture_output=True, check=False)
    # the code-only figure: rounds after the first (the first may fill the cache)
    code_only = {name: [r["total"] for r in rounds[1:] or rounds] for name, rounds in results.items()}
    base, cur = statistics.median(code_only["baseline"]), statistics.median(code_only["current"])
    print(f"code-only rebuild of both targets incl. saves: baseline {base:.0f}s, current {cur:.0f}s, "
          f"ratio {base / cur:.1f}x (ranges: baseline {min(code_only['baseline']):.0f}-"
          f"{max(code_only['baseline']):.0f}s, current {min(code_only['current']):.0f}-"
          f"{max(code_only['current']):.0f}s; per image version: node-images.sh builds 2 versions)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "code_only_total": code_only, "load": load()}, indent=2))


if __name__ == "__main__":
    main()
