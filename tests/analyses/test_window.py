import numpy as np
import pytest

from statscope import schema as S
from statscope.analyses import fluctuation, select_window
from statscope.analyses._names import N_VALID
from statscope.errors import StatscopeError

from analyses_synthetic import make_run, stack


def test_int_window_takes_last_steps(run):
    w = select_window(run, 50)
    assert w[S.STEP].values.tolist() == list(range(250, 300))
    assert w.attrs["window"] == "last 50 steps"


def test_int_window_skips_steps_without_data(run):
    run = run.copy()
    run[S.COUNT] = run[S.COUNT].where(run[S.STEP] % 2 == 0, 0)
    w = select_window(run, 10)
    data = (w[S.COUNT] > 0).any(S.NEURON).values
    assert data.sum() == 10
    assert w[S.STEP].values[data].tolist() == list(range(280, 300, 2))


def test_tuple_and_fraction_and_all(run):
    assert select_window(run, (100, 110))[S.STEP].values.tolist() == list(range(100, 110))
    assert select_window(run, 0.1).sizes[S.STEP] == 30
    assert select_window(run, 1.0).sizes[S.STEP] == 300
    assert select_window(run, "all").sizes[S.STEP] == 300
    assert select_window(run, None).sizes[S.STEP] == 300


@pytest.mark.parametrize("window, match", [
    (301, "longer than run"), ((0, 400), "outside run"), (1.5, r"\(0, 1\]"), (True, "expected"),
    ((10, 5), "stop must exceed"), ("last", "expected"), (1, "at least 2"),
])
def test_bad_windows_raise(run, window, match):
    with pytest.raises(StatscopeError, match=match):
        select_window(run, window)


def test_empty_run_raises(run):
    with pytest.raises(StatscopeError, match="no steps"):
        select_window(run.isel(step=slice(0, 0)), 10)
    dead = run.copy()
    dead[S.COUNT] = dead[S.COUNT] * 0
    with pytest.raises(StatscopeError, match="no steps with data"):
        select_window(dead, 10)


def test_stacked_windows_are_per_run():
    ds = stack({"long": make_run(n_steps=300, seed=1), "short": make_run(n_steps=120, seed=2)})
    w = select_window(ds, 20)
    for name, last in (("long", 300), ("short", 120)):
        one = w.sel(run=name)
        steps = one[S.STEP].values[(one[S.COUNT] > 0).any(S.NEURON).values]
        assert steps.tolist() == list(range(last - 20, last))
        assert np.isnan(one[S.BN_MEAN].where(one[S.COUNT] == 0)).all()
    with pytest.raises(StatscopeError, match="'short'"):
        select_window(ds, 200)


def test_a_fraction_that_leaves_one_row_is_refused_like_a_one_step_window():
    # it gave all-NaN fluctuations with no note (an outside check)
    ds = make_run(n_steps=300)
    with pytest.raises(StatscopeError, match=r"window=1e-09: .* 300 recorded rows .* is 1 row"):
        fluctuation(ds, 1e-9)
    assert int(fluctuation(ds, 0.005)[N_VALID].min()) == 2


@pytest.mark.parametrize("window", ["all", None, 1.0])
def test_a_one_step_run_is_refused_for_every_window(window):
    # "all" gave a table of NaN and a report of inconclusive verdicts (an outside check)
    one = make_run(n_steps=1)
    with pytest.raises(StatscopeError, match=r"1 recorded row|is 1 row"):
        fluctuation(one, window)


def test_detrending_needs_three_steps_and_says_so():
    ds = make_run(n_steps=300)
    with pytest.raises(StatscopeError, match=r"window=2 with detrend=True"):
        fluctuation(ds, 2, detrend=True)
    f = fluctuation(ds, 0.005, detrend=True)  # 2 rows by fraction: NaN, and a note says why
    assert np.isnan(f[S.BN_MEAN].values).all()
    assert any("needs 3" in n and "every value is NaN" in n for n in f.attrs["notes"])


def test_a_window_leaves_the_runs_attrs_alone():
    # isel shares the attrs dict: the window's text went into the run itself, and every later
    # window="all" of it (a dashboard's cached run) was titled with that earlier window
    ds = make_run(n_steps=300)
    assert fluctuation(ds, 100).attrs["window"] == "last 100 steps"
    assert "window" not in ds.attrs
    assert fluctuation(ds, "all").attrs["window"] == "all steps"
    runs = stack({"a": make_run(n_steps=300), "b": make_run(n_steps=200, seed=1)})
    fluctuation(runs, (10, 60))
    assert "window" not in runs.attrs
