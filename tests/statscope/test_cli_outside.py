"""The commands and the matching API with bad or edge arguments, as a user gives them: empty
paths, out-of-range numbers, wrong types, a run asked for inside another run, object-store URLs
whose bucket is missing or whose store cannot be reached, ``file://`` URLs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.cli import main
from statscope.errors import StatscopeError

from test_experiments_support import offline_env

pytestmark = pytest.mark.usefixtures("offline")

_TIMEOUT = 120


def make_run(path, steps: int = 6) -> str:
    """A small completed run at ``path`` (no data set needed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    with statscope.record(model, path, writer="thread", window_steps=2) as rec:
        for _ in range(steps):
            loss = model(torch.randn(5, 4)).square().mean()
            loss.backward()
            rec.log(loss=loss.detach())
    return str(path)


def files_under(folder) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def error_line(capsys) -> str:
    """The command's one ``statscope: error:`` line (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- export --step-offset -----------------------------------------------------------------------

@pytest.mark.parametrize("offset", [-5, -1, 2**62 + 1, 2**63, 10**23])
def test_export_refuses_a_negative_or_huge_step_offset_and_writes_nothing(tmp_path, capsys,
                                                                         offset):
    """A negative offset would write store step 0 at a negative step; one past 2**62 overflows
    TensorBoard's 64-bit steps (a traceback before)."""
    run = make_run(tmp_path / "run")
    target = tmp_path / "tb"
    assert main(["export", run, "--to", "tensorboard", str(target), "--window", "2",
                 "--step-offset", str(offset)]) == 2
    assert error_line(capsys) == (f"statscope: error: --step-offset {offset}: expected an "
                                  "integer in 0..2**62 (store step k is written at step k + "
                                  "offset)")
    assert not target.exists()


def test_export_takes_a_step_offset_of_zero_and_a_positive_one(tmp_path):
    run = make_run(tmp_path / "run")
    for offset in ("0", "7"):
        assert main(["export", run, "--to", "tensorboard", str(tmp_path / f"tb{offset}"),
                     "--window", "2", "--step-offset", offset]) == 0
        assert any((tmp_path / f"tb{offset}").iterdir())


# --- empty path arguments ---------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "name"), [
    (["info", ""], "RUN"), (["runs", ""], "dir"), (["analyze", ""], "RUN_OR_DIR"),
    (["report", "", "-o", "r.md"], "RUN_OR_DIR"),
    (["export", "", "--to", "tensorboard", "tb"], "RUN"),
    (["dashboard", "", "--no-browser", "--port", "0"], "PATH")])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch,
                                                                   capsys, argv, name):
    """``statscope runs "$DIR"`` with DIR unset: an error naming the argument, not a listing of
    (or an analysis of, an export of) whatever the current folder holds."""
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"{name}=''" in line and "empty string" in line
    assert files_under(tmp_path) == before


def test_analyze_refuses_an_empty_output_name(tmp_path, capsys):
    """``-o "$OUT"`` with OUT unset: an error, not the table on stdout as if -o were absent."""
    run = make_run(tmp_path / "run")
    assert main(["analyze", run, "--window", "all", "-o", ""]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "statscope: error: -o '': expected a file name" in captured.err


# --- statscope run --out inside a run, --overwrite with --resume ------------------------------

def test_run_refuses_an_out_inside_another_run_before_anything_is_written(tmp_path, capsys):
    parent = make_run(tmp_path / "parent")
    before = files_under(parent)
    assert main(["run", "mnist-fc", "--bs", "4", "--max-steps", "2", "--dataset",
                 "mnist-5k-subset", "-q", "--out", os.path.join(parent, "sub", "run")]) == 2
    line = error_line(capsys)
    assert "inside the run" in line and parent in line
    assert files_under(parent) == before  # nothing new among the run's files
    assert statscope.open_run(parent).sizes["step"] == 6


def test_run_resume_of_a_run_recorded_through_the_api_says_what_it_is(tmp_path, capsys):
    """Before, every experiment setting was listed as "stored None, now ..."."""
    from statscope.writer import write_run

    rng = np.random.default_rng(0)
    out = write_run(tmp_path / "api", {"fc": 4},
                    {"bn_mean": rng.normal(size=(5, 4)), "bn_std": 1 + rng.random((5, 4)),
                     "en_mean": rng.normal(size=(5, 1)), "en_std": 1 + rng.random((5, 1))},
                    meta={"batch_size": 4}, status="failed")
    before = files_under(out)
    assert main(["run", "mnist-fc", "--bs", "4", "--max-steps", "2", "--dataset",
                 "mnist-5k-subset", "-q", "--out", out, "--resume"]) != 0
    line = error_line(capsys)
    assert "not a run that statscope run recorded" in line and "stored None" not in line, line
    assert files_under(out) == before


def test_run_resume_with_no_run_at_out_says_a_new_run_starts(tmp_path, capsys):
    """Before, --resume with a mistyped --out silently recorded a new run from step 0."""
    out = str(tmp_path / "typo")
    assert main(["run", "mnist-fc", "--bs", "4", "--max-steps", "2", "--dataset",
                 "mnist-5k-subset", "-q", "--out", out, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"statscope: warning: --resume: no run at out={out!r}; a new run starts" in err, err
    assert statscope.open_run(out).sizes["step"] == 2


def test_run_says_overwrite_and_resume_exclude_each_other_by_their_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "mnist-fc", "--out", str(tmp_path / "r"), "--overwrite", "--resume"])
    assert stop.value.code == 2
    line = error_line(capsys)
    assert "--resume" in line and "--overwrite" in line
    assert not (tmp_path / "r").exists()


# --- the experiments' API ---------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "value"), [
    ("out", 123), ("out", b"runs/x"), ("out", "  "), ("data_dir", ""), ("data_dir", 5),
    ("download", "no"), ("overwrite", "yes"), ("resume", 1)])
def test_run_config_refuses_a_wrong_type_with_a_statscope_error(setting, value):
    from statscope.experiments import RunConfig

    with pytest.raises(StatscopeError, match=f"^{setting}="):
        RunConfig("mnist-fc", **{setting: value})


def test_run_config_takes_path_like_out_and_data_dir(tmp_path):
    from statscope.experiments import RunConfig

    cfg = RunConfig("mnist-fc", out=tmp_path / "r", data_dir=tmp_path)
    assert cfg.resolved().out == str(tmp_path / "r")


@pytest.mark.parametrize("grid", [{"batch_sizes": []}, {"seeds": []}, {"norms": []},
                                  {"norms": "bn"}])
def test_plan_sweep_refuses_an_empty_grid(tmp_path, grid):
    from statscope.experiments import RunConfig
    from statscope.experiments.sweep import plan_sweep

    kwargs = {"batch_sizes": [4], "seeds": [0], **grid}
    name = next(iter(grid))
    with pytest.raises(StatscopeError, match=f"^{name}="):
        plan_sweep(RunConfig("mnist-fc"), tmp_path / "sweep", **kwargs)
    assert not (tmp_path / "sweep").exists()


def test_plan_sweep_takes_iterators():
    from statscope.experiments import RunConfig
    from statscope.experiments.sweep import plan_sweep

    items = plan_sweep(RunConfig("mnist-fc"), "/tmp/no-such-sweep-outside",
                       batch_sizes=iter([4, 8]), seeds=(s for s in [0, 1]))
    assert len(items) == 4


# --- file:// URLs -----------------------------------------------------------------------------

def test_dashboard_reads_a_file_url_as_the_folder_it_names(tmp_path, capsys):
    """As ``info``, ``analyze`` and ``run --out`` do; an empty folder: no runs in it (rather
    than "no such file or directory"), without serving anything."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["dashboard", f"file://{empty}", "--no-browser", "--port", "0"]) == 2
    line = error_line(capsys)
    assert "no statscope runs found" in line and "no such file" not in line


# --- object-store URLs: a missing bucket, a store that cannot be reached ----------------------

def _cli(argv, env, cwd):
    """``statscope ARGV`` as a real process: its exit code and stderr."""
    proc = subprocess.run([sys.executable, "-m", "statscope", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=_TIMEOUT)
    return proc.returncode, proc.stderr


def _base_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(offline_env(tmp_path))
    # no credentials anywhere botocore looks, and no wait on an instance-metadata service
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
                "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
                "AWS_EC2_METADATA_DISABLED": "true"})
    return env


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """An S3 API server (moto's server mode) on 127.0.0.1 with one bucket, ``runs``."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from test_object_store import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1"
                     ).create_bucket(Bucket="runs")
        yield endpoint


_COMMANDS = [["info"], ["runs"], ["analyze"], ["report", "-o", "r.md"],
             ["export", "--to", "tensorboard", "tb"], ["dashboard", "--no-browser", "--port", "0"]]
_NAMES = {"info": "RUN", "runs": "dir", "analyze": "RUN_OR_DIR", "report": "RUN_OR_DIR",
          "export": "RUN", "dashboard": "PATH"}


def _argv(command, url):
    return [command[0], url, *command[1:]]


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=[] if c[0] == "info" else [pytest.mark.slow])
    for c in _COMMANDS], ids=[c[0] for c in _COMMANDS])
def test_a_missing_bucket_is_named_not_called_an_unreadable_run(tmp_path, s3_server, command):
    env = {**_base_env(tmp_path), "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}
    name = _NAMES[command[0]]
    code, err = _cli(_argv(command, "s3://no-such-bucket/run"), env, tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert (f"{name}='s3://no-such-bucket/run': the bucket 'no-such-bucket' does not exist"
            in err), err
    code, err = _cli(_argv(command, "s3://runs/no-such-run"), env, tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert f"{name}='s3://runs/no-such-run': no such run or folder" in err, err
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=[] if c[0] == "analyze" else [pytest.mark.slow])
    for c in _COMMANDS[2:5]], ids=[c[0] for c in _COMMANDS[2:5]])
def test_a_store_that_cannot_be_used_is_said_so_by_analyze_report_and_export(tmp_path, command):
    """No credentials: "the object store cannot be used", not "not a statscope run"."""
    code, err = _cli(_argv(command, "s3://some-bucket/run"), _base_env(tmp_path), tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert "the object store cannot be used" in err and "NoCredentialsError" in err, err
    assert "not a statscope run" not in err, err


# --- resuming with another window_steps ----------------------------------------------------

def test_resuming_with_another_window_steps_goes_on_with_the_runs_own_and_says_so(tmp_path):
    """Before, the stored W was kept and the one asked for dropped without a word. The run's
    windows all have its own W (as its chunks its chunk_steps): the resume keeps it and warns,
    naming both, and the windows stay the exact mean and std of each W steps."""
    from statscope.store import open_windows

    run = make_run(tmp_path / "run")  # window_steps=2, steps 0..5
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    with pytest.warns(statscope.StatscopeWarning,
                      match=r"window summaries of window_steps=2; resumed with window_steps=3"):
        with statscope.record(model, run, resume=True, writer="thread", window_steps=3):
            for _ in range(4):
                model(torch.randn(5, 4)).square().mean().backward()
    ds = statscope.open_run(run)
    assert ds.sizes["step"] == 10 and ds.attrs["window_steps"] == 2
    win = open_windows(run)
    assert win.attrs["window_steps"] == 2 and win.sizes["window"] == 5
    per_step = ds["bn_mean"].values.astype(np.float64)  # (10, 6): the reference's input
    for w in range(5):
        rows = per_step[2 * w:2 * w + 2]
        np.testing.assert_allclose(win["bn_mean"].sel(summary="mean").values[w],
                                   rows.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(win["bn_mean"].sel(summary="std").values[w],
                                   rows.std(0, ddof=1), rtol=1e-5, atol=1e-6)
