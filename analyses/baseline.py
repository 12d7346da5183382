"""Sampling-theory baseline: how much BN statistics would fluctuate from batch sampling alone.

For a channel whose ``N`` elements per step are i.i.d. with standard deviation σ and kurtosis κ
(non-excess), the batch mean and the batch (population) std fluctuate from step to step by

    sd(μ̂) = σ / √N                                  (exact for i.i.d. elements)
    sd(σ̂) ≈ σ · √((N − 1)κ − N + 3) / (2N)          (delta method on the exact Var(σ̂²))

which is σ·√((κ − 1)/(4N)) for large N, and σ/√(2N) at every N for κ = 3. σ² is estimated per
neuron as the window average of ``bn_std² · N/(N−1)`` (unbiased for σ² at each step), the
N-dependent factor as its window average over each step's ``count``, and κ from ``bn_kurt``
when the store has it (:func:`_kappa`), else 3 (Gaussian) with a note. Assumptions worth
stating:

* the elements of a channel within a batch are independent: true for per-sample features of an
  i.i.d.-sampled batch, but not for the N·H·W pixels of a conv channel, where spatial
  correlation makes the baseline a lower bound;
* σ and κ are constant over the window; training drift inflates the observed fluctuation, which
  the ``detrend`` option of :func:`excess_fluctuation` removes to first order;
* the delta method is approximate at small N: with κ = 3 it overstates sd(σ̂) by 5 % at
  N = 4 and 2 % at N = 8; for heavy tails by more (exponential elements at N = 4: 0.64σ against
  0.47σ by simulation), for light tails it understates it;
* ``bn_kurt``, the plug-in kurtosis of each batch, is biased low at small N (it cannot exceed
  N − 2 + 1/(N − 1): 1.8 on average for Gaussian batches of 4), so κ is not its window mean but
  the ratio of unbiased estimates of the fourth central moment and of σ⁴ from each step's
  ``bn_std`` and ``bn_kurt``, pooled over the window; batches of 2 or 3 elements cannot estimate
  it at all, and κ = 3 is assumed there with a note.
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

_ASYMPTOTIC = ("sd(bn_std) uses the delta-method formula σ·√((N−1)κ−N+3)/(2N); at small N it is "
               "approximate")
_KAPPA = ("κ from the recorded bn_kurt, corrected for the batch size: unbiased estimates of the "
          "fourth central moment and of σ⁴ from each step's bn_std and bn_kurt, pooled over the "
          "window")


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
        # a run stacked with runs that recorded bn_kurt (open_runs) gets an all-NaN one
        if S.BN_KURT in w.data_vars and bool(w[S.BN_KURT].notnull().any()):
            kappa, said = _kappa(n, std * std, masked(w, S.BN_KURT))
            source = S.BN_KURT
            notes += [_KAPPA, *said]
        else:
            kappa = xr.full_like(sigma2, 3.0)
            source = "assumed 3"
            notes.append("the store has no bn_kurt: κ = 3 (Gaussian) assumed for sd(bn_std)")
        # Var(σ̂²) = σ⁴(N−1)((N−1)κ − N + 3)/N³ exactly; the delta method divides by 4·E σ̂²
        factor = (((n - 1) * kappa - n + 3) / (4 * n * n)).where(std.notnull()).mean(S.STEP)
    if small:
        notes.append("steps with count 1 carry no spread information and were excluded")
    out = xr.Dataset({
        S.BN_MEAN: np.sqrt(sigma2 * inv_n),
        S.BN_STD: np.sqrt(sigma2 * factor),
        "sigma": np.sqrt(sigma2), "kappa": kappa, "n": n_mean,
    }).compute()
    out.attrs = {"window": w.attrs["window"], "kappa_source": source, NOTES: notes}
    return out


def _kappa(n: xr.DataArray, m2: xr.DataArray, kurt: xr.DataArray) -> tuple[xr.DataArray,
                                                                          list[str]]:
    """Per neuron, the kurtosis κ = μ₄/σ⁴ of the elements, from the steps' batch moments.

    For N i.i.d. elements the batch's central moments m₂ = ``bn_std²`` and m₄ = ``bn_kurt``·m₂²
    (divisor N) have E m₄ = a μ₄ + b σ⁴ and E m₂² = c μ₄ + d σ⁴, with a = (N−1)(N²−3N+3)/N³,
    b = 3(N−1)(2N−3)/N³, c = (N−1)²/N³, d = (N−1)(N²−2N+3)/N³; solving per step gives unbiased
    estimates of μ₄ and σ⁴ (the determinant ad − bc = (N−1)²(N−2)(N−3)/N⁴ vanishes below
    N = 4), whose window means give κ. Neurons without such steps get κ = 3; an estimate below
    1, the least any distribution has (sampling noise of a short window), is raised to 1.

    Args:
        n: (step, neuron) elements per step, NaN where none.
        m2, kurt: (step, neuron) ``bn_std²`` and ``bn_kurt``, NaN where not valid.

    Returns:
        (neuron,) κ, float64, and the notes on neurons where it was assumed or raised.
    """
    m4 = kurt * m2 * m2
    n3, det = n ** 3, (n - 1) ** 2 * (n - 2) * (n - 3) / n ** 4
    a, b = (n - 1) * (n * n - 3 * n + 3) / n3, 3 * (n - 1) * (2 * n - 3) / n3
    c, d = (n - 1) ** 2 / n3, (n - 1) * (n * n - 2 * n + 3) / n3
    ok = (n >= 4) & m4.notnull() & m2.notnull()
    mu4 = ((d * m4 - b * m2 * m2) / det).where(ok).mean(S.STEP)
    sigma4 = ((a * m2 * m2 - c * m4) / det).where(ok).mean(S.STEP)
    kappa = mu4 / sigma4
    notes = []
    unknown = kappa.isnull() | (sigma4 <= 0)
    if bool(unknown.any()):
        notes.append(f"{int(unknown.sum())} neurons had no step of 4 or more elements with a "
                     "finite bn_kurt and spread, from which κ can be estimated: κ = 3 (Gaussian) "
                     "assumed for them")
    low = ~unknown & (kappa < 1)
    if bool(low.any()):
        notes.append(f"{int(low.sum())} neurons had an estimated κ below 1 (the window is too "
                     "short for it): raised to 1, the least any distribution has")
    return kappa.where(~unknown, 3.0).clip(min=1.0), notes


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
