"""The ``statscope`` command line: ``main(argv) -> int``.

Each subcommand lives in a module of :mod:`statscope.commands` that exposes
``register(subparsers)``; handlers import what they need when they run, so ``statscope --help``
stays fast.

Exit codes: 0 success; 2 bad input (argparse's usage errors and a :class:`StatscopeError` whose
``exit_code`` is 2); 1 a failure at run time (a ``StatscopeError`` with ``exit_code`` 1, such as
a damaged store, a run held by another writer or a failed recording, and any ``OSError`` from the
machine: a full disk, a permission); 130 interrupted; 141 the reader of stdout went away (``statscope
info RUN | head``), quietly, as a program killed by ``SIGPIPE`` would. Every error is one line
``statscope: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

from statscope import __version__
from statscope.commands import show_warning
from statscope.errors import StatscopeError

__all__ = ["main", "build_parser", "entry"]

COMMANDS = (
    "statscope.commands.run",
    "statscope.commands.runs",
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
    try:
        return _run(argv)
    except BrokenPipeError:  # ``statscope info RUN | head``, ``statscope --help | head -1``
        _drop_stdout()
        return 141


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # the filters as they are (-W error stays an error)
            warnings.showwarning = show_warning  # one line each, as the commands' own
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:  # Ctrl-C: what was recorded is closed already (the run failed)
        print("statscope: interrupted", file=sys.stderr)
        return 130
    except StatscopeError as exc:
        return _error(str(exc), exc.exit_code)
    except OSError as exc:  # the machine, not the input: a full disk, a permission, a lost file
        return _error(describe_os_error(exc), 1)
    except Exception as exc:
        import concurrent.futures

        from statscope.errors import StoreError
        from statscope.storage import client_error, first_line

        if (type(exc).__module__.split(".")[0] == "distributed"
                or isinstance(exc, concurrent.futures.CancelledError)):
            # the dask cluster went away mid-command (its scheduler lost, a task cancelled)
            return _error(f"the dask cluster failed ({first_line(exc)})", 1)
        if not client_error(exc):  # statscope's own bug: the traceback is the report
            raise
        # an object store's client (no credentials, an endpoint nobody answers at)
        return _error(f"the object store cannot be used ({first_line(exc)}); check the "
                      f"credentials and endpoint in the environment", StoreError.exit_code)


def describe_os_error(exc: OSError) -> str:
    """``exc`` as ``'<file>': <reason>`` (both files for a rename), without a traceback.

    Example:
        >>> describe_os_error(OSError(28, "No space left on device", "/data/run.tmp"))
        "'/data/run.tmp': No space left on device"
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    files = [repr(os.fsdecode(f)) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(files)}: {reason}" if files else reason


def _error(message: str, code: int) -> int:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    _print_err("statscope: error: " + ("; ".join(lines) or "unknown error"))
    return code


def _print_err(line: str) -> None:
    try:
        print(line, file=sys.stderr)
    except (BrokenPipeError, ValueError):  # stderr closed too: the exit code still says it
        pass


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush finds no closed pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a non-file (tests, notebooks)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def entry() -> None:
    """Console-script entry point."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        code = exc.code
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # ``statscope --help | head -1``: the help was still buffered
        _drop_stdout()
        code = 141
    sys.exit(code)


if __name__ == "__main__":
    entry()
