"""The block bootstrap of a statistic of per-step series: the one helper every interval uses.

A statistic here is any function of the per-series means and standard deviations over steps
(a fluctuation, a log ratio of two of them, a layer median of those, a gap ratio, ...). For it,
:func:`resample` and :func:`interval` give an interval that holds its level on autocorrelated
series — measured on AR(1) series (``tests/analyses/test_coverage.py``, docs/analyses.md):

1. **Block length from the data.** The delete-one-step jackknife values of the statistic form
   its influence series; a std is also spread and biased by the autocorrelation of its level
   (it is centred on the window mean), so every (series, neuron group) level whose std an
   effect uses counts too — found by nudging that std and seeing which effects move.
   Politis–White (:mod:`statscope.analyses.blocklength`) gives a block length b₀ for each;
   blocks are ``b = 2·max b₀``, rounded up to 1, 2, 3, 4, 6, 8, 12, ... and at most T/4 (at b₀
   the bootstrap variance is MSE-optimal but biased low by the lost correlation at joins).
2. **Moving-block bootstrap** of exactly T steps (⌊T/b⌋ blocks and one partial block), all
   neurons and series resampled together, computed from block sums of x, x² and the valid count.
3. **A bias-corrected, studentized interval**: centre θ̂ − (mean θ* − θ̂) minus the part of
   the levels' bias that blocks of b cannot reproduce (½ log((T − τ)/(T − τ_b)) per log std);
   standard error sd(θ*) · √(T/(T − b)) / √(1 − join/b) (the moving-block variance is biased
   low by (1 − b/T) from centring and by join/b at the joins); a Student t quantile with
   ⌊T/b⌋ − 1 degrees of freedom (the variance comes from about ⌊T/b⌋ independent blocks). The
   two-sided p-value for θ = 0 comes from the same t.
4. **Too short → no interval.** Where the effective sample, the effect's steps with data
   (T, less the steps where its layers did not run or have no finite value) over the longest
   autocorrelation time involved, is below :data:`MIN_EFFECTIVE`, the interval is NaN and the
   note says why.

Percentile intervals with b = ⌈T^(1/3)⌉ covered the std of AR(1) series of 200 steps 93 / 87 /
66 % of the time at φ = 0 / 0.5 / 0.9 (nominal 95 %); this method 95 / 94.5 / 95 % (T = 2,000:
95.6 / 95.3 / 94.4 %), with the layer's neurons sharing the level estimates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np

from statscope.errors import StatscopeError

from ._data import quiet
from ._moments import _BATCH_BYTES, Moments, Statistic, _Data, _Lazy, moments
from ._sensitivity import _influence, _level_bias, _levels, _support
from .blocklength import block_length

__all__ = ["Moments", "Resampled", "moments", "resample", "snap_block", "snap_down",
           "BLOCK_FACTOR", "MIN_BLOCKS", "MIN_EFFECTIVE", "MAX_N_BOOT", "check_settings"]

BLOCK_FACTOR = 2.0
"""Blocks are this multiple of the Politis–White length (see the module docstring, point 1)."""
MIN_BLOCKS = 4
"""Fewer blocks of the chosen length in the window: no interval (too short)."""
MIN_EFFECTIVE = 10
"""Effects whose effective sample (steps / autocorrelation time) is smaller get no interval."""
MAX_N_BOOT = 100_000
"""The most replicates :func:`resample` accepts (memory grows with n_boot × effects)."""
_MAX_BYTES = 1 << 30
"""Block sums larger than this (steps × series × neurons) are refused: choose a shorter window."""

@dataclass(frozen=True)
class Resampled:
    """A statistic of K effects on the data and on block-bootstrap replicates.

    Attributes:
        estimate: (K,) on the data.
        replicates: (n_boot, K); NaN columns where no block fits (``block`` 0).
        block: (K,) block length used per effect; 0 = too short for an interval.
        tau: (K,) integrated autocorrelation time of the effect's influence series, in steps.
        join: (K,) Politis–White join ratio G/g of the influence series, in steps.
        n_steps: T, the window's steps.
        bias: (K,) the bias of the estimate that blocks of ``block`` steps cannot reproduce
            (from the autocorrelation of the levels whose std the effect uses; see
            :func:`resample`), subtracted from the interval's centre.
        n_valid: (K,) the window's steps with data for each effect (a layer that ran in only
            some steps has fewer than T); the effective sample is ``n_valid / tau``. None: T.
    """

    estimate: np.ndarray
    replicates: np.ndarray
    block: np.ndarray
    tau: np.ndarray
    join: np.ndarray
    n_steps: int
    bias: np.ndarray | None = None
    n_valid: np.ndarray | None = None

    @property
    def n_eff(self) -> np.ndarray:
        """(K,) effective sample of each effect: its steps with data over its autocorrelation
        time (a layer's missing steps add no information, and the autocorrelation time of a
        series with gaps is that of its steps with data)."""
        valid = np.full(self.tau.shape, float(self.n_steps)) if self.n_valid is None \
            else np.asarray(self.n_valid, float)
        with quiet():
            return valid / self.tau


def snap_block(b: float) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is ≥ ``b`` (few distinct lengths,
    so effects share bootstraps).

    >>> [snap_block(v) for v in (0.5, 1, 2.2, 5, 7.9, 13)]
    [1, 1, 3, 6, 8, 16]
    """
    if b <= 1:
        return 1
    p = 2 ** math.floor(math.log2(b))
    if b <= p:
        return int(p)
    return int(1.5 * p) if b <= 1.5 * p else int(2 * p)


def snap_down(b: float) -> int:
    """The largest of 1, 2, 3, 4, 6, 8, 12, ... that is ≤ ``b``.

    >>> [snap_down(v) for v in (1, 5, 50, 64)]
    [1, 4, 48, 64]
    """
    out = 1
    while snap_block(out + 1) <= b:
        out = snap_block(out + 1)
    return out


def _needs(data: _Data, statistic: Statistic) -> tuple[list[int], list[int]]:
    """Indices of the series whose mean (or std) and whose std the statistic reads."""
    m = data.moments(*data.totals())
    with quiet():
        statistic(m)
    index = {k: i for i, k in enumerate(data.names)}
    spread = sorted(index[k] for k in cast(_Lazy, m.std)._done)  # data.moments makes _Lazy ones
    level = sorted({index[k] for k in cast(_Lazy, m.mean)._done} | set(spread))
    return level, spread


def _replicates(data: _Data, statistic: Statistic, b: int, k_out: int, n_boot: int,
                seed: int, *, budget: int = _BATCH_BYTES) -> np.ndarray:
    """(n_boot, K) statistic on moving-block replicates of exactly T steps with blocks of b.

    Only the sums the statistic reads are resampled: x for every series it reads, x² for those
    whose std it reads, and the valid count only where some step is missing. Memory beyond
    the data stays within a few ``budget`` bytes whatever T, N and n_boot: replicates go in
    batches, and each batch builds the block sums one column chunk at a time, never all
    (T, series, N) of them. Each column's block sums depend on that column alone and each
    replicate adds its blocks in order, so the chunking does not change the numbers (with
    short blocks, where a BLAS product adds them, the last bit may round differently).
    """
    t = data.t
    full, rest = divmod(t, b)
    rng = np.random.default_rng([seed, b])
    starts = rng.integers(0, t - b + 1, size=(n_boot, full))
    part_starts = rng.integers(0, t - rest + 1, size=n_boot) if rest else None
    level, spread = _needs(data, statistic)
    gaps = [i for i in level if not data.ok[:, i].all()]
    # the resampled columns, in the order of the sums: (kind, series) with kind 0 = valid
    # count, 1 = d, 2 = d²
    kinds = [(0, i) for i in gaps] + [(1, i) for i in level] + [(2, i) for i in spread]
    s, n = data.d.shape[1], data.d.shape[2]
    n_pos = t - b + 1
    gemm = n_pos <= 8 * full  # BLAS on a count matrix beats gathering ⌊T/b⌋ rows per replicate
    # A batch of replicates holds its moments' sums (3 S, N) (and with gemm its count matrix)
    # while the block sums are built column chunk by column chunk, so the fewer batches the
    # fewer times the block sums are rebuilt: up to 4 budgets of them. The statistic then
    # reads them in slices of about one budget (its temporaries are a few such arrays).
    per = max(1, min(n_boot, 4 * budget // (8 * (3 * s * n + (n_pos if gemm else 0)))))
    per_stat = max(1, budget // (8 * 4 * s * n))
    # column chunks for a column's series and its running sums, of at least 2 columns each
    # (see _gather)
    pieces = max(1, -(-n // max(4, budget // (8 * 4 * (t + 1)))))
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(n), pieces)
              if c.size]
    out = np.empty((n_boot, k_out))
    for lo in range(0, n_boot, per):
        idx = starts[lo:lo + per]
        rows = idx.shape[0]
        counts = None
        if gemm:
            flat = (np.arange(rows)[:, None] * n_pos + idx).ravel()
            counts = np.bincount(flat, minlength=rows * n_pos).reshape(rows, n_pos)
            counts = counts.astype(np.float64)
        a0 = np.full((rows, s, n), float(t))
        a1 = np.zeros((rows, s, n))
        a2 = np.zeros((rows, s, n))
        for kind, i in kinds:
            target = (a0, a1, a2)[kind]
            for c0, c1 in bounds:
                cols = slice(c0, c1)
                x = data.ok[:, i, cols].astype(np.float64) if kind == 0 else data.d[:, i, cols]
                cs = _running_sums(x * x if kind == 2 else x)
                sums = cs[b:] - cs[:-b]
                acc = counts @ sums if counts is not None else _gather(sums, idx, budget)
                if part_starts is not None:
                    acc += (cs[rest:] - cs[:-rest])[part_starts[lo:lo + per]]
                target[:, i, cols] = acc
        for r0 in range(0, rows, per_stat):
            m = min(per_stat, rows - r0)
            sl = slice(r0, r0 + m)
            vals = statistic(data.moments(a0[sl], a1[sl], a2[sl]))
            out[lo + r0:lo + r0 + m] = np.asarray(vals, dtype=np.float64).reshape(m, k_out)
    return out


def _running_sums(a: np.ndarray) -> np.ndarray:
    """(T + 1, C) sums of the first 0, 1, ..., T rows of ``a`` (T, C), as ``np.cumsum`` adds
    them (row after row), but run along contiguous memory: several times faster on a column
    chunk of a (T, S, N) array."""
    t, c = a.shape
    cs = np.empty((c, t + 1))
    cs[:, 0] = 0.0
    np.cumsum(a.T, axis=1, out=cs[:, 1:])
    return np.ascontiguousarray(cs.T)


def _gather(sums: np.ndarray, idx: np.ndarray, budget: int) -> np.ndarray:
    """(R, C) sum over j of the blocks ``sums[idx[r, j]]``, gathered about ``budget`` bytes at a
    time rather than as one (R, ⌊T/b⌋, C) array.

    Each piece is reduced behind the running sum, so the blocks are added one after another in
    order of j — numpy's order for such a reduction when C ≥ 2, and the order of the whole
    gathered array. A single column (where numpy would sum pairwise) goes block by block.
    """
    rows, full = idx.shape
    width = sums.shape[1]
    step = full if width < 2 else max(1, min(full - 1, budget // (8 * rows * width)))
    acc = sums[idx[:, 0]]
    if width < 2:
        for j in range(1, full):
            acc += sums[idx[:, j]]
        return acc
    buf = np.empty((rows, step + 1, width))
    for j in range(1, full, step):
        k = min(step, full - j)
        buf[:, 0] = acc
        np.take(sums, idx[:, j:j + k], axis=0, out=buf[:, 1:k + 1], mode="clip")  # in range
        acc = buf[:, :k + 1].sum(axis=1)
    return acc


def _combine(parts) -> Statistic:
    """One statistic whose effects are those of ``parts`` in order."""
    def whole(m: Moments) -> np.ndarray:
        outs = [np.asarray(f(m), dtype=np.float64) for f in parts]
        lead = np.broadcast_shapes(*(o.shape[:-1] for o in outs))
        return np.concatenate([np.broadcast_to(o, lead + o.shape[-1:]) for o in outs], axis=-1)

    return whole


def check_settings(*, confidence=None, n_boot=None, block=None, seed=None) -> None:
    """Raise StatscopeError for a bootstrap setting that is given (not None) and malformed:
    ``confidence`` a level in (0, 1), ``n_boot`` an integer from 1 to :data:`MAX_N_BOOT`,
    ``block`` a positive integer, ``seed`` a non-negative integer. Every public function with
    these arguments checks them here, before reading any data."""
    def integer(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if confidence is not None and (isinstance(confidence, (bool, np.bool_)) or not isinstance(
            confidence, (int, float, np.number)) or not 0.0 < float(confidence) < 1.0):
        raise StatscopeError(f"confidence={confidence!r}: expected a level in (0, 1)")
    if n_boot is not None and not (integer(n_boot) and 1 <= n_boot <= MAX_N_BOOT):
        raise StatscopeError(f"n_boot={n_boot!r}: expected an integer from 1 to {MAX_N_BOOT:,}")
    if block is not None and not (integer(block) and block >= 1):
        raise StatscopeError(f"block={block!r}: expected a positive integer (steps) or None "
                             f"(chosen from the data)")
    if seed is not None and not (integer(seed) and seed >= 0):
        raise StatscopeError(f"seed={seed!r}: expected a non-negative integer")


def resample(series: Mapping[str, np.ndarray], statistic, *, n_boot: int = 1000,
             block: int | None = None, seed: int = 0, groups=None) -> Resampled:
    """Block-bootstrap a statistic of aligned per-step series (see the module docstring).

    Args:
        series: name -> array (T, N) over the same T steps; NaN marks an excluded step.
        statistic: moments -> (..., K) effects (vectorised over leading axes), or a sequence of
            such functions whose effects are concatenated (each is then resampled only for the
            block lengths its own effects use, and only from the series it reads).
        n_boot: replicates, 1 ≤ n_boot ≤ :data:`MAX_N_BOOT`.
        block: one block length for every effect, 1 ≤ block ≤ T/2; default per effect from
            the data (see the module docstring).
        seed: the same seed gives the same replicates.
        groups: (N,) neuron groups (e.g. layers): the autocorrelation of a level is the median
            over its group's neurons (steadier than one neuron's); default one group per neuron.

    Returns:
        Resampled.

    Raises:
        StatscopeError: bad n_boot or block, series of different shapes, or a window too large
            to resample in memory.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(400, 3))
        >>> r = resample({"x": x}, lambda m: m.std["x"], n_boot=200)
        >>> r.replicates.shape, bool(np.allclose(r.estimate, x.std(0, ddof=1)))
        ((200, 3), True)
    """
    check_settings(n_boot=n_boot, block=block, seed=seed)
    data = _Data(series)
    t = data.t
    if 3 * data.d[0].size * 8 * t > _MAX_BYTES:
        raise StatscopeError(f"window of {t:,} steps × {data.d[0].size:,} series columns is too "
                             f"large to bootstrap in memory; choose a shorter window")
    if block is not None and not 1 <= int(block) <= t // 2:
        raise StatscopeError(f"block={block}: expected a block length between 1 and half the "
                             f"window's {t} steps")
    parts = list(statistic) if isinstance(statistic, (list, tuple)) else [statistic]
    statistic = _combine(parts)
    base = data.moments(*data.totals())
    sizes = [np.asarray(f(base)).shape[-1] for f in parts]
    est = np.asarray(statistic(base), dtype=np.float64).ravel()
    k_out = est.size
    groups = np.arange(data.n) if groups is None else np.asarray(groups)
    if groups.shape != (data.n,):
        raise StatscopeError(f"groups: expected one group per neuron ({data.n}), got shape "
                             f"{groups.shape}")
    levels = []
    n_valid = np.full(k_out, t)
    if t >= 8:
        infl = block_length(_influence(data, statistic, est))
        tau, join, auto = infl.tau, infl.join, infl.block
        levels = _levels(data, statistic, est, groups)
        n_valid = _support(data, statistic, est, groups)
        for lev in levels:
            uses = lev.sensitivity != 0
            tau = np.where(uses, np.fmax(tau, lev.tau), tau)
            join = np.where(uses, np.fmax(join, lev.join), join)
            auto = np.where(uses, np.fmax(auto, lev.block), auto)
    else:
        tau, join, auto = np.full(k_out, np.inf), np.zeros(k_out), np.full(k_out, np.inf)
    if block is not None:
        blocks = np.full(k_out, int(block))
    else:
        longest = snap_block(t // MIN_BLOCKS)
        longest = longest if longest <= t // MIN_BLOCKS else snap_down(t // MIN_BLOCKS)
        blocks = np.array([min(snap_block(BLOCK_FACTOR * v), longest) if np.isfinite(v) else 0
                           for v in auto])
        with quiet():  # the effective sample counts the steps with data (a layer's gaps)
            blocks = np.where(n_valid / tau >= MIN_EFFECTIVE, blocks, 0)
    reps = np.full((n_boot, k_out), np.nan)
    edges = np.cumsum([0, *sizes])
    for b in np.unique(blocks[blocks > 0]):
        for f, lo, hi in zip(parts, edges[:-1], edges[1:]):
            use = blocks[lo:hi] == b
            if use.any():
                part = _replicates(data, f, int(b), hi - lo, n_boot, seed)
                reps[:, lo:hi][:, use] = part[:, use]
    return Resampled(est, reps, blocks.astype(int), np.asarray(tau, float),
                     np.asarray(join, float), t, _level_bias(levels, blocks, t), n_valid)
