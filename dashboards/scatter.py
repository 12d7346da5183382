"""The std-versus-mean view: one point per neuron, the fluctuation of BN_mean against BN_std."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from statscope import schema as S

from .data import neuron_key
from .style import TEMPLATE, empty_figure, layer_colors, neuron_label

__all__ = ["scatter_figure"]


def scatter_figure(fluct: Mapping[str, xr.Dataset], *, layers: list[str] | None = None,
                   titles: Mapping[str, str] | None = None, scale_free: bool = True) -> go.Figure:
    """x: fluctuation of BN_mean, y: fluctuation of BN_std; one point per neuron, one facet per run.

    Points above the diagonal are neurons whose std fluctuates more than their mean, the
    paper's explanation of the small-batch problem.

    Args:
        fluct: run name to ``analyses.fluctuation(..., scale_free=True)`` for that run.
        layers: layer order for colours and legend; default the order in the first run.
        titles: run name to its panel title.
        scale_free: whether ``fluct`` is scale-free (sets the axis titles).

    Returns:
        Figure with one ``scatter`` trace per (run, layer), named after the layer, whose
        ``customdata`` holds the neuron keys ``"<layer>:<unit>"`` (read by the click callback),
        and a dotted ``y = x`` line per facet named ``diagonal``.
    """
    if not fluct:
        return empty_figure("Choose at least one run.")
    names = list(fluct)
    titles = titles or {}
    first = fluct[names[0]]
    layers = layers or list(dict.fromkeys(first[S.LAYER].values.tolist()))
    colors = layer_colors(layers)
    fig = make_subplots(rows=1, cols=len(names), shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.04, column_titles=[titles.get(n, n) for n in names])
    finite = [v for f in fluct.values() for s in (S.BN_MEAN, S.BN_STD)
              for v in np.asarray(f[s].values, float).ravel() if np.isfinite(v)]
    top = max(finite) * 1.05 if finite else 1.0
    shown = set()
    for c, name in enumerate(names, start=1):
        f = fluct[name]
        lay = f[S.LAYER].values
        units = f[S.UNIT].values
        for layer in layers:
            sel = np.flatnonzero(lay == layer)
            if not sel.size:
                continue
            keys = [neuron_key(layer, u) for u in units[sel]]
            fig.add_trace(go.Scatter(
                x=f[S.BN_MEAN].values[sel], y=f[S.BN_STD].values[sel], mode="markers",
                name=layer, legendgroup=layer, showlegend=layer not in shown,
                marker=dict(color=colors[layer], size=7, opacity=0.8,
                            line=dict(width=0.5, color="white")),
                customdata=keys, text=[neuron_label(layer, u) for u in units[sel]],
                hovertemplate=("%{text}<br>BN_mean fluctuation %{x:.4g}<br>BN_std fluctuation "
                               f"%{{y:.4g}}<extra>{name}</extra>"),
                meta={"run": name, "layer": layer},
            ), row=1, col=c)
            shown.add(layer)
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="diagonal",
                                 legendgroup="diagonal", showlegend=c == 1, hoverinfo="skip",
                                 line=dict(color="#888", dash="dot", width=1)), row=1, col=c)
        fig.update_xaxes(title_text="BN_mean " + _short(scale_free), row=1, col=c,
                         range=[0, top])
    fig.update_yaxes(title_text="BN_std " + _short(scale_free), row=1, col=1, range=[0, top])
    window = first.attrs.get("window", "")
    fig.update_layout(template=TEMPLATE, height=520,
                      title=dict(text=f"Std versus mean fluctuation per neuron, {window} "
                                      "(click a point for its evolution)",
                                 font_size=15, x=0.01, y=0.97, yanchor="top"),
                      legend=dict(y=1.05), margin=dict(t=100))
    return fig


def _short(scale_free: bool) -> str:
    return ("fluctuation δ/σ (dimensionless)" if scale_free
            else "fluctuation (activation units)")

