"""Batch-size scaling: the log-log slope of fluctuation against batch size.

Over runs at several batch sizes, per layer and statistic: y = log of the layer median of the
per-neuron fluctuation (scale-free by default, so runs at different learning rates and
activation scales compare), x = log batch size, slope by least squares over the runs. Sampling
theory predicts −0.5 for BN statistics (sd ∝ 1/√N with N ∝ batch size for fully connected
layers) and a flatter slope for EN, which pools over channels.

The interval treats **runs as the unit** when every batch size has at least two runs (seeds):
the runs' spread about their batch size's mean, pooled over the batch sizes, gives the slope's
standard error and a t quantile with (runs − batch sizes) degrees of freedom
(:func:`runs_slope`). Seeds differ in initialisation and data
order, which the steps within one run cannot show, so an interval from steps alone is far too
narrow. With one run per batch size there is nothing else: the interval then combines each
run's block bootstrap over steps (:func:`statscope.analyses.resampling.contrast`) and says so.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, Layers, quiet, require, stacked, t_quantile
from ._names import NOTES, SIGMA2, STATISTIC
from .bootstrap import window_series
from .intervals import contrast
from .resampling import Moments, check_settings, moments, resample
from .runs import split_runs
from .window import run_windows

__all__ = ["batch_size_scaling", "runs_slope"]


def runs_slope(x, y, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                            float]:
    """Least-squares slope of y on x over runs, with a t interval from the runs' spread within
    each x (pure error).

    Runs sharing a value of x (seeds at one batch size) are replicates: their variance about
    their own mean, pooled over the x values, estimates the run-to-run variance σ² with
    R − strata degrees of freedom, independently of the strata means that the slope is made of;
    the slope's standard error is σ̂/√Σ(x − x̄)². Under normal run effects of one variance the
    interval is exact, whatever the weights of the strata (batch sizes 4, 32, 256 with 2 seeds
    each, or 2 runs at 4 and 5 at 128: 95.0 % and 95.2 % for a nominal 95 %). A variance per
    stratum, estimated from 2 or 3 seeds each, would be too noisy to use: resampling the runs
    within each x, as this did before, covered 91.6 % in the first design.

    Args:
        x: (R,) the regressor per run (log batch size); runs sharing a value form a stratum,
            each with at least two runs.
        y: (R, K) the response per run, K slopes at once.
        confidence: level of the two-sided interval.

    Returns:
        (slope, lower, upper) each (K,), and the degrees of freedom R − strata.

    Example:
        >>> x = np.log([4, 4, 4, 128, 128, 128])
        >>> y = -0.5 * x[:, None] + np.array([[0.1], [-0.1], [0.0], [0.05], [-0.05], [0.0]])
        >>> s, lo, hi, df = runs_slope(x, y)
        >>> round(float(s[0]), 3), bool(lo[0] < -0.5 < hi[0]), df
        (-0.5, True, 4)
    """
    check_settings(confidence=confidence)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    levels, stratum = np.unique(x, return_inverse=True)
    counts = np.bincount(stratum)
    if levels.size < 2 or counts.min() < 2:
        raise StatscopeError(f"runs_slope: need at least two x values with two runs each; "
                             f"got counts {counts.tolist()}")
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = xc @ (y - y.mean(0)) / sxx
    means = np.stack([y[stratum == h].mean(0) for h in range(levels.size)])
    df = int(x.size - levels.size)
    with quiet():
        se = np.sqrt(((y - means[stratum]) ** 2).sum(0) / df / sxx)
    q = float(t_quantile(0.5 + confidence / 2.0, df))
    return slope, slope - q * se, slope + q * se, df


def batch_size_scaling(ds, window=200, *, scale_free: bool = True, confidence: float = 0.95,
                       n_boot: int = 1000, block: int | None = None,
                       seed: int = 0) -> xr.Dataset:
    """Log-log slope of per-layer fluctuation against batch size, with intervals.

    Args:
        ds: stacked runs (``open_runs``) or a mapping name -> run, one neuron layout, each run
            with a batch size in its meta, at least two batch sizes.
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        scale_free: use fluctuation / σ̄ (bias-corrected; recommended across runs).
        confidence, n_boot, block, seed: interval settings (block: only for the within-run
            bootstrap used when some batch size has a single run).

    Returns:
        Dataset, dims (layer, statistic): ``slope``, ``lower``, ``upper`` (float64) and
        ``n_runs``; attrs: theory (−0.5 for BN statistics), window, batch_sizes, method
        ("runs" or "steps"), df, notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> runs = {f"bs{b}_s{s}": demo_run(batch_size=b, seed=s) for b in (8, 64) for s in (0, 1)}
        >>> sc = batch_size_scaling(runs, n_boot=200)
        >>> sc.attrs["method"], bool(abs(float(sc.slope.sel(layer="fc1", statistic="bn_mean")) + 0.5) < 0.1)
        ('runs', True)
    """
    check_settings(confidence=confidence, n_boot=n_boot, block=block, seed=seed)
    if isinstance(ds, xr.Dataset) and not stacked(ds):
        raise StatscopeError("batch_size_scaling: expected stacked runs from open_runs, got one run")
    for _, one, _ in split_runs(ds):
        require(one, [*FLUCT_STATS, S.COUNT], "batch_size_scaling")
    windows = run_windows(ds, window)
    sizes = np.array([_size(w.meta) for w in windows])
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise StatscopeError(f"batch_size_scaling: every run needs a positive batch_size in its "
                             f"meta; got {[w.meta.get(S.META_BATCH_SIZE) for w in windows]}")
    if np.unique(sizes).size < 2:
        raise StatscopeError(f"batch_size_scaling: runs at one batch size only "
                             f"({sizes[0]:g}); need at least two")
    layers = Layers.of(windows[0].data)
    for w in windows[1:]:
        if Layers.of(w.data).names != layers.names:
            raise StatscopeError(f"batch_size_scaling: run {w.name!r} has layers "
                                 f"{list(Layers.of(w.data).names)}, {windows[0].name!r} has "
                                 f"{list(layers.names)}; scale runs of one model")

    def statistic(m: Moments) -> np.ndarray:
        with quiet():
            return np.stack([layers.median(m.std[s] / np.sqrt(m.mean[SIGMA2]) if scale_free
                                           else m.std[s]) for s in FLUCT_STATS], axis=-1
                            ).reshape(*m.std[S.BN_MEAN].shape[:-1], -1)  # (..., L * S)

    x = np.log(sizes)
    counts = np.unique(sizes, return_counts=True)[1]
    shape = (len(layers.names), len(FLUCT_STATS))
    notes = ["slope of log(layer-median fluctuation) on log(batch size); sampling theory "
             "predicts -0.5 for BN statistics"]
    df: float
    if counts.min() >= 2:
        with quiet():
            y = np.log(np.stack([statistic(moments(window_series(w.data))) for w in windows]))
        slope, lo, hi, df = runs_slope(x, y, confidence=confidence)
        method = "runs"
        notes.append(f"interval over runs (seeds): t with the runs' pooled spread within each "
                     f"batch size, {df} degrees of freedom")
    else:
        parts = [resample(window_series(w.data), statistic, n_boot=n_boot, block=block,
                          seed=seed + i, groups=layers.ordinal) for i, w in enumerate(windows)]
        xc = x - x.mean()
        iv = contrast(parts, xc / (xc @ xc), confidence, log=True)
        slope, lo, hi, df = iv.estimate, iv.lower, iv.upper, float(np.nanmin(iv.df, initial=np.inf))
        method = "steps"
        notes.append("one run at some batch size: the interval reflects only the sampling "
                     "within runs (block bootstrap over steps); seeds would be the replicates "
                     "and usually give a wider interval")
        notes += sorted({n for n in iv.notes if n})
    dims = (S.LAYER, STATISTIC)
    out = xr.Dataset({"slope": (dims, np.reshape(slope, shape)),
                      "lower": (dims, np.reshape(lo, shape)),
                      "upper": (dims, np.reshape(hi, shape)),
                      "n_runs": ((), len(windows))},
                     coords={S.LAYER: list(layers.names), STATISTIC: list(FLUCT_STATS)})
    out.attrs = {"theory": -0.5, "window": windows[0].data.attrs["window"],
                 "batch_sizes": sorted(float(s) for s in set(sizes.tolist())),
                 "scale_free": bool(scale_free), "confidence": confidence, "n_boot": n_boot,
                 "method": method, "df": float(df), NOTES: notes}
    return out


def _size(meta) -> float:
    v = meta.get(S.META_BATCH_SIZE)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
