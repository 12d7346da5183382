"""The layer overview: a step × neuron heatmap of one statistic for one layer."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from statscope import schema as S

from .downsample import bin_mean
from .evolution import Reader, read_dataset
from .state import Window
from .style import STAT_LABELS, STAT_UNITS, TEMPLATE, empty_figure

__all__ = ["heatmap_figure", "DEFAULT_BINS"]

DEFAULT_BINS = 1000
"""The most step columns drawn; longer spans are averaged into this many bins."""


def heatmap_figure(ds: xr.Dataset, layer: str, stat: str, window: Window, *, run: str = "",
                   xrange: tuple[float, float] | None = None, n_bins: int = DEFAULT_BINS,
                   read: Reader | None = None) -> go.Figure:
    """Heatmap of ``stat`` for every neuron of ``layer`` (rows) over steps (columns).

    Args:
        ds: one run (schema of :mod:`statscope.schema`).
        layer: the layer drawn.
        stat: a (step, neuron) statistic, e.g. ``bn_std``.
        window: the steps when not zoomed.
        run: the run's name, for the title and the reader.
        xrange: a zoomed step range; overrides ``window``.
        n_bins: the most columns; longer spans show the mean of each bin of consecutive steps.
        read: where the columns come from; default straight from ``ds``.

    Returns:
        Figure with one ``heatmap`` trace: z (unit, bin) float32, x the first step of each bin,
        y the unit index; ``meta = {"run", "layer", "stat", "bin_width"}``.
    """
    if stat not in ds.data_vars:
        return empty_figure(f"Run {run!r} has no {STAT_LABELS.get(stat, stat)}.")
    lay = ds[S.LAYER].values
    pos = np.flatnonzero(lay == layer)
    if not pos.size:
        return empty_figure(f"Run {run!r} has no layer {layer!r}.")
    read = read or read_dataset({run: ds})
    steps = np.asarray(ds[S.STEP].values)
    rows = (window.rows(steps) if xrange is None else
            slice(int(np.searchsorted(steps, xrange[0], "left")),
                  int(np.searchsorted(steps, xrange[1], "right"))))
    x = steps[rows]
    if not len(x):
        return empty_figure("No steps in this range.")
    z, width = bin_mean(read(run, stat, pos.tolist(), rows), n_bins)
    xb = x[::width]
    units = ds[S.UNIT].values[pos]
    diverging = stat in (S.BN_MEAN, S.EN_MEAN)
    zmax = float(np.nanmax(np.abs(z))) if diverging and np.isfinite(z).any() else None
    label = STAT_LABELS[stat]
    binned = f", mean of {width:,} steps per column" if width > 1 else ""
    fig = go.Figure(go.Heatmap(
        z=z.T, x=xb, y=units, colorscale="RdBu_r" if diverging else "Viridis",
        zmid=0 if diverging else None, zmin=-zmax if zmax else None, zmax=zmax,
        colorbar=dict(title=dict(text=f"{label}<br>({STAT_UNITS[stat]})", side="right"),
                      thickness=14),
        hovertemplate=f"step %{{x}}<br>unit %{{y}}<br>{label} %{{z:.4g}}<extra></extra>",
        meta={"run": run, "layer": layer, "stat": stat, "bin_width": int(width)},
    ))
    span = window.label() if xrange is None else f"steps {xrange[0]:,.0f}–{xrange[1]:,.0f}"
    fig.update_layout(
        template=TEMPLATE, height=max(360, min(900, 160 + 4 * len(units))),
        title=dict(text=f"{label} of layer {layer}, {run}, {span}{binned}", font_size=15, x=0.01),
        xaxis_title="training step", yaxis_title=f"neuron (unit of {layer})",
        uirevision=repr((run, layer, stat, window.spec())),
    )
    if xrange is not None:
        fig.update_xaxes(range=list(xrange), autorange=False)
    return fig
