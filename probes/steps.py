"""The recorder's steps and blocks: where a step ends, and blocks handed to the writer thread.

:class:`Steps` is a part of :class:`~statscope.probes.recorder.Recorder` (a mixin; the state it
reads and writes is set up in ``Recorder.__init__``). The probes (:mod:`statscope.probes.hooks`)
call it, holding ``Recorder._lock``: it ends a step (the next row of the block, or none when
``every`` skips the step), fixes the step rule of ``step="auto"``, and hands a full block, or one
whose first step has waited ``flush_seconds``, to the writer thread
(:mod:`statscope.probes.worker`). The writer thread calls :meth:`Steps._take_idle` to read the
steps that ended while training is idle.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

import statscope
from statscope import schema as S
from statscope.errors import RecordingError, StatscopeWarning
from statscope.probes.block import Block
from statscope.probes.compiled import in_graph
from statscope.probes.worker import Attrs, Notice

__all__ = ["Steps"]


class Steps:
    """The step boundary and the block hand-over of a
    :class:`~statscope.probes.recorder.Recorder` (a mixin)."""

    # Set up in Recorder.__init__. Declared here for type checkers, which would otherwise infer
    # them from this class's own assignments and find Recorder's at odds with those.
    _on: bool
    _dirty: bool
    _pending_end: bool
    _forwards: int
    _first_forwards: int | None
    _failed: tuple | None
    _mask: torch.Tensor | None
    _next_mask: torch.Tensor | None
    _last_dispatch: float
    _quiet: bool
    record_eval: bool
    _said_rootless: bool
    _skip: bool
    _held: list
    _witness: torch.nn.Parameter | None
    _witness_version: int
    _backward_seen: bool
    _group: tuple[int, int]
    _group_merges: bool

    def _begin_at(self, step: int) -> None:
        """Count steps from ``step``; the first recorded one is the next multiple of every."""
        self._step_no = step
        self._skip = step % self.every != 0
        self._block_start = -(-step // self.every) * self.every
        self._group = (step, 0)
        self._group_merges = False

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

    def _end_step(self, dispatch: bool = True) -> None:
        """End the current step; with ``dispatch``, then hand the block over if it is full or
        its first step has waited ``flush_seconds`` (:meth:`_maybe_dispatch`)."""
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
        if self.streams.devices:
            self.streams.remember()
        if dispatch:
            self._maybe_dispatch()

    def _held_back(self) -> bool:
        """Whether a probe that runs now, while a step waits for its end or is one that
        ``every=`` leaves out, records nothing. Where the optimizer stepped and no forward of
        the model began the next step, the probe begins it (:meth:`_rootless_begin`), as it
        does where a backward ran since and its gradients were discarded (a step that
        ``GradScaler`` skipped; the model's forward resets ``_backward_seen``, so this is the
        first probe after a backward of layers run without it, under the optimizer rule)."""
        if self._backward_seen:
            with self._lock:
                if self._rule == "optimizer" and self._dirty and not self._pending_end \
                        and self._grads_discarded():
                    self._pending_end = True
                self._backward_seen = False
        if self._pending_end and not self._rootless_begin():
            return True
        if self._skip:  # a left-out step is still one that the optimizer step ends
            self._dirty = True
            return True
        return False

    def _rootless_begin(self) -> bool:
        """A probe runs while the optimizer has stepped and no forward of the model began the
        next step: the layers run without the model's forward (called through another method,
        ``model.forward_features(x)``, or as submodules). The probe begins the next step, as
        the model's forward would have. False for a forward without autograd (validation), which
        is not recorded and begins no step."""
        graph = in_graph()
        if not graph and not self.record_eval and not torch.is_grad_enabled():
            return False
        with self._lock:
            if self._pending_end:
                self._end_step()
                self._dirty = True  # as the model's forward marks a step it begins
                if not graph:  # a compiled graph runs without autograd: it cannot say
                    self._quiet = not self.record_eval  # as the model's forward would have
                elif not self._said_rootless:
                    self._said_rootless = True
                    self._say.append(Notice(
                        "statscope: the probed layers run in a compiled function other than the "
                        "recorded model's forward: a step begins at the first of them after an "
                        "optimizer step, but a forward of it without autograd (validation) "
                        "cannot be told apart from a training one there; compile the model "
                        "itself, or pass step='manual' and call rec.step()", StatscopeWarning))
        if self._say:
            self._emit()
        return True

    def _maybe_dispatch(self) -> None:
        # Undecided, the rules agree on the steps so far while every one of them ended with its
        # gradients discarded (GradScaler skipping the first optimizer steps): they can go
        if self._rule == "undecided" and self._group_merges:
            if self._slot < self.block_steps:
                return  # a gradient-accumulation run may still show its first optimizer step
            self._decide("forward")
        if self._slot >= self._room() or (
                self._slot and time.monotonic() - self._last_dispatch >= self.flush_seconds):
            self._dispatch()

    def _room(self) -> int:
        """The rows this block holds when full: blocks end at multiples of ``block_steps``
        recorded steps, also after one handed over early (``flush_seconds``) or a resume, so
        that what a probe decides at a block's end (``Capture.take_block``) falls at the same
        steps whatever the timing."""
        return self.block_steps - (self._block_start // self.every) % self.block_steps

    def _decide(self, rule: str) -> None:
        """Fix the step rule of ``step="auto"``. Under the optimizer rule the forwards since the
        last step whose gradients were discarded (:meth:`_grads_discarded`; the run's first
        forward where there is none) were one optimizer step's micro-batches: the step of the
        first of them becomes the step in progress, with that forward's captures alone and
        every value logged since."""
        step, slot = self._group
        if rule == "optimizer" and self._step_no > step:
            forwards = self._step_no - step + (1 if self._dirty else 0)
            skip = step % self.every != 0
            keep = slot if skip else slot + 1  # a step that every= leaves out holds no row
            for cap in self.captures:
                if not skip:  # a layer first run in a later micro-batch: that capture
                    cap.take_first(slot, self._slot + 1)
                cap.rewind(keep)
            # what was logged in those forwards' steps is the merged step's, in the order it
            # was logged (or, where every= leaves that step out, no step's)
            scalars = {k: [(s, v) for s, v in vs if s < slot] for k, vs in self._scalars.items()}
            if not skip:
                later = [(self._block_start + s * self.every, k, v)
                         for k, vs in self._scalars.items() for s, v in vs if s >= slot]
                later += [held for held in self._held if held[0] > step]
                for _, k, v in sorted(later, key=lambda e: e[0]):  # stable: same step in order
                    scalars.setdefault(k, []).append((slot, v))
            self._scalars = scalars
            self._step_no, self._skip = step, skip
            self._slot, self._dirty, self._forwards = slot, True, forwards
        self._held.clear()
        self._rule = rule
        self._put(Attrs({S.ATTR_STEP_RULE: rule}))

    def _grads_discarded(self) -> bool:
        """Whether, since the model's last training forward, a backward reached a gradient
        witness (a parameter the model trains; the last one it reached) and its gradient is
        gone again without an optimizer step, the parameter as that backward left it: ``zero_grad()``
        after a step that ``GradScaler`` skipped (inf or NaN gradients), or the loop discarded
        the batch. Such a forward begins a step of its own, where one after a backward whose
        gradients are kept is a micro-batch of gradient accumulation, as is one on parameters
        changed in place since (SAM's second forward, at the weights its first step moved to).
        ``zero_grad(set_to_none=False)`` leaves zeros: not told apart."""
        witness = self._witness
        return (self._backward_seen and witness is not None and witness.grad is None
                and witness._version == self._witness_version)

    def _on_witness_grad(self, param) -> None:
        """Called by autograd after a backward accumulated a gradient witness's gradient: that
        one is the witness of this backward."""
        self._backward_seen = True
        self._witness, self._witness_version = param, param._version

    def _take_block(self) -> Block:
        n = self._slot
        aligned = n == self._room()
        block = Block(self._block_start, n,
                      tuple(cap.take_block(n, aligned) for cap in self.captures),
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
        return self._stopped()

    def _stopped(self) -> bool:
        """The writer failed: say so (or raise, ``on_error="raise"``), stop recording; False."""
        if self.on_error == "raise":
            raise RecordingError(f"path={self.path!r}: recording failed "
                                 f"({self._writer.failure!r})") from self._writer.failure
        self._say.append(Notice(f"statscope: recording into {self.path!r} stopped: the writer "
                                f"failed ({self._writer.failure!r}); training goes on",
                                StatscopeWarning))
        self._on = False
        return False

    def _give_back(self, block: Block) -> None:
        for pair in block.buffers():
            self.pool.give(pair)

    def _take_idle(self) -> Block | None:
        """On the writer thread: the steps that ended since the last block, read in place, and
        one whose ``optimizer.step()`` ran: its rows are complete, though it ends only at the next
        step's first forward (what is logged until then is its own, filed by
        :meth:`statscope.probes.worker.Filer._amend`), so that a crash while training is idle
        (an evaluation, a checkpoint) does not lose it."""
        if not self._lock.acquire(timeout=0.05):
            return None  # the training thread is busy: it is not idle
        try:
            n = self._slot + (1 if self._pending_end and not self._skip else 0)
            if not self._on or not n or not self._writer.queue.empty() \
                    or (self._rule == "undecided" and self._group_merges):
                return None
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
        level = _caller_level()
        for n in notices:
            warnings.warn(n.message, n.category, stacklevel=level)


# torch's files, statscope's and its probes' (a folder of its own in a source checkout)
_INSIDE = tuple(os.path.dirname(f) + os.sep for f in (torch.__file__, statscope.__file__, __file__))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame, counted from :meth:`Steps._emit`'s caller, that is
    neither statscope's nor torch's: the user's line that ran the model, stepped the optimizer
    or closed the recorder, which a warning should point at (not statscope's forward wrapper)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2
