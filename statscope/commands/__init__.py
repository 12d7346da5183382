"""CLI subcommands; each module exposes ``register(subparsers)``."""

import sys


def warning_line(message) -> str:
    """A warning as one ``statscope: warning: ...`` line: its first (a worker's traceback stays
    out of the terminal)."""
    first = next((line for line in str(message).splitlines() if line.strip()), "")
    return f"statscope: warning: {first.removeprefix('statscope: ')}"


def show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the command line: :func:`warning_line` on stderr."""
    print(warning_line(message), file=sys.stderr)
