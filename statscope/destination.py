"""Where a run is written: the checks made before a run store is created, replaced or resumed
(by :func:`statscope.record` at once, by :class:`statscope.writer.RunWriter` again under the
run's lease), and the names a logged scalar may take."""

from __future__ import annotations

import os

import numpy as np

from statscope import schema as S
from statscope.errors import RunCompletedError, StatscopeError, StoreError
from statscope.storage import exists, is_url
from statscope.store import read_attrs

__all__ = ["check_path", "check_scalar_name", "resume_step", "committed_steps",
           "refuse_completed", "folder_identity"]


def folder_identity(path: str) -> tuple | None:
    """A local folder's device and inode (None for a URL; ``()`` when it is gone)."""
    if "://" in path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_dev, st.st_ino)


def committed_steps(path: str) -> int:
    """The rows the run at ``path`` has committed (0 before its first commit)."""
    return int(read_attrs(path).get(S.ATTR_N_STEPS) or 0)


def resume_step(resume) -> int | None:
    """The step that ``resume`` names (None for ``True`` and ``False``: after the last committed
    one, or a new run).

    Raises:
        StatscopeError: neither a bool nor an int ≥ 0.
    """
    if isinstance(resume, (bool, np.bool_)):
        return None
    if isinstance(resume, (int, np.integer)) and resume >= 0:
        return int(resume)
    raise StatscopeError(f"resume={resume!r}: expected True, False or the step to continue at "
                         "(an int >= 0)")


def refuse_completed(path: str) -> None:
    """Raise :class:`RunCompletedError` if the run at ``path`` is completed
    (``resume_completed=False``)."""
    attrs = read_attrs(path)
    if attrs.get(S.ATTR_STATUS) == S.STATUS_COMPLETED:
        raise RunCompletedError(f"path={path!r}: the run is completed ({attrs.get(S.ATTR_N_STEPS)} "
                         f"steps, ended {attrs.get(S.ATTR_ENDED)}); resume_completed=False leaves "
                         "it as it is")


def check_path(path: str, *, overwrite: bool, resume: bool) -> bool:
    """Check that a run may be written at ``path``; return whether something is there already.

    Raises:
        StatscopeError: both ``overwrite`` and ``resume``.
        StoreError: ``path`` holds something and neither is set, or holds something that is not a
            statscope run (which neither replaces nor continues), or lies inside a run.
    """
    if overwrite and resume:
        raise StatscopeError("overwrite=True, resume=True: choose one")
    from statscope.lease import lease_path

    lease_path(path)  # refuses a path no run can have (a bucket's root)
    there = exists(path)
    if there and not (overwrite or resume):
        raise StoreError(f"path={path!r}: already exists; pass overwrite=True to replace it or "
                         "resume=True to continue it")
    if there:
        read_attrs(path)  # raises unless it is a run: never replace a user's folder
    elif not is_url(path):
        _check_creatable(path)
        from statscope.discovery import enclosing_run

        parent = enclosing_run(path)
        if parent is not None:
            raise StoreError(f"path={path!r}: inside the run {parent!r}; record elsewhere (the "
                             "new run would sit among that run's files, unseen by readers, and "
                             "go when that run is overwritten)")
    return there


def _check_creatable(path: str) -> None:
    """Refuse early, with a clear message, a local path where no folder can be made."""
    from statscope.storage import local_path

    p = local_path(path).absolute()
    parent = p
    while not parent.exists():
        parent = parent.parent
    if p.exists() and not p.is_dir():
        raise StoreError(f"path={path!r}: is a file, not a run folder")
    if not parent.is_dir():
        raise StoreError(f"path={path!r}: {str(parent)!r} is a file, so no folder can be made "
                         "below it")
    if not os.access(parent, os.W_OK | os.X_OK) or str(parent).startswith("/proc"):
        raise StoreError(f"path={path!r}: {str(parent)!r} is not writable")


def check_scalar_name(name: str, taken=()) -> None:
    """Raise StatscopeError unless ``name`` can be a logged scalar: an identifier that is neither
    a schema name nor one of ``taken`` (the run's statistics)."""
    if name in S.RESERVED_NAMES or name in taken or not name.isidentifier():
        raise StatscopeError(f"log({name}=...): {name!r} is reserved or not an identifier; "
                             f"reserved: {sorted(S.RESERVED_NAMES | set(taken))}")
