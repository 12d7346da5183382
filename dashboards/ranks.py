"""Distributed runs in the dashboard: which ranks a view draws, and the per-rank–global gap.

A distributed run (``open_run`` of a folder of ``rank{r}`` stores) has a ``rank`` dimension. A
view draws one set of (step, neuron) statistics per *rank key*: a rank number (that rank's own
batch statistics, as BatchNorm computed them "within each GPU") or ``"merged"`` (the global
statistics over every rank's batch, exactly what SyncBatchNorm computes:
:func:`statscope.ranks.merge_ranks`). A single-process run has one set, key ``None``.

The **gap** says how much of the fluctuation a larger effective batch would remove: per neuron
(or layer), ``1 − global / per-rank``, the per-rank fluctuation taken as the root mean square
over ranks (variances average). Sampling theory alone predicts ``1 − sqrt((1/N) / mean(1/n_r))``
from the ranks' element counts ``n_r`` and their total ``N`` — ``1 − 1/√R`` for R equal batches.
Both come from :func:`statscope.analyses.rank_gap` (called by
:func:`statscope.dashboards.results.rank_comparison`); only the gap between the per-layer
medians drawn is :func:`median_gap`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Union

import numpy as np
import xarray as xr

from statscope import schema as S

from .state import EACH, MERGED

__all__ = ["RankKey", "rank_keys", "rank_label", "rank_view", "median_gap", "GAP_STATS"]

RankKey = Union[str, int, None]
"""A rank key: ``None`` (single-process run), ``"merged"``, or a rank number."""

GAP_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)
"""The statistics whose per-rank and global fluctuations are compared."""


def ranks_of(ds: xr.Dataset) -> tuple[int, ...]:
    """The ranks of a distributed run's Dataset; ``()`` for a single-process run."""
    return tuple(int(r) for r in ds[S.RANK].values) if S.RANK in ds.dims else ()


def rank_keys(ranks: Sequence[int], choice: str | int) -> tuple[list, str | None]:
    """The rank keys a view draws for a run with ``ranks`` under the page's rank ``choice``.

    Args:
        ranks: the run's ranks, ``()`` for a single-process run.
        choice: ``"merged"``, ``"each"`` or a rank number (from the URL).

    Returns:
        ``(keys, note)``: ``[None]`` for a single-process run; ``["merged"]``, ``[r]``, or every
        rank then ``"merged"`` for ``"each"``. ``note`` says when the run lacks the chosen rank
        (its merged statistics are drawn instead), else ``None``.

    Example:
        >>> rank_keys((0, 1), "each"), rank_keys((), 1), rank_keys((0, 1), 5)
        (([0, 1, 'merged'], None), ([None], None), (['merged'], 'has no rank 5'))
    """
    if not ranks:
        return [None], None
    if choice == EACH:
        return [*ranks, MERGED], None
    if choice == MERGED or choice is None:
        return [MERGED], None
    if choice in ranks:
        return [int(choice)], None
    return [MERGED], f"has no rank {choice}"


def rank_label(key, ranks: Sequence[int]) -> str:
    """How a rank key is named on screen, e.g. ``rank 1`` or ``merged over 2 ranks``.

    Example:
        >>> rank_label("merged", (0, 1)), rank_label(1, (0, 1)), rank_label(None, ())
        ('merged over 2 ranks', 'rank 1', '')
    """
    if key is None:
        return ""
    if key == MERGED:
        return f"merged over {len(ranks)} ranks"
    return f"rank {key}"


def rank_view(ds: xr.Dataset, key, cache: MutableMapping[Any, xr.Dataset] | None = None,
              name: Any = None) -> xr.Dataset:
    """The (step, neuron) statistics of rank key ``key`` of ``ds``: the run itself for a
    single-process run (any key), one rank's, or the merged ones (lazy).

    Args:
        ds: a run from ``open_run``.
        key: a rank key; ``None`` or ``"merged"`` on a distributed run is the merged view.
        cache: where to keep the merged view between calls (``(name, key)`` keys).
        name: the run's name in ``cache``.
    """
    if S.RANK not in ds.dims:
        return ds
    if key not in (None, MERGED):
        return ds.sel({S.RANK: key})
    if cache is not None and (name, MERGED) in cache:
        return cache[(name, MERGED)]
    from statscope.ranks import merge_ranks

    merged = merge_ranks(ds)
    if cache is not None:
        cache[(name, MERGED)] = merged
    return merged


def median_gap(per_rank: Mapping[int, Mapping[str, np.ndarray]],
               merged: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The gap between the per-layer medians the fluctuation view draws: each rank's median
    (circles) and the global one (bars).

    Per neuron the gap is ``statscope.analyses.rank_gap``'s ``removed``; a layer's bar is
    labelled with the change between what is drawn of it, ``1 − global median / RMS over ranks
    of their medians``, which is not the median of the neurons' gaps.

    Args:
        per_rank: rank to its median fluctuation per statistic, (k,) each (k layers).
        merged: the global median fluctuation per statistic, (k,) each.

    Returns:
        Per statistic present in both, ``{"per_rank": RMS over ranks (NaN ranks skipped),
        "merged": global, "gap": 1 − global / per_rank}``, (k,) float64 each.

    Example:
        >>> g = median_gap({0: {"bn_mean": np.array([0.2])}, 1: {"bn_mean": np.array([0.2])}},
        ...                {"bn_mean": np.array([0.15])})
        >>> round(float(g["bn_mean"]["gap"][0]), 3)
        0.25
    """
    out = {}
    for stat in GAP_STATS:
        if stat not in merged or not all(stat in f for f in per_rank.values()):
            continue
        each = np.stack([np.asarray(f[stat], np.float64) for f in per_rank.values()])
        ok = np.isfinite(each)
        with np.errstate(invalid="ignore", divide="ignore"):
            rms = np.sqrt(np.where(ok, each ** 2, 0.0).sum(0) / ok.sum(0))
            glob = np.asarray(merged[stat], np.float64)
            out[stat] = {"per_rank": rms, "merged": glob, "gap": 1.0 - glob / rms}
    return out
