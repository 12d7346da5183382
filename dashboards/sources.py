"""Where the fluctuation views' numbers come from: the per-step series, or the window summaries.

The Fluctuation (Fig. 6) and Std-vs-mean views need the fluctuation of *every* neuron of a run
over the chosen window. From the per-step series that reads neurons × steps values: nothing for
the paper's net, 524 million for an LLM's 80 × 8,192 channels over 200 steps. Runs also keep
**window summaries** (:func:`statscope.store.open_windows`): the mean and standard deviation
(ddof = 1) of every statistic of every channel over each window of W steps. The fluctuation over
whole windows follows from them exactly — for one window it *is* the window's std; over several,
the pooled variance of their means, stds and step counts — reading steps / W rows.

Per run and rank choice, :func:`choose` picks, and the page says which:

1. **window summaries**, when the chosen window is exactly a run of whole windows and the
   per-step read exceeds :data:`~statscope.dashboards.limits.MAX_SERIES_VALUES` or the series
   keeps fewer channels than the summaries (``neurons=`` at recording);
2. **per-step series** (``statscope.analyses``), when its read fits the budget — exact for any
   window, with bootstrap intervals and the sampling baseline;
3. **window summaries of the whole windows inside** the chosen window (a slightly different
   window, named on the page), when the series is too large;
4. **a sample** of each layer's neurons, evenly spaced, from the per-step series, when the run
   keeps no summaries (or the view merges ranks, which have none) and has more neurons than
   :data:`~statscope.dashboards.limits.MAX_SCATTER_POINTS`;
5. otherwise the per-step series of every neuron (exact, slow).

The window-summary arithmetic is the dashboard's: ``statscope.analyses`` has no reader of window
summaries yet. Its scale-free version divides by σ̄ = sqrt(mean over steps of
bn_std² · n/(n−1)), from the windows' mean and std of ``bn_std`` and the per-step element count
``n`` (exact when ``n`` is constant within the window, as with a fixed batch size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S

from .data import layer_slices
from .limits import MAX_SCATTER_POINTS, MAX_SERIES_VALUES

__all__ = ["SERIES", "WINDOWS", "SAMPLE", "Source", "Fluct", "choose", "whole_windows",
           "windowed", "sample_positions", "FLUCT_STATS"]

SERIES, WINDOWS, SAMPLE = "per-step series", "window summaries", "sample"
FLUCT_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)


@dataclass(frozen=True)
class Source:
    """How one run view's fluctuation is computed.

    Attributes:
        kind: :data:`SERIES`, :data:`WINDOWS` or :data:`SAMPLE`.
        note: the line the page shows about it ("" for the per-step series of every neuron).
        windows: for :data:`WINDOWS`, the window rows used, ``(first, stop)``.
        exact: whether the numbers are those of the chosen window and every neuron.
        positions: for :data:`SAMPLE`, the neurons analysed (positions along ``neuron``).
    """

    kind: str
    note: str = ""
    windows: tuple[int, int] | None = None
    exact: bool = True
    positions: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Fluct:
    """The fluctuation of one run view, as ``statscope.analyses.fluctuation`` lays it out.

    Attributes:
        values: (neuron,) ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std`` and ``n_valid``, with
            coords ``layer``, ``unit``, over the neurons the source covers.
        summary: ``analyses.layer_summary(values)``: (layer, quantity).
        source: how it was computed.
        find: ``find(layer, unit)``: a neuron's position in ``values``, or ``None``.
    """

    values: xr.Dataset
    summary: xr.Dataset
    source: Source
    find: Callable[[str, int], int | None]

    @property
    def nbytes(self) -> int:
        """Bytes held (for the dashboard's byte-bounded cache)."""
        return int(self.values.nbytes) + int(self.summary.nbytes)


def whole_windows(w: xr.Dataset, steps: np.ndarray, rows: slice) -> tuple[int, int, bool] | None:
    """The window summaries that lie wholly inside ``rows`` of a run's steps.

    A summary row ``k`` (first step ``s_k``) holds the recorded steps in ``[s_k, s_k + W)``; it
    is inside when all of them fall in ``rows`` (the run's last, partial window counts once it
    is written, at the end of the run).

    Args:
        w: ``open_windows`` of the run.
        steps: (step,) the run's recorded steps.
        rows: the chosen rows of ``steps``.

    Returns:
        ``(first, stop, exact)``: summary rows ``first..stop-1`` are inside, ``exact`` when
        together they hold exactly the chosen rows; ``None`` when none is inside.

    Example:
        >>> w = xr.Dataset(coords={"step": ("window", [0, 200, 400])},
        ...                attrs={"window_steps": 200})
        >>> whole_windows(w, np.arange(600), slice(400, 600)), whole_windows(w, np.arange(600),
        ...                                                                   slice(350, 600))
        ((2, 3, True), (2, 3, False))
    """
    width = int(w.attrs.get(S.ATTR_WINDOW_STEPS) or 0)
    starts = np.asarray(w[S.STEP].values, np.int64)
    if not width or not starts.size or rows.stop <= rows.start:
        return None
    lo = np.searchsorted(steps, starts, "left")
    hi = np.searchsorted(steps, starts + width, "left")
    inside = np.flatnonzero((lo >= rows.start) & (hi <= rows.stop) & (hi > lo))
    if not inside.size:
        return None
    first, last = int(inside[0]), int(inside[-1])
    if last - first + 1 != inside.size:  # windows are consecutive; a gap would be damage
        return None
    exact = lo[first] == rows.start and hi[last] == rows.stop
    return first, last + 1, bool(exact)


def choose(n_neurons: int, steps: np.ndarray, rows: slice, w: xr.Dataset | None,
           layers: dict[str, np.ndarray] | None = None) -> Source:
    """Pick the source of one run view's fluctuation (the rules in the module docstring).

    Args:
        n_neurons: neurons of the view's per-step series.
        steps: (step,) the run's recorded steps.
        rows: the chosen window's rows of ``steps``.
        w: the view's window summaries, or ``None`` (none kept, in memory, merged ranks).
        layers: the view's layer positions (:func:`~statscope.dashboards.data.layer_slices`),
            needed to draw a sample.
    """
    n_rows = rows.stop - rows.start
    series = n_neurons * n_rows
    span = whole_windows(w, steps, rows) if w is not None else None
    wider = w is not None and w.sizes[S.NEURON] > n_neurons
    if span is not None and span[2] and (series > MAX_SERIES_VALUES or wider):
        return Source(WINDOWS, _window_note(w, steps, span), span[:2], True)
    if series <= MAX_SERIES_VALUES:
        return Source(SERIES)
    if span is not None:
        return Source(WINDOWS, _window_note(w, steps, span), span[:2], False)
    if n_neurons > MAX_SCATTER_POINTS and layers:
        per_layer = max(1, MAX_SERIES_VALUES // max(1, n_rows) // len(layers))
        pos = sample_positions(layers, per_layer)
        return Source(SAMPLE, f"fluctuation of {pos.size:,} of {n_neurons:,} neurons (evenly "
                              f"spaced in each layer; this run keeps no window summaries for "
                              "this view)", None, False, pos)
    return Source(SERIES)


def _window_note(w: xr.Dataset, steps: np.ndarray, span: tuple[int, int, bool]) -> str:
    first, stop, exact = span
    width = int(w.attrs[S.ATTR_WINDOW_STEPS])
    starts = np.asarray(w[S.STEP].values)
    a = int(starts[first])
    b = int(min(starts[stop - 1] + width, steps[-1] + 1)) - 1
    n = stop - first
    what = f"{n:,} window{'s' if n > 1 else ''} of {width:,} steps"
    if exact:
        return f"from the window summaries ({what}, every channel)"
    return (f"from the window summaries of steps {a:,}–{b:,} ({what}, every channel): the "
            "whole windows inside the chosen window, whose per-step series is too large")


def sample_positions(layers: dict[str, np.ndarray], per_layer: int) -> np.ndarray:
    """Up to ``per_layer`` evenly spaced positions of each layer (its first always), sorted.

    Example:
        >>> sample_positions({"a": np.arange(10), "b": np.arange(10, 12)}, 3).tolist()
        [0, 4, 9, 10, 11]
    """
    out = []
    for pos in layers.values():
        if pos.size <= per_layer:
            out.append(pos)
        else:
            out.append(pos[np.unique(np.linspace(0, pos.size - 1, per_layer).astype(np.int64))])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def windowed(w: xr.Dataset, span: tuple[int, int], factor: np.ndarray | None = None
             ) -> tuple[xr.Dataset, np.ndarray | None]:
    """The fluctuation of every channel over whole windows, from the window summaries.

    Over windows ``k`` with steps ``c_k``, means ``m_k`` and stds ``s_k`` (ddof = 1): the
    pooled ``N = Σ c_k``, ``M = Σ c_k m_k / N`` and ``std = sqrt(Σ [(c_k − 1) s_k² +
    c_k (m_k − M)²] / (N − 1))`` — the sample std (ddof = 1) over all their steps, as
    ``analyses.fluctuation`` computes it from the per-step series. A window in which a channel
    held a non-finite value is NaN for it (the analyses skip such steps instead).

    Args:
        w: ``open_windows`` of the run.
        span: summary rows ``(first, stop)``.
        factor: per channel, the window mean of ``n/(n−1)`` (n: elements of a step's batch);
            with it σ̄ is returned too.

    Returns:
        ``(fluct, sigma)``: fluct a Dataset (neuron,) like ``analyses.fluctuation``'s (float64
        ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``, int ``n_valid``; coords ``layer``,
        ``unit``, ``group``, ``label``); sigma (neuron,) σ̄ or ``None``.
    """
    sel = w.isel({S.WINDOW_DIM: slice(*span)})
    one = span[1] - span[0] == 1
    want: dict[str, Any] = {S.COUNT: sel[S.COUNT]}
    for stat in FLUCT_STATS:
        if stat not in sel:
            continue
        want[f"{stat}/std"] = sel[stat].sel({S.SUMMARY: "std"}, drop=True)
        if not one:
            want[f"{stat}/mean"] = sel[stat].sel({S.SUMMARY: "mean"}, drop=True)
    if factor is not None and S.BN_STD in sel and one:
        want[f"{S.BN_STD}/mean"] = sel[S.BN_STD].sel({S.SUMMARY: "mean"}, drop=True)
    # one compute for all of them: the reads share the scheduler's threads
    read = xr.Dataset(want).compute()
    got = {k: read[k].values for k in want}
    c = np.asarray(got[S.COUNT], np.float64)
    n = c.sum(0)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for stat in FLUCT_STATS:
            if f"{stat}/std" not in got:
                continue
            sd = np.asarray(got[f"{stat}/std"], np.float64)
            if one:
                out[stat] = np.where(n > 1, sd[0], np.nan)
                continue
            m = np.asarray(got[f"{stat}/mean"], np.float64)
            used = c > 0
            grand = np.where(used, c * m, 0.0).sum(0) / n
            ss = np.where(c > 1, (c - 1) * sd ** 2, 0.0) + np.where(used, c * (m - grand) ** 2, 0.0)
            bad = (used & ~np.isfinite(m)) | ((c > 1) & ~np.isfinite(sd))
            out[stat] = np.where((n > 1) & ~bad.any(0), np.sqrt(ss.sum(0) / (n - 1)), np.nan)
        sigma = None
        if factor is not None and f"{S.BN_STD}/mean" in got:
            m = np.asarray(got[f"{S.BN_STD}/mean"], np.float64)
            sd = np.asarray(got[f"{S.BN_STD}/std"], np.float64)
            used = c > 0
            sq = np.where(used, c * m ** 2, 0.0) + np.where(c > 1, (c - 1) * sd ** 2, 0.0)
            sigma = np.sqrt(sq.sum(0) / n * factor)
    coords = {k: (S.NEURON, np.asarray(sel[k].values)) for k in (S.LAYER, S.UNIT, S.GROUP, S.LABEL)
              if k in sel.coords}
    data = {k: (S.NEURON, v) for k, v in out.items()}
    data["n_valid"] = (S.NEURON, n.astype(np.int64))
    return xr.Dataset(data, coords=coords), sigma


def channel_finder(w: xr.Dataset, layers: dict[str, np.ndarray]) -> Callable[[str, int], int | None]:
    """``find(layer, unit)`` over window summaries, which hold every channel of each layer in
    unit order: the layer's first position plus the unit."""
    first = {k: int(v[0]) for k, v in layers.items()}
    size = {k: int(v.size) for k, v in layers.items()}

    def find(layer: str, unit: int) -> int | None:
        if layer not in first or not 0 <= int(unit) < size[layer]:
            return None
        return first[layer] + int(unit)

    return find


def index_finder(values: xr.Dataset) -> Callable[[str, int], int | None]:
    """``find(layer, unit)`` over the neurons of ``values`` (a dict built once)."""
    index = {(str(l), int(u)): i for i, (l, u) in enumerate(
        zip(values[S.LAYER].values.tolist(), values[S.UNIT].values.tolist()))}
    return lambda layer, unit: index.get((layer, int(unit)))


def windows_layers(w: xr.Dataset) -> dict[str, np.ndarray]:
    """Positions of each layer's channels in window summaries."""
    return layer_slices(np.asarray(w[S.LAYER].values))


def layer_of_channel(layers: dict[str, np.ndarray], n: int) -> tuple[list[str], np.ndarray]:
    """Layer names in order and, per channel, the index of its layer, (n,) int64."""
    names = list(layers)
    out = np.zeros(n, np.int64)
    for i, pos in enumerate(layers.values()):
        out[pos] = i
    return names, out
