"""Distributed runs: per-rank fluctuation, the global (merged) one and the gap, against numpy on
the ranks' batches written as real per-rank stores (run/rank0, run/rank1)."""

import warnings

import numpy as np
import pytest

import statscope
from statscope import schema as S
from statscope.analyses import (claims, fluctuation, fluctuation_table, rank_gap,
                                running_stats)
from statscope.analyses.tables import rank_gap_table
from statscope.errors import StatscopeError
from statscope.ranks import merge_ranks

from analyses_synthetic import Layer, make_run, to_store

LAYERS = (Layer("fc1", channels=4, mean_jitter=0.3), Layer("fc2", channels=4))
SIZES = (4, 12)  # unequal batches: the sampling expectation is not 1 − 1/√2


def _sd(x, axis=0):
    return np.std(x, axis=axis, ddof=1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """A two-rank run on disk, and each rank's batches per layer (step, n, channels)."""
    root = tmp_path_factory.mktemp("dist") / "run"
    batches = []
    for r, bs in enumerate(SIZES):
        ds, xs = make_run(LAYERS, n_steps=300, batch_size=bs, seed=10 + r, kurt=False,
                          return_batches=True)
        ds.attrs[S.ATTR_META] = {S.META_BATCH_SIZE: bs, S.META_SEED: 0}
        to_store(ds, root / f"rank{r}", rank=r, world_size=2)
        batches.append(xs)
    return root, batches


def _reference(batches, window=100):
    """Per rank and merged: numpy fluctuation of the batch mean and population std, (C_all,)."""
    per_rank = {"bn_mean": [], "bn_std": []}
    for xs in batches:
        x = [b[-window:] for b in xs]  # per layer (T, n, C)
        per_rank["bn_mean"].append(np.concatenate([_sd(b.mean(1)) for b in x]))
        per_rank["bn_std"].append(np.concatenate([_sd(b.std(1)) for b in x]))
    both = [np.concatenate([xs[k][-window:] for xs in batches], axis=1)
            for k in range(len(LAYERS))]
    merged = {"bn_mean": np.concatenate([_sd(b.mean(1)) for b in both]),
              "bn_std": np.concatenate([_sd(b.std(1)) for b in both])}
    return {k: np.array(v) for k, v in per_rank.items()}, merged


def test_rank_gap_matches_numpy_on_the_ranks_batches(dist):
    root, batches = dist
    ds = statscope.open_run(root)
    assert ds.sizes["rank"] == 2
    gap = rank_gap(ds, window=100)
    per_rank, merged = _reference(batches)
    for stat in ("bn_mean", "bn_std"):
        got = gap.sel(statistic=stat)
        np.testing.assert_allclose(got.per_rank.values, per_rank[stat], rtol=2e-5)
        np.testing.assert_allclose(got.merged.values, merged[stat], rtol=2e-5)
        local = np.sqrt((per_rank[stat] ** 2).mean(0))
        np.testing.assert_allclose(got.local.values, local, rtol=2e-5)
        np.testing.assert_allclose(got.removed.values, 1 - merged[stat] / local, rtol=1e-4)
    want = 1 - np.sqrt((1 / sum(SIZES)) / np.mean([1 / n for n in SIZES]))
    np.testing.assert_allclose(gap.expected.values, want)
    assert (gap.n_valid.values == 100).all()
    assert gap.attrs["n_ranks"] == 2 and gap.attrs["window"] == "last 100 steps"
    # a layer whose batch means jitter together on every rank (fc1) keeps more of its
    # fluctuation than sampling theory expects; fc2 is pure sampling noise
    removed = gap.removed.sel(statistic="bn_mean")
    assert float(removed.where(gap.layer == "fc1").mean()) < want - 0.1
    assert abs(float(removed.where(gap.layer == "fc2").mean()) - want) < 0.1


def test_per_rank_fluctuation_and_the_accessor(dist):
    root, batches = dist
    ds = statscope.open_run(root)
    f = fluctuation(ds, 100)
    assert f.bn_mean.dims == ("rank", "neuron")
    per_rank, merged = _reference(batches)
    np.testing.assert_allclose(f.bn_mean.values, per_rank["bn_mean"], rtol=2e-5)
    g = ds.statscope.merge_ranks()
    assert g[S.BN_MEAN].identical(merge_ranks(ds)[S.BN_MEAN])
    np.testing.assert_allclose(fluctuation(g, 100).bn_std.values, merged["bn_std"], rtol=2e-5)
    assert ds.statscope.rank_gap(window=100).identical(rank_gap(ds, 100))


def test_ranks_become_per_rank_and_global_entries(dist):
    root, _ = dist
    ds = statscope.open_run(root)
    t = fluctuation_table(ds, 100, name="ddp")
    assert list(dict.fromkeys(t.run)) == ["ddp/rank0", "ddp/rank1", "ddp/global"]
    assert list(dict.fromkeys(t.batch_size)) == [4.0, 12.0, 16.0]
    assert list(dict.fromkeys(t.config))[-1] == "batch size 16 · rank global"
    c = claims(ds, 100, n_boot=100)
    assert {r.run.rsplit("/", 1)[-1] for r in c.rows} == {"rank0", "rank1", "global"}
    # ranks are not seeds of one configuration: nothing is pooled across them
    assert all(r.n_runs == 1 for r in c.pooled().rows)
    gaps = rank_gap_table(ds, 100, name="ddp")
    assert set(gaps.run) == {"ddp"} and len(gaps) == 2 * 4


def test_rank_gap_uses_the_steps_every_rank_ran(tmp_path):
    root = tmp_path / "run"
    for r, steps in enumerate((300, 250)):  # rank 1 died at step 250
        to_store(make_run(LAYERS, n_steps=steps, batch_size=8, seed=r, kurt=False),
                 root / f"rank{r}", rank=r, world_size=2)
    ds = statscope.open_run(root)
    gap = rank_gap(ds, window=100)
    assert (gap.n_valid.values == 100).all()
    rank0 = statscope.open_run(root / "rank0").isel(step=slice(150, 250))
    np.testing.assert_allclose(gap.per_rank.sel(rank=0, statistic="bn_mean").values,
                               _sd(rank0.bn_mean.values.astype(float)), rtol=1e-6)


def test_refusals(dist):
    root, _ = dist
    ds = statscope.open_run(root)
    with pytest.raises(StatscopeError, match="no 'rank' dimension"):
        rank_gap(ds.isel(rank=0))
    with pytest.raises(StatscopeError, match="at least two"):
        rank_gap(ds.isel(rank=[0]))
    with pytest.raises(StatscopeError, match="distributed run with 2 ranks"):
        running_stats(ds)


def test_analyze_and_report_show_ranks_and_global(dist, tmp_path, capsys):
    from statscope.cli import main

    root, _ = dist
    assert main(["analyze", str(root), "--window", "100", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert f"{root}/rank0," in out and f"{root}/global," in out
    assert "run,layer,statistic,ranks,rank_median,global_median,removed,expected" in out
    md = tmp_path / "r.md"
    assert main(["report", str(root), "--window", "100", "--n-boot", "100", "-o", str(md)]) == 0
    text = md.read_text()
    assert "## Ranks: per-rank and global fluctuation" in text
    assert "run/global" in text and "rank global" in text


def _merged_fluct(batches, lo, hi):
    """numpy: the fluctuation (ddof 1 over steps lo..hi-1) of the batch mean and std over every
    rank's batch at each step, the ranks that ran at the step only; (C_all,) per statistic."""
    out = {"bn_mean": [], "bn_std": []}
    for k in range(len(LAYERS)):
        per_step = [np.concatenate([xs[k][s] for xs in batches if s < len(xs[k])], axis=0)
                    for s in range(lo, hi)]
        out["bn_mean"].append(_sd(np.stack([b.mean(0) for b in per_step])))
        out["bn_std"].append(_sd(np.stack([b.std(0) for b in per_step])))
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Three ranks that ran 30, 25 and 20 steps (DDP's join): rank 2 has no data in the last 10."""
    root = tmp_path_factory.mktemp("uneven") / "run"
    batches = []
    for r, steps in enumerate((30, 25, 20)):
        ds, xs = make_run(LAYERS, n_steps=steps, batch_size=6, seed=20 + r, kurt=False,
                          return_batches=True)
        to_store(ds, root / f"rank{r}", rank=r, world_size=3, model="torch.nn.Sequential")
        batches.append(xs)
    return root, batches


def test_a_rank_without_data_in_the_window_is_left_out_with_a_warning(uneven):
    from statscope.analyses import select_window
    from statscope.analyses.window import expand_ranks
    from statscope.errors import StatscopeWarning

    root, batches = uneven
    ds = statscope.open_run(root)
    with pytest.warns(StatscopeWarning, match=r"ddp/rank2: 0 recorded rows .* left out"):
        t = fluctuation_table(select_window(ds, 10), "all", name="ddp")
    assert list(dict.fromkeys(t.run)) == ["ddp/rank0", "ddp/rank1", "ddp/global"]
    want = _merged_fluct(batches, 20, 30)  # the global statistics over ranks 0 and 1
    got = t[t.run == "ddp/global"].set_index(["layer", "statistic"])["first"]
    for k, layer in enumerate(("fc1", "fc2")):
        for stat in ("bn_mean", "bn_std"):
            assert got[(layer, stat)] == pytest.approx(want[stat][4 * k], rel=2e-5)
    gaps = rank_gap_table(select_window(ds, 10), "all", name="ddp")
    assert set(gaps.ranks) == {2}
    assert any("ranks [2] have no data in the window" in n for n in gaps.attrs["notes"])
    # a rank's entry is named by its run and rank in messages, not by the model's class
    rank2 = expand_ranks(select_window(ds, 10), "ddp")[2][1]
    with pytest.raises(StatscopeError, match="run 'ddp/rank2' has no steps with data"):
        select_window(rank2, "all")


def test_analyze_and_report_of_a_run_whose_rank_stopped_early(uneven, tmp_path, capsys,
                                                              recwarn):
    from statscope.cli import main

    root, _ = uneven
    warnings.simplefilter("default")  # as outside a test suite that makes warnings errors
    assert main(["analyze", str(root), "--window", "10", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert f"{root}/rank1," in out and f"{root}/global," in out and f"{root}/rank2," not in out
    # one line, as the commands' own warnings
    assert f"statscope: warning: {root}/rank2: 0 recorded rows" in err and ".py:" not in err
    md = tmp_path / "r.md"
    assert main(["report", str(root), "--window", "10", "--n-boot", "50", "-o", str(md)]) == 0
    assert "run/rank2: 0 recorded rows" in capsys.readouterr().err
    assert "run/global" in md.read_text()


@pytest.mark.parametrize("layout", ["template", "direct"])
def test_rank_stores_given_one_by_one_are_not_seeds_of_each_other(tmp_path, layout):
    """record(model, "runs/exp_rank{rank}") writes runs/exp_rank0, runs/exp_rank1; `statscope
    report runs/ddp/rank0 runs/ddp/rank1` names a run's rank stores one by one."""
    names = {"template": ["exp_rank0", "exp_rank1"], "direct": ["ddp/rank0", "ddp/rank1"]}
    runs = {}
    for r, name in enumerate(names[layout]):
        ds = make_run(LAYERS, n_steps=120, batch_size=8, seed=r, kurt=False)
        runs[name] = statscope.open_run(to_store(ds, tmp_path / name, rank=r, world_size=2))
    t = fluctuation_table(runs, 100)
    assert list(dict.fromkeys(t.config)) == ["batch size 8 · rank 0", "batch size 8 · rank 1"]
    c = claims(runs, 100, n_boot=50)
    assert all(r.n_runs == 1 for r in c.pooled().rows)
    # rank 0 of two seeds of a distributed run are replicates
    seed2 = make_run(LAYERS, n_steps=120, batch_size=8, seed=7, kurt=False)
    runs["seed2_rank0"] = statscope.open_run(to_store(seed2, tmp_path / "s2", rank=0,
                                                      world_size=2))
    pooled = claims(runs, 100, n_boot=50).pooled().rows
    assert {r.config: r.n_runs for r in pooled} == {"batch size 8 · rank 0": 2,
                                                     "batch size 8 · rank 1": 1}
    # a single-process run (rank 0 of world size 1) is no rank entry
    one = statscope.open_run(to_store(seed2, tmp_path / "single", rank=0, world_size=1))
    assert list(dict.fromkeys(fluctuation_table({"a": one}, 100).config)) == ["batch size 8"]


def test_the_cli_does_not_pool_rank_stores_given_one_by_one(tmp_path, capsys):
    from statscope.cli import main

    for r in (0, 1):
        to_store(make_run(LAYERS, n_steps=120, batch_size=8, seed=r, kurt=False),
                 tmp_path / "ddp" / f"rank{r}", rank=r, world_size=2)
    md = tmp_path / "r.md"
    assert main(["report", str(tmp_path / "ddp" / "rank0"), str(tmp_path / "ddp" / "rank1"),
                 "--window", "100", "--n-boot", "50", "-o", str(md)]) == 0
    text = md.read_text()
    assert "| batch size 8 · rank 0 |" in text and "| batch size 8 · rank 1 |" in text
    assert "of 2" not in text  # no row pools two runs



def test_synced_layers_count_every_ranks_batch_and_have_no_rank_gap(tmp_path):
    """fc1 is a SyncBatchNorm: every rank normalizes with the moments over both batches."""
    from statscope.analyses import excess_fluctuation

    root = tmp_path / "run"
    batches = []
    for r, bs in enumerate(SIZES):
        ds, xs = make_run(LAYERS, n_steps=150, batch_size=bs, seed=30 + r, kurt=False,
                          return_batches=True)
        ds.attrs[S.ATTR_PROBES] = [{**p, "type": "SyncBatchNorm"} if p["name"] == "fc1" else p
                                   for p in ds.attrs[S.ATTR_PROBES]]
        to_store(ds, root / f"rank{r}", rank=r, world_size=2)
        batches.append(xs)
    ds = statscope.open_run(root)
    assert ds.attrs["merged_layers"] == ["fc1"]
    sync = (ds.layer == "fc1").values
    for r, bs in enumerate(SIZES):
        assert (ds["count"].sel(rank=r).values[:, sync] == sum(SIZES)).all()
        assert (ds["count"].sel(rank=r).values[:, ~sync] == bs).all()
    g = merge_ranks(ds)
    assert (g["count"].values == sum(SIZES)).all()  # the synced elements counted once
    both = np.concatenate([batches[0][0], batches[1][0]], axis=1)
    np.testing.assert_allclose(g.bn_std.values[:, sync], both.std(1), rtol=1e-5)
    np.testing.assert_allclose(ds.bn_std.sel(rank=1).values[:, sync], both.std(1), rtol=1e-5)
    # the sampling baseline of a rank's synced layer is that of the global batch
    ex = excess_fluctuation(ds, 100)
    exg = excess_fluctuation(g, 100)
    np.testing.assert_allclose(ex.bn_mean.sel(rank=0).values[..., sync],
                               exg.bn_mean.values[..., sync], rtol=1e-5)
    gap = rank_gap(ds, 100)
    assert np.isnan(gap.removed.values[:, sync]).all()
    assert np.isnan(gap.expected.values[sync]).all()
    assert any("no per-rank gap" in n for n in gap.attrs["notes"])
    want = 1 - np.sqrt((1 / sum(SIZES)) / np.mean([1 / n for n in SIZES]))
    np.testing.assert_allclose(gap.expected.values[~sync], want)
    np.testing.assert_allclose(gap.merged.sel(statistic="bn_std").values[sync],
                               _sd(both[-100:].std(1)), rtol=2e-5)
