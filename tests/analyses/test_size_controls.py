"""Size controls honoured by the analyses: kept units, one step in ``every``, and Figure 6 of
every channel from the window summaries — against numpy on the values written."""

import json
import warnings

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import statscope
from statscope import schema as S
from statscope.analyses import claims, fluctuation, fluctuation_table, running_stats
from statscope.analyses.summaries import summary_fluctuation
from statscope.errors import StatscopeError
from statscope.store import open_windows

from analyses_synthetic import Layer, make_run, to_store

LAYERS = (Layer("fc1", channels=6, drift=2.0), Layer("fc2", channels=6))
KEPT = {"fc1": (1, 4), "fc2": (0, 2, 5)}


def _sd(x):
    return np.std(np.asarray(x, np.float64), axis=0, ddof=1)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """1,000 steps, per-step columns for 5 of 12 channels, windows of 200 for all."""
    mem = make_run(LAYERS, n_steps=1000, batch_size=16, seed=3, kurt=False)
    path = to_store(mem, tmp_path_factory.mktemp("kept") / "run", units=KEPT)
    return mem, path


def test_kept_units_are_what_the_per_step_analyses_see(kept):
    mem, path = kept
    ds = statscope.open_run(path)
    assert ds.unit.values.tolist() == [1, 4, 0, 2, 5]
    f = fluctuation(ds, 200)
    cols = [1, 4, 6, 8, 11]
    np.testing.assert_allclose(f.bn_mean.values,
                               _sd(mem.bn_mean.values[-200:, cols]), rtol=1e-6)
    notes = " ".join(f.attrs["notes"])
    assert "fc1: per-step columns keep 2 of its 6 channels (units 1, 4)" in notes
    assert "fc2: per-step columns keep 3 of its 6 channels" in notes


@pytest.mark.parametrize("window,rows", [(200, slice(800, 1000)), (400, slice(600, 1000)),
                                         ((200, 600), slice(200, 600)), ("all", slice(0, 1000))])
def test_window_summaries_give_every_channel_exactly(kept, window, rows):
    mem, path = kept
    summ = open_windows(path)
    f = fluctuation(summ, window)
    for s in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD):
        np.testing.assert_allclose(f[s].values, _sd(mem[s].values[rows]), rtol=2e-6)
    assert f.sizes["neuron"] == 12 and f.attrs["source"] == "windows"
    assert (f.n_valid.values == rows.stop - rows.start).all()
    # the same quantity as the per-step series where both exist
    steps = fluctuation(statscope.open_run(path), window)
    kept_cols = np.r_[1, 4, 6, 8, 11]
    np.testing.assert_allclose(f.bn_std.values[kept_cols], steps.bn_std.values, rtol=2e-6)


def test_scale_free_from_windows_needs_the_counts_and_matches(kept):
    mem, path = kept
    ds, summ = statscope.open_run(path), open_windows(path)
    f = fluctuation(ds, 400, scale_free=True, windows=summ)
    x = mem.bn_std.values[-400:].astype(np.float64)
    n = 16
    want = _sd(mem.bn_mean.values[-400:]) / np.sqrt((x ** 2 * n / (n - 1)).mean(0))
    np.testing.assert_allclose(f.bn_mean.values, want, rtol=2e-6)
    np.testing.assert_allclose(f.bn_mean.values[[1, 4, 6, 8, 11]],
                               fluctuation(ds, 400, scale_free=True).bn_mean.values, rtol=2e-6)
    with pytest.raises(StatscopeError, match="element count of each step is not in them"):
        fluctuation(summ, 400, scale_free=True)


@pytest.mark.parametrize("window,match", [
    (300, "pass a multiple of 200"), (0.1, "whole windows of 200"),
    ((100, 600), "not made of whole stored windows"), (1200, "has 5 complete")])
def test_windows_refuse_what_they_do_not_cover(kept, window, match):
    with pytest.raises(StatscopeError, match=match):
        fluctuation(open_windows(kept[1]), window)


def test_windows_refuse_detrend_and_say_why(kept):
    with pytest.raises(StatscopeError, match="not the steps a trend line is fitted to"):
        fluctuation(open_windows(kept[1]), 200, detrend=True)
    with pytest.raises(StatscopeError, match="pass the run's window summaries"):
        fluctuation(statscope.open_run(kept[1]), 200, source="windows")


def test_a_partial_last_window_and_a_varying_count(tmp_path):
    mem = make_run(LAYERS, n_steps=900, batch_size=8, seed=1, kurt=False)
    mem[S.COUNT][450:, :6] = 4  # fc1's batch changes within window 2
    path = to_store(mem, tmp_path / "run")
    summ = open_windows(path)
    assert summ.sizes["window"] == 5  # the last holds steps 800..899
    f = fluctuation(summ, 200)  # the last complete window: steps 600..799
    np.testing.assert_allclose(f.bn_mean.values, _sd(mem.bn_mean.values[600:800]), rtol=2e-6)
    assert f.attrs["window"] == "last 200 steps in whole stored windows: [600, 800)"
    np.testing.assert_allclose(fluctuation(summ, "all").bn_std.values,
                               _sd(mem.bn_std.values), rtol=2e-6)
    with pytest.raises(StatscopeError, match="changes its element count"):
        fluctuation(statscope.open_run(path), (400, 600), scale_free=True, windows=summ)


def test_a_non_finite_value_spoils_its_window_and_says_so(tmp_path):
    mem = make_run(LAYERS, n_steps=400, batch_size=8, seed=2, kurt=False)
    mem[S.BN_MEAN][250, 3] = np.nan
    summ = open_windows(to_store(mem, tmp_path / "run"))
    f = fluctuation(summ, 400)
    assert np.isnan(f.bn_mean.values[3]) and np.isfinite(f.bn_mean.values[2])
    assert any("hold NaN although the layer ran" in n for n in f.attrs["notes"])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 9), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_merging_windows_equals_numpy(length, k, tail, seed):
    """Any whole windows (and a partial last one) merge to the std of all their steps."""
    rng = np.random.default_rng(seed)
    t = length * k + min(tail, length - 1)
    x = rng.normal(size=(t, 3)) * rng.uniform(0.1, 5, 3) + rng.normal(size=3) * 100
    run = np.ones((t, 3), bool)
    run[rng.random((t, 3)) < 0.2] = False  # steps where the layer did not run
    starts = np.arange(0, t, length)
    mean, std, count = [], [], []
    for s0 in starts:
        v = np.where(run[s0:s0 + length], x[s0:s0 + length], np.nan)
        count.append((~np.isnan(v)).sum(0))
        with warnings.catch_warnings():  # empty windows: NaN, as the writer stores them
            warnings.simplefilter("ignore", RuntimeWarning)
            mean.append(np.nanmean(v, 0))
            std.append(np.nanstd(v, 0, ddof=1))
    summ = xr.Dataset({S.BN_MEAN: (("window", "summary", "neuron"),
                                   np.stack([mean, std], 1).astype(np.float32)),
                       S.COUNT: (("window", "neuron"), np.array(count))},
                      coords={S.STEP: ("window", starts), S.SUMMARY: ["mean", "std"],
                              S.LAYER: ("neuron", ["a"] * 3)},
                      attrs={S.ATTR_WINDOW_STEPS: length, S.ATTR_LAST_STEP: t - 1})
    got = summary_fluctuation(summ, "all").bn_mean.values
    want = np.array([np.std(x[run[:, j], j], ddof=1) if run[:, j].sum() > 1 else np.nan
                     for j in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.fixture(scope="module")
def strided(tmp_path_factory):
    """One step in 10 recorded: steps 0, 10, ..., 2990."""
    mem = make_run(LAYERS, n_steps=300, batch_size=16, seed=4, kurt=False)
    mem = mem.assign_coords(step=mem.step.values * 10)
    return mem, to_store(mem, tmp_path_factory.mktemp("every") / "run", every=10)


def test_window_counts_training_steps_under_every(strided):
    mem, path = strided
    ds = statscope.open_run(path)
    assert ds.attrs["every"] == 10
    f = fluctuation(ds, 200)  # 200 training steps = the last 20 recorded rows
    np.testing.assert_allclose(f.bn_mean.values, _sd(mem.bn_mean.values[-20:]), rtol=1e-6)
    assert f.attrs["window"] == "last 200 steps (20 recorded rows, one step in 10)"
    assert any("records one training step in 10" in n for n in f.attrs["notes"])
    np.testing.assert_allclose(fluctuation(ds, 205).bn_mean.values,
                               _sd(mem.bn_mean.values[-21:]), rtol=1e-6)
    with pytest.raises(StatscopeError, match="pass at least 20 steps"):
        fluctuation(ds, 10)
    with pytest.raises(StatscopeError, match="replaying the running statistics needs every"):
        running_stats(ds)
    # window summaries hold 20 recorded steps each and agree with the per-step series
    summ = fluctuation(open_windows(path), 200)
    np.testing.assert_allclose(summ.bn_mean.values, f.bn_mean.values, rtol=2e-6)
    assert summ.n_valid.values[0] == 20
    c = claims(ds, 2000, n_boot=100)
    assert c.window.startswith("last 2000 steps (200 recorded rows")


def test_analyze_takes_every_channel_from_the_summaries(kept, capsys):
    from statscope.cli import main

    mem, path = kept
    assert main(["analyze", path, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["layer"] == "fc2" and r["statistic"] == "bn_mean")
    assert row["median"] == pytest.approx(float(np.median(_sd(mem.bn_mean.values[-200:, 6:]))),
                                          rel=1e-5)
    assert main(["analyze", path, "--format", "json", "--source", "steps"]) == 0
    steps_rows = json.loads(capsys.readouterr().out)
    rows = steps_rows
    row = next(r for r in rows if r["layer"] == "fc2" and r["statistic"] == "bn_mean")
    assert row["median"] == pytest.approx(
        float(np.median(_sd(mem.bn_mean.values[-200:, [6, 8, 11]]))), rel=1e-5)
    assert main(["analyze", path, "--source", "windows", "--window", "300"]) == 2
    assert "--source windows: " in capsys.readouterr().err


def test_the_summaries_table_names_the_run_as_the_steps_table_does(kept):
    # a name beginning with the run's own ("run" of "runs/run", as `analyze runs/run` gives)
    # got the tail added again: "runs/run" + "s/run" (an outside check)
    _, path = kept
    ds = statscope.open_run(path)
    by_steps = fluctuation_table(ds, 200, name="runs/run")
    by_windows = fluctuation_table(ds, 200, name="runs/run", windows=open_windows(path))
    assert set(by_steps["run"]) == set(by_windows["run"]) == {"runs/run"}


def test_a_range_past_the_run_is_refused_from_the_summaries_as_from_the_steps(kept):
    # the summaries clipped (800, 1200) of a 1000-step run to [800, 1000) without a word
    _, path = kept
    ds, summ = statscope.open_run(path), open_windows(path)
    for window in ((800, 1200), (0, 1400), (1000, 1200)):
        for source in (ds, summ):
            with pytest.raises(StatscopeError, match=rf"window=\({window[0]}, {window[1]}\): "
                                                     "outside"):
                fluctuation(source, window)
    assert fluctuation(summ, (800, 1000)).attrs["window"].startswith("steps [800, 1000)")
