"""Two sweeps into one folder: each run is planned again as it starts, under its lease.

The sweeps are interleaved deterministically: the second one plans, or runs, from inside the
first one's run (its progress callback, or the loading of its data), so each test reaches the
moment of the race every time. The "other sweep" is a real second process where its lease must
be held or named by another pid.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from statscope import schema as S
from statscope.cli import main
from statscope.experiments import RunConfig, run_experiment
from statscope.experiments.sweep import plan_sweep, run_sweep
from statscope.store import read_attrs

from test_experiments_support import offline_env, raw_arrays

pytestmark = pytest.mark.usefixtures("offline")

TIMEOUT = 180


def _cli(tmp_path, *argv):
    """``statscope ARGV`` as a real second process; (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "statscope", *argv], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, **offline_env(tmp_path)})
    return proc.returncode, proc.stdout, proc.stderr


def _identity(path):
    """What tells one recording of a run from another made with the same settings (those write
    the same bytes): its times and its root document's inode, with the arrays."""
    attrs = read_attrs(path)
    return (attrs[S.ATTR_STARTED], attrs[S.ATTR_ENDED], os.stat(path / "zarr.json").st_ino,
            raw_arrays(path))


def test_a_run_completed_after_another_sweep_planned_to_overwrite_it_is_skipped(tmp_path,
                                                                                 mnist_dir):
    # Sweep B plans while sweep A's run has a store and no commit yet ("overwrite": it recorded
    # nothing), and reaches that run once A has completed it and let its lease go. B used to
    # act on its stale plan and replace A's completed run.
    out = tmp_path / "sw"
    base = RunConfig("mnist-fc", batch_size=8, max_steps=6, data_dir=mnist_dir)
    name = "mnist-fc_bs8_seed0_bn_max6"
    plans = []

    def sweep_b_plans(progress):
        if not plans:  # A's first step: the recorder commits seconds later
            plans.append(plan_sweep(base, out, batch_sizes=[8], seeds=[0]))

    run_experiment(dataclasses.replace(base, out=str(out / name)), progress=sweep_b_plans,
                   progress_seconds=0)
    [planned] = plans[0]
    assert (planned.name, planned.action, planned.status) == (name, "overwrite", S.STATUS_RUNNING)
    before = _identity(out / name)
    [outcome] = run_sweep(plans[0])
    assert outcome.error is None and outcome.result is None
    assert outcome.item.action == "skip"
    assert _identity(out / name) == before
    assert read_attrs(out / name)[S.ATTR_STATUS] == S.STATUS_COMPLETED


def test_two_sweeps_into_one_folder_share_the_grid_and_neither_fails(tmp_path, mnist_dir,
                                                                      monkeypatch, capsys):
    # Sweep A (this process) is inside its first run when sweep B (a second process) runs the
    # same grid: B finds that run held and does the other; A then finds the other completed.
    # Both used to exit 1: B counted the held run as a failure, A failed the run B had made
    # ("already exists; pass --overwrite ... or --resume", flags a sweep does not have).
    from statscope.experiments import train

    out = tmp_path / "sw"
    grid = ["mnist-fc", "--bs", "8", "--seeds", "0", "1", "--max-steps", "4",
            "--data-dir", mnist_dir, "--out", str(out), "-q"]
    real = train.run_experiment
    other = []

    def run_a(config, progress=None, **kwargs):
        def hook(p):
            if not other:
                other.append(_cli(tmp_path, "sweep", *grid))
            if progress is not None:
                progress(p)
        return real(config, progress=hook, progress_seconds=0, **kwargs)

    monkeypatch.setattr(train, "run_experiment", run_a)
    code_a = main(["sweep", *grid])
    captured = capsys.readouterr()
    code_b, out_b, err_b = other[0]
    lines_b = out_b.splitlines()
    assert code_b == 0, err_b
    assert [line[:6] for line in lines_b] == ["held  ", "done  "]
    assert lines_b[0].startswith("held  mnist-fc_bs8_seed0_bn_max4: another process is writing "
                                 "it (path=")
    assert "1 of 2 runs are held by another process" in err_b and "FAIL" not in out_b
    assert code_a == 0, captured.err
    assert captured.out.splitlines()[0].startswith("done  mnist-fc_bs8_seed0_bn_max4: ")
    assert captured.out.splitlines()[1] == "skip  mnist-fc_bs8_seed1_bn_max4 (completed)"
    for seed in (0, 1):
        attrs = read_attrs(out / f"mnist-fc_bs8_seed{seed}_bn_max4")
        assert (attrs[S.ATTR_STATUS], attrs[S.ATTR_N_STEPS]) == (S.STATUS_COMPLETED, 4)


def test_a_run_another_process_makes_while_this_one_prepares_it_is_reported_held(
        tmp_path, mnist_dir, monkeypatch):
    # The claim found no store; while this sweep loads its data, a `statscope run` makes and
    # completes the run. The writer refuses the store it finds then, and the sweep reports the
    # run held by that process, not a failure with the Python API's advice.
    from statscope.experiments import datasets

    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn_max3"
    real = datasets.load_dataset
    other, made = [], []

    def load(*args, **kwargs):
        if not other:
            other.append(_cli(tmp_path, "run", "mnist-fc", "--bs", "8", "--max-steps", "3",
                              "--data-dir", mnist_dir, "--out", str(out / name), "-q"))
            made.append(_identity(out / name))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load)
    items = plan_sweep(RunConfig("mnist-fc", max_steps=3, data_dir=mnist_dir), out,
                       batch_sizes=[8], seeds=[0])
    assert [i.action for i in items] == ["run"]
    [outcome] = run_sweep(items)
    assert other[0][0] == 0, other[0][2]
    assert outcome.held and not outcome.bad_input
    assert "took the run while this sweep was preparing it" in outcome.error
    assert "already exists" in outcome.error  # the writer's refusal, kept as the reason
    assert _identity(out / name) == made[0]
    assert read_attrs(out / name)[S.ATTR_STATUS] == S.STATUS_COMPLETED


def test_a_completed_run_loses_its_leftover_checkpoints_when_a_sweep_skips_it(tmp_path):
    from statscope.writer import write_run

    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn"
    write_run(out / name, {"norm1": 4}, {"bn_mean": np.zeros((3, 4), np.float32),
                                         "bn_std": np.ones((3, 4), np.float32)})
    left = [out / f"{name}.checkpoint.pt", out / f"{name}.checkpoint.prev.pt"]
    for path in left:
        path.write_bytes(b"stale")
    [item] = plan_sweep(RunConfig("mnist-fc", batch_size=8), out, batch_sizes=[8], seeds=[0])
    assert item.action == "skip"
    assert [path.exists() for path in left] == [False, False]


def test_a_failed_run_another_process_completes_while_this_sweep_prepares_it_stays_completed(
        tmp_path, mnist_dir, monkeypatch):
    # The claim found the run failed ("resume"); while this sweep loads its data, a `statscope
    # run --resume` completes it. The late resume used to open the completed store and file
    # its steps 3-5 again as steps 6-8 of a "completed" 9-step run; now its writer refuses a
    # completed run, the sweep skips it, and the store stays as that process left it.
    from statscope.experiments import datasets

    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn_max6"
    base = RunConfig("mnist-fc", batch_size=8, max_steps=6, data_dir=mnist_dir)

    def stop_at_step_3(p):
        if p.step >= 3:
            raise RuntimeError("stopped at step 3")

    with pytest.raises(RuntimeError, match="stopped at step 3"):
        run_experiment(dataclasses.replace(base, out=str(out / name)), progress=stop_at_step_3,
                       progress_seconds=0)
    assert read_attrs(out / name)[S.ATTR_STATUS] == S.STATUS_FAILED
    real = datasets.load_dataset
    other, made = [], []

    def load(*args, **kwargs):
        if not other:
            other.append(_cli(tmp_path, "run", "mnist-fc", "--bs", "8", "--max-steps", "6",
                              "--data-dir", mnist_dir, "--out", str(out / name), "--resume",
                              "-q"))
            made.append(_identity(out / name))
        return real(*args, **kwargs)

    [item] = plan_sweep(base, out, batch_sizes=[8], seeds=[0])
    assert item.action == "resume"
    monkeypatch.setattr(datasets, "load_dataset", load)
    [outcome] = run_sweep([item])
    assert other[0][0] == 0, other[0][2]
    attrs = read_attrs(out / name)
    assert (attrs[S.ATTR_STATUS], attrs[S.ATTR_N_STEPS]) == (S.STATUS_COMPLETED, 6)
    assert _identity(out / name) == made[0]
    assert outcome.error is None and outcome.result is None, outcome
    assert (outcome.item.action, outcome.item.status) == ("skip", S.STATUS_COMPLETED)


def test_a_late_resume_continues_where_it_planned_when_another_process_recorded_more(
        tmp_path, mnist_dir, monkeypatch):
    # The run failed at step 3 and this sweep plans to resume it there; while it loads its
    # data, another resume records steps 3-4 and fails again. The late resume used to continue
    # after the store's new last step and file its replayed steps 3-5 as steps 5-7; now it
    # resumes at the step it planned (the other's rows from there on are dropped), and the run
    # holds the bytes of an uninterrupted one.
    from statscope.experiments import datasets

    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn_max6"
    base = RunConfig("mnist-fc", batch_size=8, max_steps=6, data_dir=mnist_dir)
    run_experiment(dataclasses.replace(base, out=str(tmp_path / "ref")))

    def stop_at(k):
        def progress(p):
            if p.step >= k:
                raise RuntimeError(f"stopped at step {k}")
        return progress

    with pytest.raises(RuntimeError, match="stopped at step 3"):
        run_experiment(dataclasses.replace(base, out=str(out / name)), progress=stop_at(3),
                       progress_seconds=0)
    [item] = plan_sweep(base, out, batch_sizes=[8], seeds=[0])
    assert item.action == "resume"
    real = datasets.load_dataset
    other = []

    def load(*args, **kwargs):
        if not other:
            other.append(read_attrs(out / name)[S.ATTR_LAST_STEP])
            with pytest.raises(RuntimeError, match="stopped at step 5"):
                run_experiment(dataclasses.replace(item.config), progress=stop_at(5),
                               progress_seconds=0)
            other.append(read_attrs(out / name)[S.ATTR_LAST_STEP])
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load)
    [outcome] = run_sweep([item])
    assert other[0] < other[1]  # the other process did record more
    assert outcome.error is None, outcome.error
    attrs = read_attrs(out / name)
    assert (attrs[S.ATTR_STATUS], attrs[S.ATTR_N_STEPS]) == (S.STATUS_COMPLETED, 6)
    assert raw_arrays(str(out / name)) == raw_arrays(str(tmp_path / "ref"))
