"""The paper's §4.6 observations as tests: effect, interval, p-values, verdict; pooled over seeds.

(a) BN statistics fluctuate more than EN: per neuron log(sd(BN_x)/sd(EN_x)) for x = mean, std;
    layer median.
(b) The BN–EN gap is larger for the mean than for the std: per neuron
    log(mean|BN_mean−EN_mean| / mean|BN_std−EN_std|); layer median.
(c) At small batch size BN_std fluctuates more than BN_mean: in the runs with the smallest batch
    size of their model, per neuron log(sd(BN_std)/sd(BN_mean)); layer median. For Gaussian
    activations sampling theory predicts log √((κ−1)/4) = log √0.5 ≈ −0.35, i.e. the opposite;
    heavy tails (κ > 5) or extra noise can reverse it.
(d) The first layer fluctuates most: log of the first layer's median scale-free fluctuation
    (sd/σ̄, σ̄ as in :func:`statscope.analyses.fluctuation`) minus the log of the largest median
    among the other layers, for BN_mean and BN_std.

Each effect is a natural-log ratio (0 = no difference, positive = the claim's direction). Its
interval and two-sided p-value come from the block bootstrap of
:mod:`statscope.analyses.resampling` (block length from the effect's own autocorrelation,
bias-corrected studentized interval; "too short" when the window cannot carry one). The
p-values of the whole table are adjusted together (Holm by default,
:mod:`statscope.analyses.multiplicity`), and the verdict is "holds" when the adjusted p-value is
below 1 − confidence and the effect is positive, "does not hold" when it is below and the effect
negative, else "inconclusive" (with the reason in ``note``). :meth:`Claims.pooled` then judges
each configuration on its seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from statscope import schema as S

from ._data import FLUCT_STATS, Layers, quiet, require
from ._names import SIGMA2
from .bootstrap import window_series
from .multiplicity import adjust_p
from .intervals import bootstrap_statistic
from .resampling import MIN_EFFECTIVE, Moments, check_settings
from .seeds import MODEL_KEYS, between_seeds, layer_set, run_configs
from ._claim_notes import USES, compared_with, ran_note, steps_with_values, why
from ._compute import run_tasks
from .runs import split_runs
from .window import RunWindow, run_windows

__all__ = ["Claims", "ClaimRow", "PooledClaims", "PooledRow", "claims", "HOLDS",
           "DOES_NOT_HOLD", "INCONCLUSIVE", "CLAIMS"]

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
_SERIES = (*FLUCT_STATS, _GAP_MEAN, _GAP_STD, SIGMA2)
SMALL_BATCH = 32
"""Claim (c) is about small batches; a smallest batch size above this gets a note."""


@dataclass(frozen=True)
class ClaimRow:
    """One claim evaluated on one layer of one run.

    Attributes:
        claim: "a", "b", "c" or "d" (see :data:`CLAIMS`).
        run: run name. layer: layer name. statistic: what was compared, e.g. "mean".
        effect: natural-log ratio in the claim's direction (NaN when not evaluable).
        ci_low, ci_high: bias-corrected block-bootstrap interval of the effect.
        p_value: two-sided p-value for effect = 0, unadjusted.
        p_adjusted: p_value adjusted over the whole table (see ``Claims.adjust``).
        verdict: "holds", "does not hold" or "inconclusive".
        note: why a row is inconclusive, or a caveat.
        config: the run's configuration without its seed (e.g. "batch size 4").
        seed: the run's seed, or None.
        block: bootstrap block length in steps (0: window too short for an interval).
        n_eff: effective sample size of the effect, steps / autocorrelation time.
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
    p_adjusted: float = float("nan")
    config: str = ""
    seed: object = None
    block: int = 0
    n_eff: float = float("nan")

    @property
    def description(self) -> str:
        return CLAIMS[self.claim]


@dataclass(frozen=True)
class PooledRow:
    """One claim on one layer of one configuration, judged over its seeds.

    Attributes:
        claim, config, layer, statistic: as in :class:`ClaimRow`.
        n_runs: seeds pooled; n_tested: those with a within-run test (an interval);
        n_holds, n_fails: how many hold / do not hold.
        effect: mean effect over seeds. ci_low, ci_high: t interval of that mean over seeds
            (with one seed: that run's own interval).
        verdict: "holds" when every seed holds and the between-seed interval lies above 0
            (one seed: its verdict), "does not hold" likewise below, else "inconclusive".
        note: why, when inconclusive. runs: the runs pooled.
    """

    claim: str
    config: str
    layer: str
    statistic: str
    n_runs: int
    n_tested: int
    n_holds: int
    n_fails: int
    effect: float
    ci_low: float
    ci_high: float
    verdict: str
    note: str = ""
    runs: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return CLAIMS[self.claim]

    @property
    def seeds_text(self) -> str:
        """How the seeds' own verdicts went, e.g. "3/3 hold" or "2 hold, 1 inconclusive, of 3"."""
        n = self.n_runs
        if self.n_tested == 0:
            return f"0 of {n} testable"
        if self.n_holds == n:
            return f"{n}/{n} hold"
        if self.n_fails == n:
            return f"{n}/{n} do not hold"
        rest = n - self.n_holds - self.n_fails
        parts = [f"{k} {w}" for k, w in ((self.n_holds, "hold"), (self.n_fails, "do not"),
                                         (rest, "inconclusive")) if k]
        return ", ".join(parts) + f", of {n}"


@dataclass(frozen=True)
class PooledClaims:
    """The claims per configuration over seeds; ``rows`` and ``to_dataframe()``."""

    rows: tuple[PooledRow, ...]
    window: str
    confidence: float

    def to_dataframe(self):
        """One row per PooledRow: claim, description, config, layer, statistic, seeds, n_runs,
        effect, ci_low, ci_high, verdict, note."""
        import pandas as pd

        cols = ["claim", "description", "config", "layer", "statistic", "seeds_text", "n_runs",
                "effect", "ci_low", "ci_high", "verdict", "note"]  # n_runs: seeds pooled
        df = pd.DataFrame([{c: getattr(r, c) for c in cols} for r in self.rows], columns=cols)
        return df.rename(columns={"seeds_text": "seeds"})


@dataclass(frozen=True)
class Claims:
    """The four claims, row per (claim, run, layer, statistic).

    Attributes:
        rows: the ClaimRows. window: the window as text. confidence, n_boot: bootstrap
        settings. block: the block lengths used. notes: caveats that apply to every row.
        adjust: how p-values were adjusted over the table ("holm", "bh" or "none").
    """

    rows: tuple[ClaimRow, ...]
    window: str
    confidence: float
    n_boot: int
    block: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())
    adjust: str = "holm"

    def to_dataframe(self):
        """The rows as a pandas DataFrame, one column per ClaimRow field plus description."""
        import pandas as pd

        cols = ["claim", "description", "run", "config", "seed", "layer", "statistic", "effect",
                "ci_low", "ci_high", "p_value", "p_adjusted", "verdict", "note", "block", "n_eff"]
        return pd.DataFrame([{c: getattr(r, c) for c in cols} for r in self.rows], columns=cols)

    def verdicts(self, claim: str) -> list[str]:
        """The verdicts of one claim over all its rows."""
        return [r.verdict for r in self.rows if r.claim == claim]

    def pooled(self) -> PooledClaims:
        """Each (configuration, claim, layer, statistic) judged over its seeds.

        Example:
            >>> from statscope.analyses._demo import demo_run
            >>> c = claims({"s0": demo_run(seed=0), "s1": demo_run(seed=1)}, n_boot=200)
            >>> [(r.layer, r.statistic, r.seeds_text) for r in c.pooled().rows][:2]
            [('fc1', 'mean', '2/2 hold'), ('fc2', 'mean', '2/2 hold')]
        """
        groups: dict[tuple, list[ClaimRow]] = {}
        for r in self.rows:
            groups.setdefault((r.config, r.claim, r.layer, r.statistic), []).append(r)
        out = []
        for (config, claim, layer, stat), rows in groups.items():
            n = len(rows)
            tested = sum(np.isfinite(r.p_value) for r in rows)
            k_hold = sum(r.verdict == HOLDS for r in rows)
            k_fail = sum(r.verdict == DOES_NOT_HOLD for r in rows)
            names = tuple(r.run for r in rows)
            if n == 1:
                r = rows[0]
                out.append(PooledRow(claim, config, layer, stat, 1, tested, k_hold, k_fail,
                                     r.effect, r.ci_low, r.ci_high, r.verdict, r.note, names))
                continue
            mean, lo, hi, _ = between_seeds([r.effect for r in rows], self.confidence)
            if k_hold == n and lo > 0:
                verdict, note = HOLDS, ""
            elif k_fail == n and hi < 0:
                verdict, note = DOES_NOT_HOLD, ""
            else:
                verdict = INCONCLUSIVE
                if k_hold == n or k_fail == n:
                    note = "every seed agrees, but the between-seed interval includes 0"
                elif tested < n:
                    why = next(r.note for r in rows if not np.isfinite(r.p_value))
                    note = f"{n - tested} of {n} seeds without a test: {why}"
                else:
                    votes = PooledRow(claim, config, layer, stat, n, tested, k_hold, k_fail,
                                      mean, lo, hi, verdict).seeds_text
                    note = f"the seeds differ ({votes})"
            out.append(PooledRow(claim, config, layer, stat, n, tested, k_hold, k_fail, mean,
                                 lo, hi, verdict, note, names))
        return PooledClaims(tuple(out), self.window, self.confidence)


def claims(ds, window=200, *, confidence: float = 0.95, n_boot: int = 1000,
           block: int | None = None, seed: int = 0, adjust: str = "holm",
           scheduler=None) -> Claims:
    """Evaluate the paper's four §4.6 observations per layer (and per run).

    Args:
        ds: a run, stacked runs, or a mapping name -> run (runs may differ in layers). Claims
            a, b, d are evaluated on every run; c on the runs with the smallest batch size of
            their model (every seed at that size), inconclusive when the batch size is unknown.
        window: see :func:`statscope.analyses.select_window` (each run's own window).
        confidence: level of the intervals; 1 − confidence is the level of the verdicts.
        n_boot: bootstrap replicates. block: one block length for every effect (default: per
            effect from the data).
        seed: random seed.
        adjust: "holm" (family-wise), "bh" (false discovery rate) or "none", over all rows.
        scheduler: None to compute here; a dask scheduler (e.g. a ``distributed.Client``) to
            bootstrap each run as a task of one graph on it (same numbers).

    Returns:
        Claims; ``.rows``, ``.to_dataframe()``, ``.pooled()``.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> c = claims(demo_run(batch_size=8), n_boot=200)
        >>> c.verdicts("a")
        ['holds', 'holds', 'holds', 'holds']
    """
    check_settings(confidence=confidence, n_boot=n_boot, block=block, seed=seed)
    adjust_p([], adjust)
    parts = split_runs(ds)
    for _, one, _ in parts:
        require(one, [*FLUCT_STATS, S.COUNT], "claims")
    windows = run_windows(ds, window, load=scheduler is None)
    configs = run_configs(windows)
    small = _smallest_batch(windows)
    per_run = run_tasks([(_rows_of, (w.name, w.data, w.meta, config, w.name in small,
                                     confidence, n_boot, block, seed))
                         for w, config in zip(windows, configs)], scheduler)
    raw: list[ClaimRow] = [r for rows in per_run for r in rows]
    blocks = {r.block for r in raw if r.block}
    rows = _judge(raw, adjust, confidence)
    order = {c: k for k, c in enumerate(CLAIMS)}
    rows.sort(key=lambda r: order[r.claim])
    notes = ["effects are natural-log ratios; intervals from a block bootstrap over steps with "
             "the block length chosen from each effect's autocorrelation",
             f"verdicts use p-values adjusted over all {sum(np.isfinite(r.p_value) for r in rows)}"
             f" tested rows ({_ADJUST_TEXT[adjust]})"]
    return Claims(tuple(rows), windows[0].data.attrs["window"], confidence, n_boot,
                  tuple(sorted(blocks)), tuple(notes), adjust)


_ADJUST_TEXT = {"holm": "Holm, family-wise error rate", "bh": "Benjamini-Hochberg, false "
                "discovery rate", "none": "no adjustment"}


def _smallest_batch(windows) -> set[str]:
    """Names of the runs at the smallest batch size among runs of the same model and layers
    (a learning rate scaled with the batch size does not make another model)."""
    groups: dict[tuple, list] = {}
    for w in windows:
        bs = w.meta.get(S.META_BATCH_SIZE)
        if bs is None:
            continue
        key = (layer_set(w.data),
               *(_hashable(w.meta.get(k)) for k in MODEL_KEYS))
        groups.setdefault(key, []).append((float(bs), w.name))
    out = set()
    for members in groups.values():
        low = min(b for b, _ in members)
        out |= {name for b, name in members if b == low}
    return out


def _hashable(v):
    return v if isinstance(v, (str, int, float, type(None))) else repr(v)


def _rows_of(name, data, meta, config, small, confidence, n_boot, block, seed):
    """:func:`_run_rows` of one run given as its parts (a dask task reads ``data`` itself)."""
    return _run_rows(RunWindow(name, data, meta), config, small, confidence, n_boot, block, seed)


def _run_rows(w, config: str, small: bool, confidence, n_boot, block, seed) -> list[ClaimRow]:
    """Unadjusted rows of one run: every effect from one bootstrap of its window."""
    data = w.data
    layers = Layers.of(data)
    names = layers.names
    bs = w.meta.get(S.META_BATCH_SIZE)
    specs: list[tuple[str, str, str, str]] = []  # claim, layer, statistic, note
    specs += [("a", layer, x, "") for x in ("mean", "std") for layer in names]
    specs += [("b", layer, "mean gap / std gap", "") for layer in names]
    if small:
        caveat = f"batch size {float(bs):g}" + ("" if float(bs) <= SMALL_BATCH
                                                 else "; not a small batch")
        specs += [("c", layer, "bn_std vs bn_mean", caveat) for layer in names]
    if len(names) >= 2:
        specs += [("d", names[0], x, "") for x in (S.BN_MEAN, S.BN_STD)]

    def ratio(a: str, b: str):
        def f(m: Moments) -> np.ndarray:
            with quiet():
                return layers.median(np.log(m.std[a] / m.std[b]))
        return f

    def gaps(m: Moments) -> np.ndarray:
        gm, gs = m.mean[_GAP_MEAN], m.mean[_GAP_STD]
        with quiet():
            return layers.median(np.where((gm > 0) & (gs > 0), np.log(gm / gs), np.nan))

    def first(x: str):
        def f(m: Moments) -> np.ndarray:
            with quiet():
                med = layers.median(m.std[x] / np.sqrt(m.mean[SIGMA2]))
                return (np.log(med[..., 0]) - np.log(np.nanmax(med[..., 1:], axis=-1)))[..., None]
        return f

    statistic = [ratio(S.BN_MEAN, S.EN_MEAN), ratio(S.BN_STD, S.EN_STD), gaps]
    if small:
        statistic.append(ratio(S.BN_STD, S.BN_MEAN))
    if len(names) >= 2:
        statistic += [first(S.BN_MEAN), first(S.BN_STD)]

    series = window_series(data, _SERIES)
    iv = bootstrap_statistic(series, statistic, confidence=confidence, n_boot=n_boot,
                             block=block, seed=seed, groups=layers.ordinal)
    rows = []
    run_seed = w.meta.get(S.META_SEED)
    count = np.asarray(data[S.COUNT].values) > 0
    steps = int(count.any(axis=1).sum())  # of the window, where any layer ran
    for k, (claim, layer, stat, caveat) in enumerate(specs):
        cols = layers.index[names.index(layer)]
        ran = int(count[:, cols].any(axis=1).sum())
        # the steps the effect can use: the layer ran and its statistics are finite
        finite = steps_with_values(series, USES[claim][stat] if claim != "d" else (stat,), cols)
        evaluable = finite >= MIN_EFFECTIVE
        why_not = why(claim, stat, iv.notes[k], series, layers, layer) \
            if iv.notes[k] and evaluable else ""
        if claim == "d":
            caveat = compared_with(series[stat], layers, steps)
        note = "; ".join(n for n in (caveat, ran_note(finite, ran, steps), why_not) if n)
        est, lo, hi, p = (float(v[k]) for v in (iv.estimate, iv.lower, iv.upper, iv.p_value))
        if not evaluable:
            est = lo = hi = p = np.nan
        rows.append(ClaimRow(claim, w.name, layer, stat, est, lo, hi, p, INCONCLUSIVE, note,
                             config=config, seed=run_seed, block=int(iv.block[k]),
                             n_eff=float(iv.n_eff[k])))
    if not small and bs is None:
        rows += [ClaimRow("c", w.name, layer, "bn_std vs bn_mean", np.nan, np.nan, np.nan, np.nan,
                          INCONCLUSIVE, "batch size unknown (no batch_size in meta)",
                          config=config, seed=run_seed) for layer in names]
    if len(names) < 2:
        rows += [ClaimRow("d", w.name, names[0], x, np.nan, np.nan, np.nan, np.nan, INCONCLUSIVE,
                          "needs at least two layers", config=config, seed=run_seed)
                 for x in (S.BN_MEAN, S.BN_STD)]
    return rows


def _judge(rows: list[ClaimRow], adjust: str, confidence: float) -> list[ClaimRow]:
    """Adjust the p-values over the table and give each row its verdict."""
    alpha = 1.0 - confidence
    p_adj = adjust_p([r.p_value for r in rows], adjust)
    out = []
    for r, q in zip(rows, p_adj):
        verdict, note = INCONCLUSIVE, r.note
        if np.isfinite(q) and q < alpha:
            verdict = HOLDS if r.ci_low > 0 else DOES_NOT_HOLD if r.ci_high < 0 else INCONCLUSIVE
        elif np.isfinite(q) and (r.ci_low > 0 or r.ci_high < 0):
            note = "; ".join(n for n in (note, f"significant only before the {adjust} "
                                               f"adjustment") if n)
        elif np.isfinite(q):
            note = "; ".join(n for n in (note, "the interval includes 0") if n)
        out.append(ClaimRow(r.claim, r.run, r.layer, r.statistic, r.effect, r.ci_low, r.ci_high,
                            r.p_value, verdict, note, float(q), r.config, r.seed, r.block,
                            r.n_eff))
    return out
