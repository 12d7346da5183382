"""The fluctuation view (the paper's Figure 6): bars of each statistic's fluctuation.

The numbers come from :mod:`statscope.analyses` (``fluctuation``, ``layer_summary``,
``fluctuation_ci``, ``sampling_baseline``); this module only draws them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from statscope import schema as S

from statscope.schema import BOUND, QUANTITY

from .style import STAT_COLORS, STAT_LABELS, TEMPLATE, empty_figure, neuron_label

__all__ = ["fluctuation_figure", "FLUCT_STATS", "fluctuation_axis_title"]

FLUCT_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)
"""The statistics whose fluctuation Figure 6 compares, in bar order."""

_WIDTH = 0.2


def fluctuation_axis_title(scale_free: bool) -> str:
    """The y-axis title of a fluctuation, with its unit."""
    return ("fluctuation δ/σ (std over steps ÷ σ̄, dimensionless)" if scale_free
            else "fluctuation (std over steps, activation units)")


def _select(fluct: xr.Dataset, neurons: Sequence[tuple[str, int]]) -> tuple[list[int], list[str]]:
    layers = fluct[S.LAYER].values
    units = fluct[S.UNIT].values
    pos, labels = [], []
    for layer, unit in neurons:
        hit = np.flatnonzero((layers == layer) & (units == unit))
        if hit.size:
            pos.append(int(hit[0]))
            labels.append(neuron_label(layer, unit))
    return pos, labels


def _interval(ci: xr.Dataset | None, quantity: str, layers: list[str], values: dict):
    if ci is None:
        return None, None
    sub = ci.sel({QUANTITY: quantity}).reindex({S.LAYER: layers})
    lo = {s: sub[s].sel({BOUND: "lower"}).values for s in values if s in sub}
    hi = {s: sub[s].sel({BOUND: "upper"}).values for s in values if s in sub}
    return lo, hi


def _first_interval(ci: xr.Dataset | None, f: xr.Dataset, pos: list[int], values: dict):
    """CI of the chosen neurons that are their layer's first neuron; NaN (no whisker) elsewhere."""
    if ci is None:
        return None, None
    lay = f[S.LAYER].values
    units = f[S.UNIT].values
    layers = [str(lay[p]) for p in pos]
    first = np.array([units[p] == units[lay == lay[p]].min() for p in pos], bool)
    lo, hi = _interval(ci, "first", layers, values)
    for d in (lo, hi):
        for s in d:
            d[s] = np.where(first, d[s], np.nan)
    return lo, hi


def fluctuation_figure(fluct: Mapping[str, xr.Dataset], *, by: str = "neuron",
                       neurons: Sequence[tuple[str, int]] = (),
                       summary: Mapping[str, xr.Dataset] | None = None,
                       ci: Mapping[str, xr.Dataset] | None = None,
                       baseline: Mapping[str, xr.Dataset] | None = None,
                       titles: Mapping[str, str] | None = None,
                       scale_free: bool = False) -> go.Figure:
    """Figure 6: one group of four bars (BN_mean, BN_std, EN_mean, EN_std) per neuron or layer.

    Args:
        fluct: run name to the result of ``analyses.fluctuation`` for that run, (neuron,) vars.
        by: ``"neuron"`` (bars for ``neurons``) or ``"layer"`` (medians from ``summary``, with
            the interquartile range as error bars).
        neurons: ``(layer, unit)`` pairs drawn when ``by="neuron"``.
        summary: run name to ``analyses.layer_summary(fluct[run])``; needed for ``by="layer"``.
        ci: run name to ``analyses.fluctuation_ci`` for that run (layer, quantity, bound):
            whiskers on the layer medians, or on each layer's first neuron when
            ``by="neuron"`` (the bootstrap covers only those two quantities).
        baseline: run name to ``analyses.sampling_baseline`` for the run: expected
            fluctuation of BN_mean and BN_std from batch sampling alone, drawn as black ticks.
        titles: run name to its panel title.
        scale_free: whether ``fluct`` is scale-free (sets the axis title).

    Returns:
        Figure with one column per run; x categories are the neurons or layers, bar traces are
        named after the statistic, baseline ticks are a ``scatter`` trace named ``sampling
        baseline``.
    """
    if not fluct:
        return empty_figure("Choose at least one run.")
    names = list(fluct)
    titles = titles or {}
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, horizontal_spacing=0.03,
                        column_titles=[titles.get(n, n) for n in names])
    shown = set()
    has_ci = False
    for c, name in enumerate(names, start=1):
        f = fluct[name]
        ci_run = ci.get(name) if ci is not None else None
        if by == "layer":
            if summary is None or name not in summary:
                continue
            sm = summary[name]
            labels = [str(v) for v in sm[S.LAYER].values]
            values = {s: sm[s].sel({QUANTITY: "median"}).values for s in FLUCT_STATS if s in sm}
            lo, hi = _interval(ci_run, "median", labels, values)
        else:
            pos, labels = _select(f, neurons)
            values = {s: f[s].values[pos] for s in FLUCT_STATS if s in f}
            lo, hi = _first_interval(ci_run, f, pos, values)
        x0 = np.arange(len(labels), dtype=float)
        for j, stat in enumerate(FLUCT_STATS):
            if stat not in values:
                continue
            v = np.asarray(values[stat], dtype=float)
            err = None
            if lo is not None and stat in lo:
                err = dict(type="data", symmetric=False, array=np.asarray(hi[stat]) - v,
                           arrayminus=v - np.asarray(lo[stat]), thickness=1.2, width=3,
                           color="#333")
                has_ci = True
            fig.add_trace(go.Bar(
                x=x0 + (j - 1.5) * _WIDTH, y=v, width=_WIDTH * 0.95, name=STAT_LABELS[stat],
                legendgroup=stat, showlegend=stat not in shown, marker_color=STAT_COLORS[stat],
                error_y=err, customdata=labels,
                hovertemplate=(f"%{{customdata}}<br>{STAT_LABELS[stat]} fluctuation %{{y:.4g}}"
                               f"<extra>{name}</extra>"),
                meta={"run": name, "stat": stat},
            ), row=1, col=c)
            shown.add(stat)
        if baseline is not None and name in baseline and by == "neuron" and not scale_free:
            b = baseline[name]
            pos, _ = _select(b, neurons)
            for j, stat in enumerate(FLUCT_STATS):
                if stat not in b:
                    continue
                fig.add_trace(go.Scatter(
                    x=x0 + (j - 1.5) * _WIDTH, y=b[stat].values[pos], mode="markers",
                    name="sampling baseline", legendgroup="baseline",
                    showlegend="baseline" not in shown,
                    marker=dict(symbol="line-ew-open", size=18, line=dict(width=2.5,
                                                                           color="#111")),
                    customdata=[labels[i] for i in range(len(pos))],
                    hovertemplate=(f"%{{customdata}}<br>{STAT_LABELS[stat]} expected from batch "
                                   f"sampling %{{y:.4g}}<extra>{name}</extra>"),
                    meta={"run": name, "stat": stat, "baseline": True},
                ), row=1, col=c)
                shown.add("baseline")
        fig.update_xaxes(tickvals=x0, ticktext=labels, row=1, col=c,
                         title_text="layer" if by == "layer" else "neuron")
    window = next(iter(fluct.values())).attrs.get("window", "")
    what = "median over each layer's neurons" if by == "layer" else "per neuron"
    if has_ci:
        level = next(iter(ci.values())).attrs.get("confidence", 0.95)
        what += f"; whiskers: {level:.0%} block-bootstrap CI"
        if by == "neuron":
            what += " (each layer's first neuron)"
    fig.update_yaxes(title_text=fluctuation_axis_title(scale_free), row=1, col=1, rangemode="tozero")
    fig.update_layout(template=TEMPLATE, height=460, bargap=0.15,
                      title=dict(text=f"Fluctuation of the statistics, {window}: {what}",
                                 font_size=15, x=0.01, y=0.97, yanchor="top"),
                      legend=dict(y=1.06), margin=dict(t=100))
    return fig
