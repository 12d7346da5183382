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
from statscope.errors import StatscopeError

from . import metrics
from .data import RunCatalog
from .limits import MAX_CLAIMS_NEURONS, MAX_SERIES_VALUES
from .ranks import median_gap
from .sources import (FLUCT_STATS, SAMPLE, SERIES, WINDOWS, Fluct, Source, channel_finder,
                      choose, index_finder, sample_positions, windows_layers)
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
    aw = metrics.to_analyses_window(window, catalog.steps(run))
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
        if src.kind == WINDOWS:
            assert w is not None and src.windows is not None
            values = _from_windows(catalog, run, key, w, src.windows, scale_free)
            if values is not None:
                values.attrs = _attrs(window, scale_free, src, steps)
                return Fluct(values, summarize(values), src,
                             channel_finder(w, _wlayers(catalog, run, key, w)))
            # scale-free, with an element count that varies over the windows: σ̄ needs the
            # per-step series, as if the run kept no summaries
            src = choose(ds.sizes[S.NEURON], steps, rows, None, catalog.layer_map(run))
        if src.kind == SERIES:
            values = computed(catalog, run, "fluctuation", window, scale_free, key)
            return Fluct(values, computed(catalog, run, "layer_summary", window, scale_free, key),
                         src, lambda layer, unit: catalog.neuron_index(run, layer, unit))
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
    aw = metrics.to_analyses_window(window, catalog.steps(run))
    rows = window.rows(catalog.steps(run))
    if key == MERGED:
        part = merge_ranks(_ranked_cut(catalog, run, rows, positions))
    else:
        part = catalog.view(run, key).isel({S.STEP: rows, S.NEURON: list(positions)}).load()
    part.attrs = {**part.attrs, "window": describe_window(aw)}  # not the cached run's dict
    return part, "all"


def _ranked_cut(catalog: RunCatalog, run: str, rows: slice, positions) -> xr.Dataset:
    """Every rank's rows and neurons ``positions`` of a distributed run, in memory; cached, so
    the merged view's sample and the per-rank comparison read the scattered columns once."""
    pos = tuple(int(p) for p in positions)
    return catalog.memo(run, ("ranked-cut", rows.start, rows.stop, pos), lambda: catalog.dataset(
        run).isel({S.STEP: rows, S.NEURON: list(pos)}).load())


def _attrs(window: Window, scale_free: bool, src: Source, steps: np.ndarray) -> dict:
    from statscope.analyses import describe_window

    return {"window": describe_window(metrics.to_analyses_window(window, steps)),
            "scale_free": bool(scale_free), "ddof": 1, "method": "sample std over steps",
            S.NOTES: [src.note]}


def _wlayers(catalog: RunCatalog, run: str, key, w: xr.Dataset) -> dict[str, np.ndarray]:
    return catalog.memo(run, ("windows-layers", key), lambda: windows_layers(w))


def _from_windows(catalog: RunCatalog, run: str, key, w: xr.Dataset, span: tuple[int, int],
                  scale_free: bool) -> xr.Dataset | None:
    """``analyses.fluctuation(..., source="windows")`` of every channel over the summary rows
    ``span``; ``None`` where the analyses refuse the scale-free version (a layer's element
    count varies within the windows, so σ̄ needs each step's count with its bn_std).

    The rows are read once for both scales (the summaries of an LLM-sized run take seconds to
    read), with the count of each layer's first per-step column over their steps, which is all
    the analyses read of the per-step run (for σ̄)."""
    from statscope.analyses import fluctuation

    summaries, counts = catalog.memo(run, ("windows-read", span, key),
                                     lambda: _windows_input(catalog, run, key, w, span))
    try:
        return fluctuation(counts, "all", source="windows", windows=summaries,
                           scale_free=scale_free)
    except StatscopeError:
        if not scale_free:
            raise
        return None


def _windows_input(catalog: RunCatalog, run: str, key, w: xr.Dataset, span: tuple[int, int]):
    """The summary rows ``span`` of the statistics the fluctuation uses, in memory, and a
    per-step Dataset of each layer's element count over their steps."""
    names = [s for s in FLUCT_STATS if s in w] + [S.COUNT]
    summaries = w[names].isel({S.WINDOW_DIM: slice(*span)}).load()  # one compute for all
    width = int(w.attrs[S.ATTR_WINDOW_STEPS])
    starts = np.asarray(summaries[S.STEP].values, np.int64)
    steps = catalog.steps(run)
    rows = slice(int(np.searchsorted(steps, starts[0], "left")),
                 int(np.searchsorted(steps, starts[-1] + width, "left")))
    layers = {name: pos for name, pos in catalog.layer_map(run).items() if pos.size}
    count = catalog.columns(run, S.COUNT, [int(p[0]) for p in layers.values()], rows, key)
    counts = xr.Dataset({S.COUNT: ((S.STEP, S.NEURON), count)},
                        coords={S.STEP: steps[rows], S.LAYER: (S.NEURON, list(layers))})
    return summaries, counts


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
        gap: per statistic, ``{"per_rank", "merged", "gap"}``: per neuron the analyses'
            ``local``, ``merged`` and ``removed``; per layer, of the medians drawn
            (:func:`~statscope.dashboards.ranks.median_gap`).
        expected: (k,) the gap sampling theory predicts from the ranks' element counts.
        notes: what the numbers are over, when not every neuron of every rank.
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
    """Each rank's fluctuation, the merged one and the gap (``statscope.analyses.rank_gap``),
    per chosen neuron or per layer (medians over the layer's neurons); cached until the run
    changes."""
    key = ("ranks", window.spec(), scale_free, by, tuple(neurons) if by != "layer" else ())
    return catalog.memo(run, key, lambda: _rank_comparison(catalog, run, window, scale_free,
                                                           by, neurons))


def _rank_comparison(catalog: RunCatalog, run: str, window: Window, scale_free: bool, by: str,
                     neurons: Sequence[tuple[str, int]]) -> RankComparison:
    from statscope.analyses import describe_window

    from .style import neuron_label

    ranks = catalog.ranks(run)
    whole = catalog.dataset(run)
    rows = window.rows(catalog.steps(run))
    notes = []
    if by == "layer":
        labels = list(catalog.layer_map(run))
        # the neurons of the merged view: all, or its evenly spaced sample of each layer
        glob = fluct(catalog, run, MERGED, window, scale_free).source
        pos = (glob.positions if glob.kind == SAMPLE and glob.positions is not None
               else np.arange(whole.sizes[S.NEURON]))
        per_step = (rows.stop - rows.start) * len(ranks)
        if glob.kind != SAMPLE and pos.size * per_step > MAX_SERIES_VALUES:  # every rank's
            # series of every neuron past the budget (the merged sample is read already)
            layers = catalog.layer_map(run)
            pos = sample_positions(layers, max(2, MAX_SERIES_VALUES // per_step // len(layers)))
        if pos.size < whole.sizes[S.NEURON]:
            notes.append(f"per-layer medians over {pos.size:,} of {whole.sizes[S.NEURON]:,} "
                         f"neurons (evenly spaced in each layer)")
    else:
        labels = [neuron_label(l, u) for l, u in neurons]
        at = [catalog.neuron_index(run, l, u) for l, u in neurons]
        pos = np.array(sorted({p for p in at if p is not None}), np.int64)
    names = [v for v in (*FLUCT_STATS, S.COUNT) if v in whole]
    part = (_ranked_cut(catalog, run, rows, pos) if by == "layer"
            else whole[names].isel({S.STEP: rows, S.NEURON: pos}).load())[names]
    gap = _gap_of(part, scale_free, notes)
    if by == "layer":
        med = metrics.analysis("layer_summary")(gap).sel({"quantity": "median"}, drop=True)
        med = med.reindex({S.LAYER: labels})
        stats = [str(s) for s in med[S.STATISTIC].values]
        per_rank = {r: {s: med["per_rank"].sel({S.STATISTIC: s, S.RANK: r}).values
                        for s in stats} for r in ranks}
        merged = {s: med["merged"].sel({S.STATISTIC: s}).values for s in stats}
        gaps = median_gap(per_rank, merged)
        expected = med["expected"].values
    else:
        index = {int(p): i for i, p in enumerate(pos)}
        take = np.array([index.get(p, -1) if p is not None else -1 for p in at])

        def pick(var: xr.DataArray) -> np.ndarray:
            values = np.append(np.asarray(var.values, np.float64), np.nan)
            return values[take]

        stats = [str(s) for s in gap[S.STATISTIC].values]
        per_rank = {r: {s: pick(gap["per_rank"].sel({S.STATISTIC: s, S.RANK: r})) for s in stats}
                    for r in ranks}
        merged = {s: pick(gap["merged"].sel({S.STATISTIC: s})) for s in stats}
        gaps = {s: {"per_rank": pick(gap["local"].sel({S.STATISTIC: s})), "merged": merged[s],
                    "gap": pick(gap["removed"].sel({S.STATISTIC: s}))} for s in stats}
        expected = pick(gap["expected"])
    return RankComparison(tuple(labels), per_rank, merged, gaps, np.asarray(expected, float),
                          tuple(notes), describe_window(metrics.to_analyses_window(
                              window, catalog.steps(run))))


def _gap_of(part: xr.Dataset, scale_free: bool, notes: list) -> xr.Dataset:
    """``analyses.rank_gap`` over all of ``part`` (every rank's window cut); where it refuses
    (fewer than two ranks ran in the window), each rank's and the merged fluctuation from
    ``analyses.fluctuation``, with NaN gaps, and the reason in ``notes``."""
    from statscope.analyses import fluctuation, rank_gap
    from statscope.ranks import merge_ranks

    ranks = part[S.RANK].values
    try:  # a rank without data in the window is left out (NaN here) and noted
        gap = rank_gap(part, "all", scale_free=scale_free)
        notes += [n for n in gap.attrs.get(S.NOTES, []) if "left out" in n]
        return gap.reindex({S.RANK: ranks})
    except StatscopeError as err:
        notes.append(f"no gap: {str(err).removeprefix('rank_gap: ')}")
    stat = xr.DataArray(list(FLUCT_STATS), dims=S.STATISTIC)
    ran = [i for i in range(ranks.size) if (part[S.COUNT].isel({S.RANK: i}) > 0).any()]
    each = [fluctuation(part.isel({S.RANK: i}).drop_vars(S.RANK), "all", scale_free=scale_free)
            if i in ran else None for i in range(ranks.size)]
    glob = fluctuation(merge_ranks(part), "all", scale_free=scale_free)
    nan = xr.full_like(glob[S.BN_MEAN], np.nan)
    per_rank = xr.concat([xr.concat([(f[s] if f is not None else nan) for s in FLUCT_STATS],
                                    dim=stat) for f in each], dim=S.RANK, coords="minimal",
                         compat="override").assign_coords({S.RANK: ranks})
    merged = xr.concat([glob[s] for s in FLUCT_STATS], dim=stat)
    return xr.Dataset({"per_rank": per_rank, "local": xr.full_like(merged, np.nan),
                       "merged": merged, "removed": xr.full_like(merged, np.nan),
                       "expected": nan})
