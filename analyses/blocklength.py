"""Data-driven block lengths and autocorrelation times (Politis & White 2004; Patton, Politis &
White 2009).

For a stationary series with autocovariances R(k), the block length that minimises the mean
squared error of the circular/moving-block bootstrap variance of a mean is

    b = (2 G² / D)^(1/3) · T^(1/3),   G = Σ_k |k| R(k),   D = (4/3) g²,   g = Σ_k R(k),

with the sums estimated through the flat-top lag window λ(t) = 1 for |t| ≤ ½, 2(1 − |t|) for
½ < |t| ≤ 1, 0 beyond, at a bandwidth M = 2·m̂, m̂ the smallest lag after which K_T = max(5,
√log₁₀T) autocorrelations in a row are insignificant (|ρ̂| < 2 √(log₁₀T / T)). The same sums give
the integrated autocorrelation time τ = g / R(0) (the effective sample size is T / τ) and the
ratio G / g, which says how much variance the bootstrap loses at the joins between blocks of
length b (a fraction ≈ (G / g) / b).

The functions are vectorised over columns: one estimate per column of a (T, ...) array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._data import quiet
from ._moments import _BATCH_BYTES

__all__ = ["BlockLength", "block_length", "captured_tau"]


@dataclass(frozen=True)
class BlockLength:
    """Politis–White estimates per column.

    Attributes:
        block: MSE-optimal moving-block length in steps (float ≥ 1, at most min(3√T, T/3)).
        tau: integrated autocorrelation time in steps, g / R(0) (1 for white noise; ≥ 1/T).
        join: G / g in steps: the bootstrap with blocks of b steps underestimates the variance
            of a mean by a fraction ≈ join / b.
        n_steps: T.
    """

    block: np.ndarray
    tau: np.ndarray
    join: np.ndarray
    n_steps: int


def _autocovariances(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Biased (divide by T) autocovariances at lags 0..max_lag along axis 0, via the FFT."""
    t = x.shape[0]
    d = x - x.mean(axis=0)
    n = 1 << int(math.ceil(math.log2(2 * t)))
    f = np.fft.rfft(d, n, axis=0)
    return np.fft.irfft(f * np.conj(f), n, axis=0)[:max_lag + 1] / t


def block_length(x: np.ndarray) -> BlockLength:
    """Politis–White block length, autocorrelation time and join ratio of each column of ``x``.

    Args:
        x: array (T, ...), T ≥ 8; NaN entries are replaced by the column mean (they add no
            correlation). A constant column gets block 1, tau 1, join 0.

    Returns:
        BlockLength with arrays of shape ``x.shape[1:]``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> e = rng.standard_normal((4000, 2))
        >>> x = e.copy()
        >>> for t in range(1, 4000):
        ...     x[t, 1] = 0.8 * x[t - 1, 1] + e[t, 1]
        >>> bl = block_length(x)
        >>> bl.tau.round(1).tolist()  # white noise: 1; AR(1) at 0.8: (1 + 0.8)/(1 - 0.8) = 9
        [1.0, 8.4]
    """
    x = np.asarray(x, dtype=np.float64)
    t = x.shape[0]
    shape = x.shape[1:]
    flat = x.reshape(t, -1)
    pieces = _pieces(t, flat.shape[1])
    if pieces > 1:  # the FFTs of every column at once would take ~6 (2T × columns) arrays
        parts = [block_length(c) for c in np.array_split(flat, pieces, axis=1)]

        def joined(field: str) -> np.ndarray:
            return np.concatenate([getattr(p, field) for p in parts]).reshape(shape)

        return BlockLength(joined("block"), joined("tau"), joined("join"), t)
    with quiet():
        center = np.nanmean(flat, axis=0)
    flat = np.where(np.isfinite(flat), flat, np.where(np.isfinite(center), center, 0.0))
    k_run = max(5, int(math.sqrt(math.log10(max(t, 10)))))
    m_max = int(math.ceil(math.sqrt(t))) + k_run
    max_lag = max(1, min(t - 1, 2 * m_max))
    r = _autocovariances(flat, max_lag)
    flat_col = r[0] <= 1e-300 * np.maximum(1.0, np.abs(center))
    with quiet():
        rho = r / np.where(flat_col, 1.0, r[0])
    small = np.abs(rho[1:]) < 2.0 * math.sqrt(math.log10(max(t, 10)) / t)
    k_run = min(k_run, small.shape[0])
    cum = np.concatenate([np.zeros((1, small.shape[1])), np.cumsum(small, axis=0)])
    quiet_run = (cum[k_run:] - cum[:-k_run]) >= k_run  # [m]: lags m+1 .. m+k_run insignificant
    quiet_run = quiet_run[:m_max + 1]
    m_hat = np.where(quiet_run.any(axis=0), np.argmax(quiet_run, axis=0), m_max)
    bandwidth = np.minimum(2 * np.maximum(m_hat, 1), max_lag)
    lag = np.arange(max_lag + 1)[:, None]
    u = lag / bandwidth
    window = np.where(u <= 0.5, 1.0, np.where(u <= 1.0, 2.0 * (1.0 - u), 0.0))
    weight = np.where(lag == 0, 1.0, 2.0) * window  # both signs of k
    g = (weight * r).sum(axis=0)
    big_g = (weight * lag * r).sum(axis=0)
    with quiet():
        block = (2.0 * big_g ** 2 / ((4.0 / 3.0) * g ** 2)) ** (1.0 / 3.0) * t ** (1.0 / 3.0)
        tau = g / r[0]
        join = big_g / g
    cap = math.ceil(min(3.0 * math.sqrt(t), t / 3.0))
    good = ~flat_col & np.isfinite(block) & (g > 0)
    block = np.where(good, np.clip(block, 1.0, cap), 1.0)
    tau = np.where(good, np.maximum(tau, 1.0 / t), 1.0)
    join = np.where(good, np.maximum(join, 0.0), 0.0)
    return BlockLength(block.reshape(shape), tau.reshape(shape), join.reshape(shape), t)


def _pieces(t: int, columns: int) -> int:
    """How many column chunks keep :func:`block_length`'s FFT work within about
    ``_BATCH_BYTES``. Each column's estimates depend on that column alone; chunks of at least
    2 columns keep numpy's sums over steps and lags sequential, as for all columns at once (at
    a few columns, other rounding may still move the last bit)."""
    n_fft = 1 << int(math.ceil(math.log2(2 * t)))
    per = max(4, _BATCH_BYTES // (8 * 6 * n_fft))
    return max(1, -(-columns // per)) if columns > per else 1


def captured_tau(x: np.ndarray, block: int) -> np.ndarray:
    """The part of the autocorrelation time a moving-block bootstrap with blocks of ``block``
    steps reproduces: 1 + 2 Σ_{j<b} (1 − j/b) ρ̂(j) (the Bartlett window of width b), per column.

    Example:
        >>> x = np.random.default_rng(0).standard_normal((500, 1))
        >>> float(captured_tau(x, 1)[0])
        1.0
    """
    x = np.asarray(x, dtype=np.float64)
    t = x.shape[0]
    flat = x.reshape(t, -1)
    with quiet():
        center = np.nanmean(flat, axis=0)
    flat = np.where(np.isfinite(flat), flat, np.where(np.isfinite(center), center, 0.0))
    b = max(1, min(int(block), t - 1))
    r = _autocovariances(flat, b - 1) if b > 1 else np.var(flat, axis=0)[None]
    lag = np.arange(r.shape[0])[:, None]
    with quiet():
        rho = r / np.where(r[0] > 0, r[0], 1.0)
    tau = 1.0 + 2.0 * ((1.0 - lag[1:] / b) * rho[1:]).sum(axis=0)
    return tau.reshape(x.shape[1:])
