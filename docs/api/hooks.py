"""MkDocs hook: let mkdocstrings read statscope as it is installed.

statscope maps top-level folders into its namespace (pyproject's package-dir: ``statscope.probes``
lives in ``probes/``), which griffe, the reader behind mkdocstrings, cannot follow from the
source tree. The hook lays the package out as its wheel does, as symlinks in a temporary folder,
and points the Python handler there. tests/test_typing.py uses the same layout for mypy.
"""

import atexit
import fnmatch
import shutil
import tempfile
import tomllib
from pathlib import Path

try:
    from mkdocs.plugins import event_priority
except ImportError:  # imported for lay_out_installed alone, where mkdocs is not installed
    def event_priority(priority):
        return lambda f: f

ROOT = Path(__file__).resolve().parents[2]


def lay_out_installed(dst: Path) -> Path:
    """Symlink the files the wheel holds (pyproject's packages, package-dir, package-data) under
    ``dst``, at their installed paths; returns ``dst``."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir, data = cfg["package-dir"], cfg.get("package-data", {})
    for package in cfg["packages"]:
        parts = package.split(".")
        mapped = next(".".join(parts[:i]) for i in range(len(parts), 0, -1)
                      if ".".join(parts[:i]) in package_dir)
        src = ROOT / package_dir[mapped] / Path(*parts[len(mapped.split(".")):])
        out = dst.joinpath(*parts)
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and (f.suffix == ".py" or any(fnmatch.fnmatch(f.name, g)
                                                         for g in data.get(package, []))):
                (out / f.name).symlink_to(f)
    return dst


@event_priority(100)  # before mkdocstrings reads its handlers' options
def on_config(config):
    site = Path(tempfile.mkdtemp(prefix="statscope-api-"))
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    handlers = config.plugins["mkdocstrings"].config.handlers
    handlers.setdefault("python", {})["paths"] = [str(lay_out_installed(site))]
    return config
