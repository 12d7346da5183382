"""Per-probe buffering of a block of steps, on the tensor's device.

The hot path is :meth:`Capture.capture`, called once per step and probe. It does one of three
things, chosen per probe and tensor shape:

- ``raw``: copy the tensor into a slot of a (K, ..., C) buffer from the pool (one ``copy_``);
  the writer thread reduces the block in one batched pass. For small tensors on the CPU, where
  a reduction's cost is per operation. (Keeping references to the tensors instead was measured
  slower: it defeats the allocator's reuse of activation memory.)
- ``refs``, the generic path: reduce the tensor at once to an *entry* of a few (C,) tensors
  (:func:`statscope.probes.reduce.step_entry`) and keep a reference to it: on CUDA always (one
  kernel, no copy), elsewhere for tensors too large to hold K times within ``raw_bytes``, when
  the pool's budget is spent, and for probes whose shape keeps changing (more than
  ``MAX_SHAPES_PER_BLOCK`` shapes in one block: dynamic padding), which then stay in this mode
  for the rest of the run.
- ``refs``, the BatchNorm fast path: keep references to the mean and inverse std that a
  training-mode BatchNorm computed itself (:mod:`statscope.probes.fastpath`); no kernel (on the
  CPU, one sum for the mean while the writer thread sees |mean|/std large enough to need it:
  :func:`statscope.probes.reduce.batchnorm_entry`).

When a block is handed over (:meth:`Capture.take_block`, on the training thread), a ``refs``
segment whose rows all hold CPU entries of one kind is stacked into a few (rows, C) tensors
(:class:`statscope.probes.reduce.StackedRun`): a handful of C calls there, where the writer
thread's Python would hold the GIL for a loop over every row and free the rows' small tensors
one by one while the training thread waits for it after each kernel.

None of them syncs with the device or loops over neurons. A change of shape closes the current
raw segment of the block and opens another, so nothing is lost or mixed (entries carry what they
need, so a ``refs`` segment stays open). An empty tensor (a zero-size batch) is not recorded: the
step's count stays 0 for this probe.
"""

from __future__ import annotations

import numpy as np
import torch

from statscope.errors import StatscopeError
from statscope.probes.fastpath import BatchStats
from statscope.probes.nested import flat_nested
from statscope.probes.pool import BufferPool, Pair
from statscope.probes.reduce import (StackedRun, batchnorm_entry, batchnorm_kind,
                                     reduce_before_advice, stack_entries, step_entry)
from statscope.probes.segments import BnRows, Segment, readable, stack_segment
from statscope.probes.selection import Target
from statscope.probes.sets import mask_weights, masked_entry, set_entry
from statscope.entries import ENTRY_MOMENTS
from statscope.rows import mean_needs_sum

__all__ = ["Capture", "MAX_SHAPES_PER_BLOCK"]

_FULL = (torch.float32, torch.float64)
MAX_SHAPES_PER_BLOCK = 3
"""Shapes one probe may take within one block before it reduces every step at once for good."""


def _input_key(x: torch.Tensor, invstd: torch.Tensor) -> tuple:
    """What :func:`statscope.probes.reduce.batchnorm_kind` and the entry of a BatchNorm input
    depend on: its shape, strides, dtype and device, and the dtype of BatchNorm's statistics."""
    return x.shape, x.stride(), x.dtype, x.get_device(), invstd.dtype


class Capture:
    """Buffers one probe's tensor for a block of ``block_steps`` steps.

    Owned by the training thread (or by whichever thread holds the recorder's lock).

    Args:
        target: what to probe.
        block_steps: K, the steps per block.
        raw_bytes: the largest raw buffer (K × tensor) to hold; beyond it, reduce every step.
        order: the highest central moment the recorded statistics need (2 or 4).
        pool: where buffers come from and go back to.
        sets: also keep the per-set statistics of each step (:mod:`statscope.probes.sets`).
    """

    def __init__(self, target: Target, block_steps: int, raw_bytes: int, order: int,
                 pool: BufferPool, sets: bool = False):
        self.target = target
        self.channels = target.channels
        self.block_steps = block_steps
        self.raw_bytes = raw_bytes
        self.order = order
        self.pool = pool
        self.count = [0] * block_steps
        self.segments: list[Segment] = []
        self.sets: list | None = [None] * block_steps if sets else None
        self.always_moments = False
        # Set by the writer thread after each block it files, read here at each step: whether
        # this probe's BatchNorm mean needs an extra sum on the CPU (reduce.batchnorm_entry).
        # Advice only: either value records a correct mean while |mean|/std stays as it was.
        self.sum_bn_mean = True
        # Whether this probe decides sum_bn_mean itself at each hand-over (CPU BatchNorm
        # probes, from the block's stacked statistics: _advise_mean), so that the writer's
        # advice leaves it alone
        self.own_mean_advice = False
        # The writer's advice for sum_bn_mean (set by the writer thread), taken at the next
        # hand-over by a probe that does not decide itself: a switch at whatever step the
        # advice arrived would make two runs of one seed differ there
        self.mean_advice: bool | None = None
        # (mean, var, count) of the last (up to eight) rows of BatchNorm's own CPU statistics
        # handed over, for _advise_mean; None after rows of another kind
        self._recent: tuple | None = None
        # Also advice, read at each step: whether this BatchNorm probe reduces its input itself
        # instead of keeping BatchNorm's statistics, because a channel's variance fell far
        # below the layer's eps, where 1/invstd² − eps loses the variance's digits. False until
        # the writer says otherwise, so that a run whose channels stay clear of eps records the
        # same bits whenever the advice arrives (a resumed run equals the uninterrupted one).
        self.reduce_bn = False
        # Whether the writer gave its advice yet. Until then the first step of each kind of
        # input and block (:meth:`capture`; not the hot path) makes the writer's tests itself
        # (reduce.reduce_before_advice), so that a layer far from zero or near eps from the
        # start is right from its first step.
        self.advised = False
        self.bn_eps: float | None = None  # the eps of the BatchNorm whose statistics come here
        # Whether the C++ probe files this BatchNorm probe's steps (statscope.probes.hooks):
        # its CPU segments then hold their rows in a BnRows buffer
        self.buffer_bn = False
        # whether the probe ran in eval mode within training (a frozen BatchNorm), unrecorded
        self.ran_eval = False
        self._shape = None
        self._start = 0
        self._mode = "raw"
        self._buf: Pair | None = None
        self._rows: list | None = None  # raw: the buffer's row views; refs: the entry list
        self._movedim = False
        self._per_channel = 0
        self._shapes_in_block = 0
        # (row list, input key, batchnorm_kind) of the last BatchNorm input filed in refs mode
        self._bn_memo: tuple | None = None

    def capture_bn(self, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float,
                   slot: int) -> bool:
        """:meth:`capture` of a BatchNorm's own statistics for a step without a mask, on the
        training thread's hot path: the checks that depend only on the kind of input (device,
        dtype, layout, shape) were made by the last :meth:`capture` of the same kind.

        Returns:
            True when the step is captured (or its slot already was); False when the caller
            must call :meth:`capture` with the :class:`BatchStats` (another kind of input, a new
            segment, per-set statistics, or a generic reduction).
        """
        if self.count[slot]:
            return True
        if self.reduce_bn:
            return False
        memo = self._bn_memo
        # _input_key(x, invstd) written out: a call more per probe and step measured ~1 point
        # of the FC net's step at batch size 4 (tests check that the two agree)
        if memo is None or memo[0] is not self._rows or memo[1] != (
                x.shape, x.stride(), x.dtype, x.get_device(), invstd.dtype):
            return False
        kind = memo[2]
        if kind == "own" or not self.sum_bn_mean:
            entry = ("invstd", mean, invstd, eps)
        else:
            entry = batchnorm_entry(BatchStats(x, mean, invstd, eps), self._per_channel,
                                    True, kind)
            if entry is None:
                return False
        self.count[slot] = self._per_channel
        self._rows[slot - self._start] = entry
        return True

    def capture_moments(self, x: torch.Tensor, packed: torch.Tensor, slot: int) -> bool:
        """:meth:`capture` of ``x``'s per-channel moments computed already (in a compiled graph,
        :mod:`statscope.probes.compiled`), for a step without a mask: ``packed`` is the mean,
        the biased variance and a flag, (2C + 1,), on the CPU; ``x0``, the mean and the
        variance of ``x − x0``, (3C,), on other devices.

        Returns:
            True when the step is captured (or its slot already was); False when the caller
            must call :meth:`capture` with ``x`` (per-set statistics, an empty tensor, a flag
            that says a channel's offset is too large for float32 moments of ``x``).
        """
        if self.count[slot]:
            return True
        if self.sets is not None or x.numel() == 0:
            return False
        cpu = packed.is_cpu
        if cpu and packed.numpy()[-1]:  # a view of the CPU tensor: no op, no wait for the GIL
            return False
        if self._rows is None or self._mode != "refs" or x.shape != self._shape:
            self._reshape(x, slot, refs=True)
        self.count[slot] = self._per_channel
        self._rows[slot - self._start] = ("mv" if cpu else "shifted", packed)
        return True

    def capture(self, x, slot: int, mask=None) -> None:
        """Record ``x`` as this probe's tensor at ``slot`` of the block (first call wins).

        Args:
            x: the probed tensor, or the :class:`~statscope.probes.fastpath.BatchStats` of a
                BatchNorm that took the fast path.
            slot: the row of the block.
            mask: the step's mask (:mod:`statscope.probes.sets`), or None.
        """
        count = self.count
        if count[slot]:
            return
        if type(x) is not BatchStats and x.is_nested:  # its real elements, as a plain tensor
            x = flat_nested(x, self.target.channel_dim, self.target.module_name)
        if mask is not None or self.sets is not None:
            t = x.input if type(x) is BatchStats else x
            if t.numel() == 0:
                return
            w = mask_weights(t, self.target.channel_dim, mask)
            if self.sets is not None:
                self.sets[slot] = set_entry(t.detach(), self.target.channel_dim,
                                            self.target.groups, w, self.target.position_sets)
            if w is not None:  # real elements only: one masked reduction, never buffered raw
                if self._rows is None or self._mode != "refs" or t.shape != self._shape:
                    self._reshape(t, slot, refs=True)
                count[slot] = self._per_channel  # the writer takes the real count from the entry
                self._rows[slot - self._start] = masked_entry(
                    t.detach(), self.target.channel_dim, w, self.order)
                return
        if type(x) is BatchStats:
            self.bn_eps = x.eps
            # A BatchNorm run in bf16/fp16 keeps its statistics in that precision: reduce the
            # input instead, as for the third and fourth moments, which BatchNorm cannot give,
            # and for channels whose variance is near eps (reduce_bn).
            if self.order <= 2 and x.invstd.dtype in _FULL and not self.reduce_bn:
                t = x.input
                if self._rows is None or self._mode != "refs" or t.shape != self._shape:
                    if t.numel() == 0:
                        return
                    rows = self._rows
                    self._reshape(t, slot, refs=True)
                    if self._rows is not rows and self.buffer_bn and self.sets is None \
                            and x.invstd.is_cpu:  # a new segment: for the C++ probe
                        self._rows = BnRows(self.block_steps, self.channels, x.invstd.dtype,
                                            x.eps)
                kind = batchnorm_kind(t, self._per_channel)
                if self.sets is None:
                    self._bn_memo = (self._rows, _input_key(t, x.invstd), kind)
                if not self.advised and reduce_before_advice(x, kind, self.sum_bn_mean):
                    self.reduce_bn = True  # the writer's advice, taken here before it comes
                else:
                    entry = batchnorm_entry(x, self._per_channel, self.sum_bn_mean, kind)
                    if entry is not None:
                        count[slot] = self._per_channel
                        self._rows[slot - self._start] = entry
                        return
            x = x.input
        if self._rows is None or x.shape != self._shape:
            if x.numel() == 0:
                return
            self._reshape(x, slot)
        count[slot] = self._per_channel
        if self._mode == "raw":
            self._rows[slot - self._start].copy_(
                (x.movedim(self.target.channel_dim, -1) if self._movedim else x).detach())
        else:
            self._rows[slot - self._start] = step_entry(x, self.target.channel_dim, self.order)

    def _reshape(self, x: torch.Tensor, slot: int, refs: bool = False) -> None:
        t = self.target
        if x.ndim < 2 or not -x.ndim <= t.channel_dim < x.ndim:
            raise StatscopeError(
                f"layers: the {t.where} of {t.module_name!r} has shape {tuple(x.shape)}, which has "
                f"no channel dimension {t.channel_dim} beside a batch dimension; pass "
                f"channel_dim={{'{t.module_name}': DIM}} or leave this layer out")
        channels = x.shape[t.channel_dim]
        if self.channels is None:
            if channels % t.groups:
                raise StatscopeError(f"en_groups={t.groups} for {t.name!r}: its {channels} "
                                     "channels are not divisible by it")
            self.channels = channels
        elif channels != self.channels:
            other = [d for d in range(1, x.ndim) if x.shape[d] == self.channels]
            hint = (f"; its dim {other[0]} has {self.channels}: pass channel_dim="
                    f"{{'{t.module_name}': {other[0]}}}" if other else "")
            raise StatscopeError(f"layers: the {t.where} of {t.module_name!r} has {channels} "
                                 f"channels along dim {t.channel_dim} (shape {tuple(x.shape)}), "
                                 f"expected {self.channels}{hint}")
        self._shape = x.shape
        self._per_channel = x.numel() // channels
        if not refs:
            self._shapes_in_block += 1
            if self._shapes_in_block > MAX_SHAPES_PER_BLOCK:
                self.always_moments = True
            itemsize = 8 if x.dtype == torch.float64 else 4
            fits = self.block_steps * x.numel() * itemsize <= self.raw_bytes
            # On CUDA a per-step reduction is one kernel that reads the tensor once, like the
            # copy it replaces, and leaves the writer thread nothing to reduce.
            refs = (not fits or self.always_moments
                    or (x.device.type == "cuda" and self.order <= 2))
        if refs and self._rows is not None and self._mode == "refs":
            return  # entries carry what they need: the open segment goes on
        if not self.close_segment(slot) and self._rows is not None:
            for pair in self._open_buffers():
                self.pool.give(pair)  # allocated but never written: reuse it, do not leak it
        self._start = slot
        self._movedim = t.channel_dim % x.ndim != x.ndim - 1
        self._mode = "refs" if refs else "raw"
        self._alloc(x.dtype, x.device)

    def _alloc(self, dtype: torch.dtype, device: torch.device) -> None:
        self._buf, self._rows = None, None
        if self._mode == "raw":
            dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self._buf = self.pool.take((self.block_steps, *self._shape_perm()), dtype, device)
            if self._buf is not None:
                self._rows = self._buf[1]
                return
            self._mode = "refs"  # the pool's budget is spent: reduce each step instead
        self._rows = [None] * self.block_steps

    def close_segment(self, stop: int) -> bool:
        """End the open segment at ``stop`` (exclusive); False when it holds no row."""
        if self._rows is None or stop <= self._start:
            return False
        self.segments.append(self._open_segment(stop))
        return True

    def _open_segment(self, stop: int) -> Segment:
        if self._mode == "raw":
            return Segment(self._start, stop, raw=self._buf)
        return Segment(self._start, stop, refs=self._rows)

    def _open_buffers(self) -> tuple[Pair, ...]:
        return (self._buf,) if self._mode == "raw" else ()

    def take_block(self, n: int, aligned: bool = True
                   ) -> tuple[np.ndarray, list[Segment], list | None]:
        """Hand over the first ``n`` slots (counts, segments, per-set entries) and start a new
        block.

        The caller guarantees that no slot from ``n`` on holds data (no step is in progress).

        Args:
            n: the rows to hand over.
            aligned: whether the block ends at a multiple of ``block_steps`` recorded steps,
                where a BatchNorm probe decides :attr:`sum_bn_mean` (:meth:`_advise_mean`);
                a block handed over early (``flush_seconds``) ends elsewhere.
        """
        self.close_segment(n)
        count, segments = np.array(self.count[:n], np.int64), self.segments
        sets = None if self.sets is None else self.sets[:n]
        self.count = [0] * self.block_steps
        self.segments = []
        if self.sets is not None:
            self.sets = [None] * self.block_steps
        self._shapes_in_block = 0
        if segments and self._is_open(segments[-1]):
            self._rows = None  # the open buffer went with the block: take a new one when needed
        self._start = 0
        stacked = [stack_segment(seg) for seg in segments]
        if self.bn_eps is not None and stacked:
            self._advise_mean(stacked, count, aligned)
        if aligned and not self.own_mean_advice and self.mean_advice is not None:
            self.sum_bn_mean = self.mean_advice
        return count, stacked, sets

    def _advise_mean(self, stacked: list[Segment], count: np.ndarray, aligned: bool) -> None:
        """Decide :attr:`sum_bn_mean` from the last rows before a multiple of ``block_steps``
        recorded steps, at the hand-over of the block that ends there, rather than when the
        writer's advice arrives or a block is handed over early: on the CPU the extra sum and
        BatchNorm's own mean differ in their last bits, and a switch at a step that depends on
        timing would make two runs of one seed differ there. The rows are the last eight of
        BatchNorm's own statistics, kept across the blocks handed over early in between
        (:attr:`_recent`). The test is the writer's (:func:`statscope.rows.mean_needs_sum`);
        rows that are not BatchNorm's own CPU statistics keep the sum, as the writer's
        advice does."""
        last = None
        for seg in stacked:
            run, counts = _own_rows(seg, count)
            last = run
            if type(run) is not StackedRun or run.tag not in ("invstd", "suminv"):
                self._recent = None  # raw rows, or entries of another kind or of several
                continue
            rows = min(len(run), 8)
            try:
                arrays = [t[-rows:].detach().numpy() for t in run.tensors]
            except RuntimeError:  # a torch.func transform's tensors, with no storage of their own
                self._recent = None
                continue
            with np.errstate(all="ignore"):
                mean, var = ENTRY_MOMENTS[run.tag](arrays, run.numbers[-rows:], 2)[:2]
            recent = (mean, var, counts[-rows:])
            if self._recent is not None:
                recent = tuple(np.concatenate([old, new])[-8:]
                               for old, new in zip(self._recent, recent))
            self._recent = recent
        if not aligned:
            return
        if type(last) is not StackedRun:
            return  # raw rows, or entries of several kinds: the writer's advice decides
        self.own_mean_advice = True
        self.sum_bn_mean = self._recent is None or mean_needs_sum(*self._recent)

    def peek(self, n: int) -> tuple[np.ndarray, list[Segment], list | None]:
        """Counts and segments of rows ``:n`` without handing the buffers over.

        For the writer thread's idle flush; the rows must be complete (steps that ended).
        """
        segments = list(self.segments)
        if self._rows is not None and n > self._start:
            segments.append(self._open_segment(n))
        clipped = [readable(c) for c in (seg.clip(0, n) for seg in segments) if c is not None]
        return (np.array(self.count[:n], np.int64), clipped,
                None if self.sets is None else self.sets[:n])

    def forget(self, slot: int) -> None:
        """Forget what was captured at ``slot`` (the open segment's rows, a forward that raised)."""
        if not self.count[slot]:
            return
        self.count[slot] = 0
        if self.sets is not None:
            self.sets[slot] = None
        if self._mode == "refs" and self._rows is not None and slot >= self._start:
            self._rows[slot - self._start] = None

    def take_first(self, slot: int, stop: int) -> None:
        """Make ``slot`` hold this probe's first capture among slots ``slot..stop-1`` (the
        forwards that turn out to be micro-batches of one optimizer step, merged into ``slot``
        by :meth:`rewind`): a layer that first ran in a later micro-batch keeps that capture,
        as under the optimizer rule from the start. Only within the open segment (the rows
        from ``slot`` on are rewound next); where a later capture lies in a closed segment
        (the input's shape changed between the micro-batches) it is left out."""
        if self.count[slot] or self._rows is None:
            return
        first = next((s for s in range(slot + 1, min(stop, self.block_steps)) if self.count[s]),
                     None)
        if first is None or first < self._start:
            return
        row = first - self._start
        if self._start > slot:  # the segment opened at ``first``: it now begins at ``slot``
            if any(seg.stop > slot for seg in self.segments):
                return
            if self._mode == "raw":
                self._rows[0].copy_(self._rows[row])
            else:
                rows = [None] * self.block_steps
                rows[0] = self._rows[row]
                self._rows = rows
            self._start = slot
        elif self._mode == "raw":
            self._rows[slot - self._start].copy_(self._rows[row])
        else:
            self._rows[slot - self._start] = self._rows[row]
        self.count[slot] = self.count[first]
        if self.sets is not None:
            self.sets[slot] = self.sets[first]

    def rewind(self, slot: int) -> None:
        """Forget what was captured at ``slot`` and after (micro-batches of one step)."""
        for i in range(slot, self.block_steps):
            self.count[i] = 0
            if self.sets is not None:
                self.sets[i] = None
        kept = []
        for seg in self.segments:
            if seg.start >= slot:
                for pair in seg.buffers():
                    self.pool.give(pair)
            else:
                kept.append(seg.clip(seg.start, slot))
        self.segments = kept
        self._start = min(self._start, slot)

    def _is_open(self, seg: Segment) -> bool:
        if self._rows is None:
            return False
        return seg.raw is self._buf if self._mode == "raw" else seg.refs is self._rows

    def _shape_perm(self) -> tuple[int, ...]:
        shape = list(self._shape)
        c = shape.pop(self.target.channel_dim)
        return (*shape, c)


def _own_rows(seg: Segment, count: np.ndarray) -> tuple:
    """A handed-over segment's rows for :meth:`Capture._advise_mean` and their counts: its
    stacked run, or, for a layer that skipped steps within it (rows without an entry, whose
    count is 0), the run of the rows it has, so that such a layer decides at the same steps as
    any other rather than by the writer's advice, whose arrival depends on timing."""
    run = seg.refs
    if type(run) is StackedRun or not isinstance(run, list):
        return run, count[seg.start:seg.stop]
    rows = run[seg.offset:seg.offset + seg.stop - seg.start]
    kept = [i for i, e in enumerate(rows) if e is not None]
    if not kept or len(rows) != seg.stop - seg.start:
        return run, count[seg.start:seg.stop]
    stacked = stack_entries([rows[i] for i in kept])
    if stacked is None:
        return run, count[seg.start:seg.stop]
    return stacked, count[[seg.start + i for i in kept]]
