"""Runs on S3-compatible storage: a real S3 API server (moto's server mode) on 127.0.0.1."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.errors import StoreLockedError

pytest.importorskip("s3fs")
pytest.importorskip("moto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(folder):
    """moto's S3 server in its own process on 127.0.0.1 (its log in ``folder``); yields its
    endpoint, and stops it on exit."""
    port = _free_port()
    log = folder / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"the S3 server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server in its own process; yields its endpoint and an env that points boto at it."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="runs")
        try:
            yield endpoint, env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def fc():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))


def test_record_and_read_on_s3_with_a_reader_following_the_run(s3):
    endpoint, _ = s3
    opts = {"endpoint_url": endpoint, "key": "test", "secret": "test"}
    model = fc()
    xs = [torch.randn(5, 4) for _ in range(30)]
    seen, stop = [], threading.Event()

    def follow():
        while not stop.is_set():
            try:
                seen.append(statscope.open_run("s3://runs/live", storage_options=opts)
                            .sizes["step"])
            except statscope.StoreError:
                pass  # not created yet
            time.sleep(0.05)

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        with statscope.record(model, "s3://runs/live", block_steps=4, flush_seconds=0.05,
                              storage_options=opts):
            with pytest.raises(StoreLockedError, match="another writer holds this run"):
                statscope.record(model, "s3://runs/live", resume=True).start()
            for x in xs:
                model(x)
                time.sleep(0.01)
    finally:
        stop.set()
        reader.join(30)
    assert seen == sorted(seen) and seen[-1] >= 1  # a growing prefix, never an error
    ds = statscope.open_run("s3://runs/live")
    with torch.no_grad():
        want = np.stack([model[0](x).double().std(0, correction=0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values, want, rtol=1e-5)
    assert ds.attrs["status"] == "completed"
    assert not statscope.store.verify_run("s3://runs/live")
    import fsspec

    assert not fsspec.filesystem("s3").exists("runs/live.lease")  # given back at the end


KILLED = textwrap.dedent("""
    import sys, time, torch, statscope
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    rec = statscope.record(model, sys.argv[1], block_steps=4, flush_seconds=0.05).start()
    for step in range(100000):
        model(torch.randn(5, 4))
        if step == 40:
            print("ready", flush=True)
        time.sleep(0.002)
""")


@pytest.mark.slow
def test_kill_9_on_s3_keeps_every_committed_step_and_resumes(s3):
    _, env = s3
    url = "s3://runs/killed"
    with subprocess.Popen([sys.executable, "-c", KILLED, url], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, **env}) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(1.0)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    ds = statscope.open_run(url)
    seen = ds.sizes["step"]
    assert ds.attrs["status"] == "running" and seen >= 40
    assert ds.step.values.tolist() == list(range(seen)) and (ds["count"].values == 5).all()
    before = ds.bn_mean.values
    # the dead writer's lease has no heartbeat; a new writer from this host sees its pid is gone.
    # The killed run's writer process may still be finishing the write in progress when the
    # store was read above: the new writer waits for its lease, and resumes after the last step
    # committed by then
    model = fc()
    with pytest.warns(statscope.StatscopeWarning, match="stale lease"):
        with statscope.record(model, url, resume=True) as rec:
            n = rec.current_step
            assert n >= seen
            for _ in range(5):
                model(torch.randn(5, 4))
    ds = statscope.open_run(url)
    assert ds.attrs["status"] == "completed" and ds.step.values.tolist() == list(range(n + 5))
    np.testing.assert_array_equal(ds.bn_mean.values[:seen], before)  # nothing committed changed


def test_analyze_reads_a_run_on_s3(s3, capsys):
    from statscope.cli import main
    from statscope.writer import write_run

    rng = np.random.default_rng(0)
    data = {k: rng.random((300, 4), dtype="f4") for k in ("bn_mean", "bn_std")}
    data.update({k: rng.random((300, 1), dtype="f4") for k in ("en_mean", "en_std")})
    write_run("s3://runs/written", {"a": 4}, data, meta={"batch_size": 4})
    assert main(["analyze", "s3://runs/written"]) == 0
    assert "a" in capsys.readouterr().out


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_storage_options_alone_reach_the_runs_lease(s3, monkeypatch, writer):
    # endpoint and credentials only in storage_options: the lease beside the run (<run>.lease)
    # must use them too, or it goes to AWS without credentials
    endpoint, env = s3
    for name in env:
        monkeypatch.delenv(name)
    opts = {"endpoint_url": endpoint, "key": "test", "secret": "test",
            "client_kwargs": {"region_name": "us-east-1"}}
    path = f"s3://runs/options-only-{writer}"
    model = fc()
    with statscope.record(model, path, storage_options=opts, writer=writer,
                          step="manual") as rec:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            rec.step()
    ds = statscope.open_run(path, storage_options=opts)
    assert ds.sizes["step"] == 3 and ds.attrs["status"] == "completed"


def test_a_run_at_a_bucket_root_is_refused_by_name(s3):
    with pytest.raises(statscope.StatscopeError, match=r"path='s3://runs': a run needs a folder"):
        statscope.record(fc(), "s3://runs")


def test_what_the_store_client_raises_is_a_store_error_naming_the_path(s3, monkeypatch):
    endpoint, env = s3
    with pytest.raises(statscope.StoreError, match=r"path='s3://no-such-bucket/run': the object "
                                                   r"store cannot be used \(FileNotFoundError"):
        statscope.record(fc(), "s3://no-such-bucket/run").start()
    with pytest.raises(statscope.StoreError, match=r"path='s3://runs/typo': .*unexpected "
                                                   r"keyword argument 'endpont_url'"):
        statscope.open_run("s3://runs/typo", storage_options={"endpont_url": endpoint})
    # options that failed are not kept: the next call without them uses the environment's
    model = fc()
    with statscope.record(model, "s3://runs/typo", step="manual") as rec:
        model(torch.randn(8, 4)).sum().backward()
        rec.step()
    with pytest.raises(statscope.StoreError, match="endpont_url"):
        statscope.open_run("s3://runs/typo", storage_options={"endpont_url": endpoint})
    assert statscope.open_run("s3://runs/typo").sizes["step"] == 1
    for name in env:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # an endpoint, but no credentials
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    proc = subprocess.run([sys.executable, "-m", "statscope", "info", "s3://runs/nocreds"],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("statscope: error: ") and "NoCredentialsError" in lines[0]


def test_a_folder_of_runs_at_a_url_is_searched_as_a_local_one(s3):
    from statscope.dashboards.data import RunCatalog
    from statscope.discovery import find_runs, scan_runs

    for name, steps in (("a", 2), ("b", 3)):
        model = fc()
        with statscope.record(model, f"s3://runs/sweep/{name}", step="manual") as rec:
            for _ in range(steps):
                model(torch.randn(8, 4)).sum().backward()
                rec.step()
    assert find_runs("s3://runs/sweep") == ["s3://runs/sweep/a", "s3://runs/sweep/b"]
    assert find_runs("s3://runs/sweep/a") == ["s3://runs/sweep/a"]
    assert scan_runs("s3://runs/sweep/") == [("s3://runs/sweep/a", None),
                                             ("s3://runs/sweep/b", None)]
    both = statscope.open_runs("s3://runs/sweep")
    assert both.sizes["run"] == 2 and both.sizes["step"] == 3
    proc = subprocess.run([sys.executable, "-m", "statscope", "runs", "s3://runs/sweep"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "corrupt" not in proc.stdout, proc.stdout + proc.stderr
    assert "sweep/a" in proc.stdout and "sweep/b" in proc.stdout
    catalog = RunCatalog("s3://runs/sweep")
    try:
        assert catalog.names() == ["a", "b"] and not catalog.errors()
    finally:
        catalog.close()
    with pytest.raises(statscope.StoreError, match="no such folder or run"):
        find_runs("s3://runs/nothing-here")
