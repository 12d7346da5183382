"""Per-probe buffering of a block of steps, on the tensor's device.

The hot path is :meth:`Capture.capture`, called once per step and probe. It does one of two
things, chosen per probe and tensor shape:

- ``raw``: copy the tensor into a slot of a preallocated (K, ..., C) buffer (one ``copy_``).
  (Keeping references to the tensors instead was measured slower: it defeats the allocator's
  reuse of activation memory.)
- ``moments``: reduce the tensor to its per-channel moments at once, for tensors too large to hold
  K times within ``raw_bytes`` (a few ops on a large tensor, relatively cheap).

Neither mode syncs with the device or loops over neurons; the moments of a block of K steps are
computed later in one batched pass off the training thread. A change of shape (the smaller last
batch of an epoch, a new sequence length) closes the current segment of the block and opens
another, so nothing is lost or mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from statscope.errors import StatscopeError
from statscope.probes.selection import Target
from statscope.probes.statistics import block_moments, step_moments

__all__ = ["Capture", "Segment", "BufferPool", "segment_moments"]

_Pair = tuple[torch.Tensor, list[torch.Tensor]]
_BATCH_BYTES = 1 << 20


class BufferPool:
    """Reusable buffers by (shape, dtype, device), shared by the main and the worker thread.

    Each buffer travels with the list of its row views, made once: creating K views per block
    costs as much on the training thread as the copies themselves at small batch sizes.
    """

    def __init__(self):
        self._free: dict[tuple, list[_Pair]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Pair:
        free = self._free.get((shape, dtype, device))
        if free:
            try:
                return free.pop()
            except IndexError:  # emptied by the other thread meanwhile
                pass
        buf = torch.empty(shape, dtype=dtype, device=device)
        return buf, list(buf.unbind(0))

    def give(self, buf: torch.Tensor, rows: list[torch.Tensor]) -> None:
        self._free.setdefault((tuple(buf.shape), buf.dtype, buf.device), []).append((buf, rows))


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a block, held from row 0 of a ``raw`` or ``moments`` buffer."""

    start: int
    stop: int
    raw: _Pair | None = None
    moments: tuple[_Pair, ...] | None = None


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
        self.count = [0] * block_steps
        self.segments: list[Segment] = []
        self._shape = None
        self._start = 0
        self._mode = "raw"
        self._buf: _Pair | None = None
        self._moments: list[_Pair] = []
        self._rows: list[torch.Tensor] = []
        self._movedim = False
        self._per_channel = 0

    def capture(self, x: torch.Tensor, slot: int) -> None:
        """Record ``x`` as this probe's tensor at ``slot`` of the block (first call wins)."""
        count = self.count
        if count[slot]:
            return
        if x.shape != self._shape:
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
        itemsize = 8 if x.dtype == torch.float64 else 4
        fits = self.block_steps * x.numel() * itemsize <= self.raw_bytes
        self._mode = "raw" if fits else "moments"
        self._alloc(x.dtype, x.device)

    def _alloc(self, dtype: torch.dtype, device: torch.device) -> None:
        self._buf, self._moments, self._rows = None, [], []
        if self._mode == "raw":
            dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self._buf = self.pool.take((self.block_steps, *self._shape_perm()), dtype, device)
            self._rows = self._buf[1]
        else:
            n = 2 if self.order < 4 else 4
            self._moments = [self.pool.take((self.block_steps, self.channels), torch.float32,
                                            device) for _ in range(n)]
            self._rows = [buf for buf, _ in self._moments]
        self._dtype, self._device = dtype, device

    def close_segment(self, stop: int) -> None:
        """End the open segment at ``stop`` (exclusive)."""
        if self._shape is None or stop <= self._start:
            return
        if self._mode == "raw":
            self.segments.append(Segment(self._start, stop, raw=self._buf))
        else:
            self.segments.append(Segment(self._start, stop, moments=tuple(self._moments)))

    def take_block(self, n: int) -> tuple[np.ndarray, list[Segment]]:
        """Hand over the first ``n`` slots (counts and segments) and start a new block."""
        self.close_segment(n)
        count, segments = np.array(self.count[:n], np.int64), self.segments
        self.count = [0] * self.block_steps
        self.segments = []
        self._start = 0
        if self._shape is not None:
            self._alloc(self._dtype, self._device)
        return count, segments

    def _shape_perm(self) -> tuple[int, ...]:
        shape = list(self._shape)
        c = shape.pop(self.target.channel_dim)
        return (*shape, c)


def segment_moments(segments: list[Segment], order: int, pool: BufferPool
                    ) -> list[tuple[np.ndarray, ...]]:
    """Moments of each segment's rows as float64 numpy arrays (stop-start, C); frees buffers.

    Small raw segments of the same shape (the probes of a network's equal-width layers) are
    reduced in one batched pass: at small batch sizes the writer thread's cost is per operation,
    not per element.
    """
    out: list = [None] * len(segments)
    groups: dict[tuple, list[int]] = {}
    for i, seg in enumerate(segments):
        if seg.raw is None:
            k = seg.stop - seg.start
            out[i] = tuple(buf[:k].double().cpu().numpy() for buf, _ in seg.moments)
            for pair in seg.moments:
                pool.give(*pair)
        else:
            buf = seg.raw[0]
            # Batch small blocks only: big ones are bound by memory, and a copy would cost more.
            key = (buf.shape, buf.dtype, buf.device) if buf.nbytes <= _BATCH_BYTES else i
            groups.setdefault(key, []).append(i)
    for members in groups.values():
        blocks = []
        for i in members:
            seg = segments[i]
            raw = seg.raw[0][:seg.stop - seg.start]
            blocks.append(raw.reshape(raw.shape[0], -1, raw.shape[-1]))
        stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        moments = [m.cpu().numpy() for m in block_moments(stacked, order)]
        first = 0
        for i, block in zip(members, blocks):
            out[i] = tuple(m[first:first + len(block)] for m in moments)
            first += len(block)
            pool.give(*segments[i].raw)
    return out
