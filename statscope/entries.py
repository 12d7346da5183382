"""Entries to moments: the float64 per-channel moments of the entries that probes keep per step
(:mod:`statscope.probes.reduce` lists their kinds), for the writer, in numpy alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ENTRY_MOMENTS", "EntryJob", "jobs_moments", "jobs_into", "var_from_invstd"]


def var_from_invstd(invstd: np.ndarray, eps) -> np.ndarray:
    """BatchNorm's biased batch variance from its ``invstd = 1/√(var + eps)`` (float64; inf
    where ``invstd`` is 0, BatchNorm's own variance overflowed)."""
    out = np.multiply(invstd, invstd, dtype=np.float64)  # one array, filled in place
    with np.errstate(divide="ignore"):
        np.divide(1.0, out, out=out)
    np.subtract(out, eps, out=out)
    return np.maximum(out, 0.0, out=out)


def _invstd(arrays, numbers, order):
    mean, invstd = arrays
    return mean, var_from_invstd(invstd, numbers[:, :1]), None, None


def _suminv(arrays, numbers, order):
    # BatchNorm's variance is its mean square about its own mean, which drifted from the sum's
    # (statscope.probes.reduce.batchnorm_entry): the true variance plus the drift's square
    total, invstd, bn_mean = arrays
    mean = total / numbers[:, 1:2]
    drift = np.subtract(bn_mean, mean, dtype=np.float64)
    var = var_from_invstd(invstd, numbers[:, :1]) - drift * drift
    return mean, np.maximum(var, 0.0, out=var), None, None


def _var(arrays, _numbers, order):
    mean, var = arrays[:2]
    return mean, np.maximum(var, 0.0), None, None


def _mv(arrays, numbers, order):
    packed = arrays[0]  # (rows, 2C + 1): mean, var, the compiled graph's flag
    c = packed.shape[-1] // 2
    return _var((packed[:, :c], packed[:, c:2 * c]), numbers, order)


def _shifted(arrays, numbers, order):
    packed = arrays[0]  # (rows, 3C): x0, mean and var of x - x0
    c = packed.shape[-1] // 3
    mean, var, _, _ = _var((packed[:, c:2 * c], packed[:, 2 * c:]), numbers, order)
    return packed[:, :c].astype(np.float64) + mean, var, None, None


def _sums(arrays, numbers, order):
    x0, s, s1, s2 = arrays[:4]
    m = numbers[:, :1]
    a = s1 / m
    mean = x0 + s * a
    var = np.maximum(s2 / m - a * a, 0.0) * (s * s)
    if order < 4 or len(arrays) < 6:
        return mean, var, None, None
    e3, e4 = arrays[4] / m, arrays[5] / m
    e2 = s2 / m
    m3 = (e3 - 3 * a * e2 + 2 * a ** 3) * s ** 3
    m4 = (e4 - 4 * a * e3 + 6 * a * a * e2 - 3 * a ** 4) * s ** 4
    return mean, var, m3, np.maximum(m4, 0.0)


def _psums(arrays, numbers, order):
    packed = arrays[0]  # (rows, 2 + order, C): x0, s, S1, S2[, S3, S4]
    return _sums([packed[:, j] for j in range(packed.shape[1])], numbers, order)


def _wvar4(arrays, numbers, order):
    mean, var, _, _ = _var(arrays, numbers, order)  # then the count of real elements, m3, m4
    return mean, var, arrays[3], np.maximum(arrays[4], 0.0)


_EXACT_IN_ANY = ("invstd",)
"""Entry kinds whose moments come out the same from float32 arrays as from their float64 copies
(a float64 mean copied into float64 rows, and ``var_from_invstd`` computes in float64)."""

ENTRY_MOMENTS = {"invstd": _invstd, "suminv": _suminv, "var": _var, "wvar": _var,
                 "wvar4": _wvar4, "mv": _mv, "shifted": _shifted, "sums": _sums,
                 "psums": _psums}


@dataclass(frozen=True)
class EntryJob:
    """Entries of one kind and width, of several runs, stacked and on the host.

    Attributes:
        tag: the entries' kind (:mod:`statscope.probes.reduce`).
        members: ``(run, rows)`` pairs: which rows of which run, in stacking order.
        arrays: the entries' tensors, each (rows, C) on the host (float32 or float64).
        numbers: (rows, n) float64, the numbers each entry carries after its tensors.
    """

    tag: str
    members: list
    arrays: list
    numbers: np.ndarray


def jobs_moments(jobs: Sequence[EntryJob], lengths: Sequence[int], channels: Sequence[int],
                 order: int) -> list[tuple[np.ndarray, ...]]:
    """The float64 moments of each run (``lengths[i]`` rows of ``channels[i]``) from its jobs;
    NaN in rows without an entry and in m3/m4 of entries that cannot give them."""
    out = [tuple(np.empty((n, c)) for _ in range(2 if order < 4 else 4))
           for n, c in zip(lengths, channels)]
    jobs_into(jobs, out, order)
    return out


def jobs_into(jobs: Sequence[EntryJob], targets: Sequence[Sequence[np.ndarray]],
              order: int) -> None:
    """:func:`jobs_moments` written into ``targets[i]``, the (rows, C) float64 moment arrays of
    run ``i`` (views of a larger array, say), each row written once."""
    covered = [0] * len(targets)
    for job in jobs:
        for i, rows in job.members:
            covered[i] += len(rows)
    for i, dst in enumerate(targets):
        if covered[i] < len(dst[0]):  # rows without an entry
            for a in dst:
                a.fill(np.nan)
    for job in jobs:
        arrays = job.arrays if job.tag in _EXACT_IN_ANY else [np.asarray(a, np.float64)
                                                               for a in job.arrays]
        moments = ENTRY_MOMENTS[job.tag](arrays, job.numbers, order)
        first = 0
        for i, rows in job.members:
            n = len(rows)
            # a run's rows are distinct and in order: as many as the run has are all of them
            where = slice(None) if n == len(targets[i][0]) else rows
            for dst, src in zip(targets[i], moments):
                dst[where] = np.nan if src is None else src[first:first + n]
            first += n
