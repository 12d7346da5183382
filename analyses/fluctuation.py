"""Fluctuation (the paper's Figure 6): the standard deviation over steps of each statistic.

Per neuron and per statistic (``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``), within a window:

* raw: the sample standard deviation over the window's valid steps (ddof=1);
* detrended: a least-squares line in the global step is fitted per neuron over the window's valid
  steps and the standard deviation of the residuals is taken with ddof=2 (two fitted parameters),
  so slow training drift inside a long window is not counted as noise;
* scale-free: either of the above divided by the neuron's σ over the same window,
  σ̄ = sqrt(mean over steps of bn_std² · n/(n−1)) — the time-averaged BN std with its
  small-batch bias removed — so mean and std noise (δμ/σ, δσ/σ) compare across layers, runs and
  batch sizes.

Steps where the layer did not run (count 0) or where a value is NaN/Inf are excluded; how many
entered each neuron's reduction is returned as ``n_valid`` and the exclusions are noted in attrs.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, masked, quiet, require, sigma_bar
from ._names import N_VALID, NOTES
from .window import map_windows

__all__ = ["fluctuation", "series_std"]


def series_std(x: xr.DataArray, *, detrend: bool = False) -> xr.DataArray:
    """Standard deviation along step of a NaN-masked series, optionally after a linear detrend.

    Args:
        x: DataArray with a ``step`` dim (and its int coordinate); NaN marks excluded steps.
        detrend: remove a per-series least-squares line in ``step`` first (ddof=2), else ddof=1.

    Returns:
        DataArray without ``step``, float64; NaN where fewer than ddof + 1 steps are valid.

    Example:
        >>> x = xr.DataArray([1.0, 2.0, 3.0, 5.0], dims="step", coords={"step": [0, 1, 2, 3]})
        >>> round(float(series_std(x)), 4), round(float(series_std(x, detrend=True)), 4)
        (1.7078, 0.3873)
    """
    with quiet():
        if not detrend:
            return x.std(S.STEP, ddof=1, skipna=True)
        # One pass of sums (no mean needed first), so dask streams the chunks once and memory
        # stays bounded by them. Shifting t and x to a value inside the window keeps the
        # centred sums free of cancellation.
        ok = x.notnull()
        t = x[S.STEP].astype(np.float64)
        t = (t - t[0]).where(ok)
        xs = x.astype(np.float64)
        xs = xs - xs.isel({S.STEP: 0}).fillna(0.0)
        n = ok.sum(S.STEP)
        st, sx = t.sum(S.STEP), xs.sum(S.STEP)
        stt, sxx, stx = (t * t).sum(S.STEP), (xs * xs).sum(S.STEP), (t * xs).sum(S.STEP)
        ctt = stt - st * st / n
        cxx = sxx - sx * sx / n
        ctx = stx - st * sx / n
        rss = (cxx - ctx * ctx / ctt).clip(min=0)
        return cast(xr.DataArray, np.sqrt(rss / (n - 2))).where(n > 2)  # ufunc of a DataArray


def fluctuation(ds: xr.Dataset, window=200, *, scale_free: bool = False,
                detrend: bool = False, source: str | None = None,
                windows: xr.Dataset | None = None) -> xr.Dataset:
    """Per-neuron fluctuation of the BN and EN statistics within a window (Figure 6).

    Args:
        ds: a run (dims step, neuron), stacked runs (run, step, neuron), a distributed run
            (rank, step, neuron), or a run's window summaries (``statscope.store.open_windows``).
        window: see :func:`statscope.analyses.select_window`; default the paper's last 200 steps.
            From window summaries, a whole number of stored windows
            (:func:`statscope.analyses.summaries.summary_span`).
        scale_free: divide by the neuron's σ̄ (bias-corrected time-averaged ``bn_std``).
        detrend: remove a per-neuron linear trend in step within the window first (per-step
            series only).
        source: ``"steps"`` (the per-step columns: the kept channels) or ``"windows"`` (the
            window summaries: every channel, exactly the same raw quantity; see
            :mod:`statscope.analyses.summaries`). Default: ``"windows"`` when ``ds`` is window
            summaries or ``windows`` is given, else ``"steps"``.
        windows: the run's window summaries, when ``ds`` is its per-step Dataset and
            ``source="windows"`` (``ds`` then provides the element counts scale-free needs).

    Returns:
        Dataset, dims (neuron,), (run, neuron) or (rank, neuron), float64 vars ``bn_mean``,
        ``bn_std``, ``en_mean``, ``en_std`` (and the per-set statistics ``set_*`` when the run
        recorded them) (units of the activation, or of σ when scale-free)
        and int ``n_valid`` (steps used for ``bn_mean``), with coords layer, unit, group (and
        the run coords). attrs: window, scale_free, detrend, ddof, method, notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> f = fluctuation(demo_run(batch_size=16), window=100)  # unit 0: σ = 1
        >>> sorted(f.data_vars)
        ['bn_mean', 'bn_std', 'en_mean', 'en_std', 'n_valid']
        >>> round(float(f.bn_mean[0]), 2)  # σ/√N = 0.25
        0.28
    """
    from .summaries import is_summaries, summary_fluctuation

    if source is None:
        source = "windows" if windows is not None or is_summaries(ds) else "steps"
    if source not in ("steps", "windows"):
        raise StatscopeError(f"source={source!r}: expected 'steps' or 'windows'")
    if source == "windows":
        summ = windows if windows is not None else ds
        if not is_summaries(summ):
            raise StatscopeError("source='windows': pass the run's window summaries "
                                 "(statscope.store.open_windows(path)) as ds or as windows=")
        return summary_fluctuation(summ, window, scale_free=scale_free, detrend=detrend,
                                   steps=None if ds is summ else ds)
    if is_summaries(ds):
        raise StatscopeError("source='steps': ds holds window summaries; use source='windows'")
    require(ds, [*FLUCT_STATS, S.COUNT], "fluctuation")
    if detrend and isinstance(window, (int, np.integer)) and not isinstance(window, bool) \
            and 2 <= window < 3:
        raise StatscopeError(f"window={window} with detrend=True: a line through 2 steps leaves "
                             f"no spread; pass at least 3 steps")
    return map_windows(ds, window, lambda w: _fluctuation(w, scale_free, detrend))


def _fluctuation(w: xr.Dataset, scale_free: bool, detrend: bool) -> xr.Dataset:
    """:func:`fluctuation` of one run's window."""
    names = (*FLUCT_STATS, *(s for s in S.SET_STATS if s in w))  # per-set ones when recorded
    series = {s: masked(w, s) for s in names}
    out = {s: series_std(x, detrend=detrend) for s, x in series.items()}
    sigma = None
    if scale_free:
        with quiet():
            sigma = sigma_bar(w)
        out = {s: v / sigma for s, v in out.items()}
    out[N_VALID] = series[S.BN_MEAN].notnull().sum(S.STEP)
    excluded = {s: ((w[S.COUNT] > 0) & ~np.isfinite(w[s])).sum() for s in names}
    not_run = (w[S.COUNT] <= 0).sum()
    steps = (w[S.COUNT] > 0).any(S.NEURON).sum()  # of the window, where any layer ran
    result = xr.Dataset(out)
    result, excluded, not_run, steps = _compute(result, excluded, not_run, steps)
    notes = _exclusion_notes(excluded, not_run)
    notes += _sparse_layer_notes(result[N_VALID], steps, 3 if detrend else 2)
    notes += _constant_notes(result, names, scale_free)
    if scale_free and not np.all(np.isfinite(result[S.BN_MEAN].values)):
        notes.append("scale-free fluctuation is NaN/Inf where a neuron's time-averaged bn_std is "
                     "0 or the window has too few valid steps")
    result.attrs = {
        "window": w.attrs["window"], "scale_free": bool(scale_free), "detrend": bool(detrend),
        "ddof": 2 if detrend else 1,
        "method": ("std of residuals of a per-neuron least-squares line in step"
                   if detrend else "sample std over steps"),
        NOTES: notes,
    }
    return result


def _compute(result, excluded, not_run, steps):
    import dask

    result, excluded, not_run, steps = dask.compute(result, excluded, not_run, steps)
    return result, {k: int(v) for k, v in excluded.items()}, int(not_run), int(steps)


def _sparse_layer_notes(n_valid: xr.DataArray, steps: int, least: int) -> list[str]:
    """Which layers ran in fewer of the window's steps than it has (layer-drop, branches that
    skip), and which in too few for a fluctuation (their rows are NaN)."""
    if steps < least:
        return [f"the window has {steps} steps with data; a fluctuation needs {least}"
                f"{' (detrended: a line through 2 steps leaves no spread)' if least == 3 else ''}"
                f": every value is NaN"]
    if S.LAYER not in n_valid.coords:
        return []
    runs = n_valid.groupby(S.LAYER).max()
    partial = [(str(name), int(n)) for name, n in zip(runs[S.LAYER].values, runs.values)
               if n < steps]
    if not partial:
        return []
    said = ", ".join(f"{name!r} in {n}" + (f" (too few for a fluctuation: NaN; {least} needed)"
                                           if n < least else "") for name, n in partial)
    return [f"layers with values in only some of the window's {steps} steps: {said}"]


def _constant_notes(result: xr.Dataset, names, scale_free: bool) -> list[str]:
    """Which layers have a statistic that did not move over the window at any of their
    neurons: its fluctuation is 0, and every ratio of it (claims, excess) is undefined."""
    if S.LAYER not in result.coords:
        return []
    lay = np.asarray(result[S.LAYER].values)
    notes = []
    for s in names:
        values = result[s].values.reshape(-1, lay.size) if result[s].ndim > 1 \
            else result[s].values[None]
        flat = [str(la) for la in dict.fromkeys(lay)
                if np.all(values[:, lay == la] == 0)]
        if flat:
            notes.append(f"{s} is constant over the window at every neuron of layer"
                         f"{'s' if len(flat) > 1 else ''} {', '.join(map(repr, flat))}: its "
                         f"fluctuation is 0{' (scale-free: 0 or NaN)' if scale_free else ''}, "
                         f"and ratios of it are undefined")
    return notes


def _exclusion_notes(excluded: dict, not_run: int) -> list[str]:
    notes = []
    if not_run:
        notes.append(f"{not_run} (step, neuron) cells in the window had count 0 (layer did not "
                     f"run) and were excluded")
    for name, n in excluded.items():
        if n:
            notes.append(f"{n} (step, neuron) cells of {name} were NaN/Inf although the layer ran; "
                         f"excluded")
    return notes
