import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from statscope import schema as S
from statscope.analyses import batch_size_scaling, compare_runs, compare_statistics, levene
from statscope.errors import StatscopeError

from analyses_synthetic import Layer, make_run, stack


@settings(max_examples=30, deadline=None)
@given(na=st.integers(3, 40), nb=st.integers(3, 40), seed=st.integers(0, 1000),
       center=st.sampled_from(["median", "mean"]))
def test_levene_matches_scipy(na, nb, seed, center):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(na, 3)), 2 * rng.normal(size=(nb, 3))
    w, p = levene(a, b, center=center)
    for j in range(3):
        ref = stats.levene(a[:, j], b[:, j], center=center)
        assert w[j] == pytest.approx(ref.statistic, rel=1e-8)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)


def test_compare_statistics_bn_vs_en(run):
    r = compare_statistics(run, S.BN_MEAN, S.EN_MEAN, 200, n_boot=300)
    assert (r.ratio > 1).all() and (r.p_value < 0.01).mean() > 0.5
    assert r.attrs["test"].startswith("paired block bootstrap")
    assert ((r.lower <= r.ratio) & (r.ratio <= r.upper)).all()


def test_compare_runs_small_vs_large_batch():
    ds = stack({"bs4": make_run(batch_size=4, seed=1), "bs128": make_run(batch_size=128, seed=2)})
    r = compare_runs(ds, "bs4", "bs128", S.BN_STD, 200, n_boot=300)
    assert (r.ratio > 3).all() and (r.p_value < 1e-6).all() and (r.lower > 3).all()
    bf = compare_runs(ds, "bs4", "bs128", S.BN_STD, 200, method="brown-forsythe")
    assert (bf.p_value < 1e-6).all() and bf.attrs["test"] == "Brown-Forsythe"
    np.testing.assert_allclose(bf.ratio, r.ratio, rtol=1e-10)
    with pytest.raises(StatscopeError, match="bs9"):
        compare_runs(ds, "bs9", "bs128")


def test_scaling_slope_recovers_minus_half():
    sizes = (8, 32, 128, 512)
    ds = stack({f"bs{b}": make_run((Layer("fc1", channels=4), Layer("fc2", channels=4)),
                                   batch_size=b, n_steps=400, seed=b) for b in sizes})
    sc = batch_size_scaling(ds, 400, n_boot=300)
    bn = sc.slope.sel(statistic=[S.BN_MEAN, S.BN_STD])
    np.testing.assert_allclose(bn.values, -0.5, atol=0.06)
    assert ((sc.lower <= sc.slope) & (sc.slope <= sc.upper)).all()
    inside = (sc.lower.sel(statistic=S.BN_MEAN) <= -0.5) & (-0.5 <= sc.upper.sel(statistic=S.BN_MEAN))
    assert inside.all()


def test_scaling_needs_two_batch_sizes(run):
    with pytest.raises(StatscopeError, match="one run"):
        batch_size_scaling(run)
    ds = stack({"a": make_run(seed=1), "b": make_run(seed=2)})
    with pytest.raises(StatscopeError, match="one batch size"):
        batch_size_scaling(ds)


def test_runs_slope_interval_matches_a_pure_error_regression_by_numpy():
    # independent reference: the full model (one mean per batch size) by least squares gives
    # the pure-error variance; np.polyfit the slope
    from statscope.analyses.scaling import runs_slope

    rng = np.random.default_rng(3)
    x = np.log(np.array([4, 4, 16, 16, 16, 128, 128], float))
    y = -0.5 * x + 0.2 * rng.standard_normal((3, x.size))
    slope, lo, hi, df = runs_slope(x, y.T, confidence=0.9)
    levels = np.unique(x)
    design = (x[:, None] == levels[None, :]).astype(float)
    for k in range(3):
        sse = float(np.linalg.lstsq(design, y[k], rcond=None)[1][0])
        se = np.sqrt(sse / (x.size - levels.size) / ((x - x.mean()) ** 2).sum())
        ref = np.polyfit(x, y[k], 1)[0]
        q = stats.t.ppf(0.95, x.size - levels.size)
        np.testing.assert_allclose([slope[k], lo[k], hi[k]], [ref, ref - q * se, ref + q * se],
                                   rtol=1e-10)
    assert df == 4
