"""The wheel holds every package and its data, and imports without the source tree."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(ROOT), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("statscope-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = ("import statscope, statscope.probes, statscope.analyses, statscope.dashboards, "
            "statscope.nn, statscope.commands.run, statscope.experiments.datasets as d; "
            "print(statscope.__file__); print(d.load_dataset('mnist-5k-subset').train_x.shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(target)})
    path, shape = out.stdout.split("\n")[:2]
    assert path.startswith(str(target)), path
    assert shape == "torch.Size([4000, 28, 28])"
    # the C++ kernels are built from the installed sources on first use: every one must ship
    sources = {p.name for p in (ROOT / "statscope" / "csrc").iterdir()}
    assert {p.name for p in (target / "statscope" / "csrc").iterdir()} == sources
