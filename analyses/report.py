"""Tables and the markdown report that the CLI prints (pure: datasets in, text/DataFrames out)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, batch_sizes, layer_order, stacked
from ._names import NOTES
from .baseline import excess_fluctuation
from .fluctuation import fluctuation
from .summary import layer_summary
from .window import load_window

__all__ = ["fluctuation_table", "markdown_report", "select_layers"]


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


def fluctuation_table(ds: xr.Dataset, window=200, *, scale_free: bool = False,
                      detrend: bool = False, name: str | None = None):
    """The Figure-6 table: one row per (run, layer, statistic).

    Columns: run, batch_size, layer, statistic, median, q25, q75, first (the layer's unit 0),
    excess (layer median of observed / sampling-theory fluctuation; BN statistics only).

    Returns:
        pandas.DataFrame, plus the notes collected along the way as ``df.attrs['notes']``.
    """
    import pandas as pd

    w = load_window(ds, window)
    fl = fluctuation(w, "all", scale_free=scale_free, detrend=detrend)
    summ = layer_summary(fl)
    notes = list(fl.attrs[NOTES])
    try:
        ex = layer_summary(excess_fluctuation(w, "all", detrend=detrend))
        notes += [n for n in ex.attrs[NOTES] if n not in notes]
    except StatscopeError as err:
        ex = None
        notes.append(f"no sampling baseline: {err}")
    runs = ([str(r) for r in ds[S.RUN].values] if stacked(ds) else [name or "run"])
    sizes = batch_sizes(ds)
    rows = []
    for i, run in enumerate(runs):
        sel = {S.RUN: i} if stacked(ds) else {}
        bs = (None if sizes is None else float(np.atleast_1d(sizes)[i]))
        for layer in summ[S.LAYER].values:
            for stat in FLUCT_STATS:
                q = summ[stat].isel(sel).sel({S.LAYER: layer})
                excess = (float(ex[stat].isel(sel).sel({S.LAYER: layer, "quantity": "median"}))
                          if ex is not None and stat in ex else np.nan)
                rows.append({"run": run, "batch_size": bs, "layer": str(layer), "statistic": stat,
                             **{k: float(q.sel(quantity=k)) for k in ("median", "q25", "q75",
                                                                      "first")},
                             "excess": excess})
    df = pd.DataFrame(rows)
    df.attrs = {"window": w.attrs["window"], NOTES: notes, "scale_free": scale_free,
                "detrend": detrend}
    return df


def _md_table(df, floatfmt: str = ".4g") -> str:
    cols = list(df.columns)

    def cell(v):
        if isinstance(v, float):
            return "—" if np.isnan(v) else format(v, floatfmt)
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def markdown_report(ds: xr.Dataset, window=200, *, source: str = "", n_boot: int = 1000,
                    seed: int = 0) -> str:
    """A self-contained markdown report: runs, windows, methods, claims, Figure 6, scaling.

    Args:
        ds: a run or stacked runs.
        window: see :func:`statscope.analyses.select_window`.
        source: where the runs came from (printed).
        n_boot, seed: bootstrap settings for the claims and the scaling slopes.

    Returns:
        Markdown text.
    """
    from .claims import CLAIMS, claims
    from .scaling import batch_size_scaling

    runs = [str(r) for r in ds[S.RUN].values] if stacked(ds) else ["run"]
    sizes = batch_sizes(ds)
    out = ["# statscope fluctuation report", ""]
    if source:
        out += [f"Source: `{source}`", ""]
    out += ["## Runs", ""]
    for i, r in enumerate(runs):
        bs = "unknown" if sizes is None else f"{np.atleast_1d(sizes)[i]:g}"
        out.append(f"- `{r}`: batch size {bs}")
    cl = claims(ds, window, n_boot=n_boot, seed=seed)
    out += ["", "## Methods", "",
            f"- Window: {cl.window} (per run).",
            "- Fluctuation: sample standard deviation over the window's steps (ddof=1) of each "
            "statistic per neuron; steps where the layer did not run or a value is NaN are "
            "excluded.",
            "- Excess: observed / sampling-theory fluctuation, sd(μ̂)=σ/√N and "
            "sd(σ̂)≈σ√((κ−1)/(4N)) (asymptotic; κ from bn_kurt when recorded, else 3).",
            f"- Claims: effects are natural-log ratios; {cl.confidence:.0%} intervals and p-values "
            f"from a moving-block bootstrap over steps ({cl.n_boot} replicates, block length "
            f"{', '.join(map(str, cl.block))}); verdict 'holds' if the interval lies above 0, "
            "'does not hold' if below, else 'inconclusive'.", ""]
    out += ["## The paper's claims (§4.6)", ""]
    out += [f"- ({k}) {v}" for k, v in CLAIMS.items()]
    df = cl.to_dataframe().drop(columns=["description"])
    out += ["", _md_table(df), "", "## Fluctuation per layer (Figure 6)", ""]
    table = fluctuation_table(ds, window)
    out += [_md_table(table), ""]
    if table.attrs[NOTES]:
        out += ["Notes:", ""] + [f"- {n}" for n in table.attrs[NOTES]] + [""]
    out += ["## Batch-size scaling", ""]
    try:
        sc = batch_size_scaling(ds, window, n_boot=n_boot, seed=seed)
        rows = [{"layer": str(layer), "statistic": str(stat),
                 "slope": float(sc.slope.sel(layer=layer, statistic=stat)),
                 "ci_low": float(sc.lower.sel(layer=layer, statistic=stat)),
                 "ci_high": float(sc.upper.sel(layer=layer, statistic=stat))}
                for layer in sc[S.LAYER].values for stat in sc["statistic"].values]
        import pandas as pd

        out += [f"Slope of log(layer-median scale-free fluctuation) on log(batch size) over "
                f"batch sizes {', '.join(f'{b:g}' for b in sc.attrs['batch_sizes'])}; sampling "
                f"theory predicts −0.5 for BN statistics.", "", _md_table(pd.DataFrame(rows)), ""]
    except StatscopeError as err:
        out += [f"Not computed: {err}", ""]
    return "\n".join(out)
