"""Linux network namespace primitives for the test bed.

Everything here acts inside *named* network namespaces (``/var/run/netns/<name>``):
``ip -n`` for links, addresses and routes, and :class:`NetnsSwitcher` to run
Python code (sysctl writes, socket creation) inside a namespace without
spawning a process. Network namespace membership is per thread, so the switcher
owns one dedicated thread that enters a namespace for each call and always
returns to its home namespace afterwards; no other thread ever changes
namespace, and no open handle keeps a deleted namespace alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ_MAX = 15  # longest interface name the kernel accepts

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the command and its output."""


def run(argv: list[str], stdin: str | None = None, timeout: float = 30.0) -> str:
    """Run a command, return its stdout; raise :class:`NetnsError` with stderr on failure."""
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()
        raise NetnsError(f"{' '.join(argv)} exited {res.returncode}: {detail}")
    return res.stdout


def ip_batch(netns: str | None, commands: Iterable[str]) -> None:
    """Run several ``ip`` commands in one process (``ip -n NS -batch -``), stopping at the first error."""
    lines = [c for c in commands if c]
    if not lines:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    run(argv, stdin="\n".join(lines) + "\n")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (empty when it does not exist)."""
    if not netns_exists(name):
        return []
    try:
        out = run(["ip", "netns", "pids", name])
    except NetnsError:
        return []
    return [int(p) for p in out.split()]


def delete_netns(name: str) -> None:
    """Delete a named namespace; a missing one is not an error."""
    if not netns_exists(name):
        return
    try:
        run(["ip", "netns", "del", name])
    except NetnsError:
        if netns_exists(name):
            raise


def check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ_MAX:
        raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ_MAX} characters")
    return name


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsSwitcher:
    """Runs callables inside named network namespaces on one dedicated thread.

    Each call opens ``/var/run/netns/<name>``, enters it, runs the callable and
    returns to the thread's home namespace. Sockets created inside stay in the
    namespace they were created in and may then be used from any thread, so
    only the (fast) creation has to happen here. Thread-safe.
    """

    def __init__(self, name: str = "netns-switcher") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], Any], Future[Any]] | None] | None = None
        self._thread: threading.Thread | None = None
        self._broken = False

    def call(self, netns: str, fn: Callable[..., T], *args: Any) -> T:
        fut: Future[T] = Future()
        with self._lock:
            if self._queue is None or self._broken:
                self._start()
            assert self._queue is not None
            self._queue.put((netns, lambda: fn(*args), fut))
        return fut.result()

    def close(self) -> None:
        with self._lock:
            if self._queue is not None:
                self._queue.put(None)
            self._queue = None
            self._thread = None

    def _start(self) -> None:
        q: queue.SimpleQueue[tuple[str, Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._queue = q
        self._broken = False
        self._thread = threading.Thread(target=self._loop, args=(q,), name=self._name, daemon=True)
        self._thread.start()

    def _loop(self, q: queue.SimpleQueue[tuple[str, Callable[[], Any], Future[Any]] | None]) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while (job := q.get()) is not None:
                netns, fn, fut = job
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError as exc:
                    fut.set_exception(NetnsError(f"network namespace {netns!r} does not exist ({exc})"))
                    continue
                try:
                    _setns(target)
                except OSError as exc:
                    fut.set_exception(NetnsError(f"cannot enter network namespace {netns!r}: {exc}"))
                    continue
                finally:
                    os.close(target)
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
                finally:
                    try:
                        _setns(home)
                    except OSError:
                        # Never run anything else on a thread stuck in a foreign namespace.
                        log.exception("cannot return to the home network namespace; retiring %s", self._name)
                        self._broken = True
                        return
        finally:
            os.close(home)


_default_switcher: NetnsSwitcher | None = None
_default_lock = threading.Lock()


def default_switcher() -> NetnsSwitcher:
    """The process-wide switcher (created on first use)."""
    global _default_switcher
    with _default_lock:
        if _default_switcher is None:
            _default_switcher = NetnsSwitcher()
        return _default_switcher


def in_netns(netns: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` inside ``netns`` on the process-wide switcher thread."""
    return default_switcher().call(netns, fn, *args)


def _write_sysctls(values: Mapping[str, str | int]) -> None:
    for key, value in values.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NetnsError(f"no sysctl {key}") from exc
            raise


def set_sysctls(netns: str, values: Mapping[str, str | int]) -> None:
    """Write sysctls (dotted keys, e.g. ``net.ipv4.ip_forward``) inside ``netns`` without a subprocess.

    Interface names containing dots are not supported (ours never contain one).
    """
    in_netns(netns, _write_sysctls, values)


def read_sysctl(netns: str, key: str) -> str:
    path = Path("/proc/sys") / key.replace(".", "/")
    return in_netns(netns, lambda: path.read_text().strip())


def kill_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
