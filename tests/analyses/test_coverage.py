"""Calibration on simulated autocorrelated series with known truth.

Recorded statistics are AR-like (lag-1 autocorrelation 0.6-0.9 on real runs), so intervals and
tests are checked on AR(1) series: x_t = φ x_{t-1} + √(1-φ²) e_t, stationary sd exactly 1.
Each batch of series is one "layer" of neurons, as the analyses see a run; every neuron's
interval is one trial. The truth is the stationary sd (1), not the window's own sd.
"""

import numpy as np
import pytest

from statscope.analyses import bootstrap_statistic, compare_statistics, fluctuation_ci
from statscope.analyses.scaling import runs_slope
from statscope import schema as S

import xarray as xr


def ar1(rng, t, n, phi, *, c=0.0):
    """(t, n) AR(1) series with unit stationary sd; with ``c``, a second (t, n) array whose
    innovations correlate c with the first's (same φ: cross-correlation c·φ^|k|)."""
    e = rng.standard_normal((2, t, n))
    e[1] = c * e[0] + np.sqrt(1 - c * c) * e[1]
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    s = np.sqrt(1 - phi * phi)
    for k in range(1, t):
        x[:, k] = phi * x[:, k - 1] + s * e[:, k]
    return x if c else x[0]


def _coverage(t, phi, n_series, *, seed0=0):
    hits, short = [], 0
    for rep in range(n_series // 100):
        x = ar1(np.random.default_rng(seed0 + rep), t, 100, phi)
        iv = bootstrap_statistic({"x": x}, lambda m: m.std["x"], n_boot=999, seed=rep,
                                 groups=np.zeros(100, int), log=True)
        ok = np.isfinite(iv.lower)
        short += int((~ok).sum())
        hits += list((iv.lower[ok] <= 1.0) & (1.0 <= iv.upper[ok]))
    return (np.mean(hits) if hits else np.nan), short / n_series


def test_std_interval_holds_its_level_at_moderate_autocorrelation():
    # The representative coverage check that runs in CI: 1,000 intervals, MC sd 0.7 points.
    cover, short = _coverage(200, 0.5, 1000)
    assert short == 0
    assert 0.92 <= cover <= 0.98


@pytest.mark.slow
@pytest.mark.parametrize("t", [200, 2000])
@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_std_interval_holds_its_level(t, phi):
    cover, short = _coverage(t, phi, 2000 if t == 200 else 1000, seed0=100)
    if short > 0.9:  # the method says the series is too short for its autocorrelation
        return
    assert 0.92 <= cover <= 0.98, (cover, short)


@pytest.mark.slow
def test_too_strong_autocorrelation_for_the_window_is_inconclusive():
    # φ = 0.97 at T = 200: effective sample ≈ 3; an interval would cover ~2/3 of the time.
    _, short = _coverage(200, 0.97, 500)
    assert short > 0.9


@pytest.mark.slow
def test_layer_median_interval_from_fluctuation_ci_holds_its_level():
    # End to end through fluctuation_ci: 40 "layers" of 4 AR(1) neurons per run, 10 runs.
    hits = []
    for rep in range(10):
        rng = np.random.default_rng(500 + rep)
        x = ar1(rng, 200, 160, 0.5)
        ds = _run({S.BN_MEAN: x, S.BN_STD: 1 + 0.1 * rng.random((200, 160)),
                   S.EN_MEAN: rng.standard_normal((200, 160)),
                   S.EN_STD: 1 + 0.1 * rng.random((200, 160))}, layers=40)
        ci = fluctuation_ci(ds, "all", n_boot=999, seed=rep).bn_mean.sel(quantity="median")
        # truth: the median over 4 neurons of their sd estimates, centred by the sd 1 of each
        hits += list((ci.sel(bound="lower") <= 1.0) & (1.0 <= ci.sel(bound="upper")))
    assert 0.91 <= np.mean(hits) <= 0.99


def _run(stats, *, layers=1, count=16):
    t, n = next(iter(stats.values())).shape
    per = n // layers
    names = [f"l{i}" for i in range(layers)]
    dims = (S.STEP, S.NEURON)
    data = {k: (dims, np.asarray(v, np.float64)) for k, v in stats.items()}
    data[S.COUNT] = (dims, np.full((t, n), count, np.int64))
    return xr.Dataset(data, coords={
        S.STEP: np.arange(t), S.LAYER: (S.NEURON, np.repeat(names, per)),
        S.UNIT: (S.NEURON, np.tile(np.arange(per), layers)),
        S.GROUP: (S.NEURON, np.zeros(n, int))}, attrs={S.ATTR_META: {S.META_BATCH_SIZE: count}})


def _pairs(t, phi, c, ratio, n, seed):
    a, b = ar1(np.random.default_rng(seed), t, n, phi, c=c)
    rng = np.random.default_rng(seed + 1)
    return _run({S.BN_MEAN: ratio * a, S.EN_MEAN: b,
                 S.BN_STD: 1 + 0.1 * rng.random((t, n)), S.EN_STD: 1 + 0.1 * rng.random((t, n))})


def _theory_power(t, phi, c, ratio, df):
    """Asymptotic power of the two-sided t test of log(sd ratio) = 0 for Gaussian AR(1) pairs
    with a common φ: Var log(s_a/s_b) = (1 − c²)(1 + φ²) / (T (1 − φ²))."""
    from scipy import stats

    se = np.sqrt((1 - c * c) * (1 + phi * phi) / (t * (1 - phi * phi)))
    q = stats.t.ppf(0.975, df)
    z = np.log(ratio) / se
    return float(np.mean(stats.norm.sf(q - z) + stats.norm.cdf(-q - z)))


@pytest.mark.parametrize("ratio", [1.0, 1.1])
def test_paired_test_size_and_power_on_correlated_ar1_pairs(ratio):
    # The case: pairs correlated 0.9 (bn_mean and en_mean of one neuron), here also
    # autocorrelated (φ = 0.5). Size must be 5 %; power must match the asymptotic theory.
    t, phi, c = 200, 0.5, 0.9
    p, df = [], []
    for rep in range(8):
        r = compare_statistics(_pairs(t, phi, c, ratio, 100, 10 * rep), S.BN_MEAN, S.EN_MEAN,
                               "all", n_boot=499, seed=rep)
        p += list(r.p_value.values)
        df += list(t // r.block.values - 1)
    rejected = np.mean(np.asarray(p) < 0.05)
    if ratio == 1.0:
        assert 0.025 <= rejected <= 0.08
    else:
        theory = _theory_power(t, phi, c, ratio, np.asarray(df))
        assert 0.45 <= theory <= 0.75  # the setting discriminates
        assert abs(rejected - theory) < 0.08, (rejected, theory)


def test_brown_forsythe_is_wrong_for_paired_series():
    # Why compare_statistics no longer uses it: on pairs correlated 0.9 it almost never rejects.
    from statscope.analyses import levene

    a, b = ar1(np.random.default_rng(3), 200, 400, 0.0, c=0.9)
    _, p = levene(1.1 * a, b)
    assert np.mean(p < 0.05) < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("design", [(4, 4, 4, 32, 32, 32, 128, 128, 128), (4, 4, 32, 32, 256, 256),
                                    (4, 4, 128, 128, 128, 128, 128)])
def test_scaling_slope_over_seeds_covers_the_truth(design):
    # Seeds add a run-level effect (sd 0.1 in log fluctuation) that no within-run bootstrap
    # sees: the runs-as-unit interval must cover the true slope −0.5 about 95 % of the time,
    # also where the batch sizes weigh unequally (the two last designs: resampling runs within
    # each size covered 91.6 % and 91.3 % there). 2000 replicates: sd of the rate 0.5 points.
    x = np.log(np.asarray(design, float))
    rng = np.random.default_rng(len(design))
    y = -0.5 * x[None, :] + 0.1 * rng.standard_normal((2000, x.size))
    _, lo, hi, _ = runs_slope(x, y.T)
    assert 0.935 <= np.mean((lo <= -0.5) & (-0.5 <= hi)) <= 0.965
