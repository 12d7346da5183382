"""Sweeps on a ``dask.distributed`` cluster: one task per run, each run in a child process.

:func:`run_on_cluster` submits one task per run that is not skipped; dask places the tasks on
the cluster's workers, one per worker thread, and the results (status, steps, test accuracy, or
the error) come back to the caller. Each task starts its run in a fresh Python process, a child
of the worker, rather than in the worker process itself:

- a run sets process-wide torch state (the number of threads, the global RNG seeded per run),
  which two runs on two threads of one worker would share, and a training loop in a worker
  thread holds the GIL for much of each small step, starving the worker's heartbeats;
- a child gives its memory back when the run ends, whatever torch's allocator kept;
- the child is a ``--jobs`` worker (:mod:`statscope.experiments.worker`): it gets the
  parent-death signal when the worker process dies, and stops its run between two steps with a
  checkpoint; the task sends it ``SIGTERM``, which does the same, when the scheduler cancels the
  task (the sweep's client went away) or the worker closes.

Workers that die are dask's business: the scheduler gives a dead worker's task to another
worker, and ``retries`` starts a task again whose run process died. Either way the new attempt
plans its run again from the store (:func:`statscope.experiments.sweep.replan`): it resumes
from the checkpoint, or starts over when nothing was recorded. The store's lease can still be
held by the dead worker's child while it stops (at most
:data:`statscope.experiments.worker.GRACE_SECONDS`), so a second attempt waits for the lease up
to :data:`LEASE_WAIT_SECONDS`; a first attempt that finds it held reports the run held, as a
sweep on one machine does. The attempt count lives in the scheduler's metadata of the task's
key, which the scheduler drops with the task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Callable, Iterable

from statscope.errors import StatscopeError, StoreLockedError
from statscope.experiments.sweep import Outcomes, SweepItem, SweepOutcome, replan
from statscope.experiments.worker import GRACE_SECONDS

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["RunProcessDied", "LEASE_WAIT_SECONDS", "describe", "run_on_cluster"]

LEASE_WAIT_SECONDS = GRACE_SECONDS + 30.0
"""How long a run's second or later attempt waits for the lease its dead predecessor held."""

_POLL_SECONDS = 0.5
_CHILD = "from statscope.experiments.cluster import _child_main; _child_main()"
_METADATA = "statscope-attempts"


class RunProcessDied(RuntimeError):
    """A run's process ended without a result (killed, out of memory); dask retries the task."""


def describe(client: "Client") -> str:
    """The cluster in a few words: ``tcp://127.0.0.1:8786: 2 workers, 2 threads``."""
    workers = client.nthreads()
    threads = sum(workers.values())
    return (f"{client.scheduler.address}: {len(workers)} worker"
            f"{'s' if len(workers) != 1 else ''}, {threads} thread{'s' if threads != 1 else ''}")


def run_on_cluster(client: "Client", items: Iterable[SweepItem], *, retries: int = 2,
                   on_done: Callable[[SweepOutcome], None] | None = None) -> list[SweepOutcome]:
    """Run the items that are not skipped as tasks on ``client``'s cluster, one per run.

    The workers must see the sweep's folder at the same path (a shared file system, or an
    fsspec URL) and have statscope installed. Local paths are made absolute here.

    Args:
        client: a connected ``distributed.Client``.
        items: from :func:`statscope.experiments.sweep.plan_sweep`.
        retries: how many times dask starts a task again whose run process died.
        on_done: called with each outcome as it comes (skipped ones first).

    Returns:
        The outcomes in the order of ``items``.
    """
    from distributed import as_completed

    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise StatscopeError(f"retries={retries!r}: expected a non-negative int")
    items = list(items)
    outcomes = Outcomes(items, on_done)
    done = outcomes.done
    token = uuid.uuid4().hex[:12]
    futures = {}
    try:
        for i in outcomes.skip_planned():
            item = dataclasses.replace(items[i], config=_absolute(items[i].config))
            future = client.submit(_run_task, item, list(sys.argv), retries=retries, pure=False,
                                   key=f"statscope-run-{item.name}-{token}")
            futures[future] = i
        for future in as_completed(list(futures), loop=client.loop):
            i = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # retries spent, or every worker it ran on died
                attempts = client.get_metadata([future.key, _METADATA], 1)
                outcome = SweepOutcome(items[i], None, f"{type(exc).__name__}: {exc}",
                                       attempts=int(attempts))
            done(i, outcome)
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:  # interrupted: the tasks stop their runs (checkpoint, run marked failed)
            client.cancel(pending)
    return outcomes.in_order()


def _absolute(config):
    """``config`` with its local paths absolute: a worker's working folder is not ours."""
    from statscope.storage import is_url

    out = config.out if is_url(config.out) else os.path.abspath(config.out)
    data_dir = None if config.data_dir is None else os.path.abspath(config.data_dir)
    return dataclasses.replace(config, out=out, data_dir=data_dir)


def _run_task(item: SweepItem, argv: list[str]) -> SweepOutcome:
    """One run of a sweep on a worker: plan it from its store, run it in a child process."""
    from distributed import get_client, get_worker

    worker = get_worker()
    key = worker.get_current_task()
    client = get_client()
    attempt = int(client.get_metadata([key, _METADATA], 0)) + 1
    client.set_metadata([key, _METADATA], attempt)
    deadline = time.monotonic() + (LEASE_WAIT_SECONDS if attempt > 1 else 0.0)
    while True:
        if attempt > 1:  # the store is as the last attempt left it once it let the lease go
            _wait_for_lease(item.config.out, deadline)
        try:
            item = replan(item)
        except StatscopeError as exc:  # something not a run took its place
            return SweepOutcome(item, None, str(exc), attempts=attempt)
        if item.action == "skip":  # an earlier attempt finished it before its worker died
            return SweepOutcome(item, None, None, attempts=attempt)
        result, error, caught, held = _run_child(item.config, argv, worker, key)
        if held and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
            continue
        return SweepOutcome(item, result, error, caught, held, attempt)


def _wait_for_lease(path: str, deadline: float) -> None:
    """Return once nobody holds the run's lease, or at ``deadline``."""
    from statscope.lease import Lease

    while True:
        try:
            Lease.acquire(path).release()
            return
        except StoreLockedError:
            if time.monotonic() >= deadline:
                return  # the run's process reports it held
            time.sleep(_POLL_SECONDS)


def _run_child(config, argv: list[str], worker, key):
    """Run ``config`` in a child process; its ``_run_one`` tuple.

    Raises:
        RunProcessDied: the child ended without a result.
    """
    fd, result_path = tempfile.mkstemp(prefix="statscope-run-", suffix=".pkl")
    os.close(fd)
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(os.getpid()), result_path],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            with proc:
                proc.stdin.write(pickle.dumps((config, argv)))
                proc.stdin.close()
                code = _wait(proc, worker, key)
                err.seek(0)
                tail = [line for line in err.read().decode(errors="replace").splitlines()
                        if line.strip()]
        if code == 0 and os.path.getsize(result_path):
            with open(result_path, "rb") as f:
                return pickle.load(f)
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with status {code}")
        raise RunProcessDied(f"the run's process {proc.pid} on {worker.address} {how}"
                             + (f": {tail[-1].strip()}" if tail else ""))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(result_path)


def _wait(proc: subprocess.Popen, worker, key) -> int:
    """Wait for the child; stop it (``SIGTERM``: checkpoint, run marked failed) when the task
    is cancelled or the worker closes."""
    while True:
        try:
            return proc.wait(timeout=_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if _abandoned(worker, key):
                proc.terminate()
                try:
                    return proc.wait(timeout=GRACE_SECONDS + 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()


def _abandoned(worker, key) -> bool:
    """True when nobody wants this task's result any more (its client left, it was cancelled)
    or its worker is closing."""
    task = worker.state.tasks.get(key)
    return task is None or task.state == "cancelled" or worker.status.name in (
        "closing", "closed", "failed")


def _child_main() -> None:
    """The run's process: ``python -c _CHILD WORKER_PID RESULT_PATH``, the config on stdin."""
    from statscope.experiments.sweep import _run_in_worker
    from statscope.experiments.worker import init_worker

    parent, result_path = int(sys.argv[1]), sys.argv[2]
    init_worker(parent)
    config, argv = pickle.load(sys.stdin.buffer)
    sys.argv = argv  # the store's ``command`` attribute names the sweep, as with --jobs
    outcome = _run_in_worker(config)
    with open(result_path, "wb") as f:
        pickle.dump(outcome, f)
