"""The recorder's life cycle: start (open the store, start the writer thread, attach the
probes) and close (detach them, hand over the last block, mark the run).

:class:`Lifecycle` is a part of :class:`~statscope.probes.recorder.Recorder` (a mixin; the state
it reads and writes is set up in ``Recorder.__init__``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from statscope import schema as S
from statscope.errors import RecordingError, StatscopeError, StatscopeWarning, StoreError
from statscope.probes.attach import attach
from statscope.probes.steps import _caller_level
from statscope.probes.worker import Close, Filer, Notice, Worker
from statscope.storage import store_errors
from statscope.store import Layout, read_attrs
from statscope.writer_process import open_writer

if TYPE_CHECKING:
    from statscope.probes.recorder import Recorder

OPEN: "list[Recorder]" = []
"""The recorders of this process that started and are not closed yet (:func:`open_recorders`)."""
_closing_at_exit = False  # _close_at_exit is registered

__all__ = ["Lifecycle"]


class Lifecycle:
    """Starting and closing a :class:`~statscope.probes.recorder.Recorder` (a mixin)."""

    # Set up in Recorder.__init__. Declared here for type checkers, which would otherwise infer
    # them from this class's own assignments and find Recorder's at odds with those.
    _on: bool
    _last_dispatch: float
    _worker: Worker | None
    _root_ever: bool
    _resume_at: int | None
    resume_completed: bool
    # Set by start: the process and thread that started it (closed at exit by that process
    # alone, once that thread is done: _close_at_exit)
    _pid: int
    _thread: threading.Thread

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close(f"{exc_type.__name__}: {exc}")
        except BaseException as close_exc:  # never replace the training error
            exc.add_note(f"statscope: closing the run at {self.path!r} failed too: {close_exc!r}")

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    @property
    def _writer(self) -> Worker:
        """The writer thread, which exists from :meth:`start` on."""
        assert self._worker is not None, "the recorder was not started"
        return self._worker

    def start(self) -> "Recorder":
        """Open the store (taking its lease), start the writer thread and attach the probes.

        Raises:
            StatscopeError: the recorder was started before.
            StoreError: the store cannot be written (see :class:`~statscope.writer.RunWriter`).
        """
        if self._state != "new":
            raise StatscopeError(f"start(): this recorder is already {self._state}; a recorder "
                                 "records once: create a new one with record(...)")
        if self.resume:
            self._check_resumable()
        known = [s for s, c in zip(self._static, self.captures) if c.channels is not None]
        with store_errors(self.path):  # a bucket, credentials or endpoint the store lacks
            writer = open_writer(
                self.path, Layout(tuple(s.record(c.channels) for s, c in
                                        zip(self._static, self.captures)
                                        if c.channels is not None),
                                  tuple(s.name for s in self.statistics)),
                attrs=self._start_attrs(), overwrite=self.overwrite,
                resume=self.resume if self._resume_at is None else self._resume_at,
                resume_completed=self.resume_completed, chunk_steps=self.chunk_steps,
                flush_seconds=self.flush_seconds,
                running0=_running0(known, self.captures), window_steps=self.window_steps,
                mode=self._writer_mode)
        self._state = "started"
        self._pid, self._thread = os.getpid(), threading.current_thread()
        OPEN.append(self)
        _close_at_exit_once()
        try:
            self._begin_at(writer.next_step)
            filer = Filer(writer, self.captures, self._static, self.statistics, self.order,
                          self.pool, self.streams)
            self._worker = Worker(filer, self._take_idle, self.flush_seconds)
            self._worker.start()
            for cap in self.captures:
                self._handles.append(attach(cap.target.module, self._make_hook(cap),
                                            cap.target.where, self.mechanism))
            # under torch.compile the step boundary is an operator at the top of the graph too
            # (program order puts it before the probes'), unless a mask function must read
            # every argument: then a graph break. Under step="manual" it only tells training
            # forwards from others
            self._handles.append(attach(self.root, self._make_root_hook(), "input",
                                        self.mechanism, with_kwargs=self._mask_of is not None,
                                        on_error=self._forward_raised))
            if self._rule in ("undecided", "optimizer"):
                self._params = {id(p) for p in self.root.parameters()}
                self._handles.append(
                    register_optimizer_step_post_hook(self._optimizer_hook))
                # each witness costs a Python call per backward that reaches it: two, the
                # first probed layer's and the model's head's (see _witnesses)
                for witness in _witnesses(self.targets, self.root):
                    self._handles.append(
                        witness.register_post_accumulate_grad_hook(self._on_witness_grad))
        except BaseException as exc:
            self.close(f"start: {exc!r}")
            raise
        self._t_start = time.perf_counter()
        self._last_dispatch = time.monotonic()
        self._on = True
        return self

    def _start_attrs(self) -> dict:
        attrs = {S.ATTR_MODEL: f"{type(self.root).__module__}.{type(self.root).__qualname__}",
                 S.ATTR_META: self.meta, S.ATTR_COMMAND: " ".join(sys.argv),
                 S.ATTR_RANK: self.rank, S.ATTR_WORLD_SIZE: self.world_size,
                 S.ATTR_EVERY: self.every, **self._pending_attrs}
        if self._rule != "undecided":
            attrs[S.ATTR_STEP_RULE] = self._rule
        return attrs

    def _check_resumable(self) -> None:
        attrs = read_attrs(self.path)
        if attrs.get(S.ATTR_EVERY, 1) != self.every:
            raise StoreError(f"path={self.path!r}: resume=True with every={self.every} but the "
                             f"run records every {attrs.get(S.ATTR_EVERY, 1)} steps")
        stored = attrs.get(S.ATTR_LAYERS, [])
        names = {t.name for t in self.targets}
        foreign = [n for n in stored if n not in names]
        if foreign:
            raise StoreError(f"path={self.path!r}: resume=True but the store has layers "
                             f"{foreign} that this model's probes {sorted(names)} lack")
        if S.ATTR_WINDOW_STEPS in attrs and attrs[S.ATTR_WINDOW_STEPS] != self.window_steps:
            # the run's windows all have its own W (as its chunks have its chunk_steps): the
            # resumed run goes on with it, and says so
            stored = attrs[S.ATTR_WINDOW_STEPS]
            keeps = "no window summaries" if stored is None else \
                f"window summaries of window_steps={stored}"
            warnings.warn(f"statscope: {self.path!r} keeps {keeps}; resumed with "
                          f"window_steps={self.window_steps}, it goes on with the run's own "
                          f"(pass window_steps={stored} to say so)", StatscopeWarning,
                          stacklevel=_caller_level())

    def close(self, error: str | None = None) -> None:
        """Detach the probes, write what is buffered, mark the run and stop the writer thread.

        Args:
            error: why training stopped, if it failed; the run is then marked ``failed``.

        Raises:
            RecordingError: recording failed (e.g. the disk filled) while ``error`` is None; the
                run is marked ``failed`` and every step committed before stays readable.
        """
        if self._state == "closed":
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closed"
        self._on = False
        if self in OPEN:
            OPEN.remove(self)
        problems: list[BaseException] = []
        for h in reversed(self._handles):
            try:
                h.remove()
            except BaseException as exc:
                problems.append(exc)
        self._handles.clear()
        try:
            with self._lock:
                if self._failed is not None and error is None:
                    # a forward that raised and that the loop went on from, as a next forward
                    # would (closed by the error instead: kept, the batch it failed on)
                    self._discard(self._failed)
                if self._rule == "undecided":
                    self._decide("forward")
                if self._rule == "forward" and self._dirty and not self._root_ever:
                    self._say.append(Notice(
                        "statscope: the probed layers ran but the recorded model's forward "
                        "never did (they were called through another method, such as "
                        "forward_features): with no optimizer step either, forwards could not "
                        "be told apart and were filed as one step; record the module whose "
                        "forward the loop calls, or pass step='manual' and call rec.step()",
                        StatscopeWarning))
                if self._dirty or self._logged:
                    self._end_step(dispatch=False)
                block = self._take_block() if self._slot else None
            if block is not None and not self._writer.put(block):
                self._give_back(block)
        except BaseException as exc:  # e.g. the device error that ended training
            problems.append(exc)
        wall = time.perf_counter() - self._t_start
        busy = max(wall - self.probe_seconds, 1e-9)
        status = S.STATUS_FAILED if error or problems else S.STATUS_COMPLETED
        reason = error or (f"closing: {problems[0]!r}" if problems else None)
        attrs = {S.ATTR_PROBE_SECONDS: self.probe_seconds,
                 S.ATTR_PROBE_OVERHEAD: self.probe_seconds / busy}
        self._writer.put(Close(status, reason, attrs), force=True)
        while not self._writer.join(timeout=1.0):
            if not self._writer.alive:
                break
        self._emit()
        failure = self._writer.failure or (problems[0] if problems else None)
        if failure is not None and error is None:
            raise RecordingError(f"path={self.path!r}: recording failed ({failure!r}); the run is "
                                 "marked failed and keeps every step committed before") \
                from failure


def _running0(static, captures) -> dict | None:
    if not any(s.running0 is not None for s in static):
        return None
    mean, var = [], []
    for s in static:
        c = s.info.channels
        r0 = s.running0 if isinstance(s.running0, tuple) and len(s.running0[0]) == c else None
        mean.append(r0[0] if r0 else np.full(c, np.nan, np.float32))
        var.append(r0[1] if r0 else np.full(c, np.nan, np.float32))
    return {S.RUNNING_MEAN0: np.concatenate(mean), S.RUNNING_VAR0: np.concatenate(var)}


def _witnesses(targets, root: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradient tells that a backward ran (Steps._grads_discarded): the
    first trained parameter of a probed layer (else of the model), which a backward of layers
    run without the model's forward reaches (``model.forward_features(x)`` with a head of
    their own), and the model's last trained one, its head's as a rule, which a backward
    reaches where the first probed layer skipped the step (stochastic depth, an expert). Empty
    where the model trains none (or only parameters of lazy modules not yet initialized, whose
    tensors materializing replaces)."""
    def trained(params) -> list[nn.Parameter]:
        return [p for p in params
                if p.requires_grad and not isinstance(p, nn.parameter.UninitializedParameter)]

    first: list[nn.Parameter] = []
    for params in [t.module.parameters(recurse=False) for t in targets] + [root.parameters()]:
        first = trained(params)[:1]
        if first:
            break
    last = trained(root.parameters())[-1:]
    return first + [p for p in last if all(p is not q for q in first)]


def _close_at_exit_once() -> None:
    """Register :func:`_close_at_exit` at the first start, where ``concurrent.futures``
    registers the shutdown of its thread pools (which zarr writes through): among the exit
    handlers that run before the interpreter joins its threads, last-registered first, so that
    the pools still take the last writes. (``threading._register_atexit`` is private to the
    standard library; where it is missing, ``atexit``.)"""
    global _closing_at_exit
    if not _closing_at_exit:
        _closing_at_exit = True
        getattr(threading, "_register_atexit", atexit.register)(_close_at_exit)


def _close_at_exit() -> None:
    """At the interpreter's exit, close the recorders that the program left open, so that their
    steps reach the store. Only this process's own recorders: a forked child that exits
    through ``sys.exit`` runs the handlers it inherited, and must not write its parent's runs.
    A recorder started on another thread that still runs (training in a thread the main one
    left behind) is closed once that thread ends: the interpreter would wait for it right
    after these handlers anyway."""
    for rec in [r for r in OPEN if r._pid == os.getpid()]:
        if rec._thread is not threading.current_thread() and not rec._thread.daemon:
            try:
                rec._thread.join()
            except BaseException:  # noqa: BLE001 - Ctrl-C while waiting: close it now
                pass
        _close_left_open(rec)


def _close_left_open(rec: "Recorder") -> None:
    """Close ``rec`` at exit: ``completed``, or ``failed`` with the exception that ended a
    script (``sys.last_value``; not in an interactive session, where it may be an old cell's).
    Then say so. Nothing raises out of here: an exit handler that raises would cut the
    interpreter's shutdown short (also under ``-W error``, where the warning itself raises)."""
    if rec.closed:
        return
    interactive = hasattr(sys, "ps1") or "IPython" in sys.modules
    exc = None if interactive else getattr(sys, "last_value", None)
    try:
        rec.close(None if exc is None else f"{type(exc).__name__}: {exc}")
        said = "completed" if exc is None else f"failed: {type(exc).__name__}"
    except BaseException as close_exc:  # noqa: BLE001 - the exit goes on, said
        said = f"which failed: {close_exc!r}"
    try:
        warnings.warn(f"statscope: the recorder of {rec.path!r} was still open when the "
                      f"process exited; closed it then ({said}). Close it where training ends "
                      "(with statscope.record(...) as rec:, or rec.close())", StatscopeWarning,
                      stacklevel=2)
    except BaseException:  # noqa: BLE001 - a warnings filter set to "error"
        print(f"statscope: the recorder of {rec.path!r} was closed at exit ({said})",
              file=sys.stderr)
