"""Locate (and if needed build) the pinned control-plane binaries."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT_MARKER = "hack/build-tools.sh"


class ToolsError(RuntimeError):
    """The tools could not be found or built; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("NETFENCE_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "netfence"


def find_repo_root(start: Path | None = None) -> Path | None:
    here = (start or Path(__file__)).resolve()
    for parent in [here, *here.parents]:
        if (parent / REPO_ROOT_MARKER).is_file():
            return parent
    return None


@dataclass(frozen=True)
class Tools:
    etcd: Path
    kube_apiserver: Path
    kubectl: Path
    helm: Path

    @classmethod
    def in_dir(cls, bin_dir: Path) -> Tools:
        return cls(
            etcd=bin_dir / "etcd",
            kube_apiserver=bin_dir / "kube-apiserver",
            kubectl=bin_dir / "kubectl",
            helm=bin_dir / "helm",
        )

    def missing(self) -> list[str]:
        return [p.name for p in (self.etcd, self.kube_apiserver, self.kubectl, self.helm) if not os.access(p, os.X_OK)]


def ensure_tools(build: bool = True) -> Tools:
    """Return the tool paths, building missing ones with hack/build-tools.sh.

    ``NETFENCE_BIN`` may point at a folder that already holds all four tools.
    """
    override = os.environ.get("NETFENCE_BIN")
    if override:
        tools = Tools.in_dir(Path(override))
        if tools.missing():
            raise ToolsError(f"NETFENCE_BIN={override} lacks {', '.join(tools.missing())}")
        return tools
    root = find_repo_root()
    if build and root is not None:
        if shutil.which("go") is None:
            tools = Tools.in_dir(cache_dir() / "bin")
            if not tools.missing():
                return tools
            raise ToolsError(
                "the Go toolchain is missing: install Go >= 1.25 and put 'go' on PATH "
                "(needed once to build etcd, kube-apiserver, kubectl and helm)"
            )
        result = subprocess.run(
            ["bash", str(root / REPO_ROOT_MARKER)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ToolsError(f"building the control-plane tools failed: {last}")
        tools = Tools.in_dir(Path(result.stdout.strip().splitlines()[-1]))
    else:
        tools = Tools.in_dir(cache_dir() / "bin")
    if tools.missing():
        raise ToolsError(
            f"missing tools {', '.join(tools.missing())} in {cache_dir() / 'bin'}: "
            "run hack/build-tools.sh from a Netfence checkout"
        )
    return tools
