"""The documentation site builds with ``mkdocs build --strict`` (issue 13).

Strict mode fails on any warning: a docstring mkdocstrings cannot parse, a cross-reference or a
link between pages that does not resolve, a page missing from the nav.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's banner about MkDocs 2.0
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = site / "api"
    for page in ("statscope", "probes", "store", "analyses", "nn", "dashboards", "integrations",
                 "export"):
        assert (api / page / "index.html").is_file(), page
    front = (api / "statscope" / "index.html").read_text()
    for name in ("statscope.record", "statscope.open_run", "statscope.open_runs",
                 "statscope.errors.StatscopeError"):
        assert f'id="{name}"' in front, name
    analyses = (api / "analyses" / "index.html").read_text()
    for name in ("select_window", "fluctuation_ci", "bn_en_gap", "batch_size_scaling",
                 "fluctuation.fluctuation", "claims.claims"):
        assert f'id="statscope.analyses.{name}"' in analyses, name
    assert 'id="statscope.dashboards.create_app"' in (api / "dashboards" / "index.html").read_text()
    for guide in ("guide", "store-format", "reproduction", "integrations"):
        assert (site / guide / "index.html").is_file(), guide
