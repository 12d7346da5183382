"""The recorder: hooks on a model, blocks of steps, a background writer thread.

Per training step the main thread only copies each probed tensor into a device buffer (see
:mod:`statscope.probes.capture`). Every ``block_steps`` steps, or every ``flush_seconds``, it hands
the block to a worker thread, which computes the moments in one batched pass, finishes the
statistics in float64 and appends them to the run store. The main thread never waits on the
device; it waits on the worker only when the worker is two blocks behind.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from statscope import schema as S
from statscope.errors import NonFiniteWarning, StatscopeError, StatscopeWarning
from statscope.probes.attach import MECHANISMS, attach
from statscope.probes.block import Block, block_rows
from statscope.probes.capture import BufferPool, Capture
from statscope.probes.selection import Target, norm_info, select, unwrap
from statscope.probes.statistics import STATISTICS, get_statistic
from statscope.store import Layout, ProbeInfo, read_attrs
from statscope.writer import RunWriter, check_path, check_scalar_name

__all__ = ["Recorder", "record"]

_in_backward = torch._C._current_graph_task_id
_LAZY = "lazy"  # a lazy norm layer's running buffers before its first forward


def _rank_path(path: str) -> tuple[str, int, int]:
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "{rank}" in path:
        return path.format(rank=rank), rank, world
    if world > 1:
        return os.path.join(path, f"rank{rank}"), rank, world
    return path, rank, world


class Recorder:
    """Records per-step normalization statistics of a model into a run store.

    Use it through :func:`record`, which documents the arguments. As a context manager it removes
    every hook on exit and marks the run ``completed``, or ``failed`` with the error.
    """

    def __init__(self, model: nn.Module, path, *, layers: Any = None,
                 where: str | Iterable[str] = "input", channel_dim: Any = None,
                 en_groups: int | Mapping[Any, int] = 1,
                 stats: Iterable[str] = S.DEFAULT_STATS, meta: Mapping[str, Any] | None = None,
                 overwrite: bool = False, resume: bool = False, step: str = "auto",
                 record_eval: bool = False, block_steps: int = 128, raw_bytes: int = 16 << 20,
                 flush_seconds: float = 5.0, chunk_steps: int = 8192,
                 mechanism: str = "forward"):
        if not isinstance(model, nn.Module):
            raise StatscopeError(f"model={type(model).__name__}: expected a torch.nn.Module")
        if step not in ("auto", "manual"):
            raise StatscopeError(f"step={step!r}: expected 'auto' (one step per training forward "
                                 "of the model) or 'manual' (call rec.step())")
        for name, value in (("block_steps", block_steps), ("chunk_steps", chunk_steps)):
            if not isinstance(value, int) or value < 1:
                raise StatscopeError(f"{name}={value!r}: expected a positive int")
        if mechanism not in MECHANISMS:
            raise StatscopeError(f"mechanism={mechanism!r}: expected one of {MECHANISMS}")
        self.mechanism = mechanism
        stats = tuple(dict.fromkeys(stats))
        self.statistics = [get_statistic(s) for s in stats]
        self.order = max(s.order for s in self.statistics)
        self.path, self.rank, self.world_size = _rank_path(os.fspath(path))
        # checked now although the store may be created only when the first block is written
        self.resume = check_path(self.path, overwrite=overwrite, resume=resume) and resume
        self.overwrite = overwrite
        self.model = model
        self.root = unwrap(model)
        self.targets: list[Target] = select(model, layers, where=where, channel_dim=channel_dim,
                                            en_groups=en_groups)
        self.meta = dict(meta or {})
        self.manual = step == "manual"
        self.record_eval = record_eval
        self.block_steps = block_steps
        self.flush_seconds = flush_seconds
        self.chunk_steps = chunk_steps
        self.pool = BufferPool()
        self.captures = [Capture(t, block_steps, raw_bytes, self.order, self.pool)
                         for t in self.targets]
        self._norm = [norm_info(t.module) if t.where == "input" else None for t in self.targets]
        self._running0 = [self._running_buffers(t) for t in self.targets]
        self._handles: list = []
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._worker: threading.Thread | None = None
        self._writer: RunWriter | None = None
        self._failure: BaseException | None = None
        self._warned_nonfinite = False
        self._slot = 0
        self._dirty = False
        self._on = False
        self._scalars: dict[str, list[tuple[int, Any]]] = {}
        self._scalar_names: set[str] = set()
        self._block_start = 0
        self.probe_seconds = 0.0
        self._t_start = None
        self.closed = False

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(None if exc is None else f"{exc_type.__name__}: {exc}")

    def start(self) -> "Recorder":
        """Register the hooks and start the writer thread."""
        if self.resume:
            last = read_attrs(self.path).get(S.ATTR_LAST_STEP)
            self._block_start = 0 if last is None else int(last) + 1
        if all(c.channels is not None for c in self.captures):
            self._open_writer()  # fail now, not a block later, and show the run while it starts
        for cap in self.captures:
            self._handles.append(attach(cap.target.module, self._make_hook(cap), cap.target.where,
                                        self.mechanism))
        if not self.manual:
            self._handles.append(attach(self.root, self._root_hook, "input", self.mechanism))
        self._worker = threading.Thread(target=self._work, name="statscope-writer", daemon=True)
        self._worker.start()
        self._last_dispatch = time.monotonic()
        self._t_start = time.perf_counter()
        self._on = True
        return self

    def close(self, error: str | None = None) -> None:
        """Remove the hooks, write what is buffered, and mark the run completed or failed."""
        if self.closed or self._worker is None:  # closed already, or never started
            return
        self.closed = True
        self._on = False
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        if self._dirty:
            self._slot += 1
            self._dirty = False
        self._dispatch()
        self._queue.put(None)
        self._worker.join()
        wall = time.perf_counter() - self._t_start
        try:
            writer = self._writer or self._open_writer()
            busy = max(wall - self.probe_seconds, 1e-9)
            writer.set_attrs(**{S.ATTR_PROBE_SECONDS: self.probe_seconds,
                                S.ATTR_PROBE_OVERHEAD: self.probe_seconds / busy})
            if self._failure is not None and error is None:
                error = f"writer: {self._failure!r}"
            writer.close(S.STATUS_FAILED if error else S.STATUS_COMPLETED, error)
        except Exception as exc:  # never hide the training error behind a store error
            if error is None and self._failure is None:
                raise
            warnings.warn(f"statscope: could not finish the store at {self.path!r}: {exc!r}",
                          StatscopeWarning, stacklevel=2)

    # -- hot path -----------------------------------------------------------------------------

    def _make_hook(self, cap: Capture):
        rec = self

        def hook(module, args, output=None):
            if not rec._on or not (module.training or rec.record_eval) or _in_backward() != -1:
                return
            t0 = time.perf_counter()
            x = args[0] if output is None else output
            if isinstance(x, torch.Tensor):
                cap.capture(x, rec._slot)
                rec._dirty = True
            rec.probe_seconds += time.perf_counter() - t0

        return hook

    def _root_hook(self, module, args):
        if not self._on or not (module.training or self.record_eval) or _in_backward() != -1:
            return
        if self._dirty:
            t0 = time.perf_counter()
            self._end_step()
            self.probe_seconds += time.perf_counter() - t0
        self._dirty = True

    def _end_step(self) -> None:
        self._slot += 1
        if (self._slot == self.block_steps
                or time.monotonic() - self._last_dispatch >= self.flush_seconds):
            self._dispatch()

    def _dispatch(self) -> None:
        n = self._slot
        self._last_dispatch = time.monotonic()
        if n == 0:
            return
        parts = [cap.take_block(n) for cap in self.captures]
        block = Block(self._block_start, n, parts, self._scalars)
        self._scalars = {}
        self._block_start += n
        self._slot = 0
        if self._failure is None:
            self._queue.put(block)

    # -- public per-step API ------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """The global step that forwards and :meth:`log` are recorded into now."""
        return self._block_start + self._slot

    def step(self) -> None:
        """End the current step (``step="manual"`` only): the next forwards belong to the next."""
        if not self.manual:
            raise StatscopeError("step(): the recorder counts steps itself (step='auto'); "
                                 "create it with step='manual' to call step()")
        if self._on:
            self._end_step()
            self._dirty = False

    def set_attrs(self, **attrs: Any) -> None:
        """Add or update root attributes of the run (e.g. final accuracy), written in order with
        the data by the writer thread; JSON-serialisable values."""
        reserved = sorted(set(attrs) & {S.ATTR_FORMAT, S.ATTR_STATUS, S.ATTR_N_STEPS,
                                         S.ATTR_LAST_STEP, S.ATTR_PROBES, S.ATTR_LAYERS,
                                         S.ATTR_STATS, S.ATTR_SCALARS})
        if reserved:
            raise StatscopeError(f"set_attrs({', '.join(reserved)}=...): written by statscope "
                                 "itself; choose other names")
        self._queue.put(dict(attrs))

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
            elif isinstance(value, (int, float, np.number)):
                value = float(value)
            else:
                raise StatscopeError(f"log({name}={value!r}): expected a number or a "
                                     "one-element tensor")
            self._scalars.setdefault(name, []).append((self._slot, value))
        self._dirty = True

    # -- worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            if self._failure is not None:
                continue
            try:
                if isinstance(block, dict):
                    (self._writer or self._open_writer()).set_attrs(**block)
                else:
                    self._write_block(block)
            except BaseException as exc:  # the probe never interrupts training
                self._failure = exc
                warnings.warn(f"statscope: recording stopped, the writer failed: {exc!r}\n"
                              + traceback.format_exc(), StatscopeWarning, stacklevel=1)

    def _write_block(self, block: Block) -> None:
        writer = self._writer or self._open_writer()
        bad = writer.append(*block_rows(block, self.captures, self.statistics, self.order,
                                        self.pool))
        if bad and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"statscope: non-finite statistics recorded ({writer.nonfinite}); they "
                          "are stored as they are and counted in the run's attrs",
                          NonFiniteWarning, stacklevel=1)

    def _open_writer(self) -> RunWriter:
        probes, running = [], {S.RUNNING_MEAN0: [], S.RUNNING_VAR0: []}
        for cap, norm, r0 in zip(self.captures, self._norm, self._running0):
            t = cap.target
            if cap.channels is None:
                warnings.warn(f"statscope: layer {t.name!r} did not run before the first block "
                              "was written and its channels are unknown; it is left out",
                              StatscopeWarning, stacklevel=1)
                continue
            probes.append(ProbeInfo(name=t.name, module=t.module_name, type=type(t.module).__name__,
                                    where=t.where, channel_dim=t.channel_dim,
                                    channels=cap.channels, groups=t.groups, norm=norm))
            if r0 is _LAZY:
                r0 = (np.zeros(cap.channels, np.float32), np.ones(cap.channels, np.float32))
            for key, values in zip(running, r0 if r0 is not None and len(r0[0]) == cap.channels
                                   else (None, None)):
                running[key].append(np.full(cap.channels, np.nan) if values is None else values)
        self.captures = [c for c in self.captures if c.channels is not None]
        layout = Layout(tuple(probes), tuple(s.name for s in self.statistics))
        has_running = any(r is not None for r in self._running0)
        attrs = {
            S.ATTR_MODEL: f"{type(self.root).__module__}.{type(self.root).__qualname__}",
            S.ATTR_META: self.meta, S.ATTR_COMMAND: " ".join(sys.argv),
            S.ATTR_RANK: self.rank, S.ATTR_WORLD_SIZE: self.world_size,
        }
        self._writer = RunWriter(
            self.path, layout, attrs=attrs, overwrite=self.overwrite, resume=self.resume,
            chunk_steps=self.chunk_steps, flush_seconds=self.flush_seconds,
            running0={k: np.concatenate(v) for k, v in running.items()} if has_running else None)
        return self._writer

    @staticmethod
    def _running_buffers(t: Target):
        m = t.module
        if t.where != "input" or not isinstance(getattr(m, "running_mean", None), torch.Tensor) \
                or not isinstance(getattr(m, "running_var", None), torch.Tensor):
            return None
        if isinstance(m.running_mean, nn.parameter.UninitializedBuffer):
            return _LAZY  # materialized at the first forward, as zeros and ones
        return (m.running_mean.detach().float().cpu().numpy().reshape(-1).copy(),
                m.running_var.detach().float().cpu().numpy().reshape(-1).copy())


def record(model: nn.Module, path, **kwargs: Any) -> Recorder:
    """Record normalization statistics of ``model`` at every training step into a run store.

    Args:
        model: any ``torch.nn.Module`` (DDP and ``torch.compile`` wrappers are looked through;
            register before compiling: hooks added after ``torch.compile`` may not be seen).
        path: the run store, a folder or an fsspec URL. Under ``torch.distributed`` with several
            ranks each rank writes ``path/rank{r}`` (or ``path`` with ``{rank}`` filled in).
        layers: which modules: None (inputs of every norm layer; else outputs of Linear/Conv),
            qualified names, globs or module types.
        where: ``"input"``, ``"output"`` or both.
        channel_dim: channel dimension for all probes or per name/glob/type.
        en_groups: EN groups for all probes or per name/glob/type (default 1, the whole layer).
        stats: statistic names (default bn_mean, bn_std, en_mean, en_std; add ``"bn_kurt"``).
        meta: user metadata stored in attrs (``batch_size``, ``seed``, ...).
        overwrite: replace an existing run; resume: continue one after its last flushed step.
        step: ``"auto"`` (one step per training-mode forward of ``model``) or ``"manual"``
            (call ``rec.step()`` after each optimizer step; the first forward of a step counts).
        record_eval: also record eval-mode forwards.
        block_steps: steps buffered on the device before one hand-over to the writer thread.
        raw_bytes: per-probe memory for raw buffering; larger tensors are reduced every step.
        flush_seconds: the longest time data waits before it reaches the store.
        chunk_steps: chunk length along step in the store.
        mechanism: ``"forward"`` (wrap the modules' ``forward``; fastest) or ``"hooks"`` (forward
            hooks, e.g. for TorchScript modules); see :mod:`statscope.probes.attach`.

    Returns:
        A :class:`Recorder`, to use as a context manager.

    Raises:
        StatscopeError: bad arguments; StoreError: an existing store without overwrite/resume.

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
