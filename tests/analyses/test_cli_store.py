"""Through real stores on disk: open_run/open_runs, the CLI handlers, and one subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

import statscope
from statscope import schema as S
from statscope.analyses import claims, fluctuation

from analyses_synthetic import Layer, make_run, to_store


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    for bs in (4, 64):
        to_store(make_run((Layer("fc1"), Layer("fc2")), batch_size=bs, seed=bs), root / f"bs{bs}")
    return root


def test_store_round_trip_gives_the_same_fluctuation(tmp_path):
    mem = make_run(n_steps=300, seed=5)
    path = to_store(mem, tmp_path / "run")
    disk = statscope.open_run(path)
    a, b = fluctuation(mem, 200), fluctuation(disk, 200)
    for s in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD):
        np.testing.assert_allclose(a[s].values, b[s].values, rtol=1e-12)
    assert disk.statscope.fluctuation(window=200)[S.BN_MEAN].identical(b[S.BN_MEAN])


def test_a_run_opened_from_disk_is_named_by_its_folder(runs_dir):
    # messages named it by its model's class ("longer than run 'torch.nn...Sequential'"), which
    # does not tell a folder of runs of one model apart
    ds = statscope.open_run(runs_dir / "bs4")
    assert ds.attrs[S.ATTR_NAME] == "bs4"
    with pytest.raises(statscope.StatscopeError, match="longer than run 'bs4'"):
        fluctuation(ds, 5000)


def test_stacked_store_runs(runs_dir):
    ds = statscope.open_runs(runs_dir)
    c = claims(ds, n_boot=100)
    assert {r.run for r in c.rows if r.claim == "c"} == {"bs4"}


def _main(argv):
    from statscope.cli import main

    return main(argv)


@pytest.mark.parametrize("status, said", [
    ("failed", "failed before the end of training"),
    ("running", "is still running, or stopped without closing its store"),
])
def test_analyze_says_which_runs_did_not_complete_as_report_does(runs_dir, tmp_path, capsys,
                                                                 status, said):
    """Before, analyze tabled a killed or failed run's last steps as if they were the end of
    its training; report said so, analyze did not."""
    to_store(make_run((Layer("fc1"),), n_steps=300, batch_size=8, seed=1), tmp_path / "cut",
             status=status)
    assert _main(["analyze", str(tmp_path / "cut"), str(runs_dir / "bs4"), "--window", "100"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert f"note: {tmp_path / 'cut'}: the run {said} (status {status}, 300 steps recorded); " \
           "its window is the last steps it recorded, not the end of training" in notes
    assert not any("bs4: the run" in n for n in notes)  # completed: nothing said


def test_analyze_formats(runs_dir, tmp_path, capsys):
    assert _main(["analyze", str(runs_dir / "bs4"), "--window", "100", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run,config,batch_size,layer,statistic,median,q25,q75,first,excess")
    assert out.count("\n") == 1 + 2 * 4
    dest = tmp_path / "t.json"
    assert _main(["analyze", str(runs_dir), "--layers", "fc2", "--format", "json",
                  "-o", str(dest)]) == 0
    rows = json.loads(dest.read_text())
    # runs are named by their path
    assert {r["run"] for r in rows} == {str(runs_dir / "bs4"), str(runs_dir / "bs64")}
    assert {r["layer"] for r in rows} == {"fc2"}
    assert _main(["analyze", str(runs_dir / "bs64")]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "excess: observed / sampling-theory" in out


def test_analyze_a_folder_of_different_models(tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    to_store(make_run((Layer("fc1"), Layer("fc2")), seed=1), root / "mlp")
    to_store(make_run((Layer("conv1", channels=4), Layer("conv2", channels=4),
                       Layer("conv3", channels=4)), seed=2), root / "cnn")
    assert _main(["analyze", str(root), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert str(root / "mlp") in out and str(root / "cnn") in out and "conv3" in out


def test_analyze_and_report_skip_unreadable_and_empty_runs(runs_dir, tmp_path, capsys):
    garbage = runs_dir / "garbage"
    garbage.mkdir()
    (garbage / "zarr.json").write_text("{not json")
    empty = make_run(n_steps=300, seed=9).isel(step=slice(0, 0))
    to_store(empty, runs_dir / "empty")
    assert _main(["analyze", str(runs_dir), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "garbage" in captured.err and "empty" in captured.err
    assert str(runs_dir / "bs4") in captured.out
    dest = tmp_path / "r.md"
    assert _main(["report", str(runs_dir), "--n-boot", "50", "-o", str(dest)]) == 0
    assert "garbage" in capsys.readouterr().err and "`bs64`" in dest.read_text()



def test_analyze_from_window_summaries_skips_a_run_whose_summaries_are_damaged(runs_dir,
                                                                               capsys):
    # the summaries are read only when the table is made: a damaged one failed the command
    shard = next(p for p in sorted((runs_dir / "bs4" / "windows" / "bn_mean_mean").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    args = ["analyze", str(runs_dir), "--source", "windows", "--window", "200", "--format",
            "csv"]
    assert _main(args) == 0
    captured = capsys.readouterr()
    assert "statscope: warning: skipping" in captured.err and "bs4" in captured.err
    rows = captured.out.splitlines()[1:]
    assert rows and all(r.startswith(str(runs_dir / "bs64") + ",") for r in rows)
    assert _main(["analyze", str(runs_dir / "bs4"), *args[2:]]) == 2
    assert "no run to analyse" in capsys.readouterr().err

@pytest.mark.parametrize("argv, match", [
    (["--window", "5000"], "longer than run"),
    (["--layers", "fc9"], "no such layer fc9; available: fc1, fc2"),
    (["--window", "abc"], "--window='abc'"),
])
def test_analyze_bad_input(runs_dir, capsys, argv, match):
    assert _main(["analyze", str(runs_dir / "bs4"), *argv]) == 2
    assert match in capsys.readouterr().err


def test_analyze_missing_path(tmp_path, capsys):
    assert _main(["analyze", str(tmp_path / "nope")]) == 2
    assert "statscope: error:" in capsys.readouterr().err


def test_output_inside_a_run_is_refused(runs_dir, capsys):
    meta = (runs_dir / "bs4" / "zarr.json").read_bytes()
    for argv in (["analyze", str(runs_dir / "bs4"), "-o", str(runs_dir / "bs4" / "zarr.json")],
                 ["analyze", str(runs_dir), "-o", str(runs_dir / "bs64" / "t.txt")],
                 ["report", str(runs_dir), "-o", str(runs_dir / "bs4" / "report.html")]):
        assert _main(argv) == 2
        err = capsys.readouterr().err
        assert "inside the run" in err and err.count("\n") == 1
    assert (runs_dir / "bs4" / "zarr.json").read_bytes() == meta
    assert not (runs_dir / "bs64" / "t.txt").exists()


@pytest.mark.parametrize("argv, match", [
    (["--n-boot", "100000000"], "--n-boot=100000000: expected 1 to 100,000"),
    (["--n-boot", "0"], "--n-boot=0"),
    (["-o", "report.txt"], "expected a .html or .md"),
    (["--confidence", "1.5"], "--confidence=1.5"),
])
def test_report_bad_input(runs_dir, tmp_path, capsys, argv, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _main(["report", str(runs_dir), *argv]) == 2
    assert match in capsys.readouterr().err


def test_output_into_a_missing_folder_is_one_line(runs_dir, tmp_path, capsys):
    for cmd in ("analyze", "report"):
        assert _main([cmd, str(runs_dir / "bs4"), "-o", str(tmp_path / "no" / "x.md")]) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_subprocess(runs_dir, tmp_path):
    dest = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from statscope.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "report", str(runs_dir),
                           "--n-boot", "100", "-o", str(dest)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = dest.read_text()
    for part in ("## Summary: the paper's claims", "## Claims per run",
                 "## Fluctuation per layer (Figure 6)", "## Batch-size scaling", "`bs4`",
                 "last 200 steps", "block length", "**excess** —", "**first** —", "Holm"):
        assert part in text
