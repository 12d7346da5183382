"""The report: every analysis of a set of runs gathered once (:func:`build_report`), and its
markdown form (:func:`render_markdown`). The HTML form, with the dashboard's figures, is
assembled by ``statscope report`` (statscope.commands.report) from the same :class:`Report`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import Layers
from ._names import NOTES
from .claims import CLAIMS, Claims, PooledClaims, PooledRow, claims
from .multiplicity import ADJUSTMENTS
from .resampling import BLOCK_FACTOR, MIN_EFFECTIVE, check_settings
from .scaling import batch_size_scaling
from .seeds import MODEL_KEYS, layer_set, run_configs
from ._compute import run_tasks
from .tables import (COLUMNS, fluctuation_table, pooled_fluctuation_table, rank_gap_table,
                     summary_matrix, summary_tally, VERDICTS)
from .runs import GLOBAL, split_runs
from .window import run_windows

__all__ = ["Report", "RunEntry", "ScalingGroup", "build_report", "render_markdown",
           "markdown_report", "cell_text", "methods", "fmt", "scaling_frame", "status_note"]


@dataclass(frozen=True)
class RunEntry:
    """One analysed run: name, configuration label, batch size, seed, status, steps, layers."""

    name: str
    config: str
    batch_size: Any
    seed: Any
    status: str
    n_steps: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class ScalingGroup:
    """The batch-size scaling of one series of runs (one model), or why there is none."""

    label: str
    runs: tuple[str, ...]
    result: xr.Dataset | None
    reason: str = ""


@dataclass(frozen=True)
class Report:
    """Everything a report shows, computed once.

    Attributes:
        source: where the runs came from. window: the window as text. confidence, n_boot,
        adjust: settings. runs: the runs. windows: run name -> its window (step, neuron),
        for the figures. claims: per run; pooled: per configuration over seeds.
        fluctuation, fluctuation_pooled: the Figure-6 tables (pandas). scaling: one entry per
        series of runs. notes: caveats collected on the way. rank_gap: the rank-gap table of
        the distributed runs (:func:`statscope.analyses.tables.rank_gap_table`; empty when
        none). seed: the bootstrap seed (the figures' intervals use it too).
    """

    source: str
    window: str
    confidence: float
    n_boot: int
    adjust: str
    runs: tuple[RunEntry, ...]
    windows: dict
    claims: Claims
    pooled: PooledClaims
    fluctuation: Any
    fluctuation_pooled: Any
    scaling: tuple[ScalingGroup, ...]
    notes: tuple[str, ...]
    rank_gap: Any = None
    seed: int = 0


def build_report(runs, window=200, *, source: str = "", n_boot: int = 1000, seed: int = 0,
                 confidence: float = 0.95, adjust: str = "holm", scheduler=None) -> Report:
    """Run every analysis the report shows, reading each run's window once.

    Args:
        runs: a run, stacked runs, or a mapping name -> run (runs may differ in layers). A
            distributed run is reported per rank and global (``NAME/rank0``, ``NAME/global``),
            with its rank gap.
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        source: where the runs came from (printed).
        n_boot, seed, confidence, adjust: settings of the claims and scaling intervals.
        scheduler: None to compute here, run after run; a dask scheduler (a
            ``distributed.Client``) to compute the per-run work (claims, Figure-6 tables, rank
            gaps) and each scaling series as tasks of dask graphs on it: every task reads its
            own run's window on its worker, and the numbers are the same.

    Returns:
        Report.
    """
    check_settings(confidence=confidence, n_boot=n_boot, seed=seed)
    if adjust not in ADJUSTMENTS:
        raise StatscopeError(f"adjust={adjust!r}: expected one of {', '.join(ADJUSTMENTS)}")
    whole = split_runs(runs, ranks=False)
    parts = run_windows(runs, window, load=scheduler is None)
    windows = {}
    for p in parts:
        data = p.data.copy(deep=False)
        data.attrs = {**p.data.attrs, S.ATTR_META: dict(p.meta)}
        windows[p.name] = data
    labels = run_configs(parts)
    entries = tuple(RunEntry(p.name, label, p.meta.get(S.META_BATCH_SIZE),
                             p.meta.get(S.META_SEED), str(p.data.attrs.get(S.ATTR_STATUS, "?")),
                             int(p.data.attrs.get(S.ATTR_N_STEPS, 0) or 0),
                             Layers.of(p.data).names)
                    for p, label in zip(parts, labels))
    cl = claims(windows, "all", confidence=confidence, n_boot=n_boot, seed=seed, adjust=adjust,
                scheduler=scheduler)
    table = fluctuation_table(windows, "all", scheduler=scheduler)
    ranked_runs = {name: ds for name, ds, _ in whole if S.RANK in ds.dims}
    gaps = rank_gap_table(ranked_runs, window, scheduler=scheduler)
    return Report(source, parts[0].data.attrs["window"], confidence, n_boot, adjust, entries,
                  windows, cl, cl.pooled(), table, pooled_fluctuation_table(table, confidence),
                  _scaling(parts, windows, n_boot, seed, confidence, scheduler),
                  _status_notes(entries) + tuple(table.attrs[NOTES]) + tuple(gaps.attrs[NOTES]),
                  gaps, seed)


def _status_notes(entries) -> tuple[str, ...]:
    """A sentence per run that did not complete (:func:`status_note`)."""
    notes = (status_note(r.name, r.status, r.n_steps) for r in entries)
    return tuple(n for n in notes if n is not None)


_SAID = {
    S.STATUS_FAILED: "failed before the end of training",
    S.STATUS_RUNNING: "is still running, or stopped without closing its store",
}


def status_note(name: str, status: str, n_steps: int) -> str | None:
    """The sentence for a run that did not complete (None for a completed one): its window is
    its last recorded steps, not the end of training, and what is said of it speaks for that
    much of a run.

    Example:
        >>> status_note("r", "failed", 1200)
        'r: the run failed before the end of training (status failed, 1,200 steps recorded); its window is the last steps it recorded, not the end of training'
    """
    if status == S.STATUS_COMPLETED:
        return None
    what = _SAID.get(status, f"has no completed status (status {status!r})")
    return (f"{name}: the run {what} (status {status}, {n_steps:,} steps recorded); its window "
            f"is the last steps it recorded, not the end of training")


def _series_scaling(windows, n_boot, seed, confidence):
    """The batch-size scaling of one series, or the reason there is none (a dask task)."""
    try:
        return batch_size_scaling(windows, "all", n_boot=n_boot, seed=seed,
                                  confidence=confidence), ""
    except StatscopeError as err:
        return None, str(err)


def _scaling(parts, windows, n_boot, seed, confidence, scheduler=None
             ) -> tuple[ScalingGroup, ...]:
    groups: dict[tuple, list] = {}
    for p in parts:
        key = (layer_set(p.data), *(repr(p.meta.get(k)) for k in MODEL_KEYS))
        groups.setdefault(key, []).append(p)
    out: list = []
    calls = []
    for key, members in groups.items():
        names = tuple(p.name for p in members)
        label = _series_label(key, members, len({k[0] for k in groups}))
        sizes = {p.meta.get(S.META_BATCH_SIZE) for p in members}
        if len(sizes - {None}) < 2:
            out.append(ScalingGroup(label, names, None, f"runs at {len(sizes - {None})} batch "
                                                         f"size(s); a slope needs two"))
            continue
        out.append((label, names))
        calls.append((_series_scaling, ({n: windows[n] for n in names}, n_boot, seed,
                                        confidence)))
    results = iter(run_tasks(calls, scheduler))
    return tuple(g if isinstance(g, ScalingGroup) else ScalingGroup(*g, *next(results))
                 for g in out)


def _series_label(key, members, n_layouts: int) -> str:
    """A scaling series' name: its layers when runs of several models are reported, and its
    rank view (a rank, or global) for distributed runs."""
    rank = members[0].meta.get(S.ATTR_RANK)
    where = "" if rank is None else (f"rank {rank}" if rank != GLOBAL else "global")
    layers = f"layers {', '.join(key[0])}" if n_layouts > 1 else ""
    if where and layers:
        return f"{layers}, {where}"
    return where or layers or "all runs"


def fmt(v, spec: str = "+.2f") -> str:
    """A number for a table cell; "—" for NaN or None."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    if isinstance(v, (float, np.floating)):
        return format(float(v), spec)
    return str(v)


def cell_text(row: PooledRow) -> str:
    """One summary cell: verdict, how the seeds went, effect and interval.

    Example:
        >>> from statscope.analyses.claims import PooledRow
        >>> cell_text(PooledRow("a", "bs 4", "fc1", "mean", 3, 3, 3, 0, 2.0, 1.8, 2.2, "holds"))
        'holds (3/3 hold) · +2.00 [+1.80, +2.20]'
    """
    return (f"{row.verdict} ({row.seeds_text}) · {fmt(row.effect)} "
            f"[{fmt(row.ci_low)}, {fmt(row.ci_high)}]")


def methods(report: Report) -> list[str]:
    """The methods section, one paragraph per item (shared by the markdown and HTML reports)."""
    adj = {"holm": "Holm's step-down procedure (family-wise error rate)",
           "bh": "Benjamini–Hochberg (false discovery rate)", "none": "no adjustment"}
    blocks = ", ".join(map(str, report.claims.block)) or "none"
    return [
        f"Window: {report.window}, taken in each run separately (a short run's window is not "
        f"padded to a long one's).",
        "Fluctuation of a statistic: its sample standard deviation (ddof=1) over the window's "
        "steps, per neuron; steps where the layer did not run or the value is NaN are left out "
        "and counted in the notes. Scale-free: divided by the neuron's σ̄ = √(mean of "
        "bn_std²·n/(n−1)). Per layer: the median over neurons (and the first neuron, the "
        "paper's neuron i-1).",
        "Excess: observed / sampling-theory fluctuation, sd(μ̂) = σ/√N and sd(σ̂) ≈ "
        "σ√((N−1)κ−N+3)/(2N) (delta method; κ from bn_kurt, corrected for the batch size, "
        "when recorded, else 3).",
        f"Intervals within a run: block bootstrap over steps ({report.n_boot} replicates). The "
        f"block length comes from each effect's own autocorrelation (Politis–White on its "
        f"jackknife influence series and on the levels whose spread it uses, ×{BLOCK_FACTOR:g}, "
        f"at most a quarter of the window; used here: {blocks} steps). The interval is "
        f"bias-corrected and studentized: centre θ̂ − bias, standard error corrected for the "
        f"block bootstrap's known underestimate, t quantile with (blocks − 1) degrees of "
        f"freedom. Where the effective sample (window steps / the longest autocorrelation time "
        f"involved) is under {MIN_EFFECTIVE} there is no interval and the verdict is "
        f"inconclusive (too short for the autocorrelation). On AR(1) series this holds its "
        f"level (docs/analyses.md).",
        f"Verdicts: p-values of the whole claims table adjusted by {adj[report.adjust]}; "
        f"'holds' when the adjusted p-value is below {1 - report.confidence:.2g} and the effect "
        f"is positive, 'does not hold' when below and negative, else 'inconclusive'.",
        "Across seeds: runs with the same configuration except the seed are pooled; the "
        "summary's verdict holds when every seed holds and the t interval of the mean effect "
        "over seeds lies above 0 (one seed: that run's verdict and interval).",
        "Batch-size scaling: least-squares slope of log(layer-median scale-free fluctuation) on "
        "log(batch size); with two or more seeds at every batch size the seeds are the "
        "replicates: the interval is t with (runs − batch sizes) degrees of freedom on the "
        "runs' spread about their batch size's mean, pooled over the batch sizes (the "
        "regression's pure error); else it combines each run's bootstrap over steps.",
    ]


def _md_table(df, columns=None, floatfmt: str = ".4g") -> str:
    cols = list(columns or df.columns)

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "—" if not np.isfinite(v) else format(float(v), floatfmt)
        return "—" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


def _md_columns(cols) -> list[str]:
    return ["", "Columns: " + "; ".join(f"**{c}** — {COLUMNS[c]}" for c in cols if c in COLUMNS),
            ""]


MATRIX_LAYERS = 8
"""Up to this many layers the markdown summary has a column per layer; beyond, it counts the
layers per verdict and names those where a claim does not hold (the cells follow in "Claims per
configuration")."""
_NAMED = 8  # layers named per row of the tally, then "and N more"


def _tally_lines(pooled) -> list[str]:
    out = ["| claim | statistic | config | holds | does not hold | inconclusive | "
           "where it does not hold |", "|" + "---|" * 7]
    for (claim, stat, config), by in summary_tally(pooled):
        n = sum(len(v) for v in by.values())
        fails = by["does not hold"]
        named = ", ".join(f"`{la}`" for la in fails[:_NAMED])
        if len(fails) > _NAMED:
            named += f" and {len(fails) - _NAMED} more"
        out.append(f"| ({claim}) | {stat} | {config} | "
                   + " | ".join(f"{len(by[v])} of {n}" for v in VERDICTS)
                   + f" | {named} |")
    return out + ["", "Layers per verdict across seeds; each layer's verdict, effect and interval "
                      "are in the table of claims per configuration below. Claim (d) compares "
                      "the first layer with the others and has one layer per row."]


def render_markdown(report: Report) -> str:
    """The report as markdown: summary first, then the full tables, scaling, runs and methods."""
    out = ["# statscope report", ""]
    if report.source:
        out += [f"Source: `{report.source}` · {len(report.runs)} runs · window: {report.window}",
                ""]
    out += ["## Summary: the paper's claims (§4.6), across seeds", ""]
    out += [f"- ({k}) {v}" for k, v in CLAIMS.items()]
    layers, rows = summary_matrix(report.pooled)
    if len(layers) > MATRIX_LAYERS:
        out += [""] + _tally_lines(report.pooled)
    else:
        out += ["", "| claim | statistic | config | " + " | ".join(layers) + " |",
                "|" + "---|" * (3 + len(layers))]
        for (claim, stat, config), cells in rows:
            out.append(f"| ({claim}) | {stat} | {config} | "
                       + " | ".join(cell_text(cells[la]) if la in cells else "" for la in layers)
                       + " |")
        out += ["", "Each cell: verdict across seeds (how the seeds' own verdicts went) · effect, "
                    "the natural-log ratio in the claim's direction (mean over seeds) [interval: "
                    "t over seeds, or the run's own bootstrap interval with one seed]. Claim (d) "
                    "compares the first layer with the others and has one cell per row."]
    out += ["",
            "Figures (Figure 6 bars, Figure 7 evolution, std versus mean, scaling slopes) are in "
            "the HTML report: `statscope report RUNS -o report.html`.", ""]
    pooled = report.pooled.to_dataframe().drop(columns=["description"])
    out += ["## Claims per configuration", "", _md_table(pooled, floatfmt="+.3f")]
    out += _md_columns(pooled.columns)
    per_run = report.claims.to_dataframe().drop(columns=["description", "config", "seed"])
    out += ["## Claims per run", "", _md_table(per_run, floatfmt=".3g")]
    out += _md_columns(per_run.columns)
    out += [f"## Fluctuation per layer (Figure 6), {report.window}", "",
            "Pooled over seeds (excess: mean over seeds):", "",
            _md_table(report.fluctuation_pooled)]
    out += _md_columns(report.fluctuation_pooled.columns)
    out += ["Per run:", "", _md_table(report.fluctuation)]
    out += _md_columns(report.fluctuation.columns)
    if report.notes:
        out += ["Notes:", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.rank_gap is not None and len(report.rank_gap):
        out += ["## Ranks: per-rank and global fluctuation", "",
                "Each rank normalizes with its own batch; the global statistics are those over "
                "every rank's batch (SyncBatchNorm's), merged exactly from the ranks' moments. "
                "removed: the fraction of a rank's fluctuation the global statistics do not "
                "have; expected: that fraction if batch sampling were the only source.", "",
                _md_table(report.rank_gap)]
        out += _md_columns(report.rank_gap.columns)
    out += ["## Batch-size scaling", ""]
    for g in report.scaling:
        if g.result is None:
            out += [f"{g.label}: not computed: {g.reason}", ""]
            continue
        df = scaling_frame(g.result)
        out += [f"{g.label}: over batch sizes "
                f"{', '.join(f'{b:g}' for b in g.result.attrs['batch_sizes'])}, interval "
                f"from {'runs (seeds)' if g.result.attrs['method'] == 'runs' else 'steps'}.",
                "", _md_table(df, floatfmt="+.3f")]
        out += _md_columns(df.columns)
        out += [f"- {n}" for n in g.result.attrs[NOTES]] + [""]
    out += ["## Runs", ""]
    out += [f"- `{r.name}`: {r.config}, seed {fmt(r.seed)}, {r.status}, {r.n_steps:,} steps"
            for r in report.runs]
    out += ["", "## Methods", ""] + [f"- {m}" for m in methods(report)] + [""]
    out += [f"- {n}" for n in report.claims.notes] + [""]
    return "\n".join(out)


def scaling_frame(result: xr.Dataset):
    """The slopes of :func:`statscope.analyses.batch_size_scaling` as a table."""
    import pandas as pd

    return pd.DataFrame([{"layer": str(layer), "statistic": str(stat),
                          "slope": float(result.slope.sel(layer=layer, statistic=stat)),
                          "lower": float(result.lower.sel(layer=layer, statistic=stat)),
                          "upper": float(result.upper.sel(layer=layer, statistic=stat))}
                         for layer in result[S.LAYER].values
                         for stat in result["statistic"].values])


def markdown_report(ds, window=200, *, source: str = "", n_boot: int = 1000,
                    seed: int = 0) -> str:
    """A self-contained markdown report: summary across seeds, claims, Figure 6, scaling.

    Args:
        ds: a run, stacked runs, or a mapping name -> run.
        window: see :func:`statscope.analyses.select_window`.
        source: where the runs came from (printed).
        n_boot, seed: bootstrap settings for the claims and the scaling slopes.

    Returns:
        Markdown text.
    """
    return render_markdown(build_report(ds, window, source=source, n_boot=n_boot, seed=seed))
