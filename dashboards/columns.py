"""The column reads of :class:`~statscope.dashboards.data.RunCatalog` (a mixin): a run's
(step, neuron) variables and scalars as numpy columns, read once into the catalog's byte cache
and sliced from there; for a distributed run one rank's, or the ranks' merged in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from statscope import schema as S

from .cache import ByteLRU
from .state import MERGED

if TYPE_CHECKING:
    from .following import _Run

__all__ = ["ColumnReads", "SLICE_ROWS"]

_MERGED_FROM = {S.BN_MEAN: (S.BN_MEAN, S.BN_STD, S.COUNT), S.BN_STD: (S.BN_MEAN, S.BN_STD, S.COUNT),
                S.EN_MEAN: (S.EN_MEAN, S.EN_STD, S.COUNT), S.EN_STD: (S.EN_MEAN, S.EN_STD, S.COUNT),
                S.COUNT: (S.COUNT,)}
"""What each merged (step, neuron) variable is merged from, per rank."""

SLICE_ROWS = 20_000
"""Row spans up to this long (or 1/16 of the run) are read as slices, not whole columns."""


class ColumnReads:
    """What :class:`~statscope.dashboards.data.RunCatalog` reads of its runs (a mixin)."""

    # Set up by RunCatalog; declared for type checkers.
    cache: ByteLRU
    _runs: dict[str, _Run]
    dataset: Callable[[str], xr.Dataset]
    view: Callable[..., xr.Dataset]
    rank_key: Callable[..., str | int | None]

    def columns(self, name: str, var: str, neurons: Sequence[int],
                rows: slice | None = None, rank: str | int | None = None) -> np.ndarray:
        """Columns of ``var`` for the given neuron positions, over ``rows`` (default all steps).

        Whole-run columns are read once and cached; a short slice of a column not cached yet is
        read on its own (only the store chunks it touches), so the last 200 steps of a
        300,000-step run cost one chunk per neuron block, not the whole column.

        Args:
            name: run name.
            var: a (step, neuron) variable of the schema.
            neurons: positions along ``neuron``.
            rows: a ``slice`` of step rows with explicit start and stop; ``None`` for all.
            rank: for a distributed run, which statistics (see :meth:`view`).

        Returns:
            (rows, len(neurons)) array in the variable's dtype.
        """
        cols = self.column_list(name, var, neurons, rows, rank)
        if not cols:
            ds = self.view(name, rank)
            n = ds.sizes[S.STEP]
            rows = slice(0, n) if rows is None else slice(*rows.indices(n)[:2])
            return np.empty((rows.stop - rows.start, 0), ds[var].dtype)
        return np.stack(cols, axis=1)

    def column_list(self, name: str, var: str, neurons: Sequence[int],
                    rows: slice | None = None, rank: str | int | None = None
                    ) -> list[np.ndarray]:
        """:meth:`columns` as one (rows,) array per neuron: views of the cached whole columns
        where they are cached, so drawing a 300,000-step column copies nothing.

        Returns:
            ``len(neurons)`` read-only-by-convention (rows,) arrays; do not write to them.
        """
        run = self._runs[name]
        if self.rank_key(name, rank) == MERGED and var in _MERGED_FROM:
            return self._merged_list(name, var, neurons, rows)
        ds = self.view(name, rank)
        what = self._cache_var(name, var, rank)
        n = ds.sizes[S.STEP]
        rows = slice(0, n) if rows is None else slice(*rows.indices(n)[:2])
        if not len(neurons):
            return []
        keys = [(name, run.generation, what, int(i)) for i in neurons]
        cols = {k: self.cache.get(k) for k in keys}
        missing = sorted({k[3] for k, v in cols.items() if v is None})
        # a part of the run is read on its own; all of it is cached as whole columns, which
        # any later zoom then slices
        if missing and rows.stop - rows.start < n and \
                rows.stop - rows.start <= max(SLICE_ROWS, n // 16):
            key = (name, run.generation, what, tuple(int(i) for i in neurons), rows.start,
                   rows.stop)
            part = self.cache.get(key)
            if part is None:
                # stored neuron-major, so that each neuron's slice is contiguous
                part = np.ascontiguousarray(np.asarray(
                    ds[var].isel({S.STEP: rows, S.NEURON: list(neurons)}).values).T)
                self.cache.put(key, part)
            return list(part)
        if missing:
            block = np.asarray(ds[var].isel({S.NEURON: missing}).values)
            for j, i in enumerate(missing):
                col = np.ascontiguousarray(block[:, j])
                cols[(name, run.generation, what, i)] = col
                self.cache.put((name, run.generation, what, i), col)
        return [cols[k][rows] for k in keys]

    def _merged_list(self, name: str, var: str, neurons: Sequence[int],
                     rows: slice | None) -> list[np.ndarray]:
        """:meth:`column_list` of the merged ranks: each rank's columns of the statistic, its
        partner (mean or std) and ``count``, read and cached like any rank's, then merged by
        :func:`statscope.ranks.merge_ranks` in memory. Merging the lazy whole run and then
        picking columns computes every neuron's block (a 4-column view took 3.4 s where this
        takes milliseconds). Whole columns are cached merged; slices are merged again."""
        from statscope.ranks import merge_ranks

        run = self._runs[name]
        n = self.dataset(name).sizes[S.STEP]
        rows = slice(0, n) if rows is None else slice(*rows.indices(n)[:2])
        if not len(neurons):
            return []
        keys = [(name, run.generation, (var, MERGED), int(i)) for i in neurons]
        cols = [self.cache.get(k) for k in keys]
        if all(c is not None for c in cols):
            return [c[rows] for c in cols]
        whole = rows.stop - rows.start == n or rows.stop - rows.start > max(SLICE_ROWS, n // 16)
        span = slice(0, n) if whole else rows
        part_key = (name, run.generation, (var, MERGED), tuple(int(i) for i in neurons),
                    rows.start, rows.stop)
        if not whole and self.cache.get(part_key) is not None:
            return list(self.cache.get(part_key))
        parts = {v: np.stack([np.stack(self.column_list(name, v, neurons, span, r), axis=1)
                              for r in run.ranks]) for v in _MERGED_FROM[var]}
        layers = self.dataset(name)[S.LAYER].values[list(neurons)]
        small = xr.Dataset({v: ((S.RANK, S.STEP, S.NEURON), a) for v, a in parts.items()},
                           coords={S.LAYER: (S.NEURON, layers)})
        merged = np.ascontiguousarray(np.asarray(merge_ranks(small)[var].values).T)
        if not whole:
            self.cache.put(part_key, merged)
            return list(merged)
        for k, col in zip(keys, merged):
            self.cache.put(k, col)
        return [col[rows] for col in merged]

    def _cache_var(self, name: str, var: str, rank) -> str | tuple:
        """The variable's part of a cache key: the name, with the rank choice for a
        distributed run (a rank's columns and the merged ones are different data)."""
        key = self.rank_key(name, rank)
        return var if key is None else (var, key)

    def scalar(self, name: str, var: str, rank: str | int | None = None) -> np.ndarray | None:
        """A logged scalar (``loss``, ``lr``...) of run ``name``, (step,), cached, or ``None``;
        of a distributed run, one rank's or (merged) the mean over its ranks."""
        if var not in self._runs[name].scalars:
            return None
        key = (name, self._runs[name].generation, self._cache_var(name, var, rank), None)
        col = self.cache.get(key)
        if col is None:
            if self.rank_key(name, rank) == MERGED:  # merge only the scalar, not the run
                from statscope.ranks import merge_ranks

                ds = merge_ranks(self.dataset(name)[[var, S.COUNT]])
            else:
                ds = self.view(name, rank)
            col = np.asarray(ds[var].values)
            self.cache.put(key, col)
        return col

    def memo(self, name: str, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Cache ``compute()`` for run ``name`` until the run changes (derived results)."""
        full = (name, self._runs[name].generation, "memo", key)
        value = self.cache.get(full)
        if value is None:
            value = compute()
            self.cache.put(full, value)
        return value
