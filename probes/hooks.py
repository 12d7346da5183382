"""The recorder's probes: the functions torch calls while the model trains.

:class:`Hooks` is a part of :class:`~statscope.probes.recorder.Recorder` (a mixin; the state
it reads and writes is set up in ``Recorder.__init__``). It makes the hook of each probed tensor
(with the BatchNorm fast path's and the compiled graph's variants of it), the hook on the root
module's forward that ends the step before when a step's first training forward begins, and the
hook torch calls after every optimizer step. These are the hot path: each call is timed into
``Recorder.probe_seconds``, does no host-device synchronisation and holds ``Recorder._lock`` for
a few microseconds. What a step's end does is :mod:`statscope.probes.steps`.
"""

from __future__ import annotations

import time
import weakref

import torch

from statscope.errors import StatscopeWarning
from statscope.native import kernels
from statscope.native import status as native_status
from statscope.probes import functorch
from statscope.probes.capture import Capture
from statscope.probes.fastpath import (BatchStats, native_dims, native_forward_is_exact,
                                       probe_path)
from statscope.probes.worker import Notice

__all__ = ["Hooks"]

_in_backward = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled
_transform_level = functorch.level


def _install_native(rec, cap: Capture, cell: list, fallback, building: list,
                    transformed: bool = False) -> None:
    """Put the C++ BatchNorm probe into ``cell[0]``, and the C++ training forward with it into
    ``cell[1]`` where it is exact (:func:`~statscope.probes.fastpath.native_forward_is_exact`),
    once the kernels are built (the build runs in the background:
    :func:`statscope.native.kernels`); ``building[0]`` False once that is decided either way.
    Not under a ``torch.func`` transform (``transformed``): the check runs a forward and a
    backward of its own."""
    native = kernels(wait=False)
    if native is not None and not transformed:
        cap.buffer_bn = True
        cell[0] = native.make_bn_probe(rec, cap, fallback)
        dims = native_dims(cap.target.module)
        if dims is not None and native_forward_is_exact(native):
            cell[1] = native.make_bn_forward(rec, cap, fallback, dims)
        building[0] = False
    elif native is None and native_status() != "not loaded yet":  # off, or the build failed
        building[0] = False


class Hooks:
    """The probes of a :class:`~statscope.probes.recorder.Recorder` (a mixin)."""

    # Set up in Recorder.__init__. Declared here for type checkers, which would otherwise infer
    # them from this class's own assignments and find Recorder's at odds with those.
    _dirty: bool
    _pending_end: bool
    _forwards: int
    _func: str | None
    _said_transform: bool
    _root_ever: bool
    _open: tuple | None
    _failed: tuple | None
    _backward_seen: bool
    _group: tuple[int, int]
    _group_merges: bool
    _held: list

    # -- hot path -----------------------------------------------------------------------------

    def _make_hook(self, cap: Capture):
        rec = self

        def hook(module, args, output=None):
            if not rec._on or _in_backward() != -1 or (rec._quiet and not _grad_enabled()):
                return
            if not (module.training or rec.record_eval):
                cap.ran_eval = True  # a frozen BatchNorm, say: named if it never trains
                return
            if rec._func is not None:  # inside a torch.func transform
                rec._under_transform(hook, module, args if output is None else (output,))
                return
            if (rec._pending_end or rec._skip or rec._backward_seen) and rec._held_back():
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

    def _make_batchnorm_hook(self, cap: Capture, hook) -> list:
        """The probe that the BatchNorm fast path calls after a training-mode forward with the
        statistics BatchNorm computed, as ``[probe, forward]``, which the fast path reads at each
        call (:func:`~statscope.probes.fastpath.batchnorm_forward`): ``hook`` with less Python
        (see :meth:`Capture.capture_bn`), replaced by the C++ probe and joined by the C++
        training forward (``statscope/csrc/bn_probe.cpp``) once :mod:`statscope.native` is
        built. Those take the common case in one C call and call this one for every other:
        each Python call is what this probe costs a launch-bound training step."""
        rec, lock, block_steps, perf_counter = self, self._lock, self.block_steps, time.perf_counter
        cell: list = []
        building = [True]

        def batchnorm_hook(module, x, mean, invstd):
            if building[0]:
                _install_native(rec, cap, cell, batchnorm_hook, building,
                                _transform_level() is not None)
            if not rec._on or _in_backward() != -1 or (rec._quiet and not _grad_enabled()):
                return
            if rec._func is not None:  # inside a torch.func transform
                rec._under_transform(batchnorm_hook, module, (x, mean, invstd), spread=True)
                return
            if (rec._pending_end or rec._skip or rec._backward_seen) and rec._held_back():
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

        cell.extend((batchnorm_hook, None))
        _install_native(rec, cap, cell, batchnorm_hook, building)
        return cell

    def _make_moments_hook(self, cap: Capture, hook):
        """The probe that a compiled graph calls with the probed tensor's per-channel mean and
        variance it computed (:mod:`statscope.probes.compiled`); ``hook`` where they cannot be
        used (a mask, per-set statistics, an empty tensor, an offset too large for them)."""
        rec, lock, block_steps, perf_counter = self, self._lock, self.block_steps, time.perf_counter

        def moments_hook(module, x, packed):
            if not rec._on or _in_backward() != -1 or (rec._quiet and not _grad_enabled()):
                return
            if not (module.training or rec.record_eval):
                cap.ran_eval = True
                return
            if (rec._pending_end or rec._skip or rec._backward_seen) and rec._held_back():
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
        """The probe at the top of the model's forward, called with the module and its arguments;
        ``grad`` is the grad mode the forward runs in (read when not given). In a compiled graph,
        which runs without autograd whatever its caller's mode, the mode is the one dynamo
        traced in (it guards on it): the operator calls ``by_grad_mode[mode]``
        (:func:`statscope.probes.compiled.observer`). One function, not a method behind a
        wrapper: it runs once per training step."""

        def root_hook(module, args, kwargs=None, grad=None):
            if grad is None:
                grad = _grad_enabled()
            # A training forward: the model's, or one of a probed layer (``model.eval()`` then
            # ``model.head.train()``: fine-tuning with a frozen backbone), with autograd on
            self._quiet = not grad and not self.record_eval
            self._func = func = None if _transform_level() is None else functorch.kind()
            if not self._on or self._quiet or not (module.training or self.record_eval or any(
                    t.module.training for t in self.targets)) or _in_backward() != -1:
                self._open = None
                return
            if func is not None and func != "grad":
                self._not_transformed(func)
                if self._say:
                    self._emit()
                return
            if self._rule == "manual":  # rec.step() ends steps
                if self._mask_of is not None and not self._dirty:  # the step's first forward
                    with self._lock:
                        self._mask = self._mask_from(args, kwargs)
                return
            t0 = time.perf_counter()
            with self._lock:
                if self._failed is not None:
                    self._discard(self._failed)
                # a step's first training forward ends the step before (under "optimizer" only
                # once the optimizer stepped or the gradients were discarded: the forwards
                # between are micro-batches)
                discarded = False
                if self._dirty and not self._pending_end and self._rule != "forward":
                    discarded = self._grads_discarded()
                    if self._rule == "undecided":
                        if not discarded:
                            self._group_merges = True  # micro-batches, if an optimizer steps
                        elif self._group_merges:  # micro-batches, then a step GradScaler skipped
                            self._decide("optimizer")
                self._backward_seen = False
                if self._dirty and self._rule == "optimizer" and not self._pending_end \
                        and not discarded:
                    self._forwards += 1  # another micro-batch of the same optimizer step
                    slot = self._slot
                    self._open = (slot, self._step_no, False,
                                  [cap.count[slot] for cap in self.captures])
                else:
                    if self._dirty:
                        self._end_step()  # and hands the block over when it is due
                    else:
                        self._maybe_dispatch()
                    self._dirty = True
                    self._forwards = 1
                    if discarded:  # the forwards of the run's first optimizer step begin here
                        self._group, self._group_merges = (self._step_no, self._slot), False
                        self._held.clear()  # logged in steps that ended, left out by every=
                    self._open = (self._slot, self._step_no, True, None)
                    if self._mask_of is not None:  # the step's first forward
                        self._mask = self._mask_from(args, kwargs)
                self._root_ever = True
            self.probe_seconds += time.perf_counter() - t0
            if self._say or self._worker.notices:
                self._emit()

        root_hook.by_grad_mode = {  # type: ignore[attr-defined]
            mode: lambda module, args, mode=mode: root_hook(module, args, None, mode)
            for mode in (True, False)}
        return root_hook

    def _mask_from(self, args, kwargs):
        mask = self._mask_of(args, kwargs or {})
        return mask if self._func is None else functorch.unwrap(mask)

    def _under_transform(self, probe, module, args, spread: bool = False) -> None:
        """Call ``probe(module, args)`` (``probe(module, *args)`` with ``spread``) on the plain
        tensors inside a ``torch.func`` transform's wrappers, with functorch's dispatch off
        (:mod:`statscope.probes.functorch`); not under ``vmap``, whose forwards are not
        recorded."""
        func = self._func
        if func != "grad":
            return
        plain = tuple(functorch.unwrap(a) for a in args)
        if any(p is None for p in plain):
            return
        self._func = None
        try:
            with functorch.plain():
                probe(module, *plain) if spread else probe(module, plain)
        finally:
            self._func = func

    def _not_transformed(self, func: str) -> None:
        """A forward under ``vmap`` (or ``functionalize``): not a step, and no probe records
        it; said once."""
        self._open = None
        if not self._said_transform:
            self._said_transform = True
            self._say.append(Notice(
                f"statscope: forwards of the model under torch.func's {func} are not recorded "
                "(a probed tensor there holds several forwards, each normalized on its own); "
                "forwards under grad, vjp and jvp are", StatscopeWarning))

    def _forward_raised(self) -> None:
        """The model's forward raised (an out-of-memory batch that the loop skips, a bad
        sample): what its layers captured is not a step's. The next training forward, or
        closing without an error, discards it, so a run that goes on records no layer from a
        batch that never finished; a run that this error ends keeps it (the batch it failed
        on)."""
        with self._lock:
            self._failed, self._open = self._open, None

    def _optimizer_hook(self, optimizer, args, kwargs) -> None:
        if not self._on:
            return
        known = self._holds.get(id(optimizer))
        if not (known[1] if known is not None and known[0]() is optimizer
                else self._holds_params(optimizer)):
            return
        with self._lock:
            if self._rule == "undecided":
                self._decide("optimizer")
            if self._rule == "optimizer" and self._dirty:
                self._pending_end = True

    def _holds_params(self, optimizer) -> bool:
        """Whether ``optimizer`` steps a parameter of the model, remembered per optimizer (a
        weak reference: an id may be reused once the optimizer is gone)."""
        held = any(id(p) in self._params for g in optimizer.param_groups for p in g["params"])
        self._holds[id(optimizer)] = (weakref.ref(optimizer), held)
        return held
