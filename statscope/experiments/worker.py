"""Sweep workers that end with the sweep: no orphan keeps writing a run after its parent died.

A parallel sweep runs each run in a ``spawn`` worker process. If the sweep's own process dies
(``kill -9``, a closed terminal, an out-of-memory kill), its workers must not live on: run again,
the sweep would resume the very stores they still write. So each worker, as it starts:

- asks Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): the kernel sends
  it ``SIGTERM`` the moment the sweep's process ends, however it ends; where there is no
  ``prctl`` (macOS), a daemon thread watches the parent pid once a second and sends the signal
  itself; a parent gone before either took effect ends the worker at once;
- turns ``SIGTERM`` into :class:`ParentGone` inside a run, so the training loop stops between two
  steps the way Ctrl-C stops it: it saves a checkpoint, the run is marked ``failed`` with the
  reason and the worker exits (status 143). Outside a run, or when the run has not ended
  :data:`GRACE_SECONDS` after the signal, the worker exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

__all__ = ["ParentGone", "GRACE_SECONDS", "EXIT_STATUS", "init_worker", "running"]

GRACE_SECONDS = 60.0
"""How long a worker whose parent died may take to stop its run cleanly before it exits."""

EXIT_STATUS = 128 + signal.SIGTERM
"""A worker's exit status when its parent died, as if ``SIGTERM`` had killed it."""

_PR_SET_PDEATHSIG = 1
_state = {"in_run": False}


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
    asked = _ask_for_parent_death_signal()
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(EXIT_STATUS)
    if not asked:  # one signal per death: a second SIGTERM means "stop now"
        threading.Thread(target=_watch, args=(parent,), name="statscope-parent-watch",
                         daemon=True).start()


@contextlib.contextmanager
def running():
    """Inside, ``SIGTERM`` raises :class:`ParentGone` (the run stops cleanly); outside, it ends
    the worker at once."""
    _state["in_run"] = True
    try:
        yield
    finally:
        _state["in_run"] = False


def _ask_for_parent_death_signal() -> bool:
    """True when the kernel will send ``SIGTERM`` once the parent ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl here: the watcher thread does the job
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _on_sigterm(signum, frame) -> None:
    if not _state["in_run"]:
        os._exit(EXIT_STATUS)
    _state["in_run"] = False  # a second SIGTERM ends the worker at once
    deadline = threading.Timer(GRACE_SECONDS, os._exit, args=(EXIT_STATUS,))
    deadline.daemon = True
    deadline.start()
    raise ParentGone("the sweep process that started this run ended")
