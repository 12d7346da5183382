"""The evolution view (the paper's Figure 7): BN and EN statistics of chosen neurons over steps.

One column of panels per run, so batch sizes compare side by side; for each neuron one row for
the means (BN_mean with EN_mean) and one for the stds (BN_std with EN_std). Rows share their
y axis across runs and every panel shares the step axis. Long windows are reduced server-side to
the min/max envelope; a zoom asks for the zoomed range again, at full resolution when it fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from statscope import schema as S

from .downsample import DEFAULT_POINTS, envelope
from .state import Window
from .style import (GRAPH_CONFIG, STAT_COLORS, STAT_DASH, STAT_LABELS, STAT_UNITS, TEMPLATE,
                    empty_figure, neuron_label)

__all__ = ["evolution_figure", "read_dataset", "run_title", "Reader", "PAIRS"]

Reader = Callable[[str, str, Sequence[int], slice], np.ndarray]
"""``read(run, var, positions, rows) -> (rows, len(positions))``: columns of a variable over a
slice of step rows."""

PAIRS = (("mean", (S.BN_MEAN, S.EN_MEAN)), ("std", (S.BN_STD, S.EN_STD)))
"""The two rows drawn per neuron: the means together, the stds together."""

ROW_HEIGHT = 190


def read_dataset(runs: Mapping[str, xr.Dataset]) -> Reader:
    """A :data:`Reader` that reads straight from Datasets (the app passes a cached one)."""

    def read(run: str, var: str, positions: Sequence[int], rows: slice) -> np.ndarray:
        return np.asarray(runs[run][var].isel({S.STEP: rows, S.NEURON: list(positions)}).values)

    return read


def run_title(name: str, ds: xr.Dataset) -> str:
    """Panel title of a run: its name and, when known, its batch size, e.g. ``bs4 (bs 4)``."""
    meta = ds.attrs.get(S.ATTR_META) or {}
    bs = meta.get(S.META_BATCH_SIZE)
    return f"{name} (batch size {bs})" if bs is not None else name


def _positions(ds: xr.Dataset, neurons: Sequence[tuple[str, int]]) -> list[int | None]:
    layers = ds[S.LAYER].values
    units = ds[S.UNIT].values
    out = []
    for layer, unit in neurons:
        hit = np.flatnonzero((layers == layer) & (units == unit))
        out.append(int(hit[0]) if hit.size else None)
    return out


def evolution_figure(runs: Mapping[str, xr.Dataset], neurons: Sequence[tuple[str, int]],
                     window: Window, *,
                     xrange: tuple[float, float] | Mapping[str, tuple[float, float]] | None = None,
                     n_points: int = DEFAULT_POINTS, read: Reader | None = None) -> go.Figure:
    """Figure 7: the statistics of each chosen neuron over the window, one column per run.

    Args:
        runs: run name to its Dataset (schema of :mod:`statscope.schema`), in panel order.
        neurons: ``(layer, unit)`` pairs; a neuron missing from a run leaves its panel empty.
        window: the steps to show when not zoomed.
        xrange: a zoomed step range ``(x0, x1)`` for every run, or ``{run: (x0, x1)}`` for some;
            overrides ``window`` where given. Each run has its own step axis (runs of different
            lengths each show their own window), shared by the rows of its column.
        n_points: the most points per trace; longer spans are reduced to their min/max envelope.
        read: where the columns come from; default straight from ``runs``.

    Returns:
        Figure with ``2 * len(neurons)`` rows and ``len(runs)`` columns; traces are named after
        the statistic and carry ``meta = {"run", "neuron", "stat", "downsampled"}``.
    """
    if not runs or not neurons:
        return empty_figure("Choose at least one run and one neuron.")
    read = read or read_dataset(runs)
    names = list(runs)
    n_rows = 2 * len(neurons)
    zooms = dict(xrange) if isinstance(xrange, Mapping) else {n: xrange for n in names if xrange}
    fig = make_subplots(rows=n_rows, cols=len(names), shared_xaxes="columns", shared_yaxes="rows",
                        column_titles=[run_title(n, runs[n]) for n in names],
                        vertical_spacing=min(0.06, 0.35 / n_rows), horizontal_spacing=0.05)
    shown = set()
    reduced = False
    for c, name in enumerate(names, start=1):
        ds = runs[name]
        steps = np.asarray(ds[S.STEP].values)
        zoom = zooms.get(name)
        if zoom is None:
            rows = window.rows(steps)
        else:
            rows = slice(int(np.searchsorted(steps, zoom[0], "left")),
                         int(np.searchsorted(steps, zoom[1], "right")))
        x_all = steps[rows]
        pos = _positions(ds, neurons)
        present = [p for p in pos if p is not None]
        cols = {}
        for _, stats in PAIRS:
            for stat in stats:
                if stat in ds.data_vars and present:
                    cols[stat] = read(name, stat, present, rows)
        for k, ((layer, unit), p) in enumerate(zip(neurons, pos)):
            if p is None:
                continue
            j = present.index(p)
            for r, (_, stats) in enumerate(PAIRS):
                for stat in stats:
                    if stat not in cols:
                        continue
                    x, y = envelope(x_all, cols[stat][:, j], n_points)
                    down = len(x) < np.count_nonzero(np.isfinite(cols[stat][:, j]))
                    reduced |= down
                    fig.add_trace(go.Scatter(
                        x=x, y=y, mode="lines", name=STAT_LABELS[stat], legendgroup=stat,
                        showlegend=stat not in shown,
                        line=dict(color=STAT_COLORS[stat], dash=STAT_DASH[stat], width=1.4),
                        hovertemplate=(f"step %{{x}}<br>{STAT_LABELS[stat]} %{{y:.4g}}"
                                       f"<extra>{name} · {neuron_label(layer, unit)}</extra>"),
                        meta={"run": name, "neuron": [layer, unit], "stat": stat,
                              "downsampled": bool(down)},
                    ), row=2 * k + r + 1, col=c)
                    shown.add(stat)
    for k, (layer, unit) in enumerate(neurons):
        for r, (what, _) in enumerate(PAIRS):
            fig.update_yaxes(title_text=f"{neuron_label(layer, unit)} {what}<br>"
                             f"<span style='font-size:11px'>({STAT_UNITS[S.BN_MEAN]})</span>",
                             row=2 * k + r + 1, col=1)
    for c in range(1, len(names) + 1):
        fig.update_xaxes(title_text="training step", row=n_rows, col=c)
    span = "; ".join([window.label()] * (len(zooms) < len(names))
                     + [f"{n if len(names) > 1 else 'steps'} {z[0]:,.0f}–{z[1]:,.0f}"
                        for n, z in zooms.items() if n in names])
    note = " · min/max envelope, zoom in for full resolution" if reduced else ""
    fig.update_layout(
        template=TEMPLATE, height=110 + ROW_HEIGHT * n_rows,
        title=dict(text=f"Statistics over training, {span}{note}", font_size=15, x=0.01,
                   y=1 - 12 / (110 + ROW_HEIGHT * n_rows), yanchor="top"),
        legend=dict(y=1 + 34 / (ROW_HEIGHT * n_rows)),
        margin=dict(t=95),
        uirevision=repr((names, list(neurons), window.spec())),
    )
    for c, name in enumerate(names, start=1):
        if name in zooms:
            fig.update_xaxes(range=list(zooms[name]), autorange=False, col=c)
    return fig


EVOLUTION_CONFIG = {**GRAPH_CONFIG,
                    "toImageButtonOptions": {**GRAPH_CONFIG["toImageButtonOptions"],
                                             "filename": "statscope-evolution"}}
