"""A distributed run's folder as the readers see it: which rank stores belong to the run, and the
global statistics merged from them, against numpy on the ranks' batches written as real stores."""

import warnings

import numpy as np
import pytest

import statscope
from statscope.errors import StatscopeWarning, StoreError
from statscope.ranks import merge_ranks
from statscope.store import ProbeInfo, open_windows, read_attrs
from statscope.writer import write_run

PROBES = [ProbeInfo("fc", "fc", "BatchNorm1d", "input", 1, 3)]


def _write(path, x, **attrs):
    """One rank's store of batches ``x`` (step, n, channels), float64, one EN group."""
    data = {"bn_mean": x.mean(1).astype(np.float32), "bn_std": x.std(1).astype(np.float32),
            "en_mean": x.mean((1, 2))[:, None].astype(np.float32),
            "en_std": x.std((1, 2))[:, None].astype(np.float32)}
    return write_run(path, PROBES, data, count=np.full((len(x), 1), x.shape[1]), **attrs)


def test_a_rank_that_ran_with_nan_makes_the_merged_statistics_nan(tmp_path):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 16, 3))
    x1 = rng.normal(size=(4, 16, 3)) + 1.0  # rank 1 stopped after 4 steps (count 0 after)
    x1[3, 0, 0] = np.nan  # a NaN in rank 1's batch at step 3, channel 0
    _write(tmp_path / "run" / "rank0", x0, rank=0, world_size=2)
    _write(tmp_path / "run" / "rank1", x1, rank=1, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        g = merge_ranks(statscope.open_run(tmp_path / "run"))
        both = [np.concatenate([x0[s], x1[s]]) if s < len(x1) else x0[s] for s in range(6)]
        mean = np.stack([b.mean(0) for b in both])
        std = np.stack([b.std(0) for b in both])
        en_std = np.array([b.std() for b in both])
    assert np.isnan(mean[3, 0]) and np.isfinite(mean[3, 1])
    np.testing.assert_allclose(g.bn_mean.values, mean, rtol=1e-5, atol=1e-6)  # NaN where numpy's
    np.testing.assert_allclose(g.bn_std.values, std, rtol=1e-5)
    np.testing.assert_allclose(g.en_std.values[:, 0], en_std, rtol=1e-5)
    assert np.isnan(g.en_mean.values[3]).all() and np.isfinite(g.en_mean.values[4]).all()
    np.testing.assert_array_equal(g["count"].values[:, 0], [32, 32, 32, 32, 16, 16])


def _two_runs(tmp_path, old_started="2024-01-01T00:00:00+00:00"):
    """A 3-rank run, then a 2-rank run overwriting it (rank2 of the first is left behind)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "run"
    old = [rng.normal(size=(9, 8, 3)) for _ in range(3)]
    new = [rng.normal(size=(5, 8, 3)) + 2.0 for _ in range(2)]
    for r, x in enumerate(old):
        _write(root / f"rank{r}", x, rank=r, world_size=3, started=old_started)
    for r, x in enumerate(new):
        _write(root / f"rank{r}", x, rank=r, world_size=2, overwrite=True)
    return root, new


def test_rank_stores_of_an_earlier_run_are_left_out_with_a_warning(tmp_path):
    root, new = _two_runs(tmp_path)
    with pytest.warns(StatscopeWarning, match=r"\['rank2'\] belong to an earlier run"):
        ds = statscope.open_run(root)
    assert ds["rank"].values.tolist() == [0, 1] and ds.sizes["step"] == 5
    assert ds.attrs["stale_ranks"] == [2]
    g = merge_ranks(ds)
    both = np.concatenate(new, axis=1)
    np.testing.assert_allclose(g.bn_mean.values, both.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.bn_std.values, both.std(1), rtol=1e-5)
    attrs = read_attrs(root)  # what `statscope runs` shows: the latest run's steps only
    assert attrs["n_steps"] == 5 and attrs["last_step"] == 4
    assert sorted(attrs["ranks"]) == ["0", "1"]


def test_a_missing_rank_is_named_in_a_warning(tmp_path):
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(4, 8, 3)) for _ in range(3)]
    for r in (0, 2):  # rank1 of 3 is gone
        _write(tmp_path / "run" / f"rank{r}", xs[r], rank=r, world_size=3)
    with pytest.warns(StatscopeWarning, match=r"ranks \[1\] of world_size 3 have no store; the "
                                              r"global statistics cover only ranks \[0, 2\]"):
        ds = statscope.open_run(tmp_path / "run")
    assert ds["rank"].values.tolist() == [0, 2] and ds.attrs["missing_ranks"] == [1]
    g = merge_ranks(ds)
    np.testing.assert_allclose(g.bn_std.values, np.concatenate([xs[0], xs[2]], 1).std(1),
                               rtol=1e-5)
    assert "ranks [1] have no store" in g.attrs["notes"][-1]


def test_a_complete_run_and_old_stores_open_without_warnings(tmp_path):
    rng = np.random.default_rng(3)
    for r in range(2):
        _write(tmp_path / "new" / f"rank{r}", rng.normal(size=(3, 4, 3)), rank=r, world_size=2)
        _write(tmp_path / "old" / f"rank{r}", rng.normal(size=(3, 4, 3)))  # no world_size
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatscopeWarning)
        for name in ("new", "old"):
            ds = statscope.open_run(tmp_path / name)
            assert ds["rank"].values.tolist() == [0, 1]
            assert "stale_ranks" not in ds.attrs and "missing_ranks" not in ds.attrs


def test_open_windows_of_a_distributed_run_names_its_rank_stores(tmp_path):
    rng = np.random.default_rng(4)
    for r in range(2):
        _write(tmp_path / "run" / f"rank{r}", rng.normal(size=(3, 4, 3)), rank=r, world_size=2)
    with pytest.raises(StoreError, match=r"a distributed run; window summaries are per rank "
                                         r"\(open_windows of .*/run/rank0, \.\.\.\)"):
        open_windows(tmp_path / "run")


def test_info_of_a_distributed_run_lists_its_ranks(tmp_path, capsys):
    from statscope.cli import main

    rng = np.random.default_rng(3)
    for r, steps in enumerate((6, 4, 6)):  # rank 1 stopped early
        _write(tmp_path / "run" / f"rank{r}", rng.normal(size=(steps, 5, 3)), rank=r,
               world_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StatscopeWarning)  # rank 3 is missing
        assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ranks     3 of world size 4" in out and "missing: ranks [3]" in out
    rows = [line.split()[:4] for line in out.splitlines()
            if line.split() and line.split()[0] in ("0", "1", "2")]
    assert rows == [["0", "completed", "6", "5"], ["1", "completed", "4", "3"],
                    ["2", "completed", "6", "5"]]
