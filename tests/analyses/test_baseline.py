import numpy as np
import pytest

from statscope import schema as S
from statscope.analyses import excess_fluctuation, sampling_baseline

from analyses_synthetic import KURTOSIS, Layer, make_run


def test_baseline_matches_brute_force(run):
    b = sampling_baseline(run, 100)
    x = run.isel(step=slice(-100, None))
    n = 16.0
    sigma2 = (x[S.BN_STD].values.astype(np.float64) ** 2 * n / (n - 1)).mean(0)
    kappa = x[S.BN_KURT].values.astype(np.float64).mean(0)
    np.testing.assert_allclose(b[S.BN_MEAN].values, np.sqrt(sigma2 / n), rtol=1e-10)
    np.testing.assert_allclose(b[S.BN_STD].values, np.sqrt(sigma2 * (kappa - 1) / (4 * n)),
                               rtol=1e-10)
    assert b.attrs["kappa_source"] == S.BN_KURT


def test_missing_kurtosis_assumes_three_with_a_note():
    ds = make_run(kurt=False)
    b = sampling_baseline(ds, 100)
    assert (b["kappa"] == 3).all()
    assert any("κ = 3" in n for n in b.attrs["notes"])


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_excess_is_one_for_pure_sampling_noise_at_large_n(dist):
    # With N = 512 the asymptotic std formula is accurate and bn_kurt is nearly unbiased; the
    # observed sd over 3000 steps has ~1.3% relative error (more for heavy tails: its sd depends
    # on the 8th moment), so 10% is a comfortable but not vacuous tolerance.
    ds = make_run((Layer("fc1", channels=4, sigma=(0.5, 1, 2, 4), dist=dist),), n_steps=3000,
                  batch_size=512, seed=11)
    r = excess_fluctuation(ds, 3000)
    np.testing.assert_allclose(r[S.BN_MEAN].values, 1.0, atol=0.1)
    np.testing.assert_allclose(r[S.BN_STD].values, 1.0, atol=0.1)
    kappa = sampling_baseline(ds, 3000)["kappa"].values
    np.testing.assert_allclose(kappa, KURTOSIS[dist], rtol=0.05)


def test_assuming_gaussian_kurtosis_understates_heavy_tailed_std_noise():
    ds = make_run((Layer("fc1", channels=4, dist="laplace"),), n_steps=3000, batch_size=512,
                  seed=12, kurt=False)
    r = excess_fluctuation(ds, 3000)
    # κ = 6 really: the ratio is √((6−1)/(3−1)) ≈ 1.58 when κ = 3 is assumed.
    np.testing.assert_allclose(r[S.BN_STD].values, np.sqrt(5 / 2), rtol=0.1)


def test_extra_noise_shows_as_excess():
    ds = make_run((Layer("fc1", channels=4, mean_jitter=0.2),), n_steps=1000, batch_size=64)
    r = excess_fluctuation(ds, 1000)
    # sd(μ̂) = σ·√(1/64 + 0.04) vs σ/8 → ratio √(1 + 0.04·64) ≈ 1.89
    np.testing.assert_allclose(r[S.BN_MEAN].values, np.sqrt(1 + 0.04 * 64), rtol=0.1)


def test_detrended_excess_removes_drift():
    ds = make_run((Layer("fc1", channels=4, drift=5.0),), n_steps=1000, batch_size=64)
    assert (excess_fluctuation(ds, 1000)[S.BN_MEAN] > 5).all()
    np.testing.assert_allclose(excess_fluctuation(ds, 1000, detrend=True)[S.BN_MEAN], 1, atol=0.1)


def test_a_constant_neuron_has_no_excess_and_a_note_says_why():
    # a dead unit or a pruned channel: the same value across each batch, bn_std 0 at every step
    with np.errstate(invalid="ignore"):  # the generator's kurtosis of that channel: 0/0
        ds = make_run((Layer("fc1", channels=4, sigma=(0.0, 1, 1, 1)), Layer("fc2", channels=2)),
                      n_steps=400, batch_size=64, kurt=False)
    r = excess_fluctuation(ds, 400)
    assert np.isnan(r[S.BN_STD].values[0]) and np.isnan(r[S.BN_MEAN].values[0])
    assert np.isfinite(r[S.BN_STD].values[1:]).all()
    said = [n for n in r.attrs["notes"] if "bn_std 0 at every step" in n]
    assert len(said) == 1 and said[0].startswith("1 neurons (layers 'fc1')")
    assert not any("bn_std 0" in n for n in excess_fluctuation(make_run(), 100).attrs["notes"])
