"""The fluctuation views' sources: window summaries pooled exactly, the source rules, samples of
wide runs; checked against numpy on the values written and against statscope.analyses."""

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings, strategies as st

from dashboard_fixtures import figure, synthetic_run, write_synthetic
from statscope import analyses as A
from statscope import schema as S
from statscope.dashboards import callbacks as cb
from statscope.dashboards import sources
from statscope.dashboards.data import RunCatalog
from statscope.dashboards.sources import SAMPLE, SERIES, WINDOWS, choose, whole_windows
from statscope.store import Layout, ProbeInfo
from statscope.writer import RunWriter


def _windows(starts, width):
    return xr.Dataset(coords={S.STEP: (S.WINDOW_DIM, np.asarray(starts, np.int64))},
                      attrs={S.ATTR_WINDOW_STEPS: width})


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(1, 12), st.data())
def test_whole_windows_match_a_brute_force_search(n, stride, width, data):
    steps = np.arange(n) * stride + data.draw(st.integers(0, 3))
    starts = np.unique(steps // width) * width  # the windows that hold a recorded step
    a = data.draw(st.integers(0, n - 1))
    rows = slice(a, data.draw(st.integers(a + 1, n)))
    chosen = set(steps[rows].tolist())
    inside = [k for k, s in enumerate(starts)
              if {t for t in steps.tolist() if s <= t < s + width} <= chosen]
    got = whole_windows(_windows(starts, width), steps, rows)
    if not inside:
        assert got is None
        return
    assert got[:2] == (inside[0], inside[-1] + 1)
    covered = {t for k in inside for t in steps.tolist() if starts[k] <= t < starts[k] + width}
    assert got[2] == (covered == chosen)


@pytest.fixture
def store(tmp_path):
    ds = synthetic_run(n_steps=600, layers=(("fc1", 4), ("fc2", 4)), seed=5)
    write_synthetic(tmp_path / "r", ds)
    return tmp_path, ds


@pytest.mark.parametrize("scale", ["raw", "scale_free"])
@pytest.mark.parametrize("window", ["last:200", "all", "200:599"])
def test_windows_source_gives_the_analyses_numbers(store, monkeypatch, scale, window):
    root, ds = store
    monkeypatch.setattr(sources, "MAX_SERIES_VALUES", 0)  # the series is "too large"
    cat = RunCatalog(root)
    search = f"?tab=fluctuation&run=r&scale={scale}&window={window}&neuron=fc1:1&neuron=fc2:3"
    fig = figure(cb.fluctuation(cat, search))
    aw = {"last:200": 200, "all": "all", "200:599": (200, 600)}[window]
    ref = A.fluctuation(ds, aw, scale_free=scale == "scale_free")
    for stat in sources.FLUCT_STATS:
        (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == stat]
        np.testing.assert_allclose(bar.y, ref[stat].values[[1, 7]], rtol=5e-5)
    assert "from the window summaries" in fig.layout.title.text
    assert not any(t.type == "bar" and t.error_y.array is not None for t in fig.data)
    fig = figure(cb.scatter(cat, search.replace("fluctuation", "scatter")))
    (tr,) = [t for t in fig.data if t.meta and t.meta.get("layer") == "fc2"]
    np.testing.assert_allclose(tr.y, ref[S.BN_STD].values[4:], rtol=5e-5)


def test_a_window_between_summaries_uses_the_whole_windows_inside_and_says_so(store,
                                                                            monkeypatch):
    root, ds = store
    monkeypatch.setattr(sources, "MAX_SERIES_VALUES", 0)
    cat = RunCatalog(root)
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=r&scale=raw&window=last:300"
                                     "&neuron=fc1:0"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_MEAN]
    assert bar.y[0] == pytest.approx(np.std(ds.bn_mean.values[400:, 0], ddof=1), rel=5e-5)
    assert "window summaries of steps 400–599" in fig.layout.title.text


def _kept_units_run(path, n_steps=400, channels=8, kept=(0, 5), window_steps=200, seed=0):
    """Two layers of ``channels`` channels, per-step columns for ``kept`` units only."""
    rng = np.random.default_rng(seed)
    probes = tuple(ProbeInfo(name=f"fc{i}", module=f"fc{i}", type="BatchNorm1d", where="input",
                             channel_dim=1, channels=channels, units=kept) for i in (1, 2))
    n = 2 * channels
    stats = {S.BN_MEAN: rng.normal(size=(n_steps, n)).astype(np.float32),
             S.BN_STD: (1 + rng.random((n_steps, n))).astype(np.float32),
             S.EN_MEAN: rng.normal(size=(n_steps, 2)).astype(np.float32),
             S.EN_STD: (1 + rng.random((n_steps, 2))).astype(np.float32)}
    writer = RunWriter(path, Layout(probes=probes), flush_seconds=float("inf"),
                       window_steps=window_steps)
    writer.append(np.arange(n_steps), np.full((n_steps, 2), 16), stats)
    writer.close()
    return stats


def test_a_run_keeping_some_units_shows_every_channel_from_its_window_summaries(tmp_path):
    stats = _kept_units_run(tmp_path / "k")
    cat = RunCatalog(tmp_path)
    assert cat.dataset("k").sizes[S.NEURON] == 4  # per-step columns: units 0 and 5 per layer
    fig = figure(cb.scatter(cat, "?tab=scatter&run=k&scale=raw"))
    ref = np.std(stats[S.BN_STD][200:].astype(np.float64), axis=0, ddof=1)
    (tr,) = [t for t in fig.data if t.meta and t.meta.get("layer") == "fc2"]
    np.testing.assert_allclose(tr.y, ref[8:], rtol=5e-5)
    assert list(tr.customdata) == [f"fc2:{u}" for u in range(8)]
    assert "window summaries (1 window of 200 steps, every channel)" in fig.layout.title.text
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=k&scale=raw&neuron=fc2:5"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_STD]
    assert bar.y[0] == pytest.approx(ref[13], rel=5e-5)
    # a window that is not whole windows: the per-step series of the kept units
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=k&scale=raw&window=last:150"
                                     "&neuron=fc2:5"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_STD]
    assert bar.y[0] == pytest.approx(np.std(stats[S.BN_STD][250:, 13], ddof=1), rel=5e-5)
    assert "per-step series" in fig.layout.title.text


def test_a_wide_run_without_summaries_is_sampled_per_layer(tmp_path, monkeypatch):
    _kept_units_run(tmp_path / "w", channels=40, kept=tuple(range(40)), window_steps=None)
    monkeypatch.setattr(sources, "MAX_SERIES_VALUES", 200 * 20)  # 20 neurons of 200 steps
    monkeypatch.setattr(sources, "MAX_SCATTER_POINTS", 10)
    cat = RunCatalog(tmp_path)
    ds = cat.dataset("w")
    src = choose(80, cat.steps("w"), slice(200, 400), None, cat.layer_map("w"))
    assert src.kind == SAMPLE and src.positions.size == 20
    assert set(src.positions.tolist()) >= {0, 39, 40, 79}  # each layer's ends
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=w&scale=raw&by=layer"))
    ref = A.fluctuation(ds.isel(neuron=src.positions), 200)
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_STD]
    np.testing.assert_allclose(bar.y, [np.median(ref.bn_std.values[:10]),
                                       np.median(ref.bn_std.values[10:])])
    assert "fluctuation of 20 of 80 neurons" in fig.layout.title.text
    # bars of chosen neurons are theirs exactly, sampled or not
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=w&scale=raw&neuron=fc1:7"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_STD]
    assert bar.y[0] == pytest.approx(float(A.fluctuation(ds, 200).bn_std[7]))


def test_the_source_rules():
    steps = np.arange(1000)
    w = _windows(np.arange(0, 1000, 200), 200).assign_coords(
        {S.NEURON: np.arange(10)})
    narrow = _windows(np.arange(0, 1000, 200), 200).assign_coords({S.NEURON: np.arange(5)})
    last = slice(800, 1000)
    assert choose(5, steps, last, narrow).kind == SERIES  # small: the exact series
    assert choose(5, steps, last, w).kind == WINDOWS  # the summaries cover more channels
    assert choose(10**6, steps, last, narrow).exact  # too large, aligned: exact summaries
    inexact = choose(10**6, steps, slice(750, 1000), narrow)
    assert inexact.kind == WINDOWS and not inexact.exact and inexact.windows == (4, 5)
    assert choose(10**6, steps, slice(950, 1000), narrow).kind == SERIES  # nothing else fits
    assert choose(10**6, steps, last, None, {"a": np.arange(10**6)}).kind == SAMPLE
