"""Distributed runs: per-rank fluctuation, the global (merged) one and the gap, against numpy on
the ranks' batches written as real per-rank stores (run/rank0, run/rank1)."""

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
