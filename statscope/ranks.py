"""Distributed runs: per-rank statistics, and the global ones merged exactly from them.

Under ``torch.distributed`` each rank records the statistics of its own batch (as BatchNorm
computes them "within each GPU"). What SyncBatchNorm computes — the moments over every rank's
batch — follows exactly from each rank's per-channel mean, variance and element count (the law of
total variance), so it is merged at read time and recording needs no collective:

    N = Σ n_r,   M = Σ n_r m_r / N,   V = Σ n_r (v_r + (m_r − M)²) / N

with n_r the rank's ``count``; ranks where the layer did not run (count 0) do not enter, while a
rank that ran with a NaN statistic makes the merged one NaN (nothing finite is made up). EN
statistics merge the same way (every channel of a group shares the rank's count), and so do the
per-set statistics (``set_mean`` with ``set_mean_sd``, ``set_std`` with ``set_std_sd``: a mean
over sets and its population spread), weighting each rank by its number of sets, which ``count``
gives exactly for channels-last tensors (one set per real position) and, for channels-first
ones, whenever the ranks' spatial sizes agree and no mask drops part of a sample. ``bn_kurt``
needs third moments that are not stored, so it is not merged; logged scalars are averaged over
ranks.
"""

from __future__ import annotations

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError

__all__ = ["merge_ranks", "merge_synced", "SYNCED_TYPES"]

SYNCED_TYPES = ("SyncBatchNorm",)
"""Probe types whose layer normalizes with statistics over all ranks."""


def merge_ranks(ds, layers=None):
    """The global statistics of a distributed run, as if one process had seen every batch.

    Args:
        ds: a Dataset with a ``rank`` dimension (``open_run`` of a distributed run).
        layers: merge only these layers (names); None for every layer.

    Returns:
        A Dataset without ``rank``: ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std`` (and the
        per-set statistics, when recorded) of the union of the ranks' batches, ``count`` their
        total (of the layers in ``attrs["merged_layers"]``, whose ranks hold the merged values
        already, :func:`merge_synced`: that count once); logged scalars averaged over ranks;
        ``bn_kurt`` dropped. With ``layers``, the other neurons are left out. Ranks with count
        0 at a step do not enter; a rank that ran with a NaN (Inf) statistic makes the merged
        one NaN (Inf, or NaN for the std), as for one batch holding such a value.

    Raises:
        StatscopeError: ``ds`` has no rank dimension, or a layer is unknown.

    Example:
        >>> import numpy as np, xarray as xr
        >>> ds = xr.Dataset({"bn_mean": (("rank", "step", "neuron"), [[[0.0]], [[2.0]]]),
        ...                  "bn_std": (("rank", "step", "neuron"), [[[1.0]], [[1.0]]]),
        ...                  "count": (("rank", "step", "neuron"), [[[4]], [[4]]])},
        ...                 coords={"layer": ("neuron", ["a"])})
        >>> g = merge_ranks(ds)
        >>> float(g.bn_mean), float(g.bn_std) ** 2, int(g["count"])
        (1.0, 2.0, 8)
    """
    if S.RANK not in ds.dims:
        raise StatscopeError(f"ds: no {S.RANK!r} dimension; open a distributed run's folder "
                             "with open_run to get one")
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        known = set(ds[S.LAYER].values.tolist())
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise StatscopeError(f"layers={unknown}: no such layer; available: {sorted(known)}")
        ds = ds.isel({S.NEURON: np.isin(ds[S.LAYER].values, layers)})
    count = ds[S.COUNT]
    ran = count > 0
    # a rank that did not run (count 0) is left out by a weight of 0 and its values set to 0;
    # a rank that ran with a NaN or Inf statistic is summed like any other, so the merged value
    # is NaN (or Inf), as the moments of one batch holding such a value are
    n = count.where(ran, 0).astype(np.float64)
    total = n.sum(S.RANK)
    total = total.where(total > 0)
    out = ds.drop_dims(S.RANK, errors="ignore").copy()
    for mean_name, std_name in ((S.BN_MEAN, S.BN_STD), (S.EN_MEAN, S.EN_STD),
                                (S.SET_MEAN, S.SET_MEAN_SD), (S.SET_STD, S.SET_STD_SD)):
        if mean_name not in ds or std_name not in ds:
            continue
        m = ds[mean_name].astype(np.float64).where(ran, 0.0)
        v = ds[std_name].astype(np.float64).where(ran, 0.0) ** 2
        gm = (n * m).sum(S.RANK, skipna=False) / total
        gv = (n * (v + (m - gm).where(ran, 0.0) ** 2)).sum(S.RANK, skipna=False) / total
        out[mean_name] = gm.astype(np.float32)
        out[std_name] = np.sqrt(gv).astype(np.float32)
        out[mean_name].attrs = dict(ds[mean_name].attrs)
        out[std_name].attrs = dict(ds[std_name].attrs)
    out[S.COUNT] = _merged_count(ds)
    out[S.COUNT].attrs = dict(count.attrs)
    for name, var in ds.data_vars.items():
        if S.RANK in var.dims and name not in out and name != S.BN_KURT and S.NEURON not in var.dims:
            out[name] = var.mean(S.RANK, skipna=True)
            out[name].attrs = dict(var.attrs)
    notes = list(ds.attrs.get(S.NOTES, []))
    missing = ds.attrs.get(S.ATTR_MISSING_RANKS)
    notes.append(f"merged over {ds.sizes[S.RANK]} ranks from per-rank moments and counts"
                 + (f" (ranks {list(missing)} have no store: not covered)" if missing else "")
                 + ("; bn_kurt is not merged (it needs third moments)" if S.BN_KURT in ds else "")
                 + "; logged scalars are averaged over ranks")
    out.attrs = {**ds.attrs, S.NOTES: notes}
    return out


def merge_synced(ds):
    """Put the merged statistics on every rank for the layers that synchronize their statistics
    (SyncBatchNorm): what such a layer normalized with at each step is the global moments, over
    the global count of elements.

    Returns:
        ``ds`` with those neurons' statistics (``bn_*``/``en_*`` and the per-set ones; not
        ``bn_kurt``) and ``count`` replaced, on every rank and step at which the rank ran the
        layer, by the merged values and the summed count; their names in the attribute
        ``merged_layers``. :func:`merge_ranks` of the result counts those elements once.
    """
    import xarray as xr

    synced = [p.get("name") for p in ds.attrs.get(S.ATTR_PROBES, [])
              if p.get("type") in SYNCED_TYPES]
    if not synced or S.RANK not in ds.dims or ds.attrs.get(S.ATTR_MERGED_LAYERS):
        return ds
    merged = merge_ranks(ds, synced)
    cols = xr.DataArray(np.isin(ds[S.LAYER].values, synced), dims=S.NEURON)
    take = (ds[S.COUNT] > 0) & cols
    out = ds.copy()
    for name in (*_MERGED_STATS, S.COUNT):
        if name in ds:
            fill = 0 if name == S.COUNT else np.nan
            whole = merged[name].reindex({S.NEURON: ds[S.NEURON]}, fill_value=fill)
            out[name] = (xr.where(take, whole, ds[name]).transpose(*ds[name].dims)
                         .astype(ds[name].dtype))
            out[name].attrs = dict(ds[name].attrs)
    out.attrs = {**ds.attrs, S.ATTR_MERGED_LAYERS: synced}
    return out


_MERGED_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD, S.SET_MEAN, S.SET_MEAN_SD, S.SET_STD,
                 S.SET_STD_SD)


def _merged_count(ds):
    """Per (step, neuron), the elements the merged statistics come from: the ranks' counts
    summed, except for the layers :func:`merge_synced` merged already, whose every rank holds
    the summed count."""
    import xarray as xr

    count = ds[S.COUNT]
    synced = ds.attrs.get(S.ATTR_MERGED_LAYERS) or []
    if not len(synced):
        return count.sum(S.RANK)
    cols = xr.DataArray(np.isin(ds[S.LAYER].values, list(synced)), dims=S.NEURON)
    return xr.where(cols, count.max(S.RANK), count.sum(S.RANK))
