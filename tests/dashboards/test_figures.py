"""Figure builders on synthetic runs: traces, axes and values checked against the data."""

import numpy as np
import pytest

from dashboard_fixtures import synthetic_run
from statscope import analyses as A
from statscope import schema as S
from statscope.dashboards.bars import fluctuation_figure
from statscope.dashboards.evolution import evolution_figure
from statscope.dashboards.heatmap import heatmap_figure
from statscope.dashboards.runinfo import run_summary
from statscope.dashboards.scatter import scatter_figure
from statscope.dashboards.state import Window
from statscope.dashboards.style import STAT_COLORS


def _traces(fig, **meta):
    return [t for t in fig.data if t.meta and all(t.meta.get(k) == v for k, v in meta.items())]


def test_evolution_draws_each_statistic_of_each_neuron_over_the_last_200_steps(two_runs):
    fig = evolution_figure(two_runs, [("fc1", 0), ("fc2", 3)], Window())
    assert len(fig.data) == 2 * 2 * 4  # runs x neurons x statistics
    for run, ds in two_runs.items():
        for layer, unit in [("fc1", 0), ("fc2", 3)]:
            i = int(np.flatnonzero((ds.layer.values == layer) & (ds.unit.values == unit))[0])
            for stat in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD):
                (tr,) = _traces(fig, run=run, neuron=[layer, unit], stat=stat)
                np.testing.assert_array_equal(tr.x, ds.step.values[-200:])
                np.testing.assert_array_equal(tr.y, ds[stat].values[-200:, i])
                assert tr.line.color == STAT_COLORS[stat]
    # one legend entry per statistic, columns titled with the batch size
    assert sorted(t.name for t in fig.data if t.showlegend) == ["BN_mean", "BN_std", "EN_mean",
                                                                 "EN_std"]
    titles = [a.text for a in fig.layout.annotations]
    assert "bs4 (batch size 4)" in titles and "bs128 (batch size 128)" in titles
    assert fig.layout.xaxis.title.text is None
    # 2 panels of 4 rows (axes 1-4 and 5-8): each panel's bottom row carries the step title
    assert fig.layout.xaxis4.title.text == fig.layout.xaxis8.title.text == "training step"
    assert "fc1[0] mean" in fig.layout.yaxis.title.text
    assert "activation units" in fig.layout.yaxis.title.text
    # the same row of both runs shares its y axis; a run's rows share its step axis
    assert fig.layout.yaxis6.matches == "y2" and fig.layout.xaxis6.matches == "x5"


def test_evolution_downsamples_long_windows_and_resolves_a_zoom():
    ds = synthetic_run(n_steps=20_000, layers=(("fc1", 2),))
    col = ds.bn_std.values[:, 0]
    fig = evolution_figure({"r": ds}, [("fc1", 0)], Window("all"), n_points=500)
    (tr,) = _traces(fig, stat=S.BN_STD)
    assert len(tr.x) <= 500 and tr.meta["downsampled"]
    assert tr.y.max() == col.max() and tr.y.min() == col.min()
    assert "envelope" in fig.layout.title.text
    fig = evolution_figure({"r": ds}, [("fc1", 0)], Window("all"), xrange=(1000, 1300),
                           n_points=500)
    (tr,) = _traces(fig, stat=S.BN_STD)
    np.testing.assert_array_equal(tr.x, np.arange(1000, 1301))
    np.testing.assert_array_equal(tr.y, col[1000:1301])
    assert not tr.meta["downsampled"] and list(fig.layout.xaxis.range) == [1000, 1300]


def test_evolution_range_window_and_missing_neuron(two_runs):
    fig = evolution_figure(two_runs, [("fc1", 1), ("fc9", 0)], Window("range", start=10, stop=19))
    (tr,) = _traces(fig, run="bs4", neuron=["fc1", 1], stat=S.BN_MEAN)
    np.testing.assert_array_equal(tr.x, np.arange(10, 20))
    assert not _traces(fig, neuron=["fc9", 0])
    assert "Choose" in evolution_figure({}, [], Window()).layout.annotations[0].text


@pytest.fixture
def analysed(two_runs):
    fl = {r: A.fluctuation(ds, 200) for r, ds in two_runs.items()}
    ci = {r: A.fluctuation_ci(ds, 200, n_boot=100) for r, ds in two_runs.items()}
    base = {r: A.sampling_baseline(ds, 200) for r, ds in two_runs.items()}
    return fl, ci, base


def test_fluctuation_bars_are_the_analyses_values_with_their_intervals(analysed):
    fl, ci, base = analysed
    neurons = [("fc1", 0), ("fc2", 2)]
    fig = fluctuation_figure(fl, neurons=neurons, ci=ci, baseline=base)
    for run in fl:
        for stat in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD):
            (bar,) = [t for t in _traces(fig, run=run, stat=stat) if t.type == "bar"]
            np.testing.assert_allclose(bar.y, fl[run][stat].values[[0, 6]])
            assert list(bar.customdata) == ["fc1[0]", "fc2[2]"]
            lo, est, hi = ci[run][stat].sel(layer="fc1", quantity="first").values
            assert bar.error_y.array[0] == pytest.approx(hi - bar.y[0])
            assert bar.error_y.arrayminus[0] == pytest.approx(bar.y[0] - lo)
            assert np.isnan(bar.error_y.array[1])  # fc2[2] is not its layer's first neuron
        (tick,) = [t for t in _traces(fig, run=run, stat=S.BN_STD) if t.type == "scatter"]
        np.testing.assert_allclose(tick.y, base[run][S.BN_STD].values[[0, 6]])
        assert tick.marker.color == "#111"  # black, as the legend and the docs say
    assert fig.layout.yaxis.title.text.startswith("fluctuation (std over steps")


def test_fluctuation_bars_per_layer_are_medians_with_median_intervals(analysed):
    fl, ci, _ = analysed
    summary = {r: A.layer_summary(f) for r, f in fl.items()}
    fig = fluctuation_figure(fl, by="layer", summary=summary, ci=ci, scale_free=True)
    (bar,) = _traces(fig, run="bs4", stat=S.BN_STD)
    ref = [np.median(fl["bs4"].bn_std.values[fl["bs4"].layer.values == L]) for L in ("fc1", "fc2")]
    np.testing.assert_allclose(bar.y, ref)
    lo = ci["bs4"].bn_std.sel(quantity="median", bound="lower").values
    np.testing.assert_allclose(bar.y - bar.error_y.arrayminus, lo)
    assert "δ/σ" in fig.layout.yaxis.title.text


def test_scatter_has_one_point_per_neuron_coloured_by_layer(two_runs):
    fl = {r: A.fluctuation(ds, 200, scale_free=True) for r, ds in two_runs.items()}
    fig = scatter_figure(fl)
    for run, f in fl.items():
        for layer in ("fc1", "fc2"):
            (tr,) = _traces(fig, run=run, layer=layer)
            sel = f.layer.values == layer
            np.testing.assert_allclose(tr.x, f.bn_mean.values[sel])
            np.testing.assert_allclose(tr.y, f.bn_std.values[sel])
            assert list(tr.customdata) == [f"{layer}:{u}" for u in range(4)]
    colors = {t.name: t.marker.color for t in fig.data if t.name in ("fc1", "fc2")}
    assert colors["fc1"] != colors["fc2"]
    diag = [t for t in fig.data if t.name == "diagonal"]
    assert len(diag) == 2 and list(diag[0].x) == list(diag[0].y)


def test_heatmap_bins_are_means_of_consecutive_steps():
    ds = synthetic_run(n_steps=2500, layers=(("fc1", 3), ("fc2", 5)))
    fig = heatmap_figure(ds, "fc2", S.BN_STD, Window("all"), run="r", n_bins=100)
    (hm,) = fig.data
    width = hm.meta["bin_width"]
    assert width == 25 and np.asarray(hm.z).shape == (5, 100)
    ref = ds.bn_std.values[:, 3:8].reshape(100, 25, 5).mean(axis=1).T
    np.testing.assert_allclose(np.asarray(hm.z), ref, rtol=1e-5)
    np.testing.assert_array_equal(hm.x, np.arange(0, 2500, 25))
    assert list(hm.y) == [0, 1, 2, 3, 4]
    assert "BN_std" in hm.colorbar.title.text and fig.layout.xaxis.title.text == "training step"
    assert "no layer" in heatmap_figure(ds, "fc9", S.BN_STD, Window(), run="r") \
        .layout.annotations[0].text


def test_run_summary_lists_settings_status_and_overhead(two_runs):
    s = run_summary("bs4", two_runs["bs4"])
    rows = dict(s.rows)
    assert (s.status, s.n_steps, s.last_step) == ("completed", 400, 399)
    assert rows["batch size"] == "4" and rows["probe overhead"] == "3.1% of step time"
    assert rows["layers"] == "2: fc1, fc2"


@pytest.mark.parametrize("n_runs", [1, 22, 27, 40])
def test_any_number_of_runs_draws_valid_figures_in_wrapped_rows(n_runs):
    """22 runs used to fail in make_subplots' spacing check (27 for the scatter)."""
    runs = {f"r{i}": synthetic_run(n_steps=60, seed=i) for i in range(n_runs)}
    fl = {r: A.fluctuation(ds, 50) for r, ds in runs.items()}
    figs = [evolution_figure(runs, [("fc1", 0)], Window("last", 50), scalars=["loss"]),
            fluctuation_figure(fl, neurons=[("fc1", 0)]), scatter_figure(fl)]
    for fig in figs:  # go.Figure validated every property
        layout = fig.to_plotly_json()["layout"]
        xs = [v["domain"] for k, v in layout.items() if k.startswith("xaxis")]
        assert all(0 <= a < b <= 1 for a, b in xs)
        assert {t.meta["run"] for t in fig.data if t.meta and "run" in t.meta} == set(runs)
    # six panels side by side at most: past them the panels wrap into further rows
    evo = figs[0].to_plotly_json()["layout"]
    lefts = {round(v["domain"][0], 6) for k, v in evo.items() if k.startswith("xaxis")}
    assert len(lefts) == min(n_runs, 6)
    assert evo["height"] >= 100 + -(-n_runs // 6) * (120 + 2 * 190)


def test_evolution_keeps_within_the_points_budget_and_says_so():
    """256 neurons × all steps of a 12,000-step run: the figure draws at most MAX_POINTS."""
    from statscope.dashboards.limits import MAX_POINTS, MIN_TRACE_POINTS

    ds = synthetic_run(n_steps=12_000, layers=(("fc1", 16),))
    neurons = [("fc1", u) for u in range(16)]
    fig = evolution_figure({"a": ds, "b": ds}, neurons, Window("all"), scalars=["loss"])
    lines = [t for t in fig.data if t.meta and not t.meta.get("placeholder")]
    assert len(lines) == 2 * (16 * 4 + 1)
    total = sum(len(t.x) for t in lines)
    assert total <= MAX_POINTS and all(len(t.x) >= MIN_TRACE_POINTS for t in lines)
    (tr,) = _traces(fig, run="a", neuron=["fc1", 3], stat=S.BN_STD)
    col = ds.bn_std.values[:, 3]
    assert tr.y.max() == col.max() and tr.y.min() == col.min()  # the envelope keeps extremes
    assert "envelope of ≤" in fig.layout.title.text


def test_evolution_refuses_a_view_that_would_read_too_much(monkeypatch):
    from statscope.dashboards import evolution

    monkeypatch.setattr(evolution, "MAX_READ_VALUES", 1000)
    fig = evolution_figure({"a": synthetic_run(n_steps=400)}, [("fc1", 0)], Window("all"))
    assert "would read 1,600 values (the limit is 1,000)" in fig.layout.annotations[0].text


def test_scalars_share_the_step_axis_and_a_missing_neuron_or_scalar_is_noted():
    a = synthetic_run(n_steps=300, layers=(("fc1", 2), ("fc2", 2)), seed=1)
    b = synthetic_run(n_steps=500, layers=(("conv1", 2),), seed=2)
    b.attrs["scalars"] = []
    fig = evolution_figure({"a": a, "b": b}, [("fc1", 1), ("conv1", 0)], Window("all"),
                           scalars=["loss"])
    (loss,) = _traces(fig, run="a", scalar="loss")
    np.testing.assert_array_equal(loss.x, a.step.values)
    np.testing.assert_array_equal(loss.y, a.loss.values)
    layout = fig.to_plotly_json()["layout"]
    (stat,) = _traces(fig, run="a", neuron=["fc1", 1], stat=S.BN_MEAN)
    # the loss row and the statistics rows of a run share one step axis
    assert layout["xaxis" + stat.xaxis[1:]].get("matches", stat.xaxis) == loss.xaxis
    notes = sorted(a.text for a in fig.layout.annotations if a.text.startswith("no "))
    assert notes == ["no conv1[0] in a"] * 2 + ["no fc1[1] in b"] * 2 + ["no loss logged in b"]
    # an empty cell joins no shared axis (plotly would count it as the range [-1, 6])
    for t in fig.data:
        if t.meta.get("placeholder"):
            n = t.xaxis[1:]
            assert "matches" not in layout["xaxis" + n] and "matches" not in layout["yaxis" + n]


def test_heatmap_of_a_wide_layer_bins_units_and_steps_within_budget():
    from statscope.dashboards.limits import MAX_HEATMAP_CELLS, MAX_HEATMAP_ROWS

    ds = synthetic_run(n_steps=3000, layers=(("wide", 1024),), groups=4)
    fig = heatmap_figure(ds, "wide", S.BN_MEAN, Window("all"), run="r")
    (hm,) = fig.data
    z = np.asarray(hm.z)
    assert z.shape[0] <= MAX_HEATMAP_ROWS and z.size <= MAX_HEATMAP_CELLS
    uw, bw = hm.meta["unit_width"], hm.meta["bin_width"]
    assert uw == 4 and z.shape == (256, -(-3000 // bw))
    ref = ds.bn_mean.values[:bw, :uw].mean()
    assert z[0, 0] == pytest.approx(ref, rel=1e-5)
    assert "mean of 4 neurons per row" in fig.layout.title.text


def test_heatmap_of_a_per_set_statistic_is_labelled_and_centred_like_the_means():
    ds = synthetic_run(n_steps=400, layers=(("fc1", 3), ("fc2", 5)))
    ds[S.SET_MEAN] = ds[S.EN_MEAN] * 2 - 1  # expanded to neurons on read, as open_run gives it
    ds[S.SET_STD_SD] = abs(ds[S.EN_STD]) / 3
    fig = heatmap_figure(ds, "fc1", S.SET_MEAN, Window("all"), run="r", n_bins=40)
    (hm,) = fig.data
    ref = ds[S.SET_MEAN].values[:, :3].reshape(40, 10, 3).mean(axis=1).T
    np.testing.assert_allclose(np.asarray(hm.z), ref, rtol=1e-5)
    assert "set_mean" in hm.colorbar.title.text and "activation units" in hm.colorbar.title.text
    assert hm.zmid == 0  # a mean: diverging around zero, like BN_mean and EN_mean
    (sd,) = heatmap_figure(ds, "fc1", S.SET_STD_SD, Window("all"), run="r", n_bins=40).data
    assert "sd of set_std" in sd.colorbar.title.text and sd.zmid is None


def test_deep_layer_names_become_titles_of_short_lines_that_keep_what_tells_them_apart():
    from statscope.dashboards.style import layer_titles

    names = ["mobilevit.conv_stem.normalization",
             "mobilevit.encoder.layer.0.layer.0.expand_1x1.normalization",
             "mobilevit.encoder.layer.0.layer.1.expand_1x1.normalization",
             "mobilevit.encoder.layer.2.transformer.layer.0.layernorm_before"]
    titles = layer_titles(names, 18)
    assert len(set(titles.values())) == len(names)
    for name, title in titles.items():
        lines = title.split("<br>")
        # every line fits, unless it is one dotted part too long to break
        assert all(len(line) <= 18 or line.strip("….").count(".") == 0 for line in lines)
        assert "…" + name.removeprefix("mobilevit.") == "".join(lines)  # the shared head only
    deep = ["vit.encoder.layer.0.norm", "vit.encoder.layer.11.norm"]
    assert [t.replace("<br>", "") for t in layer_titles(deep, 12).values()] == \
        ["…layer.0.norm", "…layer.11.norm"]  # an index keeps the part it indexes
    assert layer_titles(["fc1", "fc2"]) == {"fc1": "fc1", "fc2": "fc2"}


def test_tick_labels_under_bars_leave_out_the_shared_head_and_keep_the_end_of_long_paths(
        two_runs):
    from statscope.dashboards.style import tick_texts

    labels = ["mobilevit.conv_stem.normalization[0]",
              "mobilevit.encoder.layer.1.layer.0.expand_1x1.normalization[0]"]
    assert tick_texts(labels, 28) == ["…conv_stem.normalization[0]",
                                      "…" + labels[1][-28:]]
    assert tick_texts(["fc1[0]", "fc2[3]"]) == ["fc1[0]", "fc2[3]"]
    fig = fluctuation_figure({r: A.fluctuation(ds) for r, ds in two_runs.items()},
                             neurons=[("fc1", 0), ("fc2", 3)])
    assert list(fig.layout.xaxis.ticktext) == ["fc1[0]", "fc2[3]"]
