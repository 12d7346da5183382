"""The evolution view (the paper's Figure 7): BN and EN statistics of chosen neurons over steps.

One panel per run, so batch sizes compare side by side (wrapped into rows past ``max_cols``). A
panel holds, top to bottom, the logged scalars (loss, lr, ...) and for each neuron one row for
the means (BN_mean with EN_mean) and one for the stds (BN_std with EN_std). The rows of a panel
share its step axis; a row shares its y axis with the same row of every other run. Long windows
are reduced server-side to the min/max envelope, within one points budget for the whole figure;
a zoom asks for the zoomed range again, at full resolution when it fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from .downsample import DEFAULT_POINTS, envelope
from .grid import Grid
from .limits import MAX_READ_VALUES, RUNS_PER_PAGE, points_per_trace
from .ranks import RankKey, rank_keys, rank_label, rank_view, ranks_of
from .state import MERGED, Window
from .style import (STAT_COLORS, STAT_DASH, STAT_LABELS, STAT_UNITS, TEMPLATE_JSON, empty_spec,
                    header, header_height, layer_titles, neuron_label)

__all__ = ["evolution_figure", "evolution_spec", "read_dataset", "locate_in", "run_title",
           "scalar_names", "Reader", "Locator", "ScalarReader", "PAIRS", "ROW_HEIGHT",
           "SCALAR_HEIGHT"]

Reader = Callable[[str, str, Sequence[int], slice, RankKey], "np.ndarray | Sequence[np.ndarray]"]
"""``read(run, var, positions, rows, rank)``: columns of a variable over a slice of step rows,
as a (rows, len(positions)) array or as one (rows,) array per position (the app passes
``RunCatalog.column_list``, whose cached columns come as views, not copies). ``rank`` is
``None`` for a single-process run, else ``"merged"`` or a rank number."""
Locator = Callable[[str, str, int], "int | None"]
"""``locate(run, layer, unit)``: the neuron's position along ``neuron`` in that run, or None."""
ScalarReader = Callable[[str, str, RankKey], "np.ndarray | None"]
"""``read_scalar(run, name, rank) -> (step,)``: a logged scalar of a run (of a distributed run,
one rank's or the mean over ranks), or None when it has none."""

PAIRS = (("mean", (S.BN_MEAN, S.EN_MEAN)), ("std", (S.BN_STD, S.EN_STD)))
"""The two rows drawn per neuron: the means together, the stds together."""

ROW_HEIGHT = 190
"""Pixels of one statistics row."""
SCALAR_HEIGHT = 120
"""Pixels of one logged-scalar row."""
SCALAR_COLOR = "#444444"


def read_dataset(runs: Mapping[str, xr.Dataset]) -> Reader:
    """A :data:`Reader` that reads straight from Datasets (the app passes a cached one)."""
    views: dict = {}

    def read(run: str, var: str, positions: Sequence[int], rows: slice,
             rank: RankKey = None) -> np.ndarray:
        ds = rank_view(runs[run], rank, views, run)
        return np.asarray(ds[var].isel({S.STEP: rows, S.NEURON: list(positions)}).values)

    return read


def locate_in(runs: Mapping[str, xr.Dataset]) -> Locator:
    """A :data:`Locator` over Datasets; each run's index is built once, on first use."""
    index: dict[str, dict[tuple[str, int], int]] = {}

    def locate(run: str, layer: str, unit: int) -> int | None:
        if run not in index:
            ds = runs[run]
            index[run] = {(str(l), int(u)): i for i, (l, u) in
                          enumerate(zip(ds[S.LAYER].values.tolist(), ds[S.UNIT].values.tolist()))}
        return index[run].get((layer, int(unit)))

    return locate


def scalar_names(ds: xr.Dataset) -> list[str]:
    """The logged scalars of a run (``loss``, ``lr``...): those its attrs list that are (step,)."""
    return [n for n in ds.attrs.get(S.ATTR_SCALARS) or []
            if n in ds.data_vars and S.STEP in ds[n].dims and S.NEURON not in ds[n].dims]


def _read_scalar(runs: Mapping[str, xr.Dataset]) -> ScalarReader:
    views: dict = {}

    def read(run: str, name: str, rank: RankKey = None) -> np.ndarray | None:
        if name not in scalar_names(runs[run]):
            return None
        return np.asarray(rank_view(runs[run], rank, views, run)[name].values)

    return read


def run_title(name: str, ds: xr.Dataset) -> str:
    """Panel title of a run: its name and, when known, its batch size, e.g. ``bs4 (bs 4)``."""
    meta = ds.attrs.get(S.ATTR_META) or {}
    bs = meta.get(S.META_BATCH_SIZE)
    return f"{name} (batch size {bs})" if bs is not None else name


def _scalar_title(ds: xr.Dataset | None, name: str) -> str:
    units = ds[name].attrs.get("units") if ds is not None and name in ds else None
    return f"{name}<br><span style='font-size:11px'>({units})</span>" if units else name


def evolution_spec(runs: Mapping[str, xr.Dataset], neurons: Sequence[tuple[str, int]],
                   window: Window, *, scalars: Sequence[str] = (),
                   xrange: tuple[float, float] | Mapping[str, tuple[float, float]] | None = None,
                   n_points: int = DEFAULT_POINTS, read: Reader | None = None,
                   locate: Locator | None = None, read_scalar: ScalarReader | None = None,
                   max_cols: int = RUNS_PER_PAGE, notes: Sequence[str] = (),
                   rank: str | int = MERGED) -> dict:
    """Figure 7 as a plotly figure dict (what :func:`evolution_figure` wraps); see there."""
    if not runs or not (neurons or scalars):
        return empty_spec("Choose at least one run and one neuron.")
    read = read or read_dataset(runs)
    locate = locate or locate_in(runs)
    read_scalar = read_scalar or _read_scalar(runs)
    names = list(runs)
    zooms = dict(xrange) if isinstance(xrange, Mapping) else {n: xrange for n in names if xrange}
    plan = {}
    notes = list(notes)
    n_traces = n_values = 0
    for name in names:
        ds = runs[name]
        ranks = ranks_of(ds)
        keys, lacking = rank_keys(ranks, rank)
        if lacking:
            notes.append(f"{name} {lacking}: its merged statistics are drawn")
        steps = np.asarray(ds[S.STEP].values)
        rows = window.rows(steps, zooms.get(name))
        pos = [locate(name, layer, unit) for layer, unit in neurons]
        present = list(dict.fromkeys(p for p in pos if p is not None))
        stats = [s for _, pair in PAIRS for s in pair if s in ds.data_vars]
        bad = sum(int(v) for k, v in (ds.attrs.get(S.ATTR_NONFINITE) or {}).items()
                  if k in stats)
        if bad:  # the envelope drops them: say so, or the line joining across them hides them
            notes.append(f"{name}: {bad:,} non-finite values (NaN/inf where a layer ran) are "
                         f"not drawn; lines join across them")
        plan[name] = (steps, rows, pos, present, stats, keys, ranks)
        n_traces += (len(present) * len(stats) + len(scalars)) * len(keys)
        # a merged column reads each rank's column and count
        reads = sum(2 * len(ranks) if k == MERGED else 1 for k in keys)
        n_values += (rows.stop - rows.start) * len(present) * len(stats) * reads
    blank = {name: _no_steps(name, plan[name][0], window, zooms.get(name)) for name in names
             if plan[name][1].stop <= plan[name][1].start}
    if len(blank) == len(names):  # as the other views: say why instead of blank panels
        return empty_spec("<br>".join(blank.values()))
    if n_values > MAX_READ_VALUES:
        return empty_spec(
            f"This view would read {n_values:,} values (the limit is {MAX_READ_VALUES:,}): "
            "zoom in, choose a shorter window, or fewer neurons, ranks or runs.")
    per_trace = points_per_trace(n_traces, n_points)
    cells = [SCALAR_HEIGHT] * len(scalars) + [ROW_HEIGHT] * (2 * len(neurons))
    span = "; ".join([window.label()] * (len(zooms) < len(names))
                     + [f"{n if len(names) > 1 else 'steps'} {z[0]:,.0f}–{z[1]:,.0f}"
                        for n, z in zooms.items() if n in names])
    if any(rows.stop - rows.start > per_trace for _, rows, *_ in plan.values()):
        notes.append(f"min/max envelope of ≤ {per_trace:,} points per trace; zoom in for full "
                     "resolution")
    if any(len(p[5]) > 1 for p in plan.values()):
        notes.append("thin lines: each rank's own batch statistics; thick: merged over the "
                     "ranks (what SyncBatchNorm normalizes with)")
    grid = Grid.wrap(len(names), cells, max_cols, top=header_height(notes) + 24)
    data, annotations, empty = [], [], set()
    shown = set()
    for p, name in enumerate(names):
        steps, rows, pos, present, stats, keys, ranks = plan[name]
        x_all = steps[rows]
        if name in blank:
            annotations.append(grid.note(p, 0, blank[name]))
            for c in range(len(scalars) + 2 * len(neurons)):
                data.append(_placeholder(grid, p, c))
                empty.add((p, c))
            continue
        try:
            cols = ({(s, k): read(name, s, present, rows, k) for s in stats for k in keys}
                    if present else {})
            logged = {(scalar, k): read_scalar(name, scalar, k) for scalar in scalars
                      for k in keys}
        except StatscopeError as exc:  # a damaged run: its panel says so, the others draw
            annotations.append(grid.note(p, 0, f"{name} cannot be read: {exc}"))
            for c in range(len(scalars) + 2 * len(neurons)):
                data.append(_placeholder(grid, p, c))
                empty.add((p, c))
            continue
        for i, scalar in enumerate(scalars):
            if any(logged[(scalar, k)] is None for k in keys):
                annotations.append(grid.note(p, i, f"no {scalar} logged in {name}"))
                data.append(_placeholder(grid, p, i))
                empty.add((p, i))
                continue
            lines: list[dict] = []
            for k in keys:
                y = logged[(scalar, k)]
                x, v = envelope(x_all, np.asarray(y)[rows], per_trace)
                if not len(x):
                    continue
                who = _who(name, k, ranks)
                lines.append({"type": "scatter", "x": x, "y": v,
                              "mode": "lines" if len(x) > 60 else "lines+markers",
                              "name": scalar, "showlegend": False,
                              "line": {"color": SCALAR_COLOR, "width": _width(k, keys, 1.2)},
                              "opacity": _opacity(k, keys),
                              "marker": {"size": 4, "color": SCALAR_COLOR},
                              "hovertemplate": f"step %{{x}}<br>{scalar} %{{y:.4g}}<extra>{who}"
                                               "</extra>",
                              "meta": {"run": name, "scalar": scalar, **_rank_meta(k)},
                              **grid.refs(p, i)})
            _fill(grid, p, i, lines, f"no finite {scalar} in {name} in these steps", data,
                  annotations, empty)
        for j_neuron, ((layer, unit), q) in enumerate(zip(neurons, pos)):
            cell = len(scalars) + 2 * j_neuron
            if q is None:
                for r in range(2):
                    annotations.append(grid.note(p, cell + r,
                                                 f"no {neuron_label(layer, unit)} in {name}"))
                    data.append(_placeholder(grid, p, cell + r))
                    empty.add((p, cell + r))
                continue
            j = present.index(q)
            for r, (_, pair) in enumerate(PAIRS):
                drawn: list[dict] = []
                for stat in pair:
                    for k in keys:
                        if (stat, k) not in cols:
                            continue
                        block = cols[(stat, k)]
                        col = block[j] if isinstance(block, (list, tuple)) else block[:, j]
                        x, y = envelope(x_all, col, per_trace)
                        if not len(x):  # no finite value here: an empty line draws nothing
                            continue
                        # reduced, unless the window was short or only NaN steps were dropped
                        down = len(col) > per_trace and len(x) < len(col)
                        legend = k in (None, MERGED) and stat not in shown
                        who = _who(name, k, ranks)
                        drawn.append({
                            "type": "scatter", "x": x, "y": y, "mode": "lines",
                            "name": STAT_LABELS[stat], "legendgroup": stat,
                            "showlegend": legend,
                            "line": {"color": STAT_COLORS[stat], "dash": STAT_DASH[stat],
                                     "width": _width(k, keys, 1.4)},
                            "opacity": _opacity(k, keys),
                            "hovertemplate": (f"step %{{x}}<br>{STAT_LABELS[stat]} %{{y:.4g}}"
                                              f"<extra>{who} · {neuron_label(layer, unit)}"
                                              "</extra>"),
                            "meta": {"run": name, "neuron": [layer, unit], "stat": stat,
                                     "downsampled": bool(down), **_rank_meta(k)},
                            **grid.refs(p, cell + r)})
                        if legend:
                            shown.add(stat)
                if stats:
                    _fill(grid, p, cell + r, drawn, f"no finite {neuron_label(layer, unit)} "
                          f"{PAIRS[r][0]}s in {name} in these steps", data, annotations, empty)
    unit = STAT_UNITS[S.BN_MEAN]
    y_titles = [_scalar_title(runs[names[0]], s) for s in scalars]
    named = layer_titles([layer for layer, _ in neurons])
    for layer, u in neurons:
        y_titles += [f"{neuron_label(named[layer], u)} {what}<br><span style='font-size:11px'>"
                     f"({unit})</span>" for what, _ in PAIRS]
    titles = []
    for n in names:
        keys, ranks = plan[n][5], plan[n][6]
        label = rank_label(keys[0], ranks) if len(keys) == 1 else f"{len(ranks)} ranks and merged"
        titles.append(run_title(n, runs[n]) + (f" · {label}" if label else ""))
    layout = grid.layout(share_x="panel", share_y="cell", x_title="training step",
                         titles=titles, y_titles=y_titles, empty=empty)
    layout["annotations"] += annotations
    layout.update(header(f"Statistics over training, {span}", notes, height=grid.height))
    layout["template"] = TEMPLATE_JSON
    layout["uirevision"] = repr((names, list(neurons), list(scalars), window.spec(), rank))
    for p, name in enumerate(names):
        for c in range(grid.n_cells):
            if name in zooms and (p, c) not in empty:
                n = grid.axis(p, c)
                layout[f"xaxis{'' if n == 1 else n}"].update(range=list(zooms[name]),
                                                             autorange=False)
    return {"data": data, "layout": layout}


def _who(name: str, key, ranks) -> str:
    """The hover's run part: the run's name, and which rank's statistics for a distributed run."""
    label = rank_label(key, ranks)
    return f"{name} · {label}" if label else name


def _rank_meta(key) -> dict:
    return {} if key is None else {"rank": key}


def _width(key, keys, width: float) -> float:
    """Each rank's line is thin and the merged one thick when both are drawn."""
    if len(keys) == 1:
        return width
    return width * 0.6 if key != MERGED else width * 1.25


def _opacity(key, keys) -> float:
    return 0.55 if len(keys) > 1 and key != MERGED else 1.0


def _placeholder(grid: Grid, panel: int, cell: int) -> dict:
    """A trace of one missing point, so that plotly draws the cell (and its note) although it
    holds no data. Not an empty trace: plotly.js draws an empty one's line from the axes it
    had before (``Plotly.react`` from the page's first figure) and logs ``<path> attribute d:
    Expected number, "MNaN,NaN..."`` in the browser's console."""
    return {"type": "scatter", "x": [None], "y": [None], "mode": "lines", "showlegend": False,
            "hoverinfo": "skip", "meta": {"placeholder": True}, **grid.refs(panel, cell)}


def _fill(grid: Grid, panel: int, cell: int, traces: list[dict], why: str, data: list,
          annotations: list, empty: set) -> None:
    """Add a cell's traces, or, when none has a point to draw, a note saying ``why``."""
    if traces:
        data.extend(traces)
        return
    annotations.append(grid.note(panel, cell, why))
    data.append(_placeholder(grid, panel, cell))
    empty.add((panel, cell))


def _no_steps(name: str, steps: np.ndarray, window: Window,
              zoom: tuple[float, float] | None) -> str:
    """Why a run's panel is empty: it has no step yet, or none in the window (or zoom)."""
    if not len(steps):
        return f"{name} has no steps recorded yet"
    span = window.label() if zoom is None else f"steps {zoom[0]:,.0f}–{zoom[1]:,.0f}"
    return (f"No steps of {name} in {span}: it has steps {int(steps[0]):,}–"
            f"{int(steps[-1]):,}")


def evolution_figure(runs: Mapping[str, xr.Dataset], neurons: Sequence[tuple[str, int]],
                     window: Window, *, scalars: Sequence[str] = (),
                     xrange: tuple[float, float] | Mapping[str, tuple[float, float]] | None = None,
                     n_points: int = DEFAULT_POINTS, read: Reader | None = None,
                     locate: Locator | None = None, read_scalar: ScalarReader | None = None,
                     max_cols: int = RUNS_PER_PAGE, notes: Sequence[str] = (),
                     rank: str | int = MERGED) -> go.Figure:
    """Figure 7: the statistics of each chosen neuron over the window, one panel per run.

    Args:
        runs: run name to its Dataset (schema of :mod:`statscope.schema`), in panel order.
        neurons: ``(layer, unit)`` pairs; where a run lacks one, its cells say so.
        window: the steps to show when not zoomed.
        scalars: logged scalars (e.g. ``"loss"``, see :func:`scalar_names`) drawn above the
            statistics on the same step axis; a run that did not log one says so.
        xrange: a zoomed step range ``(x0, x1)`` for every run, or ``{run: (x0, x1)}`` for some;
            overrides ``window`` where given. Each run has its own step axis (runs of different
            lengths each show their own window), shared by the rows of its panel.
        n_points: the most points per trace; longer spans are reduced to their min/max
            envelope, and to fewer points when the figure's traces together would pass
            :data:`~statscope.dashboards.limits.MAX_POINTS`.
        read, locate, read_scalar: where the columns, neuron positions and scalars come from;
            default straight from ``runs``.
        max_cols: panels side by side; more runs wrap into further rows.
        notes: lines under the title (what the caller left out).
        rank: for distributed runs (a ``rank`` dimension): ``"merged"`` (the global statistics,
            :func:`statscope.ranks.merge_ranks`), a rank number, or ``"each"`` (every rank's
            curves, thin, beside the merged ones, thick). Single-process runs ignore it.

    Returns:
        Figure with ``len(scalars) + 2 * len(neurons)`` rows per panel; statistic traces are
        named after the statistic and carry ``meta = {"run", "neuron", "stat", "downsampled"}``
        (and ``"rank"``, a rank number or ``"merged"``, for a distributed run),
        scalar traces ``meta = {"run", "scalar"}``. A view that would read more than
        :data:`~statscope.dashboards.limits.MAX_READ_VALUES` values is a message instead.
    """
    return go.Figure(evolution_spec(runs, neurons, window, scalars=scalars, xrange=xrange,
                                    n_points=n_points, read=read, locate=locate,
                                    read_scalar=read_scalar, max_cols=max_cols, notes=notes,
                                    rank=rank))
