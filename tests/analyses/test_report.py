"""``statscope report``: built on a small sweep, parsed back, and opened in a headless browser."""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser

import pytest

from statscope.analyses import build_report, render_markdown
from statscope.analyses.claims import CLAIMS

from analyses_synthetic import Layer, make_run, to_store

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 batch sizes × 2 seeds of a two-layer net, 300 steps each, as real stores."""
    root = tmp_path_factory.mktemp("sweep")
    heavy = (Layer("fc1", spread_jitter=0.4), Layer("fc2", spread_jitter=0.4, mean_jitter=0.1))
    for bs in (4, 64):
        for seed in (0, 1):
            to_store(make_run(heavy, batch_size=bs, seed=seed + 10 * bs), root / f"bs{bs}_s{seed}")
    return root


@pytest.fixture(scope="module")
def report_html(sweep, tmp_path_factory):
    from statscope.cli import main

    out = tmp_path_factory.mktemp("out") / "report.html"
    assert main(["report", str(sweep), "--n-boot", "200", "-o", str(out)]) == 0
    return out


class _Page(HTMLParser):
    """Collects the summary cells, figure divs, scripts and column explanations."""

    def __init__(self):
        super().__init__()
        self.cells, self.divs, self.script_src, self.scripts, self.dt = [], [], [], [], []
        self._in, self._buf = None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-claim" in a:
            self.cells.append(a)
        if tag == "div" and a.get("id") in ("fig6", "fig7", "scatter") or \
                (tag == "div" and str(a.get("id", "")).startswith("scaling")):
            self.divs.append(a["id"])
        if tag == "script":
            if a.get("src"):
                self.script_src.append(a["src"])
            self._in, self._buf = "script", []
        if tag == "dt":
            self._in, self._buf = "dt", []

    def handle_data(self, data):
        if self._in:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if tag == self._in:
            (self.scripts if tag == "script" else self.dt).append("".join(self._buf))
            self._in = None


def test_report_html_is_self_contained_and_complete(sweep, report_html):
    from statscope.store import find_runs, open_run

    text = report_html.read_text()
    page = _Page()
    page.feed(text)
    # every claim × layer × configuration of the pooled table has its summary cell
    runs = {os.path.basename(p): open_run(p) for p in find_runs(sweep)}
    report = build_report(runs, 200, n_boot=200)
    expected = {(r.claim, r.layer, r.config, r.statistic) for r in report.pooled.rows}
    got = {(c["data-claim"], c["data-layer"], c["data-config"], c["data-statistic"])
           for c in page.cells}
    assert got == expected and {c for c, *_ in got} == set(CLAIMS)
    assert {c["data-layer"] for c in page.cells} == {"fc1", "fc2"}
    assert {c["data-config"] for c in page.cells} == {"batch size 4", "batch size 64"}
    # the paper-style figures are embedded, drawn, and plotly.js is inline (works offline)
    assert page.divs == ["fig6", "fig7", "scatter", "scaling0"]
    assert not page.script_src
    assert max(len(s) for s in page.scripts) > 1_000_000
    assert sum("Plotly.newPlot" in s for s in page.scripts) == 4
    # the columns are explained where they appear, and the window is named
    assert {"excess", "first", "median", "p_adjusted", "n_eff", "block"} <= set(page.dt)
    assert "window: last 200 steps" in text and "Holm" in text
    assert text.index("id='summary'") < text.index("id='figures'") < text.index("id='tables'")


def test_report_markdown_has_the_same_summary(sweep, tmp_path):
    from statscope.cli import main

    out = tmp_path / "report.md"
    assert main(["report", str(sweep), "--n-boot", "200", "-o", str(out)]) == 0
    text = out.read_text()
    summary = text[text.index("## Summary"):text.index("## Claims per configuration")]
    assert "| claim | statistic | config | fc1 | fc2 |" in summary
    for claim in CLAIMS:
        assert f"| ({claim}) |" in summary
    assert "**excess** —" in text and "**first** —" in text


def test_render_markdown_from_a_report(sweep):
    from statscope.store import open_runs

    report = build_report(open_runs(sweep), 100, n_boot=100)
    assert [r.config for r in report.runs].count("batch size 4") == 2
    assert report.window == "last 100 steps"
    assert render_markdown(report).startswith("# statscope report")
    [scaling] = report.scaling
    assert scaling.result is not None and scaling.result.attrs["method"] == "runs"


@pytest.mark.browser
def test_report_opens_in_a_headless_browser_without_errors(report_html, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    profile = tmp_path / "chromium-profile"
    errors = []
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
            viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report_html.as_uri())
            page.wait_for_function("""() => {
                const gds = document.querySelectorAll('.js-plotly-plot');
                return gds.length === 4 && [...gds].every(g => g._fullData && g._fullData.length);
            }""", polling=100, timeout=30000)
            cells = page.evaluate("document.querySelectorAll('#summary-table td[data-claim]')"
                                  ".length")
            assert cells > 0
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
    assert not errors, errors


def test_the_markdown_summary_of_a_model_with_many_layers_counts_layers_per_verdict(tmp_path):
    from collections import Counter

    from statscope.store import open_runs

    layers = tuple(Layer(f"l{i}", spread_jitter=0.4 if i % 3 else 0.0) for i in range(9))
    for bs in (4, 64):
        to_store(make_run(layers, n_steps=200, batch_size=bs, seed=bs), tmp_path / f"bs{bs}")
    report = build_report(open_runs(tmp_path), 100, n_boot=100)
    text = render_markdown(report)
    assert "| claim | statistic | config | holds | does not hold | inconclusive |" in text
    want = Counter((r.claim, r.statistic, r.config, r.verdict) for r in report.pooled.rows)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| (")]
    seen = 0
    for cells in rows[:len({k[:3] for k in want})]:  # the tally comes first
        claim, stat, config = cells[0][3:-1], cells[1], cells[2]
        n = sum(v for k, v in want.items() if k[:3] == (claim, stat, config))
        for verdict, cell in zip(("holds", "does not hold", "inconclusive"), cells[3:6]):
            assert cell == f"{want[(claim, stat, config, verdict)]} of {n}"
        failing = [r.layer for r in report.pooled.rows if (r.claim, r.statistic, r.config,
                                                           r.verdict) == (claim, stat, config,
                                                                          "does not hold")]
        named = ", ".join(f"`{la}`" for la in failing[:8])
        assert cells[6].rstrip(" |") == named + (f" and {len(failing) - 8} more"
                                                 if len(failing) > 8 else "")
        seen += 1
    assert seen == len({k[:3] for k in want})
