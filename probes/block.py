"""A block of steps, and how the writer thread turns it into rows of the run store.

The writer thread gathers a block (:func:`gather_block`: the torch work, reductions and one
copy to the host); the rows follow from the gathered arrays in numpy
(:func:`statscope.rows.compute_rows`), in the writer process when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from statscope.probes.capture import Capture
from statscope.probes.reduce import MASKED_KINDS, StackedRun
from statscope.probes.segments import Segment, gather_segments
from statscope.probes.statistics import Statistic, computes
from statscope.rows import Gathered, ProbePart, Rows, compute_rows

__all__ = ["Block", "Rows", "block_rows", "gather_block"]


@dataclass(frozen=True)
class Block:
    """Steps ``first_step .. first_step + n - 1``, as the training thread hands them over.

    Attributes:
        first_step: the global step of row 0.
        n: rows in the block.
        parts: per capture, in the recorder's capture order: its counts (n,), segments, and
            per-set entries (one per row, None where absent; None when not recorded).
        scalars: per logged name, ``(row, value)`` pairs; values are floats or 0-d tensors.
        ready: CUDA events, recorded after the copies into the buffers, to wait on before reading.
        owned: True when the buffers are handed over (the writer gives them back to the pool);
            False for an idle flush, which only reads rows of buffers the training thread keeps.
        stride: steps between rows (``record(..., every=...)``): row r is step
            ``first_step + stride · r``.
    """

    first_step: int
    n: int
    parts: tuple[tuple[np.ndarray, list[Segment], list | None], ...]
    scalars: dict[str, list[tuple[int, Any]]]
    ready: tuple = ()
    owned: bool = True
    stride: int = 1

    def buffers(self):
        """Every buffer the block holds, once."""
        seen = {}
        for _, segments, _ in self.parts:
            for seg in segments:
                for pair in seg.buffers():
                    seen[id(pair[0])] = pair
        return list(seen.values())


def block_rows(block: Block, captures: Sequence[Capture], statistics: Sequence[Statistic],
               order: int, skip: int = 0) -> Rows:
    """Moments and statistics of rows ``skip:`` of ``block`` (rows before ``skip`` are already
    in the store), in this thread: :func:`gather_block`, then
    :func:`statscope.rows.compute_rows`."""
    return compute_rows(gather_block(block, captures, statistics, order, skip),
                        computes(s.name for s in statistics))


def gather_block(block: Block, captures: Sequence[Capture], statistics: Sequence[Statistic],
                 order: int, skip: int = 0) -> Gathered:
    """The torch half of filing rows ``skip:`` of ``block``: its tensors reduced or copied to
    host arrays (see :mod:`statscope.rows`). Reads the block's buffers; keeps nothing of them."""
    n = block.n
    clipped = []
    for cap, (count, segments, _) in zip(captures, block.parts):
        ran = count[skip:].any()
        segs = [c for c in (seg.clip(skip, n) for seg in segments) if c is not None] if ran else []
        clipped.append((cap, count[skip:].copy(), segs))
    _real_counts(clipped, skip)
    moments, jobs, refs = gather_segments([seg for _, _, segs in clipped for seg in segs], order)
    set_names = tuple(s.name for s in statistics if s.sets)
    parts = []
    for (cap, count, segs), (_, _, entries) in zip(clipped, block.parts):
        if not segs:
            parts.append(None)
            continue
        sets, width = None, 0
        if set_names and entries is not None:
            present, host, width = _sets(entries[skip:], count)
            sets = (present, host)
        parts.append(ProbePart(cap.channels, cap.target.groups,
                               tuple((seg.start, seg.stop) for seg in segs), _cpu_batchnorm(segs),
                               sets, width, cap.bn_eps, _device_type(segs) == "cpu"))
    scalars = {name: _scalar_column(values, n)[skip:] for name, values in block.scalars.items()}
    steps = block.first_step + block.stride * np.arange(skip, n, dtype=np.int64)
    return Gathered(steps, [c for _, c, _ in clipped], parts, moments, jobs, refs, scalars, skip,
                    n, order, tuple(s.name for s in statistics), set_names)


def _sets(rows: list, count: np.ndarray) -> tuple[list, np.ndarray | None, int]:
    """Rows with per-set entries, their (rows, 4, G) float64 values (one copy to the host), G."""
    present = [r for r, e in enumerate(rows) if e is not None and count[r] > 0]
    if not present:
        return [], None, 0
    width = rows[present[0]][0].shape[0]
    host = torch.stack([torch.stack(rows[r]) for r in present]).to("cpu", torch.float64)
    return present, host.numpy(), width


def _real_counts(clipped, skip: int) -> None:
    """Put the real element counts of masked rows (:data:`MASKED_KINDS`) into their count arrays:
    one copy to the host for the whole block."""
    where, tensors = [], []
    for i, (_, count, segs) in enumerate(clipped):
        for seg in segs:
            if type(seg.refs) is StackedRun:
                continue  # never masked (stack_entries)
            for r in range(seg.start, seg.stop):
                e = seg.refs[seg.offset + r - seg.start] if seg.refs is not None else None
                if e is not None and e[0] in MASKED_KINDS:
                    where.append((i, r - skip))
                    tensors.append(e[3][:1])
    if tensors:
        real = torch.cat([t.to("cpu", torch.float64) for t in tensors]).numpy()
        for (i, row), n in zip(where, real):
            clipped[i][1][row] = int(round(n))


def _device_type(segments) -> str | None:
    """The device type of the tensors these rows come from (None: no row has any)."""
    for seg in segments:
        if seg.raw is not None:
            return seg.raw[0].device.type
        if type(seg.refs) is StackedRun:  # CPU entries only (stack_entries)
            return "cpu"
        for e in seg.refs or ():
            if e is not None:
                return e[1].device.type
    return None


def _cpu_batchnorm(segments) -> bool:
    """Whether these rows hold a BatchNorm's own statistics computed on the CPU."""
    for seg in segments:
        if type(seg.refs) is StackedRun:  # CPU entries only (stack_entries)
            return seg.refs.tag in ("invstd", "suminv")
        for e in seg.refs or ():
            if e is not None:
                return e[0] in ("invstd", "suminv") and e[1].device.type == "cpu"
    return False


def _scalar_column(values: list[tuple[int, Any]], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    for slot, v in values:
        if not isinstance(v, torch.Tensor):
            out[slot] = v
    tensors = [(slot, v) for slot, v in values if isinstance(v, torch.Tensor)]
    if tensors:  # one stack and one copy to the host for the whole block
        out[[slot for slot, _ in tensors]] = torch.stack([v for _, v in tensors]).double().cpu()
    return out
