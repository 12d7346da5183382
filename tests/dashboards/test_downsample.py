import warnings

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from statscope.dashboards.downsample import bin_mean, envelope


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 5000),
              elements=st.floats(-1e6, 1e6, width=32) | st.just(np.nan)),
       st.integers(4, 400))
def test_envelope_keeps_the_window_extremes_and_drops_nan(y, n_out):
    x = np.arange(len(y)) * 3 + 7
    xs, ys = envelope(x, y, n_out)
    finite = np.isfinite(y)
    assert len(xs) == len(ys) <= max(n_out, 0) + 2 or len(xs) == finite.sum()
    assert np.isfinite(ys).all()
    assert np.all(np.diff(xs) > 0)
    # every returned point is an input point
    idx = (xs - 7) // 3
    np.testing.assert_array_equal(y[idx], ys)
    if finite.any():
        assert ys.max() == y[finite].max() and ys.min() == y[finite].min()
        assert xs[0] == x[finite][0] and xs[-1] == x[finite][-1]


def test_envelope_keeps_every_isolated_spike():
    rng = np.random.default_rng(0)
    y = rng.normal(size=300_000).astype(np.float32)
    # spikes at least 500 steps apart (bins are ~300 wide), so no two share a bin
    spikes = np.arange(200) * 1500 + rng.integers(0, 1000, 200)
    y[spikes[:100]] = 50 + rng.random(100)
    y[spikes[100:]] = -50 - rng.random(100)
    xs, ys = envelope(np.arange(len(y)), y, 2000)
    assert len(xs) <= 2000
    assert set(spikes.tolist()) <= set(xs.tolist())


def test_short_series_pass_through_unchanged():
    x, y = np.arange(10), np.arange(10, dtype=np.float32)
    xs, ys = envelope(x, y, 100)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.integers(1, 50), st.integers(1, 4))
def test_bin_mean_matches_a_loop(t, n_bins, k):
    rng = np.random.default_rng(t)
    v = rng.normal(size=(t, k)).astype(np.float32)
    v[rng.random((t, k)) < 0.1] = np.nan
    z, width = bin_mean(v, n_bins)
    assert width == max(1, -(-t // n_bins))
    assert z.shape == (-(-t // width), k)
    for i in range(z.shape[0]):
        block = v[i * width:(i + 1) * width].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins
            ref = np.nanmean(block, axis=0)
        np.testing.assert_allclose(z[i], ref, rtol=1e-5, atol=1e-6, equal_nan=True)
