import numpy as np
import pytest

from statscope import schema as S
from statscope.analyses import excess_fluctuation, sampling_baseline

from analyses_synthetic import KURTOSIS, Layer, _draw, make_run


def _unbiased_kappa(m2, m4, n):
    """κ from batch moments (T, C): μ₄ and σ⁴ solved from the 2×2 system of the expectations of
    the window means of m₄ and m₂², by numpy's solver rather than the code's closed form."""
    coef = np.array([[(n - 1) * (n * n - 3 * n + 3), 3 * (n - 1) * (2 * n - 3)],
                     [(n - 1) ** 2, (n - 1) * (n * n - 2 * n + 3)]]) / n ** 3
    mu4, sigma4 = np.linalg.solve(coef, np.stack([m4.mean(0), (m2 * m2).mean(0)]))
    return mu4 / sigma4


def test_baseline_matches_brute_force(run):
    b = sampling_baseline(run, 100)
    x = run.isel(step=slice(-100, None))
    n = 16.0
    sd = x[S.BN_STD].values.astype(np.float64)
    sigma2 = (sd ** 2 * n / (n - 1)).mean(0)
    kappa = _unbiased_kappa(sd ** 2, x[S.BN_KURT].values.astype(np.float64) * sd ** 4, n)
    np.testing.assert_allclose(b["kappa"].values, kappa, rtol=1e-10)
    np.testing.assert_allclose(b[S.BN_MEAN].values, np.sqrt(sigma2 / n), rtol=1e-10)
    np.testing.assert_allclose(b[S.BN_STD].values,
                               np.sqrt(sigma2 * ((n - 1) * kappa - n + 3)) / (2 * n), rtol=1e-10)
    assert b.attrs["kappa_source"] == S.BN_KURT


@pytest.mark.parametrize(("dist", "batch_size"), [("normal", 4), ("normal", 8), ("laplace", 8)])
def test_recorded_kurtosis_is_corrected_for_small_batches(dist, batch_size):
    # The plug-in kurtosis of 4 Gaussian values averages 1.8: its window mean as κ put the
    # baseline of bn_std at 0.22σ against 0.34σ by simulation, and pure sampling noise read as
    # 50 % excess. The corrected κ is the distribution's (sd of the estimate over 4000 steps of
    # 8 channels: ~2 % for Gaussian, ~6 % for Laplace tails at N = 8).
    ds = make_run((Layer("fc1", channels=8, dist=dist),), n_steps=4000, batch_size=batch_size,
                  seed=21)
    b = sampling_baseline(ds, "all")
    assert abs(float(b["kappa"].mean()) / KURTOSIS[dist] - 1) < 0.06
    assert float(ds[S.BN_KURT].mean()) < 0.8 * KURTOSIS[dist]  # the plug-in bias the fix removes
    # What is left is the delta method's own error at small N: the excess of pure sampling noise
    # is the simulated sd of σ̂ over the formula's (0.95 for Gaussian batches of 4, ~0.9 for
    # Laplace batches of 8), checked here against 200,000 batches drawn by numpy.
    z = _draw(np.random.default_rng(5), dist, (200_000, batch_size))
    n, kappa = batch_size, KURTOSIS[dist]
    expected = z.std(1).std() / (np.sqrt((n - 1) * kappa - n + 3) / (2 * n))
    r = excess_fluctuation(ds, "all")
    np.testing.assert_allclose(float(r[S.BN_STD].median()), expected, atol=0.06)


def test_batches_too_small_for_kurtosis_assume_three_with_a_note():
    ds = make_run((Layer("fc1", channels=4),), n_steps=500, batch_size=2, seed=3)
    b = sampling_baseline(ds, "all")
    assert (b["kappa"] == 3).all()  # the plug-in kurtosis of two values is 1: a baseline of 0
    assert any("4 or more elements" in n for n in b.attrs["notes"])
    r = excess_fluctuation(ds, "all")
    assert np.isfinite(r[S.BN_STD].values).all()


def test_missing_kurtosis_assumes_three_with_a_note():
    ds = make_run(kurt=False)
    b = sampling_baseline(ds, 100)
    assert (b["kappa"] == 3).all()
    assert any("κ = 3" in n for n in b.attrs["notes"])


def test_a_run_without_kurtosis_stacked_with_one_that_has_it_assumes_three(tmp_path):
    # open_runs gives the run without bn_kurt an all-NaN one: the same κ and notes as alone
    import statscope

    from analyses_synthetic import to_store

    with_kurt = make_run(batch_size=8, seed=1)
    without = make_run(batch_size=8, seed=2, kurt=False)
    to_store(with_kurt, tmp_path / "a")
    to_store(without, tmp_path / "b")
    stacked = statscope.open_runs([tmp_path / "a", tmp_path / "b"])
    alone = sampling_baseline(statscope.open_run(tmp_path / "b"), 100)
    b = sampling_baseline(stacked, 100)
    assert (b["kappa"].sel(run="b") == 3).all() and not (b["kappa"].sel(run="a") == 3).all()
    np.testing.assert_allclose(b[S.BN_STD].sel(run="b").values, alone[S.BN_STD].values)
    assert [n[3:] for n in b.attrs["notes"] if n.startswith("b: ")] == alone.attrs["notes"]
    assert any(n.startswith("a: κ from the recorded bn_kurt") for n in b.attrs["notes"])


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
