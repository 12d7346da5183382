"""Type checkers see statscope's public API (issue 13): mypy on the package laid out as installed.

The package-dir mapping (``statscope.probes`` lives in ``probes/``) reaches Python through the
editable install's import hook, which mypy does not run, so the test lays the package out as its
wheel does (symlinks, from pyproject's packages, package-dir and package-data) and puts that
folder on ``PYTHONPATH``: mypy then treats statscope as an installed package, which it reads only
with a ``py.typed`` marker. One mypy run checks the public modules listed in ``[tool.mypy]``,
a second (on the first run's cache) a script that uses the API the way a user would.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]


def _docs_hooks():
    # docs/api/hooks.py holds the one helper that lays the package out as installed
    spec = importlib.util.spec_from_file_location("statscope_docs_hooks",
                                                  ROOT / "docs" / "api" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lay_out_installed = _docs_hooks().lay_out_installed

# Never run, only checked. assert_type fails the check when a name's type is not the one stated
# (an Any from a lazy __getattr__ included); each "type: ignore" must be needed, since
# warn_unused_ignores is on: a call that should be rejected but is not fails the check too.
USER_SCRIPT = '''
import os

import torch
import xarray as xr
from dash import Dash
from typing_extensions import assert_type

import statscope
import statscope.analyses as sa
import statscope.nn
from statscope.dashboards import create_app
from statscope.export import ExportResult, export_run
from statscope.integrations import LiveExport, StatscopeCallback, StatscopeTrainerCallback
from statscope.probes import Recorder

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
with statscope.record(model, "runs/demo", meta={"batch_size": 4}) as rec:
    assert_type(rec, Recorder)
    rec.log(loss=0.5)
    step: int = rec.current_step

ds = statscope.open_run("runs/demo")
assert_type(ds, xr.Dataset)
assert_type(statscope.open_run(os.path.join("runs", "demo"), damaged="mask"), xr.Dataset)
assert_type(statscope.open_runs(["runs/a", "runs/b"]), xr.Dataset)
assert_type(sa.fluctuation(ds, window=200, scale_free=True), xr.Dataset)
assert_type(sa.layer_summary(sa.fluctuation(ds)), xr.Dataset)

try:
    statscope.open_run("runs/missing")
except statscope.StoreError as exc:
    assert_type(exc, statscope.StoreError)
    problem: statscope.StatscopeError = exc

hn = statscope.nn.HeteroNorm(16)
assert_type(hn, statscope.nn.HeteroNorm)
assert_type(create_app("runs/", warm=False), Dash)
assert_type(export_run("runs/demo", "tensorboard", "tb"), ExportResult)
callback = StatscopeCallback("runs/pl", live=LiveExport("tb", every=100))
assert_type(StatscopeTrainerCallback("runs/hf"), StatscopeTrainerCallback)

statscope.open_run(42)  # type: ignore[arg-type]
statscope.record(model)  # type: ignore[call-arg]
'''


@pytest.fixture(scope="module")
def mypy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("typing")
    site = lay_out_installed(tmp / "site")
    work = tmp / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MYPYPATH", None)

    def run(*args: str) -> str:
        # cwd outside the repository: statscope must come from site, as a user's would
        proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                               str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp / "cache"),
                               "--no-error-summary", "--hide-error-context", *args],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        out = (proc.stdout + proc.stderr).replace(str(site) + os.sep, "")
        errors = [line for line in out.splitlines() if ": error:" in line or "mypy: " in line]
        assert proc.returncode == 0 and not errors, "mypy:\n" + out
        return out

    return run


def test_public_modules_type_check(mypy):
    mypy()  # the modules and packages of [tool.mypy]


def test_a_users_script_sees_the_public_types(mypy, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    mypy(str(script))


def test_the_package_data_ships_py_typed(tmp_path):
    site = lay_out_installed(tmp_path)
    assert (site / "statscope" / "py.typed").is_file()
    assert (ROOT / "statscope" / "py.typed").is_file()
