"""The recorder's training-thread half: the probes' hooks and the step boundary.

:class:`Hooks` is a part of :class:`statscope.probes.recorder.Recorder`, kept apart because it
is the hot path: what runs in every probed forward (the hooks :meth:`Hooks._make_hook` and its
BatchNorm and compiled-graph variants return), at the top of every forward of the model (the
step boundary, :meth:`Hooks._root_hook`), after every optimizer step, and when a block is handed
to the writer thread. Each Python call here costs a launch-bound training step several times its
``timeit`` figure (docs/performance.md), which is why the hooks bind what they read to locals
and test the recorder's flags before anything else.
"""

from __future__ import annotations

import time
import warnings
import weakref

import torch

from statscope import schema as S
from statscope.errors import RecordingError, StatscopeWarning
from statscope.probes.block import Block
from statscope.probes.capture import Capture
from statscope.probes.fastpath import BatchStats
from statscope.probes.worker import Attrs, Notice

__all__ = ["Hooks"]

_in_backward = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled


class Hooks:
    """The probes' hooks and the step boundary of a :class:`~statscope.probes.recorder.Recorder`
    (whose state they read and write under its lock)."""

    # set by Recorder.__init__; declared here for the type checker
    _mask: torch.Tensor | None
    _next_mask: torch.Tensor | None
    _first_forwards: int | None

    def _make_hook(self, cap: Capture, path: str):
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

        if path == "batchnorm":  # the probe's path in the store (fastpath.probe_path)
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
