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


def test_stacked_store_runs(runs_dir):
    ds = statscope.open_runs(runs_dir)
    c = claims(ds, n_boot=100)
    assert {r.run for r in c.rows if r.claim == "c"} == {"bs4"}


def _main(argv):
    from statscope.cli import main

    return main(argv)


def test_analyze_formats(runs_dir, tmp_path, capsys):
    assert _main(["analyze", str(runs_dir / "bs4"), "--window", "100", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run,batch_size,layer,statistic,median,q25,q75,first,excess")
    assert out.count("\n") == 1 + 2 * 4
    dest = tmp_path / "t.json"
    assert _main(["analyze", str(runs_dir), "--layers", "fc2", "--format", "json",
                  "-o", str(dest)]) == 0
    rows = json.loads(dest.read_text())
    assert {r["run"] for r in rows} == {"bs4", "bs64"} and {r["layer"] for r in rows} == {"fc2"}
    assert _main(["analyze", str(runs_dir / "bs64")]) == 0
    assert "fc1" in capsys.readouterr().out


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


def test_report_subprocess(runs_dir, tmp_path):
    dest = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from statscope.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "report", str(runs_dir),
                           "--n-boot", "100", "-o", str(dest)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = dest.read_text()
    for part in ("## The paper's claims", "## Fluctuation per layer (Figure 6)",
                 "## Batch-size scaling", "`bs4`", "last 200 steps", "block length"):
        assert part in text
