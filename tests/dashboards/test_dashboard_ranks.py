"""Distributed runs in the dashboard: rank choices in the URL, per-rank evolution curves, the
per-rank and global fluctuation and the gap, checked against numpy on the raw batches."""

import numpy as np
import pytest
from dash import no_update
from hypothesis import given, strategies as st

from dashboard_fixtures import distributed_run, figure, merged_reference, synthetic_run, \
    write_synthetic
from statscope import schema as S
from statscope.dashboards import callbacks as cb
from statscope.dashboards.data import RunCatalog
from statscope.dashboards.evolution import evolution_figure
from statscope.dashboards.ranks import median_gap, rank_keys
from statscope.dashboards.state import EACH, MERGED, ViewState, Window
from statscope.errors import StatscopeError


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory):
    """A folder with a two-rank run (batches of 3 and 5 per step) and a single-process run."""
    root = tmp_path_factory.mktemp("runs")
    raw = distributed_run(root / "ddp", batches=(3, 5))
    write_synthetic(root / "single", synthetic_run(n_steps=400, seed=3))
    return root, raw


@pytest.fixture
def cat(ddp_root):
    return RunCatalog(ddp_root[0])


def _std(x, axis=0):
    return np.std(x, axis=axis, ddof=1)


def test_the_catalog_lists_a_distributed_run_once_with_its_ranks(cat, ddp_root):
    raw = ddp_root[1]
    assert cat.names() == ["ddp", "single"] and cat.errors() == {}
    assert cat.ranks("ddp") == (0, 1) and cat.ranks("single") == ()
    ref = merged_reference(raw)
    merged = cat.columns("ddp", S.BN_STD, [0, 5], rank=MERGED)
    np.testing.assert_allclose(merged, ref[S.BN_STD][:, [0, 5]], rtol=1e-5)
    np.testing.assert_allclose(cat.columns("ddp", S.EN_MEAN, [6], slice(390, 400), rank=1)[:, 0],
                               raw["x"][1][390:, :, 4:].reshape(10, -1).mean(1), atol=1e-6)
    # a rank's columns and the merged ones are cached apart
    assert not np.allclose(cat.columns("ddp", S.BN_STD, [0], rank=0),
                           cat.columns("ddp", S.BN_STD, [0], rank=MERGED))
    np.testing.assert_array_equal(cat.scalar("ddp", "loss", 1), 2.0)
    np.testing.assert_array_equal(cat.scalar("ddp", "loss", MERGED), 1.5)  # mean over ranks
    with pytest.raises(StatscopeError, match="rank=7: run 'ddp' has ranks 0, 1"):
        cat.view("ddp", 7)
    assert cat.view("single", 1) is cat.dataset("single")  # one set of statistics


@given(st.one_of(st.just(MERGED), st.just(EACH), st.integers(0, 10**6)),
       st.lists(st.integers(0, 64), unique=True, max_size=8).map(lambda v: tuple(sorted(v))))
def test_rank_keys_cover_the_choice_or_say_what_is_missing(choice, ranks):
    keys, note = rank_keys(ranks, choice)
    if not ranks:
        assert keys == [None] and note is None
    elif choice == EACH:
        assert keys == [*ranks, MERGED] and note is None
    elif choice == MERGED or choice in ranks:
        assert keys == [choice] and note is None
    else:
        assert keys == [MERGED] and note == f"has no rank {choice}"


def test_the_rank_choice_round_trips_through_the_url():
    for rank in (MERGED, EACH, 0, 3):
        state = ViewState(runs=("ddp",), rank=rank)
        assert ViewState.from_query(state.to_query()) == state
    assert "rank" not in ViewState(rank=MERGED).to_query()
    assert ViewState.from_query("?rank=-1").rank == MERGED
    assert ViewState.from_query("?rank=nope").rank == MERGED


def test_page_load_offers_the_ranks_of_the_chosen_runs(cat):
    out = cb.sync_state(cat, None, "?run=ddp&run=single&rank=1", None, *[None] * 4, "last",
                        200, None, None, "scale_free", "neuron", "evolution", 0, None, None)
    assert [o["value"] for o in out[19]] == [MERGED, EACH, "0", "1"] and out[20] == "1"
    # a rank no chosen run has falls back to the merged statistics
    out = cb.sync_state(cat, None, "?run=ddp&rank=4", None, *[None] * 4, "last", 200, None,
                        None, "scale_free", "neuron", "evolution", 0, None, None)
    assert out[20] == MERGED and "rank" not in out[0]
    # choosing a rank in the selector writes it into the URL
    out = cb.sync_state(cat, "rank", "?run=ddp", None, ["ddp"], None, "fc1", S.BN_STD, "last",
                        200, None, None, "scale_free", "neuron", "evolution", 0, None, None,
                        None, "each")
    assert ViewState.from_query(out[0]).rank == EACH and out[20] is no_update
    out = cb.sync_state(cat, None, "?run=single", None, *[None] * 4, "last", 200, None, None,
                        "scale_free", "neuron", "evolution", 0, None, None)
    assert out[19] == []


def test_evolution_draws_each_rank_thin_and_the_merged_statistics_exactly(cat, ddp_root):
    raw = ddp_root[1]
    ref = merged_reference(raw)
    fig = figure(cb.evolution(cat, "?run=ddp&neuron=fc2:1&rank=each&window=all&scalar=-"))
    traces = [t for t in fig.data if t.meta.get("stat") == S.BN_STD]
    assert sorted(map(str, (t.meta["rank"] for t in traces))) == ["0", "1", MERGED]
    by_rank = {t.meta["rank"]: t for t in traces}
    np.testing.assert_allclose(by_rank[MERGED].y, ref[S.BN_STD][:, 5], rtol=1e-5)
    np.testing.assert_allclose(by_rank[1].y, raw["x"][1][:, :, 5].std(1), rtol=1e-5)
    assert by_rank[0].line.width < by_rank[MERGED].line.width and by_rank[0].opacity < 1
    assert "thin lines: each rank" in fig.layout.title.text
    assert "ddp (batch size 3) · 2 ranks and merged" in [a.text for a in fig.layout.annotations]
    # one rank: only its curves; a single-process run beside it draws as before
    fig = figure(cb.evolution(cat, "?run=ddp&run=single&neuron=fc1:0&rank=0&window=last:50"))
    ranks = {(t.meta["run"], t.meta.get("rank")) for t in fig.data if "stat" in t.meta}
    assert ranks == {("ddp", 0), ("single", None)}
    (tr,) = [t for t in fig.data if t.meta.get("stat") == S.BN_MEAN and t.meta["run"] == "ddp"]
    np.testing.assert_allclose(tr.y, raw["x"][0][-50:, :, 0].mean(1), atol=1e-6)
    (loss,) = [t for t in fig.data if t.meta.get("scalar") == "loss" and t.meta["run"] == "ddp"]
    np.testing.assert_array_equal(loss.y, 1.0)


def test_the_figure_builder_takes_a_distributed_dataset_directly(cat):
    ds = cat.dataset("ddp")
    fig = evolution_figure({"ddp": ds}, [("fc1", 0)], Window("last", 20), rank=5)
    assert "ddp has no rank 5: its merged statistics are drawn" in fig.layout.title.text
    assert {t.meta["rank"] for t in fig.data if "stat" in t.meta} == {MERGED}


def test_fluctuation_per_rank_global_and_the_gap(cat, ddp_root):
    raw = ddp_root[1]
    ref = merged_reference(raw)
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=ddp&rank=each&scale=raw"
                                     "&neuron=fc1:0&neuron=fc2:3"))
    cols = [0, 7]
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_MEAN]
    glob = _std(ref[S.BN_MEAN][-200:, cols])
    np.testing.assert_allclose(bar.y, glob, rtol=1e-4)
    per = {r: _std(raw["x"][r][-200:, :, cols].mean(1)) for r in (0, 1)}
    for r in (0, 1):
        (dots,) = [t for t in fig.data if t.meta.get("rank") == r
                   and t.meta["stat"] == S.BN_MEAN]
        np.testing.assert_allclose(dots.y, per[r], rtol=1e-4)
    rms = np.sqrt((per[0] ** 2 + per[1] ** 2) / 2)
    gap = 1 - glob / rms
    assert list(bar.text) == [f"{-g:+.0%}".replace("-", "−") for g in gap]
    # batch sampling alone: 1 - sqrt((1/8) / mean(1/3, 1/5)) for batches of 3 and 5
    want = 1 - np.sqrt((1 / 8) / np.mean([1 / 3, 1 / 5]))
    assert f"predicts {-want:+.0%}".replace("-", "−") in fig.layout.title.text
    # per layer: medians over each layer's neurons, of every rank and of the merged run
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=ddp&rank=each&scale=raw&by=layer"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_STD]
    np.testing.assert_allclose(bar.y, [np.median(_std(ref[S.BN_STD][-200:, :4])),
                                       np.median(_std(ref[S.BN_STD][-200:, 4:]))], rtol=1e-4)


def test_fluctuation_of_one_rank_is_its_own_series(cat, ddp_root):
    raw = ddp_root[1]
    fig = figure(cb.fluctuation(cat, "?tab=fluctuation&run=ddp&rank=1&scale=raw&neuron=fc1:2"))
    (bar,) = [t for t in fig.data if t.type == "bar" and t.meta["stat"] == S.BN_STD]
    np.testing.assert_allclose(bar.y, [_std(raw["x"][1][-200:, :, 2].std(1))], rtol=1e-4)
    assert "per-step series" in fig.layout.title.text
    assert any(a.text.startswith("ddp (batch size 3) · rank 1") for a in fig.layout.annotations)


def test_median_gap_against_closed_forms():
    g = median_gap({0: {S.BN_MEAN: np.array([0.3, np.nan])}, 1: {S.BN_MEAN: np.array([0.4, 0.2])}},
                   {S.BN_MEAN: np.array([0.25, 0.1])})
    np.testing.assert_allclose(g[S.BN_MEAN]["per_rank"], [np.sqrt(0.125), 0.2])
    np.testing.assert_allclose(g[S.BN_MEAN]["gap"], [1 - 0.25 / np.sqrt(0.125), 0.5])


def test_scatter_heatmap_and_run_panel_of_a_distributed_run(cat, ddp_root):
    raw = ddp_root[1]
    ref = merged_reference(raw)
    fig = figure(cb.scatter(cat, "?tab=scatter&run=ddp&scale=raw"))
    (tr,) = [t for t in fig.data if t.meta and t.meta.get("layer") == "fc1"]
    np.testing.assert_allclose(tr.y, _std(ref[S.BN_STD][-200:, :4]), rtol=1e-4)
    fig = figure(cb.scatter(cat, "?tab=scatter&run=ddp&scale=raw&rank=each"))
    assert "here: the merged statistics" in fig.layout.title.text
    fig = figure(cb.heatmap(cat, "?tab=heatmap&run=ddp&layer=fc2&rank=1&window=last:10"))
    np.testing.assert_allclose(np.asarray(fig.data[0].z), raw["x"][1][-10:, :, 4:].std(1).T,
                               rtol=1e-5)
    assert "ddp · rank 1" in fig.layout.title.text
    text = str(cb.runs_tab(cat, "?tab=run&run=ddp&rank=0"))
    assert "0: completed, 400 steps; 1: completed, 400 steps" in text
    assert "claims of the rank 0 statistics" in text


def test_a_synced_layer_has_no_expected_gap(tmp_path):
    """fc1 is a SyncBatchNorm: every rank shows the merged statistics over the summed count, so
    the gap is 0 and batch sampling expects none; fc2 keeps the closed form."""
    from statscope.dashboards.results import rank_comparison
    from statscope.store import ProbeInfo
    from statscope.writer import write_run

    rng = np.random.default_rng(5)
    probes = [ProbeInfo("fc1", "fc1", "SyncBatchNorm", "input", 1, 2),
              ProbeInfo("fc2", "fc2", "BatchNorm1d", "input", 1, 2)]
    for r, b in enumerate((3, 5)):
        x = rng.normal(size=(60, b, 4))
        write_run(tmp_path / "ddp" / f"rank{r}", probes,
                  {S.BN_MEAN: x.mean(1).astype(np.float32), S.BN_STD: x.std(1).astype(np.float32),
                   S.EN_MEAN: np.stack([x[..., :2].mean((1, 2)), x[..., 2:].mean((1, 2))], 1)
                   .astype(np.float32),
                   S.EN_STD: np.stack([x[..., :2].std((1, 2)), x[..., 2:].std((1, 2))], 1)
                   .astype(np.float32)},
                  count=np.full((60, 2), b), rank=r, world_size=2)
    rc = rank_comparison(RunCatalog(tmp_path), "ddp", Window("all"), False, "layer", ())
    assert rc.labels == ("fc1", "fc2")
    assert np.isnan(rc.expected[0])
    assert rc.expected[1] == pytest.approx(1 - np.sqrt((1 / 8) / np.mean([1 / 3, 1 / 5])))
    assert abs(rc.gap[S.BN_MEAN]["gap"][0]) < 1e-6  # the ranks' entries are the merged ones
