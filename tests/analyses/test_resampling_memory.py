"""The bootstrap engine in bounded memory: replicates in batches, block sums one column chunk at
a time, block lengths one column chunk at a time — with the numbers of the unchunked path and of
an independent numpy resampling."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from statscope.analyses import blocklength
from statscope.analyses._moments import _Data
from statscope.analyses.blocklength import block_length
from statscope.analyses.resampling import _replicates


def _series(t, n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(t, n)).cumsum(0) * 0.1 + rng.normal(size=(t, n)) + 5.0
    b = np.abs(rng.normal(1.0, 0.2, size=(t, n)))
    a[::7, 1] = np.nan  # gaps: the valid count is resampled too
    b[3, 0] = np.nan
    return {"a": a, "b": b}


@pytest.mark.parametrize("budget", [1, 1 << 40])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_neuron_replicates_match_numpy_resampling(budget):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(90, 1)) + 3.0
    data = _Data({"x": x})
    got = _replicates(data, lambda m: m.std["x"], 10, 1, 30, 2, budget=budget)
    starts = np.random.default_rng([2, 10]).integers(0, 81, size=(30, 9))
    for r in range(30):
        idx = (starts[r][:, None] + np.arange(10)).ravel()
        np.testing.assert_allclose(got[r], x[idx].std(0, ddof=1), rtol=1e-10)


def _statistic(m):
    """Reads the mean of a, the std of a and b, and a median over neurons (a layer summary)."""
    ratio = m.std["a"] / m.std["b"]
    return np.concatenate([m.mean["a"], ratio, np.median(ratio, axis=-1, keepdims=True)],
                          axis=-1)


@pytest.mark.parametrize("t,b", [(97, 1), (97, 2), (97, 7), (120, 30), (64, 64)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_chunked_replicates_equal_unchunked(t, b):
    data = _Data(_series(t, 6))
    k = 6 + 6 + 1
    whole = _replicates(data, _statistic, b, k, 37, 5, budget=1 << 40)
    gemm = t - b + 1 <= 8 * (t // b)  # short blocks: BLAS, whose order of adding follows shapes
    for budget in (1, 3000, 20_000):  # one replicate and two columns at a time, and between
        got = _replicates(data, _statistic, b, k, 37, 5, budget=budget)
        if gemm:
            np.testing.assert_allclose(got, whole, rtol=1e-13, atol=0)
        else:  # every block sum added in the same order: the same bits
            np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("n", [2, 6])
@pytest.mark.parametrize("t,b", [(97, 1), (97, 2), (120, 30), (101, 25)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_replicates_match_numpy_resampling(t, b, n):
    series = _series(t, n, seed=t + b)
    data = _Data(series)
    got = _replicates(data, _statistic, b, 2 * n + 1, 25, 9, budget=5000)
    # the engine's draws: ⌊T/b⌋ block starts per replicate, then one start for the rest
    rng = np.random.default_rng([9, b])
    full, rest = divmod(t, b)
    starts = rng.integers(0, t - b + 1, size=(25, full))
    part = rng.integers(0, t - rest + 1, size=25) if rest else None
    for r in range(25):
        idx = (starts[r][:, None] + np.arange(b)).ravel()
        if rest:
            idx = np.concatenate([idx, part[r] + np.arange(rest)])
        a, s = (np.where(np.isfinite(series[k][idx]), series[k][idx], np.nan) for k in "ab")
        ratio = np.nanstd(a, 0, ddof=1) / np.nanstd(s, 0, ddof=1)
        ref = np.concatenate([np.nanmean(a, 0), ratio, [np.median(ratio)]])
        np.testing.assert_allclose(got[r], ref, rtol=1e-9)


def test_data_is_centred_in_place_with_numpy_totals():
    series = _series(50, 4)
    data = _Data(series)
    x = np.stack([series["a"], series["b"]], axis=1)
    ok = np.isfinite(x)
    d = np.where(ok, x - np.nanmean(x, 0), 0.0)
    np.testing.assert_allclose(data.d, d, rtol=0, atol=1e-12)
    a0, a1, a2 = data.totals()
    np.testing.assert_array_equal(a0, ok.sum(0))
    np.testing.assert_allclose(a1, d.sum(0), atol=1e-10)
    np.testing.assert_allclose(a2, (d * d).sum(0), rtol=1e-12)
    assert data.totals()[2] is a2 and not a2.flags.writeable  # computed once, shared


@pytest.mark.parametrize("columns", [2, 3, 9, 33])
def test_block_length_in_column_chunks_equals_all_at_once(monkeypatch, columns):
    rng = np.random.default_rng(columns)
    x = rng.normal(size=(300, columns)).cumsum(0)
    x[::11, 0] = np.nan
    whole = block_length(x)
    monkeypatch.setattr(blocklength, "_BATCH_BYTES", 1)  # chunks of the fewest columns
    assert blocklength._pieces(300, columns) > 1 or columns < 8
    parts = block_length(x)
    for field in ("block", "tau", "join"):  # column sums of a few columns may round otherwise
        np.testing.assert_allclose(getattr(parts, field), getattr(whole, field), rtol=1e-12)


@pytest.mark.slow
def test_bootstrap_of_a_long_window_stays_within_a_bounded_memory():
    # 3,000 steps × 512 neurons × 5 series: 61 MB of float64. The engine used to hold block
    # sums of every resampled column at once (about 8× that on top of the data); now its
    # traced peak stays within a few times the data, whatever n_boot.
    code = textwrap.dedent("""
        import tracemalloc, numpy as np
        from statscope.analyses.bootstrap import window_series
        from statscope.analyses.resampling import resample
        rng = np.random.default_rng(0)
        t, n = 3000, 512
        series = {k: rng.normal(1.0, 0.1, size=(t, n)) for k in
                  ("bn_mean", "bn_std", "en_mean", "en_std", "sigma2")}
        size = sum(v.nbytes for v in series.values())
        def stat(m):
            return np.stack([np.median(m.std[k] / np.sqrt(m.mean["sigma2"]), axis=-1)
                             for k in ("bn_mean", "bn_std", "en_mean", "en_std")], axis=-1)
        tracemalloc.start()
        resample(series, stat, n_boot=400, block=24)
        print(tracemalloc.get_traced_memory()[1] / size)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    assert float(out.split()[-1]) < 5.0, out
