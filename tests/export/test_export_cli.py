"""``statscope export`` through ``main(argv)`` and once as a real subprocess."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from statscope.cli import main
from statscope.writer import write_run

from export_reference import read_events


def small_run(path, n_steps=40, seed=0):
    rng = np.random.default_rng(seed)
    data = {"bn_mean": rng.normal(size=(n_steps, 3)).astype("f4"),
            "bn_std": rng.uniform(1, 2, size=(n_steps, 3)).astype("f4"),
            "en_mean": rng.normal(size=(n_steps, 1)).astype("f4"),
            "en_std": rng.uniform(1, 2, size=(n_steps, 1)).astype("f4")}
    write_run(path, {"fc1": 3}, data, count=np.full((n_steps, 1), 8),
              scalars={"loss": rng.normal(size=n_steps)})
    return str(path)


def test_export_writes_event_files_and_says_where(tmp_path, capsys):
    run = small_run(tmp_path / "run")
    assert main(["export", run, "--to", "tensorboard", str(tmp_path / "tb"), "--window",
                 "10", "--step-offset", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{run}: 4 windows of 10 steps, ") and str(tmp_path / "tb") in out
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in err
    scalars, hists, _ = read_events(tmp_path / "tb")
    assert sorted(scalars["fluctuation/fc1/bn_mean"]) == [10, 20, 30, 40]
    assert sorted(scalars["scalars/loss"]) == list(range(1, 41))
    assert sorted(hists["neurons_scale_free/fc1/en_std"]) == [10, 20, 30, 40]


def test_a_folder_of_runs_exports_each_into_its_own_folder(tmp_path, capsys):
    for r in (0, 1):
        small_run(tmp_path / "run" / f"rank{r}", seed=r)
    assert main(["export", str(tmp_path / "run"), "--to", "tensorboard",
                 str(tmp_path / "tb")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("no complete window up to step 39" in line for line in out)
    for r in (0, 1):
        scalars, _, _ = read_events(tmp_path / "tb" / f"rank{r}")
        assert len(scalars["scalars/loss"]) == 40


@pytest.mark.parametrize("argv, message", [
    (["--to", "csv", "TB"], "--to 'csv': unknown export format; expected one of tensorboard"),
    (["--to", "tensorboard", "TB", "--window", "1"], "window=1: expected an int of at least 2 steps"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, argv, message):
    run = small_run(tmp_path / "run")
    argv = [a.replace("TB", str(tmp_path / "tb")) for a in argv]
    assert main(["export", run, *argv]) == 2
    assert capsys.readouterr().err.strip() == f"statscope: error: {message}"
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("where", ["the run", "another run", "a file"])
def test_a_target_inside_a_run_or_a_file_is_refused(tmp_path, capsys, where):
    run = small_run(tmp_path / "run")
    small_run(tmp_path / "other", seed=1)
    (tmp_path / "file").write_text("x")
    target = {"the run": tmp_path / "run", "another run": tmp_path / "other" / "tb",
              "a file": tmp_path / "file"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", run, "--to", "tensorboard", str(target)]) == 2
    err = capsys.readouterr().err
    if where == "a file":
        assert err == f"statscope: error: --to tensorboard {target}: is a file; name a folder\n"
    else:
        inside = tmp_path / ("run" if where == "the run" else "other")
        assert err.startswith(f"statscope: error: --to tensorboard {target}: inside the run "
                              f"{inside}; ") and err.count("\n") == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--to", "tensorboard",
                 str(tmp_path / "tb")]) == 2
    assert "not a statscope run or a folder of runs" in capsys.readouterr().err


def test_export_as_a_subprocess(tmp_path):
    run = small_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "statscope", "export", run, "--to",
                           "tensorboard", str(tmp_path / "tb"), "--window", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 windows of 20 steps" in proc.stdout
    scalars, _, _ = read_events(tmp_path / "tb")
    assert sorted(scalars["fluctuation_scale_free/fc1/bn_std"]) == [19, 39]


def garble(run):
    chunk = run / "bn_mean" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    chunk.write_bytes(bytes(raw))


def test_a_damaged_run_in_a_folder_is_skipped_and_the_rest_exported(tmp_path, capsys):
    runs, tb = tmp_path / "runs", tmp_path / "tb"
    small_run(runs / "a_bad")
    small_run(runs / "b_good", seed=1)
    garble(runs / "a_bad")
    assert main(["export", str(runs), "--to", "tensorboard", str(tb), "--window", "10"]) == 0
    out, err = capsys.readouterr()
    assert f"statscope: warning: skipping {runs / 'a_bad'}: " in err and "'bn_mean'" in err
    assert out.splitlines() == [line for line in out.splitlines() if "b_good" in line] != []
    assert not (tb / "a_bad").exists() or not list((tb / "a_bad").iterdir())
    scalars, _, _ = read_events(tb / "b_good")
    assert sorted(scalars["scalars/loss"]) == list(range(40))
    garble(runs / "b_good")  # nothing left to export: an error naming each run
    assert main(["export", str(runs), "--to", "tensorboard", str(tb), "--window", "10"]) == 2
    err = capsys.readouterr().err
    assert "no run could be exported" in err and "a_bad" in err and "b_good" in err
