"""Brown–Forsythe and Levene tests: does one statistic fluctuate more than another?

Each neuron's two series within the window (e.g. its ``bn_mean`` and ``en_mean``, or its
``bn_std`` in two runs) are compared with Levene's test: a one-way ANOVA F on the absolute
deviations from each series' centre — the median (Brown–Forsythe, robust to heavy tails) or the
mean (Levene's original). The test assumes independent observations; steps are autocorrelated,
which makes its p-values too small, so :func:`statscope.analyses.claims` bases its verdicts on the
block bootstrap and these tests serve as a conventional cross-check.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import masked, quiet, require, sigma_bar, stacked
from ._names import NOTES
from .window import load_window

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
        p = stats.f.sf(w, 1, n - 2)
    return w, p


def compare_statistics(ds: xr.Dataset, a: str = S.BN_MEAN, b: str = S.EN_MEAN, window=200, *,
                       center: str = "median") -> xr.Dataset:
    """Per neuron, test whether statistic ``a`` fluctuates differently from ``b`` over steps.

    Args:
        ds: a run or stacked runs.
        a, b: statistic names, e.g. ``bn_std`` and ``en_std``.
        window: see :func:`statscope.analyses.select_window`.
        center: "median" (Brown–Forsythe) or "mean" (Levene).

    Returns:
        Dataset (neuron,) or (run, neuron): ``statistic`` (W), ``p_value`` (two-sided),
        ``ratio`` = sd(a)/sd(b) (the direction). attrs: window, test, notes.
    """
    require(ds, [a, b, S.COUNT], "compare_statistics")
    w = load_window(ds, window)
    xa, xb = (masked(w, s) for s in (a, b))
    dims = [*([S.RUN] if stacked(ds) else []), S.STEP, S.NEURON]
    va = np.moveaxis(xa.transpose(*dims).values, -2, 0)
    vb = np.moveaxis(xb.transpose(*dims).values, -2, 0)
    return _result(w, va, vb, center, f"{a} vs {b}")


def compare_runs(ds: xr.Dataset, run_a, run_b, statistic: str = S.BN_STD, window=200, *,
                 scale_free: bool = True, center: str = "median") -> xr.Dataset:
    """Per neuron, test whether ``statistic`` fluctuates differently in two stacked runs.

    Args:
        ds: stacked runs from ``open_runs``.
        run_a, run_b: run names (values of the ``run`` coordinate), e.g. "bs4", "bs128".
        statistic: e.g. ``bn_std``.
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        scale_free: divide each run's series by the neuron's σ̄ in that run,
            so runs at different scales (learning rates) compare.
        center: "median" (Brown–Forsythe) or "mean" (Levene).

    Returns:
        Dataset (neuron,): ``statistic``, ``p_value``, ``ratio`` = sd in a / sd in b.
    """
    if not stacked(ds):
        raise StatscopeError("compare_runs: expected stacked runs from open_runs, got one run")
    names = [str(r) for r in ds[S.RUN].values]
    for r in (run_a, run_b):
        if str(r) not in names:
            raise StatscopeError(f"compare_runs: run={r!r}: no such run; available: "
                                 f"{', '.join(names)}")
    require(ds, [statistic, S.BN_STD, S.COUNT], "compare_runs")
    series = []
    for r in (run_a, run_b):
        w = load_window(ds.sel({S.RUN: r}), window)
        x = masked(w, statistic)
        if scale_free:
            with quiet():
                x = x / sigma_bar(w)
        series.append(x.transpose(S.STEP, S.NEURON).values)
    res = _result(w, *series, center, f"{statistic}: {run_a} vs {run_b}")
    res.attrs["scale_free"] = bool(scale_free)
    return res


def _result(w, va, vb, center, what) -> xr.Dataset:
    stat, p = levene(va, vb, center=center)
    with quiet():
        ratio = np.nanstd(va, 0, ddof=1) / np.nanstd(vb, 0, ddof=1)
    lead = [S.RUN] if stat.ndim == 2 else []
    dims = [*lead, S.NEURON]
    coords = {k: v for k, v in w.coords.items() if set(v.dims) <= set(dims) and S.STEP not in v.dims}
    out = xr.Dataset({"statistic": (dims, stat), "p_value": (dims, p), "ratio": (dims, ratio)},
                     coords=coords)
    out.attrs = {"window": w.attrs["window"], "compared": what,
                 "test": "Brown-Forsythe" if center == "median" else "Levene", NOTES: [_AUTOCORR]}
    return out
