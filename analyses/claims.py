"""The paper's §4.6 observations as tests: effect size, confidence interval, p-value, verdict.

(a) BN statistics fluctuate more than EN: per neuron log(sd(BN_x)/sd(EN_x)) for x = mean, std;
    layer median.
(b) The BN–EN gap is larger for the mean than for the std: per neuron
    log(mean|BN_mean−EN_mean| / mean|BN_std−EN_std|); layer median.
(c) At small batch size BN_std fluctuates more than BN_mean: in the run with the smallest batch
    size, per neuron log(sd(BN_std)/sd(BN_mean)); layer median. For Gaussian activations sampling
    theory predicts log √((κ−1)/4) = log √0.5 ≈ −0.35, i.e. the opposite; heavy tails (κ > 5)
    or extra noise can reverse it.
(d) The first layer fluctuates most: log of the first layer's median scale-free fluctuation
    (sd/σ̄, σ̄ as in :func:`statscope.analyses.fluctuation`) minus the log of the largest median among the other layers, for BN_mean and BN_std.

Each effect is a natural-log ratio (0 = no difference, positive = the claim's direction). Its
interval is the percentile interval of a moving-block bootstrap over steps (see
:mod:`statscope.analyses.bootstrap`), the p-value the two-sided bootstrap p-value
2·min(P*(θ ≤ 0), P*(θ ≥ 0)) (with the +1 correction), and the verdict "holds" when the interval
lies above 0, "does not hold" when below 0, else "inconclusive".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from statscope import schema as S

from ._data import (FLUCT_STATS, batch_sizes, layer_order, masked, quiet, require, run_name,
                    sigma2_series, stacked)
from ._names import SIGMA2
from .bootstrap import block_bootstrap, percentile_interval, run_windows

__all__ = ["Claims", "ClaimRow", "claims", "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "CLAIMS"]

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive"

CLAIMS = {
    "a": "BN statistics fluctuate more than EN",
    "b": "the BN-EN gap is larger for the mean than for the std",
    "c": "at small batch size BN_std fluctuates more than BN_mean",
    "d": "the first layer fluctuates most",
}
"""The four observations of the paper's §4.6, by letter."""

_GAP_MEAN, _GAP_STD = "gap_mean", "gap_std"


@dataclass(frozen=True)
class ClaimRow:
    """One claim evaluated on one layer of one run.

    Attributes:
        claim: "a", "b", "c" or "d" (see :data:`CLAIMS`).
        run: run name. layer: layer name. statistic: what was compared, e.g. "mean".
        effect: natural-log ratio in the claim's direction (NaN when not evaluable).
        ci_low, ci_high: bootstrap percentile interval of the effect.
        p_value: two-sided bootstrap p-value for effect = 0.
        verdict: "holds", "does not hold" or "inconclusive".
        note: why a row is inconclusive, or a caveat.
    """

    claim: str
    run: str
    layer: str
    statistic: str
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    note: str = ""

    @property
    def description(self) -> str:
        return CLAIMS[self.claim]


@dataclass(frozen=True)
class Claims:
    """The four claims, row per (claim, run, layer, statistic).

    Attributes:
        rows: the ClaimRows. window: the window as text. confidence, n_boot, block: bootstrap
        settings. notes: caveats that apply to every row.
    """

    rows: tuple[ClaimRow, ...]
    window: str
    confidence: float
    n_boot: int
    block: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dataframe(self):
        """The rows as a pandas DataFrame, one column per ClaimRow field plus description."""
        import pandas as pd

        cols = ["claim", "description", "run", "layer", "statistic", "effect", "ci_low",
                "ci_high", "p_value", "verdict", "note"]
        return pd.DataFrame([{c: getattr(r, c) for c in cols} for r in self.rows], columns=cols)

    def verdicts(self, claim: str) -> list[str]:
        """The verdicts of one claim over all its rows."""
        return [r.verdict for r in self.rows if r.claim == claim]


def claims(ds: xr.Dataset, window=200, *, confidence: float = 0.95, n_boot: int = 1000,
           block: int | None = None, seed: int = 0) -> Claims:
    """Evaluate the paper's four §4.6 observations per layer (and per run).

    Args:
        ds: a run or stacked runs. Claims a, b, d are evaluated on every run; c on the run with
            the smallest batch size (``batch_size`` run coord or meta; every run at that size, e.g.
            each seed), inconclusive if unknown.
        window: see :func:`statscope.analyses.select_window`.
        confidence: level of the bootstrap intervals.
        n_boot: bootstrap replicates. block: block length (default ceil(T^(1/3))).
        seed: random seed.

    Returns:
        Claims; ``.rows`` and ``.to_dataframe()``.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> c = claims(demo_run(batch_size=8), n_boot=200)
        >>> c.verdicts("a")
        ['holds', 'holds', 'holds', 'holds']
    """
    require(ds, [*FLUCT_STATS, S.COUNT], "claims")
    windows = run_windows(ds, window)
    sizes = batch_sizes(ds)
    small = set()  # every run at the smallest batch size (e.g. each seed)
    if sizes is not None and np.all(np.isfinite(sizes)) and stacked(ds):
        small = set(np.flatnonzero(sizes == np.min(sizes)).tolist())
    rows: list[ClaimRow] = []
    blocks = set()
    notes = ["bootstrap intervals resample blocks of consecutive steps; effects are natural-log "
             "ratios"]
    for i, w in windows:
        name = run_name(ds, i) if i is not None else run_name(ds)
        mom = _moments(w, n_boot, block, seed)
        blocks.add(mom.block)
        layers = layer_order(w[S.LAYER].values)
        lay = np.asarray(w[S.LAYER].values)
        groups = [np.flatnonzero(lay == L) for L in layers]

        def add(claim, layer, statistic, est, reps, note=""):
            rows.append(_row(claim, name, layer, statistic, est, reps, confidence, note))

        for x in ("mean", "std"):
            bn, en = f"bn_{x}", f"en_{x}"
            est, reps = (_per_layer(np.log(sd[bn] / sd[en]), groups)
                         for sd in (mom.std, mom.std_reps))
            for j, layer in enumerate(layers):
                add("a", layer, x, est[j], reps[:, j])
        est, reps = (_per_layer(np.log(m[_GAP_MEAN] / m[_GAP_STD]), groups)
                     for m in (mom.mean, mom.mean_reps))
        for j, layer in enumerate(layers):
            add("b", layer, "mean gap / std gap", est[j], reps[:, j])
        for x in (S.BN_MEAN, S.BN_STD):
            if len(layers) < 2:
                add("d", layers[0], x, np.nan, np.full(1, np.nan),
                    "needs at least two layers")
                continue
            est, reps = (_first_vs_rest(_per_layer(sd[x] / np.sqrt(m[SIGMA2]), groups))
                         for sd, m in ((mom.std, mom.mean), (mom.std_reps, mom.mean_reps)))
            add("d", layers[0], x, est, reps)
        if (i is None and sizes is not None) or i in small:
            bs = float(sizes[i]) if i is not None else float(sizes)
            est, reps = (_per_layer(np.log(sd[S.BN_STD] / sd[S.BN_MEAN]), groups)
                         for sd in (mom.std, mom.std_reps))
            note = f"batch size {bs:g}" + ("" if bs <= 32 else "; not a small batch")
            for j, layer in enumerate(layers):
                add("c", layer, "bn_std vs bn_mean", est[j], reps[:, j], note)
    if sizes is None or not np.all(np.isfinite(sizes)):
        first = windows[0][1]
        for layer in layer_order(first[S.LAYER].values):
            rows.append(ClaimRow("c", run_name(ds, 0) if stacked(ds) else run_name(ds), layer,
                                 "bn_std vs bn_mean", np.nan, np.nan, np.nan, np.nan,
                                 INCONCLUSIVE, "batch size unknown (no batch_size in meta)"))
    order = {c: k for k, c in enumerate(CLAIMS)}
    rows.sort(key=lambda r: order[r.claim])
    return Claims(tuple(rows), windows[0][1].attrs["window"], confidence, n_boot,
                  tuple(sorted(blocks)), tuple(notes))


def _moments(w: xr.Dataset, n_boot, block, seed):
    series = {s: masked(w, s) for s in FLUCT_STATS}
    series[_GAP_MEAN] = abs(series[S.BN_MEAN] - series[S.EN_MEAN])
    series[_GAP_STD] = abs(series[S.BN_STD] - series[S.EN_STD])
    series[SIGMA2] = sigma2_series(w)
    arrays = {k: v.transpose(S.STEP, S.NEURON).values for k, v in series.items()}
    return block_bootstrap(arrays, n_boot=n_boot, block=block, seed=seed)


def _per_layer(values: np.ndarray, groups) -> np.ndarray:
    """Layer medians over the last axis (neurons): (..., n_layers)."""
    with quiet():
        return np.stack([np.nanmedian(values[..., g], axis=-1) for g in groups], axis=-1)


def _first_vs_rest(medians: np.ndarray) -> np.ndarray:
    """log(first layer) − log(max of the others), over the last axis."""
    with quiet():
        return np.log(medians[..., 0]) - np.log(np.nanmax(medians[..., 1:], axis=-1))


def _row(claim, run, layer, statistic, est, reps, confidence, note) -> ClaimRow:
    est = float(est)
    reps = np.asarray(reps, dtype=float)
    finite = reps[np.isfinite(reps)]
    if not np.isfinite(est) or finite.size < max(10, reps.size // 2):
        return ClaimRow(claim, run, layer, statistic, est, np.nan, np.nan, np.nan, INCONCLUSIVE,
                        note or "not evaluable: too few finite values in the window")
    lo, hi = percentile_interval(finite, confidence)
    p = min(1.0, 2.0 * (min((finite <= 0).sum(), (finite >= 0).sum()) + 1) / (finite.size + 1))
    verdict = HOLDS if lo > 0 else DOES_NOT_HOLD if hi < 0 else INCONCLUSIVE
    return ClaimRow(claim, run, layer, statistic, est, float(lo), float(hi), float(p), verdict, note)
