"""What an effect depends on, found by perturbing its inputs: the jackknife influence series,
the (series, group) levels whose std it reads, and the steps with data it uses
(:func:`statscope.analyses.resampling.resample`, points 1 and 4 of its method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._data import quiet
from ._moments import _BATCH_BYTES, Moments, Statistic, _Data
from .blocklength import block_length

def _influence(data: _Data, statistic: Statistic, est: np.ndarray) -> np.ndarray:
    """Delete-one-step jackknife values of the statistic: (T, K), NaN replaced by the estimate."""
    a0, a1, a2 = data.totals()
    per = max(1, _BATCH_BYTES // max(1, 8 * 3 * data.d[0].size))
    out = np.empty((data.t, est.size))
    for lo in range(0, data.t, per):
        sl = slice(lo, lo + per)
        ok, d = data.ok[sl], data.d[sl]
        vals = statistic(data.moments(a0 - ok, a1 - d, a2 - d * d))
        out[sl] = np.asarray(vals, dtype=np.float64).reshape(-1, est.size)
    return np.where(np.isfinite(out), out, np.where(np.isfinite(est), est, 0.0))


@dataclass(frozen=True)
class _Level:
    """A (series, neuron group) whose std some effects read: d effect / d log std per effect,
    the level columns, and their autocorrelation time, Politis–White block and join ratio
    (medians over the group's neurons)."""

    sensitivity: np.ndarray
    columns: np.ndarray
    tau: float
    block: float
    join: float


def _levels(data: _Data, statistic: Statistic, est: np.ndarray, groups: np.ndarray):
    """The (series, group) levels each effect's std-based terms depend on (see :func:`resample`)."""
    base = data.moments(*data.totals())
    eps = 1e-6
    out = []
    for i, name in enumerate(data.names):
        x = np.where(data.ok[:, i], data.d[:, i], np.nan)  # one series at a time: (T, N)
        with quiet():
            lev = block_length(x)
        for g in np.unique(groups):
            cols = np.flatnonzero(groups == g)
            probe_std = dict(base.std)
            probe_std[name] = base.std[name].copy()
            probe_std[name][cols] *= 1.0 + eps
            with quiet():
                probe = np.asarray(statistic(Moments(base.mean, probe_std)), np.float64).ravel()
                sens = (probe - est) / math.log1p(eps)
            sens = np.where(np.isfinite(sens) & (np.abs(sens) > 1e-6 * (1 + np.abs(est))), sens,
                            0.0)
            if sens.any():
                with quiet():
                    out.append(_Level(sens, x[:, cols],
                                      *(float(np.nanmedian(v[cols]))
                                        for v in (lev.tau, lev.block, lev.join))))
    return out


def _support(data: _Data, statistic: Statistic, est: np.ndarray, groups: np.ndarray
             ) -> np.ndarray:
    """(K,) the steps with data of each effect: those at which some column of a (series,
    group) whose mean or std moves the effect when nudged has a valid value; T for an effect
    that no nudge moves (a constant or undefined one)."""
    base = data.moments(*data.totals())
    mean = {k: np.asarray(base.mean[k]) for k in data.names}
    std = {k: np.asarray(base.std[k]) for k in data.names}
    used = np.zeros((data.t, est.size), bool)
    found = np.zeros(est.size, bool)
    for i, name in enumerate(data.names):
        with quiet():
            scale = np.abs(mean[name]) + np.where(np.isfinite(std[name]), std[name], 0.0)
        delta = 1e-4 * np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        for g in np.unique(groups):
            cols = np.flatnonzero(groups == g)
            moved = np.zeros(est.size, bool)
            for which, values in (("mean", mean), ("std", std)):
                nudged = dict(values)
                nudged[name] = values[name].copy()
                nudged[name][cols] += delta[cols]
                probe_m = Moments(nudged, std) if which == "mean" else Moments(mean, nudged)
                with quiet():
                    probe = np.asarray(statistic(probe_m), np.float64).ravel()
                moved |= ~np.isclose(probe, est, rtol=1e-9, atol=1e-12, equal_nan=True)
            if moved.any():
                used[:, moved] |= np.asarray(data.ok[:, i, cols].any(axis=1))[:, None]
                found |= moved
    return np.where(found, used.sum(axis=0), data.t)


def _level_bias(levels, blocks: np.ndarray, t: int) -> np.ndarray:
    """Per effect, the bias from the levels' autocorrelation that blocks of b do not reproduce.

    A std over T steps is centred on the window mean, so E s² = σ² (T − τ)/(T − 1) for a level
    of autocorrelation time τ; the bootstrap with blocks of b reproduces only the part τ_b
    (:func:`~statscope.analyses.blocklength.captured_tau`), leaving ½ log((T − τ)/(T − τ_b)) in
    log std, which enters each effect through d effect / d log std.
    """
    from .blocklength import captured_tau

    bias = np.zeros(blocks.size)
    for b in np.unique(blocks[blocks > 0]):
        use = blocks == b
        for lev in levels:
            if not np.any(lev.sensitivity[use]):
                continue
            with quiet():
                tau_b = float(np.nanmedian(captured_tau(lev.columns, int(b))))
            missing = 0.5 * math.log((t - min(lev.tau, t / 2)) / (t - min(tau_b, t / 2))) \
                if lev.tau > tau_b else 0.0
            bias[use] += lev.sensitivity[use] * missing
    return bias
