"""Server-side downsampling that keeps the min/max envelope of a trace.

A 300,000-step trace sent whole costs the browser tens of megabytes; sent as the minimum and the
maximum of each of ~1,000 bins it looks the same at screen resolution and keeps every spike.
"""

from __future__ import annotations

import numpy as np

__all__ = ["envelope", "bin_mean", "DEFAULT_POINTS"]

DEFAULT_POINTS = 2000
"""Points per trace after downsampling: the min and the max of 1,000 bins."""


def envelope(x: np.ndarray, y: np.ndarray, n_out: int = DEFAULT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Downsample ``(x, y)`` to at most ``n_out`` points, keeping each bin's minimum and maximum.

    The input is cut into ``n_out // 2`` bins of equal length; the minimum and the maximum of
    each bin are kept, in step order, with the first and last points. The global extremes and
    every spike that is the extreme of its bin therefore survive. NaN values (steps where the
    layer did not run) are dropped first.

    Args:
        x: (T,) sorted steps.
        y: (T,) values, any real dtype.
        n_out: the most points to return; at least 4.

    Returns:
        ``(x, y)``, each (≤ n_out,), a subsequence of the finite input.

    Example:
        >>> xs, ys = envelope(np.arange(10_000), np.sin(np.arange(10_000) / 50.0), 100)
        >>> len(xs) <= 100, float(ys.max()) == float(np.sin(np.arange(10_000) / 50.0).max())
        (True, True)
    """
    x = np.asarray(x)
    y = np.asarray(y)
    # A float64 sum of finite float32 values cannot overflow: one pass says whether any value
    # is NaN or infinite, without building a mask (most columns have none).
    if not np.isfinite(y.sum(dtype=np.float64)):
        finite = np.isfinite(y)
        x, y = x[finite], y[finite]
    if len(y) <= n_out:
        return x, y
    from tsdownsample import MinMaxDownsampler

    n_out = max(4, int(n_out) - int(n_out) % 2)
    # Two points are reserved for the ends, so the inner bins are n_out - 2 points.
    idx = np.sort(MinMaxDownsampler().downsample(np.ascontiguousarray(y), n_out=n_out - 2))
    idx = np.concatenate([[0], idx.astype(np.int64), [len(y) - 1]])
    idx = idx[np.concatenate([[True], np.diff(idx) > 0])]  # sorted: drop the repeats
    return x[idx], y[idx]


def bin_mean(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, int]:
    """Average consecutive rows of a (T, K) array into at most ``n_bins`` rows (NaN-aware).

    Args:
        values: (T, K) array.
        n_bins: the most rows to return.

    Returns:
        ``(binned, width)``: binned is (ceil(T / width), K) float32, width the rows per bin
        (1 when ``T <= n_bins``). The last bin may be shorter.
    """
    t = values.shape[0]
    width = max(1, -(-t // max(1, n_bins)))
    v = values.astype(np.float32, copy=False)
    if width == 1:
        return v, 1
    full = t - t % width
    parts = [_mean_rows(v[:full].reshape(-1, width, *v.shape[1:]))]
    if full < t:
        parts.append(_mean_rows(v[full:][None]))
    return np.concatenate(parts), width


def _mean_rows(v: np.ndarray) -> np.ndarray:
    mean = v.mean(axis=1, dtype=np.float32)
    if not np.isnan(mean).any():
        return mean
    finite = np.isfinite(v)
    total = np.where(finite, v, 0).sum(axis=1, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / finite.sum(axis=1)).astype(np.float32)
