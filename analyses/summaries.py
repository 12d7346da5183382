"""Figure 6 from the window summaries: the fluctuation of every channel without its per-step series.

While recording, the writer keeps for every statistic of **every** channel its exact mean and
standard deviation (ddof = 1) over consecutive windows of ``W`` steps
(:func:`statscope.store.open_windows`), also for channels whose per-step columns were not kept
(``record(..., neurons=k)``). The raw fluctuation over a window of steps made of whole stored
windows is then the same quantity as :func:`statscope.analyses.fluctuation` computes from the
per-step series: the windows' counts, means and standard deviations merge exactly into those of
their union (Chan et al.'s pairwise formula), so only float32 storage rounding separates the two.

What the summaries cannot give:

* a window that does not coincide with stored windows (``W`` not a multiple of ``window_steps``,
  a fraction of training, a range not on window boundaries): refused, naming the windows there are;
* ``detrend=True``: a line fitted over the steps needs the steps;
* a step at which a value was NaN/Inf: its window is NaN for that column (the per-step analysis
  leaves the step out instead); noted.

``scale_free=True`` divides by σ̄ = √(mean over steps of ``bn_std² · n/(n−1)``). The window
summaries give the mean of ``bn_std²`` exactly (mean² + std²·(m−1)/m over each window's m steps);
the element count ``n`` of each step is not in them, so it is read from the run's per-step
``count`` (one column per layer, kept for every layer) and must be constant over the window,
as it is at a fixed batch size — else the result is refused.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, quiet
from ._names import N_VALID, NOTES

__all__ = ["summary_fluctuation", "is_summaries", "summary_span"]


def is_summaries(ds) -> bool:
    """Whether ``ds`` is a run's window summaries (from :func:`statscope.store.open_windows`)."""
    return isinstance(ds, xr.Dataset) and S.WINDOW_DIM in ds.dims and S.SUMMARY in ds.dims


def summary_span(summaries: xr.Dataset, window=200) -> tuple[np.ndarray, int, int, str]:
    """The stored windows that make up ``window``.

    Args:
        summaries: from :func:`statscope.store.open_windows`.
        window: an int ``W`` (a multiple of the run's ``window_steps``: the last ``W /
            window_steps`` complete windows — no recorded step of theirs still to come), a ``(start, stop)`` pair of steps on window
            boundaries, or ``"all"``/None (every stored window, the last one also when partial).

    Returns:
        (rows of ``summaries`` to merge, first step, stop step (exclusive), the window as text).

    Raises:
        StatscopeError: a window the summaries do not cover exactly, or no windows.
    """
    length = int(summaries.attrs.get(S.ATTR_WINDOW_STEPS) or 0)
    if length <= 0:
        raise StatscopeError("summaries: no window_steps attribute; expected the Dataset of "
                             "statscope.store.open_windows")
    starts = np.asarray(summaries[S.STEP].values, np.int64)
    if starts.size == 0:
        raise StatscopeError("summaries: the run has no window summaries yet")
    last = summaries.attrs.get(S.ATTR_LAST_STEP)
    last = int(starts[-1] + length - 1) if last is None else int(last)
    stops = np.minimum(starts + length, last + 1)
    have = f"windows of {length} steps from step {starts[0]} to {stops[-1]}"
    if window is None or (isinstance(window, str) and window == "all"):
        rows = np.arange(starts.size)
        return rows, int(starts[0]), int(stops[-1]), "all steps"
    if isinstance(window, (bool, np.bool_, float, np.floating)):
        raise StatscopeError(f"window={window!r}: window summaries cover whole windows of "
                             f"{length} steps; pass a multiple of {length}, a (start, stop) "
                             f"range on window boundaries, or 'all' (or use the per-step series)")
    if isinstance(window, (int, np.integer)):
        if window < length or window % length:
            raise StatscopeError(f"window={window}: window summaries cover whole windows of "
                                 f"{length} steps; pass a multiple of {length} (or use the "
                                 f"per-step series)")
        every = max(1, int(summaries.attrs.get(S.ATTR_EVERY) or 1))
        complete = np.flatnonzero(starts + length - every <= last)  # no recorded step to come
        k = int(window) // length
        if complete.size < k:
            raise StatscopeError(f"window={window}: the run has {complete.size} complete "
                                 f"{have}")
        rows = complete[-k:]
        if starts[rows[-1]] - starts[rows[0]] != (k - 1) * length:
            raise StatscopeError(f"window={window}: the last {k} complete windows are not "
                                 f"consecutive (steps without a record between them); pass a "
                                 f"(start, stop) range")
        start, stop = int(starts[rows[0]]), int(starts[rows[-1]] + length)
        return rows, start, stop, (f"last {window} steps in whole stored windows: "
                                   f"[{start}, {stop})")
    if isinstance(window, (tuple, list)) and len(window) == 2:
        start, stop = (int(v) for v in window)
        if stop <= start:
            raise StatscopeError(f"window={tuple(window)}: stop must exceed start")
        if start < starts[0] or stop > stops[-1]:  # as the per-step path refuses it
            raise StatscopeError(f"window={tuple(window)}: outside the run, which has {have}")
        rows = np.flatnonzero((starts >= start) & (starts < stop))
        ends = stop == int(stops[-1]) and rows.size and rows[-1] == starts.size - 1
        if (start % length or (stop % length and not ends) or rows.size == 0
                or starts[rows[0]] != start or stops[rows[-1]] < min(stop, last + 1)):
            raise StatscopeError(f"window={tuple(window)}: not made of whole stored windows; "
                                 f"the run has {have} (ranges start and stop on multiples of "
                                 f"{length})")
        return rows, start, stop, f"steps [{start}, {stop})"
    raise StatscopeError(f"window={window!r}: expected an int, a (start, stop) tuple or 'all'")


def summary_fluctuation(summaries: xr.Dataset, window=200, *, scale_free: bool = False,
                        detrend: bool = False, steps: xr.Dataset | None = None) -> xr.Dataset:
    """Per-channel fluctuation (Figure 6) from the window summaries, over every channel.

    Args:
        summaries: from :func:`statscope.store.open_windows` (one run, or one rank's store).
        window: see :func:`summary_span`.
        scale_free: divide by the channel's σ̄ (needs ``steps`` for the element counts).
        detrend: not available from summaries (refused).
        steps: the same run's per-step Dataset (``open_run``), for its ``count``.

    Returns:
        Dataset (neuron,) over every channel, as :func:`statscope.analyses.fluctuation`:
        float64 ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``, int ``n_valid``; coords
        layer, unit, group, label. attrs: window, source ("windows"), scale_free, detrend,
        ddof, method, notes.

    Raises:
        StatscopeError: detrend, a window the summaries do not cover, or scale-free without
            ``steps`` or with a varying element count.

    Example:
        >>> import numpy as np, xarray as xr
        >>> x = np.array([1.0, 2.0, 4.0, 3.0, 7.0, 5.0])  # two windows of 3 steps, one channel
        >>> w = [x[:3], x[3:]]
        >>> summ = xr.Dataset(
        ...     {"bn_mean": (("window", "summary", "neuron"),
        ...                  [[[v.mean()], [v.std(ddof=1)]] for v in w]),
        ...      "count": (("window", "neuron"), [[3], [3]])},
        ...     coords={"step": ("window", [0, 3]), "summary": ["mean", "std"],
        ...             "layer": ("neuron", ["fc1"])}, attrs={"window_steps": 3})
        >>> f = summary_fluctuation(summ, "all")
        >>> bool(np.isclose(f.bn_mean[0], x.std(ddof=1)))
        True
    """
    if detrend:
        raise StatscopeError("detrend=True: the window summaries keep each window's mean and "
                             "std, not the steps a trend line is fitted to; use the per-step "
                             "series (source='steps')")
    rows, start, stop, text = summary_span(summaries, window)
    part = summaries.isel({S.WINDOW_DIM: rows}).load()
    n = part[S.COUNT].astype(np.float64)
    out, notes = {}, []
    present = [s for s in FLUCT_STATS if s in part]
    with quiet():
        for s in present:
            _, _, sd, bad = _merge(part[s], n)
            out[s] = sd
            k = int(bad.sum())
            if k:
                notes.append(f"{k} (window, channel) cells of {s} hold NaN although the layer "
                             f"ran (a non-finite value in that window): those channels are NaN "
                             f"(the per-step analysis would leave the steps out)")
        if scale_free:
            sigma = _sigma_bar(part, n, steps, start, stop)
            out = {s: v / sigma for s, v in out.items()}
    out[N_VALID] = n.sum(S.WINDOW_DIM).astype(np.int64)
    coords = {k: v for k, v in part.coords.items() if v.dims == (S.NEURON,)}
    result = xr.Dataset(out, coords=coords)
    result.attrs = {"window": text, "source": "windows", "scale_free": bool(scale_free),
                    "detrend": False, "ddof": 1,
                    "method": "sample std over steps, merged exactly from the stored windows' "
                              "counts, means and stds",
                    NOTES: [f"from the window summaries ({rows.size} windows of "
                            f"{int(summaries.attrs[S.ATTR_WINDOW_STEPS])} steps), every "
                            f"channel; the same quantity as the per-step fluctuation up to "
                            f"float32 storage rounding"] + notes}
    return result


def _merge(var: xr.DataArray, n: xr.DataArray):
    """Mean, sum of squared deviations and std (ddof=1) of the union of windows, per column;
    and the cells of windows that ran but hold NaN."""
    m = var.sel({S.SUMMARY: "mean"}).astype(np.float64)
    s = var.sel({S.SUMMARY: "std"}).astype(np.float64)
    ran = n > 0
    bad = ran & ~np.isfinite(m)
    total = n.where(ran).sum(S.WINDOW_DIM)
    mean = (n * m).where(ran).sum(S.WINDOW_DIM) / total
    within = ((n - 1) * s ** 2).where(n > 1, 0.0).where(ran, 0.0)
    m2 = (within + n * (m - mean) ** 2).where(ran, 0.0).sum(S.WINDOW_DIM, skipna=False)
    sd = cast(xr.DataArray, np.sqrt(m2 / (total - 1))).where(total > 1)  # ufunc of a DataArray
    sd = sd.where(~bad.any(S.WINDOW_DIM))
    return mean, m2, sd, bad


def _sigma_bar(part: xr.Dataset, n: xr.DataArray, steps, start: int, stop: int) -> xr.DataArray:
    """σ̄ per channel: √(mean of bn_std² over the steps · c/(c−1)), c the layer's constant
    element count read from the per-step run."""
    if steps is None or S.COUNT not in getattr(steps, "variables", {}):
        raise StatscopeError("scale_free=True from window summaries: the element count of each "
                             "step is not in them; pass the run's per-step Dataset as steps= "
                             "(fluctuation(ds, source='windows', windows=summaries))")
    mean, m2, _, _ = _merge(part[S.BN_STD], n)
    total = n.sum(S.WINDOW_DIM)
    mean_sq = m2 / total + mean ** 2  # mean over steps of bn_std²
    sel = steps[S.COUNT].sel({S.STEP: slice(start, stop - 1)})
    factor = np.full(part.sizes[S.NEURON], np.nan)
    lay_steps = np.asarray(steps[S.LAYER].values)
    lay = np.asarray(part[S.LAYER].values)
    for name in dict.fromkeys(lay.tolist()):
        cols = np.flatnonzero(lay_steps == name)
        if cols.size == 0:
            continue
        c = np.asarray(sel.isel({S.NEURON: int(cols[0])}).values)
        c = c[c > 0]
        if c.size == 0:
            continue
        if np.any(c != c[0]):
            raise StatscopeError(f"scale_free=True from window summaries: layer {name!r} "
                                 f"changes its element count within the window ({int(c.min())}"
                                 f"..{int(c.max())}), so σ̄ needs the per-step bn_std; use "
                                 f"source='steps'")
        factor[lay == name] = c[0] / (c[0] - 1.0) if c[0] > 1 else np.nan
    return np.sqrt(mean_sq * xr.DataArray(factor, dims=S.NEURON))
