"""Per-series means and standard deviations over steps, from sums the bootstrap can resample.

:class:`Moments` is what every statistic of :mod:`statscope.analyses.resampling` reads; ``_Data``
holds the centred series and their NaN mask, from which any replicate's moments follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from statscope.errors import StatscopeError

from ._data import quiet

__all__ = ["Moments", "Statistic", "moments"]

_BATCH_BYTES = 32 << 20
"""Replicates and jackknife deletions are computed in batches of about this many bytes."""

Statistic = Callable[["Moments"], np.ndarray]
"""``statistic(moments) -> (..., K)``: K effects from means and stds of shape (..., N)."""


@dataclass(frozen=True)
class Moments:
    """Per-series mean and standard deviation (ddof=1) over steps, NaN steps skipped.

    Attributes:
        mean, std: series name -> array (..., N); the leading axes are replicates (or
            jackknife deletions) and absent for the data themselves.
    """

    mean: Mapping[str, np.ndarray]
    std: Mapping[str, np.ndarray]


class _Lazy(Mapping):
    """A read-only mapping that computes each value on first access."""

    def __init__(self, keys, compute):
        self._keys = list(keys)
        self._compute = compute
        self._done: dict = {}

    def __getitem__(self, key):
        if key not in self._done:
            if key not in self._keys:
                raise KeyError(key)
            self._done[key] = self._compute(key)
        return self._done[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class _Data:
    """Series centred per column, with their NaN mask, stacked column-wise for the engine."""

    def __init__(self, series: Mapping[str, np.ndarray]):
        if not series:
            raise StatscopeError("series={}: expected at least one series")
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in series.items()}
        shapes = {v.shape for v in arrays.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise StatscopeError(f"series: expected (T, N) arrays of one shape, got "
                                 f"{sorted(shapes)}")
        self.names = list(arrays)
        self.t, self.n = next(iter(shapes))
        x = np.stack([arrays[k] for k in self.names], axis=1)  # (T, S, N)
        self.ok = np.isfinite(x)
        with quiet():
            self.center = np.nanmean(x, axis=0)  # (S, N)
        c = np.where(np.isfinite(self.center), self.center, 0.0)
        # In place: the stacked copy becomes d, so a window costs one (T, S, N) float array
        # and its mask, not the three temporaries of ``np.where(ok, x - c, 0)``.
        x -= c
        x[~self.ok] = 0.0
        self.d = x
        self._totals = None

    def moments(self, a0, a1, a2) -> Moments:
        """Moments from sums of valid count, d and d² of shape (..., S, N), each series computed
        when the statistic first reads it."""
        index = {k: i for i, k in enumerate(self.names)}

        def mean(name):
            i = index[name]
            with quiet():
                return np.where(a0[..., i, :] > 0, a1[..., i, :] / a0[..., i, :]
                                + self.center[i], np.nan)

        def std(name):
            i = index[name]
            n = a0[..., i, :]
            with quiet():
                m = a1[..., i, :] / n
                var = np.maximum(a2[..., i, :] - n * m * m, 0.0) / (n - 1.0)
                return np.where(n > 1, np.sqrt(var), np.nan)

        return Moments(_Lazy(self.names, mean), _Lazy(self.names, std))

    def totals(self):
        """Sums over all steps of valid count, d and d², each (S, N); computed once (every
        jackknife, nudge and block length starts from them)."""
        if self._totals is None:
            self._totals = (self.ok.sum(0, dtype=np.float64), self.d.sum(0),
                            (self.d * self.d).sum(0))
            for a in self._totals:  # shared by every caller
                a.setflags(write=False)
        return self._totals


def moments(series: Mapping[str, np.ndarray]) -> Moments:
    """Mean and std (ddof=1) over axis 0 of each (T, N) series, NaN steps skipped.

    Example:
        >>> x = np.array([[1.0], [2.0], [np.nan], [6.0]])
        >>> m = moments({"x": x})
        >>> float(m.mean["x"][0]), float(m.std["x"][0])
        (3.0, 2.6457513110645907)
    """
    data = _Data(series)
    return data.moments(*data.totals())
