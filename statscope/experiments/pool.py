"""A sweep's local pool: each run in a fresh ``spawn`` process, ``jobs`` at a time.

The workers end with the sweep's process (:mod:`statscope.experiments.worker`); an exception in
the sweep's process (Ctrl-C, a closed stdout) starts no further run, stops the runs in progress
between two steps and waits for them.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from statscope.experiments.sweep import SweepItem, SweepOutcome

__all__ = ["run_parallel"]


def run_parallel(items: list[SweepItem], todo: list[int], workers: int,
                  done: Callable[[int, SweepOutcome], None]) -> None:
    """Run the items ``todo``, each in a fresh ``spawn`` process, ``workers`` at a time.

    A process is started only when one is free, so an exception here leaves no queue behind:
    the processes running are told to stop (``SIGTERM``: their run stops at the end of its
    step) and waited for, and the exception goes on.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    queue = list(todo)
    running: dict = {}  # the reading end of each process's pipe -> (item index, process)
    try:
        while queue or running:
            while queue and len(running) < workers:
                i = queue.pop(0)
                reader, writer = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_worker_main, args=(os.getpid(), items[i], writer),
                                      name=f"statscope-sweep-{items[i].name}")
                process.start()
                writer.close()  # the child's end: EOF here once the child is gone
                running[reader] = (i, process)
            for reader in wait(list(running)):
                i, process = running.pop(reader)
                done(i, _receive(reader, process, items[i]))
    except BaseException:
        _stop([process for _, process in running.values()])
        raise


def _receive(reader, process, item: SweepItem) -> SweepOutcome:
    """The outcome a worker process sent, or the failure of one that died without sending it."""
    from statscope.experiments.sweep import SweepOutcome

    try:
        outcome = reader.recv()
    except EOFError:
        outcome = None
    finally:
        reader.close()
    process.join()
    if outcome is not None:
        return outcome
    code = process.exitcode
    how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exited with status {code}")
    return SweepOutcome(item, None, f"worker process failed: its process {process.pid} {how} "
                                    "before reporting the run")


def _stop(processes: list) -> None:
    """Stop the runs of ``processes`` between two steps and wait for them (a process that is
    not done after the workers' grace time is killed)."""
    from statscope.experiments.worker import GRACE_SECONDS

    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + GRACE_SECONDS + 5.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _worker_main(parent: int, item: SweepItem, conn) -> None:
    """A ``--jobs`` worker process: run ``item`` (:func:`_start`), send its outcome, end; it
    ends, once its run stopped, if its parent died (the run stops between two steps, at most
    ``progress_seconds``, 0.2 s, after the signal)."""
    from statscope.experiments.sweep import SweepOutcome
    from statscope.experiments.sweep import _start as start
    from statscope.experiments.worker import (EXIT_STATUS, ParentGone, init_worker, running,
                                              stop_if_asked)

    init_worker(parent)
    try:
        with running(defer=True):
            outcome = start(item, progress=stop_if_asked)
    except ParentGone:
        os._exit(EXIT_STATUS)  # nobody is left to report to; the run is marked failed
    except KeyboardInterrupt:  # a Ctrl-C reached this process: its run stopped as run's does
        outcome = SweepOutcome(item, None, "interrupted (KeyboardInterrupt)")
    conn.send(outcome)
    conn.close()
