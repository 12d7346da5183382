import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from statscope import schema as S
from statscope.analyses import block_bootstrap, fluctuation, fluctuation_ci, layer_summary
from statscope.errors import StatscopeError

from analyses_synthetic import make_run, stack


@settings(max_examples=30, deadline=None)
@given(t=st.integers(5, 80), block=st.integers(1, 5), seed=st.integers(0, 1000))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_replicates_match_brute_force_resampling(t, block, seed):
    x = np.random.default_rng(seed).normal(size=(t, 3)) + 10
    x[::7, 1] = np.nan
    block = min(block, t)
    m = block_bootstrap({"x": x}, n_boot=20, block=block, seed=seed)
    # the resampler's draws: ⌊T/b⌋ block starts, then one start for the T mod b steps left
    rng = np.random.default_rng([seed, block])
    full, rest = divmod(t, block)
    starts = rng.integers(0, t - block + 1, size=(20, full))
    part = rng.integers(0, t - rest + 1, size=20) if rest else None
    for r in range(20):
        idx = (starts[r][:, None] + np.arange(block)).ravel()
        if rest:
            idx = np.concatenate([idx, part[r] + np.arange(rest)])
        assert idx.size == t
        ref = x[idx]
        np.testing.assert_allclose(m.mean_reps["x"][r], np.nanmean(ref, 0), rtol=1e-9)
        np.testing.assert_allclose(m.std_reps["x"][r], np.nanstd(ref, 0, ddof=1), rtol=1e-7,
                                   atol=1e-7)


def test_ci_brackets_estimate_and_matches_fluctuation(run):
    ci = fluctuation_ci(run, 200, n_boot=300)
    summ = layer_summary(fluctuation(run, 200))
    for s in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD):
        est = ci[s].sel(bound="estimate")
        np.testing.assert_allclose(est.values, summ[s].sel(quantity=["median", "first"]).values)
        assert (ci[s].sel(bound="lower") <= est).all() and (est <= ci[s].sel(bound="upper")).all()


def test_ci_covers_the_truth_about_as_often_as_stated():
    # 40 independent Gaussian runs with σ = 1, N = 16: true sd(bn_mean) = 0.25 for each neuron.
    hits = 0
    for seed in range(40):
        ds = make_run(n_steps=200, seed=seed)
        ci = fluctuation_ci(ds, 200, n_boot=200, confidence=0.9).bn_mean.sel(
            layer="fc1", quantity="first")
        hits += float(ci.sel(bound="lower")) <= 0.25 <= float(ci.sel(bound="upper"))
    assert 30 <= hits <= 40  # nominal 36 of 40


def test_stacked_ci_has_run_dim():
    ds = stack({"a": make_run(seed=1), "b": make_run(seed=2, n_steps=250)})
    ci = fluctuation_ci(ds, 100, n_boot=50)
    assert ci[S.BN_MEAN].dims == (S.LAYER, S.RUN, "quantity", "bound")


def test_bad_bootstrap_arguments(run):
    with pytest.raises(StatscopeError, match="block=500"):
        fluctuation_ci(run, 200, block=500)
    with pytest.raises(StatscopeError, match="confidence=1.5"):
        fluctuation_ci(run, 200, confidence=1.5, n_boot=10)
