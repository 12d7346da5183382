"""Sweeps: a grid of runs of one experiment into one folder, restartable.

Each run's folder is named from its settings (:func:`statscope.experiments.run_name`), so running
the same sweep again finds its earlier runs: completed ones are skipped, failed or interrupted
ones (status ``failed``, or ``running`` with no process behind it) are resumed after their last
recorded step, from their checkpoint, and ones that recorded nothing are started again. Runs go in parallel in fresh
``spawn`` processes (``jobs > 1``) or one after another in this process. Worker processes end
with the sweep's process (:mod:`statscope.experiments.worker`), so no orphan goes on writing a
run that a second sweep resumes; a run another process is writing (its lease is held) is
reported as held and left alone. With a ``dask.distributed`` client the runs go as tasks on its
cluster instead (:mod:`statscope.experiments.cluster`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError, StoreLockedError
from statscope.experiments.base import RunConfig, RunResult, run_name

__all__ = ["SweepItem", "SweepOutcome", "plan_sweep", "replan", "run_sweep"]

@dataclass(frozen=True)
class SweepItem:
    """One run of a sweep and what to do with it.

    Attributes:
        name: the run's folder name.
        config: the run, with ``out`` in the sweep folder and ``resume``/``overwrite`` set.
        action: ``"run"`` (new), ``"skip"`` (completed), ``"resume"`` (failed or interrupted
            after recording steps) or ``"overwrite"`` (failed before recording any).
        status: the existing store's status, None when there is none.
    """

    name: str
    config: RunConfig
    action: str
    status: str | None


@dataclass(frozen=True)
class SweepOutcome:
    """How one run of a sweep ended: ``result`` when it succeeded, else ``error``.

    Attributes:
        item: the planned run.
        result: the run's result, None when skipped or failed.
        error: one line saying why it failed, None otherwise.
        warnings: the distinct warning messages the run raised.
        held: True when it failed because another process holds the run (is writing it).
        attempts: how many times the run was started (more than 1 on a cluster when its worker
            or its process died and the run was resumed elsewhere).
    """

    item: SweepItem
    result: RunResult | None
    error: str | None
    warnings: tuple[str, ...] = ()
    held: bool = False
    attempts: int = 1


class Outcomes:
    """The outcomes of a sweep's items as they come, each reported to ``on_done`` at once.

    Args:
        items: the planned runs.
        on_done: called with each outcome as it comes.
    """

    def __init__(self, items: list[SweepItem],
                 on_done: Callable[[SweepOutcome], None] | None = None):
        self.items, self.on_done = items, on_done
        self._by_index: dict[int, SweepOutcome] = {}

    def done(self, i: int, outcome: SweepOutcome) -> None:
        """Record the outcome of item ``i`` and report it."""
        self._by_index[i] = outcome
        if self.on_done is not None:
            self.on_done(outcome)

    def skip_planned(self) -> list[int]:
        """Report every item planned as a skip; return the indices of the others, to run."""
        todo = []
        for i, item in enumerate(self.items):
            if item.action == "skip":
                self.done(i, SweepOutcome(item, None, None))
            else:
                todo.append(i)
        return todo

    def in_order(self) -> list[SweepOutcome]:
        """Every outcome, in the order of the items."""
        return [self._by_index[i] for i in range(len(self.items))]


def plan_sweep(base: RunConfig, out_dir: str | os.PathLike, *, batch_sizes: Iterable[int],
               seeds: Iterable[int], norms: Iterable[str] = ("bn",)) -> list[SweepItem]:
    """The grid batch size × seed × norm of ``base``'s experiment, with what to do for each.

    Args:
        base: the shared settings (its batch_size, seed, norm and out are replaced).
        out_dir: the sweep folder; each run is ``out_dir/<run_name>``.
        batch_sizes: batch sizes, in order.
        seeds: seeds, in order.
        norms: norm names, in order.

    Returns:
        One item per grid point, in grid order (duplicates dropped).

    Raises:
        StatscopeError: a bad setting; StoreError: a folder in the way that is not a run.

    Example:
        >>> items = plan_sweep(RunConfig("mnist-fc"), "/tmp/no-such-sweep", batch_sizes=[4, 128],
        ...                    seeds=[0])
        >>> [(i.name, i.action) for i in items]
        [('mnist-fc_bs4_seed0_bn', 'run'), ('mnist-fc_bs128_seed0_bn', 'run')]
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise StatscopeError(f"out={out_dir!r}: not a folder")
    items, seen = [], set()
    for bs, seed, norm in itertools.product(batch_sizes, seeds, norms):
        config = dataclasses.replace(base, batch_size=bs, seed=seed, norm=norm, out=None,
                                     overwrite=False, resume=False)
        name = run_name(config)
        if name in seen:
            continue
        seen.add(name)
        items.append(_plan_one(name, config, os.path.join(out_dir, name)))
    return items


def replan(item: SweepItem) -> SweepItem:
    """``item`` as :func:`plan_sweep` would plan it now: its store may have changed since.

    A run started again after its worker died finds its own store, which the first plan did
    not see; this says whether to resume it, start it over or skip it.

    Raises:
        StoreError: a folder in the way that is not a run.

    Example:
        >>> item = plan_sweep(RunConfig("mnist-fc"), "/tmp/no-such-sweep", batch_sizes=[4],
        ...                   seeds=[0])[0]
        >>> replan(item) == item  # no store appeared meanwhile
        True
    """
    config = dataclasses.replace(item.config, overwrite=False, resume=False)
    return _plan_one(item.name, config, config.out)


def _plan_one(name: str, config: RunConfig, path: str) -> SweepItem:
    """The item for the run ``config`` at ``path``, from its store's status."""
    from statscope.store import read_attrs
    from statscope.storage import exists as _exists

    status, action = None, "run"
    if _exists(path):
        try:
            attrs = read_attrs(path)
        except StoreError as exc:
            raise StoreError(f"{exc}; move it out of the sweep folder") from None
        status = attrs.get(S.ATTR_STATUS)
        if status == S.STATUS_COMPLETED:
            action = "skip"
        elif attrs.get(S.ATTR_LAST_STEP) is None:
            action = "overwrite"
        else:
            action = "resume"
    config = dataclasses.replace(config, out=path, overwrite=action == "overwrite",
                                 resume=action == "resume")
    return SweepItem(name, config, action, status)


def run_sweep(items: Iterable[SweepItem], *, jobs: int = 1,
              on_done: Callable[[SweepOutcome], None] | None = None, client=None,
              retries: int = 2) -> list[SweepOutcome]:
    """Run the items that are not skipped, up to ``jobs`` at a time, or on a dask cluster.

    A failing run does not stop the others; its outcome carries the error.

    Args:
        items: from :func:`plan_sweep`.
        jobs: parallel processes; 1 runs everything in this process, one after another.
        on_done: called with each outcome as it comes (skipped ones first).
        client: a ``distributed.Client``: run each item as one task on its cluster instead
            (:func:`statscope.experiments.cluster.run_on_cluster`); ``jobs`` must stay 1.
        retries: with ``client``, how many times a run whose process died is started again
            (it resumes from its checkpoint); a run whose worker died is started again by the
            scheduler anyway.

    Returns:
        The outcomes in the order of ``items``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StatscopeError(f"jobs={jobs!r}: expected a positive int")
    if client is not None:
        if jobs != 1:
            raise StatscopeError(f"jobs={jobs!r} with a client: the cluster's workers run the "
                                 "runs; leave jobs at 1")
        from statscope.experiments.cluster import run_on_cluster

        return run_on_cluster(client, items, on_done=on_done, retries=retries)
    items = list(items)
    outcomes = Outcomes(items, on_done)
    done = outcomes.done
    todo = outcomes.skip_planned()
    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            done(i, SweepOutcome(items[i], *_run_one(items[i].config)))
    else:
        import multiprocessing

        from statscope.experiments.worker import init_worker

        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=init_worker, initargs=(os.getpid(),),
                                 max_tasks_per_child=1) as pool:
            futures = {pool.submit(_run_in_worker, items[i].config): i for i in todo}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    done(i, SweepOutcome(items[i], *future.result()))
                except Exception as exc:  # the worker process died
                    done(i, SweepOutcome(items[i], None, f"worker process failed: {exc!r}"))
    return outcomes.in_order()


def _run_one(config: RunConfig, progress: Callable | None = None
             ) -> tuple[RunResult | None, str | None, tuple[str, ...], bool]:
    """Run one config; report errors and warnings instead of raising them.

    Args:
        config: the run.
        progress: ``run_experiment``'s progress callback (called between two steps).

    Returns:
        (result or None, error or None, distinct warning messages, held by another process).
    """
    from statscope.experiments.train import run_experiment

    held = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = run_experiment(config, progress=progress), None
        except StoreLockedError as exc:
            result, error, held = None, str(exc), True
        except StatscopeError as exc:
            result, error = None, str(exc)
        except Exception as exc:  # one broken run must not stop the sweep
            result, error = None, f"{type(exc).__name__}: {exc}"
    return result, error, tuple(dict.fromkeys(str(w.message) for w in caught)), held


def _run_in_worker(config: RunConfig):
    """:func:`_run_one` in a worker process that ends, once its run stopped, if its parent died
    (the run stops between two steps, at most ``progress_seconds``, 0.2 s, after the signal)."""
    from statscope.experiments.worker import EXIT_STATUS, ParentGone, running, stop_if_asked

    try:
        with running(defer=True):
            return _run_one(config, progress=stop_if_asked)
    except ParentGone:
        os._exit(EXIT_STATUS)  # nobody is left to report to; the run is marked failed
