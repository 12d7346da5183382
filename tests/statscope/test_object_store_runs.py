"""Object-store runs from the outside: bad URLs, endpoints that do not answer, a foreign lease.

Against moto's S3 server (the ``s3`` fixture of ``test_object_store.py``) or a local socket that
accepts connections and never answers; every subprocess has a timeout, so a hang fails.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import statscope
from statscope.errors import StoreLockedError
from statscope.lease import Holder

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from test_object_store import fc, s3  # noqa: E402,F401  the S3 server fixture


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "statscope", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statscope: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("url", ["s3://", "s3:///", "s3:///run"])
def test_an_s3_url_without_a_bucket_or_key_is_refused_by_name(url):
    # no server needed: refused before any request
    with pytest.raises(statscope.StatscopeError, match=rf"path={url!r}: a run needs"):
        statscope.record(fc(), url)


def test_run_out_at_an_s3_url_without_a_key_is_one_line_exit_2(tmp_path):
    proc = _cli("run", "mnist-fc", "--bs", "8", "--max-steps", "2", "--no-download", "--quiet",
                "--out", "s3://", env={"STATSCOPE_CACHE": str(tmp_path)})
    assert proc.returncode == 2 and "path='s3://': a run needs" in _one_error_line(proc)


def test_an_endpoint_that_refuses_connections_is_a_store_error_naming_the_path(s3):
    with socket.socket() as s:  # a port nobody listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli("info", "s3://runs/r", env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"},
                timeout=90)
    line = _one_error_line(proc)
    assert proc.returncode == 2 and "path='s3://runs/r': the object store cannot be used" in line
    assert "EndpointConnectionError" in line


@pytest.fixture
def silent_endpoint():
    """An endpoint that accepts TCP connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    conns, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for c in conns:
            c.close()
        server.close()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["info", "s3://runs/r"], ["runs", "s3://runs/sweep"]])
def test_an_endpoint_that_never_answers_fails_within_minutes_not_hangs(s3, silent_endpoint,
                                                                       command):
    # before: botocore's 5 attempts x s3fs's 5 retries x a 15 s read timeout per request, and
    # several requests: `statscope info` still waited after 400 s
    t0 = time.monotonic()
    try:
        proc = _cli(*command, env={"AWS_ENDPOINT_URL": silent_endpoint}, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"statscope {' '.join(command)} still waited after 150 s")
    line = _one_error_line(proc)
    assert proc.returncode == 2 and "the object store cannot be used" in line, line
    assert "path='s3://runs/" in line and time.monotonic() - t0 < 150


def test_a_live_foreign_lease_refuses_naming_the_holder_and_when_it_goes_stale(s3):
    import fsspec

    # the endpoint named, not only in the environment: fsspec caches clients by their
    # arguments, and one made for another module's server (another port) must not serve here
    endpoint, _ = s3
    opts = {"endpoint_url": endpoint, "key": "test", "secret": "test"}
    model = fc()
    with statscope.record(model, "s3://runs/foreign", step="manual",
                          storage_options=opts) as rec:
        model(torch.randn(8, 4)).sum().backward()
        rec.step()
    held = Holder(host="gpu-7", pid=4242, started="2026-11-30T00:00:00+00:00", owner="x" * 32,
                  heartbeat=time.time() - 30, ttl=60.0)
    fsspec.filesystem("s3", **opts).pipe_file("runs/foreign.lease", held.to_bytes())
    with pytest.raises(StoreLockedError) as err:
        statscope.record(fc(), "s3://runs/foreign", resume=True, step="manual",
                         storage_options=opts).start()
    msg = str(err.value)
    assert "pid 4242 on gpu-7, since 2026-11-30T00:00:00+00:00" in msg
    # the user can tell how long a dead writer's lease keeps the run: the ttl
    assert "60 s" in msg and "stale" in msg, msg
