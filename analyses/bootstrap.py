"""Confidence intervals for the per-layer fluctuation (Figure 6's whiskers).

Every interval comes from the one block-bootstrap helper of :mod:`statscope.analyses.resampling`
(block length from the statistic's own autocorrelation, bias-corrected studentized interval,
"too short" where the window cannot carry one); this module only says what the statistic is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, Layers, masked, quiet, require, sigma2_series
from ._names import BOUND, BOUNDS, NOTES, QUANTITY, SIGMA2
from .blocklength import block_length
from .intervals import bootstrap_statistic
from .resampling import BLOCK_FACTOR, Moments, _Data, _replicates, check_settings, snap_block
from .window import map_windows

__all__ = ["block_bootstrap", "fluctuation_ci", "BootstrapMoments", "window_series"]

_QUANTITIES = ("median", "first")


@dataclass(frozen=True)
class BootstrapMoments:
    """Per-series mean and std (ddof=1) on the data and on each bootstrap replicate.

    Attributes:
        mean, std: name -> array (...,) on the original steps (NaN steps skipped).
        mean_reps, std_reps: name -> array (n_boot, ...) on the replicates.
        block: block length used; n_steps: length of the series.
    """

    mean: Mapping[str, np.ndarray]
    std: Mapping[str, np.ndarray]
    mean_reps: Mapping[str, np.ndarray]
    std_reps: Mapping[str, np.ndarray]
    block: int
    n_steps: int


def block_bootstrap(series: Mapping[str, np.ndarray], *, n_boot: int = 1000,
                    block: int | None = None, seed: int = 0) -> BootstrapMoments:
    """Moving-block bootstrap of the mean and std along axis 0 of several aligned series.

    Each replicate has exactly T steps: ⌊T/b⌋ blocks of b consecutive steps and one of
    T mod b, starts drawn uniformly, all columns resampled together. For intervals use
    :func:`statscope.analyses.resampling.bootstrap_statistic`, which also chooses the block per
    statistic and corrects the interval; this is the raw resampler.

    Args:
        series: name -> array (T, N) over the same T steps; NaN marks an excluded step.
        n_boot: number of replicates.
        block: block length in steps; default twice the Politis–White length of the levels
            (median over columns, longest over series), rounded up as
            :func:`~statscope.analyses.resampling.snap_block` does.
        seed: the same seed gives the same replicates.

    Returns:
        BootstrapMoments.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(400, 3))
        >>> m = block_bootstrap({"x": x}, n_boot=200)
        >>> m.std_reps["x"].shape, bool(np.allclose(m.std["x"], x.std(0, ddof=1)))
        ((200, 3), True)
    """
    check_settings(n_boot=n_boot, block=block, seed=seed)
    data = _Data(series)
    if block is None:
        with quiet():
            lengths = [np.nanmedian(block_length(np.where(data.ok[:, i], data.d[:, i], np.nan))
                                    .block) for i in range(len(data.names))]
        block = min(snap_block(BLOCK_FACTOR * max(lengths)), max(1, data.t // 2))
    if not 1 <= int(block) <= data.t:
        raise StatscopeError(f"block={block}: expected a block length between 1 and the window's "
                             f"{data.t} steps")
    if n_boot < 1:
        raise StatscopeError(f"n_boot={n_boot}: expected at least 1 replicate")
    s, n = len(data.names), data.n

    def stat(m: Moments) -> np.ndarray:
        return np.concatenate([np.stack([m.mean[k], m.std[k]], axis=-2)
                               for k in data.names], axis=-1)

    reps = _replicates(data, stat, int(block), 2 * s * n, n_boot, seed).reshape(n_boot, 2, s * n)
    base = data.moments(*data.totals())
    mean_reps = {k: reps[:, 0, i * n:(i + 1) * n] for i, k in enumerate(data.names)}
    std_reps = {k: reps[:, 1, i * n:(i + 1) * n] for i, k in enumerate(data.names)}
    return BootstrapMoments(base.mean, base.std, mean_reps, std_reps, int(block), data.t)


def window_series(w: xr.Dataset, names=(*FLUCT_STATS, SIGMA2)) -> dict[str, np.ndarray]:
    """The per-step series the analyses resample, as (step, neuron) float64 arrays.

    ``bn_mean`` … ``en_std`` NaN where not valid; ``sigma2`` = bn_std²·n/(n−1); ``gap_mean`` =
    |bn_mean − en_mean| and ``gap_std`` = |bn_std − en_std|.
    """
    out = {}
    for name in names:
        if name == SIGMA2:
            v = sigma2_series(w)
        elif name == "gap_mean":
            v = abs(masked(w, S.BN_MEAN) - masked(w, S.EN_MEAN))
        elif name == "gap_std":
            v = abs(masked(w, S.BN_STD) - masked(w, S.EN_STD))
        else:
            v = masked(w, name)
        out[name] = np.asarray(v.transpose(S.STEP, S.NEURON).values, dtype=np.float64)
    return out


def fluctuation_ci(ds: xr.Dataset, window=200, *, scale_free: bool = False,
                   confidence: float = 0.95, n_boot: int = 1000, block: int | None = None,
                   seed: int = 0) -> xr.Dataset:
    """Block-bootstrap confidence intervals for the per-layer fluctuation.

    The statistic is the layer median (over neurons) and the first neuron's value of the
    per-neuron fluctuation (sample std over steps, ddof=1; scale-free: divided by each neuron's
    σ̄, recomputed per replicate). Intervals are computed on the log scale (see
    :mod:`statscope.analyses.resampling`); where the window is too short for the series'
    autocorrelation the bounds are NaN and a note says so.

    Args:
        ds: a run, stacked runs, or a mapping name -> run (one neuron layout).
        window: see :func:`statscope.analyses.select_window`.
        scale_free: as in :func:`statscope.analyses.fluctuation`.
        confidence: level of the two-sided interval.
        n_boot: bootstrap replicates.
        block: one block length for every interval; default per interval, from the data.
        seed: random seed.

    Returns:
        Dataset, vars bn_mean, bn_std, en_mean, en_std with dims (layer, quantity, bound) or
        (layer, run, quantity, bound); quantity is median, first; bound is lower, estimate,
        upper. attrs: window, confidence, n_boot, block (lengths used), scale_free, method,
        notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> ci = fluctuation_ci(demo_run(), n_boot=200)
        >>> lo, est, hi = ci.bn_std.sel(layer="fc1", quantity="median").values
        >>> bool(lo <= est <= hi)
        True
    """
    check_settings(confidence=confidence, n_boot=n_boot, block=block, seed=seed)
    require(ds, [*FLUCT_STATS, S.COUNT], "fluctuation_ci")
    out = map_windows(ds, window, lambda w: _run_ci(w, scale_free, confidence, n_boot, block,
                                                     seed))
    if S.RUN in out.dims:
        out = out.transpose(S.LAYER, S.RUN, QUANTITY, BOUND)
        out.attrs["block"] = sorted(out.attrs["block"])
    return out


def _run_ci(w: xr.Dataset, scale_free: bool, confidence: float, n_boot: int, block, seed):
    """:func:`fluctuation_ci` of one run's window."""
    layers = Layers.of(w)

    def statistic(m: Moments) -> np.ndarray:
        parts = []
        for s in FLUCT_STATS:
            with quiet():
                v = m.std[s] / np.sqrt(m.mean[SIGMA2]) if scale_free else m.std[s]
            parts.append(np.stack([layers.median(v), layers.first_unit(v)], axis=-1))
        return np.stack(parts, axis=-3).reshape(*parts[0].shape[:-2], -1)

    iv = bootstrap_statistic(window_series(w), statistic, confidence=confidence, n_boot=n_boot,
                             block=block, seed=seed, log=True, groups=layers.ordinal)
    shape = (len(FLUCT_STATS), len(layers.names), len(_QUANTITIES))
    bounds = np.stack([iv.lower, iv.estimate, iv.upper], axis=-1).reshape(*shape, 3)
    coords = {S.LAYER: list(layers.names), QUANTITY: list(_QUANTITIES), BOUND: list(BOUNDS)}
    res = xr.Dataset({s: ((S.LAYER, QUANTITY, BOUND), bounds[i])
                      for i, s in enumerate(FLUCT_STATS)}, coords=coords)
    notes = []
    labels = [(s, layer, q) for s in FLUCT_STATS for layer in layers.names for q in _QUANTITIES]
    for (s, layer, q), note in zip(labels, iv.notes):
        if note:
            notes.append(f"{s} {layer} {q}: {note}")
    res.attrs = {"window": w.attrs["window"], "confidence": confidence, "n_boot": n_boot,
                 "block": sorted({int(b) for b in iv.block if b > 0}),
                 "scale_free": bool(scale_free),
                 "method": "block bootstrap over steps (block length from the data), "
                           "bias-corrected studentized interval on the log scale",
                 NOTES: notes}
    return res
