"""Batch-size scaling: the log-log slope of fluctuation against batch size.

Over stacked runs at several batch sizes, per layer and statistic: y = log of the layer median of
the per-neuron fluctuation (scale-free by default, so runs at different learning rates and
activation scales compare), x = log batch size, slope by least squares. Sampling theory predicts
−0.5 for BN statistics (sd ∝ 1/√N with N ∝ batch size for fully connected layers) and a flatter
slope for EN, which pools over channels. The interval comes from a moving-block bootstrap within
each run (runs resampled independently), so it reflects each fluctuation's sampling uncertainty;
with several seeds per batch size the seed-to-seed spread enters through the regression residuals
only as far as the bootstrap sees it.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import (FLUCT_STATS, batch_sizes, layer_order, masked, quiet, require,
                    sigma2_series, stacked)
from ._names import NOTES, SIGMA2, STATISTIC
from .bootstrap import block_bootstrap, percentile_interval, run_windows
from .window import describe_window

__all__ = ["batch_size_scaling"]


def batch_size_scaling(ds: xr.Dataset, window=200, *, scale_free: bool = True,
                       confidence: float = 0.95, n_boot: int = 1000, block: int | None = None,
                       seed: int = 0) -> xr.Dataset:
    """Log-log slope of per-layer fluctuation against batch size, with bootstrap intervals.

    Args:
        ds: stacked runs (``open_runs``) with a ``batch_size`` coordinate, at least two sizes.
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        scale_free: use fluctuation / σ̄ (bias-corrected; recommended across runs).
        confidence, n_boot, block, seed: bootstrap settings.

    Returns:
        Dataset, dims (layer, statistic): ``slope``, ``lower``, ``upper`` (float64) and
        ``n_runs``; attrs: theory (−0.5 for BN statistics), window, batch_sizes, notes.
    """
    if not stacked(ds):
        raise StatscopeError("batch_size_scaling: expected stacked runs from open_runs, got one run")
    require(ds, [*FLUCT_STATS, S.COUNT], "batch_size_scaling")
    sizes = batch_sizes(ds)
    if sizes is None or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise StatscopeError(f"batch_size_scaling: every run needs a positive batch_size in its "
                             f"meta; got {None if sizes is None else sizes.tolist()}")
    if np.unique(sizes).size < 2:
        raise StatscopeError(f"batch_size_scaling: runs at one batch size only "
                             f"({sizes[0]:g}); need at least two")
    layers = layer_order(ds[S.LAYER].values)
    lay = np.asarray(ds[S.LAYER].values)
    groups = [np.flatnonzero(lay == L) for L in layers]
    est, reps = [], []
    for i, w in run_windows(ds, window):
        series = {s: masked(w, s) for s in FLUCT_STATS}
        series[SIGMA2] = sigma2_series(w)
        mom = block_bootstrap({k: v.transpose(S.STEP, S.NEURON).values for k, v in series.items()},
                              n_boot=n_boot, block=block, seed=seed + i)
        e, r = [], []
        for s in FLUCT_STATS:
            for std, mean, out in ((mom.std, mom.mean, e), (mom.std_reps, mom.mean_reps, r)):
                v = std[s] / np.sqrt(mean[SIGMA2]) if scale_free else std[s]
                with quiet():
                    out.append(np.stack([np.nanmedian(v[..., g], -1) for g in groups], -1))
        est.append(np.stack(e, -1))  # (layer, stat)
        reps.append(np.stack(r, -1))  # (n_boot, layer, stat)
    x = np.log(sizes)
    xc = x - x.mean()
    with quiet():
        y, yr = np.log(np.stack(est)), np.log(np.stack(reps, 1))  # (run, L, S), (B, run, L, S)
        slope = np.einsum("r,rls->ls", xc, y - y.mean(0)) / (xc @ xc)
        slopes = np.einsum("r,brls->bls", xc, yr - yr.mean(1, keepdims=True)) / (xc @ xc)
    lo, hi = percentile_interval(slopes, confidence)
    dims = (S.LAYER, STATISTIC)
    out = xr.Dataset({"slope": (dims, slope), "lower": (dims, lo), "upper": (dims, hi),
                      "n_runs": ((), len(sizes))},
                     coords={S.LAYER: layers, STATISTIC: list(FLUCT_STATS)})
    out.attrs = {"theory": -0.5, "window": describe_window(window),
                 "batch_sizes": sorted(float(s) for s in sizes), "scale_free": bool(scale_free),
                 "confidence": confidence, "n_boot": n_boot,
                 NOTES: ["slope of log(layer-median fluctuation) on log(batch size); sampling "
                         "theory predicts -0.5 for BN statistics"]}
    return out
