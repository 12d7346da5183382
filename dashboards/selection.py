"""What a URL selects, and the selectors kept in step with it.

The page's state lives in its URL (:class:`~statscope.dashboards.state.ViewState`).
:func:`normalize` is the one gate between the URL and the store: it fills defaults and drops what
the catalog does not know. :func:`view` works out what the figures of a URL draw;
:func:`sync_state` keeps the URL, the selectors and their choices in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dash import no_update
from dash.exceptions import PreventUpdate

from statscope import schema as S
from statscope.errors import StatscopeError

from .data import RunCatalog, neuron_key, parse_neuron_key
from .evolution import run_title
from .limits import MAX_NEURONS, MAX_OPTIONS, MAX_SCALARS, RUNS_PER_PAGE
from .state import EACH, GROUPINGS, MERGED, SCALES, TABS, ViewState, Window, parse_rank
from .style import neuron_label

__all__ = ["MAX_DEFAULT_RUNS", "page_count", "default_neurons", "normalize", "View", "view",
           "sync_state", "options", "rank_options", "view_key"]

MAX_DEFAULT_RUNS = 4
"""Runs shown when the URL names none."""

def page_count(n_runs: int) -> int:
    """Pages of :data:`~statscope.dashboards.limits.RUNS_PER_PAGE` runs that ``n_runs`` fill."""
    return max(1, math.ceil(n_runs / RUNS_PER_PAGE))


def _page(state: ViewState) -> tuple[str, ...]:
    return state.runs[state.page * RUNS_PER_PAGE:(state.page + 1) * RUNS_PER_PAGE]


def _known(catalog: RunCatalog, runs: Sequence[str], key: str) -> bool:
    try:
        layer, unit = parse_neuron_key(key)
    except StatscopeError:
        return False
    return any(catalog.neuron_index(r, layer, unit) is not None for r in runs)


def default_neurons(catalog: RunCatalog, runs: Sequence[str]) -> tuple[str, ...]:
    """The first neuron of each layer of each run (the paper's "i-1"), in order, no repeats.

    Runs of different models each bring their own layers. Past
    :data:`~statscope.dashboards.limits.MAX_NEURONS` the layers are taken evenly from first to
    last, so a deep model shows its depth.
    """
    keys = list(dict.fromkeys(neuron_key(layer, catalog.first_unit(r, layer))
                              for r in runs for layer in catalog.layers(r)))
    if len(keys) > MAX_NEURONS:
        keys = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, MAX_NEURONS)
                                           .round().astype(int))]
    return tuple(keys)


def normalize(catalog: RunCatalog, state: ViewState) -> ViewState:
    """Fill defaults and drop whatever the catalog does not know (unknown runs, neurons, layers).

    This is the one gate between the URL and the store: a run name that is not a run found
    under the root is dropped here, so no request reaches a path outside it. A neuron is kept
    when any chosen run has it; the default neurons and scalars are those of the page's runs.
    Its cost grows with the runs and neurons chosen, never with a run's neuron count.
    """
    names = catalog.names()
    runs = tuple(catalog.valid(state.runs)) or tuple(names[:MAX_DEFAULT_RUNS])
    if not runs:
        return state.replace(runs=(), neurons=(), layer=None, page=0)
    page = min(max(0, state.page), page_count(len(runs)) - 1)
    shown = runs[page * RUNS_PER_PAGE:(page + 1) * RUNS_PER_PAGE]
    neurons = tuple(k for k in state.neurons if _known(catalog, runs, k))
    layers = catalog.layers(shown[0])
    if state.scalars is None:
        scalars = tuple(dict.fromkeys(s for r in shown for s in catalog.scalar_names(r)))
        scalars = scalars[:MAX_SCALARS]
    else:
        logged = {s for r in runs for s in catalog.scalar_names(r)}
        scalars = tuple(s for s in state.scalars if s in logged)
    rank = state.rank
    if isinstance(rank, int) and not any(rank in catalog.ranks(r) for r in runs):
        rank = MERGED
    return state.replace(runs=runs, page=page, neurons=neurons or default_neurons(catalog, shown),
                         layer=state.layer if state.layer in layers else layers[0],
                         scalars=scalars, rank=rank)


@dataclass(frozen=True)
class View:
    """What the figures of one URL draw.

    Attributes:
        state: the normalized view state.
        runs: the runs of the current page, in panel order.
        neurons: the neurons drawn, ``(layer, unit)``, at most
            :data:`~statscope.dashboards.limits.MAX_NEURONS`.
        notes: what the view leaves out (other pages, neurons past the cap), one line each.
    """

    state: ViewState
    runs: tuple[str, ...]
    neurons: tuple[tuple[str, int], ...]
    notes: tuple[str, ...]


def view(catalog: RunCatalog, search: str | None) -> View:
    """Normalize the URL's state and work out the page, the neurons drawn and the notes."""
    state = normalize(catalog, ViewState.from_query(search))
    runs = _page(state)
    notes = []
    n_pages = page_count(len(state.runs))
    if n_pages > 1:
        first = state.page * RUNS_PER_PAGE + 1
        notes.append(f"Runs {first}–{first + len(runs) - 1} of {len(state.runs)} (page "
                     f"{state.page + 1} of {n_pages}; choose the page at the left)")
    if len(state.neurons) > MAX_NEURONS:
        notes.append(f"The first {MAX_NEURONS} of the {len(state.neurons)} chosen neurons "
                     f"(at most {MAX_NEURONS} are drawn at once)")
    neurons = tuple(parse_neuron_key(k) for k in state.neurons[:MAX_NEURONS])
    return View(state, runs, neurons, tuple(notes))


def _step(value) -> int | None:
    """A step typed in a number box, or ``None`` when the box is empty or holds no number."""
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _window_from_controls(kind, n, start, stop, current: Window,
                          bounds: Callable[[], tuple[int, int] | None]) -> tuple[Window, bool]:
    """The window the window controls choose, and whether they are mid-edit.

    A range with both boxes empty (the user just chose "range") is the current window's
    ``bounds()``. A range with one box empty, or its last step before its first, is being typed:
    the current window stays, and the controls are left as they are (answering with the
    current window would set the radio back and clear what was typed).

    Returns:
        ``(window, editing)``.
    """
    if kind == "all":
        return Window("all"), False
    if kind == "range":
        a, b = _step(start), _step(stop)
        if a is None and b is None:
            a, b = bounds() or (None, None)
        if a is None or b is None or b < a:
            return current, True
        return Window("range", start=a, stop=b), False
    try:
        return Window("last", n=int(n)), False
    except (StatscopeError, TypeError, ValueError, OverflowError):
        return current, False


def _bounds(catalog: RunCatalog, state: ViewState) -> tuple[int, int] | None:
    """First and last step the window of ``state`` covers in the first run of its page (the
    range the "range" choice starts from), or ``None`` when it covers none."""
    w = state.window
    if w.kind == "range" and w.start is not None and w.stop is not None:
        return w.start, w.stop
    page = _page(state)
    if not page:
        return None
    steps = catalog.steps(page[0])[state.window.rows(catalog.steps(page[0]))]
    return (int(steps[0]), int(steps[-1])) if len(steps) else None


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _strings(value) -> tuple[str, ...]:
    """The names a multi-select sends: a list of strings; anything else in it is dropped (a
    request may carry anything)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _one(value, choices, default):
    """``value`` when it is one of ``choices`` (a str), else ``default``."""
    return value if isinstance(value, str) and value in choices else default


def _clicked(click) -> str | None:
    """The neuron key of a scatter point's ``clickData``, or ``None``."""
    points = click.get("points") if isinstance(click, dict) else None
    first = points[0] if isinstance(points, list) and points else None
    key = first.get("customdata") if isinstance(first, dict) else None
    return key if isinstance(key, str) else None


def _gone_notice(catalog: RunCatalog, asked, state: ViewState) -> list[str]:
    """A line on the runs a page asked for that the catalog has not (any more): renamed,
    deleted, or unreadable now; and which runs are shown instead."""
    names = set(catalog.names())
    gone = [r for r in dict.fromkeys(asked) if r not in names]
    if not gone:
        return []
    errors = catalog.errors()
    missing = [r for r in gone if r not in errors]
    where = catalog.root if catalog.root is not None else "this dashboard"
    parts = [f"Run {r} cannot be opened now ({errors[r]})" for r in gone if r in errors]
    if missing:
        many = len(missing) > 1
        parts.insert(0, f"Run{'s' * many} {', '.join(missing)} {'are' if many else 'is'} not "
                        f"under {where} (renamed or deleted?)")
    shown = [r for r in state.runs if r not in gone]
    return ["; ".join(parts) + (f"; showing {', '.join(shown)} instead." if shown else ".")]


def sync_state(catalog: RunCatalog, trigger: str | None, search: str | None, version, runs,
               neurons, layer, stat, win_kind, win_n, win_start, win_stop, scale, by, tab, page,
               scalars, click, search_value: str | None = None, rank=None) -> tuple:
    """Keep the URL, the selectors and their choices in step.

    On page load (or back/forward) the URL sets the selectors; a selector change rewrites the
    URL (and corrects a selector whose value the catalog does not accept); a click on a scatter
    point selects that neuron and opens its evolution; typing in the neuron selector searches
    the chosen runs' neurons. The choices are sent with the values because a Dash 4 dropdown
    drops a value that is not among its options.

    Args:
        catalog: the runs.
        trigger: id of the component that fired (``None`` on page load; ``"neuron-search"``
            for typing in the neuron selector).
        search: the URL query string; the other arguments are the selectors' values, the
            scatter's ``clickData``, the neuron selector's ``search_value`` and the rank
            selector's value.

    Choosing "range" in the window controls fills its boxes with the steps the current window
    covers (typing a step in a box chooses "range" too); while a range is being typed (a box
    empty, or its last step before its first) the URL keeps the current window and the
    controls are left alone.

    A run the URL or the run selector names that the catalog has not (renamed or deleted while
    shown, or a stale link) is replaced by the defaults, and a notice says so.

    Returns:
        ``(search, run options, neuron options, layer options, page options, scalar options,
        runs, neurons, layer, stat, win_kind, win_n, win_start, win_stop, scale, by, tab,
        page, scalars, rank options, rank, notice)``, ``no_update`` where nothing changes;
        ``notice`` is a list of lines for the page (empty to clear it).
    """
    n_out = 22
    if trigger == "neuron-search":
        if not search_value or not isinstance(search_value, str):
            raise PreventUpdate
        state = normalize(catalog, ViewState.from_query(search))
        opts = _neuron_options(catalog, state, search_value)
        return (no_update, no_update, opts) + (no_update,) * (n_out - 3)
    current = ViewState.from_query(search)
    editing = False
    unseen = None  # a clicked scatter point whose neuron has no per-step series to draw
    dropped: list[str] = []  # neurons the URL names that the page's runs have no series of
    if trigger in (None, "url"):
        state = normalize(catalog, current)
        asked = current.runs
        if state.runs:
            dropped = [k for k in dict.fromkeys(current.neurons) if k not in state.neurons]
    else:
        asked = _strings(runs)
        # typing a step chooses a range
        kind = "range" if trigger in ("win-start", "win-stop") else win_kind
        window, editing = _window_from_controls(kind, win_n, win_start, win_stop,
                                                current.window,
                                                lambda: _bounds(catalog, normalize(catalog,
                                                                                   current)))
        state = current.replace(
            runs=asked, neurons=_strings(neurons), layer=layer if isinstance(layer, str) else None,
            stat=_one(stat, S.ALL_STATS, current.stat), window=window,
            scale=_one(scale, SCALES, current.scale), by=_one(by, GROUPINGS, current.by),
            tab=_one(tab, TABS, current.tab),
            page=_int(page, current.page) if trigger != "runs" else 0,
            scalars=_strings(scalars), rank=parse_rank(rank) if rank is not None
            else current.rank)
        key = _clicked(click) if trigger == "scatter-graph" else None
        if key is not None:
            clicked = normalize(catalog, state.replace(neurons=(key,), tab="evolution"))
            if key in clicked.neurons:
                state = clicked
            else:
                unseen = key
        state = normalize(catalog, state)
        if trigger == "version":  # the URL's runs, too: the selector may have dropped one
            asked = (*current.runs, *asked)
    query = state.to_query()
    w = state.window
    values = (list(state.runs), list(state.neurons), state.layer, state.stat, w.kind,
              w.n, w.start, w.stop, state.scale, state.by, state.tab, state.page,
              list(state.scalars or ()))
    rank_value = str(state.rank)
    if trigger not in (None, "url", "scatter-graph"):
        given = (runs, neurons, layer, stat, win_kind, win_n, win_start, win_stop, scale, by,
                 tab, page, scalars)
        values = tuple(v if _differs(v, g) else no_update for v, g in zip(values, given))
        if editing:  # leave the window controls as the user is setting them
            values = values[:4] + ("range" if given[4] != "range" else no_update,
                                   *(no_update,) * 3) + values[8:]
        rank_value = no_update if rank is None or rank_value == str(rank) else rank_value
    fresh = trigger in (None, "url", "version", "runs", "page", "scatter-graph", "neurons")
    opts = options(catalog, state) if fresh else (no_update,) * 5
    notice: Any = _gone_notice(catalog, asked, state)
    if unseen is not None:
        notice.append(_unseen_notice(unseen, state.runs))
    if dropped:
        notice.append(_dropped_notice(dropped, state))
    if not notice and trigger == "version":
        notice = no_update  # a poll keeps what the page says until the user changes the view
    return (query if query != (search or "") else no_update, *opts, *values,
            rank_options(catalog, state) if fresh else no_update, rank_value, notice)


def _unseen_notice(key: str, runs: Sequence[str]) -> str:
    """Why a clicked scatter point does not open its evolution: the std-vs-mean view draws
    every channel from the window summaries, the evolution needs the per-step columns, which a
    run recorded with ``neurons=`` keeps of some channels only."""
    try:
        label = neuron_label(*parse_neuron_key(key))
    except (StatscopeError, ValueError):
        label = key
    return (f"{label} has no per-step series in {', '.join(runs)} (its per-step columns were "
            "not kept when recording, neurons=): its point comes from the window summaries, "
            "and there is no evolution to open.")


def _dropped_notice(keys: Sequence[str], state: ViewState) -> str:
    """Why neurons the URL names are not drawn: none of the page's runs has a per-step series of
    them (no such layer or channel, or its columns were not kept when recording, neurons=)."""
    labels = []
    for key in keys[:5]:
        try:
            labels.append(neuron_label(*parse_neuron_key(key)))
        except (StatscopeError, ValueError):
            labels.append(repr(key))
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    shown = ", ".join(neuron_label(*parse_neuron_key(k)) for k in state.neurons[:5])
    return (f"{', '.join(labels)}{more}: no per-step series in {', '.join(state.runs)} (no such "
            "channel, or its per-step columns were not kept when recording, neurons=); "
            f"showing {shown}.")


def _differs(new, given) -> bool:
    if isinstance(new, list) or isinstance(given, (list, tuple)):
        return list(new or []) != list(given or [])
    return new != given


def _neuron_options(catalog: RunCatalog, state: ViewState, text: str | None = None) -> list:
    """The chosen neurons, the defaults, and the first matches of ``text`` (or of every layer),
    at most :data:`~statscope.dashboards.limits.MAX_OPTIONS` beyond the chosen ones."""
    keys = dict.fromkeys(state.neurons)
    keys.update(dict.fromkeys(default_neurons(catalog, _page(state))))
    keys.update(dict.fromkeys(neuron_key(l, u) for l, u in
                              catalog.search_neurons(state.runs, text or "", MAX_OPTIONS)))
    out = []
    for k in keys:
        layer, unit = parse_neuron_key(k)
        out.append({"label": neuron_label(layer, unit), "value": k})
    return out


def rank_options(catalog: RunCatalog, state: ViewState) -> list:
    """Choices of the rank selector: the merged statistics, each rank beside them, and every
    rank of the chosen runs; empty when none of them is distributed."""
    ranks = sorted({r for n in state.runs for r in catalog.ranks(n)})
    if not ranks:
        return []
    return ([{"label": " merged (global)", "value": MERGED},
             {"label": " each rank", "value": EACH}]
            + [{"label": f" rank {r}", "value": str(r)} for r in ranks])


def options(catalog: RunCatalog, state: ViewState) -> tuple[list, list, list, list, list]:
    """Choices of the run, neuron, layer, page and scalar selectors for a normalized state.

    Neurons: the chosen ones, the defaults and the first
    :data:`~statscope.dashboards.limits.MAX_OPTIONS` of the chosen runs (typing searches them
    all); layers: those of the first run on the page (the layer overview draws it).
    """
    names = catalog.names()
    run_opts = [{"label": f"{run_title(n, catalog.dataset(n))} · {catalog.info(n).label}",
                 "value": n} for n in names]
    if not state.runs:
        return run_opts, [], [], [], []
    n_pages = page_count(len(state.runs))
    page_opts = ([{"label": f" {i + 1}", "value": i} for i in range(n_pages)]
                 if n_pages > 1 else [])
    layer_opts = [{"label": l, "value": l} for l in catalog.layers(_page(state)[0])]
    scalar_opts = [{"label": s, "value": s} for s in
                   dict.fromkeys(s for r in state.runs for s in catalog.scalar_names(r))]
    return run_opts, _neuron_options(catalog, state), layer_opts, page_opts, scalar_opts


def view_key(state: ViewState) -> str:
    """What identifies a view of the URL's state, for zooms and cached figures (not the tab,
    the scale or the grouping, which other keys carry where they matter)."""
    return repr((state.runs, state.page, state.neurons, state.scalars, state.layer, state.stat,
                 state.window.spec(), state.rank))
