"""Analyses of run views, computed once per run generation and window, and cached in the catalog.

A *run view* is a run's (step, neuron) statistics under a rank choice: the run itself, one rank
of a distributed run, or its merged ranks (:meth:`RunCatalog.view`). The numbers come from
:mod:`statscope.analyses` on the per-step series, or from the run's window summaries
(:mod:`.sources` says which and why); this module runs them and keys the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S

from . import metrics
from .data import RunCatalog
from .limits import MAX_CLAIMS_NEURONS, MAX_SERIES_VALUES
from .ranks import expected_gap, rank_gap
from .sources import (SAMPLE, SERIES, WINDOWS, Fluct, Source, channel_finder, choose,
                      index_finder, layer_of_channel, sample_positions, windowed,
                      windows_layers)
from .state import MERGED, Window

__all__ = ["N_BOOT", "computed", "fluct", "neuron_fluct", "series_input", "claims_input",
           "claims_sample",
           "RankComparison",
           "rank_comparison", "scatter_values"]

N_BOOT = 200
"""Bootstrap replicates for the intervals and claims: enough for a 95% interval on screen,
five times cheaper than the analyses' default of 1,000."""


def computed(catalog: RunCatalog, run: str, what: str, window: Window, scale_free: bool = False,
             rank=None):
    """``statscope.analyses.<what>`` of one run view and window, cached until the run changes.

    Args:
        catalog: the runs.
        run: run name.
        what: ``fluctuation``, ``fluctuation_ci``, ``sampling_baseline``, ``layer_summary`` (of
            the fluctuation) or ``claims`` (as a DataFrame; of a sample of a wide run's
            neurons, see :func:`claims_input`).
        window: the dashboard window.
        scale_free: for the fluctuation and its intervals.
        rank: for a distributed run, ``"merged"`` (default) or a rank number.
    """
    fn = metrics.analysis(what)
    key = catalog.rank_key(run, rank)

    def compute():
        if what == "layer_summary":
            return fn(computed(catalog, run, "fluctuation", window, scale_free, key))
        if what == "claims":
            ds, w, _ = claims_input(catalog, run, key, window)
        else:
            ds, w = series_input(catalog, run, key, window)
        if what == "fluctuation":
            return fn(ds, w, scale_free=scale_free)
        if what == "fluctuation_ci":
            return fn(ds, w, scale_free=scale_free, n_boot=N_BOOT)
        if what == "claims":
            return fn(ds, w, n_boot=N_BOOT).to_dataframe()
        return fn(ds, w)

    flag = scale_free if what in ("fluctuation", "fluctuation_ci", "layer_summary") else None
    return catalog.memo(run, (what, window.spec(), flag, key), compute)


def series_input(catalog: RunCatalog, run: str, rank, window: Window):
    """The run view and window argument the analyses of the per-step series get.

    For the merged ranks, the window's rows of every rank are cut first (and read into memory
    when they fit the series budget), then merged, and the analyses take all of that cut: the
    lazy merge of the whole run costs every neuron's blocks through dask (3.6 s where this takes
    0.2 s for 200 steps × 512 neurons × 2 ranks). The cut is the window's last rows; the
    analyses' own ``last N`` counts steps with data, the same unless the run's last steps have
    none."""
    aw = metrics.to_analyses_window(window)
    key = catalog.rank_key(run, rank)
    if key != MERGED:
        return catalog.view(run, key), aw
    from statscope.analyses import describe_window
    from statscope.ranks import merge_ranks

    whole = catalog.dataset(run)
    rows = window.rows(catalog.steps(run))
    part = whole.isel({S.STEP: rows})
    if part.sizes[S.NEURON] * part.sizes[S.STEP] * len(catalog.ranks(run)) <= MAX_SERIES_VALUES:
        part = part.load()
    merged = merge_ranks(part)
    merged.attrs = {**merged.attrs, "window": describe_window(aw)}
    return merged, "all"


def claims_input(catalog: RunCatalog, run: str, rank, window: Window
                 ) -> tuple[xr.Dataset, Any, str]:
    """The run view and window argument the claims table is computed on (as
    :func:`series_input`), and a note when it is a sample: past
    :data:`~statscope.dashboards.limits.MAX_CLAIMS_NEURONS` neurons, an evenly spaced sample
    of each layer (the bootstrap over every neuron of an LLM takes minutes)."""
    pos, note = claims_sample(catalog, run)
    if pos is None:
        return (*series_input(catalog, run, rank, window), "")
    ds, aw = _subset_input(catalog, run, catalog.rank_key(run, rank), window, pos)
    return ds, aw, note


def claims_sample(catalog: RunCatalog, run: str) -> tuple[np.ndarray | None, str]:
    """The neurons the claims of a wide run are bootstrapped over, and the page's note about
    it; ``(None, "")`` for a run of at most
    :data:`~statscope.dashboards.limits.MAX_CLAIMS_NEURONS` neurons (all of them)."""
    n = catalog.dataset(run).sizes[S.NEURON]
    if n <= MAX_CLAIMS_NEURONS:
        return None, ""
    layers = catalog.layer_map(run)
    pos = sample_positions(layers, max(2, MAX_CLAIMS_NEURONS // max(1, len(layers))))
    return pos, (f"claims over {pos.size:,} of {n:,} neurons (evenly spaced in each layer); "
                 "statscope report evaluates every neuron")


def fluct(catalog: RunCatalog, run: str, rank, window: Window, scale_free: bool) -> Fluct:
    """The fluctuation of every neuron of one run view over a window, from the source
    :func:`~statscope.dashboards.sources.choose` picks, with its layer summary; cached.

    Raises:
        StatscopeError: the window does not fit the run (from the analyses).
    """
    key = catalog.rank_key(run, rank)

    def compute() -> Fluct:
        ds = catalog.view(run, key)
        steps = catalog.steps(run)
        rows = window.rows(steps)
        w = catalog.windows(run, key)
        src = choose(ds.sizes[S.NEURON], steps, rows, w, catalog.layer_map(run))
        summarize = metrics.analysis("layer_summary")
        if src.kind == SERIES:
            values = computed(catalog, run, "fluctuation", window, scale_free, key)
            return Fluct(values, computed(catalog, run, "layer_summary", window, scale_free, key),
                         src, lambda layer, unit: catalog.neuron_index(run, layer, unit))
        if src.kind == WINDOWS:
            assert w is not None and src.windows is not None
            raw, sigma = _windowed(catalog, run, key, w, src, rows)
            values = raw.copy()
            if scale_free:
                for stat in values.data_vars:
                    if stat != "n_valid":
                        values[stat] = raw[stat] / sigma
            values.attrs = _attrs(window, scale_free, src)
            return Fluct(values, summarize(values), src,
                         channel_finder(w, _wlayers(catalog, run, key, w)))
        sub, aw = _subset_input(catalog, run, key, window, src.positions)
        values = metrics.analysis("fluctuation")(sub, aw, scale_free=scale_free)
        return Fluct(values, summarize(values), src, index_finder(values))

    return catalog.memo(run, ("fluct", window.spec(), scale_free, key), compute)


def _subset_input(catalog: RunCatalog, run: str, key, window: Window, positions):
    """:func:`series_input` of some neurons only (a sample, or the chosen ones)."""
    from statscope.analyses import describe_window
    from statscope.ranks import merge_ranks

    # read into memory at once: lazily, each of the analyses' reductions would read the
    # scattered columns again (claims over 2,048 of 655,360 neurons took 104 s)
    aw = metrics.to_analyses_window(window)
    rows = window.rows(catalog.steps(run))
    whole = catalog.dataset(run) if key == MERGED else catalog.view(run, key)
    part = whole.isel({S.STEP: rows, S.NEURON: list(positions)}).load()
    if key == MERGED:
        part = merge_ranks(part)
    part.attrs = {**part.attrs, "window": describe_window(aw)}  # not the cached run's dict
    return part, "all"


def _attrs(window: Window, scale_free: bool, src: Source) -> dict:
    from statscope.analyses import describe_window

    return {"window": describe_window(metrics.to_analyses_window(window)),
            "scale_free": bool(scale_free), "ddof": 1, "method": "sample std over steps",
            S.NOTES: [src.note]}


def _wlayers(catalog: RunCatalog, run: str, key, w: xr.Dataset) -> dict[str, np.ndarray]:
    return catalog.memo(run, ("windows-layers", key), lambda: windows_layers(w))


def _windowed(catalog: RunCatalog, run: str, key, w: xr.Dataset, src: Source, rows: slice):
    """Raw fluctuation and σ̄ of every channel over the source's windows, read once for both
    scales (the summaries of an LLM-sized run take seconds to read)."""

    def compute():
        layers = _wlayers(catalog, run, key, w)
        names, ordinal = layer_of_channel(layers, w.sizes[S.NEURON])
        firsts = [int(catalog.layer_positions(run, name)[0])
                  if catalog.layer_positions(run, name).size else -1 for name in names]
        have = [p for p in firsts if p >= 0]
        n = catalog.columns(run, S.COUNT, have, rows, key).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.where(n > 1, n / (n - 1), np.nan)
            ok = np.isfinite(per)
            mean = np.where(ok, per, 0.0).sum(0) / ok.sum(0)
        factor = np.full(len(names), np.nan)
        factor[[i for i, p in enumerate(firsts) if p >= 0]] = mean
        return windowed(w, src.windows, factor[ordinal])

    return catalog.memo(run, ("windowed", src.windows, key), compute)


def neuron_fluct(catalog: RunCatalog, run: str, rank, window: Window, scale_free: bool,
                 neurons: Sequence[tuple[str, int]]):
    """The fluctuation the bars of chosen neurons draw, and its ``find``: the run view's
    (:func:`fluct`), or, when that is a sample, the chosen neurons' own from the series."""
    f = fluct(catalog, run, rank, window, scale_free)
    if f.source.kind != SAMPLE:
        return f.values, f.find
    key = catalog.rank_key(run, rank)
    pos = sorted({p for p in (catalog.neuron_index(run, l, u) for l, u in neurons)
                  if p is not None})

    def compute():
        sub, aw = _subset_input(catalog, run, key, window, pos)
        return metrics.analysis("fluctuation")(sub, aw, scale_free=scale_free)

    values = catalog.memo(run, ("fluct-neurons", window.spec(), scale_free, key, tuple(pos)),
                          compute)
    return values, index_finder(values)


def scatter_values(catalog: RunCatalog, run: str, rank, window: Window, scale_free: bool,
                   most: int) -> tuple[xr.Dataset, int]:
    """At most ``most`` neurons of the run view's fluctuation (evenly spaced in each layer), and
    how many it has: the std-versus-mean view of a 655,360-channel run draws from this
    cached subset, so a request does not pass over every neuron."""
    from .scatter import scatter_subset

    f = fluct(catalog, run, rank, window, scale_free)
    total = f.values.sizes[S.NEURON]

    def compute():
        layers = (catalog.layer_map(run) if f.source.kind == SERIES else
                  _wlayers(catalog, run, catalog.rank_key(run, rank), catalog.windows(
                      run, rank)) if f.source.kind == WINDOWS else None)
        if layers is None:
            from .data import layer_slices

            layers = layer_slices(np.asarray(f.values[S.LAYER].values))
        pos = scatter_subset(layers, total, most)
        return f.values if pos.size == total else f.values.isel({S.NEURON: pos})

    key = ("scatter", window.spec(), scale_free, catalog.rank_key(run, rank), most)
    return catalog.memo(run, key, compute), total


@dataclass(frozen=True)
class RankComparison:
    """Per-rank and global fluctuation of the chosen neurons or layers of a distributed run.

    Attributes:
        labels: the categories (neuron or layer labels).
        per_rank: rank to its fluctuation per statistic, (k,) each.
        merged: the merged (global) fluctuation per statistic, (k,).
        gap: per statistic, ``{"per_rank", "merged", "gap"}`` from
            :func:`~statscope.dashboards.ranks.rank_gap`.
        expected: (k,) the gap sampling theory predicts from the ranks' element counts.
        notes: which sources the numbers came from, when not every neuron's per-step series.
        window: the window, as the analyses describe it.
    """

    labels: tuple[str, ...]
    per_rank: dict
    merged: dict
    gap: dict
    expected: np.ndarray
    notes: tuple[str, ...] = ()
    window: str = ""


def rank_comparison(catalog: RunCatalog, run: str, window: Window, scale_free: bool, by: str,
                    neurons: Sequence[tuple[str, int]]) -> RankComparison:
    """Each rank's fluctuation, the merged one and the gap, per chosen neuron or per layer
    (medians over the layer's neurons); cached until the run changes."""
    key = ("ranks", window.spec(), scale_free, by, tuple(neurons) if by != "layer" else ())
    return catalog.memo(run, key, lambda: _rank_comparison(catalog, run, window, scale_free,
                                                           by, neurons))


def _rank_comparison(catalog: RunCatalog, run: str, window: Window, scale_free: bool, by: str,
                     neurons: Sequence[tuple[str, int]]) -> RankComparison:
    from .style import neuron_label

    ranks = catalog.ranks(run)
    fl = {r: fluct(catalog, run, r, window, scale_free) for r in ranks}
    glob = fluct(catalog, run, MERGED, window, scale_free)
    rows = window.rows(catalog.steps(run))
    stats = [s for s in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD) if s in glob.values]
    if by == "layer":
        labels = [str(v) for v in glob.summary[S.LAYER].values]
        pick = {k: {s: f.summary[s].sel({"quantity": "median"}).reindex({S.LAYER: labels})
                    .values for s in stats} for k, f in [*fl.items(), (MERGED, glob)]}
        where = [catalog.layer_positions(run, name) for name in labels]
        pos = [int(p[0]) if p.size else None for p in where]
    else:
        labels = [neuron_label(l, u) for l, u in neurons]
        pick = {}
        for k in [*ranks, MERGED]:
            values, find = neuron_fluct(catalog, run, k, window, scale_free, neurons)
            at = [find(l, u) for l, u in neurons]
            pick[k] = {s: np.array([np.nan if i is None else float(values[s].values[i])
                                    for i in at]) for s in stats}
        pos = [catalog.neuron_index(run, l, u) for l, u in neurons]
    have = [p for p in pos if p is not None]
    counts = {}
    for r in ranks:
        c = catalog.columns(run, S.COUNT, have, rows, r).astype(np.float64)
        with np.errstate(invalid="ignore"):
            mean = np.where(c > 0, c, 0).sum(0) / (c > 0).sum(0)
        full = np.full(len(pos), np.nan)
        full[[i for i, p in enumerate(pos) if p is not None]] = mean
        counts[r] = full
    merged = pick.pop(MERGED)
    notes = tuple(dict.fromkeys(f"rank {k}: {f.source.note}" if k != MERGED
                                else f"merged: {f.source.note}"
                                for k, f in [*fl.items(), (MERGED, glob)] if f.source.note))
    expected = expected_gap(counts)
    synced = catalog.dataset(run).attrs.get(S.ATTR_MERGED_LAYERS) or []
    if len(synced):  # every rank normalizes with the merged statistics: no gap to expect
        layer_of = catalog.dataset(run)[S.LAYER].values
        expected[[p is not None and layer_of[p] in synced for p in pos]] = np.nan
    return RankComparison(tuple(labels), pick, merged, rank_gap(pick, merged),
                          expected, notes, str(glob.values.attrs.get("window", "")))
