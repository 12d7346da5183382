"""Sampling-theory baseline: how much BN statistics would fluctuate from batch sampling alone.

For a channel whose ``N`` elements per step are i.i.d. with standard deviation σ and kurtosis κ
(non-excess), the batch mean and the batch (population) std fluctuate from step to step by

    sd(μ̂) = σ / √N                       (exact for i.i.d. elements)
    sd(σ̂) ≈ σ · √((κ − 1) / (4N))        (delta method, asymptotic in N)

σ² is estimated per neuron as the window average of ``bn_std² · N/(N−1)`` (unbiased for σ² at
each step), ``1/N`` as the window average of ``1/count``, and κ as the window average of
``bn_kurt`` when the store has it, else 3 (Gaussian) with a note. Assumptions worth stating:

* the elements of a channel within a batch are independent: true for per-sample features of an
  i.i.d.-sampled batch, but not for the N·H·W pixels of a conv channel, where spatial
  correlation makes the baseline a lower bound;
* σ and κ are constant over the window; training drift inflates the observed fluctuation, which
  the ``detrend`` option of :func:`excess_fluctuation` removes to first order;
* the std formula is asymptotic: at N = 4 the population std is biased (E σ̂ < σ) and its
  spread is only roughly captured; ``bn_kurt`` from small batches is biased low (the plug-in
  kurtosis of N values cannot exceed N − 2 + 1/(N − 1)), so κ is underestimated there.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import masked, quiet, require
from ._names import NOTES
from .fluctuation import fluctuation
from .window import map_windows

__all__ = ["sampling_baseline", "excess_fluctuation"]

_ASYMPTOTIC = ("sd(bn_std) uses the asymptotic delta-method formula σ·√((κ−1)/(4N)); at small N "
               "it is approximate")


def sampling_baseline(ds: xr.Dataset, window=200) -> xr.Dataset:
    """Expected step-to-step sd of ``bn_mean`` and ``bn_std`` under batch sampling alone.

    Args:
        ds: a run (step, neuron) or stacked runs (run, step, neuron).
        window: see :func:`statscope.analyses.select_window`.

    Returns:
        Dataset (neuron,) or (run, neuron), float64: ``bn_mean`` and ``bn_std`` (expected sd, in
        activation units), ``sigma`` (σ estimate), ``kappa`` (κ used), ``n`` (mean count).
        attrs: window, kappa_source ("bn_kurt" or "assumed 3"), notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> b = sampling_baseline(demo_run(batch_size=16), window=200)
        >>> float(b.n[0])
        16.0
    """
    require(ds, [S.BN_STD, S.COUNT], "sampling_baseline")
    return map_windows(ds, window, _baseline)


def _baseline(w: xr.Dataset) -> xr.Dataset:
    """:func:`sampling_baseline` of one run's window."""
    n = w[S.COUNT].astype(np.float64).where(w[S.COUNT] > 0)
    std = masked(w, S.BN_STD)
    notes = [_ASYMPTOTIC]
    with quiet():
        small = bool((w[S.COUNT] == 1).any())
        sigma2 = (std * std * n / (n - 1)).where(n > 1).mean(S.STEP)
        inv_n = (1.0 / n).where(std.notnull()).mean(S.STEP)
        n_mean = n.where(std.notnull()).mean(S.STEP)
        if S.BN_KURT in w.data_vars:
            kappa = masked(w, S.BN_KURT).mean(S.STEP)
            source = S.BN_KURT
            notes.append("κ is the window average of the recorded bn_kurt; with small batches it "
                         "is biased low")
        else:
            kappa = xr.full_like(sigma2, 3.0)
            source = "assumed 3"
            notes.append("the store has no bn_kurt: κ = 3 (Gaussian) assumed for sd(bn_std)")
    if small:
        notes.append("steps with count 1 carry no spread information and were excluded")
    out = xr.Dataset({
        S.BN_MEAN: np.sqrt(sigma2 * inv_n),
        S.BN_STD: np.sqrt(sigma2 * (kappa - 1.0) / 4.0 * inv_n),
        "sigma": np.sqrt(sigma2), "kappa": kappa, "n": n_mean,
    }).compute()
    out.attrs = {"window": w.attrs["window"], "kappa_source": source, NOTES: notes}
    return out


def excess_fluctuation(ds: xr.Dataset, window=200, *, detrend: bool = False) -> xr.Dataset:
    """Observed fluctuation of ``bn_mean``/``bn_std`` divided by the sampling-theory baseline.

    A ratio near 1 means batch sampling explains the fluctuation; above 1, something else (the
    changing weights, data order, drift) adds to it.

    Args:
        ds: a run or stacked runs.
        window: see :func:`statscope.analyses.select_window`.
        detrend: compare the detrended fluctuation (removes slow drift inside the window).

    Returns:
        Dataset (neuron,) or (run, neuron), float64 ratios ``bn_mean`` and ``bn_std`` with
        the coords of :func:`fluctuation`; attrs: window, detrend, kappa_source, notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> r = excess_fluctuation(demo_run(n_steps=2000, batch_size=64), window=2000)
        >>> bool(abs(float(r.bn_mean.median()) - 1) < 0.1)
        True
    """
    obs = fluctuation(ds, window, detrend=detrend)
    base = sampling_baseline(ds, window)
    if (base["n"] < 2).any():
        raise StatscopeError("excess_fluctuation: some neurons have fewer than 2 elements per "
                             "step (count < 2); the baseline is undefined there")
    with quiet():
        out = xr.Dataset({s: obs[s] / base[s] for s in (S.BN_MEAN, S.BN_STD)})
    out.attrs = {"window": obs.attrs["window"], "detrend": bool(detrend),
                 "kappa_source": base.attrs["kappa_source"],
                 NOTES: [*obs.attrs[NOTES], *base.attrs[NOTES], *_constant_notes(base)]}
    return out


def _constant_notes(base: xr.Dataset) -> list[str]:
    """Which layers have neurons whose baseline is 0: a batch std of 0 at every step of the
    window (an input constant over each batch: a dead unit, a pruned channel), where the ratio
    is undefined (NaN, or inf when the mean still moved)."""
    zero = base["sigma"] == 0
    if not bool(zero.any()):
        return []
    layers = np.broadcast_to(zero[S.LAYER].values, zero.shape)[zero.values] \
        if S.LAYER in zero.coords else []
    where = f" (layers {', '.join(repr(str(x)) for x in dict.fromkeys(layers))})" \
        if len(layers) else ""
    return [f"{int(zero.sum())} neurons{where} had bn_std 0 at every step of the window (an "
            "input constant over each batch): no batch-sampling fluctuation to compare with, "
            "their excess is undefined (NaN; inf where the batch mean still moved)"]
