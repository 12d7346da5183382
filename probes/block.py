"""A block of steps, and how the writer thread turns it into rows of the run store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from statscope.probes.capture import BufferPool, Capture, Segment, segment_moments
from statscope.probes.statistics import Moments, Statistic, finish

__all__ = ["Block", "block_rows"]


@dataclass(frozen=True)
class Block:
    """Steps ``first_step .. first_step + n - 1``, as the training thread hands them over.

    Attributes:
        parts: per capture, its counts (n,) and segments.
        scalars: per logged name, ``(slot, value)`` pairs; values are floats or 0-d tensors.
    """

    first_step: int
    n: int
    parts: list[tuple[np.ndarray, list[Segment]]]
    scalars: dict[str, list[tuple[int, Any]]]


def block_rows(block: Block, captures: Sequence[Capture], statistics: Sequence[Statistic],
               order: int, pool: BufferPool) -> tuple:
    """The block as :meth:`statscope.writer.RunWriter.append` takes it.

    Returns:
        ``(steps (n,), count (n, probes), {stat: (n, neurons or groups) float32},
        {scalar: (n,)})``; captures whose channels are still unknown are left out.
    """
    n = block.n
    per_neuron = {s.name: [] for s in statistics if not s.per_group}
    per_group = {s.name: [] for s in statistics if s.per_group}
    live = [(cap, count, segments) for cap, (count, segments) in zip(captures, block.parts)
            if cap.channels is not None]
    computed = iter(segment_moments([seg for _, _, segs in live for seg in segs], order, pool))
    counts = []
    for cap, count, segments in live:
        moments = _moments(cap, count, [(seg, next(computed)) for seg in segments], n, order)
        for name, values in finish(moments, (*per_neuron, *per_group)).items():
            (per_group if name in per_group else per_neuron)[name].append(values)
        counts.append(count)
    stats = {k: np.concatenate(v, axis=1).astype(np.float32)
             for k, v in {**per_neuron, **per_group}.items()}
    scalars = {name: _scalar_column(values, n) for name, values in block.scalars.items()}
    steps = np.arange(block.first_step, block.first_step + n, dtype=np.int64)
    return steps, np.stack(counts, axis=1), stats, scalars


def _moments(cap: Capture, count: np.ndarray, segments, n: int, order: int) -> Moments:
    arrays = [np.full((n, cap.channels), np.nan) for _ in range(2 if order < 4 else 4)]
    for seg, moments in segments:
        for dst, src in zip(arrays, moments):
            dst[seg.start:seg.stop] = src
    for a in arrays:
        a[count == 0] = np.nan  # slots this probe did not run in hold stale buffer rows
    m3, m4 = (arrays[2], arrays[3]) if order >= 4 else (None, None)
    return Moments(arrays[0], arrays[1], m3, m4, cap.target.groups)


def _scalar_column(values: list[tuple[int, Any]], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    for slot, v in values:
        if not isinstance(v, torch.Tensor):
            out[slot] = v
    tensors = [(slot, v) for slot, v in values if isinstance(v, torch.Tensor)]
    if tensors:  # one stack and one copy to the host for the whole block
        out[[slot for slot, _ in tensors]] = torch.stack([v for _, v in tensors]).double().cpu()
    return out
