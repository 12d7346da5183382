"""The direction of dependencies (../shared/STYLE.md) and a light ``import statscope``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"statscope": ROOT / "statscope", "statscope.probes": ROOT / "probes",
           "statscope.analyses": ROOT / "analyses", "statscope.dashboards": ROOT / "dashboards"}
KERNEL = {"statscope.errors", "statscope.schema", "statscope.store", "statscope.writer",
          "statscope.writer_arrays", "statscope.storage", "statscope.lease", "statscope.integrity",
          "statscope.layout", "statscope.arrays", "statscope.windows", "statscope.ranks",
          "statscope.discovery"}
# Deliberate exceptions to RULES, each with its reason.
EXCEPTIONS = {
    # ds.statscope must exist however open_run was imported (issue 9): the module that defines
    # open_run registers the accessor, which lives with the analyses it calls. The analyses never
    # import torch, so the kernel stays torch-free.
    ("statscope.store", "statscope.analyses.accessor"),
}
SIBLINGS = {"statscope.probes", "statscope.analyses", "statscope.dashboards", "statscope.nn",
            "statscope.experiments", "statscope.cli", "statscope.commands"}

# package -> (statscope packages it may import, third-party roots it must not import)
RULES = {
    "kernel": (set(), {"torch", "dash", "plotly"}),
    "statscope.probes": (set(), {"dash", "plotly"}),
    "statscope.analyses": (set(), {"torch", "dash", "plotly"}),
    "statscope.dashboards": ({"statscope.analyses"}, {"torch"}),
    "statscope.nn": (set(), {"dash", "plotly", "xarray", "zarr"}),
}


def modules():
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def imports(name, path):
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


def owner(name):
    if name in KERNEL:
        return "kernel"
    for pkg in ("statscope.probes", "statscope.analyses", "statscope.dashboards", "statscope.nn"):
        if name == pkg or name.startswith(pkg + "."):
            return pkg
    return None  # front door, cli, commands, experiments: may import everything


CHECKED = [(n, p) for n, p in modules() if owner(n)]


@pytest.mark.parametrize("name, path", CHECKED, ids=[n for n, _ in CHECKED])
def test_imports_follow_the_direction_of_dependencies(name, path):
    pkg = owner(name)
    allowed, banned = RULES[pkg]
    for imported in imports(name, path):
        root = imported.split(".")[0]
        assert root not in banned, f"{name} imports {imported}"
        if (name, imported) in EXCEPTIONS:
            continue
        for sib in SIBLINGS:
            if imported == sib or imported.startswith(sib + "."):
                assert sib == pkg or sib in allowed, f"{name} imports {imported}"


def test_checked_modules_cover_every_package():
    assert {owner(n) for n, _ in CHECKED} == set(RULES)


def run_python(code, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, check=True)


def test_import_statscope_is_light():
    out = run_python("import sys, statscope; "
                     "print(sorted(m for m in ('torch', 'dash', 'plotly', 'xarray', 'zarr') "
                     "if m in sys.modules))")
    assert out.stdout.strip() == "[]"


ANALYSE = """
import sys, numpy as np, statscope
from statscope.writer import write_run
rng = np.random.default_rng(0)
data = {k: rng.random((5, 2), dtype='f4') for k in ('bn_mean', 'bn_std')}
data.update({k: rng.random((5, 1), dtype='f4') for k in ('en_mean', 'en_std')})
write_run(sys.argv[1], {'a': 2}, data)
statscope.open_run(sys.argv[1]).statscope.fluctuation(window=3)
print('torch' in sys.modules, 'dash' in sys.modules)
"""


def test_analysing_a_store_needs_no_torch(tmp_path):
    assert run_python(ANALYSE, tmp_path / "r").stdout.strip() == "False False"
