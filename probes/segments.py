"""A block's segments: the rows of one probe held in a raw buffer or as entries, and their
reduction on the writer thread (:func:`gather_segments`).

:class:`~statscope.probes.capture.Capture` fills them on the training thread; at the hand-over
of a block a segment of CPU entries of one kind is stacked (:func:`stack_segment`). A CPU
BatchNorm probe that the C++ probe files (:mod:`statscope.probes.hooks`) holds its rows in a
:class:`BnRows` buffer, stacked already; the writer thread never sees one (:func:`readable`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from statscope.probes.pool import Pair
from statscope.probes.reduce import StackedRun, entries_gather, stack_entries
from statscope.probes.statistics import block_moments

__all__ = ["BnRows", "Segment", "gather_segments", "readable", "stack_segment"]

_BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a block, held from row ``offset`` of a ``raw`` buffer or of a
    list of ``refs`` entries (one per row; None where the probe did not run), or of a
    :class:`~statscope.probes.reduce.StackedRun` of them."""

    start: int
    stop: int
    raw: Pair | None = None
    refs: list | StackedRun | None = None
    offset: int = 0

    @property
    def kind(self) -> str:
        return "raw" if self.raw is not None else "refs"

    def buffers(self) -> tuple[Pair, ...]:
        """Pool buffers this segment holds (entries hold none)."""
        return (self.raw,) if self.raw is not None else ()

    def clip(self, lo: int, hi: int) -> "Segment | None":
        """The part of this segment within rows ``lo:hi``, or None when they do not meet."""
        start, stop = max(self.start, lo), min(self.stop, hi)
        if start >= stop:
            return None
        return Segment(start, stop, self.raw, self.refs, self.offset + start - self.start)


class BnRows:
    """The rows of a CPU BatchNorm probe's open segment, as entries (a list's interface) held in
    one buffer: row ``i``'s ``("invstd", mean, invstd, eps)`` entry is ``buffer[0, i]`` and
    ``buffer[1, i]`` where ``present[i]``, and other entries (a step that took another route)
    are kept as they are in ``overflow``.

    The C++ probe (``statscope/csrc/bn_probe.cpp``) copies BatchNorm's (C,) statistics into the
    buffer, so that the step's own tensors are freed with the step and the block is stacked
    already when it is handed over (:meth:`run`). Written on the training thread under the
    recorder's lock; the writer thread reads only rows of steps that ended.

    Args:
        rows: K, the block's steps.
        channels: C.
        dtype: BatchNorm's statistics' dtype (float32, or float64 for float64 inputs).
        eps: the layer's eps, every buffered row's.
    """

    __slots__ = ("buffer", "present", "overflow", "eps")

    def __init__(self, rows: int, channels: int, dtype: torch.dtype, eps: float):
        self.buffer = torch.empty((2, rows, channels), dtype=dtype)
        self.present = bytearray(rows)
        self.overflow: dict[int, tuple] = {}
        self.eps = float(eps)

    def __len__(self) -> int:
        return len(self.present)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        entry = self.overflow.get(index)
        if entry is None and self.present[index]:
            return ("invstd", self.buffer[0, index], self.buffer[1, index], self.eps)
        return entry

    def __setitem__(self, index: int, entry: tuple | None) -> None:
        index = range(len(self))[index]
        self.present[index] = 0
        self.overflow.pop(index, None)
        if entry is None:
            return
        if self._fits(entry):
            with torch.no_grad():
                self.buffer[0, index].copy_(entry[1])
                self.buffer[1, index].copy_(entry[2])
            self.present[index] = 1
        else:
            self.overflow[index] = entry

    def _fits(self, entry: tuple) -> bool:
        shape = self.buffer.shape[2:]
        return (entry[0] == "invstd" and len(entry) == 4 and entry[3] == self.eps
                and all(type(t) is torch.Tensor and t.is_cpu and t.dtype == self.buffer.dtype
                        and t.shape == shape for t in entry[1:3]))

    def run(self, start: int, stop: int) -> StackedRun | list:
        """Rows ``start:stop`` as a :class:`~statscope.probes.reduce.StackedRun` of views of
        the buffer when each is in it, else as a list of entries."""
        if stop > start and all(self.present[start:stop]) \
                and not any(start <= i < stop for i in self.overflow):
            return StackedRun("invstd", 4, [self.buffer[0, start:stop], self.buffer[1, start:stop]],
                              np.full((stop - start, 1), self.eps))
        return self[start:stop]


def stack_segment(seg: Segment) -> Segment:
    """``seg`` with its entries stacked where :func:`statscope.probes.reduce.stack_entries`
    allows (on the training thread, at the hand-over of a block); never a :class:`BnRows`."""
    if seg.refs is None:
        return seg
    if type(seg.refs) is BnRows:
        seg = readable(seg)
        if type(seg.refs) is StackedRun:
            return seg
    run = stack_entries(seg.refs[seg.offset:seg.offset + seg.stop - seg.start])
    return seg if run is None else Segment(seg.start, seg.stop, refs=run)


def readable(seg: Segment) -> Segment:
    """``seg`` as the writer thread reads it: a :class:`BnRows` segment as a stacked run or a
    list of its entries (views of the buffer, which the training thread goes on filling)."""
    if type(seg.refs) is not BnRows:
        return seg
    return Segment(seg.start, seg.stop, refs=seg.refs.run(seg.offset,
                                                         seg.offset + seg.stop - seg.start))


def gather_segments(segments: list[Segment], order: int) -> tuple[list, list, list]:
    """The torch half of the segments' moments: raw segments reduced, entries gathered.

    Small raw segments of the same shape (the probes of a network's equal-width layers) are
    reduced in one batched pass: at small batch sizes the writer thread's cost is per operation,
    not per element. The entries of ``refs`` segments are stacked per kind and copied to the
    host once per device (:func:`statscope.probes.reduce.entries_gather`).

    Returns:
        ``(moments, jobs, refs)``: per segment its float64 moments (stop-start, C) as numpy
        arrays, or None for a ``refs`` segment; the gathered entries; and ``(segment, rows)`` of
        each ``refs`` segment (see :class:`statscope.rows.Gathered`).
    """
    out: list = [None] * len(segments)
    groups: dict[tuple, list[int]] = {}
    refs = []
    for i, seg in enumerate(segments):
        if seg.raw is None:
            refs.append(i)
            continue
        buf = seg.raw[0]
        # Batch small blocks only: big ones are bound by memory, and a copy would cost more.
        key = (buf.shape, buf.dtype, buf.device) if buf.nbytes <= _BATCH_BYTES else i
        groups.setdefault(key, []).append(i)
    runs = [segments[i].refs[segments[i].offset:segments[i].offset + segments[i].stop
                             - segments[i].start] for i in refs]
    jobs = entries_gather(runs) if refs else []
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
    return out, jobs, [(i, len(run)) for i, run in zip(refs, runs)]
