"""Multiplicity: adjust a table's p-values so its verdicts hold their level together.

The claims table tests claims × layers × statistics × runs at once; at 95 % each, about one
row in twenty would hold by chance. Holm's step-down procedure controls the family-wise error
rate (the chance of any false verdict) at α under any dependence between the rows; Benjamini–
Hochberg controls the false discovery rate (the expected share of false verdicts among those
declared) under independence or positive dependence, and is less strict.
"""

from __future__ import annotations

import numpy as np

from statscope.errors import StatscopeError

__all__ = ["holm", "benjamini_hochberg", "adjust_p", "ADJUSTMENTS"]

ADJUSTMENTS = ("holm", "bh", "none")
"""Names accepted by :func:`adjust_p`."""


def _ranked(p):
    """p as float64, an all-NaN output of its shape, and the finite entries' indices in
    ascending order of p (the family is the finite entries)."""
    p = np.asarray(p, dtype=np.float64)
    bad = p[np.isfinite(p) & ((p < 0) | (p > 1))] if p.size else p
    if bad.size or np.isinf(p).any():
        shown = bad[:3].tolist() if bad.size else [float(v) for v in p[np.isinf(p)][:3]]
        raise StatscopeError(f"p={shown}: p-values must lie in [0, 1] (NaN for untested rows)")
    ok = np.flatnonzero(np.isfinite(p))
    return p, np.full(p.shape, np.nan), ok[np.argsort(p[ok], kind="stable")]


def holm(p) -> np.ndarray:
    """Holm step-down adjusted p-values; NaN entries stay NaN and do not count in the family.

    The i-th smallest of m p-values becomes max over j ≤ i of min(1, (m − j + 1) · p₍ⱼ₎).

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005]).tolist()
        [0.03, 0.06, 0.06, 0.02]
    """
    p, out, order = _ranked(p)
    m = order.size
    if m:
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN entries stay NaN.

    The i-th smallest of m p-values becomes min over j ≥ i of min(1, m · p₍ⱼ₎ / j).

    Example:
        >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.005]).tolist()
        [0.02, 0.04, 0.04, 0.02]
    """
    p, out, order = _ranked(p)
    m = order.size
    if m:
        scaled = m * p[order] / np.arange(1, m + 1)
        out[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return out


def adjust_p(p, method: str = "holm") -> np.ndarray:
    """Adjusted p-values by ``method``: "holm", "bh" (Benjamini–Hochberg) or "none".

    Raises:
        StatscopeError: an unknown method.
    """
    if method == "holm":
        return holm(p)
    if method == "bh":
        return benjamini_hochberg(p)
    if method == "none":
        return np.asarray(p, dtype=np.float64).copy()
    raise StatscopeError(f"adjust={method!r}: expected one of {', '.join(ADJUSTMENTS)}")
