"""``statscope run``, ``sweep``, ``runs`` and ``info`` through ``main(argv)`` and one subprocess."""

import dataclasses
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import statscope
from statscope import schema as S
from statscope.cli import main

from test_experiments_support import offline_env, raw_arrays, write_mnist

pytestmark = pytest.mark.usefixtures("offline")


def entries(folder):
    """The names in ``folder``, sorted, less the runs' lease files (``<run>.lease``), which
    stay beside a run once written."""
    return sorted(name for name in os.listdir(folder) if not name.endswith(".lease"))


def snapshot(folder):
    """Every file under ``folder`` as bytes, keyed by its name."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                out[name] = handle.read()
    return out


def test_run_records_and_prints_a_summary(tmp_path, mnist_dir, capsys):
    out = str(tmp_path / "run")
    assert main(["run", "mnist-fc", "--bs", "4", "--epochs", "2", "--data-dir", mnist_dir,
                 "--out", out, "--norm", "hn"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith("mnist-fc: test accuracy ") and "after 2 epochs (mnist)" in line
    assert "32 steps in" in line and "steps/s" in line and f"store {out}" in line
    assert "probe overhead " in line and "% of the training thread" in line
    assert "epoch 2/2" in captured.err  # the progress bar, on stderr
    ds = statscope.open_run(out)
    assert ds.sizes["step"] == 32
    meta = ds.attrs[S.ATTR_META]
    assert (meta[S.META_BATCH_SIZE], meta[S.META_NORM], meta["threads"], meta["device"]) == \
        (4, "hn", 1, "cpu")


@pytest.mark.parametrize(("max_steps", "said"), [(17, "after 1.062 epochs"),
                                                  (1, "after 0.0625 epochs"),
                                                  (16, "after 1 epoch (")])
def test_the_summary_counts_the_epochs_trained_not_the_evaluations(tmp_path, mnist_dir, capsys,
                                                                   max_steps, said):
    # 16 steps per epoch here; a run stopped inside an epoch is evaluated there as well
    assert main(["run", "mnist-fc", "--bs", "4", "--epochs", "2", "--data-dir", mnist_dir,
                 "--out", str(tmp_path / "run"), "--max-steps", str(max_steps), "-q"]) == 0
    assert said in capsys.readouterr().out


def test_quiet_run_prints_only_the_summary(tmp_path, mnist_dir, capsys):
    assert main(["run", "mnist-fc", "--bs", "8", "--max-steps", "3", "--data-dir", mnist_dir,
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1


def test_default_out_is_a_new_folder_under_runs(tmp_path, mnist_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir, "-q"]
    assert main(argv) == 0 and main(argv) == 0
    assert entries(tmp_path / "runs") == ["mnist-fc_bs8_seed0_bn_max2",
                                                     "mnist-fc_bs8_seed0_bn_max2-2"]


def test_run_as_a_real_subprocess(tmp_path):
    out = str(tmp_path / "sub")
    env = {**os.environ, **offline_env(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "statscope", "run", "mnist-fc", "--bs", "4",
                           "--max-steps", "50", "--out", out], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "statscope: warning: name='mnist'" in proc.stderr  # the subset fallback, offline
    assert "(mnist-5k-subset)" in proc.stdout and "50 steps in" in proc.stdout
    attrs = statscope.store.read_attrs(out)
    assert attrs[S.ATTR_N_STEPS] == 50 and attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED
    assert "--max-steps 50" in attrs[S.ATTR_COMMAND]


def _bad_idx(kind):
    def make(folder):
        write_mnist(folder, n_train=64, n_test=20)
        path = os.path.join(folder, "train-images-idx3-ubyte")
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[:1000] if kind == "truncated" else bytes([0, 0, 8, 1]) + data[4:])
    return make


@pytest.mark.parametrize("argv, message, usage", [
    (["run", "mnist-conv"], ("argument EXPERIMENT: invalid choice: 'mnist-conv' (choose from",
                             "mnist-fc", "cifar-resnet18"), True),
    (["run", "mnist-fc", "--bs", "0"], "argument --bs: '0': expected a positive integer", True),
    (["run", "mnist-fc", "--bs", "-3"], "argument --bs: '-3': expected a positive integer", True),
    (["run", "mnist-fc", "--bs", "4.5"], "argument --bs: '4.5': expected a positive integer",
     True),
    (["run", "mnist-fc", "--epochs", "0"], "argument --epochs: '0': expected a positive", True),
    (["run", "mnist-fc", "--epochs", "two"], "argument --epochs: 'two'", True),
    (["run", "mnist-fc", "--device", "tpu"], "argument --device: invalid choice: 'tpu'", True),
    (["sweep", "mnist-fc", "--bs", "4", "0"], "argument --bs: '0'", True),
    (["run", "mnist-fc", "--bs", "65", "@data"], "batch_size=65: larger than the training set "
                                                 "of mnist (64 images)", False),
    (["run", "mnist-fc", "--bs", "4", "--norm", "in", "@data"],
     "norm='in' with batch_size=4: input shape (4, 128): norm in needs pixel set 'instance'",
     False),
    (["run", "mnist-fc", "--bs", "4", "--norm", "xn", "@data"], "norm='xn': unknown norm", False),
    (["sweep", "mnist-fc", "--bs", "4", "--norm", "bn", "in_g4", "@out"],
     "norm='in_g4': in has no channel groups", False),
    (["run", "mnist-fc", "--bs", "4", "@truncated"], "train-images-idx3-ubyte", False),
    (["run", "mnist-fc", "--bs", "4", "@magic"], "train-images-idx3-ubyte has magic 2049, "
                                                 "expected 2051", False),
    (["run", "cifar-resnet18", "--bs", "4", "@out"], "name='cifar10': not found in", False),
    (["run", "mnist-fc", "--dataset", "cifar10", "@out"], "dataset='cifar10': mnist-fc takes "
                                                          "mnist, fashion-mnist", False),
    (["run", "mnist-fc", "--lr", "inf"], "argument --lr: 'inf': expected a non-negative", True),
    (["run", "mnist-fc", "--lr", "nan"], "argument --lr: 'nan'", True),
    (["run", "mnist-fc", "--momentum", "1e400"], "argument --momentum: '1e400'", True),
    (["run", "mnist-fc", "--seed", str(2**64)], "argument --seed: '18446744073709551616': "
                                                "expected a seed in 0..9223372036854775806", True),
    (["run", "mnist-fc", "--threads", "100000"], "argument --threads: '100000': expected a "
                                                 "number of threads in 0..1024", True),
    (["sweep", "mnist-fc", "--bs", "4", "--seeds", "-1"], "argument --seeds: '-1'", True),
    (["run", "mnist-fc", "--out", ""], "out='': expected a path or URL", False),
    (["runs", "@nowhere"], "dir=", False),
    (["info", "@nowhere"], "no such file or directory", False),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, argv, message, usage):
    folder = str(tmp_path / "data")
    for i, arg in enumerate(argv):
        if arg in ("@data", "@truncated", "@magic"):
            (write_mnist if arg == "@data" else _bad_idx(arg[1:]))(folder)
            argv[i:i + 1] = ["--data-dir", folder, "--out", str(tmp_path / "out")]
        elif arg == "@out":
            argv[i:i + 1] = ["--out", str(tmp_path / "out")]
        elif arg == "@nowhere":
            argv[i] = str(tmp_path / "nowhere")
    data_before = snapshot(folder) if os.path.isdir(folder) else {}
    with pytest.raises(SystemExit) if usage else _no_exit() as exc:
        code = main(argv)
    code = exc.value.code if usage else code
    err = capsys.readouterr().err
    assert code == 2
    for fragment in (message,) if isinstance(message, str) else message:
        assert fragment in err, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("statscope" if not usage else "statscope ")
    if usage:
        assert err.startswith("usage: statscope")
    assert not (tmp_path / "out").exists()
    assert (snapshot(folder) if os.path.isdir(folder) else {}) == data_before


def test_an_unknown_norm_is_refused_before_the_data_is_looked_for(tmp_path, capsys):
    # it was refused after the dataset had been looked for (a download tried, the bundled
    # subset warned about)
    assert main(["run", "mnist-fc", "--norm", "xn", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("statscope: error: norm='xn': unknown norm")


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_is_an_error(tmp_path, mnist_dir, capsys):
    assert main(["run", "mnist-fc", "--device", "cuda", "--data-dir", mnist_dir, "--out",
                 str(tmp_path / "r")]) == 2
    assert "statscope: error: device='cuda': CUDA is not available" in capsys.readouterr().err


def test_existing_out_is_never_overwritten_without_a_flag(tmp_path, mnist_dir, capsys):
    out = tmp_path / "r"
    argv = ["run", "mnist-fc", "--bs", "8", "--max-steps", "3", "--data-dir", mnist_dir,
            "--out", str(out), "-q"]
    assert main(argv) == 0
    before = snapshot(out)
    assert main(argv) == 2
    assert f"statscope: error: out='{out}': already exists; pass --overwrite" in \
        capsys.readouterr().err
    assert snapshot(out) == before
    assert main(argv + ["--resume"]) == 2
    assert "already completed" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(argv[:-3] + ["--out", str(other), "--overwrite", "-q"]) == 2
    assert "not a statscope run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    # an array inside a run: a usage error too, not zarr's ContainsArrayError and exit 1
    inner = out / "bn_mean"
    for extra in ([], ["--overwrite"]):
        assert main(argv[:-3] + ["--out", str(inner), "-q", *extra]) == 2
        assert "a zarr array (one of a run's arrays?), not a statscope run" in \
            capsys.readouterr().err
    assert statscope.open_run(out).sizes["step"] == 3


def test_sweep_runs_the_grid_and_is_restartable(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "mnist-fc", "--bs", "4", "8", "--seeds", "0", "1", "--max-steps", "6",
            "--data-dir", mnist_dir, "--out", str(out), "-q"]
    assert main(argv) == 0
    names = entries(out)
    assert names == sorted(f"mnist-fc_bs{b}_seed{s}_bn_max6" for b in (4, 8) for s in (0, 1))
    assert capsys.readouterr().out.count("done  ") == 4
    # a run interrupted after 3 steps is resumed, the completed ones are skipped

    from statscope.experiments import RunConfig, run_experiment

    def crash(p):
        if p.step == 3:
            raise KeyboardInterrupt

    shutil.rmtree(out / names[0])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(RunConfig("mnist-fc", batch_size=4, seed=0, max_steps=6,
                                 data_dir=mnist_dir, out=str(out / names[0])),
                       progress=crash, progress_seconds=0)
    assert statscope.store.read_attrs(out / names[0])[S.ATTR_N_STEPS] == 3
    before = snapshot(out / names[1])
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("skip  ") for line in lines) == 3
    assert any(line.startswith(f"done  {names[0]} (resumed)") for line in lines)
    assert statscope.store.read_attrs(out / names[0])[S.ATTR_N_STEPS] == 6
    assert snapshot(out / names[1]) == before


def test_resume_says_where_it_continued_and_a_sweep_finishes_a_failed_complete_run(
        tmp_path, mnist_dir, capsys):
    from statscope.experiments import RunConfig, run_experiment

    def stop(at, reports=1):
        def crash(p):
            seen.append(p.step)
            if seen.count(at) == reports:
                raise KeyboardInterrupt
        seen = []
        return crash

    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn_max12"
    config = RunConfig("mnist-fc", batch_size=8, max_steps=12, data_dir=mnist_dir)
    argv = ["--bs", "8", "--max-steps", "12", "--data-dir", mnist_dir, "-q"]
    for run, at in (("a", 5), ("b", 5)):
        with pytest.raises(KeyboardInterrupt):
            run_experiment(dataclasses.replace(config, out=str(out / run)),
                           progress=stop(at), progress_seconds=0)
    assert entries(out) == ["a", "a.checkpoint.pt", "b", "b.checkpoint.pt"]
    assert main(["runs", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:4] for row in rows[1:]] == [["a", "failed", "5", "4"], ["b", "failed", "5", "4"]]
    os.remove(out / "b.checkpoint.pt")
    for run in ("a", "b"):
        assert main(["run", "mnist-fc", *argv, "--out", str(out / run), "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "12 steps (resumed at step 5 from the checkpoint at step 5: 0 steps replayed), 7 of " \
           "them in " in lines[0]
    assert "12 steps (resumed at step 5 without a checkpoint: 5 steps replayed from step 0), " \
           "12 of them in " in lines[1]
    assert entries(out) == ["a", "b"]  # completed runs keep no checkpoint
    # died after its last step, in the final report: failed, every step recorded
    with pytest.raises(KeyboardInterrupt):
        run_experiment(dataclasses.replace(config, out=str(out / name)),
                       progress=stop(12, reports=2), progress_seconds=0)
    attrs = statscope.store.read_attrs(out / name)
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED and attrs[S.ATTR_N_STEPS] == 12
    assert main(["sweep", "mnist-fc", *argv, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"done  {name} (resumed): ") and "0 of them in" in line
    assert statscope.store.read_attrs(out / name)[S.ATTR_STATUS] == S.STATUS_COMPLETED


def test_sweep_in_parallel_processes_with_norms(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "mnist-fc", "--bs", "8", "--norm", "bn", "hn", "--max-steps", "4",
                 "--data-dir", mnist_dir, "--out", str(out), "--jobs", "2", "-q"]) == 0
    assert entries(out) == ["mnist-fc_bs8_seed0_bn_max4", "mnist-fc_bs8_seed0_hn_max4"]
    ds = statscope.open_runs(str(out))
    assert list(ds[S.META_NORM].values) == ["bn", "hn"]
    assert list(ds[S.ATTR_N_STEPS].values) == [4, 4]


def test_sweep_reports_a_failing_run_and_goes_on(tmp_path, mnist_dir, monkeypatch, capsys):
    # a run that fails at run time (a norm that cannot run is refused before any run starts:
    # test_sweep_cli.py)
    from statscope.experiments import train

    real = train.run_experiment

    def fail(config, **kwargs):
        if config.norm == "hn":
            raise statscope.RecordingError(f"out={config.out!r}: the recording failed")
        return real(config, **kwargs)

    monkeypatch.setattr(train, "run_experiment", fail)
    out = tmp_path / "sweep"
    assert main(["sweep", "mnist-fc", "--bs", "8", "--norm", "hn", "bn", "--max-steps", "2",
                 "--data-dir", mnist_dir, "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert "FAIL  mnist-fc_bs8_seed0_hn_max2: out=" in captured.out
    assert "done  mnist-fc_bs8_seed0_bn_max2" in captured.out
    assert "1 of 2 runs failed; run the same sweep again to retry them" in captured.err


def test_runs_lists_runs_and_shows_a_corrupt_one(tmp_path, mnist_dir, capsys):
    out = tmp_path / "runs"
    assert main(["run", "mnist-fc", "--bs", "8", "--max-steps", "5", "--seed", "3",
                 "--data-dir", mnist_dir, "--out", str(out / "good"), "-q"]) == 0
    (out / "broken").mkdir()
    (out / "broken" / "zarr.json").write_text("{not json")
    (out / "notes").mkdir()
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()]
    assert rows[0][:9] == ["NAME", "STATUS", "STEPS", "LAST", "EXPERIMENT", "BS", "SEED",
                           "DATASET", "NORM"]
    assert rows[1][:2] == ["broken", "corrupt"]
    assert rows[2][:9] == ["good", "completed", "5", "4", "mnist-fc", "8", "3", "mnist", "bn"]
    assert len(rows) == 3 and "broken" in captured.err


def test_info_shows_settings_layers_and_accuracy(tmp_path, mnist_dir, capsys):
    out = str(tmp_path / "r")
    assert main(["run", "mnist-fc", "--bs", "8", "--epochs", "2", "--en-groups", "4",
                 "--data-dir", mnist_dir, "--out", out, "-q"]) == 0
    capsys.readouterr()
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "status    completed" in text and "batch_size    8" in text
    assert "dataset       mnist" in text and "torch " + torch.__version__ in text
    layers = [line.split() for line in text.splitlines() if line.startswith("norm")]
    assert layers == [[f"norm{i}", "BatchNorm1d", "input", "128", "4"] for i in range(1, 5)]
    assert text.count("test accuracy by epoch: ") == 1
    assert len(text.split("test accuracy by epoch: ")[1].split(", ")) == 2


def test_parallel_sweep_as_a_real_subprocess(tmp_path, mnist_dir):
    # spawn workers must not re-run ``python -m statscope`` from its __main__
    env = {**os.environ, **offline_env(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "statscope", "sweep", "mnist-fc", "--bs", "4", "8",
                           "--max-steps", "3", "--data-dir", mnist_dir, "--out",
                           str(tmp_path / "sw"), "--jobs", "2", "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done  ") == 2 and len(entries(tmp_path / "sw")) == 2


def test_run_ends_with_the_absolute_store_path_and_the_next_commands(tmp_path, mnist_dir,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir,
                 "--out", "my runs/a"]) == 0
    captured = capsys.readouterr()
    where = str(tmp_path / "my runs" / "a")
    assert captured.out.rstrip().endswith(f"store {where}")
    assert captured.err.rstrip().splitlines()[-2:] == [
        f"next: statscope dashboard '{where}'", f"      statscope report '{where}' -o report.md"]


def test_a_sweep_ends_with_the_next_commands_for_its_folder(tmp_path, mnist_dir, monkeypatch,
                                                            capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir,
                 "--out", "sw"]) == 0
    err = capsys.readouterr().err.rstrip().splitlines()
    assert err[-2:] == [f"next: statscope dashboard {tmp_path / 'sw'}",
                        f"      statscope report {tmp_path / 'sw'} -o report.md"]


def _raises(exc):
    def run_experiment(config, **kwargs):
        raise exc
    return run_experiment


@pytest.mark.parametrize("exc, code, line", [
    (statscope.StatscopeError("lr=-1: expected a positive number"), 2,
     "lr=-1: expected a positive number"),
    (statscope.StoreError("path='x': not a statscope run"), 2, "path='x': not a statscope run"),
    (statscope.StoreDamagedError("path='x': bn_std steps 0..8191 are missing"), 1,
     "path='x': bn_std steps 0..8191 are missing"),
    (statscope.StoreLockedError("path='x': held by pid 7 on host, since 2026-01-01"), 1,
     "path='x': held by pid 7 on host, since 2026-01-01"),
    (statscope.RecordingError("out='x': the recording failed\nwriter: OSError(28)"), 1,
     "out='x': the recording failed; writer: OSError(28)"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.tmp"), 1,
     "'/data/x.tmp': No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b"), 1,
     "'/a' -> '/b': Permission denied"),
])
def test_each_error_is_one_line_with_its_exit_code(tmp_path, mnist_dir, monkeypatch, capsys, exc,
                                                   code, line):
    from statscope.experiments import train

    monkeypatch.setattr(train, "run_experiment", _raises(exc))
    assert main(["run", "mnist-fc", "--data-dir", mnist_dir, "--out", str(tmp_path / "r"),
                 "-q"]) == code
    assert capsys.readouterr().err == f"statscope: error: {line}\n"


def test_a_failed_recording_exits_1_and_names_it(tmp_path, mnist_dir, monkeypatch, capsys):
    """Training succeeds while the writer cannot write: no success line, exit 1, one error line,
    the store marked failed with the reason (issue 10, item 1)."""
    from statscope.writer import RunWriter

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunWriter, "append", full)
    monkeypatch.setenv("STATSCOPE_WRITER", "thread")  # the fault is patched into this process
    out = tmp_path / "r"
    assert main(["run", "mnist-fc", "--bs", "4", "--epochs", "1", "--data-dir", mnist_dir,
                 "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("statscope: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], captured.err
    assert all(line.startswith(("statscope: ", "next: ", "  ")) or "step" in line
               for line in captured.err.splitlines() if line.strip()), captured.err
    attrs = statscope.store.read_attrs(out)
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED
    assert "No space left on device" in attrs[S.ATTR_ERROR]


def test_a_full_disk_while_saving_a_checkpoint_stops_the_run_cleanly(tmp_path, mnist_dir,
                                                                     monkeypatch, capsys):
    """ENOSPC during the checkpoint at the end of epoch 1 (step 16): exit 1 with one line naming
    the file, the run marked failed with the reason, its committed steps those of an
    uninterrupted run, no temporary file left; a resume once there is room completes it."""
    from statscope.experiments import checkpoint

    real = checkpoint._Sink.write

    def full(self, data):
        if self.handle.tell() > 1000:  # a part is written, as on a real disk
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real(self, data)

    straight = tmp_path / "straight"
    argv = ["run", "mnist-fc", "--bs", "4", "--epochs", "2", "--data-dir", mnist_dir, "-q"]
    assert main(argv + ["--out", str(straight)]) == 0
    monkeypatch.setattr(checkpoint._Sink, "write", full)
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(argv + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"statscope: error: checkpoint '{out}.checkpoint.pt': cannot be written (No "
                   "space left on device)\n")
    attrs = statscope.store.read_attrs(out)
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED and attrs[S.ATTR_N_STEPS] == 16
    assert "cannot be written (No space left on device)" in attrs[S.ATTR_ERROR]
    ds, ref = statscope.open_run(out), statscope.open_run(straight).isel(step=slice(0, 16))
    for name in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD, S.COUNT, "loss"):
        np.testing.assert_array_equal(ds[name].values, ref[name].values)
    assert entries(tmp_path) == ["mnist", "r", "straight"]  # no checkpoint, no tmp
    monkeypatch.setattr(checkpoint._Sink, "write", real)
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    a, b = raw_arrays(str(out)), raw_arrays(str(straight))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in b)


def test_each_checkpoint_is_saved_once_the_store_committed_its_step(tmp_path, mnist_dir,
                                                                   monkeypatch):
    """The store is flushed before a checkpoint: a checkpoint is never ahead of the committed
    store (a kill then resumes from it), and a store sharing its disk writes first."""
    from statscope.experiments import checkpoint

    real, seen = checkpoint.Checkpoint.save, []

    def save(self, out):
        seen.append((self.step, statscope.store.read_attrs(out).get(S.ATTR_N_STEPS)))
        return real(self, out)

    monkeypatch.setattr(checkpoint.Checkpoint, "save", save)
    out = tmp_path / "r"
    assert main(["run", "mnist-fc", "--bs", "4", "--epochs", "2", "--data-dir", mnist_dir,
                 "-q", "--out", str(out)]) == 0
    assert seen == [(16, 16), (32, 32)]


@pytest.mark.slow
def test_a_real_full_disk_while_saving_a_checkpoint(tmp_path, mnist_dir):
    """The same on a tmpfs (in a private mount namespace) sized so that the store of 16 steps
    fits with 256 KiB to spare and the first checkpoint (~1.3 MB) does not."""
    probe = tmp_path / "probe"
    assert main(["run", "mnist-fc", "--bs", "4", "--epochs", "1", "--data-dir", mnist_dir,
                 "--out", str(probe), "-q"]) == 0
    pages = sum(-(-p.stat().st_size // 4096) for p in probe.rglob("*") if p.is_file())
    size = f"{pages * 4 + 256}k"
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99\n'
        'shift; "$@"; rc=$?; cp -a "$DISK"/. "$COPY"/; exit $rc\n')
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    copy.mkdir()
    env = {**os.environ, **offline_env(tmp_path), "DISK": str(disk), "COPY": str(copy)}
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(disk),
           sys.executable, "-m", "statscope", "run", "mnist-fc", "--bs", "4", "--epochs", "2",
           "--data-dir", mnist_dir, "--out", str(disk / "r"), "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"statscope: error: checkpoint '{disk / 'r'}.checkpoint.pt': cannot be "
                           "written (No space left on device)\n")
    attrs = statscope.store.read_attrs(copy / "r")
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED and attrs[S.ATTR_N_STEPS] == 16
    assert "No space left on device" in attrs[S.ATTR_ERROR]
    assert entries(copy) == ["r"]
    assert statscope.open_run(copy / "r").sizes["step"] == 16


@pytest.mark.parametrize("where", ["proc", "below a file"])
def test_an_out_where_no_run_can_be_made_is_one_error_line(tmp_path, mnist_dir, capsys, where):
    if where == "proc":
        out = "/proc/statscope-test-run"
    else:
        (tmp_path / "file").write_text("")
        out = str(tmp_path / "file" / "run")
    assert main(["run", "mnist-fc", "--bs", "4", "--data-dir", mnist_dir, "--out", out, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"statscope: error: path={out!r}: ") and err.count("\n") == 1, err
    assert not os.path.exists(out)


def test_an_out_in_an_unwritable_folder_is_one_error_line(tmp_path, mnist_dir):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    cmd = [sys.executable, "-m", "statscope", "run", "mnist-fc", "--bs", "4", "--data-dir",
           mnist_dir, "--out", str(folder / "run"), "-q"]
    if os.geteuid() == 0:  # root writes anywhere unless it gives up that capability
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] + cmd
    env = {**os.environ, **offline_env(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    folder.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"statscope: error: path='{folder / 'run'}': ")
    assert proc.stderr.count("\n") == 1 and "not writable" in proc.stderr
    assert entries(folder) == []


def _into_closed_pipe(*args):
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "statscope", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)


def test_info_into_a_closed_pipe_exits_quietly(tmp_path, mnist_dir):
    """``statscope info RUN | head -0``: no traceback, no 'Exception ignored', status 141; the
    help (which argparse writes ignoring errors) ends quietly too."""
    out = str(tmp_path / "r")
    assert main(["run", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir,
                 "--out", out, "-q"]) == 0
    proc = _into_closed_pipe("info", out)
    assert (proc.returncode, proc.stderr) == (141, "")
    proc = _into_closed_pipe("--help")
    assert proc.returncode in (0, 141) and proc.stderr == ""


def test_runs_names_a_damaged_run_given_as_the_folder(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    assert main(["runs", str(broken)]) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()]
    assert rows[1][:2] == ["broken", "corrupt"] and len(rows) == 2
    assert captured.err.startswith("statscope: warning: path=")


def test_a_sweep_reports_a_run_held_by_another_process_and_goes_on(tmp_path, mnist_dir,
                                                                   monkeypatch, capsys):
    from statscope.experiments import train

    real = train.run_experiment

    def held(config, **kwargs):
        if config.seed == 1:
            raise statscope.StoreLockedError(f"path={config.out!r}: held by pid 7 on host")
        return real(config, **kwargs)

    monkeypatch.setattr(train, "run_experiment", held)
    # a held run is that process's to finish, not a failure of this sweep
    assert main(["sweep", "mnist-fc", "--bs", "8", "--seeds", "0", "1", "2", "--max-steps", "2",
                 "--data-dir", mnist_dir, "--out", str(tmp_path / "sw"), "-q"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line[:6] for line in lines] == ["done  ", "held  ", "done  "]
    assert lines[1].startswith("held  mnist-fc_bs8_seed1_bn_max2: another process is writing "
                               "it (path=")
    assert captured.err.rstrip().splitlines()[-1] == (
        "statscope: 1 of 3 runs are held by another process, which is writing them or wrote "
        "them meanwhile; run the same sweep again once it is done to see them completed")


def test_cli_docstring_examples_run():
    import doctest

    from statscope import cli

    failures, tried = doctest.testmod(cli)
    assert failures == 0 and tried > 0
