"""The ``netfence`` command: ``main()`` parses and dispatches to small command functions.

Adding a command group: write a module with ``register(sub: Subcommands) ->
None`` that calls :func:`add_command` for each command. The runtime's own
groups are listed in ``COMMAND_MODULES``; other distributions add theirs as an
entry point of the group ``netfence.commands`` (the test bed, ``lab/``, adds
``cluster``, ``node``, ``conformance`` and ``demo`` that way), so the runtime
images, which install only this distribution, carry none of them. A module may
set ``KNOWN_ERRORS``: exception types it raises that ``main()`` reports as one
line like :class:`CliError`. A command function takes
the parsed ``argparse.Namespace`` and returns the exit code; it reports
failures by raising :class:`CliError` (or one of ``KNOWN_ERRORS``), which
``main()`` turns into ONE stderr line ``netfence: <what is wrong>; <what to do>``
and exit code 1. Commands that need root pass ``needs_root=True``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, NoReturn

COMMAND_MODULES = (
    "netfence.cli_status",
    "netfence.cli_explain",
)
COMMAND_GROUP = "netfence.commands"  # entry points of other distributions: name = "module"

CommandFunc = Callable[[argparse.Namespace], int]
Subcommands = Any  # argparse._SubParsersAction[ArgumentParser]; private in typeshed

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report as one line: '<what is wrong>; <what to do>'."""

    exit_code = EXIT_FAILURE


class UsageError(CliError):
    exit_code = EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, so main() prints them)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")


def out(text: str = "") -> None:
    """Write one line of command output to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def one_line(message: str) -> str:
    """Collapse a message to one line without a doubled 'netfence:' prefix."""
    text = " ".join(message.split())
    while text.startswith("netfence: "):
        text = text[len("netfence: "):]
    return text.replace(": netfence: ", ": ")


def error_line(message: str) -> str:
    return f"netfence: {one_line(message)}\n"


def add_command(
    sub: Subcommands, name: str, func: CommandFunc, help: str, *, needs_root: bool = False
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(func=func, needs_root=needs_root, command_name=parser.prog)
    return parser


def check_root(command: str, geteuid: Callable[[], int] = os.geteuid) -> None:
    if geteuid() != 0:
        raise CliError(
            f"'{command}' needs root (it creates network namespaces, veth links and iptables rules); "
            f"run it as root, e.g. 'sudo {command}'"
        )


def build_parser(prog: str = "netfence") -> argparse.ArgumentParser:
    parser = Parser(prog=prog,
                    description="Kubernetes NetworkPolicy enforcement with per-policy status.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        module.register(sub)
    return parser


def command_modules() -> list[ModuleType]:
    """The runtime's command modules, then those other installed distributions add (by entry point name)."""
    modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            modules.append(entry.load())
        except ImportError as exc:  # a half-installed extra must not break the runtime's own commands
            logging.getLogger(__name__).warning("netfence command group %r could not be loaded: %s",
                                                entry.name, exc)
    return modules


def _known_errors() -> tuple[type[BaseException], ...]:
    known: list[type[BaseException]] = [CliError]
    for module in command_modules():
        known.extend(getattr(module, "KNOWN_ERRORS", ()))
    return tuple(known)


def main(
    argv: Sequence[str] | None = None,
    *,
    geteuid: Callable[[], int] = os.geteuid,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    known = _known_errors()
    try:
        parser = parser or build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING - 10 * min(getattr(args, "verbose", 0), 2),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        if getattr(args, "needs_root", False):
            check_root(args.command_name, geteuid)
        func: CommandFunc = args.func
        return func(args)
    except KeyboardInterrupt:
        sys.stderr.write(error_line("interrupted; whatever this command had started was stopped"))
        return EXIT_INTERRUPTED
    except known as exc:
        sys.stderr.write(error_line(str(exc)))
        return getattr(exc, "exit_code", EXIT_FAILURE)


def kubectl_main() -> int:
    """The kubectl plugin ``kubectl-netfence``: ``kubectl netfence explain ...`` runs ``netfence explain ...``."""
    return main(sys.argv[1:], parser=build_parser("kubectl netfence"))


if __name__ == "__main__":
    # run the imported module's main so exception classes are the ones command modules raise
    from netfence.cli import main as _main

    sys.exit(_main())
