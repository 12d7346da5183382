"""Callbacks called directly, as Dash would call them."""

import numpy as np
import pytest
from dash import no_update
from dash.exceptions import PreventUpdate

from dashboard_fixtures import figure, synthetic_run
from statscope import analyses as A
from statscope import schema as S
from statscope.dashboards import callbacks as cb
from statscope.dashboards.app import create_app
from statscope.dashboards.data import RunCatalog
from statscope.dashboards.state import ViewState


@pytest.fixture
def catalog(two_runs):
    return RunCatalog.from_datasets(two_runs)


CONTROLS = dict(runs=None, neurons=None, layer=None, stat=S.BN_STD, win_kind="last", win_n=200,
                win_start=None, win_stop=None, scale="scale_free", by="neuron", tab="evolution",
                page=0, scalars=None, click=None)


def _sync(catalog, trigger, search, **changes):
    values = {**CONTROLS, **changes}
    return cb.sync_state(catalog, trigger, search, None, *values.values())


def test_page_load_fills_defaults_and_sets_selectors_with_their_options(catalog):
    out = _sync(catalog, None, "")
    search, run_opts, neuron_opts, layer_opts, page_opts, scalar_opts, runs, neurons, layer = \
        out[:9]
    state = ViewState.from_query(search)
    assert state.runs == ("bs4", "bs128") and runs == ["bs4", "bs128"]
    assert neurons == ["fc1:0", "fc2:0"]  # the paper's neuron i-1 of every layer
    assert layer == "fc1"
    assert [o["value"] for o in run_opts] == ["bs4", "bs128"]
    assert {o["value"] for o in neuron_opts} >= set(neurons)
    assert [o["value"] for o in layer_opts] == ["fc1", "fc2"]
    assert page_opts == [] and [o["value"] for o in scalar_opts] == ["loss"]
    assert out[18] == ["loss"] and state.scalars == ("loss",)
    assert out[19] == [] and out[20] == "merged"  # no distributed run: no rank choices


def test_a_selector_change_rewrites_the_url_only(catalog):
    out = _sync(catalog, "win-kind", "?run=bs4", runs=["bs4"], neurons=["fc2:1"], layer="fc2",
                win_kind="range", win_start=5, win_stop=50, tab="heatmap")
    state = ViewState.from_query(out[0])
    assert state.runs == ("bs4",) and state.neurons == ("fc2:1",) and state.tab == "heatmap"
    assert state.window.spec() == "5:50"
    assert all(v is no_update for v in out[1:6])  # no option changes
    # only the selectors the catalog corrected are set: no scalars chosen stays none
    assert all(v is no_update for v in out[6:21])
    assert out[21] == []  # no run is gone: nothing to say (a notice of an earlier view clears)


def test_a_url_with_foreign_paths_shows_only_runs_under_the_root(catalog):
    out = _sync(catalog, "url", "?run=../../etc&run=/tmp/x&run=bs128&neuron=zz:1")
    state = ViewState.from_query(out[0])
    assert state.runs == ("bs128",) and state.neurons == ("fc1:0", "fc2:0")


def test_a_click_on_a_scatter_point_opens_that_neurons_evolution(catalog):
    click = {"points": [{"customdata": "fc2:3", "x": 0.1, "y": 0.2}]}
    out = _sync(catalog, "scatter-graph", "?tab=scatter&run=bs4", runs=["bs4"], tab="scatter",
                click=click)
    state = ViewState.from_query(out[0])
    assert state.tab == "evolution" and state.neurons == ("fc2:3",)
    assert out[7] == ["fc2:3"] and out[16] == "evolution"


def test_zoom_events_are_parsed():
    assert cb.zoom_range({"xaxis3.range[0]": 10.5, "xaxis3.range[1]": 2.0}) == (2.0, 10.5)
    assert cb.zoom_range({"xaxis.range": [5, 9]}) == (5.0, 9.0)
    assert cb.zoom_range({"xaxis.autorange": True, "yaxis.autorange": True}) is None
    assert cb.zoom_range({"autosize": True}) is False
    assert cb.zoom_range({"yaxis.range[0]": 1, "yaxis.range[1]": 2}) is False
    with pytest.raises(PreventUpdate):
        cb.zoom_store({"dragmode": "pan"}, "")


def test_evolution_callback_follows_the_url_and_a_zoom_of_the_same_view(catalog, two_runs):
    search = "?run=bs4&neuron=fc1:2&window=all"
    fig = figure(cb.evolution(catalog, search))
    (tr,) = [t for t in fig.data if t.meta.get("stat") == S.BN_STD]
    np.testing.assert_array_equal(tr.y, two_runs["bs4"].bn_std.values[:, 2])
    zoom = cb.zoom_store({"xaxis.range[0]": 100, "xaxis.range[1]": 120}, search)
    fig = figure(cb.evolution(catalog, search, None, zoom))
    (tr,) = [t for t in fig.data if t.meta.get("stat") == S.BN_STD]
    np.testing.assert_array_equal(tr.x, np.arange(100, 121))
    # a zoom taken on another view does not apply
    fig = figure(cb.evolution(catalog, "?run=bs4&neuron=fc1:2&window=last:50", None, zoom))
    (tr,) = [t for t in fig.data if t.meta.get("stat") == S.BN_STD]
    np.testing.assert_array_equal(tr.x, np.arange(350, 400))


def test_runs_of_different_lengths_keep_their_own_axes_and_zooms():
    from statscope.dashboards.evolution import evolution_figure
    from statscope.dashboards.state import Window

    runs = {"long": synthetic_run(n_steps=2000, batch_size=4, seed=1),
            "short": synthetic_run(n_steps=300, batch_size=128, seed=2)}
    fig = evolution_figure(runs, [("fc1", 0)], Window("last", 200))
    spans = {t.meta["run"]: (t.x[0], t.x[-1]) for t in fig.data if t.meta.get("stat") == S.BN_MEAN}
    assert spans == {"long": (1800, 1999), "short": (100, 299)}
    layout = fig.to_plotly_json()["layout"]
    # every row of a run's panel follows that run's step axis, never the other run's
    base = {}
    for t in fig.data:
        axis = layout["xaxis" + t.xaxis[1:]]
        base.setdefault(t.meta["run"], set()).add(axis.get("matches", t.xaxis))
    assert len(base["long"]) == len(base["short"]) == 1 and base["long"] != base["short"]
    # a zoom on the second column's axis narrows that run only
    zoom = {"view": None, "range": [150.0, 160.0], "axis": 2}
    fig = evolution_figure(runs, [("fc1", 0)], Window("last", 200),
                           xrange={"short": tuple(zoom["range"])})
    spans = {t.meta["run"]: (t.x[0], t.x[-1]) for t in fig.data if t.meta.get("stat") == S.BN_MEAN}
    assert spans == {"long": (1800, 1999), "short": (150, 160)}


def test_a_zoom_applies_to_the_column_it_was_made_in(catalog, two_runs):
    search = "?run=bs4&run=bs128&neuron=fc1:2&window=all"
    # bs128's panel holds axes 4-6 (loss, means, stds); a zoom on any of them is its zoom
    zoom = cb.zoom_store({"xaxis5.range[0]": 100, "xaxis5.range[1]": 120}, search)
    assert zoom["axis"] == 5
    fig = figure(cb.evolution(catalog, search, None, zoom))
    spans = {t.meta["run"]: (t.x[0], t.x[-1]) for t in fig.data if t.meta.get("stat") == S.BN_STD}
    assert spans["bs128"] == (100, 120) and spans["bs4"][1] - spans["bs4"][0] > 20


def test_fluctuation_scatter_heatmap_and_run_callbacks(catalog, two_runs):
    fig = figure(cb.fluctuation(catalog, "?run=bs128&scale=raw&neuron=fc1:0"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta.get("stat") == S.BN_MEAN]
    assert bar.y[0] == pytest.approx(float(A.fluctuation(two_runs["bs128"], 200).bn_mean[0]))
    assert any(t.meta.get("baseline") for t in fig.data if t.type == "scatter")
    fig = figure(cb.fluctuation(catalog, "?run=bs128&by=layer"))
    assert [t.type for t in fig.data] == ["bar"] * 4
    fig = figure(cb.scatter(catalog, "?run=bs4&run=bs128"))
    assert {t.meta["run"] for t in fig.data if t.meta} == {"bs4", "bs128"}
    fig = figure(cb.heatmap(catalog, "?run=bs4&layer=fc2&stat=en_mean&window=all"))
    assert fig.data[0].meta == {"run": "bs4", "layer": "fc2", "stat": S.EN_MEAN, "bin_width": 1,
                                 "unit_width": 1}
    cards = cb.runs_tab(catalog, "?run=bs4")
    text = str(cards)
    assert "bs4" in text and "holds" in text and "probe overhead" in text


def test_window_longer_than_the_run_says_so_instead_of_failing(catalog):
    fig = figure(cb.fluctuation(catalog, "?run=bs4&window=last:5000"))
    assert "longer than run" in fig.layout.annotations[0].text


def test_a_run_too_short_for_the_window_is_left_out_of_the_others_figure(two_runs):
    # one short run among those chosen blanked the fluctuation and scatter figures of all
    catalog = RunCatalog.from_datasets({**two_runs, "short": synthetic_run(n_steps=5, seed=3)})
    for callback in (cb.fluctuation, cb.scatter):
        fig = figure(callback(catalog, "?run=bs4&run=short&run=bs128&neuron=fc1:0"))
        assert {t.meta["run"] for t in fig.data if t.meta and "run" in t.meta} == {"bs4", "bs128"}
        text = " ".join([fig.layout.title.text or "", *(a.text for a in fig.layout.annotations)])
        assert "short left out: window=200: longer than run" in text
    fig = figure(cb.fluctuation(catalog, "?run=short"))
    assert "longer than run" in fig.layout.annotations[0].text


def test_a_damaged_run_says_so_in_its_panel_and_the_others_draw(tmp_path):
    # one flipped byte of a chunk: Evolution and the layer overview answered HTTP 500, for
    # every run of the page (an outside check)
    from dashboard_fixtures import write_synthetic

    for name in ("good", "damaged"):
        write_synthetic(tmp_path / name, synthetic_run(n_steps=60))
    shard = sorted((tmp_path / "damaged" / S.BN_MEAN / "c").rglob("*"))
    shard = next(p for p in shard if p.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    cat = RunCatalog(tmp_path)
    fig = figure(cb.evolution(cat, "?run=damaged&run=good&neuron=fc1:0&window=all"))
    assert {t.meta["run"] for t in fig.data if t.meta and "stat" in t.meta} == {"good"}
    assert any("damaged cannot be read" in a.text and "bn_mean" in a.text
               for a in fig.layout.annotations)
    fig = figure(cb.heatmap(cat, "?tab=heatmap&run=damaged&stat=bn_mean&layer=fc1"))
    assert "bn_mean" in fig.layout.annotations[0].text and not fig.data


def test_non_finite_values_the_curves_skip_are_said(two_runs):
    # the envelope drops NaN and the line joined straight across them, with no word of it
    ds = two_runs["bs4"].copy(deep=True)
    ds[S.BN_MEAN].values[99:105, 0] = np.nan
    ds.attrs = {**ds.attrs, S.ATTR_NONFINITE: {S.BN_MEAN: 6}}
    fig = figure(cb.evolution(RunCatalog.from_datasets({"bs4": ds}), "?run=bs4&neuron=fc1:0"))
    text = " ".join([fig.layout.title.text or "", *(a.text for a in fig.layout.annotations)])
    assert "bs4: 6 non-finite values" in text
    clean = figure(cb.evolution(RunCatalog.from_datasets(two_runs), "?run=bs4&neuron=fc1:0"))
    assert "non-finite" not in (clean.layout.title.text or "")


def test_a_layer_that_skips_steps_is_named_over_the_bars(two_runs):
    # layer drop: fc2 ran in 25 of the window's 200 steps; its bar rests on those
    ds = two_runs["bs4"].copy(deep=True)
    fc2 = (ds[S.LAYER] == "fc2").values
    idle = np.setdiff1d(np.arange(ds.sizes[S.STEP]), np.arange(0, ds.sizes[S.STEP], 8))
    for var in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD, S.COUNT):
        ds[var].values[np.ix_(idle, fc2)] = 0 if var == S.COUNT else np.nan
    fig = figure(cb.fluctuation(RunCatalog.from_datasets({"bs4": ds}), "?run=bs4"))
    text = " ".join([fig.layout.title.text or "", *(a.text for a in fig.layout.annotations)])
    assert "bs4: layers with values in only some of the window's 200 steps: 'fc2' in 25" in text


def test_poll_reports_new_and_grown_runs(tmp_path):
    from dashboard_fixtures import write_synthetic

    write_synthetic(tmp_path / "a", synthetic_run(n_steps=30))
    cat = RunCatalog(tmp_path)
    assert cat.errors() == {}, cat.errors()
    version, badges, notice = cb.poll(cat, 0, None, max_age=0)
    assert version == {"a": 0} and "a · completed · step 29" in str(badges)
    with pytest.raises(PreventUpdate):
        cb.poll(cat, 1, version, max_age=0)
    write_synthetic(tmp_path / "b", synthetic_run(n_steps=30), status=S.STATUS_RUNNING)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "zarr.json").write_text("{}")
    stale = version
    version, badges, notice = cb.poll(cat, 2, version, max_age=0)
    assert set(version) == {"a", "b", "c"} and "b · running" in str(badges)
    assert "Could not open c" in str(notice)
    # a second page still holding the old token learns of the change, although the rescan
    # that found it was the first page's
    assert cb.poll(cat, 2, stale, max_age=60)[0] == version
    with pytest.raises(PreventUpdate):
        cb.poll(cat, 3, version, max_age=60)


def test_create_app_builds_a_layout_with_every_view(store_root):
    app = create_app(store_root)
    ids = str(app.layout)
    for graph in ("evolution-graph", "fluctuation-graph", "scatter-graph", "heatmap-graph",
                  "run-panel", "url", "poll"):
        assert graph in ids
    assert app.catalog.names() == ["bs4", "bs128"]
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    # Dash answers every unknown path with its page; no path reads a file outside the package
    for path in ("/../../etc/passwd", "/assets/../../../../etc/passwd",
                 "/assets/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/_dash-component-suites/../x"):
        body = client.get(path).get_data(as_text=True)
        assert "root:" not in body


def test_prewarm_computes_the_default_analyses_ahead(store_root, monkeypatch):
    from statscope.dashboards import metrics

    app = create_app(store_root, warm=False)
    cat = app.catalog
    before = len(cat.cache)
    cb.prewarm(cat)
    assert len(cat.cache) > before
    ran = []
    real = metrics.analysis

    def spy(name):
        fn = real(name)
        return None if fn is None else (lambda *a, **k: ran.append(name) or fn(*a, **k))

    monkeypatch.setattr(metrics, "analysis", spy)
    cb.fluctuation(cat, "?run=bs4")  # served from what prewarm computed
    cb.runs_tab(cat, "?run=bs4")
    cb.scatter(cat, "?run=bs4")
    assert ran == []
    cb.fluctuation(cat, "?run=bs4&window=last:100")  # not prewarmed: computed now
    assert "fluctuation" in ran


def test_a_url_asking_for_256_neurons_of_a_long_run_stays_within_budget():
    """One URL used to cost 55 s and up to 78 MB: 256 neurons × all 12,000 steps."""
    import json

    import plotly

    from statscope.dashboards.limits import MAX_NEURONS, MAX_POINTS

    ds = synthetic_run(n_steps=12_000, layers=(("fc1", 128), ("fc2", 128)), groups=4)
    cat = RunCatalog.from_datasets({"long": ds})
    keys = "".join(f"&neuron=fc{1 + i // 128}:{i % 128}" for i in range(256))
    spec = cb.evolution(cat, "?run=long&window=all" + keys)
    body = json.dumps(spec, cls=plotly.utils.PlotlyJSONEncoder)
    fig = figure(spec)
    drawn = {tuple(t.meta["neuron"]) for t in fig.data if "neuron" in t.meta}
    assert len(drawn) == MAX_NEURONS
    assert sum(len(t.x) for t in fig.data) <= MAX_POINTS
    assert len(body) < 2_500_000
    assert f"The first {MAX_NEURONS} of the 256 chosen neurons" in fig.layout.title.text
    # the bars draw the same 16 and say so too
    bars = figure(cb.fluctuation(cat, "?run=long&scale=raw" + keys))
    assert len([t for t in bars.data if t.type == "bar"][0].x) == MAX_NEURONS
    assert "The first 16 of the 256" in bars.layout.title.text


def test_many_runs_are_paged_and_the_page_says_which():
    runs = {f"s{i}": synthetic_run(n_steps=50, seed=i) for i in range(23)}
    cat = RunCatalog.from_datasets(runs)
    names = cat.names()
    query = "?window=all&" + "&".join(f"run={n}" for n in names)
    for page, expect in [(1, names[:6]), (4, names[18:]), (99, names[18:])]:
        v = cb.view(cat, query + f"&page={page}")
        assert list(v.runs) == expect
        for fn in (cb.evolution, cb.fluctuation, cb.scatter):
            fig = figure(fn(cat, query + f"&page={page}"))
            assert {t.meta["run"] for t in fig.data if t.meta and "run" in t.meta} == set(expect)
    assert "Runs 19–23 of 23 (page 4 of 4" in v.notes[0]
    out = _sync(cat, None, query + "&page=2")
    page_opts = out[4]
    assert [o["value"] for o in page_opts] == [0, 1, 2, 3] and out[17] == 1
    # choosing other runs goes back to the first page
    out = _sync(cat, "runs", query + "&page=3", runs=names[:8], page=2)
    assert ViewState.from_query(out[0]).page == 0


def test_runs_of_different_models_each_bring_their_default_neurons():
    a = synthetic_run(n_steps=100, layers=(("fc1", 2), ("fc2", 2)))
    b = synthetic_run(n_steps=100, layers=(("conv1", 3), ("conv2", 3)))
    cat = RunCatalog.from_datasets({"mlp": a, "cnn": b})
    out = _sync(cat, None, "?run=mlp&run=cnn&window=all")
    assert out[7] == ["fc1:0", "fc2:0", "conv1:0", "conv2:0"]
    fig = figure(cb.evolution(cat, out[0]))
    notes = [n.text for n in fig.layout.annotations if n.text.startswith("no ")]
    assert sorted(set(notes)) == ["no conv1[0] in mlp", "no conv2[0] in mlp", "no fc1[0] in cnn",
                                  "no fc2[0] in cnn"]
    bars = figure(cb.fluctuation(cat, out[0]))
    assert any("no fc1[0], fc2[0] in cnn" in n.text for n in bars.layout.annotations)


def test_a_deep_model_defaults_to_neurons_spread_over_its_depth():
    from statscope.dashboards.limits import MAX_NEURONS

    ds = synthetic_run(n_steps=20, layers=tuple((f"l{i}", 2) for i in range(80)), groups=1)
    cat = RunCatalog.from_datasets({"deep": ds})
    neurons = cb.default_neurons(cat, ["deep"])
    assert len(neurons) == MAX_NEURONS and neurons[0] == "l0:0" and neurons[-1] == "l79:0"


def test_typing_in_the_neuron_selector_searches_every_neuron_of_the_chosen_runs():
    ds = synthetic_run(n_steps=20, layers=(("fc1", 300), ("fc2", 300)), groups=1)
    cat = RunCatalog.from_datasets({"r": ds})
    out = _sync(cat, None, "?run=r")
    from statscope.dashboards.limits import MAX_OPTIONS

    assert len(out[2]) <= MAX_OPTIONS + 2  # not all 600
    out = _sync(cat, "neuron-search", "?run=r", search_value="fc2[29")
    values = [o["value"] for o in out[2]]
    assert {"fc2:29", "fc2:290", "fc2:299"} <= set(values)
    assert not [v for v in values if v.startswith("fc2:") and not v[4:].startswith("29")
                and v != "fc2:0"]
    assert all(v is no_update for i, v in enumerate(out) if i != 2)


def test_scalars_follow_the_url_and_can_be_turned_off(catalog):
    fig = figure(cb.evolution(catalog, "?run=bs4&neuron=fc1:0"))
    assert [t.meta["scalar"] for t in fig.data if "scalar" in t.meta] == ["loss"]
    fig = figure(cb.evolution(catalog, "?run=bs4&neuron=fc1:0&scalar=-"))
    assert not [t for t in fig.data if "scalar" in t.meta]
    out = _sync(catalog, "scalars", "?run=bs4", runs=["bs4"], scalars=[])
    assert "scalar=-" in out[0]


def test_the_run_card_shows_a_dash_where_a_claim_has_no_interval():
    # "+nan, [+nan, +nan], p nan" where the report shows "—" (an outside check)
    import pandas as pd

    from statscope.dashboards.layout import run_panel
    from statscope.dashboards.runinfo import RunSummary

    claims = pd.DataFrame([{"claim": "a", "description": "BN > EN", "layer": "fc1",
                            "statistic": "mean", "effect": 1.5, "ci_low": float("nan"),
                            "ci_high": float("nan"), "p_value": float("nan"),
                            "verdict": "inconclusive", "note": "too short"}])
    card = run_panel([RunSummary("r", "completed", 10, 9, [], None)], {"r": claims}, "all")
    text = str(card)
    assert "+1.500" in text and "[—, —]" in text and "nan" not in text


def test_choosing_range_fills_its_boxes_and_a_range_being_typed_is_left_alone(catalog):
    """The window's "range" choice can be reached from the controls: choosing it keeps the
    radio on range with the boxes filled from the current window (bs4's last 200 steps are
    200..399); a range with a box empty, or backwards, leaves the URL and the boxes alone."""
    out = _sync(catalog, "win-kind", "?run=bs4", runs=["bs4"], win_kind="range")
    assert ViewState.from_query(out[0]).window.spec() == "200:399"
    assert out[10] is no_update and out[12:14] == (200, 399)  # the radio stays on range
    search = out[0]
    for start, stop in ((250, None), (None, 300), (390, 300)):
        out = _sync(catalog, "win-start", search, runs=["bs4"], win_kind="range",
                    win_start=start, win_stop=stop)
        assert out[0] is no_update and out[10:14] == (no_update,) * 4, (start, stop)
    out = _sync(catalog, "win-stop", search, runs=["bs4"], win_kind="range", win_start=250,
                win_stop=300)
    assert ViewState.from_query(out[0]).window.spec() == "250:300"
    assert out[10:14] == (no_update,) * 4
    # typing a first step while the radio says "last" chooses a range
    out = _sync(catalog, "win-start", "?run=bs4", runs=["bs4"], win_start=250)
    assert out[10] == "range" and out[12:14] == (no_update, no_update)


def test_a_run_gone_while_shown_is_named_in_a_notice(tmp_path):
    from dashboard_fixtures import write_synthetic

    for name in ("a", "c"):
        write_synthetic(tmp_path / name, synthetic_run(n_steps=50))
    cat = RunCatalog(tmp_path)
    out = _sync(cat, None, "?run=c")
    assert ViewState.from_query(out[0]).runs == ("c",) and out[21] == []
    (tmp_path / "c").rename(tmp_path / "c_renamed")
    cat.refresh()
    # the poll's new token fires the sync with the selectors as they are: still run c
    out = _sync(cat, "version", "?run=c", runs=["c"])
    assert ViewState.from_query(out[0]).runs == ("a", "c_renamed")  # the fallback
    assert out[21] == [f"Run c is not under {tmp_path} (renamed or deleted?); showing a, "
                       "c_renamed instead."]
    search = out[0]
    assert _sync(cat, "version", search, runs=["a", "c_renamed"])[21] is no_update  # it stays
    assert _sync(cat, "tab", search, runs=["a", "c_renamed"], tab="scatter")[21] == []
    # a stale link says so too
    assert "Run c is not under" in _sync(cat, None, "?run=c&run=a")[21][0]


def test_an_evolution_window_without_steps_says_why(tmp_path):
    from dashboard_fixtures import LiveRun, write_synthetic

    write_synthetic(tmp_path / "r", synthetic_run(n_steps=400))
    LiveRun(tmp_path / "empty")  # started, no step committed yet
    cat = RunCatalog(tmp_path)
    for window, span in (("900000:900100", "900,000–900,100"), ("-50:-10", "-50–-10")):
        fig = figure(cb.evolution(cat, f"?run=r&window={window}"))
        assert not fig.data
        assert [a.text for a in fig.layout.annotations] == [
            f"No steps of r in steps {span}: it has steps 0–399"]
    fig = figure(cb.evolution(cat, "?run=empty"))
    assert [a.text for a in fig.layout.annotations] == ["empty has no steps recorded yet"]
    # beside a run with steps, the empty run's panel says why and the other draws
    fig = figure(cb.evolution(cat, "?run=r&run=empty&neuron=fc1:0&scalar=-"))
    drawn = [t for t in fig.data if not t.meta.get("placeholder")]
    assert {t.meta["run"] for t in drawn} == {"r"} and all(len(t.x) == 200 for t in drawn)
    assert "empty has no steps recorded yet" in [a.text for a in fig.layout.annotations]


def test_a_scalar_or_neuron_without_a_finite_value_in_the_window_is_noted():
    ds = synthetic_run(n_steps=400)
    ds["loss"].values[300:] = np.nan
    ds[S.BN_MEAN].values[200:, 1] = np.nan
    ds[S.EN_MEAN].values[200:, 1] = np.nan
    cat = RunCatalog.from_datasets({"r": ds})
    fig = figure(cb.evolution(cat, "?run=r&neuron=fc1:0&neuron=fc1:1&window=300:399"))
    notes = [a.text for a in fig.layout.annotations if a.text.startswith("no ")]
    assert notes == ["no finite loss in r in these steps",
                     "no finite fc1[1] means in r in these steps"]
    assert all(len(t.x) for t in fig.data)  # no line without a point
    (std,) = [t for t in fig.data if t.meta.get("neuron") == ["fc1", 1]
              and t.meta.get("stat") == S.BN_STD]
    np.testing.assert_array_equal(std.y, ds[S.BN_STD].values[300:, 1])


def test_ranges_are_written_inclusive_as_in_the_url(catalog):
    """The URL's ranges include their last step; the analyses' are half-open. The page writes
    them as the URL does, in every view and message."""
    fig = figure(cb.fluctuation(catalog, "?tab=fluctuation&run=bs4&window=-50:-10"))
    assert fig.layout.annotations[0].text.startswith("window=-50:-10: outside run")
    fig = figure(cb.scatter(catalog, "?tab=scatter&run=bs4&window=3:3"))
    assert fig.layout.annotations[0].text.startswith("window=3:3: fewer than 2 steps")
    search = "?run=bs4&neuron=fc1:0&window=200:299"
    for callback in (cb.evolution, cb.fluctuation, cb.scatter, cb.heatmap):
        title = figure(callback(catalog, search)).layout.title.text
        assert "steps 200–299" in title and "[200, 300)" not in title, (callback, title)
    short = RunCatalog.from_datasets({"bs4": synthetic_run(400), "short": synthetic_run(100)})
    fig = figure(cb.fluctuation(short, "?run=bs4&run=short&window=200:299"))
    assert "short left out: window=200:299: outside run" in fig.layout.title.text
