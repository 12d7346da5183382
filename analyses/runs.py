"""The runs an analysis takes: one entry per run of a run, stacked runs, a mapping of runs, or a
distributed run (one entry per rank and one of the merged statistics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import ranked, run_name, stacked
from .seeds import config_meta

__all__ = ["split_runs", "expand_ranks", "GLOBAL"]


def split_runs(runs, *, ranks: bool = True) -> list[tuple[str, xr.Dataset, dict]]:
    """One entry (name, single-run Dataset, meta) per run of ``runs``.

    Args:
        runs: a run (``open_run``), stacked runs (``open_runs``) or a mapping name -> run.
        ranks: a distributed run (dim ``rank``) becomes one entry per rank, ``"NAME/rank{r}"``
            (meta ``rank`` = r), and one of the merged statistics, ``"NAME/global"`` (meta
            ``rank`` = "global", ``batch_size`` the sum over ranks): see
            :func:`statscope.analyses.expand_ranks`. False keeps it whole.

    Raises:
        StatscopeError: anything else, or an empty mapping.
    """
    out = _split_runs(runs)
    if not ranks:
        return out
    return [entry for name, ds, meta in out for entry in
            (expand_ranks(ds, name, meta) if ranked(ds) else [(name, ds, meta)])]


def expand_ranks(ds: xr.Dataset, name: str, meta: Mapping[str, Any] | None = None
                 ) -> list[tuple[str, xr.Dataset, dict]]:
    """A distributed run as separate entries: each rank's own statistics, then the global ones.

    Args:
        ds: a run with a ``rank`` dimension.
        name: the run's name.
        meta: the run's settings; each rank's own ``meta`` (its store's) overrides them, and
            its ``batch_size`` is taken as that rank's batch.

    Returns:
        ``(f"{name}/rank{r}", rank r's Dataset, {**meta, "rank": r})`` per rank, then
        ``(f"{name}/global", merge_ranks(ds), {**meta, "rank": "global", "batch_size": the sum
        of the ranks' batch sizes (when every rank's is known)})``. The merged statistics are what SyncBatchNorm computes
        over all ranks' batches (:func:`statscope.ranks.merge_ranks`).
    """
    from statscope.ranks import merge_ranks

    meta = dict(meta or {})
    raw = ds.attrs.get("ranks")
    own: Mapping = raw if isinstance(raw, Mapping) else {}
    out, sizes = [], []
    for i, r in enumerate(np.asarray(ds[S.RANK].values).tolist()):
        one = ds.isel({S.RANK: i}).drop_vars(S.RANK, errors="ignore")
        attrs = own.get(str(r))
        if isinstance(attrs, Mapping):  # the rank's own store attributes (its batch size)
            one.attrs = {**dict(attrs), **{k: v for k, v in ds.attrs.items()
                                            if k in ("window", S.NOTES)}}
        one.attrs = {**one.attrs, S.ATTR_NAME: f"{name}/rank{r}"}  # what messages call it
        rmeta = {**meta, **dict(one.attrs.get(S.ATTR_META) or {}), S.ATTR_RANK: int(r)}
        sizes.append(rmeta.get(S.META_BATCH_SIZE))
        out.append((f"{name}/rank{r}", one, rmeta))
    gmeta = {**meta, S.ATTR_RANK: GLOBAL}
    if sizes and all(b is not None for b in sizes):
        gmeta[S.META_BATCH_SIZE] = sum(sizes)
    merged = merge_ranks(ds)
    merged.attrs = {**merged.attrs, S.ATTR_NAME: f"{name}/{GLOBAL}"}
    out.append((f"{name}/{GLOBAL}", merged, gmeta))
    return out


GLOBAL = "global"
"""The ``rank`` label of a distributed run's merged (global) statistics."""


def _split_runs(runs) -> list[tuple[str, xr.Dataset, dict]]:
    """:func:`split_runs` without expanding ranks."""
    if isinstance(runs, Mapping) and not isinstance(runs, xr.Dataset):
        if not runs:
            raise StatscopeError("runs={}: expected at least one run")
        out = []
        for name, ds in runs.items():
            if not isinstance(ds, xr.Dataset) or stacked(ds):
                raise StatscopeError(f"runs[{name!r}]: expected one run from statscope.open_run")
            out.append((str(name), ds, _meta(ds)))
        return out
    if not isinstance(runs, xr.Dataset):
        raise StatscopeError(f"expected a run, stacked runs or a mapping of runs, got "
                             f"{type(runs).__name__}")
    if not stacked(runs):
        return [(run_name(runs), runs, _meta(runs))]
    out = []
    per_run_attrs = runs.attrs.get("runs") or {}
    for i in range(runs.sizes[S.RUN]):
        one = runs.isel({S.RUN: i})
        name = run_name(runs, i)
        if isinstance(per_run_attrs.get(name), Mapping):
            one.attrs = dict(per_run_attrs[name])  # its own every, probes (kept units), status
        meta = config_meta(per_run_attrs.get(name) or {})
        for key in S.META_KEYS:
            if key in one.coords:
                meta[key] = one[key].values.item()
        out.append((name, one, meta))
    return out


def _meta(ds: xr.Dataset) -> dict:
    return config_meta(ds.attrs)
