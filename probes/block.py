"""A block of steps, and how the writer thread turns it into rows of the run store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from statscope import schema as S
from statscope.probes.capture import Capture, Segment, segment_moments
from statscope.probes.reduce import mean_needs_sum
from statscope.probes.statistics import Moments, Statistic, finish

__all__ = ["Block", "Rows", "block_rows"]


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


@dataclass(frozen=True)
class Rows:
    """The statistics of rows ``skip:n`` of a block, per capture.

    Attributes:
        steps: (k,) int64 global steps.
        counts: per capture, (k,) int64 elements per channel (0 where it did not run).
        stats: per capture that ran in these rows, ``{name: (k, C) or (k, groups)}``; None for the
            others (their channels may still be unknown).
        scalars: ``{name: (k,)}`` float64, NaN where not logged.
    """

    steps: np.ndarray
    counts: list[np.ndarray]
    stats: list[dict[str, np.ndarray] | None]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)


def block_rows(block: Block, captures: Sequence[Capture], statistics: Sequence[Statistic],
               order: int, skip: int = 0) -> Rows:
    """Moments and statistics of rows ``skip:`` of ``block`` (rows before ``skip`` are already
    in the store)."""
    n = block.n
    names = tuple(s.name for s in statistics)
    clipped = []
    for cap, (count, segments, _) in zip(captures, block.parts):
        ran = count[skip:].any()
        segs = [c for c in (seg.clip(skip, n) for seg in segments) if c is not None] if ran else []
        clipped.append((cap, count[skip:].copy(), segs))
    _real_counts(clipped, skip)
    computed = iter(segment_moments([seg for _, _, segs in clipped for seg in segs], order,
                                    [cap.channels for cap, _, segs in clipped for _ in segs]))
    counts, moments = [], []
    for cap, count, segs in clipped:
        counts.append(count)
        moments.append(_moments(cap, count, [(seg, next(computed)) for seg in segs], n - skip,
                                skip, order) if segs else None)
    stats = _finish_all(moments, names)
    set_names = tuple(s.name for s in statistics if s.sets)
    if set_names:
        _add_sets(stats, [part[2] for part in block.parts], counts, skip, set_names)
    for cap, m, count, (_, _, segs) in zip(captures, moments, counts, clipped):
        if m is not None and _cpu_batchnorm(segs):
            cap.sum_bn_mean = mean_needs_sum(m.mean, m.var, count)
    scalars = {name: _scalar_column(values, n)[skip:] for name, values in block.scalars.items()}
    steps = block.first_step + block.stride * np.arange(skip, n, dtype=np.int64)
    return Rows(steps, counts, stats, scalars)


def _moments(cap: Capture, count: np.ndarray, segments, k: int, skip: int, order: int) -> Moments:
    arrays = [np.full((k, cap.channels), np.nan) for _ in range(2 if order < 4 else 4)]
    for seg, moments in segments:
        for dst, src in zip(arrays, moments):
            dst[seg.start - skip:seg.stop - skip] = src
    for a in arrays:
        a[count == 0] = np.nan  # slots this probe did not run in hold stale buffer rows
    m3, m4 = (arrays[2], arrays[3]) if order >= 4 else (None, None)
    return Moments(arrays[0], arrays[1], m3, m4, cap.target.groups)


def _real_counts(clipped, skip: int) -> None:
    """Put the real element counts of masked rows (``wvar`` entries) into their count arrays:
    one copy to the host for the whole block."""
    where, tensors = [], []
    for i, (_, count, segs) in enumerate(clipped):
        for seg in segs:
            for r in range(seg.start, seg.stop):
                e = seg.refs[seg.offset + r - seg.start] if seg.refs is not None else None
                if e is not None and e[0] == "wvar":
                    where.append((i, r - skip))
                    tensors.append(e[3][:1])
    if tensors:
        real = torch.cat([t.to("cpu", torch.float64) for t in tensors]).numpy()
        for (i, row), n in zip(where, real):
            clipped[i][1][row] = int(round(n))


def _add_sets(stats, sets, counts, skip: int, names: tuple[str, ...]) -> None:
    """The per-set statistics of each probe that ran: four (k, G) arrays from its entries."""
    for i, entries in enumerate(sets):
        if entries is None or stats[i] is None:
            continue
        rows = entries[skip:]
        present = [r for r, e in enumerate(rows) if e is not None and counts[i][r] > 0]
        width = next(e[0].shape[0] for e in rows if e is not None) if present else 0
        arrays = [np.full((len(rows), width), np.nan) for _ in names]
        if present:
            host = torch.stack([torch.stack(rows[r]) for r in present]).to("cpu",
                                                                           torch.float64)
            for name, a in zip(names, arrays):  # entries hold the four in SET_STATS order
                a[present] = host[:, S.SET_STATS.index(name)].numpy()
        stats[i].update({name: a.astype(np.float32) for name, a in zip(names, arrays)})


def _cpu_batchnorm(segments) -> bool:
    """Whether these rows hold a BatchNorm's own statistics computed on the CPU."""
    for seg in segments:
        for e in seg.refs or ():
            if e is not None:
                return e[0] in ("invstd", "suminv") and e[1].device.type == "cpu"
    return False


def _finish_all(moments: list[Moments | None], names: tuple[str, ...]
                ) -> list[dict[str, np.ndarray] | None]:
    """:func:`finish` per probe, in one pass for the probes of equal width and groups (the
    writer thread's cost at small batch sizes is per numpy call, and it holds the GIL that a
    launch-bound training thread needs)."""
    out: list = [None] * len(moments)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(moments):
        if m is not None:
            groups.setdefault((m.mean.shape[1], m.groups), []).append(i)
    for (_, g), members in groups.items():
        parts = [moments[i] for i in members]
        if len(parts) == 1:
            joined = parts[0]
        else:
            cat = [None if getattr(parts[0], a) is None
                   else np.concatenate([getattr(m, a) for m in parts])
                   for a in ("mean", "var", "m3", "m4")]
            joined = Moments(*cat, g)
        with np.errstate(all="ignore"):  # NaN rows of steps a probe missed are expected
            done = {k: v.astype(np.float32) for k, v in finish(joined, names).items()}
        first = 0
        for i, m in zip(members, parts):
            k = len(m.mean)
            out[i] = {name: v[first:first + k] for name, v in done.items()}
            first += k
    return out


def _scalar_column(values: list[tuple[int, Any]], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    for slot, v in values:
        if not isinstance(v, torch.Tensor):
            out[slot] = v
    tensors = [(slot, v) for slot, v in values if isinstance(v, torch.Tensor)]
    if tensors:  # one stack and one copy to the host for the whole block
        out[[slot for slot, _ in tensors]] = torch.stack([v for _, v in tensors]).double().cpu()
    return out
