"""Sweeps: a grid of runs of one experiment into one folder, restartable.

Each run's folder is named from its settings (:func:`statscope.experiments.run_name`), so running
the same sweep again finds its earlier runs: completed ones are skipped, failed or interrupted
ones (status ``failed``, or ``running`` with no process behind it) are resumed after their last
recorded step, from their checkpoint, and ones that recorded nothing are started again. Runs go
in parallel in fresh ``spawn`` processes (``jobs > 1``: :mod:`statscope.experiments.pool`) or
one after another in this process. Worker processes end with the sweep's process
(:mod:`statscope.experiments.worker`), so no orphan goes on writing a run that a second sweep
resumes. With a ``dask.distributed`` client the runs go as tasks on its
cluster instead (:mod:`statscope.experiments.cluster`).

A run is planned when the sweep starts (for its header, and to refuse a folder in the way) and
again at the moment it starts, while its process holds the run's lease (:func:`_claim`): another
sweep into the same folder may have started, completed or left that run meanwhile. A run
completed by then is skipped, one whose lease another process holds is reported held and left
alone, and a store that recorded nothing is removed under the lease, so that the run itself
never replaces a store (``overwrite`` stays off): a store that another process creates after
the claim is refused by the run's writer, and the run is reported held, as the lease names that
process.

Ctrl-C, or any exception in the sweep's process (a closed stdout), starts no further run; the
runs in progress stop at the end of their step (checkpoint saved, run marked ``failed``) and the
sweep waits for them before the exception goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

from statscope import schema as S
from statscope.errors import RunCompletedError, StatscopeError, StoreError, StoreLockedError
from statscope.experiments.base import RunConfig, RunResult, run_name

__all__ = ["SweepItem", "SweepOutcome", "plan_sweep", "replan", "run_sweep"]

@dataclass(frozen=True)
class SweepItem:
    """One run of a sweep and what to do with it.

    Attributes:
        name: the run's folder name.
        config: the run, with ``out`` in the sweep folder and ``resume``/``overwrite`` set.
        action: ``"run"`` (new), ``"skip"`` (completed), ``"resume"`` (failed or interrupted
            after recording steps) or ``"overwrite"`` (failed before recording any; when the run
            starts, its store is removed under the run's lease and ``overwrite`` turned off).
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
        item: the run as planned when it started.
        result: the run's result, None when skipped or failed.
        error: one line saying why it failed, None otherwise.
        warnings: the distinct warning messages the run raised.
        held: True when another process holds the run (is writing it, or took it over while
            this one prepared it): that process's to finish, not a failure of this sweep.
        attempts: how many times the run was started (more than 1 on a cluster when its worker
            or its process died and the run was resumed elsewhere).
        bad_input: True when it failed on its settings or on what is in its way (a
            :class:`StatscopeError` of exit code 2): running it again fails it again.
    """

    item: SweepItem
    result: RunResult | None
    error: str | None
    warnings: tuple[str, ...] = ()
    held: bool = False
    attempts: int = 1
    bad_input: bool = False


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
        StatscopeError: a bad setting; ``out_dir`` empty, not a folder, a run or inside one.
        StoreError: a folder in the way that is not a run.

    Example:
        >>> items = plan_sweep(RunConfig("mnist-fc"), "/tmp/no-such-sweep", batch_sizes=[4, 128],
        ...                    seeds=[0])
        >>> [(i.name, i.action) for i in items]
        [('mnist-fc_bs4_seed0_bn', 'run'), ('mnist-fc_bs128_seed0_bn', 'run')]
    """
    out_dir = os.fspath(out_dir)
    grid = {"batch_sizes": batch_sizes, "seeds": seeds, "norms": norms}
    for name, values in grid.items():
        grid[name] = None if isinstance(values, (str, bytes)) else list(values)
        if not grid[name]:
            raise StatscopeError(f"{name}={values!r}: expected a non-empty list of values "
                                 "(a str is not one; an empty grid runs nothing)")
    batch_sizes, seeds, norms = grid.values()
    _check_folder(out_dir)
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


def _check_folder(out_dir: str) -> None:
    """Refuse a sweep folder that is empty, not a folder, a run or inside one (its runs would
    be written among that run's files)."""
    from pathlib import Path

    from statscope.discovery import is_run
    from statscope.discovery import enclosing_run
    from statscope.storage import is_url

    if not out_dir:
        raise StatscopeError("out='': expected a folder path or URL for the sweep's runs")
    if is_url(out_dir):
        if is_run(out_dir):
            raise StatscopeError(f"out={out_dir!r}: is a run, not a folder of runs; give the "
                                 "sweep a folder of its own")
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise StatscopeError(f"out={out_dir!r}: not a folder")
    target = Path(out_dir.removeprefix("file://")).expanduser().resolve()
    if target.is_dir() and is_run(target):
        raise StatscopeError(f"out={out_dir!r}: is a run, not a folder of runs; give the sweep "
                             "a folder of its own")
    parent = enclosing_run(out_dir)
    if parent is not None:
        raise StatscopeError(f"out={out_dir!r}: inside the run {parent!r}; give the sweep a "
                             "folder of its own (its runs would sit among the run's files)")


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
    """The item for the run ``config`` at ``path``, from its store's status; a completed run's
    leftover checkpoints go (a completed run is never resumed)."""
    from statscope.experiments.checkpoint import remove_checkpoints
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
            remove_checkpoints(path)
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

    Each run is planned again from its store as it starts (see the module's docstring). A
    failing or held run does not stop the others; its outcome carries the error. An exception
    here (``KeyboardInterrupt``, or one raised by ``on_done``) starts no further run, stops the
    runs in progress between two steps, waits for them and is raised.

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
    todo = outcomes.skip_planned()
    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            outcomes.done(i, _start(items[i]))
    else:
        from statscope.experiments.pool import run_parallel

        run_parallel(items, todo, min(jobs, len(todo)), outcomes.done)
    return outcomes.in_order()


def _start(item: SweepItem, progress: Callable | None = None) -> SweepOutcome:
    """Plan ``item`` again under its lease (:func:`_claim`) and run it; report errors and
    warnings instead of raising them.

    Args:
        item: the run as planned.
        progress: ``run_experiment``'s progress callback (called between two steps).
    """
    from statscope.experiments.train import run_experiment

    claimed = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            item = _claim(item)
            claimed = True
            if item.action == "skip":  # completed by another process since the sweep began
                outcome = SweepOutcome(item, None, None)
            else:
                outcome = SweepOutcome(item, run_experiment(item.config, progress=progress),
                                       None)
        except StoreLockedError as exc:
            outcome = SweepOutcome(item, None, str(exc), held=True)
        except RunCompletedError:  # another process completed it while this one prepared it
            outcome = SweepOutcome(dataclasses.replace(item, action="skip",
                                                       status=S.STATUS_COMPLETED), None, None)
        except StatscopeError as exc:
            outcome = SweepOutcome(item, None, str(exc), bad_input=exc.exit_code == 2)
        except Exception as exc:  # one broken run must not stop the sweep
            outcome = SweepOutcome(item, None, f"{type(exc).__name__}: {exc}")
    if claimed and outcome.error is not None and not outcome.held:
        other = _taken_by(item.config.out)
        if other is not None:  # its writer refused the store another process made meanwhile
            outcome = dataclasses.replace(
                outcome, held=True, bad_input=False,
                error=f"out={item.config.out!r}: {other} took the run while this sweep was "
                      f"preparing it ({outcome.error})")
    return dataclasses.replace(outcome,
                               warnings=tuple(dict.fromkeys(str(w.message) for w in caught)))


def _claim(item: SweepItem) -> SweepItem:
    """``item`` planned again from its store while this process holds the run's lease; a store
    that recorded nothing is removed then, so that the run starts without ``overwrite``.

    Raises:
        StoreLockedError: another process holds the lease.
        StoreError: a folder in the way that is not a run.
    """
    from statscope.lease import Lease
    from statscope.storage import remove_tree

    lease = Lease.acquire(item.config.out)
    try:
        item = replan(item)
        if item.action == "overwrite":  # nothing recorded: removing it loses nobody's work
            remove_tree(item.config.out)
            item = dataclasses.replace(item, config=dataclasses.replace(item.config,
                                                                        overwrite=False))
    finally:
        lease.release()
    return item


def _taken_by(path: str) -> str | None:
    """The process that took the run's lease after this one claimed it (named by its holder
    record, which a local lease keeps after it is released); None when none did, or when that
    cannot be told (an object store's lease is deleted on release)."""
    from statscope.lease import read_holder

    held = read_holder(path)
    if held is None:
        return None
    me = os.getpid()
    if held.host == socket.gethostname() and me in (held.pid, held.parent):
        return None
    return held.describe()


def _item_of(config: RunConfig) -> SweepItem:
    """The item of a run given as a config alone (a cluster's run process)."""
    action = "overwrite" if config.overwrite else "resume" if config.resume else "run"
    return SweepItem(config.out.rstrip("/").rsplit("/", 1)[-1], config, action, None)


def _run_one(config: RunConfig, progress: Callable | None = None
             ) -> tuple[RunResult | None, str | None, tuple[str, ...], bool]:
    """:func:`_start` for one config; a run another process completed meanwhile counts as held.

    Args:
        config: the run.
        progress: ``run_experiment``'s progress callback (called between two steps).

    Returns:
        (result or None, error or None, distinct warning messages, held by another process).
    """
    outcome = _start(_item_of(config), progress)
    if outcome.item.action == "skip":
        return (None, f"out={config.out!r}: another process completed the run meanwhile",
                outcome.warnings, True)
    return outcome.result, outcome.error, outcome.warnings, outcome.held


def _run_in_worker(config: RunConfig):
    """:func:`_run_one` in a worker process that ends, once its run stopped, if its parent died
    (the run stops between two steps, at most ``progress_seconds``, 0.2 s, after the signal)."""
    from statscope.experiments.worker import EXIT_STATUS, ParentGone, running, stop_if_asked

    try:
        with running(defer=True):
            return _run_one(config, progress=stop_if_asked)
    except ParentGone:
        os._exit(EXIT_STATUS)  # nobody is left to report to; the run is marked failed
