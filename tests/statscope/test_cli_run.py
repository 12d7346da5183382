"""``statscope run``, ``sweep``, ``runs`` and ``info`` through ``main(argv)`` and one subprocess."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import statscope
from statscope import schema as S
from statscope.cli import main

from test_experiments_support import offline_env, write_mnist

pytestmark = pytest.mark.usefixtures("offline")


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


def test_quiet_run_prints_only_the_summary(tmp_path, mnist_dir, capsys):
    assert main(["run", "mnist-fc", "--bs", "8", "--max-steps", "3", "--data-dir", mnist_dir,
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1


def test_default_out_is_a_new_folder_under_runs(tmp_path, mnist_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "mnist-fc", "--bs", "8", "--max-steps", "2", "--data-dir", mnist_dir, "-q"]
    assert main(argv) == 0 and main(argv) == 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["mnist-fc_bs8_seed0_bn_max2",
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
    (["run", "mnist-fc", "--bs", "4", "@truncated"], "train-images-idx3-ubyte", False),
    (["run", "mnist-fc", "--bs", "4", "@magic"], "train-images-idx3-ubyte has magic 2049, "
                                                 "expected 2051", False),
    (["run", "cifar-resnet18", "--bs", "4", "@out"], "name='cifar10': not found in", False),
    (["run", "mnist-fc", "--dataset", "cifar10", "@out"], "dataset='cifar10': mnist-fc takes "
                                                          "mnist, fashion-mnist", False),
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


def test_sweep_runs_the_grid_and_is_restartable(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "mnist-fc", "--bs", "4", "8", "--seeds", "0", "1", "--max-steps", "6",
            "--data-dir", mnist_dir, "--out", str(out), "-q"]
    assert main(argv) == 0
    names = sorted(os.listdir(out))
    assert names == sorted(f"mnist-fc_bs{b}_seed{s}_bn_max6" for b in (4, 8) for s in (0, 1))
    assert capsys.readouterr().out.count("done  ") == 4
    # a run interrupted after 3 steps is resumed, the completed ones are skipped
    import shutil

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
    assert sorted(os.listdir(out)) == ["a", "a.checkpoint.pt", "b", "b.checkpoint.pt"]
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
    assert sorted(os.listdir(out)) == ["a", "b"]  # completed runs keep no checkpoint
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
    assert sorted(os.listdir(out)) == ["mnist-fc_bs8_seed0_bn_max4", "mnist-fc_bs8_seed0_hn_max4"]
    ds = statscope.open_runs(str(out))
    assert list(ds[S.META_NORM].values) == ["bn", "hn"]
    assert list(ds[S.ATTR_N_STEPS].values) == [4, 4]


def test_sweep_reports_a_failing_run_and_goes_on(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "mnist-fc", "--bs", "8", "--norm", "in", "bn", "--max-steps", "2",
                 "--data-dir", mnist_dir, "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert "FAIL  mnist-fc_bs8_seed0_in_max2: norm='in' with batch_size=8" in captured.out
    assert "done  mnist-fc_bs8_seed0_bn_max2" in captured.out
    assert "1 of 2 runs failed" in captured.err


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
    assert proc.stdout.count("done  ") == 2 and len(os.listdir(tmp_path / "sw")) == 2
