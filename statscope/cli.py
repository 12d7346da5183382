"""The ``statscope`` command line: ``main(argv) -> int``.

Each subcommand lives in a module of :mod:`statscope.commands` that exposes
``register(subparsers)``; handlers import what they need when they run, so ``statscope --help``
stays fast. A :class:`StatscopeError` becomes one ``statscope: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from statscope import __version__
from statscope.errors import StatscopeError

__all__ = ["main", "build_parser", "entry"]

COMMANDS = (
    "statscope.commands.run",
    "statscope.commands.analyze",
    "statscope.commands.dashboard",
    "statscope.commands.export",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="statscope",
        description="Record, analyse and view how normalization statistics fluctuate in training.")
    parser.add_argument("--version", action="version", version=f"statscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except StatscopeError as exc:
        print(f"statscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("statscope: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
