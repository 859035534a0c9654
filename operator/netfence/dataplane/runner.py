"""Running the dataplane tools: an injectable command runner (I/O edge)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], input: str | None = None) -> Result: ...


NETNS_DIR = "/run/netns"


class SubprocessRunner:
    """Runs commands on this host, or inside network namespace ``netns`` (a name under /run/netns).

    In a namespace, ``nsenter --net`` (only setns, one exec: about 3 ms less per call than
    ``ip netns exec``, which also sets up a mount namespace) when it is installed.
    """

    def __init__(self, netns: str | None = None, *, timeout: float = 120.0) -> None:
        self.netns = netns
        self.timeout = timeout
        self._prefix: list[str] = []
        if netns:
            nsenter = shutil.which("nsenter")
            self._prefix = ([nsenter, f"--net={NETNS_DIR}/{netns}", "--"] if nsenter
                            else ["ip", "netns", "exec", netns])

    def argv(self, argv: Sequence[str]) -> list[str]:
        return self._prefix + list(argv)

    def run(self, argv: Sequence[str], input: str | None = None) -> Result:
        full = self.argv(argv)
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Result(127, "", f"{full[0]}: {exc}")
        return Result(proc.returncode, proc.stdout, proc.stderr)


@dataclass(frozen=True, slots=True)
class Call:
    argv: tuple[str, ...]
    input: str | None
    result: Result


@dataclass
class RecordingRunner:
    """Wraps a runner and records every call; ``fail`` may inject failures.

    ``fail(argv, input)`` returning a Result short-circuits the real command.
    """

    inner: CommandRunner
    fail: Callable[[Sequence[str], str | None], Result | None] | None = None
    calls: list[Call] = field(default_factory=list)

    def run(self, argv: Sequence[str], input: str | None = None) -> Result:
        injected = self.fail(argv, input) if self.fail else None
        result = injected if injected is not None else self.inner.run(argv, input)
        self.calls.append(Call(tuple(argv), input, result))
        return result

    def commands(self) -> list[tuple[str, ...]]:
        return [c.argv for c in self.calls]

    def clear(self) -> None:
        self.calls.clear()
