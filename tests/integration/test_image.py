"""What the image build does, without a container runtime.

The wheel is built from exactly the files the Dockerfile's build stage copies,
then installed into a fresh virtualenv by image/install-wheel.sh (the script
the runtime stage runs); every console script must start. The agent's iptables
backend directories are made by image/install-iptables-backends.sh from this
machine's Debian iptables package, like the agent stage does.
Needs PyPI (build isolation and the package's dependencies).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.test_dockerfile import parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "image"
ENTRY_POINTS = ("netfence", "netfence-controller", "netfence-agent")


def build_context_copy(dest: Path) -> Path:
    """Copy what the build stage COPYs (and nothing else) into ``dest``."""
    dest.mkdir()
    for instruction in parse_dockerfile():
        if instruction.stage == "build" and instruction.keyword == "COPY":
            *sources, _target = instruction.args.split()
            for src in sources:
                path = REPO / src
                if path.is_dir():
                    shutil.copytree(path, dest / src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy2(path, dest / src)
    return dest


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("image")
    context = build_context_copy(work / "src")
    dist = work / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(context)],
        capture_output=True, text=True, check=False, timeout=240,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    venv = work / "venv"
    # `python` on PATH is this interpreter, as `python` is the base image's in the Dockerfile.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    install = subprocess.run(
        ["sh", str(IMAGE / "install-wheel.sh"), str(venv), str(dist)],
        capture_output=True, text=True, env=env, check=False, timeout=240,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    yield venv


def test_wheel_carries_the_crd_and_type_marker(installed_venv: Path) -> None:
    [wheel] = (installed_venv.parent / "dist").glob("netfence-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "netfence/crds/clusterpolicystatus.yaml" in names
    assert "netfence/py.typed" in names
    assert (installed_venv / "pyvenv.cfg").is_file()
    # A fresh venv: nothing of the development environment leaks in.
    assert not list((installed_venv / "lib").glob("python3*/site-packages/pytest"))


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_console_script_starts(installed_venv: Path, script: str) -> None:
    result = subprocess.run(
        [str(installed_venv / "bin" / script), "--help"],
        capture_output=True, text=True, check=False, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}"), result.stdout[:200]


@pytest.fixture(scope="module")
def backend_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lib = tmp_path_factory.mktemp("lib")
    result = subprocess.run(
        ["sh", str(IMAGE / "install-iptables-backends.sh"), str(lib), "/usr/sbin"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return lib


@pytest.mark.parametrize(("backend", "marker"), [("nft", "(nf_tables)"), ("legacy", "(legacy)")])
def test_backend_dirs_hold_each_backends_tools(backend_dirs: Path, backend: str, marker: str) -> None:
    tools = sorted(p.name for p in (backend_dirs / f"iptables-{backend}").iterdir())
    assert tools == sorted(f"{f}{s}" for f in ("iptables", "ip6tables") for s in ("", "-save", "-restore"))
    for tool in tools:
        out = subprocess.run([str(backend_dirs / f"iptables-{backend}" / tool), "--version"],
                             capture_output=True, text=True, check=True)
        assert marker in out.stdout + out.stderr, (tool, out.stdout, out.stderr)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_agent_entrypoint_runs_the_console_script_with_the_chosen_backend(
    installed_venv: Path, backend_dirs: Path, backend: str
) -> None:
    env = {
        "PATH": f"{installed_venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "NETFENCE_IPTABLES_LIB_DIR": str(backend_dirs),
        "NETFENCE_IPTABLES_BACKEND": backend,
    }
    result = subprocess.run(["sh", str(IMAGE / "agent-entrypoint.sh"), "--help"],
                            capture_output=True, text=True, env=env, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: netfence-agent")
    # The iptables the agent will run is the chosen backend's.
    which = subprocess.run(
        ["sh", "-c", f'PATH="{backend_dirs}/iptables-{backend}:$PATH"; iptables --version'],
        capture_output=True, text=True, env=env, check=True,
    )
    assert ("(nf_tables)" if backend == "nft" else "(legacy)") in which.stdout
