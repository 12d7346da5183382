"""Intervals and p-values from block-bootstrap replicates (:mod:`statscope.analyses.resampling`):
bias-corrected, studentized, with Student t quantiles — for one statistic (:func:`interval`), a
weighted combination of independently resampled ones (:func:`contrast`), or straight from the
series (:func:`bootstrap_statistic`, the call most analyses make). See the resampling module for
the method and its measured coverage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from statscope.errors import StatscopeError

from ._data import quiet, t_quantile, t_two_sided
from .resampling import MIN_EFFECTIVE, Resampled, Statistic, check_settings, resample

__all__ = ["Interval", "interval", "contrast", "bootstrap_statistic"]


@dataclass(frozen=True)
class Interval:
    """Bias-corrected studentized block-bootstrap intervals of K effects.

    Attributes:
        estimate: (K,) the statistic on the data (not bias-corrected: what the paper reports).
        lower, upper: (K,) interval bounds (NaN when no interval; see ``notes``).
        se: (K,) corrected bootstrap standard error (of log θ when ``log``).
        df: (K,) degrees of freedom of the t quantile, ⌊T/b⌋ − 1.
        p_value: (K,) two-sided p-value for θ = 0 (for log θ = 0, i.e. θ = 1, when ``log``).
        block: (K,) block length in steps (0 = too short).
        n_eff: (K,) effective sample size of the effect: its steps with data over its
            autocorrelation time τ (T/τ when it has data at every step).
        notes: K strings, empty or saying why there is no interval.
        confidence: the level.
    """

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    se: np.ndarray
    df: np.ndarray
    p_value: np.ndarray
    block: np.ndarray
    n_eff: np.ndarray
    notes: tuple[str, ...]
    confidence: float


def interval(res: Resampled, confidence: float = 0.95, *, log: bool = False) -> Interval:
    """Bias-corrected studentized intervals and p-values from :func:`resample`.

    Args:
        res: the resampled statistic.
        confidence: two-sided level in (0, 1).
        log: work on log θ (for positive quantities such as a fluctuation) and return the
            bounds exponentiated; the p-value then tests log θ = 0, i.e. θ = 1.

    Returns:
        Interval (``estimate`` is θ̂ itself).

    Example:
        >>> x = np.random.default_rng(1).normal(size=(400, 2))
        >>> iv = interval(resample({"x": x}, lambda m: m.std["x"], n_boot=300), log=True)
        >>> bool(np.all((iv.lower < 1) & (1 < iv.upper)))
        True
    """
    check_settings(confidence=confidence)
    iv = contrast([res], [1.0], confidence, log=log)
    if not log:
        return iv
    return Interval(res.estimate, np.exp(iv.lower), np.exp(iv.upper), iv.se, iv.df, iv.p_value,
                    iv.block, iv.n_eff, iv.notes, confidence)


def contrast(parts, weights, confidence: float = 0.95, *, log: bool = False) -> Interval:
    """Interval for Σᵢ wᵢ θᵢ from independently resampled statistics (e.g. two runs).

    Each part contributes its bias-corrected centre and corrected standard error (see the
    module docstring); the errors add in quadrature and the t quantile takes the
    Welch–Satterthwaite degrees of freedom.

    Args:
        parts: Resampled statistics of the same K effects (independent resamples).
        weights: one weight per part, e.g. (1, −1) for a difference, or regression weights.
        confidence: two-sided level in (0, 1).
        log: combine log θᵢ (positive statistics); results stay on the log scale.

    Returns:
        Interval of the combination (on the log scale when ``log``); ``block`` is the longest
        block of the parts, ``n_eff`` the smallest effective sample.
    """
    if not 0.0 < confidence < 1.0:
        raise StatscopeError(f"confidence={confidence}: expected a level in (0, 1)")
    parts = list(parts)
    weights = [float(w) for w in weights]
    k_out = parts[0].estimate.size
    lo, hi, se_out, df_out, p_out = (np.full(k_out, np.nan) for _ in range(5))
    notes = []
    with quiet():
        plain = [np.log(r.estimate) if log else r.estimate for r in parts]
        est = np.sum([w * p for w, p in zip(weights, plain)], axis=0)
    for k in range(k_out):
        note, pieces = "", []
        for res, w in zip(parts, weights):
            piece = _piece(res, k, log)
            if isinstance(piece, str):
                note = piece
                break
            pieces.append((w, *piece))
        if note:
            notes.append(note)
            continue
        center = sum(w * p[1] for w, *p in pieces)
        var = sum((w * p[2]) ** 2 for w, *p in pieces)
        se = math.sqrt(var)
        den = sum((w * p[2]) ** 4 / p[3] for w, *p in pieces)
        df = var * var / den if den > 0 else float(min(p[3] for _, *p in pieces))
        q = float(t_quantile(0.5 + confidence / 2.0, df))
        if se <= 1e-12 * max(1.0, abs(center)):  # constant replicates: nothing to test
            notes.append("no spread across bootstrap replicates: nothing varies to test")
            continue
        lo[k], hi[k], se_out[k], df_out[k] = center - q * se, center + q * se, se, df
        p_out[k] = float(t_two_sided(center / se, df))
        notes.append("")
    with quiet():
        block = np.max([r.block for r in parts], axis=0)
        block = np.where(np.min([r.block for r in parts], axis=0) == 0, 0, block)
        n_eff = np.min([r.n_eff for r in parts], axis=0)
    return Interval(est, lo, hi, se_out, df_out, p_out, block, n_eff, tuple(notes), confidence)


def _piece(res: Resampled, k: int, log: bool):
    """(θ, bias-corrected centre, corrected se, df) of effect k on the working scale, or why not."""
    t, b = res.n_steps, int(res.block[k])
    est = res.estimate[k]
    reps = res.replicates[:, k]
    finite = reps[np.isfinite(reps)]
    if log:
        finite = finite[finite > 0]
    if b == 0:
        return _too_short(t, t if res.n_valid is None else int(res.n_valid[k]), res.tau[k])
    if not np.isfinite(est) or (log and est <= 0):
        return "not evaluable: the statistic is undefined on the window"
    if finite.size < max(10, reps.size // 2):
        return "not evaluable: too few finite bootstrap replicates"
    y = math.log(est) if log else float(est)
    yr = np.log(finite) if log else finite
    se = float(np.std(yr, ddof=1)) * math.sqrt(t / (t - b)) \
        / math.sqrt(max(1.0 - res.join[k] / b, 0.5))
    level = 0.0 if res.bias is None else float(res.bias[k])
    level = level / est if log else level
    return y, y - (float(np.mean(yr)) - y) - level, se, float(t // b - 1)


def _too_short(t: int, valid: int, tau: float) -> str:
    """Why there is no interval: ``valid`` of the window's ``t`` steps with data, autocorrelation
    time ``tau``."""
    if not np.isfinite(tau):
        return f"too short: {t} steps cannot carry a block-bootstrap interval"
    steps = f"{valid} steps" if valid >= t else f"{valid} steps with data (of the window's {t}),"
    return (f"too short for its autocorrelation: {steps} with an autocorrelation time of "
            f"≈{tau:.1f} steps are an effective sample of ≈{valid / tau:.0f} (an interval needs "
            f"{MIN_EFFECTIVE}); a longer window would do")


def bootstrap_statistic(series: Mapping[str, np.ndarray],
                        statistic: Statistic | Sequence[Statistic], *,
                        confidence: float = 0.95, n_boot: int = 1000, block: int | None = None,
                        seed: int = 0, log: bool = False, groups=None) -> Interval:
    """:func:`resample` then :func:`interval`: the one call most analyses make.

    Example:
        >>> rng = np.random.default_rng(2)
        >>> a = rng.normal(size=(300, 1)); b = 2 * a + rng.normal(size=(300, 1))
        >>> iv = bootstrap_statistic({"a": a, "b": b},
        ...                          lambda m: np.log(m.std["b"] / m.std["a"]), n_boot=300)
        >>> bool(iv.lower[0] > 0), float(iv.p_value[0]) < 0.001
        (True, True)
    """
    check_settings(confidence=confidence, n_boot=n_boot, block=block, seed=seed)
    return interval(resample(series, statistic, n_boot=n_boot, block=block, seed=seed,
                             groups=groups), confidence, log=log)
