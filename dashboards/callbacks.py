"""Thin callbacks: parse the view state from the URL, fetch through the catalog, call a builder.

Each callback is a plain function of the :class:`~statscope.dashboards.data.RunCatalog` and the
callback's inputs, so tests call it directly; :func:`register` wires them into a Dash app. What
a URL selects (and the selectors' sync) is :mod:`.selection`; its names are importable here too.
"""

from __future__ import annotations

from dash import Dash, Input, Output, State, ctx
from dash.exceptions import PreventUpdate

from statscope import schema as S
from statscope.errors import StatscopeError

from . import metrics
from .bars import fluctuation_spec
from .data import RunCatalog, natural_key, parse_neuron_key
from .evolution import evolution_spec, run_title
from .grid import to_wire
from .heatmap import heatmap_spec
from .layout import GRAPHS, run_panel, status_badges
from .limits import MAX_SCATTER_POINTS
from .metrics import inclusive
from .ranks import rank_keys, rank_label
from .results import (N_BOOT, claims_sample, computed, fluct, neuron_fluct, rank_comparison,
                      scatter_values)
from .runinfo import run_summary
from .scatter import scatter_spec
from .selection import (MAX_DEFAULT_RUNS, View, default_neurons, normalize, options,
                        page_count, rank_options, sync_state, view, view_key)
from .sources import SERIES
from .state import EACH, MERGED, ViewState, Window
from .style import empty_spec
from .zoom import view_zoom, zoom_range, zoom_store

__all__ = ["normalize", "view", "View", "default_neurons", "sync_state", "options",
           "rank_options", "poll",
           "computed", "prewarm", "zoom_range", "zoom_store", "evolution", "fluctuation",
           "scatter", "heatmap", "runs_tab", "register", "page_count", "MAX_DEFAULT_RUNS",
           "N_BOOT", "POLL_MAX_AGE"]

POLL_MAX_AGE = 1.0
"""Seconds one rescan of the root serves the polls of every open page."""



def poll(catalog: RunCatalog, n_intervals, version, *, warm: bool = False,
         max_age: float = POLL_MAX_AGE) -> tuple:
    """Rescan the root (at most once per :data:`POLL_MAX_AGE` for all pages); a new version
    token when this page's token is behind: a run grew, appeared or changed status.

    Every open page compares its own token, so a change one page's poll found reaches the
    others too. With ``warm``, the analyses of runs that changed are computed ahead in a
    background thread.

    Returns:
        ``(version, status badges, notice)``; ``PreventUpdate`` when this page is up to date.
    """
    changed = catalog.refresh(max_age=max_age)
    current = catalog.version()
    if changed and warm:
        catalog.spawn(prewarm, catalog, catalog.valid(changed))
    if version is not None and version == current:
        raise PreventUpdate
    badges = status_badges([catalog.info(n) for n in sorted(current, key=natural_key)])
    notice = [f"Could not open {n}: {e}" for n, e in catalog.errors().items()]
    if not catalog.names():
        gone = (" (the folder is gone: renamed or deleted? its runs come back when it does)"
                if catalog.root_gone else "")
        notice.insert(0, f"No statscope runs under {catalog.root}{gone}.")
    return current, badges, [_notice_line(m) for m in notice]


def _notice_line(message: str):
    from dash import html

    return html.Div(message)


def evolution(catalog: RunCatalog, search, version=None, zoom=None) -> dict:
    """Figure 7 (with the logged scalars above it) for the URL's page of runs, neurons, ranks
    and window, or the remembered zoom; a figure dict ready for the browser."""
    v = view(catalog, search)
    scalars = v.state.scalars or ()
    rng, xrange = view_zoom(zoom, search), None
    if rng is not None and v.runs:
        # every cell of a run's panel shares its step axis: the axis number names the panel
        cells = len(scalars) + 2 * len(v.neurons)
        axis = zoom.get("axis", 1)
        panel = (axis - 1 if isinstance(axis, int) and axis > 0 else 0) // max(1, cells)
        if panel < len(v.runs):
            xrange = {v.runs[panel]: rng}
    if not v.runs:
        return empty_spec("Choose at least one run and one neuron.")

    def build():
        return to_wire(evolution_spec(
            {n: catalog.dataset(n) for n in v.runs}, v.neurons, v.state.window, scalars=scalars,
            xrange=xrange, read=catalog.column_list, locate=catalog.neuron_index,
            read_scalar=catalog.scalar, notes=v.notes, rank=v.state.rank))

    # Cached under the first run until it changes; the others' generations are in the key, so
    # a change to any of them makes a new entry (the old one ages out of the LRU).
    gens = catalog.version()
    key = ("evolution", view_key(v.state), v.notes, repr(xrange),
           tuple(gens.get(n) for n in v.runs))
    return catalog.memo(v.runs[0], key, build)


def prewarm(catalog: RunCatalog, names=None) -> None:
    """Compute the default views' analyses of finished runs ahead of the first request.

    Runs in a background thread: the whole-run columns of the default neurons (the first of
    each layer) are read into the cache, and the first visit to the fluctuation, scatter and run
    tabs finds the fluctuation (from the per-step series or the window summaries), bootstrap
    intervals and claims computed; of a distributed run, its merged statistics. Live runs are
    skipped (they change on every poll; a run whose writer is gone is not live); errors are
    left for the view to report. It stops at its next step once the catalog is closing.
    """
    window = ViewState().window
    for run in list(names if names is not None else catalog.names()):
        if catalog.closing.is_set():
            return
        try:
            if catalog.info(run).live:
                continue
            state = normalize(catalog, ViewState(runs=(run,)))
            pos = [catalog.neuron_index(run, *parse_neuron_key(k)) for k in state.neurons]
            work = [lambda s=stat: catalog.columns(run, s, [p for p in pos if p is not None])
                    for stat in (S.BN_MEAN, S.EN_MEAN, S.BN_STD, S.EN_STD)]
            work += [lambda sf=sf: fluct(catalog, run, MERGED, window, sf)
                     for sf in (True, False)]
            work += [lambda sf=sf: _series(catalog, run, MERGED, window) and computed(
                catalog, run, "fluctuation_ci", window, sf, MERGED) for sf in (True, False)
                if metrics.analysis("fluctuation_ci") is not None]
            work += [lambda: _series(catalog, run, MERGED, window) and computed(
                catalog, run, "sampling_baseline", window, False, MERGED)]
            work += [lambda: computed(catalog, run, "claims", window, False, MERGED)]
            for step in work:
                if catalog.closing.is_set():
                    return
                step()
        except (StatscopeError, KeyError):
            continue


def _series(catalog: RunCatalog, run: str, rank, window: Window) -> bool:
    """Whether a run view's fluctuation comes from its per-step series of every neuron (only
    then are bootstrap intervals and the sampling baseline drawn: they need that series)."""
    return fluct(catalog, run, rank, window, False).source.kind == SERIES


def _titles(catalog: RunCatalog, runs, rank=MERGED) -> dict[str, str]:
    out = {}
    for n in runs:
        ranks = catalog.ranks(n)
        label = rank_label(rank_keys(ranks, rank)[0][0], ranks) if rank != EACH or not ranks \
            else f"{len(ranks)} ranks and merged"
        out[n] = run_title(n, catalog.dataset(n)) + (f" · {label}" if label else "")
    return out


def _rank_notes(catalog: RunCatalog, runs, rank) -> list[str]:
    """A line per run that lacks the chosen rank (its merged statistics are shown)."""
    return [f"{n} {lack}: its merged statistics are shown" for n in runs
            for lack in [rank_keys(catalog.ranks(n), rank)[1]] if lack]


def _source_notes(found: dict[str, str]) -> list[str]:
    """One line per distinct source note, naming its runs (all runs alike: no names)."""
    by_note: dict[str, list[str]] = {}
    for run, note in found.items():
        by_note.setdefault(note, []).append(run)
    if len(by_note) == 1:
        return [f"Fluctuation {next(iter(by_note))}"]
    return [f"{', '.join(runs)}: fluctuation {note}" for note, runs in by_note.items()]


def _analysed(build) -> dict:
    try:
        return to_wire(build())
    except StatscopeError as exc:
        return empty_spec(inclusive(str(exc)))


def _asked(window: Window) -> str:
    """The window as the page's title names it: the one chosen, even where a run has only
    part of it (:func:`_cut_notes`)."""
    from statscope.analyses import describe_window

    return describe_window(metrics.to_analyses_window(window))


def _cut_notes(catalog: RunCatalog, runs, window: Window) -> list[str]:
    """A line per run whose numbers cover only part of a chosen range: the steps it has in it
    (a live run that has not reached the range's end yet)."""
    from statscope.analyses import describe_window

    whole = metrics.to_analyses_window(window)
    out = []
    for r in runs:
        cut = metrics.to_analyses_window(window, catalog.steps(r))
        if cut != whole:
            out.append(f"{r}: {inclusive(describe_window(cut))}, the steps it has of "
                       f"{inclusive(describe_window(whole))}"
                       + (" so far" if catalog.info(r).live else ""))
    return out


def _fitting(catalog: RunCatalog, runs, analyse, notes: list[str]) -> list[str]:
    """The runs that ``analyse(run)`` takes (the window fits them); a note for each other run,
    so that one short run does not blank the others' figure. A run that has committed no step
    yet says so, as in the evolution view. Raises the first run's error when none fits."""
    shown, first = [], None
    for r in runs:
        if not len(catalog.steps(r)):
            first = first or StatscopeError(f"{r} has no steps recorded yet")
            notes.append(f"{r} has no steps recorded yet")
            continue
        try:
            analyse(r)
        except StatscopeError as exc:
            first = first or exc
            notes.append(f"{r} left out: {inclusive(str(exc))}")
            continue
        shown.append(r)
    if not shown and first is not None:
        raise first
    return shown


def _key(catalog: RunCatalog, run: str, rank):
    """The rank key a single-set view reads: each rank beside the merged is drawn only by the
    evolution and fluctuation views; the others show the merged statistics."""
    key = rank_keys(catalog.ranks(run), MERGED if rank == EACH else rank)[0][0]
    return key


def fluctuation(catalog: RunCatalog, search, version=None) -> dict:
    """Figure 6: bars with bootstrap intervals and, on the raw scale, the sampling baseline;
    for a distributed run under ``rank=each``, the per-rank and global fluctuation and the gap
    between them."""
    lacking = metrics.missing("fluctuation", "layer_summary")
    if lacking:
        return empty_spec(f"statscope.analyses lacks {', '.join(lacking)}")
    v = view(catalog, search)
    w = v.state.window
    sf = v.state.scale == "scale_free"
    rank = v.state.rank

    def build():
        fl, summary, finds, ci, baseline, ranks, found = {}, {}, {}, {}, {}, {}, {}
        notes = list(v.notes if v.state.by == "neuron" else v.notes[:1])
        notes += _rank_notes(catalog, v.runs, rank)
        shown = _fitting(catalog, v.runs,
                         lambda r: fluct(catalog, r, _key(catalog, r, rank), w, sf),
                         notes)
        for r in shown:
            if rank == EACH and catalog.ranks(r):
                ranks[r] = rank_comparison(catalog, r, w, sf, v.state.by, v.neurons)
                notes += [f"{r}, {n}" for n in ranks[r].notes]
                continue
            key = _key(catalog, r, rank)
            f = fluct(catalog, r, key, w, sf)
            found[r] = f.source.note or f"from the {f.source.kind}"
            summary[r] = f.summary
            if v.state.by == "neuron":
                fl[r], finds[r] = neuron_fluct(catalog, r, key, w, sf, v.neurons)
            else:
                fl[r] = f.values
            if f.source.kind != SERIES:
                continue
            # what the analysis left out: cells of layers that did not run, layers that ran in
            # only some steps (their bars are missing or rest on fewer steps)
            notes += [f"{r}: {n}" for n in f.values.attrs.get(S.NOTES, ()) if n not in notes]
            if metrics.analysis("fluctuation_ci") is not None:
                ci[r] = computed(catalog, r, "fluctuation_ci", w, sf, key)
            if metrics.analysis("sampling_baseline") is not None and not sf:
                baseline[r] = computed(catalog, r, "sampling_baseline", w, False, key)
        notes += _source_notes(found) if found else []
        notes += _cut_notes(catalog, shown, w)
        if ci and len(ci) < len(fl):
            notes.append("no intervals or sampling baseline where the fluctuation is not from "
                         "the per-step series of every neuron")
        return fluctuation_spec(fl, by=v.state.by, neurons=v.neurons, summary=summary,
                                ci=ci or None, baseline=baseline or None, scale_free=sf,
                                notes=notes, titles=_titles(catalog, shown, rank),
                                locate=lambda run, l, u: finds[run](l, u), ranks=ranks or None,
                                window=_asked(w))

    return _analysed(build)


def scatter(catalog: RunCatalog, search, version=None) -> dict:
    """Std versus mean fluctuation, one point per neuron, one panel per run of the page."""
    if metrics.missing("fluctuation"):
        return empty_spec("statscope.analyses lacks fluctuation")
    v = view(catalog, search)
    sf = v.state.scale == "scale_free"
    rank = v.state.rank

    def build():
        return to_wire(_scatter_spec())

    def _scatter_spec():
        skipped: list[str] = []
        shown = _fitting(catalog, v.runs, lambda r: fluct(
            catalog, r, _key(catalog, r, rank), v.state.window, sf), skipped)
        per_run = max(1, MAX_SCATTER_POINTS // max(1, len(shown)))
        fl, totals, found = {}, {}, {}
        for r in shown:
            key = _key(catalog, r, rank)
            fl[r], totals[r] = scatter_values(catalog, r, key, v.state.window, sf, per_run)
            f = fluct(catalog, r, key, v.state.window, sf)
            found[r] = f.source.note or f"from the {f.source.kind}"
        notes = [*v.notes[:1], *skipped, *_rank_notes(catalog, shown, rank),
                 *_source_notes(found), *_cut_notes(catalog, shown, v.state.window)]
        if rank == EACH and any(catalog.ranks(r) for r in v.runs):
            notes.append("each rank is drawn in the evolution and fluctuation views; here: the "
                         "merged statistics")
        return scatter_spec(fl, titles=_titles(catalog, shown, MERGED if rank == EACH
                                               else rank),
                            scale_free=sf, notes=notes, totals=totals,
                            window=_asked(v.state.window))

    if not v.runs:
        return empty_spec("Choose at least one run.")
    # 20,000 points take tens of ms to lay out: a repeated view comes from the cache
    gens = catalog.version()
    key = ("scatter", view_key(v.state), v.state.scale, v.notes,
           tuple(gens.get(n) for n in v.runs))
    try:
        return catalog.memo(v.runs[0], key, build)
    except StatscopeError as exc:
        return empty_spec(inclusive(str(exc)))


def heatmap(catalog: RunCatalog, search, version=None, zoom=None) -> dict:
    """The layer overview of the first run of the page (of a distributed run: the chosen rank,
    or the merged statistics)."""
    v = view(catalog, search)
    if not v.runs:
        return empty_spec("Choose a run.")
    run, state = v.runs[0], v.state
    xrange = view_zoom(zoom, search)
    key = _key(catalog, run, state.rank)
    label = rank_label(key, catalog.ranks(run))
    if key == MERGED and state.stat == S.BN_KURT:
        return empty_spec("BN_kurt is not merged over ranks (it needs third moments): "
                          "choose a rank.")

    def build():
        # the run's own Dataset gives the steps and units; the columns come merged or per rank
        return _analysed(lambda: heatmap_spec(
            catalog.dataset(run), state.layer, state.stat, state.window, run=run,
            xrange=xrange, read=lambda n, s, p, rows: catalog.columns(n, s, p, rows, key),
            positions=catalog.layer_positions(run, state.layer), label=label))

    return catalog.memo(run, ("heatmap", state.layer, state.stat, state.window.spec(), xrange,
                              key), build)


def _runs_tab(catalog: RunCatalog, v: View) -> list:
    tables, notes = {}, list(v.notes[:1])
    for r in v.runs:
        if metrics.analysis("claims") is None:
            tables[r] = "statscope.analyses lacks claims"
            continue
        key = _key(catalog, r, v.state.rank)
        if not len(catalog.steps(r)):
            tables[r] = f"{r} has no steps recorded yet"
            continue
        try:
            tables[r] = computed(catalog, r, "claims", v.state.window, False, key)
        except StatscopeError as exc:
            tables[r] = inclusive(str(exc))
        sample = claims_sample(catalog, r)[1]
        label = rank_label(key, catalog.ranks(r))
        if sample or label:
            notes.append(f"{r}: " + "; ".join(x for x in (label and f"claims of the {label} "
                                                          "statistics", sample) if x))
    notes += _cut_notes(catalog, v.runs, v.state.window)
    summaries = [run_summary(r, catalog.dataset(r), status=catalog.info(r).label)
                 for r in v.runs]
    return run_panel(summaries, tables, v.state.window.label(), notes=notes)


def runs_tab(catalog: RunCatalog, search, version=None) -> list:
    """The run cards of the page's runs, each with its paper-claims table (of a distributed
    run: on the chosen rank, or the merged statistics); a repeated view comes from the cache
    (a wide run's table has hundreds of rows of components)."""
    v = view(catalog, search)
    if not v.runs:
        return _runs_tab(catalog, v)
    gens = catalog.version()
    key = ("runs", view_key(v.state), v.notes, tuple(gens.get(n) for n in v.runs))
    return catalog.memo(v.runs[0], key, lambda: _runs_tab(catalog, v))

CONTROLS = ("runs", "neurons", "layer", "stat", "win-kind", "win-n", "win-start", "win-stop",
            "scale", "by", "tab", "page", "scalars")
"""Ids of the selectors whose values :func:`sync_state` reads and sets, in its order."""


def register(app: Dash, catalog: RunCatalog) -> None:
    """Wire the callbacks above into ``app``; each figure is computed only on its own tab."""

    @app.callback(Output("url", "search"), Output("runs", "options"),
                  Output("neurons", "options"), Output("layer", "options"),
                  Output("page", "options"), Output("scalars", "options"),
                  *[Output(c, "value") for c in CONTROLS],
                  Output("rank", "options"), Output("rank", "value"),
                  Output("view-notice", "children"),
                  Input("url", "search"), Input("version", "data"),
                  *[Input(c, "value") for c in CONTROLS], Input("scatter-graph", "clickData"),
                  Input("neurons", "search_value"), Input("rank", "value"))
    def _sync(search, version, *values):
        trigger = ctx.triggered_id
        if "neurons.search_value" in ctx.triggered_prop_ids:
            trigger = "neuron-search"
        return sync_state(catalog, trigger, search, version, *values)

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
            try:
                return fn(catalog, search, version, *zoom)
            except StatscopeError as exc:  # said on the page, not an HTTP 500 and a blank figure
                return empty_spec(inclusive(str(exc)))

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
