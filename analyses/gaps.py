"""BN-versus-EN gaps: how far each neuron's batch statistics sit from the pooled EN ones."""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S

from ._data import masked, quiet, require, sigma_bar
from ._names import N_VALID, NOTES
from .window import map_windows

__all__ = ["bn_en_gap"]


def bn_en_gap(ds: xr.Dataset, window=200, *, scale_free: bool = False) -> xr.Dataset:
    """Time-averaged |BN_mean − EN_mean| and |BN_std − EN_std| per neuron.

    Args:
        ds: a run or stacked runs.
        window: see :func:`statscope.analyses.select_window`.
        scale_free: divide by the neuron's σ̄ (see :func:`statscope.analyses.fluctuation`).

    Returns:
        Dataset (neuron,) or (run, neuron), float64 ``mean_gap`` and ``std_gap`` (activation
        units, or σ when scale-free) and int ``n_valid``; attrs window, scale_free, notes.
        Pass it to :func:`statscope.analyses.layer_summary` for per-layer values.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> g = bn_en_gap(demo_run())
        >>> bool((g.mean_gap.sel(neuron=g.unit == 7) > g.std_gap.sel(neuron=g.unit == 7)).all())
        True
    """
    require(ds, [S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD, S.COUNT], "bn_en_gap")
    return map_windows(ds, window, lambda w: _gap(w, scale_free))


def _gap(w: xr.Dataset, scale_free: bool) -> xr.Dataset:
    """:func:`bn_en_gap` of one run's window."""
    with quiet():
        dm = abs(masked(w, S.BN_MEAN) - masked(w, S.EN_MEAN))
        dsd = abs(masked(w, S.BN_STD) - masked(w, S.EN_STD))
        out = {"mean_gap": dm.mean(S.STEP), "std_gap": dsd.mean(S.STEP),
               N_VALID: dm.notnull().sum(S.STEP)}
        if scale_free:
            sigma = sigma_bar(w)
            out["mean_gap"] = out["mean_gap"] / sigma
            out["std_gap"] = out["std_gap"] / sigma
        res = xr.Dataset(out).compute()
    res.attrs = {"window": w.attrs["window"], "scale_free": bool(scale_free), NOTES: []}
    if (res[N_VALID] < w.sizes[S.STEP]).any() and not np.all(res[N_VALID] == 0):
        res.attrs[NOTES] = ["steps where a statistic was missing (count 0 or NaN) were excluded; "
                            "n_valid counts the steps used"]
    return res
