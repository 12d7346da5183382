"""analyze and report on a dask.distributed LocalCluster give the numbers of the in-process path."""

import numpy as np
import pytest

pytest.importorskip("distributed")

from analyses_synthetic import Layer, make_run, to_store  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster") / "runs"
    for bs in (4, 16):
        for seed in (0, 1):
            ds = make_run((Layer("fc1", channels=6), Layer("fc2", channels=6)), n_steps=300,
                          batch_size=bs, seed=100 * bs + seed, kurt=False)
            to_store(ds, root / f"bs{bs}-s{seed}")
    for r in (0, 1):
        ds = make_run((Layer("fc1", channels=6), Layer("fc2", channels=6)), n_steps=300,
                      batch_size=4, seed=7 + r, kurt=False)
        to_store(ds, root / "ddp" / f"rank{r}", rank=r, world_size=2)
    return root


def _main(argv):
    from statscope.cli import main

    return main(argv)


def test_report_on_a_two_worker_cluster_equals_the_in_process_report(runs, tmp_path):
    here, there = tmp_path / "here.md", tmp_path / "there.md"
    args = [str(runs), "--n-boot", "200", "--window", "150"]
    assert _main(["report", *args, "-o", str(here)]) == 0
    assert _main(["report", *args, "-o", str(there), "--workers", "2"]) == 0
    assert there.read_text() == here.read_text()
    assert "## Ranks: per-rank and global fluctuation" in here.read_text()


@pytest.mark.slow
def test_analyze_on_a_scheduler_address_equals_in_process(runs, capsys):
    from distributed import LocalCluster

    args = ["analyze", str(runs), "--window", "all", "--format", "csv", "--detrend"]
    assert _main(args) == 0
    here = capsys.readouterr().out
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster:
        assert _main([*args, "--scheduler", cluster.scheduler_address]) == 0
    assert capsys.readouterr().out == here


@pytest.mark.slow
def test_lazy_windows_are_read_on_the_workers(runs):
    """A window left lazy (as large ones are) is read by the task's worker: same claims."""
    import statscope
    from distributed import Client, LocalCluster

    from statscope.analyses import claims

    ds = {p.name: statscope.open_run(p) for p in sorted(runs.glob("bs*")) if p.is_dir()}
    want = claims(ds, 200, n_boot=200).to_dataframe()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster,
                                                                 set_as_default=False) as c:
        got = claims(ds, 200, n_boot=200, scheduler=c).to_dataframe()
    np.testing.assert_array_equal(got.effect.values, want.effect.values)
    assert got.verdict.tolist() == want.verdict.tolist()


def test_cluster_options_are_refused_together(runs, capsys):
    with pytest.raises(SystemExit):
        _main(["analyze", str(runs), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
