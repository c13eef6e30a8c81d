"""The ``sagellm-backend`` command (also ``python -m sagellm_backend``).

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in
:data:`COMMANDS` and imported only when it runs, so ``sagellm-backend --version`` and
``--help`` import no backend. Exit codes: :data:`EXIT_OK`, :data:`EXIT_BACKEND_FAILURE` and
:data:`EXIT_USER_ERROR` (a bad spec or an unknown kind: a message, never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from sagellm_backend._version import __version__
from sagellm_backend.cli.output import stdout_for_json
from sagellm_backend.errors import BackendError, BackendNotFoundError, InvalidArgumentError

__all__ = [
    "COMMANDS",
    "EXIT_BACKEND_FAILURE",
    "EXIT_OK",
    "EXIT_USER_ERROR",
    "CommandInfo",
    "exit_code_for",
    "main",
]

EXIT_OK = 0
EXIT_BACKEND_FAILURE = 1
"""A backend is broken, unavailable, or failed a check."""
EXIT_USER_ERROR = 2
"""A malformed spec, an unknown kind or option, or a command that is not installed."""

PROG = "sagellm-backend"


class Command(Protocol):
    """What a subcommand module provides."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


@dataclass(frozen=True)
class CommandInfo:
    """A row of the command table: the module that implements it and its one-line help."""

    module: str
    help: str


COMMANDS: Mapping[str, CommandInfo] = {
    "list": CommandInfo(
        "sagellm_backend.cli.listing", "list every backend found and whether it can run here"
    ),
    "info": CommandInfo("sagellm_backend.cli.info", "show the capability matrix of a backend"),
    "doctor": CommandInfo(
        "sagellm_backend.cli.doctor", "report the environment and every plugin's load record"
    ),
    "demo": CommandInfo(
        "sagellm_backend.cli.demo", "run a short self-checking workload on a backend"
    ),
    "check": CommandInfo("sagellm_backend.cli.check", "run the conformance kit against a backend"),
    "bench": CommandInfo("sagellm_backend.cli.bench", "run the benchmarks on a backend"),
}


def exit_code_for(error: BackendError) -> int:
    """EXIT_USER_ERROR for what the caller can fix by changing the input, else the failure code."""
    if isinstance(error, (InvalidArgumentError, BackendNotFoundError)):
        return EXIT_USER_ERROR
    return EXIT_BACKEND_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, diagnose and try sageLLM backends."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log how backends are found and chosen"
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of a backend error"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _command_name(arguments)
    command: Command | None = None
    for name, info in COMMANDS.items():
        sub = subparsers.add_parser(name, help=info.help, description=info.help)
        if name == chosen:
            loaded = _load(name, info)
            if loaded is None:
                return EXIT_USER_ERROR
            command = loaded
            command.add_arguments(sub)
    args = parser.parse_args(arguments)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if getattr(args, "json", False):
            with stdout_for_json():
                return command.run(args)
        return command.run(args)
    except BackendError as exc:
        if args.traceback:
            raise
        _report(args.command, exc)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``sagellm-backend list | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _command_name(arguments: Sequence[str]) -> str | None:
    for argument in arguments:
        if not argument.startswith("-"):
            return argument
    return None


def _load(name: str, info: CommandInfo) -> Command | None:
    try:
        module = importlib.import_module(info.module)
    except ModuleNotFoundError as exc:
        if exc.name != info.module:
            raise
        print(
            f"{PROG}: the {name!r} command is not available in this installation "
            f"(its module {info.module} is not installed)",
            file=sys.stderr,
        )
        return None
    return cast(Command, module)


def _report(command: str, error: BaseException) -> None:
    if isinstance(error, BackendError):
        print(f"{PROG} {command}: error [{error.code}]: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"  fix: {error.hint}", file=sys.stderr)
        cause = error.__cause__
        if cause is not None:
            print(f"  caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
        print(f"  (run `{PROG} --traceback {command} ...` for the traceback)", file=sys.stderr)
