"""statscope.analyses imports only numpy, scipy, xarray (+ dask/pandas) and the kernel."""

import ast
import doctest
import importlib
import pathlib
import sys

import pytest

import statscope.analyses

ROOT = pathlib.Path(statscope.analyses.__file__).parent
ALLOWED = {"numpy", "scipy", "xarray", "dask", "pandas", "__future__", "math", "warnings",
           "contextlib", "dataclasses", "typing", "collections", "functools", "itertools",
           "statistics", "json", "os", "pathlib", "textwrap", "datetime", "io", "importlib"}
KERNEL = {"statscope.errors", "statscope.schema", "statscope.store", "statscope.ranks"}
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_imports_stay_inside_the_allowed_set(path):
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "statscope":
            assert name in KERNEL or name == "statscope", f"{path.name} imports {name}"
        else:
            assert top in ALLOWED, f"{path.name} imports {name}"


def test_no_subpackages():
    assert not [p for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_all_is_literal_and_complete():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    [node] = [n for n in tree.body if isinstance(n, ast.Assign)
              and any(getattr(t, "id", "") == "__all__" for t in n.targets)]
    names = ast.literal_eval(node.value)
    assert all(hasattr(statscope.analyses, n) for n in names)


def test_importing_analyses_does_not_load_torch():
    code = "import statscope.analyses, sys; assert 'torch' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    mod = importlib.import_module(f"statscope.analyses.{name}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
