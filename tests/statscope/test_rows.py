"""compute_rows against numpy on the batches themselves: segments of both kinds, rows no segment
covers, entries missing within a run, steps a probe did not run, probes of equal width joined."""

import numpy as np

from statscope import schema as S
from statscope.entries import EntryJob
from statscope.rows import Advice, Gathered, ProbePart, compute_rows

EPS = 1e-5
NAMES = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)


def _batches(rng, k, c, ran):
    """A (m, c) batch per row where the probe ran (None elsewhere), offsets and scales varied."""
    return [rng.normal(rng.normal() * 10, rng.uniform(0.1, 5), (int(rng.integers(3, 9)), c))
            if r else None for r in ran]


def _want(batches, groups, k, c):
    """Per statistic, (k, C) or (k, groups) float64 from the batches: NaN where none."""
    out = {n: np.full((k, c if n in (S.BN_MEAN, S.BN_STD) else groups), np.nan) for n in NAMES}
    for r, x in enumerate(batches):
        if x is None:
            continue
        out[S.BN_MEAN][r], out[S.BN_STD][r] = x.mean(0), x.std(0)
        per = x.reshape(len(x), groups, c // groups).transpose(1, 0, 2).reshape(groups, -1)
        out[S.EN_MEAN][r], out[S.EN_STD][r] = per.mean(1), per.std(1)
    return out


def _moments(batches, rows):
    return (np.stack([batches[r].mean(0) for r in rows]),
            np.stack([batches[r].var(0) for r in rows]))


def test_compute_rows_matches_numpy_on_the_batches():
    rng = np.random.default_rng(0)
    k = 6
    # probe 0 (C 4, 2 groups): a raw segment (rows 0-2), then entries "var" (rows 3-5), row 4
    # without an entry; probe 1 (C 4, 2 groups, joined with probe 0): BatchNorm's own "invstd"
    # entries, all rows, but it did not run at row 2 (a stale row); probe 2 (C 3): a raw
    # segment over rows 2-4 only; probe 3 did not run.
    b0 = _batches(rng, k, 4, [1, 1, 1, 1, 0, 1])
    b1 = _batches(rng, k, 4, [1, 1, 1, 1, 1, 1])
    b2 = _batches(rng, k, 3, [0, 0, 1, 1, 1, 0])
    counts = [np.array([len(x) if x is not None else 0 for x in b], np.int64) for b in (b0, b1, b2)]
    counts[1][2] = 0
    counts.append(np.zeros(k, np.int64))
    mean1, var1 = _moments(b1, range(k))
    var_job = EntryJob("var", [(0, [0, 2])],
                       [a.astype(np.float32) for a in _moments(b0, [3, 5])], np.empty((2, 0)))
    invstd_job = EntryJob("invstd", [(1, list(range(k)))],
                          [mean1.astype(np.float32), (1 / np.sqrt(var1 + EPS)).astype(np.float32)],
                          np.full((k, 1), EPS))
    parts = [ProbePart(4, 2, ((0, 3), (3, 6))),
             ProbePart(4, 2, ((0, 6),), cpu_batchnorm=True, bn_eps=EPS, cpu=True),
             ProbePart(3, 1, ((2, 5),)), None]
    segments = [_moments(b0, range(3)), None, None, _moments(b2, range(2, 5))]
    g = Gathered(np.arange(k, dtype=np.int64), counts, parts, segments, [var_job, invstd_job],
                 [(1, 3), (2, k)], {}, 0, k, 2, NAMES)
    rows = compute_rows(g)

    b1[2] = None  # what the store should show: nothing where the probe did not run
    assert rows.stats[3] is None
    for i, (batches, c, groups) in enumerate([(b0, 4, 2), (b1, 4, 2), (b2, 3, 1)]):
        want = _want(batches, groups, k, c)
        for name in NAMES:
            got = rows.stats[i][name]
            assert got.dtype == np.float32 and got.shape == want[name].shape
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want[name]), err_msg=name)
            std = np.nan_to_num(want[S.BN_STD])
            scale = np.where(std.max(1) > 0, std.max(1), 1.0)[:, None]  # errors relative to σ
            err = np.abs(got - want[name]) / (scale if name != S.EN_STD else want[name])
            assert np.nanmax(err) < 3e-6, (i, name, np.nanmax(err))
    assert rows.advice == {1: Advice(False, False)}
