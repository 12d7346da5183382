"""Per-probe buffering of a block of steps, on the tensor's device.

The hot path is :meth:`Capture.capture`, called once per step and probe. It does one of two
things, chosen per probe and tensor shape:

- ``raw``: copy the tensor into a slot of a (K, ..., C) buffer from the pool (one ``copy_``).
  (Keeping references to the tensors instead was measured slower: it defeats the allocator's
  reuse of activation memory.)
- ``moments``: reduce the tensor to its per-channel moments at once, into (K, C) buffers: for
  tensors too large to hold K times within ``raw_bytes``, when the pool's budget is spent, and
  for probes whose shape keeps changing (more than ``MAX_SHAPES_PER_BLOCK`` shapes in one block:
  dynamic padding), which then stay in this mode for the rest of the run.

Neither mode syncs with the device or loops over neurons; the moments of a block of K steps are
computed later in one batched pass off the training thread. A change of shape (the smaller last
batch of an epoch, a new sequence length) closes the current segment of the block and opens
another, so nothing is lost or mixed. An empty tensor (a zero-size batch) is not recorded: the
step's count stays 0 for this probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from statscope.errors import StatscopeError
from statscope.probes.pool import BufferPool, Pair
from statscope.probes.selection import Target
from statscope.probes.statistics import block_moments, step_moments

__all__ = ["Capture", "Segment", "segment_moments", "MAX_SHAPES_PER_BLOCK"]

_BATCH_BYTES = 1 << 20
MAX_SHAPES_PER_BLOCK = 3
"""Shapes one probe may take within one block before it reduces every step at once for good."""


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a block, held from row ``offset`` of a ``raw`` or ``moments``
    buffer."""

    start: int
    stop: int
    raw: Pair | None = None
    moments: tuple[Pair, ...] | None = None
    offset: int = 0

    def buffers(self) -> tuple[Pair, ...]:
        return (self.raw,) if self.raw is not None else tuple(self.moments or ())

    def clip(self, lo: int, hi: int) -> "Segment | None":
        """The part of this segment within rows ``lo:hi``, or None when they do not meet."""
        start, stop = max(self.start, lo), min(self.stop, hi)
        if start >= stop:
            return None
        return Segment(start, stop, self.raw, self.moments, self.offset + start - self.start)


class Capture:
    """Buffers one probe's tensor for a block of ``block_steps`` steps.

    Owned by the training thread (or by whichever thread holds the recorder's lock).

    Args:
        target: what to probe.
        block_steps: K, the steps per block.
        raw_bytes: the largest raw buffer (K × tensor) to hold; beyond it, reduce every step.
        order: the highest central moment the recorded statistics need (2 or 4).
        pool: where buffers come from and go back to.
    """

    def __init__(self, target: Target, block_steps: int, raw_bytes: int, order: int,
                 pool: BufferPool):
        self.target = target
        self.channels = target.channels
        self.block_steps = block_steps
        self.raw_bytes = raw_bytes
        self.order = order
        self.pool = pool
        self.count = [0] * block_steps
        self.segments: list[Segment] = []
        self.always_moments = False
        self._shape = None
        self._start = 0
        self._mode = "raw"
        self._buf: Pair | None = None
        self._moments: list[Pair] = []
        self._rows: list[torch.Tensor] | None = None
        self._movedim = False
        self._per_channel = 0
        self._shapes_in_block = 0

    def capture(self, x: torch.Tensor, slot: int) -> None:
        """Record ``x`` as this probe's tensor at ``slot`` of the block (first call wins)."""
        count = self.count
        if count[slot]:
            return
        if self._rows is None or x.shape != self._shape:
            if x.numel() == 0:
                return
            self._reshape(x, slot)
        count[slot] = self._per_channel
        if self._mode == "raw":
            self._rows[slot - self._start].copy_(
                (x.movedim(self.target.channel_dim, -1) if self._movedim else x).detach())
        else:
            row = slot - self._start
            for buf, value in zip(self._rows, step_moments(x.detach(), self.target.channel_dim,
                                                           self.order)):
                buf[row].copy_(value)

    def _reshape(self, x: torch.Tensor, slot: int) -> None:
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
            raise StatscopeError(f"layers: the {t.where} of {t.module_name!r} has {channels} "
                                 f"channels along dim {t.channel_dim} (shape {tuple(x.shape)}), "
                                 f"expected {self.channels}")
        if not self.close_segment(slot) and self._rows is not None:
            for pair in self._open_buffers():
                self.pool.give(pair)  # allocated but never written: reuse it, do not leak it
        self._shapes_in_block += 1
        if self._shapes_in_block > MAX_SHAPES_PER_BLOCK:
            self.always_moments = True
        self._start = slot
        self._shape = x.shape
        self._per_channel = x.numel() // channels
        self._movedim = t.channel_dim % x.ndim != x.ndim - 1
        itemsize = 8 if x.dtype == torch.float64 else 4
        fits = self.block_steps * x.numel() * itemsize <= self.raw_bytes
        self._mode = "raw" if fits and not self.always_moments else "moments"
        self._alloc(x.dtype, x.device)

    def _alloc(self, dtype: torch.dtype, device: torch.device) -> None:
        self._buf, self._moments, self._rows = None, [], None
        if self._mode == "raw":
            dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self._buf = self.pool.take((self.block_steps, *self._shape_perm()), dtype, device)
            if self._buf is not None:
                self._rows = self._buf[1]
                return
            self._mode = "moments"  # the pool's budget is spent: reduce each step instead
        n = 2 if self.order < 4 else 4
        taken = [self.pool.take((self.block_steps, self.channels), torch.float32, device)
                 for _ in range(n)]
        if any(t is None for t in taken):
            for t in taken:
                if t is not None:
                    self.pool.give(t)
            raise StatscopeError(
                f"buffer_bytes={self.pool.budget}: too small for even the per-step moments of "
                f"{self.target.name!r} ({n} × {self.block_steps} × {self.channels} float32); "
                "raise buffer_bytes or lower block_steps")
        self._moments = taken
        self._rows = [buf for buf, _ in taken]

    def close_segment(self, stop: int) -> bool:
        """End the open segment at ``stop`` (exclusive); False when it holds no row."""
        if self._rows is None or stop <= self._start:
            return False
        if self._mode == "raw":
            self.segments.append(Segment(self._start, stop, raw=self._buf))
        else:
            self.segments.append(Segment(self._start, stop, moments=tuple(self._moments)))
        return True

    def _open_buffers(self) -> tuple[Pair, ...]:
        return (self._buf,) if self._mode == "raw" else tuple(self._moments)

    def take_block(self, n: int) -> tuple[np.ndarray, list[Segment]]:
        """Hand over the first ``n`` slots (counts and segments) and start a new block.

        The caller guarantees that no slot from ``n`` on holds data (no step is in progress).
        """
        self.close_segment(n)
        count, segments = np.array(self.count[:n], np.int64), self.segments
        self.count = [0] * self.block_steps
        self.segments = []
        self._shapes_in_block = 0
        if segments and self._is_open(segments[-1]):
            self._rows = None  # the open buffers went with the block: take new ones when needed
        self._start = 0
        return count, segments

    def peek(self, n: int) -> tuple[np.ndarray, list[Segment]]:
        """Counts and segments of rows ``:n`` without handing the buffers over.

        For the writer thread's idle flush; the rows must be complete (steps that ended).
        """
        segments = list(self.segments)
        if self._rows is not None and n > self._start:
            segments.append(Segment(self._start, n, raw=self._buf if self._mode == "raw" else None,
                                    moments=None if self._mode == "raw" else tuple(self._moments)))
        clipped = [c for c in (seg.clip(0, n) for seg in segments) if c is not None]
        return np.array(self.count[:n], np.int64), clipped

    def rewind(self, slot: int) -> None:
        """Forget what was captured at ``slot`` and after (micro-batches of one step)."""
        for i in range(slot, self.block_steps):
            self.count[i] = 0
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
        return self._rows is not None and seg.buffers()[0] is self._open_buffers()[0]

    def _shape_perm(self) -> tuple[int, ...]:
        shape = list(self._shape)
        c = shape.pop(self.target.channel_dim)
        return (*shape, c)


def segment_moments(segments: list[Segment], order: int) -> list[tuple[np.ndarray, ...]]:
    """Moments of each segment's rows as float64 numpy arrays (stop-start, C).

    Small raw segments of the same shape (the probes of a network's equal-width layers) are
    reduced in one batched pass: at small batch sizes the writer thread's cost is per operation,
    not per element.
    """
    out: list = [None] * len(segments)
    groups: dict[tuple, list[int]] = {}
    for i, seg in enumerate(segments):
        k = seg.stop - seg.start
        if seg.raw is None:
            out[i] = tuple(buf[seg.offset:seg.offset + k].double().cpu().numpy()
                           for buf, _ in seg.moments)
        else:
            buf = seg.raw[0]
            # Batch small blocks only: big ones are bound by memory, and a copy would cost more.
            key = (buf.shape, buf.dtype, buf.device) if buf.nbytes <= _BATCH_BYTES else i
            groups.setdefault(key, []).append(i)
    for members in groups.values():
        blocks = []
        for i in members:
            seg = segments[i]
            raw = seg.raw[0][seg.offset:seg.offset + seg.stop - seg.start]
            blocks.append(raw.reshape(raw.shape[0], -1, raw.shape[-1]))
        stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        moments = [m.cpu().numpy() for m in block_moments(stacked, order)]
        first = 0
        for i, block in zip(members, blocks):
            out[i] = tuple(m[first:first + len(block)] for m in moments)
            first += len(block)
    return out
