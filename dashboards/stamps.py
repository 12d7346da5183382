"""How the catalog tells that a run changed: the stamp of its documents, the state its attributes
record, and whether a writer is still behind a run that says it is running.

A finished run is not read again on every poll: the stamp of its root documents (``zarr.json``,
or each rank's) is compared instead, which costs a ``stat`` per document. A run re-run into its
own folder (``overwrite=True``, ``statscope run --overwrite``) rewrites them, so its stamp
changes; its attributes then tell a new run (another ``started`` time and lease holder) from
the same run grown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from statscope import schema as S

__all__ = ["stamp", "run_state", "writer_of", "RANKS"]

RANKS = "ranks"
"""The key under which ``statscope.store.read_attrs`` gives each rank's attributes of a
distributed run."""

_STATE = (S.ATTR_N_STEPS, S.ATTR_STATUS, S.ATTR_LAST_STEP, S.ATTR_STARTED, S.ATTR_LEASE,
          S.ATTR_WRITER_ID)
"""What tells one recorded state of a run from another: its commit (steps, status) and which
run it is (when it started, who wrote it)."""


def stamp(path: str) -> tuple | None:
    """Inode, modification time and size of a local run's root documents: its ``zarr.json``,
    or each rank's of a distributed run.

    Returns:
        A tuple that changes whenever one of them is rewritten; ``None`` when they cannot be
        read (the run is being replaced, or gone): the caller then reads the attributes.

    Example:
        >>> stamp("/no/such/run") is None
        True
    """
    doc = os.path.join(path, "zarr.json")
    try:
        docs = [doc] if os.path.exists(doc) else sorted(
            os.path.join(e.path, "zarr.json") for e in os.scandir(path)
            if e.name.startswith("rank") and e.is_dir())
        out = []
        for d in docs:
            st = os.stat(d)
            out.append((d, st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return tuple(out) or None


def run_state(attrs: Mapping[str, Any]) -> tuple:
    """The recorded state of a run, from its root attributes (of a distributed run: each
    rank's too): equal for two reads of the same run at the same commit, different for a run
    that grew, finished, or was replaced by another run in its folder.

    Example:
        >>> a = {"n_steps": 5, "status": "completed", "started": "2025-01-01T00:00:00+00:00"}
        >>> run_state(a) == run_state(dict(a)), run_state(a) == run_state({**a, "started": "x"})
        (True, False)
    """
    ranks = attrs.get(RANKS)
    per = (tuple(sorted((str(r), run_state(a)) for r, a in ranks.items()
                        if isinstance(a, Mapping)))
           if isinstance(ranks, Mapping) else ())
    return tuple(str(attrs.get(k)) for k in _STATE) + per


def writer_of(path: str, attrs: Mapping[str, Any]) -> str | None:
    """Whether a writer is behind a run whose status says ``running``
    (:func:`statscope.lease.writer_state`): ``"live"``, ``"dead"`` or ``"unknown"``; ``None``
    for a run that is not running. Of a distributed run: ``"live"`` when any running rank's
    writer lives, ``"dead"`` when every running rank's is gone."""
    if attrs.get(S.ATTR_STATUS) != S.STATUS_RUNNING:
        return None
    from statscope.lease import writer_state

    ranks = attrs.get(RANKS)
    if not isinstance(ranks, Mapping):
        return writer_state(path)
    states = {writer_state(f"{path.rstrip('/')}/rank{r}") for r, a in ranks.items()
              if isinstance(a, Mapping) and a.get(S.ATTR_STATUS) == S.STATUS_RUNNING}
    if "live" in states:
        return "live"
    return "dead" if states == {"dead"} else "unknown"
