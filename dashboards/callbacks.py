"""Thin callbacks: parse the view state from the URL, fetch through the catalog, call a builder.

Each callback is a plain function of the :class:`~statscope.dashboards.data.RunCatalog` and the
callback's inputs, so tests call it directly; :func:`register` wires them into a Dash app.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, no_update
from dash.exceptions import PreventUpdate

from statscope import schema as S
from statscope.errors import StatscopeError

from . import metrics
from .bars import fluctuation_figure
from .data import RunCatalog, natural_key, neuron_key, parse_neuron_key
from .evolution import evolution_figure, run_title
from .heatmap import heatmap_figure
from .layout import GRAPHS, run_panel, status_badges
from .runinfo import run_summary
from .scatter import scatter_figure
from .state import ViewState, Window
from .style import empty_figure

__all__ = ["normalize", "sync_state", "options", "poll", "computed", "prewarm", "zoom_range", "zoom_store",
           "evolution", "fluctuation", "scatter", "heatmap", "runs_tab", "register",
           "MAX_DEFAULT_RUNS", "N_BOOT"]

MAX_DEFAULT_RUNS = 4
"""Runs shown when the URL names none."""
N_BOOT = 200
"""Bootstrap replicates for the intervals and claims: enough for a 95% interval on screen,
five times cheaper than the analyses' default of 1,000."""

_RANGE_KEY = re.compile(r"^xaxis(\d*)\.range(\[0\])?$")
_AUTORANGE_KEY = re.compile(r"^xaxis(\d*)\.autorange$")


def normalize(catalog: RunCatalog, state: ViewState) -> ViewState:
    """Fill defaults and drop whatever the catalog does not know (unknown runs, neurons, layers).

    This is the one gate between the URL and the store: a run name that is not a run found
    under the root is dropped here, so no request reaches a path outside it.
    """
    names = catalog.names()
    runs = tuple(catalog.valid(state.runs)) or tuple(names[:MAX_DEFAULT_RUNS])
    if not runs:
        return state.replace(runs=(), neurons=(), layer=None)
    ds = catalog.dataset(runs[0])
    layers = list(dict.fromkeys(ds[S.LAYER].values.tolist()))
    known = {neuron_key(l, u) for l, u in zip(ds[S.LAYER].values, ds[S.UNIT].values)}
    neurons = tuple(n for n in state.neurons if n in known)
    if not neurons:
        neurons = tuple(neuron_key(layer, _first_unit(ds, layer)) for layer in layers)
    layer = state.layer if state.layer in layers else layers[0]
    return state.replace(runs=runs, neurons=neurons, layer=layer)


def _first_unit(ds, layer: str) -> int:
    return int(ds[S.UNIT].values[ds[S.LAYER].values == layer].min())


def _window_from_controls(kind, n, start, stop, fallback: Window) -> Window:
    try:
        if kind == "all":
            return Window("all")
        if kind == "range":
            return Window("range", start=int(start), stop=int(stop))
        return Window("last", n=int(n))
    except (StatscopeError, TypeError, ValueError):
        return fallback


def sync_state(catalog: RunCatalog, trigger: str | None, search: str | None, version, runs, neurons, layer, stat,
               win_kind, win_n, win_start, win_stop, scale, by, tab, click) -> tuple:
    """Keep the URL, the selectors and their choices in step.

    On page load (or back/forward) the URL sets the selectors; a selector change rewrites the
    URL; a click on a scatter point selects that neuron and opens its evolution. The choices are
    sent with the values because a Dash 4 dropdown drops a value that is not among its options.

    Args:
        catalog: the runs.
        trigger: id of the component that fired (``None`` on page load).
        search: the URL query string; the other arguments are the selectors' values and the
            scatter's ``clickData``.

    Returns:
        ``(search, run options, neuron options, layer options, runs, neurons, layer, stat,
        win_kind, win_n, win_start, win_stop, scale, by, tab)``, ``no_update`` where nothing
        changes.
    """
    current = ViewState.from_query(search)
    if trigger in (None, "url"):
        state = normalize(catalog, current)
    else:
        state = current.replace(
            runs=tuple(runs or ()), neurons=tuple(neurons or ()), layer=layer,
            stat=stat if stat in S.ALL_STATS else current.stat,
            window=_window_from_controls(win_kind, win_n, win_start, win_stop, current.window),
            scale=scale or current.scale, by=by or current.by, tab=tab or current.tab)
        if trigger == "scatter-graph" and click and click.get("points"):
            key = click["points"][0].get("customdata")
            if isinstance(key, str):
                state = state.replace(neurons=(key,), tab="evolution")
        state = normalize(catalog, state)
    query = state.to_query()
    w = state.window
    values = (list(state.runs), list(state.neurons), state.layer, state.stat, w.kind,
              w.n, w.start, w.stop, state.scale, state.by, state.tab)
    if trigger not in (None, "url", "scatter-graph"):
        values = tuple(no_update for _ in values)
    opts = (options(catalog, state.runs) if trigger in (None, "url", "version", "runs")
            else (no_update,) * 3)
    return (query if query != (search or "") else no_update, *opts, *values)


def options(catalog: RunCatalog, runs) -> tuple[list, list, list]:
    """Choices of the run, neuron and layer selectors (neurons and layers of the first run)."""
    names = catalog.names()
    run_opts = []
    for n in names:
        info = catalog.info(n)
        run_opts.append({"label": f"{run_title(n, catalog.dataset(n))} · {info.status}",
                         "value": n})
    chosen = catalog.valid(runs) or names[:1]
    if not chosen:
        return run_opts, [], []
    ds = catalog.dataset(chosen[0])
    lay, units = ds[S.LAYER].values, ds[S.UNIT].values
    neuron_opts = [{"label": f"{l}[{int(u)}]", "value": neuron_key(l, u)}
                   for l, u in zip(lay, units)]
    layer_opts = [{"label": l, "value": l} for l in dict.fromkeys(lay.tolist())]
    return run_opts, neuron_opts, layer_opts


def poll(catalog: RunCatalog, n_intervals, version, *, warm: bool = False) -> tuple:
    """Rescan the root; a new version token when a run grew, appeared or changed status.

    With ``warm``, the analyses of runs that changed are computed ahead in a background thread.

    Returns:
        ``(version, status badges, notice)``; ``no_update`` for all when nothing changed.
    """
    changed = catalog.refresh()
    if version is not None and not changed:
        raise PreventUpdate
    if changed and warm:
        threading.Thread(target=prewarm, args=(catalog, catalog.valid(changed)),
                         daemon=True).start()
    badges = status_badges([catalog.info(n) for n in sorted(catalog.version(), key=natural_key)])
    errors = catalog.errors()
    notice = [f"Could not open {n}: {e}" for n, e in errors.items()]
    if not catalog.names():
        notice.insert(0, f"No statscope runs under {catalog.root}.")
    return catalog.version(), badges, [_notice_line(m) for m in notice]


def _notice_line(message: str):
    from dash import html

    return html.Div(message)


def zoom_range(relayout: dict[str, Any] | None) -> tuple[float, float] | None | bool:
    """The step range of a plotly ``relayoutData`` event.

    Returns:
        ``(x0, x1)`` for a zoom or pan along steps, ``None`` for an autoscale (back to the
        window), ``False`` when the event does not concern the step axis.
    """
    if not relayout:
        return False
    for key, value in relayout.items():
        m = _RANGE_KEY.match(key)
        if m and m.group(2):
            other = relayout.get(f"xaxis{m.group(1)}.range[1]")
            if other is not None:
                return float(min(value, other)), float(max(value, other))
        elif m and isinstance(value, (list, tuple)) and len(value) == 2:
            return float(min(value)), float(max(value))
    if any(k.startswith("xaxis") and k.endswith(".autorange") for k in relayout):
        return None
    return False


def zoom_store(relayout, search) -> dict:
    """Remember a zoom together with the view it belongs to; a new view forgets it."""
    rng = zoom_range(relayout)
    if rng is False:
        raise PreventUpdate
    return {"view": _view_key(ViewState.from_query(search)),
            "range": None if rng is None else list(rng), "axis": _zoomed_axis(relayout)}


def _zoomed_axis(relayout: dict[str, Any]) -> int:
    """Index of the x axis a relayout event names (``xaxis`` is 1, ``xaxis3`` is 3)."""
    for key in relayout:
        m = _RANGE_KEY.match(key) or _AUTORANGE_KEY.match(key)
        if m:
            return int(m.group(1) or 1)
    return 1


def _view_key(state: ViewState) -> str:
    return repr((state.runs, state.neurons, state.layer, state.stat, state.window.spec()))


def _zoom(zoom: dict | None, search: str | None) -> tuple[float, float] | None:
    if zoom and zoom.get("range") and zoom.get("view") == _view_key(ViewState.from_query(search)):
        return tuple(zoom["range"])
    return None


def _state(catalog: RunCatalog, search: str | None) -> ViewState:
    return normalize(catalog, ViewState.from_query(search))


def _neurons(state: ViewState) -> list[tuple[str, int]]:
    return [parse_neuron_key(k) for k in state.neurons]


def evolution(catalog: RunCatalog, search, version=None, zoom=None) -> go.Figure:
    """Figure 7 for the URL's runs, neurons and window (or the remembered zoom)."""
    state = _state(catalog, search)
    runs = {n: catalog.dataset(n) for n in state.runs}
    rng, xrange = _zoom(zoom, search), None
    if rng is not None and state.runs:
        # make_subplots numbers axes row by row: the zoomed axis names the run's column
        xrange = {state.runs[(int(zoom.get("axis", 1)) - 1) % len(state.runs)]: rng}
    return evolution_figure(runs, _neurons(state), state.window, xrange=xrange,
                            read=catalog.columns)


def computed(catalog: RunCatalog, run: str, what: str, window: Window, scale_free: bool = False):
    """``statscope.analyses.<what>`` of one run and window, cached until the run changes.

    Args:
        catalog: the runs.
        run: run name.
        what: ``fluctuation``, ``fluctuation_ci``, ``sampling_baseline``, ``layer_summary`` (of
            the fluctuation) or ``claims`` (as a DataFrame).
        window: the dashboard window.
        scale_free: for the fluctuation and its intervals.
    """
    aw = metrics.to_analyses_window(window)
    fn = metrics.analysis(what)

    def compute():
        ds = catalog.dataset(run)
        if what == "fluctuation":
            return fn(ds, aw, scale_free=scale_free)
        if what == "fluctuation_ci":
            return fn(ds, aw, scale_free=scale_free, n_boot=N_BOOT)
        if what == "layer_summary":
            return fn(computed(catalog, run, "fluctuation", window, scale_free))
        if what == "claims":
            return fn(ds, aw, n_boot=N_BOOT).to_dataframe()
        return fn(ds, aw)

    flag = scale_free if what in ("fluctuation", "fluctuation_ci", "layer_summary") else None
    return catalog.memo(run, (what, window.spec(), flag), compute)


def prewarm(catalog: RunCatalog, names=None) -> None:
    """Compute the default views' analyses of finished runs ahead of the first request.

    Runs in a background thread: the whole-run columns of the default neurons (the first of
    each layer) are read into the cache, and the first visit to the fluctuation, scatter and run
    tabs finds the bootstrap intervals and claims computed. Live runs are skipped (they change
    on every poll); errors are left for the view to report.
    """
    window = ViewState().window
    for run in names if names is not None else catalog.names():
        try:
            if catalog.info(run).status == S.STATUS_RUNNING:
                continue
            state = normalize(catalog, ViewState(runs=(run,)))
            pos = [catalog.neuron_index(run, *parse_neuron_key(k)) for k in state.neurons]
            for stat in (S.BN_MEAN, S.EN_MEAN, S.BN_STD, S.EN_STD):
                catalog.columns(run, stat, [p for p in pos if p is not None])
            for sf in (True, False):
                for what in ("fluctuation", "layer_summary", "fluctuation_ci"):
                    if metrics.analysis(what) is not None:
                        computed(catalog, run, what, window, sf)
            for what in ("sampling_baseline", "claims"):
                if metrics.analysis(what) is not None:
                    computed(catalog, run, what, window)
        except (StatscopeError, KeyError):
            continue


def _titles(catalog: RunCatalog, runs) -> dict[str, str]:
    return {n: run_title(n, catalog.dataset(n)) for n in runs}


def _analysed(build) -> go.Figure:
    try:
        return build()
    except StatscopeError as exc:
        return empty_figure(str(exc))


def fluctuation(catalog: RunCatalog, search, version=None) -> go.Figure:
    """Figure 6: bars with bootstrap intervals and, on the raw scale, the sampling baseline."""
    lacking = metrics.missing("fluctuation", "layer_summary")
    if lacking:
        return empty_figure(f"statscope.analyses lacks {', '.join(lacking)}")
    state = _state(catalog, search)
    w = state.window
    sf = state.scale == "scale_free"

    def build():
        fl = {r: computed(catalog, r, "fluctuation", w, sf) for r in state.runs}
        summary = {r: computed(catalog, r, "layer_summary", w, sf) for r in state.runs}
        ci = baseline = None
        if metrics.analysis("fluctuation_ci") is not None:
            ci = {r: computed(catalog, r, "fluctuation_ci", w, sf) for r in state.runs}
        if metrics.analysis("sampling_baseline") is not None and not sf:
            baseline = {r: computed(catalog, r, "sampling_baseline", w) for r in state.runs}
        return fluctuation_figure(fl, by=state.by, neurons=_neurons(state), summary=summary,
                                  ci=ci, baseline=baseline, scale_free=sf,
                                  titles=_titles(catalog, state.runs))

    return _analysed(build)


def scatter(catalog: RunCatalog, search, version=None) -> go.Figure:
    """Std versus mean fluctuation, one point per neuron, one facet per run."""
    if metrics.missing("fluctuation"):
        return empty_figure("statscope.analyses lacks fluctuation")
    state = _state(catalog, search)
    sf = state.scale == "scale_free"

    def build():
        fl = {r: computed(catalog, r, "fluctuation", state.window, sf) for r in state.runs}
        return scatter_figure(fl, titles=_titles(catalog, state.runs), scale_free=sf)

    return _analysed(build)


def heatmap(catalog: RunCatalog, search, version=None, zoom=None) -> go.Figure:
    """The layer overview of the first chosen run."""
    state = _state(catalog, search)
    if not state.runs:
        return empty_figure("Choose a run.")
    run = state.runs[0]
    xrange = _zoom(zoom, search)
    return catalog.memo(run, ("heatmap", state.layer, state.stat, state.window.spec(), xrange),
                        lambda: heatmap_figure(catalog.dataset(run), state.layer, state.stat,
                                               state.window, run=run, xrange=xrange,
                                               read=catalog.columns))


def runs_tab(catalog: RunCatalog, search, version=None) -> list:
    """The run cards with the paper-claims table of each chosen run."""
    state = _state(catalog, search)
    tables = {}
    for r in state.runs:
        if metrics.analysis("claims") is None:
            tables[r] = "statscope.analyses lacks claims"
            continue
        try:
            tables[r] = computed(catalog, r, "claims", state.window)
        except StatscopeError as exc:
            tables[r] = str(exc)
    summaries = [run_summary(r, catalog.dataset(r)) for r in state.runs]
    return run_panel(summaries, tables, state.window.label())


def register(app: Dash, catalog: RunCatalog) -> None:
    """Wire the callbacks above into ``app``; each figure is computed only on its own tab."""
    controls = ["runs", "neurons", "layer", "stat", "win-kind", "win-n", "win-start", "win-stop",
                "scale", "by", "tab"]

    @app.callback(Output("url", "search"), Output("runs", "options"),
                  Output("neurons", "options"), Output("layer", "options"),
                  *[Output(c, "value") for c in controls],
                  Input("url", "search"), Input("version", "data"),
                  *[Input(c, "value") for c in controls], Input("scatter-graph", "clickData"))
    def _sync(search, version, *values):
        return sync_state(catalog, ctx.triggered_id, search, version, *values)

    @app.callback(Output("version", "data"), Output("run-status", "children"),
                  Output("notice", "children"), Input("poll", "n_intervals"),
                  State("version", "data"))
    def _poll(n, version):
        return poll(catalog, n, version, warm=True)

    for name in ("evolution", "heatmap"):
        app.callback(Output(f"{name}-zoom", "data"), Input(GRAPHS[name], "relayoutData"),
                     State("url", "search"))(zoom_store)

    def figure(tab, fn, zoomed):
        extra = [Input(f"{tab}-zoom", "data")] if zoomed else []

        @app.callback(Output(GRAPHS[tab], "figure"), Input("url", "search"),
                      Input("version", "data"), *extra)
        def _figure(search, version, *zoom):
            if ViewState.from_query(search).tab != tab:
                raise PreventUpdate
            return fn(catalog, search, version, *zoom)

    figure("evolution", evolution, True)
    figure("fluctuation", fluctuation, False)
    figure("scatter", scatter, False)
    figure("heatmap", heatmap, True)

    @app.callback(Output("run-panel", "children"), Input("url", "search"),
                  Input("version", "data"))
    def _run(search, version):
        if ViewState.from_query(search).tab != "run":
            raise PreventUpdate
        return runs_tab(catalog, search, version)

