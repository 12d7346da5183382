"""The recorder: probes on a model, blocks of steps, a background writer thread.

Per training step the training thread keeps, for each probe, what the writer thread needs and
nothing more (see :mod:`statscope.probes.capture`): references to the (C,) mean and inverse std a
training-mode BatchNorm computed itself (:mod:`statscope.probes.fastpath`), a copy of a small
tensor into a device buffer, or one per-step reduction of a large one
(:mod:`statscope.probes.reduce`). Every ``block_steps`` steps, or every ``flush_seconds``, it
hands the block to the writer thread (:mod:`statscope.probes.worker`), which finishes the moments
in one batched pass, the statistics in float64, and appends them to the run store. The training
thread never waits on the device; it waits on the writer only when the writer is two blocks
behind, and never on a writer that failed.

**Threads.** The state of the current block (the captures, the slot, the logged scalars) belongs
to whichever thread holds ``Recorder._lock``: the training thread takes it for the few
microseconds of each probe call; the writer thread takes it, without waiting, to hand itself the
steps that ended while training is idle. Everything else the writer thread uses is frozen before
it starts or handed over in messages.

**Steps.** What one recorded step is (``step=``): ``"optimizer"`` — one optimizer step of an
optimizer holding the model's parameters (torch's global optimizer-step hooks; micro-batches of
gradient accumulation are one step, its first forward is recorded); ``"forward"`` — each
training forward of the model; ``"manual"`` — :meth:`Recorder.step` ends a step; ``"auto"``
(default) — ``"optimizer"`` when such an optimizer steps within the first ``block_steps``
training forwards, else ``"forward"`` (also when recording ends first). The rule that applied is in
the run's attribute ``step_rule``. Under ``"optimizer"`` and ``"forward"`` a step ends when the
next one begins (its first training forward), so what is logged after ``optimizer.step()``
belongs to the step that just stepped. A training forward is one in training mode with autograd
on: forwards of the model under ``torch.no_grad`` or ``torch.inference_mode`` are not recorded
unless ``record_eval=True``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from statscope import schema as S
from statscope.errors import RecordingError, StatscopeError, StatscopeWarning, StoreError
from statscope.probes.attach import MECHANISMS, attach
from statscope.probes.block import Block
from statscope.probes.capture import Capture
from statscope.probes.fastpath import BatchStats, probe_path
from statscope.probes.pool import BufferPool
from statscope.probes.neurons import check_spec
from statscope.probes.selection import Target, _per_layer, norm_info, select, unwrap
from statscope.probes.statistics import STATISTICS, get_statistic
from statscope.probes.streams import StreamOrder
from statscope.probes.worker import Attrs, Close, Filer, Notice, ProbeStatic, Worker
from statscope.storage import use_options
from statscope.store import Layout, ProbeInfo, read_attrs
from statscope.writer import check_path, check_scalar_name
from statscope.writer_process import open_writer, resolve_mode

__all__ = ["Recorder", "record", "STEP_MODES"]

_in_backward = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled
STEP_MODES = ("auto", "optimizer", "forward", "manual")
_RESERVED_ATTRS = {S.ATTR_FORMAT, S.ATTR_STATUS, S.ATTR_N_STEPS, S.ATTR_LAST_STEP, S.ATTR_PROBES,
                   S.ATTR_LAYERS, S.ATTR_STATS, S.ATTR_SCALARS, S.ATTR_STEP_RULE}


def _rank_path(path: str) -> tuple[str, int, int]:
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "{rank}" in path:
        return path.format(rank=rank), rank, world
    if world > 1:
        return os.path.join(path, f"rank{rank}"), rank, world
    return path, rank, world


def _positive_int(name: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise StatscopeError(f"{name}={value!r}: expected an int ≥ {least}")
    return value


class Recorder:
    """Records per-step normalization statistics of a model into a run store.

    Use it through :func:`record`, which documents the arguments. As a context manager it removes
    every probe on exit and marks the run ``completed``, or ``failed`` with the error.
    """

    def __init__(self, model: nn.Module, path, *, layers: Any = None,
                 where: str | Iterable[str] = "input", channel_dim: Any = None,
                 en_groups: int | Mapping[Any, int] = 1,
                 stats: Iterable[str] = S.DEFAULT_STATS, meta: Mapping[str, Any] | None = None,
                 overwrite: bool = False, resume: bool = False, step: str = "auto",
                 record_eval: bool = False, block_steps: int = 128, raw_bytes: int = 16 << 20,
                 buffer_bytes: int = 512 << 20, flush_seconds: float = 5.0,
                 chunk_steps: int | None = None, mechanism: str = "forward",
                 on_error: str = "stop",
                 neurons: Any = None, window_steps: int | None = S.DEFAULT_WINDOW_STEPS,
                 every: int = 1, mask: Callable[..., Any] | None = None,
                 storage_options: Mapping[str, Any] | None = None, writer: str = "auto"):
        if not isinstance(model, nn.Module):
            raise StatscopeError(f"model={type(model).__name__}: expected a torch.nn.Module")
        if step not in STEP_MODES:
            raise StatscopeError(f"step={step!r}: expected one of {STEP_MODES}")
        self.block_steps = _positive_int("block_steps", block_steps)
        self.chunk_steps = None if chunk_steps is None else _positive_int("chunk_steps",
                                                                          chunk_steps)
        raw_bytes = _positive_int("raw_bytes", raw_bytes, least=0)  # 0: reduce every step
        buffer_bytes = _positive_int("buffer_bytes", buffer_bytes)
        if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) \
                or not flush_seconds > 0:
            raise StatscopeError(f"flush_seconds={flush_seconds!r}: expected a positive number")
        if mechanism not in MECHANISMS:
            raise StatscopeError(f"mechanism={mechanism!r}: expected one of {MECHANISMS}")
        if on_error not in ("stop", "raise"):
            raise StatscopeError(f"on_error={on_error!r}: expected 'stop' (recording stops, "
                                 "training goes on) or 'raise' (the next probe raises)")
        if isinstance(stats, str) or not isinstance(stats, Iterable):
            raise StatscopeError(f"stats={stats!r}: expected a list of statistic names, e.g. "
                                 f"{list(S.DEFAULT_STATS)}")
        stats = tuple(dict.fromkeys(stats))
        if not stats:
            raise StatscopeError(f"stats=[]: expected at least one of {', '.join(STATISTICS)}")
        self.statistics = [get_statistic(s) for s in stats]
        self.order = max(s.order for s in self.statistics)
        self.mechanism, self.on_error, self.step_mode = mechanism, on_error, step
        self.flush_seconds = float(flush_seconds)
        self.record_eval = record_eval
        self.path, self.rank, self.world_size = _rank_path(os.fspath(path))
        use_options(os.fspath(path), storage_options)
        # checked now although the writer opens the store at start()
        self.resume = check_path(self.path, overwrite=overwrite, resume=resume) and resume
        resolve_mode(writer, self.path)  # checked now, resolved at start()
        self._writer_mode = writer
        self.overwrite = overwrite
        self.model = model
        self.root = unwrap(model)
        self.targets: list[Target] = select(model, layers, where=where, channel_dim=channel_dim,
                                            en_groups=en_groups)
        self.meta = dict(meta or {})
        self.pool = BufferPool(buffer_bytes)
        self.streams = StreamOrder()
        if mask is not None and not callable(mask):
            raise StatscopeError(f"mask={mask!r}: expected a function (args, kwargs) -> mask of "
                                 "the model's forward, e.g. lambda a, kw: kw['attention_mask']; "
                                 "or call rec.mask(tensor) at each step")
        self._mask_of = mask
        self._mask: torch.Tensor | None = None
        self._next_mask: torch.Tensor | None = None  # set by mask() for the next step
        sets = any(s.sets for s in self.statistics)
        self.captures = [Capture(t, self.block_steps, raw_bytes, self.order, self.pool, sets)
                         for t in self.targets]
        self.every = _positive_int("every", every)
        if window_steps is not None:
            window_steps = _positive_int("window_steps", window_steps)
        self.window_steps = window_steps
        specs = [_per_layer(neurons, t.module_name, t.module, None) for t in self.targets]
        for spec in specs:
            check_spec(spec)
        self._static = [ProbeStatic(_probe_info(t, probe_path(t, self.order, mechanism)),
                                    _running_buffers(t), spec)
                        for t, spec in zip(self.targets, specs)]
        self._lock = threading.Lock()
        self._state = "new"
        self._handles: list = []
        self._worker: Worker | None = None
        self._pending_attrs: dict[str, Any] = {}
        self._say: list[Notice] = []
        self._scalars: dict[str, list[tuple[int, Any]]] = {}
        self._scalar_names: set[str] = set()
        self._slot = 0
        self._block_start = 0  # the step of row 0 of the block; row r is step start + r·every
        self._step_no = 0  # the step in progress, recorded or not
        self._skip = False  # this step is not recorded (every > 1)
        # the model's last forward ran without autograd (validation in training mode, BatchNorm
        # recalibration): not a training forward, so its layers record nothing while grad is off
        self._quiet = False
        self._dirty = False  # a training forward ran in the step in progress
        self._logged = False  # a scalar was logged in it
        self._pending_end = False
        self._forwards = 0
        self._first_forwards: int | None = None
        # (slot, step, whether it began the step, which probes had the slot) of the training
        # forward in progress and of one that raised, whose captures the next forward discards
        self._open: tuple | None = None
        self._failed: tuple | None = None
        self._rule = {"auto": "undecided", "manual": "manual"}.get(step, step)
        # id(optimizer) -> (weakref to it, whether it steps this model's parameters)
        self._holds: dict[int, tuple[weakref.ref, bool]] = {}
        self._on = False
        self._last_dispatch = time.monotonic()
        self.probe_seconds = 0.0
        self._t_start = 0.0

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
        writer = open_writer(
            self.path, Layout(tuple(s.record(c.channels) for s, c in
                                    zip(self._static, self.captures) if c.channels is not None),
                              tuple(s.name for s in self.statistics)),
            attrs=self._start_attrs(), overwrite=self.overwrite, resume=self.resume,
            chunk_steps=self.chunk_steps, flush_seconds=self.flush_seconds,
            running0=_running0(known, self.captures), window_steps=self.window_steps,
            mode=self._writer_mode)
        self._state = "started"
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
        except BaseException as exc:
            self.close(f"start: {exc!r}")
            raise
        self._t_start = time.perf_counter()
        self._last_dispatch = time.monotonic()
        self._on = True
        return self

    def _begin_at(self, step: int) -> None:
        """Count steps from ``step``; the first recorded one is the next multiple of every."""
        self._step_no = step
        self._skip = step % self.every != 0
        self._block_start = -(-step // self.every) * self.every

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
                if self._dirty or self._logged:
                    self._end_step()
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

    # -- hot path -----------------------------------------------------------------------------

    def _make_hook(self, cap: Capture):
        rec = self

        def hook(module, args, output=None):
            if not rec._on or rec._skip or not (module.training or rec.record_eval) \
                    or _in_backward() != -1 or (rec._quiet and not _grad_enabled()):
                return
            t0 = time.perf_counter()
            x = args[0] if output is None else output
            if isinstance(x, (torch.Tensor, BatchStats)):
                with rec._lock:
                    if rec._slot >= rec.block_steps:  # a forward that bypassed the root
                        rec._dispatch()
                    cap.capture(x, rec._slot, rec._mask)
                    rec._dirty = True
                if x.device.type == "cuda":
                    rec.streams.note(x.device)
            rec.probe_seconds += time.perf_counter() - t0

        if probe_path(cap.target, self.order, self.mechanism) == "batchnorm":
            hook.batchnorm = self._make_batchnorm_hook(cap, hook)  # type: ignore[attr-defined]
        if self.order <= 2:  # under torch.compile: moments computed in the graph
            hook.moments = self._make_moments_hook(cap, hook)  # type: ignore[attr-defined]
            hook.channel_dim = cap.target.channel_dim  # type: ignore[attr-defined]
        return hook

    def _make_batchnorm_hook(self, cap: Capture, hook):
        """The probe that the BatchNorm fast path calls after a training-mode forward with the
        statistics BatchNorm computed: ``hook`` with less Python, which is what this probe costs
        a launch-bound training step (see :meth:`Capture.capture_bn`)."""
        rec, lock, block_steps, perf_counter = self, self._lock, self.block_steps, time.perf_counter

        def batchnorm_hook(module, x, mean, invstd):
            if rec._skip or not rec._on or _in_backward() != -1 or (
                    rec._quiet and not _grad_enabled()):
                return
            t0 = perf_counter()
            with lock:
                if rec._slot >= block_steps:  # a forward that bypassed the root
                    rec._dispatch()
                if rec._mask is None and cap.capture_bn(x, mean, invstd, module.eps, rec._slot):
                    rec._dirty = True
                    rec.probe_seconds += perf_counter() - t0
                    return
            hook(module, (BatchStats(x, mean, invstd, module.eps),))  # times itself

        return batchnorm_hook

    def _make_moments_hook(self, cap: Capture, hook):
        """The probe that a compiled graph calls with the probed tensor's per-channel mean and
        variance it computed (:mod:`statscope.probes.compiled`); ``hook`` where they cannot be
        used (a mask, per-set statistics, an empty tensor, an offset too large for them)."""
        rec, lock, block_steps, perf_counter = self, self._lock, self.block_steps, time.perf_counter

        def moments_hook(module, x, packed):
            if not rec._on or rec._skip or not (module.training or rec.record_eval) \
                    or _in_backward() != -1 or (rec._quiet and not _grad_enabled()):
                return
            t0 = perf_counter()
            with lock:
                if rec._slot >= block_steps:  # a forward that bypassed the root
                    rec._dispatch()
                if rec._mask is None and cap.capture_moments(x, packed, rec._slot):
                    rec._dirty = True
                    rec.probe_seconds += perf_counter() - t0
                    return
            hook(module, (x,))  # times itself

        return moments_hook

    def _make_root_hook(self):
        """The probe at the top of the model's forward: :meth:`_root_hook` with the grad mode
        the forward runs in. In a compiled graph, which runs without autograd whatever its
        caller's mode, the mode is the one dynamo traced in (it guards on it): the operator
        calls ``by_grad_mode[mode]`` (:func:`statscope.probes.compiled.observer`)."""
        root = self._root_hook

        def root_hook(module, args, kwargs=None):
            root(module, args, kwargs, _grad_enabled())

        root_hook.by_grad_mode = {  # type: ignore[attr-defined]
            mode: lambda module, args, mode=mode: root(module, args, None, mode)
            for mode in (True, False)}
        return root_hook

    def _root_hook(self, module, args, kwargs, grad: bool):
        # A training forward: the model's, or one of a probed layer (``model.eval()`` then
        # ``model.head.train()``: fine-tuning with a frozen backbone), with autograd on
        self._quiet = not grad and not self.record_eval
        if not self._on or self._quiet or not (module.training or self.record_eval or any(
                t.module.training for t in self.targets)) or _in_backward() != -1:
            self._open = None
            return
        if self._rule == "manual":  # rec.step() ends steps
            if self._mask_of is not None and not self._dirty:  # the step's first forward
                with self._lock:
                    self._mask = self._mask_of(args, kwargs or {})
            return
        t0 = time.perf_counter()
        with self._lock:
            if self._failed is not None:
                self._discard(self._failed)
            # a step's first training forward ends the step before (under "optimizer" only
            # once the optimizer stepped: the forwards between are micro-batches)
            if self._dirty and self._rule == "optimizer" and not self._pending_end:
                self._forwards += 1  # another micro-batch of the same optimizer step
                slot = self._slot
                self._open = (slot, self._step_no, False,
                              [cap.count[slot] for cap in self.captures])
            else:
                if self._dirty:
                    self._end_step()
                self._maybe_dispatch()
                self._dirty = True
                self._forwards = 1
                self._open = (self._slot, self._step_no, True, None)
                if self._mask_of is not None:  # the step's first forward
                    self._mask = self._mask_of(args, kwargs or {})
        self.probe_seconds += time.perf_counter() - t0
        if self._say or self._worker.notices:
            self._emit()

    def _forward_raised(self) -> None:
        """The model's forward raised (an out-of-memory batch that the loop skips, a bad
        sample): what its layers captured is not a step's. The next training forward, or
        closing without an error, discards it, so a run that goes on records no layer from a
        batch that never finished; a run that this error ends keeps it (the batch it failed
        on)."""
        with self._lock:
            self._failed, self._open = self._open, None

    def _discard(self, failed: tuple) -> None:
        self._failed = None
        slot, step_no, began, had = failed
        if step_no != self._step_no or not self._dirty:
            return  # the step ended since
        for i, cap in enumerate(self.captures):
            if had is None or not had[i]:
                cap.forget(slot)
        if began:
            self._dirty, self._pending_end, self._forwards = False, False, 0
        else:
            self._forwards -= 1

    def _end_step(self) -> None:
        if self._rule == "optimizer":
            if self._first_forwards is None:
                self._first_forwards = self._forwards
            elif self._forwards != self._first_forwards and self._first_forwards > 0:
                self._say.append(Notice(
                    f"statscope: forwards per optimizer step vary ({self._first_forwards} at the "
                    f"first step, {self._forwards} at step {self.current_step}); the first "
                    "forward of each step is recorded", StatscopeWarning))
                self._first_forwards = 0  # warned once
        if not self._skip:
            self._slot += 1
        self._step_no += 1
        self._skip = self._step_no % self.every != 0
        self._mask, self._next_mask = self._next_mask, None
        self._dirty = self._logged = False
        self._pending_end = False
        self.streams.remember()

    def _maybe_dispatch(self) -> None:
        if self._rule == "undecided":
            if self._slot < self.block_steps:
                return  # a gradient-accumulation run may still show its first optimizer step
            self._decide("forward")
        if self._slot >= self.block_steps or (
                self._slot and time.monotonic() - self._last_dispatch >= self.flush_seconds):
            self._dispatch()

    def _optimizer_hook(self, optimizer, args, kwargs) -> None:
        if not self._on or not self._holds_params(optimizer):
            return
        with self._lock:
            if self._rule == "undecided":
                self._decide("optimizer")
            if self._rule == "optimizer" and self._dirty:
                self._pending_end = True

    def _holds_params(self, optimizer) -> bool:
        known = self._holds.get(id(optimizer))
        if known is not None and known[0]() is optimizer:
            return known[1]
        held = any(id(p) in self._params for g in optimizer.param_groups for p in g["params"])
        self._holds[id(optimizer)] = (weakref.ref(optimizer), held)
        return held

    def _decide(self, rule: str) -> None:
        """Fix the step rule of ``step="auto"``; the forwards so far were one optimizer step's."""
        if rule == "optimizer" and self._step_no > self._block_start:
            forwards = self._step_no - self._block_start + (1 if self._dirty else 0)
            for cap in self.captures:
                cap.rewind(1)
            self._scalars = {k: [(s, v) for s, v in vs if s == 0] for k, vs in self._scalars.items()}
            self._begin_at(self._block_start)
            self._slot, self._dirty, self._forwards = 0, True, forwards
        self._rule = rule
        self._put(Attrs({S.ATTR_STEP_RULE: rule}))

    def _take_block(self) -> Block:
        n = self._slot
        block = Block(self._block_start, n, tuple(cap.take_block(n) for cap in self.captures),
                      self._scalars, self.streams.mark(), stride=self.every)
        self._scalars = {}
        self._block_start += n * self.every
        self._slot = 0
        self._last_dispatch = time.monotonic()
        return block

    def _dispatch(self) -> None:
        block = self._take_block()
        if not self._put(block):
            self._give_back(block)

    def _put(self, msg) -> bool:
        if self._writer.put(msg):
            return True
        self._say.append(Notice(f"statscope: recording into {self.path!r} stopped: the writer "
                                f"failed ({self._writer.failure!r}); training goes on",
                                StatscopeWarning))
        if self.on_error == "raise":
            raise RecordingError(f"path={self.path!r}: recording failed "
                                 f"({self._writer.failure!r})") from self._writer.failure
        self._on = False
        return False

    def _give_back(self, block: Block) -> None:
        for pair in block.buffers():
            self.pool.give(pair)

    def _take_idle(self) -> Block | None:
        """On the writer thread: the steps that ended since the last block, read in place."""
        if not self._lock.acquire(timeout=0.05):
            return None  # the training thread is busy: it is not idle
        try:
            if not self._on or self._rule == "undecided" or not self._slot \
                    or not self._writer.queue.empty():
                return None
            n = self._slot
            scalars = {k: [(s, v) for s, v in vs if s < n] for k, vs in self._scalars.items()}
            self._scalars = {k: [(s, v) for s, v in vs if s >= n]
                             for k, vs in self._scalars.items()}
            return Block(self._block_start, n, tuple(cap.peek(n) for cap in self.captures),
                         {k: v for k, v in scalars.items() if v},
                         self.streams.mark(remembered=True), owned=False, stride=self.every)
        finally:
            self._lock.release()

    def _emit(self) -> None:
        """Emit, on this (the training) thread, the warnings both threads collected."""
        notices = self._say
        self._say = []
        if self._worker is not None:
            while self._worker.notices:
                notices.append(self._worker.notices.popleft())
        for n in notices:
            warnings.warn(n.message, n.category, stacklevel=3)

    # -- public per-step API ------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """The global step that forwards and :meth:`log` are recorded into now (with
        ``every > 1`` also a step that is not recorded)."""
        return self._step_no

    def step(self) -> None:
        """End the current step (``step="manual"`` only): the next forwards belong to the next."""
        if self._rule != "manual":
            raise StatscopeError(f"step(): the recorder counts steps itself (step="
                                 f"{self.step_mode!r}); create it with step='manual' to call step()")
        if self._on:
            with self._lock:
                self._end_step()
                self._maybe_dispatch()
            if self._say or self._writer.notices:
                self._emit()

    def mask(self, mask) -> None:
        """Set the current step's mask: which positions of the probed tensors are real.

        Args:
            mask: a tensor shaped like a probed tensor without its channel dimension, e.g. the
                ``(N, L)`` attention mask of ``(N, L, C)`` activations, true or 1 where real; or
                None. Masked positions enter no statistic of a probe it fits (per-channel or
                per-set) and ``count`` counts real elements; probes it does not fit are recorded
                whole. It holds until the step ends. See :mod:`statscope.probes.sets`.
        """
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise StatscopeError(f"mask({type(mask).__name__}): expected a tensor or None")
        mask = None if mask is None else mask.detach()
        with self._lock:
            # a step ends when the next one's first forward starts: a mask set after the last
            # forward of a step that is over in all but name is the next step's
            if self._dirty and self._rule != "manual" and (
                    self._rule != "optimizer" or self._pending_end):
                self._next_mask = mask
            else:
                self._mask = mask

    def set_attrs(self, **attrs: Any) -> None:
        """Add or update root attributes of the run (e.g. final accuracy), written in order with
        the data by the writer thread; JSON-serialisable values."""
        reserved = sorted(set(attrs) & _RESERVED_ATTRS)
        if reserved:
            raise StatscopeError(f"set_attrs({', '.join(reserved)}=...): written by statscope "
                                 "itself; choose other names")
        if self._state == "new":
            self._pending_attrs.update(attrs)
        elif self._state == "closed":
            raise StatscopeError("set_attrs(): the recorder is closed; its run is finished")
        elif self._on:
            self._put(Attrs(dict(attrs)))

    def log(self, **scalars: Any) -> None:
        """Record per-step scalars (loss, lr, ...) for the current step, without a host sync.

        Args:
            **scalars: Python numbers or one-element tensors (detached, moved to the host by the
                writer thread).
        """
        for name, value in scalars.items():
            if name not in self._scalar_names:
                check_scalar_name(name, STATISTICS)
                self._scalar_names.add(name)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise StatscopeError(f"log({name}=...): a tensor of shape "
                                         f"{tuple(value.shape)}; expected one element")
                value = value.detach() if value.ndim == 0 else value.detach().reshape(())
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                value = float(value)
            else:
                raise StatscopeError(f"log({name}={value!r}): expected a number or a "
                                     "one-element tensor")
            with self._lock:
                if not self._skip:  # a step that is not recorded keeps no scalars either
                    self._scalars.setdefault(name, []).append((self._slot, value))
                # not _dirty: a value logged before the step's first forward (the run's first
                # step, or a side thread) belongs to the step that forward then joins
                self._logged = True


def _probe_info(t: Target, path: str) -> ProbeInfo:
    return ProbeInfo(name=t.name, module=t.module_name, type=type(t.module).__name__,
                     where=t.where, channel_dim=t.channel_dim, channels=t.channels or 0,
                     groups=t.groups, norm=norm_info(t.module) if t.where == "input" else None,
                     path=path)


def _running_buffers(t: Target):
    mean, var = getattr(t.module, "running_mean", None), getattr(t.module, "running_var", None)
    if t.where != "input" or not isinstance(mean, torch.Tensor) \
            or not isinstance(var, torch.Tensor):
        return None
    if isinstance(mean, nn.parameter.UninitializedBuffer):
        return "lazy"  # materialized at the first forward, as zeros and ones
    return (mean.detach().float().cpu().numpy().reshape(-1).copy(),
            var.detach().float().cpu().numpy().reshape(-1).copy())


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


def record(model: nn.Module, path, **kwargs: Any) -> Recorder:
    """Record normalization statistics of ``model`` at every training step into a run store.

    Args:
        model: any ``torch.nn.Module`` (DDP and ``torch.compile`` wrappers are looked through;
            register before compiling: hooks added after ``torch.compile`` may not be seen).
        path: the run store, a folder or an fsspec URL. Under ``torch.distributed`` with several
            ranks each rank writes ``path/rank{r}`` (or ``path`` with ``{rank}`` filled in).

    Keyword Args:
        layers: which modules: None (inputs of every norm layer; else outputs of Linear/Conv),
            qualified names, globs or module types.
        where: ``"input"``, ``"output"`` or both.
        channel_dim: channel dimension for all probes or per name/glob/type.
        en_groups: EN groups for all probes or per name/glob/type (default 1, the whole layer).
        stats: statistic names (default bn_mean, bn_std, en_mean, en_std; add ``"bn_kurt"``).
        meta: user metadata stored in attrs (``batch_size``, ``seed``, ...).
        overwrite: replace an existing run; resume: continue one after its last committed step.
        step: what one recorded step is: ``"auto"`` (default), ``"optimizer"``, ``"forward"`` or
            ``"manual"`` (call ``rec.step()``); see :mod:`statscope.probes.recorder`.
        record_eval: also record eval-mode forwards and forwards of the model without autograd
            (``torch.no_grad``, ``torch.inference_mode``).
        block_steps: steps buffered on the device before one hand-over to the writer thread.
        raw_bytes: the largest buffer of one probe; larger tensors are reduced every step.
        buffer_bytes: the most bytes of buffers held per device, over all probes.
        flush_seconds: the longest a step that ended waits before it reaches the store, also
            while training is idle.
        chunk_steps: rows per shard in the store (default: chosen from the layout's width).
        neurons: which channels keep per-step columns, for all probes or per name/glob/type:
            ``"all"`` (default), k (the first k), ``("random", k)`` or ``("random", k, seed)``.
            Every channel still enters the EN statistics and the window summaries.
        mask: a function of the model's forward arguments ``(args, kwargs)`` that returns the
            step's mask, e.g. ``lambda args, kwargs: kwargs["attention_mask"]`` (or call
            ``rec.mask(tensor)`` at each step); see :meth:`Recorder.mask`.
        every: record one step in ``every`` (steps whose number is a multiple of it); the
            ``step`` coordinate keeps the true step numbers, scalars of other steps are dropped.
        window_steps: W of the window summaries kept while recording (exact mean and std of
            every statistic of every channel per W steps; see ``open_windows``); None for none.
        storage_options: fsspec options for a URL ``path`` (endpoint, credentials); by default
            fsspec's own sources (``AWS_*`` variables, ``~/.aws``, ``fsspec.config``).
        mechanism: ``"forward"`` (wrap the modules' ``forward``; fastest) or ``"hooks"`` (forward
            hooks, e.g. for TorchScript modules); see :mod:`statscope.probes.attach`.
        writer: where the store is written: ``"process"`` (a child process, so that the
            writing never takes the training's GIL; see :mod:`statscope.writer_process`),
            ``"thread"`` (the writer thread itself), or ``"auto"`` (default: the
            ``STATSCOPE_WRITER`` environment variable, else a process for every store but
            ``memory://``).
        on_error: when the store cannot be written (a full disk): ``"stop"`` (default: recording
            stops with a warning, training goes on, ``close()`` raises ``RecordingError``) or
            ``"raise"`` (the next step raises ``RecordingError`` into training).

    Returns:
        A :class:`Recorder`, to use as a context manager.

    Raises:
        StatscopeError: bad arguments; StoreError: an existing store without overwrite/resume;
        StoreLockedError (at start): another writer holds the run.

    Example:
        >>> import torch, statscope
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
        >>> with statscope.record(model, "/tmp/statscope-doctest", overwrite=True) as rec:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(16, 8)).square().mean()
        ...         rec.log(loss=loss)
        >>> statscope.open_run("/tmp/statscope-doctest").sizes["step"]
        3
    """
    return Recorder(model, path, **kwargs)
