"""The page: header with run status, selectors on the left, one tab per view."""

from __future__ import annotations

from collections.abc import Sequence

from dash import dcc, html

from statscope import schema as S

from .data import STOPPED, RunInfo
from .limits import MAX_NEURONS, RUNS_PER_PAGE
from .runinfo import RunSummary
from .state import DEFAULT_WINDOW, GROUPINGS, MERGED, SCALES, TABS
from .style import GRAPH_CONFIG, STAT_LABELS

__all__ = ["build_layout", "status_badges", "run_panel", "GRAPHS", "POLL_MS"]

TAB_LABELS = {"evolution": "Evolution (Fig. 7)", "fluctuation": "Fluctuation (Fig. 6)",
              "scatter": "Std vs mean", "heatmap": "Layer overview", "run": "Run"}
GRAPHS = {"evolution": "evolution-graph", "fluctuation": "fluctuation-graph",
          "scatter": "scatter-graph", "heatmap": "heatmap-graph"}
"""Tab to the id of its ``dcc.Graph``."""
POLL_MS = 2000
"""How often the page asks the server whether a live run has grown."""


def _graph(tab: str) -> dcc.Graph:
    config = {**GRAPH_CONFIG, "toImageButtonOptions": {
        **GRAPH_CONFIG["toImageButtonOptions"], "filename": f"statscope-{tab}"}}
    # a blank figure without axes until the first answer: plotly then draws that answer's axes
    # afresh instead of morphing a default x/y pair into them
    return dcc.Graph(id=GRAPHS[tab], config=config, className="graph",
                     figure={"data": [], "layout": {"height": 400, "xaxis": {"visible": False},
                                                    "yaxis": {"visible": False}}})


def _field(label: str, control, hint: str | None = None) -> html.Div:
    children = [html.Label(label, className="field-label"), control]
    if hint:
        children.append(html.Div(hint, className="hint"))
    return html.Div(children, className="field")


def build_layout(root: str) -> html.Div:
    """The app's layout; controls start empty and are filled from the URL on load.

    Args:
        root: the folder shown in the header.
    """
    window = html.Div([
        dcc.RadioItems(id="win-kind", value=DEFAULT_WINDOW.kind, inline=True,
                       options=[{"label": " last", "value": "last"},
                                {"label": " range", "value": "range"},
                                {"label": " all", "value": "all"}]),
        html.Div([
            dcc.Input(id="win-n", type="number", min=2, step=1, value=DEFAULT_WINDOW.n,
                      debounce=True, placeholder="steps", className="num"),
            dcc.Input(id="win-start", type="number", step=1, debounce=True,
                      placeholder="first step", className="num"),
            dcc.Input(id="win-stop", type="number", step=1, debounce=True,
                      placeholder="last step", className="num"),
        ], className="win-inputs"),
    ])
    controls = html.Aside([
        _field("Runs", dcc.Dropdown(id="runs", multi=True, placeholder="choose runs")),
        html.Div([
            html.Label("Page", className="field-label"),
            dcc.RadioItems(id="page", value=0, inline=True, options=[]),
            html.Div(f"{RUNS_PER_PAGE} runs side by side; more are split into pages",
                     className="hint"),
        ], id="page-field", className="field page-field"),
        _field("Neurons", dcc.Dropdown(id="neurons", multi=True, placeholder="first of each layer"),
               f"Evolution and fluctuation bars; type to search; at most {MAX_NEURONS} drawn"),
        _field("Ranks", dcc.RadioItems(id="rank", value=MERGED, options=[]),
               "Distributed runs: the merged (global) statistics, each rank beside them, or "
               "one rank's"),
        _field("Logged scalars", dcc.Dropdown(id="scalars", multi=True,
                                              placeholder="none"),
               "Drawn above the statistics on the same step axis"),
        _field("Window", window, "Default: the last 200 steps, as in the paper"),
        _field("Fluctuation scale", dcc.RadioItems(
            id="scale", value="scale_free", inline=True,
            options=[{"label": " raw", "value": SCALES[0]},
                     {"label": " scale-free δ/σ", "value": SCALES[1]}])),
        _field("Bars per", dcc.RadioItems(
            id="by", value="neuron", inline=True,
            options=[{"label": f" {g}", "value": g} for g in GROUPINGS])),
        _field("Layer", dcc.Dropdown(id="layer", clearable=False), "Layer overview"),
        _field("Statistic", dcc.Dropdown(
            id="stat", value=S.BN_STD, clearable=False,
            options=[{"label": STAT_LABELS[s], "value": s} for s in S.ALL_STATS]),
            "Layer overview"),
    ], className="controls")
    tabs = dcc.Tabs(id="tab", value=TABS[0], className="tabs", children=[
        dcc.Tab(label=TAB_LABELS[t], value=t, className="tab", selected_className="tab--selected",
                children=[_graph(t)] if t in GRAPHS else [html.Div(id="run-panel")])
        for t in TABS])
    return html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="poll", interval=POLL_MS),
        dcc.Store(id="version"),
        dcc.Store(id="evolution-zoom"),
        dcc.Store(id="heatmap-zoom"),
        html.Header([
            html.Div([html.Span("statscope", className="brand"),
                      html.Span(root, className="root", title=root)], className="title"),
            html.Div(id="run-status", className="run-status"),
        ], className="header"),
        html.Div(id="notice", className="notice"),
        html.Div(id="view-notice", className="notice"),
        html.Div([controls, html.Main(tabs, className="main")], className="body"),
    ], className="app")


def status_badges(infos: Sequence[RunInfo]) -> list:
    """One badge per run: name, status and progress (the last step recorded)."""
    out = []
    for info in infos:
        if info.error is not None:
            out.append(html.Span(f"{info.name}: unreadable", className="badge badge-failed",
                                 title=info.error))
            continue
        step = "no steps yet" if info.last_step is None else f"step {info.last_step:,}"
        kind = "stopped" if info.label == STOPPED else info.status
        title = f"{info.n_steps:,} steps recorded"
        if kind == "stopped":
            title += ("; its status says running, but no process writes it any more (killed, "
                      "or its machine went down): it will not grow")
        out.append(html.Span([html.Span(className=f"dot dot-{kind}"),
                              f"{info.name} · {info.label} · {step}"],
                             className=f"badge badge-{kind}", title=title))
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence], class_name: str) -> html.Table:
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in header])),
                       html.Tbody([html.Tr([html.Td(c) for c in r]) for r in rows])],
                      className=class_name)


def run_panel(summaries: Sequence[RunSummary], claims: dict[str, object],
              window_label: str, notes: Sequence[str] = ()) -> list:
    """The run tab: one card per run with its settings, and its paper-claims table.

    Args:
        summaries: from :func:`statscope.dashboards.runinfo.run_summary`.
        claims: run name to a pandas DataFrame from ``analyses.claims(...).to_dataframe()``,
            or to a message saying why there is none.
        window_label: the window the claims were evaluated on.
        notes: lines shown above the cards (e.g. which page of runs this is).
    """
    cards = [html.P(n, className="view-note") for n in notes]
    for s in summaries:
        kind = "stopped" if s.status == STOPPED else s.status
        head = html.H3([s.name, html.Span(s.status, className=f"badge badge-{kind}")])
        progress = html.P(f"{s.n_steps:,} steps recorded" +
                          ("" if s.last_step is None else f", last step {s.last_step:,}"),
                          className="progress")
        body = [head, progress, _table(("setting", "value"), s.rows, "settings")]
        if s.error:
            body.append(html.Pre(s.error, className="error"))
        c = claims.get(s.name)
        body.append(html.H4(f"Paper claims (§4.6), {window_label}"))
        if hasattr(c, "itertuples"):
            from statscope.analyses.report import fmt  # "—" where no interval (as the report)

            rows = [(r.claim, r.description, r.layer, r.statistic, fmt(r.effect, "+.3f"),
                     f"[{fmt(r.ci_low, '+.3f')}, {fmt(r.ci_high, '+.3f')}]",
                     fmt(r.p_value, ".3g"), r.verdict, r.note) for r in c.itertuples()]
            body.append(_table(("", "claim", "layer", "statistic", "effect (log ratio)",
                                "95% CI", "p", "verdict", "note"), rows, "claims"))
        else:
            body.append(html.P(str(c), className="hint"))
        cards.append(html.Section(body, className="card"))
    return cards if summaries else [html.P("Choose at least one run.", className="hint")]
