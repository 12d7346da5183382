"""Ctrl-C in a built-in run: a first SIGINT stops the training loop at the end of its step.

The loop then saves a checkpoint at that step and marks the run ``failed`` with the
``KeyboardInterrupt``, so that ``--resume`` goes on from there; a second Ctrl-C stops at once
(:mod:`statscope.experiments.train`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass

__all__ = ["CtrlC", "sigint_at_step_end"]


@dataclass
class CtrlC:
    """What Ctrl-C asked of a run (see :func:`sigint_at_step_end`).

    Attributes:
        asked: a first Ctrl-C came: the loop stops at the end of its step, or, once
            ``closing``, when the run is closed.
        closing: the last step is done; the run evaluates, saves and closes its store.
    """

    asked: bool = False
    closing: bool = False


@contextlib.contextmanager
def sigint_at_step_end():
    """Inside, a first SIGINT only asks the run to stop (``asked`` of the :class:`CtrlC`
    yielded: the loop raises ``KeyboardInterrupt`` at the end of its step, or after closing
    the run when its steps are done), a second one raises at once. Only on the main thread,
    and only where SIGINT has Python's own handler (not a handler the caller installed)."""
    state = CtrlC()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield state
        return

    def ask(signum, frame):
        if state.asked:
            raise KeyboardInterrupt
        state.asked = True
        when = "once this run is closed" if state.closing else "at the end of this step"
        print(f"statscope: stopping {when} (Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
