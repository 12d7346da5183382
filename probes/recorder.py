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

The recorder is one class in four modules: this one (arguments, the public per-step API),
:mod:`statscope.probes.lifecycle` (start and close), :mod:`statscope.probes.hooks` (the probes)
and :mod:`statscope.probes.steps` (the step boundary, blocks handed to the writer thread); its
arguments are checked in :mod:`statscope.probes.options`.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from statscope import schema as S
from statscope.errors import StatscopeError, StatscopeWarning
from statscope.probes.capture import Capture
from statscope.probes.fastpath import probe_path
from statscope.probes.hooks import Hooks
from statscope.probes.lifecycle import OPEN, Lifecycle
from statscope.probes.pool import BufferPool
from statscope.probes.neurons import check_spec
from statscope.probes.options import (STEP_MODES, check_model, check_options, positive_int,
                                     probe_info, running_buffers, scalar_of, stat_names)
from statscope.probes.selection import Target, _per_layer, check_per_layer, select, unwrap
from statscope.probes.placement import rank_path, refuse_single_run
from statscope.probes.statistics import STATISTICS, get_statistic
from statscope.probes.steps import Steps, _caller_level
from statscope.probes.streams import StreamOrder
from statscope.probes.worker import Attrs, Flush, Notice, ProbeStatic, Worker
from statscope.storage import use_options
from statscope.destination import check_path, check_scalar_name, resume_step
from statscope.writer_process import resolve_mode

__all__ = ["Recorder", "record", "rank_path", "STEP_MODES"]

_RESERVED_ATTRS = {S.ATTR_FORMAT, S.ATTR_STATUS, S.ATTR_N_STEPS, S.ATTR_LAST_STEP, S.ATTR_PROBES,
                   S.ATTR_LAYERS, S.ATTR_STATS, S.ATTR_SCALARS, S.ATTR_STEP_RULE}


class Recorder(Lifecycle, Hooks, Steps):
    """Records per-step normalization statistics of a model into a run store.

    Use it through :func:`record`, which documents the arguments. As a context manager it removes
    every probe on exit and marks the run ``completed``, or ``failed`` with the error.
    """

    def __init__(self, model: nn.Module, path, *, layers: Any = None,
                 where: str | Iterable[str] = "input", channel_dim: Any = None,
                 en_groups: int | Mapping[Any, int] = 1,
                 stats: Iterable[str] = S.DEFAULT_STATS, meta: Mapping[str, Any] | None = None,
                 overwrite: bool = False, resume: bool = False, resume_completed: bool = True,
                 step: str = "auto",
                 record_eval: bool = False, block_steps: int = 128, raw_bytes: int = 16 << 20,
                 buffer_bytes: int = 512 << 20, flush_seconds: float = 5.0,
                 chunk_steps: int | None = None, mechanism: str = "forward",
                 on_error: str = "stop",
                 neurons: Any = None, window_steps: int | None = S.DEFAULT_WINDOW_STEPS,
                 every: int = 1, mask: Callable[..., Any] | None = None,
                 storage_options: Mapping[str, Any] | None = None, writer: str = "auto"):
        check_model(model)
        check_options(overwrite=overwrite, record_eval=record_eval, step=step,
                      flush_seconds=flush_seconds, mechanism=mechanism, on_error=on_error,
                      meta=meta, mask=mask)
        self.block_steps = positive_int("block_steps", block_steps)
        self.chunk_steps = None if chunk_steps is None else positive_int("chunk_steps",
                                                                         chunk_steps)
        raw_bytes = positive_int("raw_bytes", raw_bytes, least=0)  # 0: reduce every step
        buffer_bytes = positive_int("buffer_bytes", buffer_bytes)
        stats = stat_names(stats)
        self.statistics = [get_statistic(s) for s in stats]
        self.order = max(s.order for s in self.statistics)
        self.mechanism, self.on_error, self.step_mode = mechanism, on_error, step
        self.flush_seconds = float(flush_seconds)
        self.record_eval = record_eval
        self.path, self.rank, self.world_size = rank_path(os.fspath(path))
        use_options(os.fspath(path), storage_options)
        if self.world_size > 1:
            refuse_single_run(self.path, self.world_size)
        # checked now although the writer opens the store at start()
        self._resume_at = resume_step(resume)  # the step a restarted loop continues at
        self.resume = check_path(self.path, overwrite=overwrite,
                                 resume=resume is not False) and resume is not False
        if self.resume and resume is True and self.world_size > 1:
            warnings.warn(
                f"statscope: rank {self.rank} resumes {self.path!r} after its own last committed "
                "step; ranks that stopped at different steps would then file one training step "
                "under different step numbers: pass every rank the step its checkpoint continues "
                "at (resume=step)", StatscopeWarning, stacklevel=_caller_level())
        resolve_mode(writer, self.path)  # checked now, resolved at start()
        self._writer_mode = writer
        self.overwrite = overwrite
        self.resume_completed = bool(resume_completed)
        self.model = model
        self.root = unwrap(model)
        self.targets: list[Target] = select(model, layers, where=where, channel_dim=channel_dim,
                                            en_groups=en_groups)
        self.meta = dict(meta or {})
        self.pool = BufferPool(buffer_bytes)
        self.streams = StreamOrder()
        self._mask_of = mask
        self._mask: torch.Tensor | None = None
        self._next_mask: torch.Tensor | None = None  # set by mask() for the next step
        sets = any(s.sets for s in self.statistics)
        self.captures = [Capture(t, self.block_steps, raw_bytes, self.order, self.pool, sets)
                         for t in self.targets]
        self.every = positive_int("every", every)
        if window_steps is not None:
            window_steps = positive_int("window_steps", window_steps)
        self.window_steps = window_steps
        check_per_layer(neurons, "neurons", [(t.module_name, t.module) for t in self.targets])
        specs = [_per_layer(neurons, t.module_name, t.module, None) for t in self.targets]
        for spec in specs:
            check_spec(spec)
        self._static = [ProbeStatic(probe_info(t, probe_path(t, self.order, mechanism)),
                                    running_buffers(t), spec)
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
        # whether a training forward of the model ran: layers called through another method
        # (forward_features) run without it (Steps._rootless_begin)
        self._root_ever = self._said_rootless = False
        self._func = None  # the torch.func transform of the current forward
        self._said_transform = False
        self._dirty = False  # a training forward ran in the step in progress
        self._logged = False  # a scalar was logged in it
        self._pending_end = False
        self._forwards = 0
        self._first_forwards: int | None = None
        # A parameter that the model trains, whose post-accumulate-grad hook says that a
        # backward ran (Steps._grads_discarded), and where the run's first optimizer step
        # begins: its first forward after the last step whose gradients were discarded
        # (step, slot), and whether a forward since could be a micro-batch of it
        self._witness: torch.nn.Parameter | None = None
        self._backward_seen = False
        self._witness_version = -1  # its version counter when the last backward reached it
        self._group = (0, 0)
        self._group_merges = False
        # (step, name, value) logged while undecided in a step that every= leaves out: its own
        # if the step stays one, the recorded step's whose micro-batch it turns out to be
        self._held: list[tuple[int, str, Any]] = []
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
            **scalars: Python numbers or one-element tensors. A tensor is recorded as it is at
                this call, not as a later in-place update leaves it (a running total): on the
                CPU it is read at once (a read, not a sync); on other devices copied on the
                current stream and moved to the host by the writer thread.
        """
        for name, value in scalars.items():
            if name not in self._scalar_names:
                check_scalar_name(name, STATISTICS)
                self._scalar_names.add(name)
            if isinstance(value, torch.Tensor):
                value = scalar_of(name, value)
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                value = float(value)
            else:
                raise StatscopeError(f"log({name}={value!r}): expected a number or a "
                                     "one-element tensor")
            with self._lock:
                if not self._skip:  # a step that is not recorded keeps no scalars either
                    self._scalars.setdefault(name, []).append((self._slot, value))
                elif self._rule == "undecided":  # unless it joins a recorded one (Steps._decide)
                    self._held.append((self._step_no, name, value))
                # not _dirty: a value logged before the step's first forward (the run's first
                # step, or a side thread) belongs to the step that forward then joins
                self._logged = True

    def flush(self, timeout: float = 60.0) -> bool:
        """Commit every step that ended to the store now, and return once it is committed.

        Call it before saving a checkpoint: a checkpoint of step s is then never ahead of the
        store (``resume=True`` continues from the newest checkpoint at or before the store's
        last step), and a store that shares a disk with the checkpoint writes before it does.
        Under the optimizer rule the step whose ``optimizer.step()`` ran is committed too;
        what is logged after this call (an evaluation's accuracy) still joins it.

        Args:
            timeout: the longest wait in seconds; recording goes on after it either way.

        Returns:
            True when the store holds every step that ended; False when the writer failed (as
            at any put, a warning, or :class:`RecordingError` with ``on_error="raise"``) or
            did not finish within ``timeout`` (a warning).
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout > 0:
            raise StatscopeError(f"flush(timeout={timeout!r}): expected a positive number of "
                                 "seconds")
        if self._state == "new":
            raise StatscopeError("flush(): the recorder is not started; use it as a context "
                                 "manager or call start()")
        if self._state == "closed":
            return True  # close() committed everything
        if not self._on:
            return False
        done = threading.Event()
        committed = self._put(Flush(done))
        deadline = time.monotonic() + timeout
        while committed and not done.wait(0.05):
            if not self._writer.alive:
                committed = False
            elif time.monotonic() >= deadline:
                committed = False
                self._say.append(Notice(
                    f"statscope: flush(timeout={timeout}): the store {self.path!r} did not "
                    "commit within the timeout; recording goes on", StatscopeWarning))
        if committed and self._writer.failure is not None:
            committed = self._stopped()
        if self._say or self._writer.notices:
            self._emit()
        return committed


def open_recorders() -> list[Recorder]:
    """The recorders of this process that started and are not closed yet, oldest first: the
    way back to one whose handle is lost (a notebook cell run again, which then finds its run
    held: :class:`~statscope.StoreLockedError`).

    Example:
        >>> for rec in statscope.open_recorders():  # doctest: +SKIP
        ...     rec.close()
    """
    return list(OPEN)


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
        overwrite: replace an existing run; resume: continue one, ``True`` after its last
            committed step, an int at that step (the loop restarted from its checkpoint there:
            the run's rows from that step on are dropped; with no run yet, its steps start there).
        resume_completed: resuming, continue a run that is ``completed`` (default); False
            refuses one (StoreError when the recorder starts and takes the run's lease, nothing
            changed), as ``statscope run --resume`` does.
        step: what one recorded step is: ``"auto"`` (default), ``"optimizer"``, ``"forward"`` or
            ``"manual"`` (call ``rec.step()``); see :mod:`statscope.probes.recorder`.
        record_eval: also record eval-mode forwards and forwards of the model without autograd
            (``torch.no_grad``, ``torch.inference_mode``).
        block_steps: steps buffered on the device before one hand-over to the writer thread.
        raw_bytes: the largest buffer of one probe; larger tensors are reduced every step.
        buffer_bytes: the most bytes of buffers held per device, over all probes.
        flush_seconds: the longest a step that ended waits before it reaches the store, also
            while training is idle.
        chunk_steps: rows per shard in the store (default: chosen from the layout's width; a
            resumed run keeps its own).
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
            A resumed run goes on with its own W (another one asked for warns), as with
            ``chunk_steps``.
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
    from statscope.storage import store_errors

    with store_errors(path):
        return Recorder(model, path, **kwargs)
