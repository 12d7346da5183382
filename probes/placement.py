"""Where each rank of a distributed run records: ``path/rank{R}``, or a ``{rank}`` field filled in.

A rank never records inside a single-process run's store (readers would not see it there).
"""

from __future__ import annotations

import os
import string

import torch

from statscope.errors import StatscopeError, StoreError

__all__ = ["rank_path", "refuse_single_run"]


def rank_path(path: str) -> tuple[str, int, int]:
    """Where this process's rank records a run given ``path``, with its rank and world size.

    Outside ``torch.distributed`` (or with one process) that is ``path`` itself; with several,
    ``path`` with its ``{rank}`` field filled in where it holds one (a format spec such as
    ``{rank:02d}`` included), else ``path/rank{R}``. Other braces are kept as they are unless
    the path also holds a ``{rank}`` field.

    Returns:
        ``(path, rank, world_size)``.

    Raises:
        StatscopeError: a path with a ``{rank}`` field and another one.
    """
    dist = torch.distributed
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    fields = _fields(path)
    if "rank" in fields:
        if fields != {"rank"}:
            raise StatscopeError(
                f"path={path!r}: only the field {{rank}} is filled in (e.g. "
                "'runs/exp-rank{rank}'); double other braces ({{ and }}) to keep them")
        return path.format(rank=rank), rank, world
    if world > 1:
        return os.path.join(path, f"rank{rank}"), rank, world
    return path, rank, world


def _fields(path: str) -> set[str]:
    """The names of ``path``'s ``str.format`` fields (none where it does not parse as one)."""
    try:
        return {name.split(".")[0].split("[")[0]
                for _, name, _, _ in string.Formatter().parse(path) if name is not None}
    except ValueError:  # an unmatched brace: a literal path
        return set()


def refuse_single_run(path: str, world: int) -> None:
    """Refuse to record a rank of a distributed run at ``path`` inside a single-process run
    (``run/rank{R}``, or a ``{rank}`` field below one): it would go into that store and stay
    unseen, as readers find the run above it; also with ``overwrite``, as a rank that replaced
    that run would delete the folders of the ranks recording beside it."""
    from statscope.discovery import is_single_run

    parent = os.path.dirname(path.rstrip("/"))
    if parent and is_single_run(parent):
        raise StoreError(
            f"path={parent!r}: holds a single-process run; this distributed run's {world} ranks "
            f"would record inside it ({path!r}), where readers do not see them, and no one rank "
            "can replace it while the others record: remove it, or choose another path")
