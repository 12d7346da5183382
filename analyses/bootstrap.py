"""Block bootstrap over steps: confidence intervals that respect autocorrelation.

Steps of a training run are autocorrelated (the weights move slowly), so resampling single steps
understates uncertainty. The moving-block bootstrap resamples ``ceil(T/b)`` blocks of ``b``
consecutive steps (all neurons together, keeping their cross-correlation) and recomputes the
statistic; the interval is the percentile interval of the replicates. The default block length
is ``ceil(T ** (1/3))`` (the rate-optimal order for variance-type statistics); pass a longer
``block`` for strongly autocorrelated series.

The engine works on per-step means and standard deviations through block sums of x and x², so a
replicate costs O(T/b) per neuron rather than O(T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, masked, quiet, require, sigma2_series, stacked
from ._names import BOUND, BOUNDS, NOTES, QUANTITIES, QUANTITY, SIGMA2
from .summary import layer_summary
from .window import load_window

__all__ = ["block_bootstrap", "fluctuation_ci", "BootstrapMoments", "default_block"]


def default_block(n_steps: int) -> int:
    """The default block length for ``n_steps`` steps: ceil(T^(1/3)).

    >>> default_block(200)
    6
    """
    return max(1, math.ceil(n_steps ** (1 / 3) - 1e-9))


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
                    block: int | None = None, seed: int = 0,
                    batch: int = 100) -> BootstrapMoments:
    """Moving-block bootstrap of the mean and std along axis 0 of several aligned series.

    Args:
        series: name -> array (T, ...) over the same T steps; NaN marks an excluded step.
        n_boot: number of replicates.
        block: block length in steps (default :func:`default_block`).
        seed: seed of the numpy Generator; the same seed gives the same replicates.
        batch: replicates computed at once (memory ~ batch * T/b * size of one step).

    Returns:
        BootstrapMoments.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(400, 3))
        >>> m = block_bootstrap({"x": x}, n_boot=200)
        >>> m.std_reps["x"].shape, bool(np.allclose(m.std["x"], x.std(0, ddof=1)))
        ((200, 3), True)
    """
    if not series:
        raise StatscopeError("block_bootstrap: series is empty")
    t = next(iter(series.values())).shape[0]
    b = default_block(t) if block is None else int(block)
    if not 1 <= b <= t:
        raise StatscopeError(f"block={block}: expected a block length between 1 and the window's "
                             f"{t} steps")
    if n_boot < 1:
        raise StatscopeError(f"n_boot={n_boot}: expected at least 1 replicate")
    rng = np.random.default_rng(seed)
    k = math.ceil(t / b)
    starts = rng.integers(0, t - b + 1, size=(n_boot, k))
    mean, std, mean_reps, std_reps = {}, {}, {}, {}
    for name, x in series.items():
        x = np.asarray(x, dtype=np.float64)
        ok = np.isfinite(x)
        with quiet():
            center = np.nanmean(x, axis=0)
            mean[name] = center
            std[name] = np.nanstd(x, axis=0, ddof=1)
        c = np.where(np.isfinite(center), center, 0.0)
        d = np.where(ok, x - c, 0.0)
        s1, s2, s0 = (_block_sums(a, b) for a in (d, d * d, ok.astype(np.float64)))
        m_out = np.empty((n_boot,) + x.shape[1:])
        s_out = np.empty_like(m_out)
        for lo in range(0, n_boot, batch):
            idx = starts[lo:lo + batch]
            a1, a2, n = s1[idx].sum(1), s2[idx].sum(1), s0[idx].sum(1)
            with quiet():
                m = a1 / n
                m_out[lo:lo + batch] = m + c
                s_out[lo:lo + batch] = np.where(
                    n > 1, np.sqrt(np.maximum(a2 - n * m * m, 0.0) / (n - 1)), np.nan)
        mean_reps[name], std_reps[name] = m_out, s_out
    return BootstrapMoments(mean, std, mean_reps, std_reps, b, t)


def _block_sums(a: np.ndarray, b: int) -> np.ndarray:
    """Sums of every run of ``b`` consecutive rows: (T - b + 1, ...)."""
    cs = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
    return cs[b:] - cs[:-b]


def percentile_interval(reps: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds over axis 0 of replicates (NaN replicates skipped)."""
    if not 0.0 < confidence < 1.0:
        raise StatscopeError(f"confidence={confidence}: expected a level in (0, 1)")
    alpha = (1.0 - confidence) / 2.0
    with quiet():
        lo, hi = np.nanquantile(reps, [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def run_windows(ds: xr.Dataset, window) -> list[tuple[int | None, xr.Dataset]]:
    """Each run's own window, materialised: [(run index or None, Dataset (step, neuron))]."""
    if not stacked(ds):
        return [(None, load_window(ds, window))]
    out = []
    for i in range(ds.sizes[S.RUN]):
        one = ds.isel({S.RUN: i})
        out.append((i, load_window(one, window)))
    return out


def fluctuation_ci(ds: xr.Dataset, window=200, *, scale_free: bool = False,
                   confidence: float = 0.95, n_boot: int = 1000, block: int | None = None,
                   seed: int = 0) -> xr.Dataset:
    """Block-bootstrap confidence intervals for the per-layer fluctuation.

    The statistic is the layer median (over neurons) and the first neuron's value of the
    per-neuron fluctuation (sample std over steps, ddof=1; scale-free: divided by each neuron's
    σ̄, recomputed per replicate).

    Args:
        ds: a run or stacked runs.
        window: see :func:`statscope.analyses.select_window`.
        scale_free: as in :func:`statscope.analyses.fluctuation`.
        confidence: level of the two-sided percentile interval.
        n_boot: bootstrap replicates.
        block: block length in steps (default ceil(T^(1/3))).
        seed: random seed.

    Returns:
        Dataset, vars bn_mean, bn_std, en_mean, en_std with dims (layer, quantity, bound) or
        (layer, run, quantity, bound); quantity is median, first; bound is lower, estimate,
        upper. attrs: window, confidence, n_boot, block, method, notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> ci = fluctuation_ci(demo_run(), n_boot=200)
        >>> lo, est, hi = ci.bn_std.sel(layer="fc1", quantity="median").values
        >>> bool(lo <= est <= hi)
        True
    """
    require(ds, [*FLUCT_STATS, S.COUNT], "fluctuation_ci")
    per_run = []
    blocks = set()
    for i, w in run_windows(ds, window):
        series = {s: masked(w, s).transpose(S.STEP, S.NEURON).values for s in FLUCT_STATS}
        series[SIGMA2] = sigma2_series(w).transpose(S.STEP, S.NEURON).values
        mom = block_bootstrap(series, n_boot=n_boot, block=block, seed=seed)
        blocks.add(mom.block)
        per_run.append(_layer_ci(w, mom, scale_free, confidence))
    out = per_run[0] if not stacked(ds) else xr.concat(per_run, dim=S.RUN).assign_coords(
        {k: v for k, v in ds.coords.items() if v.dims == (S.RUN,)})
    if stacked(ds):
        out = out.transpose(S.LAYER, S.RUN, QUANTITY, BOUND)
    out.attrs = {"window": per_run[0].attrs["window"], "confidence": confidence, "n_boot": n_boot,
                 "block": sorted(blocks), "scale_free": bool(scale_free),
                 "method": "moving-block bootstrap over steps, percentile interval",
                 NOTES: []}
    return out


def _layer_ci(w: xr.Dataset, mom: BootstrapMoments, scale_free: bool, confidence: float):
    """Per-layer (median, first) estimate and interval for one run."""
    coords = {k: v for k, v in w.coords.items() if v.dims == (S.NEURON,)}

    def fluct(std, mean):
        return {s: std[s] / np.sqrt(mean[SIGMA2]) if scale_free else std[s] for s in FLUCT_STATS}

    est = fluct(mom.std, mom.mean)
    reps = fluct(mom.std_reps, mom.mean_reps)
    data = {s: xr.DataArray(np.vstack([est[s][None], reps[s]]), dims=("rep", S.NEURON),
                            coords=coords) for s in FLUCT_STATS}
    summ = layer_summary(xr.Dataset(data))
    out = {}
    wanted = [q for q in QUANTITIES if q in ("median", "first")]
    for s in FLUCT_STATS:
        arr = summ[s].sel({QUANTITY: wanted}).transpose("rep", S.LAYER, QUANTITY).values
        lo, hi = percentile_interval(arr[1:], confidence)
        out[s] = xr.DataArray(np.stack([lo, arr[0], hi], axis=-1),
                              dims=(S.LAYER, QUANTITY, BOUND),
                              coords={S.LAYER: summ[S.LAYER].values, QUANTITY: wanted,
                                      BOUND: list(BOUNDS)})
    res = xr.Dataset(out)
    res.attrs["window"] = w.attrs["window"]
    return res
