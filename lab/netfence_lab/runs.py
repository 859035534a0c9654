"""Test-bed run ids, who owns them, and clean-up of runs whose owner died.

Every :class:`~netfence_lab.fabric.Fabric` has a short run prefix (``nf`` +
4 hex digits by default). All its network namespaces are named
``<prefix>-fab``, ``<prefix>-n<i>``, ``<prefix>-p<n>``; its pod servers carry
``--run <prefix>`` on their command line; and while it is open an owner record
``/run/netfence-testbed/<prefix>.json`` names the owning process. A run is
stale when its owner process is gone (or, for a run without an owner record,
when its namespaces are older than this process). Runs of live processes,
such as a colleague's test session on the same machine, are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from netfence_lab.netns import delete_netns, kill_pids, list_netns, netns_path, netns_pids

log = logging.getLogger(__name__)

OWNER_DIR = Path("/run/netfence-testbed")
DEFAULT_PREFIX_PATTERN = r"nf[0-9a-f]{4}"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")
PODSERVER_MODULE = "netfence_lab.podserver"
_NETNS_SUFFIX = r"-(?:fab|n\d+|p\d+)"


def new_prefix() -> str:
    """A fresh run prefix not used by any namespace or owner record on this machine."""
    while True:
        prefix = "nf" + secrets.token_hex(2)
        if not run_netns(prefix) and not owner_path(prefix).exists():
            return prefix


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"run prefix {prefix!r} must match {PREFIX_RE.pattern} (interface names are short)")
    return prefix


def run_netns(prefix: str) -> list[str]:
    """Existing namespaces of one run."""
    pattern = re.compile(re.escape(prefix) + _NETNS_SUFFIX + "$")
    return [n for n in list_netns() if pattern.match(n)]


def podserver_pids(prefix: str | None = None) -> dict[int, str]:
    """Pod server processes (of one run, or of any run): pid -> run prefix."""
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if PODSERVER_MODULE.encode() not in argv:
            continue
        run = ""
        with contextlib.suppress(ValueError, IndexError):
            run = argv[argv.index(b"--run") + 1].decode()
        if prefix is None or run == prefix:
            found[int(entry.name)] = run
    return found


# -- owner records -----------------------------------------------------------


def _proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_path(prefix: str) -> Path:
    return OWNER_DIR / f"{prefix}.json"


def write_owner(prefix: str, scratch: Path | None = None) -> None:
    """Record this process as the run's owner; ``scratch`` is a folder to delete with the run."""
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    record = {"pid": pid, "start": _proc_start_ticks(pid), "scratch": str(scratch) if scratch else None}
    owner_path(prefix).write_text(json.dumps(record))


def remove_owner(prefix: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        owner_path(prefix).unlink()


@dataclass(frozen=True)
class Owner:
    pid: int
    start: int | None
    scratch: str | None = None

    def alive(self) -> bool:
        start = _proc_start_ticks(self.pid)
        return start is not None and (self.start is None or start == self.start)


def read_owner(prefix: str) -> Owner | None:
    try:
        data = json.loads(owner_path(prefix).read_text())
        return Owner(pid=int(data["pid"]), start=data.get("start"), scratch=data.get("scratch"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owned_runs(pid: int | None = None) -> list[str]:
    """Prefixes whose owner record names ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    try:
        names = [p.stem for p in OWNER_DIR.glob("*.json")]
    except OSError:
        return []
    return sorted(n for n in names if (o := read_owner(n)) is not None and o.pid == pid)


# -- removal -----------------------------------------------------------------


def _process_start_epoch() -> float:
    ticks = _proc_start_ticks(os.getpid()) or 0
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def remove_run(prefix: str) -> None:
    """Stop a run's processes; delete its namespaces (pods, nodes, fabric), scratch folder, owner record."""
    names = run_netns(prefix)
    owner = read_owner(prefix)
    pids = set(podserver_pids(prefix))
    for name in names:
        pids.update(netns_pids(name))
    pids.discard(os.getpid())
    if pids:
        kill_pids(pids, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.02)
    # pods first, the fabric last, so no veth is left dangling in between
    for name in sorted(names, key=lambda n: (n.endswith("-fab"), "-n" in n[len(prefix):])):
        delete_netns(name)
    if owner is not None and owner.scratch:
        shutil.rmtree(owner.scratch, ignore_errors=True)
    remove_owner(prefix)


def cleanup_stale(prefix_pattern: str = DEFAULT_PREFIX_PATTERN) -> list[str]:
    """Remove runs left behind by processes that died (crashed test sessions).

    ``prefix_pattern`` is a regular expression matching whole run prefixes.
    A run counts as stale when its owner record names a process that is gone,
    or, without an owner record, when its namespaces are older than this
    process. Returns the prefixes removed.
    """
    prefix_re = re.compile(f"^({prefix_pattern}){_NETNS_SUFFIX}$")
    candidates: set[str] = set()
    for name in list_netns():
        if m := prefix_re.match(name):
            candidates.add(m.group(1))
    whole = re.compile(f"^(?:{prefix_pattern})$")
    candidates.update(run for run in podserver_pids().values() if whole.match(run))
    with contextlib.suppress(OSError):
        candidates.update(p.stem for p in OWNER_DIR.glob("*.json") if whole.match(p.stem))

    my_start = _process_start_epoch()
    removed = []
    for prefix in sorted(candidates):
        owner = read_owner(prefix)
        if owner is not None:
            stale = not owner.alive()
        else:
            stale = all(_mtime(netns_path(n)) < my_start for n in run_netns(prefix))
        if stale:
            log.warning("removing stale test-bed run %s", prefix)
            remove_run(prefix)
            removed.append(prefix)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
