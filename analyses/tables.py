"""Tables that ``statscope analyze`` and ``statscope report`` show (pure: runs in, DataFrames out),
and what each of their columns means."""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._compute import run_tasks
from ._data import FLUCT_STATS, layer_order, ranked, run_name, size_notes
from ._names import NOTES, QUANTITY, STATISTIC
from .baseline import excess_fluctuation
from .fluctuation import fluctuation
from .seeds import between_seeds, config_labels, config_meta, layer_set, run_configs
from .summary import layer_summary
from .runs import split_runs
from .window import RunWindow, run_windows
from .resampling import check_settings

__all__ = ["fluctuation_table", "pooled_fluctuation_table", "rank_gap_table", "select_layers",
           "entry_configs", "COLUMNS", "summary_matrix", "summary_tally", "VERDICTS"]

COLUMNS = {
    "run": "the run (its folder name, or its path where names repeat)",
    "config": "the run's configuration without its seed: runs with the same config are seeds "
              "(runs of different models, told apart by their layers, never share one)",
    "batch_size": "the run's batch size",
    "layer": "the probed layer (the input of its norm)",
    "statistic": "which per-step statistic: bn_mean/bn_std (per neuron, over the batch) or "
                 "en_mean/en_std (pooled over the layer's EN group)",
    "median": "median over the layer's neurons of each neuron's fluctuation: the sample "
              "standard deviation of the statistic over the window's steps",
    "q25": "25th percentile over the layer's neurons of the fluctuation",
    "q75": "75th percentile over the layer's neurons of the fluctuation",
    "first": "the fluctuation of the layer's first neuron (unit 0, the paper's neuron i-1)",
    "excess": "observed fluctuation / what batch sampling alone predicts (σ/√N for the mean, "
              "σ·√((N−1)κ−N+3)/(2N) for the std); layer median; 1 = sampling noise explains it, "
              "> 1 = something else adds noise, < 1 = less than sampling predicts; BN only",
    "n_runs": "how many runs (seeds) the row pools",
    "median_over_seeds": "the mean over seeds of the layer-median fluctuation",
    "ci_low": "lower bound of the interval (per run: bias-corrected block bootstrap over steps; "
              "pooled: t interval of the mean over seeds)",
    "ci_high": "upper bound of the interval",
    "effect": "natural-log ratio in the claim's direction: > 0 the claim's direction, 0 no "
              "difference (e^effect is the ratio)",
    "p_value": "two-sided p-value for effect = 0, before adjustment",
    "p_adjusted": "p-value adjusted over the whole claims table (Holm unless stated)",
    "verdict": "holds / does not hold when the adjusted p-value is below 1 − confidence, by the "
               "sign of the effect; otherwise inconclusive (the note says why)",
    "seeds": "how the seeds' own verdicts went",
    "block": "bootstrap block length in steps, chosen from the effect's autocorrelation "
             "(0: the window is too short for an interval)",
    "n_eff": "effective sample size: the window's steps with data for the effect / its "
             "autocorrelation time",
    "note": "why a row is inconclusive, or a caveat",
    "slope": "least-squares slope of log(layer-median scale-free fluctuation) on log(batch "
             "size); sampling theory predicts −0.5 for BN statistics",
    "lower": "lower bound of the slope's interval",
    "upper": "upper bound of the slope's interval",
    "ranks": "ranks of the distributed run (processes, each normalizing with its own batch)",
    "rank_median": "median over the layer's neurons of the fluctuation one rank sees (root mean "
                   "square over ranks of each rank's own fluctuation)",
    "global_median": "median over the layer's neurons of the fluctuation of the global "
                     "statistics, merged over every rank's batch (what SyncBatchNorm uses)",
    "removed": "median over neurons of 1 − global / per-rank fluctuation: the fraction that "
               "normalizing over all ranks' batches (a larger effective batch) removes",
    "expected": "what batch sampling alone predicts for removed: 1 − √(mean 1/N_global ÷ mean "
                "1/n_rank), 1 − 1/√ranks for equal batches; removed below it means fluctuation "
                "shared by the ranks (drift of the weights)",
}
"""Every column the tables use, explained (the report prints these where the columns appear)."""


def select_layers(ds: xr.Dataset, layers) -> xr.Dataset:
    """Keep the neurons of ``layers`` (names of the layer coordinate); None keeps all.

    Raises:
        StatscopeError: a name is not a layer of the run.
    """
    if not layers:
        return ds
    have = layer_order(ds[S.LAYER].values)
    missing = [name for name in layers if name not in have]
    if missing:
        raise StatscopeError(f"layers={list(layers)}: no such layer {', '.join(missing)}; "
                             f"available: {', '.join(have)}")
    return ds.isel({S.NEURON: np.isin(ds[S.LAYER].values, list(layers))})


def entry_configs(runs) -> dict[str, str]:
    """The configuration label of every entry of ``runs`` (:func:`statscope.analyses.seeds.
    config_labels` of their settings and layer sets), by entry name: for a table made of
    several calls (``statscope analyze`` tables one run at a time), whose runs must be
    labelled among all of them.

    Args:
        runs: see :func:`statscope.analyses.runs.split_runs`; a distributed run gives its
            ranks and global entry (``NAME/rank0``, ``NAME/global``).

    Returns:
        entry name -> label.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> entry_configs({"a": demo_run(), "b": demo_run(layers=(("fc1", 4),))})
        {'a': 'batch size 16 · layers fc1, fc2', 'b': 'batch size 16 · layers fc1'}
    """
    entries = split_runs(runs)
    labels = config_labels([m for _, _, m in entries], [layer_set(d) for _, d, _ in entries])
    return {name: label for (name, _, _), label in zip(entries, labels)}


def fluctuation_table(ds, window=200, *, scale_free: bool = False, detrend: bool = False,
                      name: str | None = None, windows=None, scheduler=None, configs=None):
    """The Figure-6 table: one row per (run, layer, statistic).

    Args:
        ds: a run, stacked runs, or a mapping name -> run (runs may differ in layers); a
            distributed run gives rows per rank and global (``NAME/rank0``, ``NAME/global``).
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        scale_free, detrend: as in :func:`statscope.analyses.fluctuation`.
        name: the run's name in the table when ``ds`` is one run.
        windows: one run's window summaries (``statscope.store.open_windows``): the
            fluctuation of every channel comes from them (``source="windows"`` of
            :func:`statscope.analyses.fluctuation`); ``ds`` must be that run.
        scheduler: None to compute here; a dask scheduler (a ``distributed.Client``) to
            compute each run as a task on it (same numbers).
        configs: the configuration label of each row's run by its name in the table (from
            :func:`entry_configs` over every run the table is part of); default: the runs of
            ``ds`` labelled among themselves (:func:`statscope.analyses.seeds.run_configs`).

    Returns:
        pandas.DataFrame with columns run, config, batch_size, layer, statistic, median, q25,
        q75, first, excess (see :data:`COLUMNS`); ``df.attrs``: window, notes, scale_free,
        detrend.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> fluctuation_table(demo_run(), 100, name="demo").columns.tolist()[:5]
        ['run', 'config', 'batch_size', 'layer', 'statistic']
    """
    import pandas as pd

    single = isinstance(ds, xr.Dataset) and S.RUN not in ds.dims
    if single and name:  # warnings and errors on the run's entries name it as the rows do
        ds = ds.assign_attrs({S.ATTR_NAME: name})
    if windows is not None:
        if not single or ranked(ds):
            raise StatscopeError("windows=: window summaries belong to one run (or one rank's "
                                 "store); pass that run as ds")
        # the run's own name: ``name`` replaces it below, as for the steps
        parts = [RunWindow(run_name(ds), ds, config_meta(ds.attrs))]
    else:
        parts = run_windows(ds, window, load=scheduler is None)
    base = run_name(ds) if single else ""
    labels = run_configs(parts)
    calls = []
    for w, config in zip(parts, labels):
        run = w.name
        if single and name:  # a distributed run's entries keep their /rank{r}, /global suffix
            run = name + w.name[len(base):] if w.name.startswith(base) else name
        if configs is not None:
            if run not in configs:
                raise StatscopeError(f"configs: no label for run {run!r}; labelled: "
                                     f"{', '.join(map(str, configs)) or 'none'}")
            config = configs[run]
        bs = w.meta.get(S.META_BATCH_SIZE)
        calls.append((_table_rows, (w.data, run, config, bs, window if windows is not None
                                    else "all", scale_free, detrend, windows)))
    results = run_tasks(calls, scheduler)
    rows, notes, label = [], [], None
    for (part_rows, found, text), (_, args) in zip(results, calls):
        rows += part_rows
        label = label or text
        notes += [n if len(parts) == 1 else f"{args[1]}: {n}" for n in found]
    df = pd.DataFrame(rows, columns=["run", "config", "batch_size", "layer", "statistic",
                                     "median", "q25", "q75", "first", "excess"])
    df.attrs = {"window": label, NOTES: notes, "scale_free": scale_free, "detrend": detrend}
    return df


def _table_rows(data, run, config, bs, window, scale_free, detrend, windows):
    """One run's rows of :func:`fluctuation_table`, its notes and its window's text."""
    fl = fluctuation(data, window, scale_free=scale_free, detrend=detrend, windows=windows)
    summ = layer_summary(fl)
    found = list(summ.attrs[NOTES])
    if windows is not None:
        ex = None
        found.append("no sampling baseline from window summaries (it needs each step's "
                     "element count and kurtosis); excess is left empty")
    else:
        try:
            ex = layer_summary(excess_fluctuation(data, "all", detrend=detrend))
            found += [n for n in ex.attrs[NOTES] if n not in found]
        except StatscopeError as err:
            ex = None
            found.append(f"no sampling baseline: {err}")
    found += [n for n in size_notes(data) if n not in found]
    rows = []
    for layer in summ[S.LAYER].values:
        for stat in FLUCT_STATS:
            q = summ[stat].sel({S.LAYER: layer}).values
            excess = (float(ex[stat].sel({S.LAYER: layer, "quantity": "median"}))
                      if ex is not None and stat in ex else np.nan)
            rows.append({"run": run, "config": config,
                         "batch_size": None if bs is None else float(bs),
                         "layer": str(layer), "statistic": stat,
                         **dict(zip(("median", "q25", "q75", "first"), map(float, q))),
                         "excess": excess})
    return rows, found, str(fl.attrs["window"])


def rank_gap_table(ds, window=200, *, name: str | None = None, scale_free: bool = False,
                   scheduler=None):
    """The rank gap per layer of each distributed run: one row per (run, layer, statistic).

    Args:
        ds: a distributed run, or a mapping name -> run (runs without ranks are skipped).
        window: see :func:`statscope.analyses.rank_gap`.
        name: the run's name when ``ds`` is one run.
        scale_free: as in :func:`statscope.analyses.rank_gap`.
        scheduler: None, or a dask scheduler to compute each run as a task.

    Returns:
        pandas.DataFrame with columns run, layer, statistic, ranks, rank_median,
        global_median, removed, expected (:data:`COLUMNS`; medians over the layer's neurons);
        empty when no run has ranks. ``df.attrs``: window, notes (a run with fewer than two
        ranks with data in the window has no rows; a note says so).

    Example:
        >>> from statscope.analyses._demo import demo_ranks
        >>> t = rank_gap_table(demo_ranks(n_ranks=4), 300, name="ddp")
        >>> t.columns.tolist()[:4], round(float(t.removed.iloc[0]), 1)
        (['run', 'layer', 'statistic', 'ranks'], 0.5)
    """
    import pandas as pd

    runs = ([(name or run_name(ds), ds)] if isinstance(ds, xr.Dataset)
            else [(str(k), v) for k, v in ds.items()])
    calls = [(_gap_rows, (one, run, window, scale_free)) for run, one in runs if ranked(one)]
    rows, notes, label = [], [], None
    for part_rows, found, text in run_tasks(calls, scheduler):
        rows += part_rows
        notes += found
        label = label or text
    df = pd.DataFrame(rows, columns=["run", "layer", "statistic", "ranks", "rank_median",
                                     "global_median", "removed", "expected"])
    df.attrs = {"window": label, NOTES: notes}
    return df


def _gap_rows(data, run, window, scale_free):
    from .rank_gap import rank_gap

    try:
        gap = rank_gap(data, window, scale_free=scale_free)
    except StatscopeError as err:  # fewer than two ranks with data in the window
        return [], [f"{run}: no rank gap: {err}"], None
    summ = layer_summary(gap.drop_vars("per_rank"))
    rows = []
    for layer in summ[S.LAYER].values:
        for stat in FLUCT_STATS:
            pick = {S.LAYER: layer, STATISTIC: stat, QUANTITY: "median"}
            rows.append({"run": run, "layer": str(layer), "statistic": stat,
                         "ranks": int(gap.attrs["n_ranks"]),
                         "rank_median": float(summ["local"].sel(pick)),
                         "global_median": float(summ["merged"].sel(pick)),
                         "removed": float(summ["removed"].sel(pick)),
                         "expected": float(summ["expected"].sel(
                             {S.LAYER: layer, QUANTITY: "median"}))})
    return rows, [f"{run}: {n}" for n in gap.attrs[NOTES]], str(gap.attrs["window"])


def pooled_fluctuation_table(table, confidence: float = 0.95):
    """The Figure-6 table pooled over seeds: one row per (config, layer, statistic).

    Args:
        table: from :func:`fluctuation_table`.
        confidence: level of the between-seed interval.

    Returns:
        pandas.DataFrame: config, layer, statistic, n_runs, median_over_seeds (mean over seeds
        of the layer median), ci_low, ci_high (t interval of that mean over seeds; NaN for one
        seed), excess (mean over seeds).
    """
    check_settings(confidence=confidence)
    import pandas as pd

    rows = []
    for (config, layer, stat), g in table.groupby(["config", "layer", "statistic"], sort=False):
        mean, lo, hi, _ = between_seeds(g["median"].to_numpy(), confidence)
        with np.errstate(all="ignore"):
            excess = float(np.nanmean(g["excess"])) if np.isfinite(g["excess"]).any() \
                else np.nan
        rows.append({"config": config, "layer": layer, "statistic": stat, "n_runs": len(g),
                     "median_over_seeds": mean, "ci_low": lo, "ci_high": hi, "excess": excess})
    out = pd.DataFrame(rows, columns=["config", "layer", "statistic", "n_runs",
                                      "median_over_seeds", "ci_low", "ci_high", "excess"])
    out.attrs = dict(table.attrs)
    return out


def summary_matrix(pooled) -> tuple[list[str], list[tuple[tuple[str, str, str], dict]]]:
    """The one-screen summary: a row per (claim, statistic, config), a column per layer.

    Args:
        pooled: :class:`statscope.analyses.PooledClaims`.

    Returns:
        (layers in order, rows): each row is ((claim, statistic, config), {layer: PooledRow}).
    """
    layers: list[str] = []
    rows: dict[tuple[str, str, str], dict] = {}
    for r in pooled.rows:
        if r.layer not in layers:
            layers.append(r.layer)
        rows.setdefault((r.claim, r.statistic, r.config), {})[r.layer] = r
    return layers, list(rows.items())


VERDICTS = ("holds", "does not hold", "inconclusive")


def summary_tally(pooled) -> list[tuple[tuple[str, str, str], dict[str, list[str]]]]:
    """The summary of a model with many layers: per (claim, statistic, config), the layers by
    verdict, each list in layer order.

    Args:
        pooled: :class:`statscope.analyses.PooledClaims`.

    Returns:
        ``[((claim, statistic, config), {verdict: [layer, ...]})]`` in :func:`summary_matrix`'s
        row order, every verdict of :data:`VERDICTS` present.
    """
    layers, rows = summary_matrix(pooled)
    return [(key, {v: [la for la in layers if la in cells and cells[la].verdict == v]
                   for v in VERDICTS}) for key, cells in rows]
