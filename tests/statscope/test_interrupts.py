"""Ctrl-C and kills around a built-in run's edges: a Ctrl-C after the last step, a second Ctrl-C
inside a step, checkpoint files a killed run left, and Ctrl-C of a sweep on a local dask cluster.

The moments are injected where they can be (a SIGINT raised by the process itself from inside the
final evaluation, the recorder's close or the optimizer's step), so that each test hits its
moment on every run; the dask test sends a real Ctrl-C to a real sweep's process group.
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import statscope
from statscope import schema as S
from statscope.cli import main
from statscope.errors import StoreError
from statscope.experiments import RunConfig, checkpoint, run_experiment, train
from statscope.store import read_attrs

from test_experiments_support import alive, offline_env, raw_arrays

pytestmark = [pytest.mark.usefixtures("offline"),
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="relies on POSIX signals and /proc")]

_BASE = dict(experiment="mnist-fc", batch_size=4, epochs=3)  # 16 steps an epoch on mnist_dir
STEPS = 40


@pytest.fixture
def ctrl_c():
    """SIGINT has Python's own handler (the one a command line has), as the loop requires."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def straight(tmp_path, mnist_dir):
    """The uninterrupted run."""
    return run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, max_steps=STEPS,
                                    out=str(tmp_path / "straight")))


def _assert_same_data(path, straight):
    attrs = read_attrs(path)
    assert attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED and attrs[S.ATTR_N_STEPS] == straight.steps
    assert attrs["test_accuracy"] == list(straight.test_accuracy)
    ra, rb = raw_arrays(path), raw_arrays(straight.path)
    assert ra.keys() == rb.keys()
    assert [k for k in rb if ra[k] != rb[k]] == []


def _leftovers(out) -> list[str]:
    """The checkpoint files (and their temporary files) beside the store ``out``."""
    folder, name = os.path.split(str(out))
    return sorted(f for f in os.listdir(folder) if f.startswith(name + ".checkpoint"))


def _ctrl_c_at_close(monkeypatch, where):
    """Make this process get one Ctrl-C after the last step of a 40-step run: in its final
    evaluation, or while its recorder closes the store."""
    if where == "final evaluation":
        accuracy = train._accuracy
        calls = []

        def accuracy_then_ctrl_c(*args):
            calls.append(1)
            if len(calls) == 3:  # epochs 1 and 2 end at steps 16 and 32; the last one is at 40
                signal.raise_signal(signal.SIGINT)
            return accuracy(*args)

        monkeypatch.setattr(train, "_accuracy", accuracy_then_ctrl_c)
    else:
        from statscope.probes.lifecycle import Lifecycle

        close = Lifecycle.close

        def close_after_ctrl_c(self, *args, **kwargs):
            signal.raise_signal(signal.SIGINT)
            return close(self, *args, **kwargs)

        monkeypatch.setattr(Lifecycle, "close", close_after_ctrl_c)


@pytest.mark.parametrize("where", ["final evaluation", "recorder close"])
def test_a_ctrl_c_after_the_last_step_completes_the_run_and_still_stops(
        tmp_path, mnist_dir, straight, monkeypatch, capsys, ctrl_c, where):
    """The run closes as it would have (completed, every step recorded, no checkpoint left), then
    the caller sees ``KeyboardInterrupt``: a command exits 130, a sweep stops."""
    _ctrl_c_at_close(monkeypatch, where)
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, max_steps=STEPS, out=out))
    assert "statscope: stopping once this run is closed" in capsys.readouterr().err
    _assert_same_data(out, straight)
    assert _leftovers(out) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sweep_stops_at_a_ctrl_c_that_comes_after_a_run_s_last_step(tmp_path, mnist_dir,
                                                                      monkeypatch, capsys,
                                                                      ctrl_c):
    _ctrl_c_at_close(monkeypatch, "final evaluation")
    out = tmp_path / "sweep"
    code = main(["sweep", "mnist-fc", "--bs", "4", "--seeds", "0", "1", "--epochs", "3",
                 "--max-steps", str(STEPS), "--data-dir", mnist_dir, "--out", str(out), "-q"])
    assert code == 130
    assert "statscope: interrupted" in capsys.readouterr().err
    runs = statscope.store.find_runs(out)
    assert len(runs) == 1, runs  # the second run never started
    assert read_attrs(runs[0])[S.ATTR_STATUS] == S.STATUS_COMPLETED


def _stop_at_once_in_step(mp, how, at):
    """Stop the run at once inside step ``at`` (0-based), after its forward ran under the probes
    and before the loop logs its loss and lr: two Ctrl-C (the second raises where it lands), or
    an error."""
    sgd_step, calls = torch.optim.SGD.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at + 1:
            if how == "ctrl-c twice":
                signal.raise_signal(signal.SIGINT)  # "stopping at the end of this step"
                signal.raise_signal(signal.SIGINT)  # "again to stop at once": raises here
            else:
                raise RuntimeError("the device fell over")
        return sgd_step(self, *args, **kwargs)

    mp.setattr(torch.optim.SGD, "step", step)


@pytest.mark.parametrize("how, at", [("ctrl-c twice", 20), ("ctrl-c twice", 10),
                                     ("error", 20)])
def test_a_run_stopped_inside_a_step_resumes_to_the_uninterrupted_data(
        tmp_path, mnist_dir, straight, monkeypatch, ctrl_c, how, at):
    """The recorder, closed by the stop, commits the step it cut short half recorded (the
    probes' rows of its forward, no loss or lr); that row is taken out again, so the stored run
    keeps only whole steps and ``--resume`` (from the checkpoint at step 16, or replaying from
    step 0 when stopped inside the first epoch) records that step whole."""
    config = RunConfig(**_BASE, data_dir=mnist_dir, max_steps=STEPS, out=str(tmp_path / "run"))
    with monkeypatch.context() as mp:
        _stop_at_once_in_step(mp, how, at)
        with pytest.raises(KeyboardInterrupt if how == "ctrl-c twice" else RuntimeError):
            run_experiment(config)
    attrs = read_attrs(config.out)
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED
    assert attrs[S.ATTR_ERROR].startswith("KeyboardInterrupt" if how == "ctrl-c twice"
                                          else "RuntimeError: the device fell over")
    assert (attrs[S.ATTR_N_STEPS], attrs[S.ATTR_LAST_STEP]) == (at, at - 1)
    ds = statscope.open_run(config.out)
    assert all(bool(ds[name].notnull().all()) for name in ("loss", "lr"))
    result = run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, max_steps=STEPS,
                                      out=config.out, resume=True))
    assert (result.resumed_at, result.checkpoint_step) == (at, 16 if at > 16 else None)
    _assert_same_data(config.out, straight)


# -- checkpoint files left behind ------------------------------------------------------------


@pytest.fixture
def pids():
    """(a pid no process has now: a child that ended, a live child's pid)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield gone.pid, live.pid
    live.kill()
    live.wait()


def _temp(out, pid) -> str:
    path = f"{out}.checkpoint.pt.tmp-{pid}"
    Path(path).write_bytes(b"half a checkpoint")
    return os.path.basename(path)


def test_remove_checkpoints_also_removes_temporary_files_whose_writer_is_gone(tmp_path, pids):
    gone, live = pids
    out = tmp_path / "run"
    for name in ("run.checkpoint.pt", "run.checkpoint.prev.pt", "run.checkpoint.pt.tmp-x1",
                 "other.checkpoint.pt.tmp-1", f"other.checkpoint.pt.tmp-{gone}"):
        (tmp_path / name).write_bytes(b"")
    kept = sorted([_temp(out, live), _temp(out, os.getpid()), "run.checkpoint.pt.tmp-x1"])
    _temp(out, gone)
    checkpoint.remove_checkpoints(str(out))
    assert _leftovers(out) == kept  # a live writer's file, and what is not a pid
    assert sorted(os.listdir(tmp_path)) == sorted(
        kept + ["other.checkpoint.pt.tmp-1", f"other.checkpoint.pt.tmp-{gone}"])
    assert checkpoint.remove_stale_temps(str(out)) == []


def test_a_run_removes_stale_temporary_checkpoints_when_it_starts_resumes_and_completes(
        tmp_path, mnist_dir, straight, pids):
    gone, live = pids
    out = tmp_path / "run"
    config = RunConfig(**_BASE, data_dir=mnist_dir, max_steps=STEPS, out=str(out))

    def stop_at_25(p):
        if p.step >= 25:
            raise InterruptedError

    _temp(out, gone)
    with pytest.raises(InterruptedError):
        run_experiment(config, progress=stop_at_25, progress_seconds=0)
    assert _leftovers(out) == ["run.checkpoint.prev.pt", "run.checkpoint.pt"]
    live_temp = _temp(out, live)
    _temp(out, gone)
    run_experiment(dataclasses.replace(config, resume=True))
    _assert_same_data(str(out), straight)
    assert _leftovers(out) == [live_temp]


def test_resuming_a_completed_run_removes_the_checkpoints_it_left(tmp_path, mnist_dir, straight,
                                                                 pids):
    """Killed after its store was marked completed but before it removed its checkpoints: a
    completed run is never resumed, so ``--resume`` says so and removes them."""
    gone, _ = pids
    out = tmp_path / "run"
    shutil.copytree(straight.path, out)
    for suffix in (".checkpoint.pt", ".checkpoint.prev.pt"):
        (tmp_path / ("run" + suffix)).write_bytes(b"a checkpoint")
    _temp(out, gone)
    with pytest.raises(StoreError, match="already completed"):
        run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, max_steps=STEPS, out=str(out),
                                 resume=True))
    assert _leftovers(out) == []


# -- Ctrl-C of a sweep on a local dask cluster -----------------------------------------------


def test_the_workers_of_a_local_cluster_leave_ctrl_c_to_the_command(tmp_path):
    """The terminal sends Ctrl-C to the whole process group; a worker process that took it
    would die printing tracebacks. The command's own process still gets it."""
    pytest.importorskip("distributed")
    from statscope.commands.cluster import scheduler_of

    with scheduler_of(argparse.Namespace(scheduler=None, workers=1)) as client:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.SIGINT not in blocked
        (worker,) = client.run(os.getpid).values()
        os.kill(worker, signal.SIGINT)
        time.sleep(1.5)
        assert alive(worker), "the worker process died of the Ctrl-C"
        assert list(client.run(os.getpid, nanny=False).values()) == [worker]


def test_a_ctrl_c_while_the_local_cluster_starts_is_not_lost(monkeypatch, ctrl_c):
    distributed = pytest.importorskip("distributed")
    from statscope.commands.cluster import scheduler_of

    made = []

    class Cluster(distributed.LocalCluster):
        def __init__(self, *args, **kwargs):
            signal.raise_signal(signal.SIGINT)
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(distributed, "LocalCluster", Cluster)
    with pytest.raises(KeyboardInterrupt):
        with scheduler_of(argparse.Namespace(scheduler=None, workers=1)):
            pytest.fail("the Ctrl-C that came while the cluster started was lost")
    assert [c.status.name for c in made] == ["closed"]


@pytest.mark.slow
def test_ctrl_c_of_a_sweep_on_local_workers_prints_no_traceback_and_exits_130(tmp_path):
    """``statscope sweep --workers 2`` and one Ctrl-C to its process group, as a terminal sends
    it, while both runs train: one line, exit 130, both runs stopped with a checkpoint."""
    pytest.importorskip("distributed")
    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "statscope", "sweep", "mnist-fc", "--bs", "4", "--seeds", "0",
         "1", "--dataset", "mnist-5k-subset", "--max-steps", "20000", "-q", "--workers", "2",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **offline_env(tmp_path)}, start_new_session=True)

    def committed() -> int:
        steps = []
        for marker in out.glob("*/zarr.json"):
            try:
                steps.append(json.loads(marker.read_text())["attributes"].get("n_steps") or 0)
            except (OSError, ValueError, KeyError):
                steps.append(0)
        return min(steps) if len(steps) == 2 else 0

    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and committed() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and committed() > 0, "the runs never started"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "statscope: interrupted", err
    for run in statscope.store.find_runs(out):
        assert read_attrs(run)[S.ATTR_STATUS] == S.STATUS_FAILED
        assert os.path.exists(run + ".checkpoint.pt")
