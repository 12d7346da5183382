"""The layer overview: a step × neuron heatmap of one statistic for one layer."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from statscope import schema as S

from .downsample import bin_mean
from .evolution import Reader, read_dataset
from .limits import MAX_HEATMAP_CELLS, MAX_HEATMAP_ROWS, MAX_READ_VALUES
from .state import Window
from .style import STAT_LABELS, STAT_UNITS, TEMPLATE_JSON, empty_spec

__all__ = ["heatmap_figure", "heatmap_spec", "DEFAULT_BINS"]

DEFAULT_BINS = 1000
"""The most step columns drawn; longer spans are averaged into this many bins."""


def heatmap_spec(ds: xr.Dataset, layer: str, stat: str, window: Window, *, run: str = "",
                 xrange: tuple[float, float] | None = None, n_bins: int = DEFAULT_BINS,
                 read: Reader | None = None, positions: np.ndarray | None = None,
                 label: str = "") -> dict:
    """The layer overview as a plotly figure dict (what :func:`heatmap_figure` wraps)."""
    if stat not in ds.data_vars:
        return empty_spec(f"Run {run!r} has no {STAT_LABELS.get(stat, stat)}.")
    pos = np.flatnonzero(ds[S.LAYER].values == layer) if positions is None else positions
    if not len(pos):
        return empty_spec(f"Run {run!r} has no layer {layer!r}.")
    read = read or read_dataset({run: ds})
    steps = np.asarray(ds[S.STEP].values)
    rows = window.rows(steps, xrange)
    x = steps[rows]
    if not len(steps):
        return empty_spec(f"{run or 'the run'} has no steps recorded yet")
    if not len(x):
        return empty_spec("No steps in this range.")
    if len(x) * len(pos) > MAX_READ_VALUES:
        return empty_spec(f"The overview of {layer} ({len(pos):,} neurons × {len(x):,} steps) "
                          f"would read {len(x) * len(pos):,} values (the limit is "
                          f"{MAX_READ_VALUES:,}): zoom in or choose a shorter window.")
    units = ds[S.UNIT].values[pos]
    # Wide layers are drawn as means of adjacent units, and the step bins shrink so that the
    # cells sent stay within budget whatever the layer's width.
    z_units, unit_width = bin_mean(read(run, stat, list(map(int, pos)), rows).T,
                                   MAX_HEATMAP_ROWS)
    z, width = bin_mean(z_units.T, min(n_bins, max(1, MAX_HEATMAP_CELLS // len(z_units))))
    xb = x[::width]
    yb = units[::unit_width]
    diverging = stat in (S.BN_MEAN, S.EN_MEAN, S.SET_MEAN)
    zmax = float(np.nanmax(np.abs(z))) if diverging and np.isfinite(z).any() else None
    name = STAT_LABELS[stat]
    who = f" · {label}" if label else ""
    binned = f", mean of {width:,} steps per column" if width > 1 else ""
    binned += f", mean of {unit_width:,} neurons per row" if unit_width > 1 else ""
    trace = {"type": "heatmap", "z": np.ascontiguousarray(z.T), "x": xb, "y": yb,
             "colorscale": "RdBu_r" if diverging else "Viridis",
             "colorbar": {"title": {"text": f"{name}<br>({STAT_UNITS[stat]})", "side": "right"},
                          "thickness": 14},
             "hovertemplate": f"step %{{x}}<br>unit %{{y}}<br>{name} %{{z:.4g}}<extra></extra>",
             "meta": {"run": run, "layer": layer, "stat": stat, "bin_width": int(width),
                      "unit_width": int(unit_width)}}
    if diverging:
        trace["zmid"] = 0
        if zmax:
            trace.update(zmin=-zmax, zmax=zmax)
    span = window.label() if xrange is None else f"steps {xrange[0]:,.0f}–{xrange[1]:,.0f}"
    layout = {
        "template": TEMPLATE_JSON, "height": max(360, min(900, 160 + 4 * len(yb))),
        "title": {"text": f"{name} of layer {layer}, {run}{who}, {span}{binned}",
                  "font": {"size": 15}, "x": 0.01},
        "xaxis": {"title": {"text": "training step"}},
        "yaxis": {"title": {"text": f"neuron (unit of {layer})"}},
        "uirevision": repr((run, layer, stat, window.spec())),
    }
    if xrange is not None:
        layout["xaxis"].update(range=list(xrange), autorange=False)
    return {"data": [trace], "layout": layout}


def heatmap_figure(ds: xr.Dataset, layer: str, stat: str, window: Window, *, run: str = "",
                   xrange: tuple[float, float] | None = None, n_bins: int = DEFAULT_BINS,
                   read: Reader | None = None, positions: np.ndarray | None = None,
                   label: str = "") -> go.Figure:
    """Heatmap of ``stat`` for every neuron of ``layer`` (rows) over steps (columns).

    Args:
        ds: one run (schema of :mod:`statscope.schema`).
        layer: the layer drawn.
        stat: a (step, neuron) statistic, e.g. ``bn_std``.
        window: the steps when not zoomed.
        run: the run's name, for the title and the reader.
        xrange: a zoomed step range; overrides ``window``.
        n_bins: the most columns; longer spans show the mean of each bin of consecutive steps
            (fewer when the layer is wide: cells stay within
            :data:`~statscope.dashboards.limits.MAX_HEATMAP_CELLS`).
        read: where the columns come from; default straight from ``ds``.
        positions: the layer's positions along ``neuron``, when the caller knows them.
        label: which statistics of a distributed run ``ds`` holds (e.g. ``rank 1``), for the
            title.

    Returns:
        Figure with one ``heatmap`` trace: z (unit row, bin) float32, x the first step of each
        bin, y the unit of each row (the first of each group of adjacent units past
        :data:`~statscope.dashboards.limits.MAX_HEATMAP_ROWS`); ``meta = {"run", "layer",
        "stat", "bin_width", "unit_width"}``. A span that would read more than
        :data:`~statscope.dashboards.limits.MAX_READ_VALUES` values is a message instead.
    """
    return go.Figure(heatmap_spec(ds, layer, stat, window, run=run, xrange=xrange,
                                  n_bins=n_bins, read=read, positions=positions, label=label))
