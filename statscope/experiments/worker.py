"""Sweep workers that end with the sweep: no orphan keeps writing a run after its parent died.

A parallel sweep runs each run in a ``spawn`` worker process. If the sweep's own process dies
(``kill -9``, a closed terminal, an out-of-memory kill), its workers must not live on: run again,
the sweep would resume the very stores they still write. So each worker, as it starts:

- asks Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGUSR1)``): the kernel sends
  it the moment the sweep's process ends, however it ends; where there is no ``prctl`` (macOS),
  a daemon thread watches the parent pid once a second and sends the signal itself; a parent
  gone before either took effect ends the worker at once. A signal of its own, not ``SIGTERM``:
  Linux sends it again each time the dead thread's children pass to another thread of a
  multithreaded parent (the sweep's process, a dask worker), and a repeat must not count as a
  second ``SIGTERM``;
- turns that signal, or ``SIGTERM``, into :class:`ParentGone` inside a run, so the training
  loop stops between two steps the way Ctrl-C stops it: it saves a checkpoint, the run is
  marked ``failed`` with the reason and the worker exits (status 143). Outside a run, when the
  run has not ended :data:`GRACE_SECONDS` after the signal, or at a second ``SIGTERM``, the
  worker exits at once. In a run entered with ``running(defer=True)`` the signal only asks, and
  :func:`stop_if_asked` (the run's progress callback, called between two steps) raises: an
  exception raised inside a step would leave no checkpoint of that step, and the recorder would
  commit the step half recorded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time

__all__ = ["ParentGone", "GRACE_SECONDS", "EXIT_STATUS", "PARENT_DEATH_SIGNAL", "init_worker",
           "running", "stop_if_asked"]

GRACE_SECONDS = 60.0
"""How long a worker whose parent died may take to stop its run cleanly before it exits."""

EXIT_STATUS = 128 + signal.SIGTERM
"""A worker's exit status when its parent died, as if ``SIGTERM`` had killed it."""

PARENT_DEATH_SIGNAL = signal.SIGUSR1
"""The signal a worker gets when its parent ends."""

_PR_SET_PDEATHSIG = 1
_state = {"in_run": False, "defer": False, "asked": False}
_stops = itertools.count()  # next() is atomic: a signal handler may run inside another one


class ParentGone(KeyboardInterrupt):
    """The sweep process that started this worker ended (or the worker got ``SIGTERM``).

    A ``KeyboardInterrupt``: the training loop treats it as an interruption (checkpoint, run
    marked ``failed``), and handlers of ``Exception`` do not swallow it.
    """


def init_worker(parent: int) -> None:
    """Make this process end with the process ``parent`` (a ``ProcessPoolExecutor`` initializer).

    Args:
        parent: pid of the sweep's process.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(PARENT_DEATH_SIGNAL, _on_parent_death)
    asked = _ask_for_parent_death_signal()
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(EXIT_STATUS)
    if not asked:
        threading.Thread(target=_watch, args=(parent,), name="statscope-parent-watch",
                         daemon=True).start()


@contextlib.contextmanager
def running(defer: bool = False):
    """Inside, the parent's death or ``SIGTERM`` raises :class:`ParentGone` (the run stops
    cleanly): at once, or with ``defer`` at the next :func:`stop_if_asked`; outside, it ends the
    worker at once."""
    _state.update(in_run=True, defer=defer)
    try:
        yield
    finally:
        _state["in_run"] = False


def stop_if_asked(*_) -> None:
    """Raise :class:`ParentGone` if a stop signal came during a deferred run (a progress
    callback: call it between two steps)."""
    if _state["asked"]:
        _state["asked"] = False
        raise ParentGone("the sweep process that started this run ended")


def _ask_for_parent_death_signal() -> bool:
    """True when the kernel will send :data:`PARENT_DEATH_SIGNAL` once the parent ends."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl here: the watcher thread does the job
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


def _on_sigterm(signum, frame) -> None:
    if next(_stops) or not _state["in_run"]:  # a second stop signal, or none to stop cleanly
        os._exit(EXIT_STATUS)
    _stop()


def _on_parent_death(signum, frame) -> None:
    if not _state["in_run"]:
        os._exit(EXIT_STATUS)
    if next(_stops) == 0:  # the parent-death signal comes once per thread of the parent
        _stop()


def _stop() -> None:
    """Stop the run cleanly: now, or at the next :func:`stop_if_asked`; exit after the grace."""
    deadline = threading.Timer(GRACE_SECONDS, os._exit, args=(EXIT_STATUS,))
    deadline.daemon = True
    deadline.start()
    if _state["defer"]:
        _state["asked"] = True
        return
    raise ParentGone("the sweep process that started this run ended")
