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


@pytest.mark.slow
def test_a_run_with_a_damaged_chunk_is_skipped_on_a_cluster_as_in_process(runs, tmp_path,
                                                                          capsys):
    # the workers read the chunks: a damaged one must skip its run with a warning, as the
    # in-process path (which reads when it opens the run) does, not fail the whole command
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs, root, ignore=shutil.ignore_patterns("ddp"))
    shard = next(p for p in sorted((root / "bs4-s1" / "bn_mean").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = ["analyze", str(root), "--window", "all", "--format", "csv"]
    assert _main(args) == 0
    here = capsys.readouterr()
    assert "skipping" in here.err and "bs4-s1" in here.err
    assert _main([*args, "--workers", "2"]) == 0
    there = capsys.readouterr()
    assert there.out == here.out and "skipping" in there.err and "bs4-s1" in there.err
    here_md, there_md = tmp_path / "here.md", tmp_path / "there.md"
    assert _main(["report", str(root), "--n-boot", "100", "-o", str(here_md)]) == 0
    assert _main(["report", str(root), "--n-boot", "100", "-o", str(there_md),
                  "--workers", "2"]) == 0
    assert there_md.read_text() == here_md.read_text()


def test_a_malformed_address_is_one_line_at_once(runs):
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "statscope", "analyze", str(runs),
                           "--scheduler", "notanaddress"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "statscope: error: --scheduler notanaddress: missing port number in address "
        "'notanaddress'"], proc.stderr
    assert time.monotonic() - t0 < 20  # no half-made client waiting out its timeout


@pytest.mark.slow
def test_a_port_where_no_scheduler_answers_ends_after_the_connect_timeout(runs):
    # something listens (a web server, the cluster's dashboard) but never completes dask's
    # handshake: Client's own timeout does not end that wait; the command's deadline does
    import http.server
    import os
    import subprocess
    import sys
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    address = f"tcp://127.0.0.1:{httpd.server_address[1]}"
    try:
        proc = subprocess.run([sys.executable, "-m", "statscope", "analyze", str(runs),
                               "--scheduler", address], capture_output=True, text=True,
                              timeout=120, env={**os.environ,
                                                "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"statscope: error: --scheduler {address}: no dask scheduler answered within 12 s "
        f"(something listens there, but not a scheduler: its dashboard's port?)"], proc.stderr


@pytest.mark.parametrize(("raised", "line", "code"), [
    ("FutureCancelledError", "the dask cluster failed (FutureCancelledError: ", 1),
    ("NoCredentialsError", "the object store cannot be used (NoCredentialsError: ", 2),
])
def test_a_lost_cluster_or_store_client_error_is_one_line(runs, monkeypatch, capsys, raised,
                                                          line, code):
    # what dask raises when the scheduler goes away mid-command (its tasks cancelled), and
    # what an object store's client raises, reach the command line as one error line
    from statscope.commands import analyze

    if raised == "FutureCancelledError":
        from distributed.client import FutureCancelledError

        error = FutureCancelledError("_rows_of-1", reason="scheduler-connection-lost")
    else:
        botocore = pytest.importorskip("botocore.exceptions")
        error = botocore.NoCredentialsError()

    def fail(args):
        raise error

    monkeypatch.setattr(analyze, "run_analyze", fail)
    assert _main(["analyze", str(runs)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("statscope: error: " + line), err
