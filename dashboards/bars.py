"""The fluctuation view (the paper's Figure 6): bars of each statistic's fluctuation.

The numbers come from :mod:`statscope.analyses` (``fluctuation``, ``layer_summary``,
``fluctuation_ci``, ``sampling_baseline``); this module only draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from statscope import schema as S
from statscope.schema import BOUND, QUANTITY

from .grid import Grid
from .limits import RUNS_PER_PAGE
from .metrics import inclusive
from .style import (STAT_COLORS, STAT_LABELS, TEMPLATE_JSON, empty_spec, header, header_height,
                    neuron_label, tick_texts)

__all__ = ["fluctuation_figure", "fluctuation_spec", "FLUCT_STATS", "fluctuation_axis_title"]

FLUCT_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)
"""The statistics whose fluctuation Figure 6 compares, in bar order."""

_WIDTH = 0.2


def fluctuation_axis_title(scale_free: bool) -> str:
    """The y-axis title of a fluctuation, with its unit."""
    return ("fluctuation δ/σ (std over steps ÷ σ̄, dimensionless)" if scale_free
            else "fluctuation (std over steps, activation units)")


def _select(fluct: xr.Dataset, neurons: Sequence[tuple[str, int]],
            find: Callable[[str, int], int | None] | None = None
            ) -> tuple[list[int], list[str], list[str]]:
    """Positions and labels of the neurons ``fluct`` has, and the labels of those it lacks.

    ``find(layer, unit)`` gives a neuron's position; by default an index of ``fluct`` is built
    (the app passes its run's index, so a callback does not scan every neuron).
    """
    if find is None:
        index = {(str(l), int(u)): i for i, (l, u) in enumerate(
            zip(fluct[S.LAYER].values.tolist(), fluct[S.UNIT].values.tolist()))}

        def find(layer: str, unit: int) -> int | None:
            return index.get((layer, int(unit)))
    pos, labels, lacking = [], [], []
    for layer, unit in neurons:
        hit = find(layer, unit)
        if hit is not None:
            pos.append(int(hit))
            labels.append(neuron_label(layer, unit))
        else:
            lacking.append(neuron_label(layer, unit))
    return pos, labels, lacking


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
    layers = [str(lay[p]) for p in pos]
    # A layer's neurons are contiguous in store order: its first is where the layer changes.
    first = np.array([p == 0 or lay[p - 1] != lay[p] for p in pos], bool)
    lo, hi = _interval(ci, "first", layers, values)
    for d in (lo, hi):
        for s in d:
            d[s] = np.where(first, d[s], np.nan)
    return lo, hi


def fluctuation_spec(fluct: Mapping[str, xr.Dataset], *, by: str = "neuron",
                     neurons: Sequence[tuple[str, int]] = (),
                     summary: Mapping[str, xr.Dataset] | None = None,
                     ci: Mapping[str, xr.Dataset] | None = None,
                     baseline: Mapping[str, xr.Dataset] | None = None,
                     titles: Mapping[str, str] | None = None, scale_free: bool = False,
                     max_cols: int = RUNS_PER_PAGE, notes: Sequence[str] = (),
                     locate: Callable[[str, str, int], int | None] | None = None,
                     ranks: Mapping[str, Any] | None = None, window: str | None = None) -> dict:
    """Figure 6 as a plotly figure dict (what :func:`fluctuation_figure` wraps); see there.
    ``window`` is the window the title names (default: the first run's, as the analyses
    describe it)."""
    if not fluct and not ranks:
        return empty_spec("Choose at least one run.")
    names = list(dict.fromkeys([*fluct, *(ranks or {})]))
    notes = list(notes)
    if ranks:
        notes.append("bars: global fluctuation (ranks merged); circles: each rank's; labels: "
                     "change from the per-rank fluctuation (RMS over ranks) to the global one")
        for name, rc in ranks.items():
            expected = np.asarray(rc.expected, float)
            if np.isfinite(expected).any():
                notes.append(f"{name}: batch sampling alone predicts "
                             f"{_change(float(np.nanmedian(expected)))} for the merged batch")
    titles = titles or {}
    grid = Grid.wrap(len(names), (330,), max_cols, top=header_height(notes) + 24, row_gap=95)
    data, annotations, ticks = [], [], {}
    shown = set()
    has_ci = False
    for p, name in enumerate(names):
        refs = grid.refs(p, 0)
        if ranks is not None and name in ranks:
            labels = list(ranks[name].labels)
            x0 = np.arange(len(labels), dtype=float)
            data += _rank_traces(ranks[name], name, x0, refs, shown)
            n = grid.axis(p, 0)
            ticks[f"xaxis{'' if n == 1 else n}"] = {
                "tickvals": x0.tolist(), "ticktext": tick_texts(labels),
                "title": {"text": "layer" if by == "layer" else "neuron"}}
            continue
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
            find = None if locate is None else (lambda l, u, r=name: locate(r, l, u))
            pos, labels, lacking = _select(f, neurons, find)
            values = {s: f[s].values[pos] for s in FLUCT_STATS if s in f}
            lo, hi = _first_interval(ci_run, f, pos, values)
            if lacking:
                annotations.append({**grid.note(p, 0, f"no {', '.join(lacking)} in {name}"),
                                    "y": 0.97, "yanchor": "top"})
        x0 = np.arange(len(labels), dtype=float)
        for j, stat in enumerate(FLUCT_STATS):
            if stat not in values:
                continue
            v = np.asarray(values[stat], dtype=float)
            bar = {"type": "bar", "x": x0 + (j - 1.5) * _WIDTH, "y": v, "width": _WIDTH * 0.95,
                   "name": STAT_LABELS[stat], "legendgroup": stat,
                   "showlegend": stat not in shown, "marker": {"color": STAT_COLORS[stat]},
                   "customdata": labels,
                   "hovertemplate": (f"%{{customdata}}<br>{STAT_LABELS[stat]} fluctuation "
                                     f"%{{y:.4g}}<extra>{name}</extra>"),
                   "meta": {"run": name, "stat": stat}, **refs}
            if lo is not None and stat in lo:
                bar["error_y"] = {"type": "data", "symmetric": False,
                                  "array": np.asarray(hi[stat]) - v,
                                  "arrayminus": v - np.asarray(lo[stat]), "thickness": 1.2,
                                  "width": 3, "color": "#333"}
                has_ci = True
            data.append(bar)
            shown.add(stat)
        if baseline is not None and name in baseline and by == "neuron" and not scale_free:
            b = baseline[name]
            bpos, blabels, _ = _select(b, neurons, find)
            for j, stat in enumerate(FLUCT_STATS):
                if stat not in b:
                    continue
                data.append({
                    "type": "scatter", "x": x0[:len(bpos)] + (j - 1.5) * _WIDTH,
                    "y": np.asarray(b[stat].values[bpos], dtype=float), "mode": "markers",
                    "name": "sampling baseline", "legendgroup": "baseline",
                    "showlegend": "baseline" not in shown,
                    # an open symbol is stroked in the marker's colour, not its line's
                    "marker": {"symbol": "line-ew-open", "size": 18, "color": "#111",
                               "line": {"width": 2.5, "color": "#111"}},
                    "customdata": blabels,
                    "hovertemplate": (f"%{{customdata}}<br>{STAT_LABELS[stat]} expected from "
                                      f"batch sampling %{{y:.4g}}<extra>{name}</extra>"),
                    "meta": {"run": name, "stat": stat, "baseline": True}, **refs})
                shown.add("baseline")
        n = grid.axis(p, 0)
        ticks[f"xaxis{'' if n == 1 else n}"] = {
            "tickvals": x0.tolist(), "ticktext": tick_texts(labels),
            "title": {"text": "layer" if by == "layer" else "neuron"}}
    if window is None:
        window = (next(iter(fluct.values())).attrs.get("window", "") if fluct
                  else next(iter(ranks.values())).window if ranks else "")
    window = inclusive(window)
    what = "median over each layer's neurons" if by == "layer" else "per neuron"
    if has_ci:
        level = next(iter(ci.values())).attrs.get("confidence", 0.95)
        what += f"; whiskers: {level:.0%} block-bootstrap CI"
        if by == "neuron":
            what += " (each layer's first neuron)"
    layout = grid.layout(share_x="none", share_y="all", titles=[titles.get(n, n) for n in names],
                         y_titles=[fluctuation_axis_title(scale_free)])
    for axis, spec in ticks.items():
        layout[axis].update(spec)
    layout["annotations"] += annotations
    layout["yaxis"]["rangemode"] = "tozero"
    layout.update(header(f"Fluctuation of the statistics, {window}: {what}", notes,
                         height=grid.height))
    layout.update(template=TEMPLATE_JSON, bargap=0.15)
    return {"data": data, "layout": layout}


def _change(gap: float) -> str:
    """A gap (fraction of the per-rank fluctuation removed) as a signed change, e.g. ``−29%``."""
    if not np.isfinite(gap):
        return ""
    return f"{-gap:+.0%}".replace("-", "−")


def _rank_traces(rc, name: str, x0: np.ndarray, refs: dict, shown: set) -> list[dict]:
    """Bars of the global fluctuation labelled with the gap, and a circle per rank."""
    out = []
    for j, stat in enumerate(FLUCT_STATS):
        if stat not in rc.merged:
            continue
        x = x0 + (j - 1.5) * _WIDTH
        v = np.asarray(rc.merged[stat], dtype=float)
        g = rc.gap.get(stat, {})
        per = np.asarray(g.get("per_rank", np.full(v.shape, np.nan)), float)
        gap = np.asarray(g.get("gap", np.full(v.shape, np.nan)), float)
        exp = np.asarray(rc.expected, float)
        hover = [f"{lab}<br>{STAT_LABELS[stat]} fluctuation: global {a:.4g}, per rank (RMS) "
                 f"{b:.4g}<br>change {_change(c) or 'n/a'}; batch sampling alone: "
                 f"{_change(e) or 'n/a'}" for lab, a, b, c, e in zip(rc.labels, v, per, gap, exp)]
        out.append({"type": "bar", "x": x, "y": v, "width": _WIDTH * 0.95,
                    "name": STAT_LABELS[stat], "legendgroup": stat,
                    "showlegend": stat not in shown, "marker": {"color": STAT_COLORS[stat]},
                    "text": [_change(c) for c in gap], "textposition": "outside",
                    "textfont": {"size": 9}, "cliponaxis": False,
                    "hovertext": hover, "hovertemplate": f"%{{hovertext}}<extra>{name}</extra>",
                    "meta": {"run": name, "stat": stat, "rank": "merged"}, **refs})
        shown.add(stat)
        for r, values in rc.per_rank.items():
            y = np.asarray(values.get(stat, np.full(v.shape, np.nan)), float)
            out.append({"type": "scatter", "x": x, "y": y, "mode": "markers",
                        "name": "each rank", "legendgroup": "ranks",
                        "showlegend": "ranks" not in shown,
                        "marker": {"symbol": "circle-open", "size": 7,
                                   "color": STAT_COLORS[stat], "line": {"width": 1.5}},
                        "customdata": list(rc.labels),
                        "hovertemplate": (f"%{{customdata}}<br>{STAT_LABELS[stat]} fluctuation of "
                                          f"rank {r} %{{y:.4g}}<extra>{name}</extra>"),
                        "meta": {"run": name, "stat": stat, "rank": r}, **refs})
            shown.add("ranks")
    return out


def fluctuation_figure(fluct: Mapping[str, xr.Dataset], *, by: str = "neuron",
                       neurons: Sequence[tuple[str, int]] = (),
                       summary: Mapping[str, xr.Dataset] | None = None,
                       ci: Mapping[str, xr.Dataset] | None = None,
                       baseline: Mapping[str, xr.Dataset] | None = None,
                       titles: Mapping[str, str] | None = None,
                       scale_free: bool = False, max_cols: int = RUNS_PER_PAGE,
                       notes: Sequence[str] = (), ranks: Mapping[str, Any] | None = None
                       ) -> go.Figure:
    """Figure 6: one group of four bars (BN_mean, BN_std, EN_mean, EN_std) per neuron or layer.

    Args:
        fluct: run name to the result of ``analyses.fluctuation`` for that run, (neuron,) vars.
        by: ``"neuron"`` (bars for ``neurons``) or ``"layer"`` (medians from ``summary``, with
            the interquartile range as error bars).
        neurons: ``(layer, unit)`` pairs drawn when ``by="neuron"``; a run that lacks some
            says so in its panel.
        summary: run name to ``analyses.layer_summary(fluct[run])``; needed for ``by="layer"``.
        ci: run name to ``analyses.fluctuation_ci`` for that run (layer, quantity, bound):
            whiskers on the layer medians, or on each layer's first neuron when
            ``by="neuron"`` (the bootstrap covers only those two quantities).
        baseline: run name to ``analyses.sampling_baseline`` for the run: expected
            fluctuation of BN_mean and BN_std from batch sampling alone, drawn as black ticks.
        titles: run name to its panel title.
        scale_free: whether ``fluct`` is scale-free (sets the axis title).
        max_cols: panels side by side; more runs wrap into further rows.
        notes: lines under the title (what the caller left out).
        ranks: run name to a :class:`~statscope.dashboards.results.RankComparison` of a
            distributed run: its panel draws the global (merged) fluctuation as bars labelled
            with the change from the per-rank fluctuation, and each rank's as circles, instead
            of ``fluct``'s bars.

    Returns:
        Figure with one panel per run sharing the y axis; x categories are the neurons or
        layers, bar traces are named after the statistic, baseline ticks are a ``scatter``
        trace named ``sampling baseline``; per-rank circles are ``scatter`` traces named
        ``each rank`` with ``meta["rank"]``.
    """
    return go.Figure(fluctuation_spec(fluct, by=by, neurons=neurons, summary=summary, ci=ci,
                                      baseline=baseline, titles=titles, scale_free=scale_free,
                                      max_cols=max_cols, notes=notes, ranks=ranks))
