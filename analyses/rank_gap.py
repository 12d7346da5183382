"""The rank gap: how much of the fluctuation a larger effective batch would remove.

Under ``torch.distributed`` each rank normalizes with the statistics of its own batch; the
global statistics, over every rank's batch (what SyncBatchNorm uses), come from the per-rank
moments exactly (:func:`statscope.ranks.merge_ranks`). Per neuron and statistic, within a window
and over the steps at which every rank ran:

* ``per_rank``: each rank's fluctuation (sample std over steps, ddof=1, as
  :func:`statscope.analyses.fluctuation`);
* ``local``: their root mean square over ranks, the fluctuation one rank sees;
* ``merged``: the fluctuation of the global statistics;
* ``removed``: 1 − merged / local, the fraction of the per-rank fluctuation that normalizing
  over all ranks' batches (an R-times larger batch) takes away;
* ``expected``: what batch sampling alone predicts for ``removed``: sampling noise of a mean or a
  std scales as 1/√N, so 1 − √(mean 1/N_global ÷ mean 1/n_rank) (1 − 1/√R for equal counts).
  ``removed`` below it means part of the fluctuation is shared by the ranks — drift of the
  weights, which no batch size removes.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import FLUCT_STATS, quiet, ranked, require, size_notes
from ._names import N_VALID, NOTES, STATISTIC
from .fluctuation import _fluctuation
from .window import load_window, select_window

__all__ = ["rank_gap"]


def rank_gap(ds: xr.Dataset, window=200, *, scale_free: bool = False,
             detrend: bool = False) -> xr.Dataset:
    """Per-rank and global fluctuation of a distributed run, and the gap between them.

    Args:
        ds: a distributed run (dims rank, step, neuron: ``open_run`` of its folder).
        window: see :func:`statscope.analyses.select_window`; one window for every rank, over
            the steps at which every rank ran the layer.
        scale_free, detrend: as in :func:`statscope.analyses.fluctuation` (each rank, and the
            global statistics, divided by their own σ̄).

    Returns:
        Dataset with coords ``statistic`` (bn_mean, bn_std, en_mean, en_std), ``rank`` and the
        neuron coords: float64 ``per_rank`` (statistic, rank, neuron), ``local``, ``merged``,
        ``removed`` (statistic, neuron), ``expected`` (neuron,) and int ``n_valid`` (neuron,):
        steps at which every rank ran. attrs: window, scale_free, detrend, n_ranks, notes.
        :func:`statscope.analyses.layer_summary` gives per-layer values.

    Raises:
        StatscopeError: ``ds`` has no rank dimension, or one rank only.

    Example:
        >>> from statscope.analyses._demo import demo_ranks
        >>> g = rank_gap(demo_ranks(n_ranks=4), window=300)  # i.i.d. batches: sampling only
        >>> round(float(g.removed.sel(statistic="bn_mean").median()), 1)  # 1 − 1/√4
        0.5
        >>> round(float(g.expected.median()), 2)
        0.5
    """
    require(ds, [*FLUCT_STATS, S.COUNT], "rank_gap")
    if not ranked(ds):
        raise StatscopeError("rank_gap: ds has no 'rank' dimension; open a distributed run's "
                             "folder (rank0, rank1, ...) with statscope.open_run")
    n_ranks = ds.sizes[S.RANK]
    if n_ranks < 2:
        raise StatscopeError(f"rank_gap: ds has {n_ranks} rank; the gap needs at least two")
    from statscope.ranks import merge_ranks

    notes = []
    shared = select_window(ds, window)
    ran = np.asarray((shared[S.COUNT] > 0).any([S.STEP, S.NEURON]))
    if not ran.all():
        gone = np.asarray(ds[S.RANK].values)[~ran].tolist()
        if ran.sum() < 2:
            raise StatscopeError(f"rank_gap: only {int(ran.sum())} of the {n_ranks} ranks has "
                                 f"data in the window ({shared.attrs['window']}); the gap needs "
                                 f"at least two (ranks {gone} have none)")
        ds = ds.isel({S.RANK: np.flatnonzero(ran)})
        notes.append(f"ranks {gone} have no data in the window ({shared.attrs['window']}) and "
                     f"are left out")
        n_ranks = ds.sizes[S.RANK]
    every = (ds[S.COUNT] > 0).all(S.RANK)
    common = ds.assign({S.COUNT: ds[S.COUNT].where(every, 0)})
    w = load_window(common, window)
    ranks = np.asarray(w[S.RANK].values)
    parts = [_fluctuation(w.isel({S.RANK: i}).drop_vars(S.RANK), scale_free, detrend)
             for i in range(n_ranks)]
    merged = _fluctuation(merge_ranks(w), scale_free, detrend)
    stat = xr.DataArray(list(FLUCT_STATS), dims=STATISTIC)
    per_rank = xr.concat([xr.concat([p[s] for s in FLUCT_STATS], dim=stat) for p in parts],
                         dim=S.RANK, coords="minimal", compat="override")
    per_rank = per_rank.assign_coords({S.RANK: ranks})
    glob = xr.concat([merged[s] for s in FLUCT_STATS], dim=stat)
    with quiet():
        local = np.sqrt((per_rank ** 2).mean(S.RANK))
        removed = 1.0 - glob / local
        expected = 1.0 - np.sqrt(_inverse_count(w, merged=True) / _inverse_count(w, merged=False))
    synced = list(w.attrs.get(S.ATTR_MERGED_LAYERS) or [])
    if synced:  # each rank normalized with the global statistics: there is no per-rank gap
        own = xr.DataArray(~np.isin(w[S.LAYER].values, synced), dims=S.NEURON)
        removed, expected = xr.where(own, removed, np.nan), xr.where(own, expected, np.nan)
    out = xr.Dataset({"per_rank": per_rank, "local": local, "merged": glob, "removed": removed,
                      "expected": expected, N_VALID: merged[N_VALID]})
    out = out.transpose(STATISTIC, S.RANK, S.NEURON, missing_dims="ignore")
    notes = [f"over the steps at which all {n_ranks} ranks ran each layer; the global "
             f"statistics are merged exactly from the ranks' moments and counts", *notes]
    if synced:
        notes.append(f"layers {synced} synchronize their statistics (SyncBatchNorm): every rank "
                     f"normalizes with the global ones, so they have no per-rank gap (removed "
                     f"and expected are NaN)")
    notes += [f"rank {r}: {n}" for r, p in zip(ranks, parts) for n in p.attrs[NOTES]]
    notes += [f"global: {n}" for n in merged.attrs[NOTES]]
    notes += size_notes(ds)
    out.attrs = {"window": w.attrs["window"], "scale_free": bool(scale_free),
                 "detrend": bool(detrend), "n_ranks": int(n_ranks), NOTES: notes}
    return out


def _inverse_count(w: xr.Dataset, *, merged: bool) -> xr.DataArray:
    """Per neuron, the window mean of 1/N: N the summed count over ranks (``merged``) or each
    rank's own count (averaged over ranks too); steps where not every rank ran are left out."""
    count = w[S.COUNT].astype(np.float64)
    ok = (count > 0).all(S.RANK)
    if merged:
        return (1.0 / count.sum(S.RANK)).where(ok).mean(S.STEP)
    return (1.0 / count).where(ok).mean([S.RANK, S.STEP])
