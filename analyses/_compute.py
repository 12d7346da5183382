"""Where the per-run work of an analysis runs: here, one run after another, or as a dask graph
on a scheduler (a ``distributed.Client``), one task per run (private)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Call = tuple[Callable[..., Any], tuple]


def run_tasks(calls: Sequence[Call], scheduler=None) -> list:
    """Results of ``fn(*args)`` for each call, in order.

    Args:
        calls: (function, arguments) pairs, independent of each other.
        scheduler: None: call them here in order. Else a dask scheduler (a
            ``distributed.Client``, or a name such as ``"threads"``): one task per call, in one
            graph. Lazy (dask-backed) Datasets among the arguments are read by the task's own
            worker — only what one call reads is in a worker's memory at once per thread — and
            only the (small) results come back.
    """
    if scheduler is None:
        return [fn(*args) for fn, args in calls]
    import dask

    tasks = [dask.delayed(fn, pure=False)(*args) for fn, args in calls]
    return list(dask.compute(*tasks, scheduler=scheduler))
