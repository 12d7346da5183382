"""``statscope report``: the answer for a set of runs, as one self-contained HTML page (or markdown).

The numbers come from :func:`statscope.analyses.build_report`; the figures are drawn by the
dashboard's own builders (:mod:`statscope.dashboards`), so a figure in the report looks as it
does in the app. plotly.js is embedded, so the page works offline.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

from statscope.commands.analyze import (check_output, open_runs_at, parse_window,
                                        skipping_unreadable, write_text)
from statscope.commands.cluster import add_cluster_arguments, scheduler_of

__all__ = ["register", "run_report", "render_html", "report_figures"]

_FORMATS = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}


def register(subparsers) -> None:
    """Add the ``report`` subcommand to an argparse subparsers object."""
    r = subparsers.add_parser(
        "report", help="the claims, figures and tables of a set of runs (HTML or markdown)",
        description="A self-contained report over runs: a one-screen summary of the paper's "
                    "claims across seeds, the paper's figures, then every table and the methods. "
                    "The format follows -o: .html (default) or .md.")
    r.add_argument("paths", nargs="+", metavar="RUNS", help="a folder of runs, or runs")
    r.add_argument("--window", default="200",
                   help="last W steps (int), START:STOP steps, a fraction in (0, 1], or 'all'")
    r.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
    r.add_argument("--adjust", choices=("holm", "bh", "none"), default="holm",
                   help="multiplicity adjustment over the claims table (default holm)")
    r.add_argument("-o", "--output", default="report.html", help="report.html or report.md")
    add_cluster_arguments(r)
    r.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``statscope report``."""
    from statscope.analyses import build_report, render_markdown
    from statscope.analyses.resampling import MAX_N_BOOT
    from statscope.errors import StatscopeError

    if not 1 <= args.n_boot <= MAX_N_BOOT:
        raise StatscopeError(f"--n-boot={args.n_boot}: expected 1 to {MAX_N_BOOT:,} replicates")
    if not 0.0 < args.confidence < 1.0:
        raise StatscopeError(f"--confidence={args.confidence}: expected a level in (0, 1)")
    fmt = _FORMATS.get(Path(args.output).suffix.lower())
    if fmt is None:
        raise StatscopeError(f"-o {args.output}: expected a .html or .md file name")
    window = parse_window(args.window)
    with scheduler_of(args) as scheduler:
        runs = open_runs_at(args.paths, window, load=scheduler is None)
        check_output(args.output, runs)
        report, runs = skipping_unreadable(runs, scheduler, lambda runs: build_report(
            {r.name: r.window for r in runs}, "all", source=", ".join(map(str, args.paths)),
            n_boot=args.n_boot, seed=args.seed, confidence=args.confidence, adjust=args.adjust,
            scheduler=scheduler))
        if fmt == "md":
            text = render_markdown(report)
        else:
            text = render_html(report, report_figures(report, _full_runs(runs), window))
    write_text(text, args.output)
    return 0


def _full_runs(runs) -> dict:
    """Run name -> the whole run, for Figure 7's step axis; a distributed run's entries
    (``NAME/rank0``, ``NAME/global``) each get their own view."""
    from statscope import schema as S
    from statscope.analyses.window import expand_ranks

    full = {}
    for r in runs:
        if S.RANK in r.run.dims:
            full.update({name: ds for name, ds, _ in expand_ranks(r.run, r.name)})
        else:
            full[r.name] = r.run
    return full


def report_figures(report, full_runs, window) -> list[tuple[str, str, object]]:
    """The report's figures: (id, caption, plotly Figure), drawn by the dashboard's builders.

    Args:
        report: from :func:`statscope.analyses.build_report`.
        full_runs: run name -> the whole run (for Figure 7's step axis).
        window: the window the report was built on.
    """
    from statscope.analyses import fluctuation
    from statscope.dashboards.bars import fluctuation_figure
    from statscope.dashboards.evolution import evolution_figure
    from statscope.dashboards.scatter import scatter_figure

    first = {}  # config -> its first run: the one drawn where a figure shows single runs
    for r in report.runs:
        first.setdefault(r.config, r.name)
    out = []
    summary, ci, fluct = _pooled_bars(report)
    level = f"{report.confidence:.0%}"
    fig6 = fluctuation_figure(fluct, by="layer", summary=summary, ci=ci,
                              titles={c: _title(c, report) for c in summary})
    fig6.update_layout(title_text=f"Figure 6: fluctuation of the statistics, {report.window}: "
                                  f"layer median, mean over seeds; whiskers: {level} interval")
    out.append(("fig6", "Figure 6. Fluctuation (standard deviation over the window's steps) of "
                        "each statistic, median over each layer's neurons, one panel per "
                        "configuration. Bars: mean over seeds; whiskers: t interval over seeds "
                        "(one seed: the block-bootstrap interval of that run).", fig6))
    runs7 = {n: full_runs[n] for n in first.values() if n in full_runs}
    if runs7:
        layers = report.runs[0].layers
        data = report.windows[next(iter(first.values()))]
        units = _first_units(data, layers)
        fig7 = evolution_figure(runs7, [(la, units[la]) for la in layers],
                                _dashboard_window(window, report))
        out.append(("fig7", "Figure 7. BN (solid) and EN (dashed) statistics of each layer's "
                            "first neuron (the paper's neuron i-1) over the window, one column "
                            "per configuration (its first seed).", fig7))
    scatter = {n: fluctuation(report.windows[n], "all", scale_free=True)
               for n in first.values()}
    out.append(("scatter", "Std versus mean fluctuation per neuron, scale-free (÷ σ̄), one "
                           "panel per configuration (its first seed). Above the diagonal: the "
                           "neuron's batch std fluctuates more than its batch mean.",
                scatter_figure(scatter, titles={n: _run_title(report, n) for n in scatter})))
    for k, g in enumerate(g for g in report.scaling if g.result is not None):
        out.append((f"scaling{k}", f"Batch-size scaling ({g.label}): slope of log(layer-median "
                                   f"scale-free fluctuation) on log(batch size) with its "
                                   f"{level} interval; sampling theory predicts −0.5 for BN "
                                   f"statistics (dotted).", _scaling_figure(g.result)))
    return out


def _run_title(report, name: str) -> str:
    entry = next(r for r in report.runs if r.name == name)
    return f"{name} ({entry.config})"


def _title(config: str, report) -> str:
    n = sum(r.config == config for r in report.runs)
    return f"{config} ({n} seed{'s' if n != 1 else ''})"


def _first_units(ds, layers) -> dict:
    import numpy as np

    from statscope import schema as S

    lay = np.asarray(ds[S.LAYER].values)
    units = np.asarray(ds[S.UNIT].values)
    return {la: int(units[lay == la].min()) for la in layers}


def _dashboard_window(window, report):
    from statscope.dashboards.state import Window

    if isinstance(window, int):
        return Window("last", n=window)
    if isinstance(window, tuple):
        return Window("range", start=int(window[0]), stop=int(window[1]) - 1)
    if isinstance(window, float):
        n = max(len(w.step) for w in report.windows.values())
        return Window("last", n=int(n))
    return Window("all")


def _pooled_bars(report):
    """Per configuration: a layer summary (mean over seeds of the layer medians) and its interval
    (over seeds, or the run's bootstrap with one seed), as the bar builder reads them."""
    import numpy as np
    import xarray as xr

    from statscope import schema as S
    from statscope.analyses import fluctuation, fluctuation_ci

    pooled = report.fluctuation_pooled
    stats = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)
    summary, ci, fluct = {}, {}, {}
    for config, g in pooled.groupby("config", sort=False):
        layers = list(dict.fromkeys(g["layer"]))
        names = [r.name for r in report.runs if r.config == config]
        fluct[config] = fluctuation(report.windows[names[0]], "all")
        med, lo, hi = (np.full((len(stats), len(layers)), np.nan) for _ in range(3))
        for i, s in enumerate(stats):
            for j, la in enumerate(layers):
                row = g[(g["layer"] == la) & (g["statistic"] == s)]
                if len(row):
                    med[i, j], lo[i, j], hi[i, j] = row[["median_over_seeds", "ci_low",
                                                          "ci_high"]].iloc[0]
        if len(names) == 1:
            one = fluctuation_ci(report.windows[names[0]], "all", n_boot=report.n_boot,
                                 confidence=report.confidence, seed=report.seed)
            for i, s in enumerate(stats):
                b = one[s].sel({S.QUANTITY: "median"}).reindex({S.LAYER: layers})
                lo[i], hi[i] = b.sel({S.BOUND: "lower"}).values, b.sel({S.BOUND: "upper"}).values
        coords = {S.LAYER: layers, S.QUANTITY: ["median"]}
        summary[config] = xr.Dataset({s: ((S.LAYER, S.QUANTITY), med[i][:, None])
                                      for i, s in enumerate(stats)}, coords=coords)
        ci[config] = xr.Dataset(
            {s: ((S.LAYER, S.QUANTITY, S.BOUND), np.stack([lo[i], med[i], hi[i]], -1)[:, None])
             for i, s in enumerate(stats)}, coords={**coords, S.BOUND: list(S.BOUNDS)},
            attrs={"confidence": report.confidence})
    return summary, ci, fluct


def _scaling_figure(result):
    """Slopes with intervals per layer, one marker colour per statistic (the dashboard's)."""
    import numpy as np
    import plotly.graph_objects as go

    from statscope import schema as S
    from statscope.dashboards.style import STAT_COLORS, STAT_LABELS, TEMPLATE

    layers = [str(v) for v in result[S.LAYER].values]
    fig = go.Figure()
    x0 = np.arange(len(layers), dtype=float)
    for j, stat in enumerate(str(s) for s in result["statistic"].values):
        sl = result.slope.sel(statistic=stat).values
        lo, hi = result.lower.sel(statistic=stat).values, result.upper.sel(statistic=stat).values
        fig.add_trace(go.Scatter(
            x=x0 + (j - 1.5) * 0.12, y=sl, mode="markers", name=STAT_LABELS.get(stat, stat),
            marker=dict(color=STAT_COLORS.get(stat), size=9),
            error_y=dict(type="data", symmetric=False, array=hi - sl, arrayminus=sl - lo,
                         thickness=1.2, width=4),
            customdata=layers,
            hovertemplate=f"%{{customdata}}<br>{STAT_LABELS.get(stat, stat)} slope %{{y:.3f}}"
                          "<extra></extra>"))
    fig.add_hline(y=-0.5, line_dash="dot", line_color="#666",
                  annotation_text="sampling theory −0.5", annotation_position="bottom right")
    fig.add_hline(y=0.0, line_color="#bbb", line_width=1)
    sizes = ", ".join(f"{b:g}" for b in result.attrs["batch_sizes"])
    fig.update_layout(template=TEMPLATE, height=420,
                      title=dict(text=f"Batch-size scaling over batch sizes {sizes} "
                                      f"({result.attrs['window']})", font_size=15, x=0.01),
                      xaxis=dict(tickvals=x0, ticktext=layers, title_text="layer"),
                      yaxis=dict(title_text="slope of log fluctuation on log batch size"),
                      margin=dict(t=90), legend=dict(y=1.08))
    return fig


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v, spec=".3g") -> str:
    from statscope.analyses.report import fmt

    return fmt(v, spec)


def _table(df, table_id: str, spec: str = ".4g") -> str:
    """A DataFrame as an HTML table whose headers explain themselves, then the explanations."""
    from statscope.analyses import COLUMNS

    cols = list(df.columns)
    head = "".join(f'<th title="{_e(COLUMNS.get(c, ""))}">{_e(c)}</th>' for c in cols)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(cols, row):
            text = _num(v, spec) if isinstance(v, float) else ("—" if v is None else str(v))
            cls = f' class="v-{_e(v).replace(" ", "-")}"' if c == "verdict" else ""
            cells.append(f"<td{cls}>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    explained = "".join(f"<dt>{_e(c)}</dt><dd>{_e(COLUMNS[c])}</dd>" for c in cols
                        if c in COLUMNS)
    return (f'<table id="{table_id}" class="data"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + f'</tbody></table><dl class="columns">{explained}</dl>')


def _summary(report) -> str:
    from statscope.analyses import CLAIMS
    from statscope.analyses.tables import summary_matrix

    layers, rows = summary_matrix(report.pooled)
    head = "".join(f"<th>{_e(la)}</th>" for la in layers)
    body = []
    for (claim, stat, config), cells in rows:
        tds = []
        for la in layers:
            r = cells.get(la)
            if r is None:
                tds.append("<td></td>")
                continue
            tds.append(
                f'<td class="v-{_e(r.verdict).replace(" ", "-")}" data-claim="{_e(claim)}" '
                f'data-layer="{_e(la)}" data-statistic="{_e(stat)}" data-config="{_e(config)}" '
                f'data-verdict="{_e(r.verdict)}" title="{_e(r.note)}">'
                f'<b>{_e(r.verdict)}</b> <span class="seeds">{_e(r.seeds_text)}</span><br>'
                f'{_e(_num(r.effect, "+.2f"))} '
                f'<span class="ci">[{_e(_num(r.ci_low, "+.2f"))}, '
                f'{_e(_num(r.ci_high, "+.2f"))}]</span></td>')
        body.append(f'<tr><th class="claim" title="{_e(CLAIMS[claim])}">({_e(claim)}) '
                    f'{_e(CLAIMS[claim])}</th><td>{_e(stat)}</td><td>{_e(config)}</td>'
                    + "".join(tds) + "</tr>")
    return (f'<table id="summary-table" class="summary"><thead><tr><th>claim</th>'
            f'<th>statistic</th><th>config</th>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table>")


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;color:#222;margin:24px auto;max-width:1280px;
padding:0 16px;line-height:1.4}
h1{margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555}table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;font-size:13px;vertical-align:top}
th{background:#f5f5f5;text-align:left}
table.summary td{min-width:150px}.seeds,.ci{color:#555;font-size:12px}
.v-holds{background:#e6f4ea}.v-does-not-hold{background:#fde8e6}.v-inconclusive{background:#f6f6f6}
dl.columns{font-size:12px;color:#444;columns:2;margin:4px 0 16px}
dl.columns dt{font-weight:bold;break-after:avoid}dl.columns dd{margin:0 0 6px 12px}
figure{margin:16px 0}figcaption{font-size:13px;color:#444;max-width:1000px}
.note{font-size:13px;color:#444}
"""


def render_html(report, figures) -> str:
    """The report as one HTML page with plotly.js embedded (works offline).

    Args:
        report: from :func:`statscope.analyses.build_report`.
        figures: from :func:`report_figures`.
    """
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from statscope.analyses import CLAIMS
    from statscope.analyses.report import methods, scaling_frame
    from statscope.dashboards.style import GRAPH_CONFIG

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>statscope report</title><style>{_CSS}</style>"
             f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
             "<h1>statscope report</h1>",
             f"<p class='meta'>{len(report.runs)} runs from <code>{_e(report.source)}</code> · "
             f"window: {_e(report.window)} (each run's own) · {report.n_boot} bootstrap "
             f"replicates · {report.confidence:.0%} intervals</p>",
             "<section id='summary'><h2>Summary: the paper's claims (§4.6), across seeds</h2>",
             _summary(report),
             "<p class='note'>Each cell: the verdict across seeds (and how the seeds' own "
             "verdicts went), the effect — the natural-log ratio in the claim's direction, mean "
             "over seeds — and its interval (t over seeds; with one seed, the run's own "
             "bootstrap interval). Hover a cell for its note. Claim (d) compares the first "
             "layer with the others, so it has one cell. <b>holds</b>: every seed holds and the "
             "interval lies above 0; <b>does not hold</b>: likewise below; otherwise "
             "<b>inconclusive</b>.</p></section>",
             "<section id='figures'><h2>Figures</h2>"]
    for fig_id, caption, fig in figures:
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=fig_id,
                          config=GRAPH_CONFIG, validate=False)
        parts.append(f"<figure>{div}<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</section><section id='tables'><h2>Claims per configuration</h2>")
    parts.append("<ul>" + "".join(f"<li>({_e(k)}) {_e(v)}</li>" for k, v in CLAIMS.items())
                 + "</ul>")
    parts.append(_table(report.pooled.to_dataframe().drop(columns=["description"]),
                        "pooled-claims", "+.3f"))
    parts.append("<h2>Claims per run</h2>")
    parts.append(_table(report.claims.to_dataframe().drop(columns=["description"]),
                        "claims", ".3g"))
    parts.append(f"<h2>Fluctuation per layer (Figure 6), {_e(report.window)}</h2>"
                 "<h3>Pooled over seeds (excess: mean over seeds)</h3>")
    parts.append(_table(report.fluctuation_pooled, "fluctuation-pooled"))
    parts.append("<h3>Per run</h3>")
    parts.append(_table(report.fluctuation, "fluctuation"))
    if report.notes:
        parts.append("<h3>Notes</h3><ul class='note'>"
                     + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    if report.rank_gap is not None and len(report.rank_gap):
        parts.append("<h2>Ranks: per-rank and global fluctuation</h2><p class='note'>Each rank "
                     "normalizes with its own batch; the global statistics are those over every "
                     "rank's batch (SyncBatchNorm's), merged exactly from the ranks' moments and "
                     "counts. <b>removed</b>: the fraction of a rank's fluctuation that the "
                     "global statistics do not have — what a larger effective batch removes; "
                     "<b>expected</b>: that fraction if batch sampling were the only source "
                     "(less removed: fluctuation the ranks share, from the weights' drift).</p>")
        parts.append(_table(report.rank_gap, "rank-gap"))
    parts.append("</section><section id='scaling'><h2>Batch-size scaling</h2>")
    for g in report.scaling:
        if g.result is None:
            parts.append(f"<p>{_e(g.label)}: not computed: {_e(g.reason)}</p>")
            continue
        parts.append(f"<h3>{_e(g.label)}</h3>")
        parts.append(_table(scaling_frame(g.result), f"scaling-{_e(g.label)}", "+.3f"))
        parts.append("<ul class='note'>" + "".join(f"<li>{_e(n)}</li>"
                                                   for n in g.result.attrs.get("notes", []))
                     + "</ul>")
    parts.append("</section><section id='runs'><h2>Runs</h2><ul>")
    for r in report.runs:
        parts.append(f"<li><code>{_e(r.name)}</code>: {_e(r.config)}, seed "
                     f"{_e('?' if r.seed is None else r.seed)}, {_e(r.status)}, "
                     f"{r.n_steps:,} steps, layers {_e(', '.join(r.layers))}</li>")
    parts.append("</ul></section><section id='methods'><h2>Methods</h2><ul>")
    parts += [f"<li>{_e(m)}</li>" for m in methods(report)]
    parts += [f"<li>{_e(n)}</li>" for n in report.claims.notes]
    parts.append("</ul></section></body></html>\n")
    return "".join(parts)

