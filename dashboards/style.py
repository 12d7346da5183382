"""Colours, labels and the plotly template shared by every figure, so that a statistic or a
layer has the same colour and name in every view and in exported images."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from statscope import schema as S

__all__ = ["STAT_COLORS", "STAT_LABELS", "STAT_UNITS", "LAYER_PALETTE", "layer_colors",
           "TEMPLATE", "TEMPLATE_JSON", "GRAPH_CONFIG", "neuron_label", "layer_titles",
           "tick_texts", "empty_figure", "empty_spec", "header", "header_height"]

# Okabe–Ito: distinguishable with the common colour-vision deficiencies and in greyscale print.
STAT_COLORS = {
    S.BN_MEAN: "#0072B2",
    S.BN_STD: "#D55E00",
    S.EN_MEAN: "#56B4E9",
    S.EN_STD: "#E69F00",
    S.BN_KURT: "#CC79A7",
    S.SET_MEAN: "#009E73",
    S.SET_MEAN_SD: "#66C2A5",
    S.SET_STD: "#000000",
    S.SET_STD_SD: "#8C8C8C",
}
"""One colour per statistic; BN dark, its EN counterpart light, in the same hue family."""

STAT_DASH = {S.BN_MEAN: "solid", S.BN_STD: "solid", S.EN_MEAN: "dash", S.EN_STD: "dash",
             S.BN_KURT: "dot"}
"""Line style per statistic: BN solid, EN dashed, so pairs read apart without colour."""

STAT_LABELS = {S.BN_MEAN: "BN_mean", S.BN_STD: "BN_std", S.EN_MEAN: "EN_mean",
               S.EN_STD: "EN_std", S.BN_KURT: "BN_kurt",
               S.SET_MEAN: "set_mean", S.SET_MEAN_SD: "sd of set_mean",
               S.SET_STD: "set_std", S.SET_STD_SD: "sd of set_std"}
"""Display names, as the paper writes them."""

STAT_UNITS = {S.BN_MEAN: "activation units", S.BN_STD: "activation units",
              S.EN_MEAN: "activation units", S.EN_STD: "activation units",
              S.BN_KURT: "excess kurtosis, dimensionless",
              **{s: "activation units" for s in S.SET_STATS}}
"""Units of each statistic: those of the normalized layer's input, except kurtosis."""

LAYER_PALETTE = ("#332288", "#117733", "#44AA99", "#88CCEE", "#DDCC77", "#CC6677", "#AA4499",
                 "#882255", "#999933", "#661100", "#6699CC", "#888888")
"""Paul Tol's muted qualitative palette, cycled over layers in store order."""

TEMPLATE = go.layout.Template(layout=dict(
    font=dict(family="Helvetica, Arial, sans-serif", size=13, color="#222"),
    paper_bgcolor="white",
    plot_bgcolor="white",
    colorway=list(LAYER_PALETTE),
    xaxis=dict(showline=True, linecolor="#444", mirror=True, ticks="outside", gridcolor="#eee",
               zeroline=False, title=dict(standoff=6)),
    # automargin: the margin grows to fit wide tick labels (e.g. "−0.005") and the two-line
    # title beside them, so a title never covers a label.
    yaxis=dict(showline=True, linecolor="#444", mirror=True, ticks="outside", gridcolor="#eee",
               zeroline=False, automargin=True, title=dict(standoff=8)),
    legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0,
                bgcolor="rgba(255,255,255,0)"),
    margin=dict(l=70, r=20, t=70, b=55),
    hoverlabel=dict(font_size=12),
))
"""A light template for publication-grade figures."""

TEMPLATE_JSON = TEMPLATE.to_plotly_json()
""":data:`TEMPLATE` as the plain dict that figure dicts carry."""

GRAPH_CONFIG = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "svg", "filename": "statscope", "scale": 1},
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
}
"""``dcc.Graph(config=...)``: image export as SVG (vector, for papers)."""


def layer_colors(layers: Sequence[str]) -> dict[str, str]:
    """One colour per layer, in the order given (store order keeps colours stable across runs)."""
    return {name: LAYER_PALETTE[i % len(LAYER_PALETTE)]
            for i, name in enumerate(dict.fromkeys(layers))}


def neuron_label(layer: str, unit: int) -> str:
    """How a neuron is named on screen, e.g. ``fc1[0]``."""
    return f"{layer}[{int(unit)}]"


TITLE_LINE = 18  # characters of a line of a rotated axis title beside one plot row


def layer_titles(names, width: int = TITLE_LINE) -> dict[str, str]:
    """Axis titles for layer names where a rotated title has a plot row's height: the dotted
    parts that every name shares at the start left out (after "…"), and the rest broken at dots
    into lines of about ``width`` characters (``<br>``), so that deep module paths
    (``mobilevit.encoder.layer.1.layer.0.expand_1x1.normalization``) neither overlap the next
    row nor lose the part that tells them apart.

    Example:
        >>> titles = layer_titles(["vit.encoder.layer.0.norm", "vit.encoder.layer.11.norm"], 12)
        >>> list(titles.values())
        ['…layer.0.<br>norm', '…layer.11.<br>norm']
        >>> layer_titles(["fc1", "fc2"])
        {'fc1': 'fc1', 'fc2': 'fc2'}
    """
    names = list(dict.fromkeys(names))
    parts = [n.split(".") for n in names]
    head = _shared_head(parts)
    out = {}
    for name, p in zip(names, parts):
        rest = p[head:]
        lines, line = [], "…" if head else ""
        for i, part in enumerate(rest):
            piece = part + ("." if i < len(rest) - 1 else "")
            if line and line != "…" and len(line) + len(piece) > width:
                lines.append(line)
                line = ""
            line += piece
        out[name] = "<br>".join(lines + [line])
    return out


def _shared_head(parts: list[list[str]]) -> int:
    """How many dotted parts every name (given split at dots) shares at the start and can leave
    out: all but the last part of each, and never the part an index after it names."""
    head = 0
    while len(parts) > 1 and all(len(p) > head + 1 for p in parts) \
            and len({p[head] for p in parts}) == 1:
        head += 1
    if head and any(p[head].isdigit() for p in parts):
        head -= 1  # "layer.0", not "0"
    return head


TICK_TEXT = 28  # characters of a rotated tick label under a bar


def tick_texts(labels, width: int = TICK_TEXT) -> list[str]:
    """Tick labels for neuron or layer labels under bars: the dotted head they all share left
    out, and of a label still longer than ``width`` its last ``width`` characters (where module
    paths differ), after "…"; the whole label belongs in the hover text.

    Example:
        >>> tick_texts(["vit.encoder.layer.0.norm[0]", "vit.encoder.layer.11.norm[0]"])
        ['…layer.0.norm[0]', '…layer.11.norm[0]']
    """
    labels = [str(la) for la in labels]
    parts = [la.split(".") for la in labels]
    head = _shared_head(parts)
    out = []
    for p in parts:
        rest = ".".join(p[head:])
        if len(rest) > width:
            out.append("…" + rest[-width:])
        else:
            out.append(("…" if head else "") + rest)
    return out


def empty_spec(message: str, *, height: int = 360) -> dict:
    """A blank figure, as a dict, that says why there is nothing to draw."""
    return {"data": [], "layout": {
        "template": TEMPLATE_JSON, "height": height,
        "xaxis": {"visible": False}, "yaxis": {"visible": False},
        "annotations": [{"text": message, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                         "showarrow": False, "font": {"size": 15, "color": "#666"}}]}}


def empty_figure(message: str, *, height: int = 360) -> go.Figure:
    """A blank figure that says why there is nothing to draw."""
    return go.Figure(empty_spec(message, height=height))


def header_height(notes: Sequence[str] = ()) -> int:
    """Pixels that :func:`header` needs above the panels: title, one line per note, legend."""
    return 68 + 17 * len(notes)


def header(text: str, notes: Sequence[str] = (), *, height: int) -> dict:
    """Title, notes and legend of a figure ``height`` px high, placed in px from its top.

    The notes (one line each, in a darker amber) say what the view left out or reduced, e.g.
    ``"min/max envelope of 1,000 bins"``; the legend sits under them, clear of the panel titles.

    Returns:
        ``{"title": ..., "legend": ...}`` to merge into a layout dict.
    """
    if notes:
        text += "".join(f"<br><span style='font-size:12px;color:#8a5a00'>{n}</span>"
                        for n in notes)
    # the title's top 14 px down: plotly's top anchor leaves a 15 px title's ascenders ~5 px
    # above the point, which at 8 px clipped them at the figure's edge
    top = 14 + 22 + 17 * len(notes)
    return {"title": {"text": text, "font": {"size": 15}, "x": 0.01, "xanchor": "left",
                      "y": 1 - 14 / height, "yanchor": "top", "yref": "container"},
            "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1 - top / height,
                       "yanchor": "top", "yref": "container", "bgcolor": "rgba(255,255,255,0)"}}
