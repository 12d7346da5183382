"""Does one statistic fluctuate more than another? Paired and independent tests of sd ratios.

* **Paired** (:func:`compare_statistics`): two series of the same neuron over the same steps
  (its ``bn_mean`` and ``en_mean``) are strongly correlated, so tests for independent samples
  are wrong for them (Brown–Forsythe at correlation 0.9: no false positives at all, and little
  power). The effect is log(sd(a)/sd(b)) per neuron, resampled with both series in the same
  blocks of steps (:mod:`statscope.analyses.resampling`), which keeps their correlation and
  their autocorrelation; the test is the bias-corrected studentized interval's t.
* **Independent runs** (:func:`compare_runs`): each run is resampled by its own block bootstrap
  and the log sd ratio's error combines both (Welch–Satterthwaite degrees of freedom).
  ``method="brown-forsythe"`` gives the classical Brown–Forsythe/Levene test instead (ANOVA
  on absolute deviations, :func:`levene`), right for independent samples of independent
  steps; with autocorrelated steps its p-values are too small.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import fdtrc

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import Layers, masked, quiet, require, sigma_bar, stacked
from ._names import NOTES, SIGMA2
from .bootstrap import window_series
from .intervals import bootstrap_statistic, contrast
from .resampling import Moments, check_settings, resample
from .runs import split_runs
from .window import load_window, map_windows

__all__ = ["levene", "compare_statistics", "compare_runs"]

_AUTOCORR = ("Levene-type tests assume independent steps; autocorrelation makes the p-values "
             "anti-conservative")


def levene(a: np.ndarray, b: np.ndarray, *, center: str = "median") -> tuple[np.ndarray, np.ndarray]:
    """Two-sample Levene/Brown–Forsythe test along axis 0, vectorised over the other axes.

    Args:
        a, b: arrays (Ta, ...) and (Tb, ...); NaN entries are left out.
        center: "median" (Brown–Forsythe) or "mean" (Levene).

    Returns:
        (W statistic, p-value), arrays of the trailing shape.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(50, 1)), 3 * rng.normal(size=(60, 1))
        >>> from scipy.stats import levene as ref
        >>> bool(np.isclose(levene(a, b)[1][0], ref(a[:, 0], b[:, 0]).pvalue))
        True
    """
    if center not in ("median", "mean"):
        raise StatscopeError(f"center={center!r}: expected 'median' or 'mean'")
    f = np.nanmedian if center == "median" else np.nanmean
    with quiet():
        za = np.abs(a - f(a, axis=0))
        zb = np.abs(b - f(b, axis=0))
        na, nb = np.isfinite(za).sum(0), np.isfinite(zb).sum(0)
        ma, mb = np.nanmean(za, 0), np.nanmean(zb, 0)
        n = na + nb
        m = (na * ma + nb * mb) / n
        between = na * (ma - m) ** 2 + nb * (mb - m) ** 2
        within = np.nansum((za - ma) ** 2, 0) + np.nansum((zb - mb) ** 2, 0)
        w = (n - 2) * between / within
        p = fdtrc(1, n - 2, w)
    return w, p


def compare_statistics(ds: xr.Dataset, a: str = S.BN_MEAN, b: str = S.EN_MEAN, window=200, *,
                       confidence: float = 0.95, n_boot: int = 1000, block: int | None = None,
                       seed: int = 0) -> xr.Dataset:
    """Per neuron, a paired test whether statistic ``a`` fluctuates differently from ``b``.

    Args:
        ds: a run or stacked runs.
        a, b: statistic names recorded over the same steps, e.g. ``bn_std`` and ``en_std``.
        window: see :func:`statscope.analyses.select_window`.
        confidence: level of the interval.
        n_boot, block, seed: bootstrap settings (see
            :func:`statscope.analyses.resampling.resample`).

    Returns:
        Dataset (neuron,) or (run, neuron): ``ratio`` = sd(a)/sd(b), ``lower``/``upper`` its
        interval, ``p_value`` (two-sided, ratio = 1), ``statistic`` (the t statistic of the
        log ratio) and ``block``. attrs: window, compared, test, confidence, notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> r = compare_statistics(demo_run(), "bn_mean", "en_mean", n_boot=200)
        >>> bool((r.p_value.sel(neuron=r.unit == 0) < 0.01).all())
        True
    """
    check_settings(confidence=confidence, n_boot=n_boot, block=block, seed=seed)
    require(ds, [a, b, S.COUNT], "compare_statistics")

    def one(w: xr.Dataset) -> xr.Dataset:
        series = {k: masked(w, k).transpose(S.STEP, S.NEURON).values for k in (a, b)}

        def statistic(m: Moments) -> np.ndarray:
            with quiet():
                return np.log(m.std[a] / m.std[b])

        iv = bootstrap_statistic(series, statistic, confidence=confidence, n_boot=n_boot,
                                 block=block, seed=seed, groups=Layers.of(w).ordinal)
        return _paired_result(w, iv, f"{a} vs {b}", "paired block bootstrap of log(sd ratio)")

    return map_windows(ds, window, one)


def _paired_result(w: xr.Dataset, iv, what: str, test: str) -> xr.Dataset:
    coords = {k: v for k, v in w.coords.items() if v.dims == (S.NEURON,)}
    dims = (S.NEURON,)
    with quiet():
        t_stat = np.where(iv.se > 0, (iv.lower + iv.upper) / 2.0 / iv.se, np.nan)
        data = {"ratio": (dims, np.exp(iv.estimate)), "lower": (dims, np.exp(iv.lower)),
                "upper": (dims, np.exp(iv.upper)), "p_value": (dims, iv.p_value),
                "statistic": (dims, t_stat), "block": (dims, iv.block.astype(np.int64))}
    out = xr.Dataset(data, coords=coords)
    notes = sorted({n for n in iv.notes if n})
    out.attrs = {"window": w.attrs["window"], "compared": what, "test": test,
                 "confidence": iv.confidence, NOTES: [f"some neurons: {n}" for n in notes]}
    return out


def compare_runs(ds: xr.Dataset, run_a, run_b, statistic: str = S.BN_STD, window=200, *,
                 scale_free: bool = True, method: str = "bootstrap", center: str = "median",
                 confidence: float = 0.95, n_boot: int = 1000, block: int | None = None,
                 seed: int = 0) -> xr.Dataset:
    """Per neuron, test whether ``statistic`` fluctuates differently in two independent runs.

    Args:
        ds: stacked runs from ``open_runs``, or a mapping of names to runs.
        run_a, run_b: run names (values of the ``run`` coordinate, or keys of the mapping),
            e.g. "bs4", "bs128".
        statistic: e.g. ``bn_std``.
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        scale_free: divide each run's series by the neuron's σ̄ in that run,
            so runs at different scales (learning rates) compare.
        method: "bootstrap" (each run's own block bootstrap; autocorrelation-aware) or
            "brown-forsythe" (:func:`levene` with ``center``; assumes independent steps).
        center: for "brown-forsythe": "median" (Brown–Forsythe) or "mean" (Levene).
        confidence, n_boot, block, seed: bootstrap settings.

    Returns:
        Dataset (neuron,): ``ratio`` = sd in a / sd in b, ``p_value``, ``statistic``; with
        the bootstrap also ``lower``/``upper`` (interval of the ratio). attrs: window,
        compared, test, scale_free, notes.
    """
    check_settings(confidence=confidence, n_boot=n_boot, block=block, seed=seed)
    if isinstance(ds, xr.Dataset) and not stacked(ds):
        raise StatscopeError("compare_runs: expected stacked runs from open_runs, got one run")
    if method not in ("bootstrap", "brown-forsythe"):
        raise StatscopeError(f"method={method!r}: expected 'bootstrap' or 'brown-forsythe'")
    require(ds, [statistic, S.BN_STD, S.COUNT], "compare_runs")
    runs = {name: one for name, one, _ in split_runs(ds)}
    for r in (run_a, run_b):
        if str(r) not in runs:
            raise StatscopeError(f"compare_runs: run={r!r}: no such run; available: "
                                 f"{', '.join(runs)}")
    windows = [load_window(runs[str(r)], window) for r in (run_a, run_b)]
    what = f"{statistic}: {run_a} vs {run_b}"
    if method == "brown-forsythe":
        series = []
        for w in windows:
            x = masked(w, statistic)
            if scale_free:
                with quiet():
                    x = x / sigma_bar(w)
            series.append(x.transpose(S.STEP, S.NEURON).values)
        res = _result(windows[0], series[0], series[1], center, what)
    else:
        def stat(m: Moments) -> np.ndarray:
            with quiet():
                return m.std[statistic] / np.sqrt(m.mean[SIGMA2]) if scale_free \
                    else m.std[statistic]

        parts = [resample(window_series(w, (statistic, SIGMA2)), stat, n_boot=n_boot,
                          block=block, seed=seed + i, groups=Layers.of(w).ordinal)
                 for i, w in enumerate(windows)]
        iv = contrast(parts, (1.0, -1.0), confidence, log=True)
        res = _paired_result(windows[0], iv, what, "independent block bootstraps of "
                             "log(sd ratio), Welch t")
    res.attrs["scale_free"] = bool(scale_free)
    return res


def _result(w, va, vb, center, what) -> xr.Dataset:
    stat, p = levene(va, vb, center=center)
    with quiet():
        ratio = np.nanstd(va, 0, ddof=1) / np.nanstd(vb, 0, ddof=1)
    dims = [S.NEURON]
    coords = {k: v for k, v in w.coords.items() if v.dims == (S.NEURON,)}
    out = xr.Dataset({"statistic": (dims, stat), "p_value": (dims, p), "ratio": (dims, ratio)},
                     coords=coords)
    out.attrs = {"window": w.attrs["window"], "compared": what,
                 "test": "Brown-Forsythe" if center == "median" else "Levene", NOTES: [_AUTOCORR]}
    return out
