"""Direction of dependencies: the dashboard reads stores; it never imports torch or the probes."""

import ast
import subprocess
import sys
from pathlib import Path

import statscope.dashboards

PKG = Path(statscope.dashboards.__file__).parent
# statscope.lease: the kernel's record of who writes a run (it imports only statscope.errors);
# the dashboard reads it to tell a killed run from a running one. flask: dash's web server, whose
# requests the app checks before dash handles them.
ALLOWED = {"dash", "flask", "plotly", "numpy", "xarray", "tsdownsample", "waitress",
           "statscope.errors",
           "statscope.schema", "statscope.store", "statscope.storage", "statscope.ranks",
           "statscope.lease", "statscope.analyses"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
PURE = ("bars", "downsample", "evolution", "heatmap", "runinfo", "scatter", "state", "style",
        "data", "metrics", "grid", "limits", "stamps")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _allowed(name: str) -> bool:
    top = name.split(".")[0]
    return top in STDLIB or any(name == a or name.startswith(a + ".") for a in ALLOWED)


def test_dashboards_import_only_the_kernel_analyses_and_the_plotting_stack():
    bad = {p.name: n for p in PKG.glob("*.py") for n in _imports(p) if not _allowed(n)}
    assert not bad, bad


def test_figure_builders_do_not_import_dash():
    for mod in PURE:
        names = _imports(PKG / f"{mod}.py")
        assert not [n for n in names if n == "dash" or n.startswith("dash.")], mod


def test_importing_a_figure_builder_loads_neither_dash_nor_torch():
    code = ("import sys, statscope.dashboards.evolution, statscope.dashboards.bars;"
            "print([m for m in ('dash', 'torch', 'statscope.probes') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
