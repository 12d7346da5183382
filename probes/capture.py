"""Per-probe buffering of a block of steps, on the tensor's device.

The hot path is :meth:`Capture.capture`, called from a forward hook once per step: it copies the
probed tensor into a preallocated slot of a (K, ..., C) buffer (one ``copy_``, no host sync, no
loop over neurons), so the moments of K steps are later computed in one batched pass off the
training thread. A tensor too large to buffer K times within ``raw_bytes`` is reduced at once to
its per-channel moments instead (a few ops on a large tensor, relatively cheap). A change of shape
(the last, smaller batch of an epoch, a new sequence length) closes the current segment of the
block and opens another; nothing is lost or mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from statscope.errors import StatscopeError
from statscope.probes.selection import Target
from statscope.probes.statistics import block_moments, step_moments

__all__ = ["Capture", "Segment", "BufferPool", "segment_moments"]


class BufferPool:
    """Reusable buffers by (shape, dtype, device), shared by the main and the worker thread."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((shape, dtype, device))
        if free:
            try:
                return free.pop()
            except IndexError:  # emptied by the other thread meanwhile
                pass
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        self._free.setdefault((tuple(buf.shape), buf.dtype, buf.device), []).append(buf)


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a block, held from row 0 of ``raw`` (K×...×C) or ``moments``."""

    start: int
    stop: int
    raw: torch.Tensor | None
    moments: tuple[torch.Tensor, ...] | None


class Capture:
    """Buffers one probe's tensor for a block of ``block_steps`` steps.

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
        self.count = np.zeros(block_steps, np.int64)
        self.segments: list[Segment] = []
        self._shape = None
        self._start = 0
        self._buf = None
        self._rows: list[torch.Tensor] = []
        self._raw = True
        self._movedim = False
        self._per_channel = 0

    def capture(self, x: torch.Tensor, slot: int) -> None:
        """Record ``x`` as this probe's tensor at ``slot`` of the block (first call wins)."""
        if self.count[slot]:
            return
        if x.shape != self._shape:
            self._reshape(x, slot)
        self.count[slot] = self._per_channel
        if self._raw:
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
            self.channels = channels
            if channels % t.groups:
                raise StatscopeError(f"en_groups={t.groups} for {t.name!r}: its {channels} "
                                     "channels are not divisible by it")
        elif channels != self.channels:
            raise StatscopeError(f"layers: the {t.where} of {t.module_name!r} has {channels} "
                                 f"channels along dim {t.channel_dim} (shape {tuple(x.shape)}), "
                                 f"expected {self.channels}")
        self.close_segment(slot)
        self._start = slot
        self._shape = x.shape
        self._per_channel = x.numel() // channels
        self._movedim = t.channel_dim % x.ndim != x.ndim - 1
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        raw_shape = (self.block_steps, *x.movedim(t.channel_dim, -1).shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._raw = int(np.prod(raw_shape)) * itemsize <= self.raw_bytes
        self._alloc(raw_shape, dtype, x.device)

    def _alloc(self, raw_shape, dtype, device) -> None:
        if self._raw:
            self._buf = self.pool.take(raw_shape, dtype, device)
            self._rows = list(self._buf.unbind(0))
        else:
            n = 2 if self.order < 4 else 4
            self._rows = [self.pool.take((self.block_steps, self.channels), torch.float32, device)
                          for _ in range(n)]
            self._buf = None

    def close_segment(self, stop: int) -> None:
        """End the open segment at ``stop`` (exclusive)."""
        if self._shape is None or stop <= self._start:
            return
        if self._raw:
            self.segments.append(Segment(self._start, stop, self._buf, None))
        else:
            self.segments.append(Segment(self._start, stop, None, tuple(self._rows)))

    def take_block(self, n: int) -> tuple[np.ndarray, list[Segment]]:
        """Hand over the first ``n`` slots (counts and segments) and start a new block."""
        self.close_segment(n)
        count, segments = self.count[:n].copy(), self.segments
        self.count[:] = 0
        self.segments = []
        self._start = 0
        if self._shape is not None:
            raw_shape = (self.block_steps, *self._shape_perm())
            dtype = self._buf.dtype if self._buf is not None else torch.float32
            device = (self._buf if self._buf is not None else self._rows[0]).device
            self._alloc(raw_shape, dtype, device)
        return count, segments

    def _shape_perm(self) -> tuple[int, ...]:
        shape = list(self._shape)
        c = shape.pop(self.target.channel_dim)
        return (*shape, c)


def segment_moments(seg: Segment, order: int, pool: BufferPool) -> tuple[np.ndarray, ...]:
    """Moments of a segment's rows as float64 numpy arrays (stop-start, C); frees its buffers."""
    k = seg.stop - seg.start
    if seg.raw is not None:
        raw = seg.raw[:k]
        raw = raw.reshape(k, -1, raw.shape[-1])
        out = block_moments(raw, order)
        pool.give(seg.raw)
    else:
        out = tuple(b[:k] for b in seg.moments)
        out = tuple(o.double() for o in out)
        for b in seg.moments:
            pool.give(b)
    return tuple(o.cpu().numpy() for o in out)
