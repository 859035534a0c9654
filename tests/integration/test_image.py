"""What the image build does, without a container runtime.

The wheel is built from exactly the files the Dockerfile's build stage copies,
with the build tools of image/build-requirements.lock (hash-checked, no build
isolation, as the build stage does), then installed into a fresh virtualenv
with the hash-checked image/requirements.lock by image/install-wheel.sh (the
script the base stage and the targets run, in the same two steps); every console script must start. pip-compile
run against PyPI keeps both locks as they are (they match pyproject.toml). The agent's iptables
backend directories are made by image/install-iptables-backends.sh from this
machine's Debian iptables package, like the agent stage does.
Needs PyPI (build isolation and the package's dependencies).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name
from tests.unit.test_dockerfile import RUNTIME_LOCK, parse_dockerfile, parse_lock

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
                    (dest / src).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest / src)
    return dest


def run(argv: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, **kwargs)
    assert result.returncode == 0, (argv, result.stdout[-2000:] + result.stderr[-2000:])
    return result


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("image")
    context = build_context_copy(work / "src")
    dist = work / "dist"
    # The build stage: its locked tools (hash-checked) in a fresh environment, no build isolation.
    builder = work / "builder"
    run([sys.executable, "-m", "venv", str(builder)])
    run([str(builder / "bin" / "pip"), "install", "--no-cache-dir", "--require-hashes", "--no-deps",
         "-r", str(IMAGE / "build-requirements.lock")])
    run([str(builder / "bin" / "python"), "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
         str(context)])
    venv = work / "venv"
    # `python` on PATH is this interpreter, as `python` is the base image's in the Dockerfile.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # As the Dockerfile: the locked dependencies (base stage), then the wheel (the targets' code layer).
    for wheel_dir, lock in (("-", str(IMAGE / "requirements.lock")), (str(dist), "-")):
        install = subprocess.run(
            ["sh", str(IMAGE / "install-wheel.sh"), str(venv), wheel_dir, lock],
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


def test_the_runtime_carries_no_test_bed(installed_venv: Path) -> None:
    """The test bed is the separate distribution lab/ (netfence_lab): not in the wheel, not installed,
    and `netfence` in the image offers only the runtime's commands (issue 10)."""
    [wheel] = (installed_venv.parent / "dist").glob("netfence-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("netfence_lab") or "/testbed/" in n or "/conformance/" in n
                or n.endswith(("/demo.py", "/cli_cluster.py", "/cli_node.py"))], names
    assert not list((installed_venv / "lib").glob("python3*/site-packages/netfence_lab*"))
    result = subprocess.run([str(installed_venv / "bin" / "netfence"), "--help"], capture_output=True,
                            text=True, check=False, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "explain" in result.stdout and "status" in result.stdout
    for lab_command in ("demo", "conformance", "cluster", "node"):
        assert f"    {lab_command} " not in result.stdout, result.stdout


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


def test_every_installed_distribution_is_a_locked_pin(installed_venv: Path) -> None:
    """The image's virtualenv holds exactly the lock's versions (and netfence, pip)."""
    pins = {name: pin.version for name, pin in parse_lock(RUNTIME_LOCK.read_text()).items()}
    listed = json.loads(run([str(installed_venv / "bin" / "pip"), "list", "--format=json"]).stdout)
    installed = {canonicalize_name(d["name"]): d["version"] for d in listed}
    extra = {n: v for n, v in installed.items() if n not in pins and n not in ("netfence", "pip", "setuptools")}
    assert not extra, extra
    assert {n: installed.get(n) for n in pins} == pins


@pytest.mark.parametrize(("lock", "source"), [("requirements.lock", "pyproject.toml"),
                                              ("build-requirements.lock", "image/build-requirements.in")])
def test_pip_compile_keeps_the_locks_as_they_are(tmp_path: Path, lock: str, source: str) -> None:
    """What CI verifies online: pip-compile, given today's lock, changes no pin and no hash.

    pip-compile keeps an existing pin while the sources still allow it, so the
    output differs only if pyproject.toml (or build-requirements.in) asks for
    something the lock does not have, or if PyPI's files for a pin changed.
    """
    out = tmp_path / lock
    shutil.copy2(IMAGE / lock, out)
    extras = ["--strip-extras"]
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    run([str(Path(sys.executable).parent / "pip-compile"), "--quiet", "--generate-hashes", *extras,
         "--allow-unsafe", "--no-emit-index-url", "--no-emit-find-links", "--output-file", str(out), source],
        timeout=600, cwd=REPO, env=env)
    assert parse_lock(out.read_text()) == parse_lock((IMAGE / lock).read_text())


def test_the_lab_distribution_adds_its_commands_to_the_runtime(installed_venv: Path, tmp_path: Path) -> None:
    """`pip install . ./lab` (README) is one command away from `netfence demo` and `netfence conformance run`:
    the lab's wheel, installed beside the runtime, adds its commands by entry point. A second venv that
    sees the runtime venv's packages keeps the runtime venv itself free of the lab (the test above)."""
    work = installed_venv.parent
    shutil.copytree(REPO / "lab", tmp_path / "lab", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([str(work / "builder" / "bin" / "python"), "-m", "build", "--wheel", "--no-isolation",
         "--outdir", str(tmp_path / "dist"), str(tmp_path / "lab")])
    [lab_wheel] = (tmp_path / "dist").glob("netfence_lab-*.whl")
    with_lab = tmp_path / "with-lab"
    run([sys.executable, "-m", "venv", str(with_lab)])
    [runtime_site] = (installed_venv / "lib").glob("python3*/site-packages")
    [lab_site] = (with_lab / "lib").glob("python3*/site-packages")
    (lab_site / "runtime.pth").write_text(f"{runtime_site}\n")
    run([str(with_lab / "bin" / "pip"), "install", "--no-deps", "--no-index", str(lab_wheel)])
    result = run([str(with_lab / "bin" / "python"), "-c", "import sys; from netfence.cli import main; "
                  "sys.exit(main(['--help']))"], env={"PATH": "/usr/bin:/bin"})
    for command in ("status", "explain", "demo", "conformance", "cluster", "node"):
        assert f"    {command} " in result.stdout, result.stdout
    result = run([str(with_lab / "bin" / "python"), "-c", "import sys; from netfence.cli import main; "
                  "sys.exit(main(['conformance', 'run', '--help']))"], env={"PATH": "/usr/bin:/bin"})
    assert "usage: netfence conformance run" in result.stdout
