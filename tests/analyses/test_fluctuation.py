import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from statscope import schema as S
from statscope.analyses import fluctuation, layer_summary

from analyses_synthetic import Layer, make_run, stack

STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)


def test_matches_numpy_std(run):
    f = fluctuation(run, 200)
    for s in STATS:
        ref = run[s].values[-200:].astype(np.float64).std(0, ddof=1)
        np.testing.assert_allclose(f[s].values, ref, rtol=1e-10)
    assert (f["n_valid"] == 200).all()
    assert list(f[S.LAYER].values[:2]) == ["fc1", "fc1"]


def test_scale_free_divides_by_mean_bn_std(run):
    f = fluctuation(run, 100, scale_free=True)
    x = run.isel(step=slice(-100, None))
    sigma = np.sqrt((x[S.BN_STD].values.astype(np.float64) ** 2 * 16 / 15).mean(0))
    np.testing.assert_allclose(f[S.BN_MEAN].values,
                               x[S.BN_MEAN].values.astype(np.float64).std(0, ddof=1) / sigma)


def test_detrend_matches_polyfit_and_removes_drift():
    ds = make_run((Layer("fc1", drift=20.0), Layer("fc2")), n_steps=400, seed=3)
    f = fluctuation(ds, "all", detrend=True)
    t = ds[S.STEP].values
    y = ds[S.BN_MEAN].values.astype(np.float64)
    coef = np.polyfit(t, y, 1)
    resid = y - (np.outer(t, coef[0]) + coef[1])
    ref = np.sqrt((resid ** 2).sum(0) / (len(t) - 2))
    np.testing.assert_allclose(f[S.BN_MEAN].values, ref, rtol=1e-8)
    raw = fluctuation(ds, "all")
    fc1 = (ds[S.LAYER] == "fc1").values
    assert (raw[S.BN_MEAN].values[fc1] > 3).all()  # the drift dominates the raw std
    np.testing.assert_allclose(f[S.BN_MEAN].values[fc1], 0.25, rtol=0.15)  # σ/√16


@settings(max_examples=25, deadline=None)
@given(nan_frac=st.floats(0, 0.5), idle=st.integers(0, 20), seed=st.integers(0, 10_000))
def test_nan_steps_are_excluded_and_counted(nan_frac, idle, seed):
    ds = make_run(n_steps=60, seed=seed % 7).copy(deep=True)
    rng = np.random.default_rng(seed)
    bad = rng.random(ds[S.BN_MEAN].shape) < nan_frac
    ds[S.BN_MEAN].values[bad] = np.nan
    ds[S.COUNT].values[20:20 + idle] = 0
    f = fluctuation(ds, "all")
    vals = ds[S.BN_MEAN].values.astype(np.float64)
    vals[20:20 + idle] = np.nan
    ref = np.nanstd(vals, 0, ddof=1) if (np.isfinite(vals).sum(0) > 1).all() else None
    if ref is not None:
        np.testing.assert_allclose(f[S.BN_MEAN].values, ref, rtol=1e-10)
    assert (f["n_valid"].values == np.isfinite(vals).sum(0)).all()
    notes = " ".join(f.attrs["notes"])
    assert (f"{int(bad.sum() - bad[20:20 + idle].sum())} (step, neuron) cells of bn_mean" in notes) == bool(bad.sum() - bad[20:20 + idle].sum())
    assert ("count 0" in notes) == bool(idle)


def test_gaussian_theory_recovered_at_large_n():
    n = 256
    ds = make_run((Layer("fc1", channels=6, sigma=(0.5, 1, 2, 3, 4, 5)),), n_steps=2000,
                  batch_size=n, seed=4)
    f = fluctuation(ds, 2000, scale_free=True)
    # sd(μ̂)/σ = 1/√N exactly; sd(σ̂)/σ ≈ √((κ−1)/(4N)) = 1/√(2N); the estimate's own relative
    # sd over 2000 steps is ~1/√4000 ≈ 1.6%, so 6% is a 4-sigma tolerance.
    np.testing.assert_allclose(f[S.BN_MEAN].values, 1 / np.sqrt(n), rtol=0.06)
    np.testing.assert_allclose(f[S.BN_STD].values, 1 / np.sqrt(2 * n), rtol=0.06)


def test_stacked_runs_keep_run_dim():
    ds = stack({"bs4": make_run(batch_size=4, seed=1), "bs64": make_run(batch_size=64, seed=2)})
    f = fluctuation(ds, 200, scale_free=True)
    assert f[S.BN_MEAN].dims == (S.RUN, S.NEURON)
    assert (f[S.BN_MEAN].sel(run="bs4") > f[S.BN_MEAN].sel(run="bs64")).all()
    summ = layer_summary(f)
    assert summ[S.BN_MEAN].dims == (S.LAYER, S.RUN, "quantity")
    assert summ[S.META_BATCH_SIZE].values.tolist() == [4, 64]


def test_layer_summary_matches_numpy(run):
    f = fluctuation(run, 200)
    summ = layer_summary(f)
    assert summ[S.LAYER].values.tolist() == ["fc1", "fc2"]
    for layer in ("fc1", "fc2"):
        v = f[S.BN_STD].values[(f[S.LAYER] == layer).values]
        got = summ[S.BN_STD].sel(layer=layer).values
        np.testing.assert_allclose(got, [np.median(v), *np.quantile(v, [0.25, 0.75]), v[0]])
    assert summ["n_neurons"].values.tolist() == [8, 8]


def test_layer_order_is_store_order():
    ds = make_run((Layer("zeta"), Layer("alpha")))
    assert layer_summary(fluctuation(ds, 50))[S.LAYER].values.tolist() == ["zeta", "alpha"]


def test_missing_statistic_raises(run):
    from statscope.errors import StatscopeError

    with pytest.raises(StatscopeError, match="no en_std"):
        fluctuation(run.drop_vars(S.EN_STD))


def test_excluded_cells_note_counts_only_cells_inside_each_runs_window():
    # A short run stacked with a long one is padded with count 0 past its end; that padding is
    # outside its window and must not be counted (the report said 59,535,360 for a sweep whose
    # windows held 614,400 cells).
    long, short = make_run(n_steps=300, seed=1), make_run(n_steps=120, seed=2)
    f = fluctuation(stack({"long": long, "short": short}), 50)
    assert not any("count 0" in n for n in f.attrs["notes"])
    idle = short.copy(deep=True)
    idle[S.COUNT].values[100] = 0  # one idle step inside the short run's last 50
    f = fluctuation(stack({"long": long, "short": idle}), 50)
    assert f.attrs["notes"] == ["short: 16 (step, neuron) cells in the window had count 0 "
                                "(layer did not run) and were excluded"]
    assert f[S.BN_MEAN].dims == (S.RUN, S.NEURON) and f["n_valid"].sel(run="short").max() == 50


def _skip(ds, layer, ran):
    """``layer`` runs only at the steps ``ran`` (a layer-drop branch): elsewhere its cells are
    NaN with count 0, as the recorder stores them."""
    ds = ds.copy(deep=True)
    cols = (ds[S.LAYER] == layer).values
    idle = np.setdiff1d(np.arange(ds.sizes[S.STEP]), ran)
    for name in (*STATS, S.BN_KURT):
        ds[name].values[np.ix_(idle, cols)] = np.nan
    ds[S.COUNT].values[np.ix_(idle, cols)] = 0
    return ds


def test_layers_that_skip_steps_say_in_how_many_they_ran():
    ds = _skip(make_run((Layer("fc1"), Layer("fc2"), Layer("fc3")), n_steps=60), "fc2",
               np.arange(0, 60, 3))
    ds = _skip(ds, "fc3", [7])
    f = fluctuation(ds, "all")
    fc2 = (ds[S.LAYER] == "fc2").values
    want = np.nanstd(ds[S.BN_STD].values[:, fc2].astype(np.float64), 0, ddof=1)
    np.testing.assert_allclose(f[S.BN_STD].values[fc2], want, rtol=1e-6)
    assert np.isnan(f[S.BN_STD].values[(ds[S.LAYER] == "fc3").values]).all()
    notes = " ".join(f.attrs["notes"])
    assert "only some of the window's 60 steps: 'fc2' in 20, 'fc3' in 1 (too few" in notes
    assert "'fc1'" not in notes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(np.nan)), min_size=1, max_size=9))
def test_layer_quantiles_equal_numpys_on_finite_values(values):
    from statscope.analyses.summary import nanquantiles

    a = np.array(values)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        want = np.nanquantile(a, [0.5, 0.25, 0.75])
    np.testing.assert_allclose(nanquantiles(a, [0.5, 0.25, 0.75]), want, rtol=1e-12, atol=1e-9)


def test_an_infinite_neuron_leaves_the_layers_median_finite():
    # numpy's linear interpolation a + (b - a)·t is NaN beside an inf even at t = 0: the median
    # of [1, 2, inf] read NaN (a layer with one neuron's scale-free fluctuation infinite)
    from statscope.analyses.summary import nanquantiles

    got = nanquantiles(np.array([[1.0, 2.0, np.inf], [np.nan, -np.inf, 3.0]]), [0.5, 0.25, 0.75])
    np.testing.assert_array_equal(got, [[2.0, -np.inf], [1.5, -np.inf], [np.inf, -np.inf]])
