"""The std-versus-mean view: one point per neuron, the fluctuation of BN_mean against BN_std."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from statscope import schema as S

from .data import layer_slices, neuron_key
from .grid import Grid
from .limits import MAX_SCATTER_POINTS, RUNS_PER_PAGE
from .metrics import inclusive
from .style import TEMPLATE_JSON, empty_spec, header, header_height, layer_colors

__all__ = ["scatter_figure", "scatter_spec", "scatter_subset"]


def _thin(sel: np.ndarray, keep: int) -> np.ndarray:
    """At most ``keep`` of ``sel``, evenly spaced, the first always kept."""
    if sel.size <= keep:
        return sel
    return sel[np.unique(np.linspace(0, sel.size - 1, max(1, keep)).astype(np.int64))]


def scatter_subset(layers: Mapping[str, np.ndarray], size: int, most: int) -> np.ndarray:
    """Positions of at most about ``most`` of ``size`` neurons, each layer thinned evenly (its
    first neuron kept), sorted; every position when ``size <= most``.

    Args:
        layers: each layer's positions (:func:`~statscope.dashboards.data.layer_slices`).
        size: neurons in all.
        most: the budget.

    Example:
        >>> scatter_subset({"a": np.arange(8), "b": np.arange(8, 12)}, 12, 6).tolist()
        [0, 2, 4, 7, 8, 11]
    """
    if size <= most:
        return np.arange(size)
    share = most / max(1, size)
    parts = [_thin(sel, max(1, int(np.ceil(sel.size * share)))) for sel in layers.values()]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def scatter_spec(fluct: Mapping[str, xr.Dataset], *, layers: Sequence[str] | None = None,
                 titles: Mapping[str, str] | None = None, scale_free: bool = True,
                 max_cols: int = RUNS_PER_PAGE, max_points: int = MAX_SCATTER_POINTS,
                 notes: Sequence[str] = (), totals: Mapping[str, int] | None = None,
                 window: str | None = None) -> dict:
    """The std-versus-mean view as a plotly figure dict (what :func:`scatter_figure` wraps);
    ``window`` is the window the title names (default: the first run's, as the analyses
    describe it)."""
    if not fluct:
        return empty_spec("Choose at least one run.")
    names = list(fluct)
    titles = titles or {}
    groups = {n: layer_slices(fluct[n][S.LAYER].values) for n in names}
    layers = list(layers or dict.fromkeys(l for g in groups.values() for l in g))
    colors = layer_colors(layers)
    per_run = max(1, max_points // len(names))
    notes = list(notes)
    total = sum((totals or {}).get(n, fluct[n].sizes[S.NEURON]) for n in names)
    drawn = {}
    for n in names:
        size = fluct[n].sizes[S.NEURON]
        share = per_run / max(1, size)
        drawn[n] = {l: _thin(sel, max(1, int(np.ceil(sel.size * share)))) if size > per_run
                    else sel for l, sel in groups[n].items()}
    shown_points = sum(v.size for d in drawn.values() for v in d.values())
    if shown_points < total:
        notes.append(f"{shown_points:,} of {total:,} neurons drawn (evenly spaced in each layer)")
    grid = Grid.wrap(len(names), (420,), max_cols, top=header_height(notes) + 24, row_gap=95)
    tops = [np.nanmax(np.asarray(fluct[n][s].values, float)[np.concatenate(list(d.values()))])
            for n, d in drawn.items() if d for s in (S.BN_MEAN, S.BN_STD)]
    tops = [t for t in tops if np.isfinite(t)]
    top = max(tops) * 1.05 if tops else 1.0
    data = []
    shown = set()
    for p, name in enumerate(names):
        f = fluct[name]
        refs = grid.refs(p, 0)
        units = f[S.UNIT].values
        xm, ys = f[S.BN_MEAN].values, f[S.BN_STD].values
        for layer in layers:
            sel = drawn[name].get(layer)
            if sel is None or not sel.size:
                continue
            u = units[sel].tolist()
            data.append({
                "type": "scatter", "x": np.asarray(xm[sel]), "y": np.asarray(ys[sel]),
                "mode": "markers", "name": layer, "legendgroup": layer,
                "showlegend": layer not in shown, "legendrank": 1 + layers.index(layer),
                "marker": {"color": colors[layer], "size": 7, "opacity": 0.8,
                           "line": {"width": 0.5, "color": "white"}},
                # the key, read by the click callback, also names the point on hover (a label
                # array beside it would double 20,000 points' JSON)
                "customdata": [neuron_key(layer, v) for v in u],
                "hovertemplate": ("%{customdata}<br>BN_mean fluctuation %{x:.4g}<br>BN_std "
                                  f"fluctuation %{{y:.4g}}<extra>{name}</extra>"),
                "meta": {"run": name, "layer": layer}, **refs})
            shown.add(layer)
        data.append({"type": "scatter", "x": [0, top], "y": [0, top], "mode": "lines",
                     "name": "diagonal", "legendgroup": "diagonal", "showlegend": p == 0,
                     "legendrank": 2 + len(layers),
                     "hoverinfo": "skip", "line": {"color": "#888", "dash": "dot", "width": 1},
                     **refs})
    layout = grid.layout(share_x="all", share_y="all", titles=[titles.get(n, n) for n in names],
                         x_title="BN_mean " + _short(scale_free),
                         y_titles=["BN_std " + _short(scale_free)])
    layout["xaxis"]["range"] = [0, top]
    layout["yaxis"]["range"] = [0, top]
    window = inclusive(window if window is not None
                       else fluct[names[0]].attrs.get("window", ""))
    layout.update(header(f"Std versus mean fluctuation per neuron, {window} "
                         "(click a point for its evolution)", notes, height=grid.height))
    layout["template"] = TEMPLATE_JSON
    return {"data": data, "layout": layout}


def scatter_figure(fluct: Mapping[str, xr.Dataset], *, layers: Sequence[str] | None = None,
                   titles: Mapping[str, str] | None = None, scale_free: bool = True,
                   max_cols: int = RUNS_PER_PAGE, max_points: int = MAX_SCATTER_POINTS,
                   notes: Sequence[str] = (), totals: Mapping[str, int] | None = None
                   ) -> go.Figure:
    """x: fluctuation of BN_mean, y: fluctuation of BN_std; one point per neuron, one panel per run.

    Points above the diagonal are neurons whose std fluctuates more than their mean, the
    paper's explanation of the small-batch problem.

    Args:
        fluct: run name to ``analyses.fluctuation(..., scale_free=True)`` for that run.
        layers: layer order for colours and legend; default the order of first appearance.
        titles: run name to its panel title.
        scale_free: whether ``fluct`` is scale-free (sets the axis titles).
        max_cols: panels side by side; more runs wrap into further rows.
        max_points: neurons drawn over all panels; past it each layer is thinned evenly and
            the title says how many are drawn.
        notes: lines under the title (what the caller left out).
        totals: run name to the neurons the run has, when ``fluct`` holds a subset already
            (:func:`scatter_subset`): the title counts them.

    Returns:
        Figure with one ``scatter`` trace per (run, layer), named after the layer, whose
        ``customdata`` holds the neuron keys ``"<layer>:<unit>"`` (read by the click callback),
        and a dotted ``y = x`` line per panel named ``diagonal``.
    """
    return go.Figure(scatter_spec(fluct, layers=layers, titles=titles, scale_free=scale_free,
                                  max_cols=max_cols, max_points=max_points, notes=notes,
                                  totals=totals))


def _short(scale_free: bool) -> str:
    return ("fluctuation δ/σ (dimensionless)" if scale_free
            else "fluctuation (activation units)")
