"""Window summaries kept while recording, and per-step columns for a subset of channels."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import statscope
from statscope.store import Layout, ProbeInfo, open_windows
from statscope.windows import Windows
from statscope.writer import RunWriter


def reference_windows(steps, values, ran, length):
    """Per window: mean and std (ddof=1) of each column over the rows where it ran, brute force."""
    out = {}
    for k in np.unique(steps // length):
        rows = (steps // length) == k
        cols = []
        for j in range(values.shape[1]):
            x = values[rows, j][ran[rows, j]].astype(np.float64)
            cols.append((x.mean() if len(x) else np.nan,
                         x.std(ddof=1) if len(x) > 1 else np.nan))
        out[int(k)] = np.array(cols)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(2, 9), blocks=st.lists(
    st.integers(1, 7), min_size=1, max_size=8))
def test_windows_equal_a_two_pass_computation(seed, length, blocks):
    rng = np.random.default_rng(seed)
    total = sum(blocks)
    steps = np.sort(rng.choice(total * 3, size=total, replace=False))
    values = rng.normal(5.0, 1e-3, size=(total, 3)) + rng.normal(size=3) * 1e3
    count = (rng.random((total, 2)) < 0.8) * 4
    probe_of = np.array([0, 0, 1])
    acc = Windows(length, {"x": 3}, 2)
    done, first = [], 0
    for b in blocks:
        rows = slice(first, first + b)
        done += acc.add(steps[rows], count[rows], {"x": values[rows]}, {"x": probe_of})
        first += b
    done.append(acc.finish())
    want = reference_windows(steps, values, count[:, probe_of] > 0, length)
    assert [w.index for w in done] == sorted(want)
    for w in done:
        np.testing.assert_allclose(w.mean["x"], want[w.index][:, 0], rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(w.std["x"], want[w.index][:, 1], rtol=1e-7, atol=1e-12,
                                   equal_nan=True)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.sampled_from([5, 32, 50, 200, 333]),
       cuts=st.lists(st.lists(st.integers(1, 150), min_size=1, max_size=12), min_size=2,
                     max_size=2))
def test_windows_do_not_depend_on_how_the_rows_are_handed_over(seed, length, cuts):
    """Two partitions of the same rows (blocks, idle flushes, a resume's rebuilt window) give
    the same bits: the outside check found 1-ulp differences after resumes."""
    rng = np.random.default_rng(seed)
    total = 700
    steps = np.arange(total) * rng.integers(1, 3)
    values = (rng.normal(size=(total, 4)) * 1e-2 + rng.normal(size=4) * 1e2).astype(np.float32)
    count = np.ones((total, 2), np.int64) * 4
    count[rng.random(total) < 0.1, 1] = 0  # the second probe skips some steps
    probe_of = np.array([0, 0, 1, 1])

    def windows(sizes):
        acc, done, first = Windows(length, {"x": 4}, 2), [], 0
        while first < total:
            for b in sizes:
                rows = slice(first, min(first + b, total))
                done += acc.add(steps[rows], count[rows], {"x": values[rows]}, {"x": probe_of})
                first = rows.stop
        return done + [acc.finish()]

    a, b = windows(cuts[0]), windows(cuts[1])
    assert [w.index for w in a] == [w.index for w in b]
    for wa, wb in zip(a, b):
        assert wa.mean["x"].tobytes() == wb.mean["x"].tobytes()
        assert wa.std["x"].tobytes() == wb.std["x"].tobytes()
        np.testing.assert_array_equal(wa.count, wb.count)


def test_a_column_that_ran_at_every_step_gets_the_same_bits_on_either_path():
    """A rebuilt window sees a late probe's zero counts and takes the masked path for rows where
    the original took the fast one."""
    from statscope.windows import _Moments

    differ = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        fast, masked = _Moments(3), _Moments(3)
        for k in rng.integers(1, 40, size=6):
            x = (rng.normal(size=(k, 3)) * rng.uniform(1e-4, 1)
                 + rng.normal(size=3) * 1e3).astype(np.float32)
            fast.add(x, None)
            masked.add(x, np.ones((k, 3), bool))
        differ += fast.mean.tobytes() != masked.mean.tobytes() \
            or fast.m2.tobytes() != masked.m2.tobytes()
    assert differ == 0


def test_a_window_with_a_non_finite_value_is_nan_for_that_column():
    acc = Windows(4, {"x": 2}, 1)
    acc.add(np.arange(4), np.full((4, 1), 3), {"x": np.array([[1, 1], [2, np.inf], [3, 3],
                                                              [4, 4.0]])}, {"x": np.zeros(2, int)})
    w = acc.finish()
    assert np.isfinite(w.mean["x"][0]) and np.isnan(w.mean["x"][1]) and np.isnan(w.std["x"][1])


def model_and_inputs(steps=23, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    gen = torch.Generator().manual_seed(seed)
    return model, [torch.randn(4, 5, generator=gen) for _ in range(steps)]


def test_a_recorded_run_keeps_windows_of_every_channel_and_the_chosen_columns(tmp_path):
    model, xs = model_and_inputs()
    with torch.no_grad():
        h = [model[0](x).double() for x in xs]
    with statscope.record(model, tmp_path / "r", neurons=2, window_steps=5, block_steps=3,
                          step="forward"):
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["neuron"] == 2 and ds.unit.values.tolist() == [0, 1]
    assert ds.attrs["probes"][0]["units"] == [0, 1]
    per_step = np.stack([x.std(0, correction=0).numpy() for x in h])
    np.testing.assert_allclose(ds.bn_std.values, per_step[:, :2], rtol=1e-5)
    np.testing.assert_allclose(ds.en_std.values[:, 0], [x.std(correction=0) for x in h], rtol=1e-5)
    w = open_windows(tmp_path / "r")
    assert w.sizes == {"window": 5, "summary": 2, "neuron": 6}
    assert w.step.values.tolist() == [0, 5, 10, 15, 20] and w.attrs["window_steps"] == 5
    assert w["count"].values[:, 0].tolist() == [5, 5, 5, 5, 3]  # the last window is partial
    f32 = per_step.astype(np.float32).astype(np.float64)
    for k in range(5):
        rows = f32[5 * k:5 * k + 5]
        np.testing.assert_allclose(w.bn_std.sel(summary="mean").values[k], rows.mean(0), rtol=1e-6)
        np.testing.assert_allclose(w.bn_std.sel(summary="std").values[k], rows.std(0, ddof=1),
                                   rtol=1e-5)
    assert w.label.values.tolist()[:2] == ["1[0]", "1[1]"]


def test_random_units_are_seeded_and_stored(tmp_path):
    model, xs = model_and_inputs(steps=3)
    spec = {"1": ("random", 3, 5)}
    with statscope.record(model, tmp_path / "r", neurons=spec):
        model(xs[0])
    units = statscope.open_run(tmp_path / "r").unit.values.tolist()
    with statscope.record(model, tmp_path / "s", neurons=spec):
        model(xs[0])
    assert units == statscope.open_run(tmp_path / "s").unit.values.tolist()
    assert len(units) == 3 and units == sorted(units)
    with pytest.raises(statscope.StatscopeError, match="neurons=-1"):
        statscope.record(model, tmp_path / "x", neurons=-1)


def test_windows_after_a_resume_equal_those_of_an_uninterrupted_run(tmp_path):
    probes = (ProbeInfo("a", "a", "BatchNorm1d", "input", 1, 3),)
    rng = np.random.default_rng(1)
    data = {s: rng.normal(size=(40, 3)).astype(np.float32) for s in ("bn_mean", "bn_std")}
    data.update({s: rng.normal(size=(40, 1)).astype(np.float32) for s in ("en_mean", "en_std")})
    count = np.full((40, 1), 4)

    def write(path, cuts):
        first = 0
        for cut in cuts:
            w = RunWriter(path, Layout(probes), resume=first > 0, window_steps=7, flush_seconds=0)
            w.append(np.arange(first, cut), count[first:cut], {k: v[first:cut] for k, v in data.items()})
            if cut < 40:
                w.flush()
                w.lease.release()  # killed: no close, the last window is not written
            else:
                w.close()
            first = cut

    write(tmp_path / "once", [40])
    a = open_windows(tmp_path / "once")
    # killed inside a window, and right after one was full (14 = 2·7: not yet written)
    for cuts in ([16, 40], [14, 40], [14, 21, 40]):
        path = tmp_path / "-".join(map(str, cuts))
        write(path, cuts)
        b = open_windows(path)
        assert a.sizes["window"] == b.sizes["window"] == 6
        for name in ("bn_mean", "bn_std", "en_std", "count"):
            np.testing.assert_array_equal(a[name].values, b[name].values)


@pytest.mark.parametrize("resume", [True, 20, 18])
def test_a_resume_keeps_the_complete_windows_of_channels_without_per_step_columns(tmp_path,
                                                                                    resume):
    # With neurons=2 the rows hold 2 of the 6 channels; the windows hold all 6. Resuming after
    # a closed run of 4 whole windows dropped the fourth and rebuilt it from the rows: 4 of its
    # channels NaN (an outside check). Resuming inside it (18) rebuilds it, as documented.
    model, xs = model_and_inputs(steps=25)
    kw = dict(neurons=2, window_steps=5, step="forward", writer="thread")
    with statscope.record(model, tmp_path / "r", **kw):
        for x in xs[:20]:
            model(x)
    before = open_windows(tmp_path / "r").bn_std.sel(summary="mean").values
    assert before.shape == (4, 6) and np.isfinite(before).all()
    start = 20 if resume is True else resume
    with statscope.record(model, tmp_path / "r", resume=resume, **kw):
        for x in xs[start:]:
            model(x)
    after = open_windows(tmp_path / "r").bn_std.sel(summary="mean").values
    assert after.shape == (5, 6)
    kept = 4 if start == 20 else 3
    np.testing.assert_array_equal(after[:kept], before[:kept])
    if start == 18:  # rebuilt from the rows: the channels without per-step columns are NaN
        assert np.isfinite(after[3, :2]).all() and np.isnan(after[3, 2:]).all()


def test_a_run_without_windows_says_so(tmp_path):
    model, xs = model_and_inputs(steps=2)
    with statscope.record(model, tmp_path / "r", window_steps=None):
        model(xs[0])
    with pytest.raises(statscope.StoreError, match="keeps no window summaries"):
        open_windows(tmp_path / "r")
