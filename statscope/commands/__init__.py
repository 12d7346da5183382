"""CLI subcommands; each module exposes ``register(subparsers)``."""

import sys
from contextlib import contextmanager


def warning_line(message) -> str:
    """A warning as one ``statscope: warning: ...`` line: its first (a worker's traceback stays
    out of the terminal)."""
    first = next((line for line in str(message).splitlines() if line.strip()), "")
    return f"statscope: warning: {first.removeprefix('statscope: ')}"


def show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the command line: :func:`warning_line` on stderr."""
    print(warning_line(message), file=sys.stderr)


_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
"""fsspec protocols whose first path component is a bucket (or container)."""


def check_path_argument(value: str, name: str) -> None:
    """Refuse an empty path argument (an unset shell variable, ``statscope runs "$DIR"``), which
    the commands would otherwise take for the current folder.

    Raises:
        StatscopeError: naming the argument.
    """
    from statscope.errors import StatscopeError

    if not str(value).strip():
        raise StatscopeError(f"{name}={value!r}: expected a run, a folder of runs or a URL, "
                             "not an empty string")


def missing_url(path: str, name: str):
    """Why nothing was found at the URL ``path``, given as the argument ``name``: the object
    store cannot be reached or used, its bucket does not exist, or nothing is at the path.

    Asked once a command found no run at ``path``, so that "not a statscope run" is said only of
    something that is there.

    Returns:
        A :class:`~statscope.errors.StoreError` to raise, or None when ``path`` is no URL or
        something is at it (the caller's own message stands).
    """
    from statscope.errors import StoreError
    from statscope.storage import client_error, filesystem, first_line, is_url

    if not is_url(path):
        return None
    try:
        fs, where = filesystem(path)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        bucket = where.strip("/").split("/")[0]
        if bucket and protocols & _BUCKETED:
            try:
                fs.info(bucket)  # answers for the bucket itself, reachable or not
            except FileNotFoundError:
                return StoreError(f"{name}={path!r}: the bucket {bucket!r} does not exist (or "
                                  "these credentials cannot see it at this endpoint)")
        fs.invalidate_cache(where)
        if fs.exists(where):
            return None
    except Exception as exc:  # noqa: BLE001 - an object store's client raises its own types
        if not client_error(exc):
            raise
        return StoreError(f"{name}={path!r}: the object store cannot be used ({first_line(exc)}); "
                          "check the credentials and endpoint in the environment")
    return StoreError(f"{name}={path!r}: no such run or folder")


@contextmanager
def explaining_missing_url(path: str, name: str):
    """Inside, a :class:`~statscope.errors.StoreError` about the URL ``path`` (not a run, no
    such folder) becomes :func:`missing_url`'s where that says more: a bucket that does not
    exist, an object store that cannot be reached."""
    from statscope.errors import StoreError
    from statscope.storage import is_unusable

    try:
        yield
    except StoreError as exc:
        better = None if is_unusable(exc) else missing_url(path, name)
        if better is not None:
            raise better from None
        raise
