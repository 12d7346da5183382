"""A block's segments: the rows of one probe held in a raw buffer or as entries, and their
reduction on the writer thread (:func:`gather_segments`).

:class:`~statscope.probes.capture.Capture` fills them on the training thread; at the hand-over
of a block a segment of CPU entries of one kind is stacked (:func:`stack_segment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from statscope.probes.pool import Pair
from statscope.probes.reduce import StackedRun, entries_gather, stack_entries
from statscope.probes.statistics import block_moments

__all__ = ["Segment", "gather_segments", "stack_segment"]

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


def stack_segment(seg: Segment) -> Segment:
    """``seg`` with its entries stacked where :func:`statscope.probes.reduce.stack_entries`
    allows (on the training thread, at the hand-over of a block)."""
    if seg.refs is None:
        return seg
    run = stack_entries(seg.refs[seg.offset:seg.offset + seg.stop - seg.start])
    return seg if run is None else Segment(seg.start, seg.stop, refs=run)


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
