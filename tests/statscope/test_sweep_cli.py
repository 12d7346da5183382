"""``statscope sweep``: stopping it (Ctrl-C, a closed stdout), the folder it is given, and the
bad input it refuses before any run starts."""

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import statscope
from statscope import schema as S
from statscope.cli import main
from statscope.store import read_attrs

from test_experiments_support import offline_env

pytestmark = pytest.mark.usefixtures("offline")

TIMEOUT = 120


def runs_in(folder):
    """The run folders in ``folder`` (not their lease or checkpoint files)."""
    return sorted(name for name in os.listdir(folder) if os.path.isdir(folder / name))


@contextlib.contextmanager
def _sweep(tmp_path, out, *extra, stdout=subprocess.DEVNULL):
    """``statscope sweep --jobs 2`` over 6 runs of the shipped subset, long enough to be stopped
    (100,000 steps), in a session of its own (a terminal's Ctrl-C goes to the process group);
    killed with its workers if the test leaves it running."""
    proc = subprocess.Popen([sys.executable, "-m", "statscope", "sweep", "mnist-fc", "--bs", "4",
                             "8", "16", "--seeds", "0", "1", "--dataset", "mnist-5k-subset",
                             "--max-steps", "100000", *extra, "--out", str(out), "--jobs", "2",
                             "-q"],
                            stdout=stdout, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **offline_env(tmp_path)})
    try:
        yield proc
    finally:
        _finish(proc, 0)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _wait_for_runs(proc, out, n):
    """Return once ``n`` runs of ``out`` have committed steps."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            _finish(proc, 0)
            pytest.fail(f"{n} runs did not start: {proc.stderr.read()}")
        names = runs_in(out) if out.is_dir() else []
        if sum(_last_step(out / name) is not None for name in names) >= n:
            return
        time.sleep(0.2)


def _last_step(run):
    try:
        return read_attrs(run).get(S.ATTR_LAST_STEP)
    except statscope.StoreError:  # being created
        return None


def _finish(proc, within):
    """The exit code of ``proc`` if it ends ``within`` seconds; else it is killed, and None."""
    try:
        proc.wait(timeout=within)
        return proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


@pytest.mark.parametrize("to", [
    "group",  # a terminal's Ctrl-C: the sweep and its workers get SIGINT
    pytest.param("pid", marks=pytest.mark.slow),  # `kill -INT` of the sweep's process alone
])
def test_ctrl_c_stops_a_parallel_sweep_and_starts_no_queued_run(tmp_path, to):
    # It used to wait for every queued run to be started and to end before it exited.
    out = tmp_path / "sw"
    with _sweep(tmp_path, out) as proc:
        _wait_for_runs(proc, out, 2)
        (os.killpg if to == "group" else os.kill)(proc.pid, signal.SIGINT)
        code = _finish(proc, 60)
        err = proc.stderr.read()
    assert code == 130, err
    assert err.rstrip().endswith("statscope: interrupted")
    started = runs_in(out)
    assert len(started) == 2
    for name in started:  # stopped between two steps, ready to be resumed
        attrs = read_attrs(out / name)
        assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED and attrs[S.ATTR_LAST_STEP] is not None
        assert (out / f"{name}.checkpoint.pt").exists()


@pytest.mark.slow
def test_a_parallel_sweep_whose_reader_went_away_stops(tmp_path):
    # `statscope sweep ... --jobs 2 | head -1`: it used to run the whole grid after the pipe
    # closed, then exit 141.
    out = tmp_path / "sw"
    with _sweep(tmp_path, out, "--max-steps", "20", stdout=subprocess.PIPE) as proc:
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        first = proc.stdout.readline() if ready else ""
        assert first.startswith("done  "), first
        proc.stdout.close()
        assert _finish(proc, 90) == 141
    assert len(runs_in(out)) <= 4  # of 6: two ran, two at most started after them


def test_a_run_as_the_sweep_folder_or_around_it_is_refused(tmp_path, mnist_dir, capsys):
    run = tmp_path / "r"
    assert main(["run", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir,
                 "--out", str(run), "-q"]) == 0
    before = sorted(os.listdir(run))
    capsys.readouterr()
    for out, says in ((run, "is a run, not a folder of runs"),
                      (run / "sub", f"inside the run {str(run)!r}")):
        assert main(["sweep", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir",
                     mnist_dir, "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"statscope: error: out={str(out)!r}: {says}" + err[0].split(says)[1]]
    assert sorted(os.listdir(run)) == before
    assert statscope.open_run(run).sizes["step"] == 2


def test_an_empty_sweep_folder_is_refused(tmp_path, mnist_dir, monkeypatch, capsys):
    # it used to write the runs into the current folder
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir,
                 "--out", "", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["statscope: error: out='': expected a folder path or URL for the sweep's runs"]
    assert sorted(os.listdir(tmp_path)) == ["mnist"]


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--bs", "8", "--device", "cuda"], "device='cuda': CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    (["--bs", "8", "99999"], "batch_size=99999: larger than the training set of mnist (64 "
                             "images)"),
    (["--bs", "1", "8"], "norm='bn' with batch_size=1: Expected more than 1 value per channel"),
    (["--bs", "8", "--norm", "bn", "in"], "norm='in' with batch_size=8: input shape (8, 128): "
                                          "norm in needs pixel set 'instance'"),
])
def test_bad_input_of_a_sweep_is_refused_before_any_run_starts(tmp_path, mnist_dir, capsys,
                                                                flags, message):
    # Each used to fail every run of its grid (a FAIL line each, exit 1, "run the same sweep
    # again to retry them").
    out = tmp_path / "sw"
    assert main(["sweep", "mnist-fc", *flags, "--max-steps", "2", "--data-dir", mnist_dir,
                 "--out", str(out), "-q"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"statscope: error: {message}"), err
    assert captured.out == "" and not out.exists()


def test_a_run_refused_on_its_settings_at_run_time_is_no_retry(tmp_path, mnist_dir,
                                                                 monkeypatch, capsys):
    from statscope.experiments import train

    real = train.run_experiment

    def refuse(config, **kwargs):
        if config.seed == 1:
            raise statscope.StatscopeError(f"out={config.out!r}: --resume with other settings "
                                           "than the stored run (lr: stored 0.5, now 0.1)")
        return real(config, **kwargs)

    monkeypatch.setattr(train, "run_experiment", refuse)
    assert main(["sweep", "mnist-fc", "--bs", "8", "--seeds", "0", "1", "--max-steps", "2",
                 "--data-dir", mnist_dir, "--out", str(tmp_path / "sw"), "-q"]) == 2
    captured = capsys.readouterr()
    assert [line[:6] for line in captured.out.splitlines()] == ["done  ", "FAIL  "]
    assert captured.err.strip().splitlines() == [
        "statscope: 1 of 2 runs cannot run as set (bad input: see their FAIL lines); the same "
        "sweep would fail them again"]
