"""End to end in a real headless Chromium: load, change a selector, zoom, follow a live run."""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest

from dashboard_fixtures import LiveRun, synthetic_run, write_synthetic

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)


@pytest.fixture
def served(tmp_path):
    """The app over bs4/bs128 stores (3,000 steps), served by waitress on 127.0.0.1, port 0."""
    from statscope.dashboards import create_app
    from statscope.dashboards.server import bind

    root = tmp_path / "runs"
    layers = (("fc1", 16), ("fc2", 16), ("fc3", 16))
    write_synthetic(root / "bs4", synthetic_run(3000, layers, batch_size=4, seed=1))
    write_synthetic(root / "bs128", synthetic_run(3000, layers, batch_size=128, seed=2))
    app = create_app(root)
    server = bind(app, "127.0.0.1", 0).start()
    yield server.url.rstrip("/"), root, app
    server.stop()


@pytest.fixture
def server(served):
    url, root, _ = served
    return url, root


@pytest.fixture
def page(tmp_path):
    profile = tmp_path / "chromium-profile"
    with playwright.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=ARGS, headless=True,
            viewport={"width": 1400, "height": 1000})
        try:
            yield ctx.new_page()
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def _traces(page, graph: str):
    """Name, run and x range of each trace as plotly holds them in the page."""
    return page.evaluate(f"""() => {{
        const gd = document.querySelector('#{graph} .js-plotly-plot');
        return gd._fullData.map(t => ({{name: t.name, meta: t.meta || null,
            n: t.x ? t.x.length : 0, x0: t.x ? Number(t.x[0]) : null,
            x1: t.x ? Number(t.x[t.x.length - 1]) : null}}));
    }}""")


def _wait(page, graph: str, condition: str = "true"):
    page.wait_for_function(f"""() => {{
        const gd = document.querySelector('#{graph} .js-plotly-plot');
        if (!gd || !gd._fullData || !gd._fullData.length) return false;
        const traces = gd._fullData;
        return {condition};
    }}""", polling=100, timeout=30000)


def test_load_select_zoom_and_screenshot(server, page, tmp_path):
    url, _ = server
    page.goto(url + "/")
    _wait(page, "evolution-graph", "traces.length === 2 * 3 * 2 * 2 + 2")  # + loss per run
    traces = _traces(page, "evolution-graph")
    assert {t["meta"]["run"] for t in traces} == {"bs4", "bs128"}
    assert sorted(t["meta"]["run"] for t in traces if "scalar" in t["meta"]) == ["bs128", "bs4"]
    assert all(t["n"] == 200 and t["x0"] == 2800 and t["x1"] == 2999 for t in traces)
    assert "run=bs4&run=bs128" in page.url

    # Change a selector: all of training; the URL follows and traces span every step.
    page.locator("#win-kind").get_by_text("all").click()
    _wait(page, "evolution-graph", "traces.every(t => Number(t.x[0]) === 0)")
    assert "window=all" in page.url
    assert all(t["x1"] == 2999 for t in _traces(page, "evolution-graph"))

    # Zoom on steps 1000-1100 in the first run's column: the server answers with that run's
    # full-resolution slice; the other run keeps its own axis and window. (First let the first
    # poll's redraw pass: a zoom made while the figure is being replaced can be lost.)
    page.wait_for_function("() => document.querySelector('#run-status').innerText"
                           ".includes('bs128 · completed')", polling=100, timeout=30000)
    page.wait_for_timeout(1000)
    page.evaluate("""() => Plotly.relayout(document.querySelector('#evolution-graph .js-plotly-plot'),
                                          {'xaxis.range[0]': 1000, 'xaxis.range[1]': 1100})""")
    _wait(page, "evolution-graph",
          "traces.filter(t => t.meta.run === 'bs4').every(t => t.x.length === 101)")
    traces = _traces(page, "evolution-graph")
    assert all(t["x0"] == 1000 and t["x1"] == 1100 for t in traces if t["meta"]["run"] == "bs4")
    assert all(t["x0"] == 0 and t["x1"] == 2999 for t in traces if t["meta"]["run"] == "bs128")
    page.screenshot(path=str(tmp_path / "evolution.png"), full_page=True)
    # the toolbar's image export (SVG) works on this figure
    svg = page.evaluate("""() => Plotly.toImage(
        document.querySelector('#evolution-graph .js-plotly-plot'), {format: 'svg'})""")
    assert svg.startswith("data:image/svg+xml") and len(svg) > 10_000

    # A bookmarked URL restores the view: one run, one neuron, the fluctuation bars per layer.
    page.goto(url + "/?tab=fluctuation&run=bs4&neuron=fc2:3&by=layer&scale=raw")
    _wait(page, "fluctuation-graph", "traces.filter(t => t.type === 'bar').length === 4")
    bars = _traces(page, "fluctuation-graph")
    assert {t["meta"]["run"] for t in bars} == {"bs4"}
    assert page.locator("#neurons").inner_text().count("fc2[3]") == 1
    page.screenshot(path=str(tmp_path / "fluctuation.png"), full_page=True)


def test_scatter_click_opens_the_neurons_evolution(server, page):
    url, _ = server
    page.goto(url + "/?tab=scatter&run=bs4")
    _wait(page, "scatter-graph", "traces.some(t => t.name === 'fc2')")
    box = page.evaluate("""() => {
        const gd = document.querySelector('#scatter-graph .js-plotly-plot');
        const i = gd._fullData.findIndex(t => t.name === 'fc2');
        const pt = gd.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('path.point')[5];
        const r = pt.getBoundingClientRect();
        return {x: r.x + r.width / 2, y: r.y + r.height / 2};
    }""")
    page.mouse.move(box["x"], box["y"])
    page.mouse.click(box["x"], box["y"])
    page.wait_for_url("**neuron=fc2:5**", timeout=15000)
    assert "tab=" not in page.url  # the evolution tab is the default and is left out
    _wait(page, "evolution-graph", "traces.length === 5")  # 4 statistics and the loss


def test_live_run_is_followed_without_a_reload(server, page):
    url, root = server
    page.goto(url + "/?run=bs4")
    _wait(page, "evolution-graph")
    live = LiveRun(root / "live", (("fc1", 4), ("fc2", 4)))
    live.append(500)
    page.wait_for_function("() => document.querySelector('#run-status').innerText"
                           ".includes('live · running · step 499')", polling=200, timeout=15000)
    page.goto(url + "/?run=live&window=all")
    _wait(page, "evolution-graph", "traces.every(t => Number(t.x[t.x.length-1]) === 499)")
    live.append(400)
    live.close()
    # the poll sees the new steps and the completed status; the figure follows, no reload
    _wait(page, "evolution-graph", "traces.every(t => Number(t.x[t.x.length-1]) === 899)")
    page.wait_for_function("() => document.querySelector('#run-status').innerText"
                           ".includes('live · completed · step 899')", polling=200, timeout=15000)


def _boxes(page, graph: str) -> list[dict]:
    """Bounding boxes of every text plotly drew in a graph: tick labels, axis titles, panel
    titles and notes, the figure title and the legend."""
    return page.evaluate(f"""() => {{
        const gd = document.querySelector('#{graph} .js-plotly-plot');
        // ticks are in g.xtick, g.y2tick..., titles in g.g-xtitle, g.g-y3title, g.g-gtitle
        const sel = 'g[class$="tick"] > text, g[class^="g-"][class$="title"] text, ' +
                    '.annotation-text, .legendtext';
        return Array.from(gd.querySelectorAll(sel)).map(e => {{
            const r = e.getBoundingClientRect();
            return {{kind: (e.getAttribute('class') || '') + ' ' +
                           (e.parentNode.getAttribute('class') || ''),
                     text: e.textContent, x0: r.left, x1: r.right, y0: r.top, y1: r.bottom}};
        }}).filter(b => b.x1 - b.x0 > 0 && b.y1 - b.y0 > 0);
    }}""")


def _overlaps(boxes: list[dict], slack: float = 0.5) -> list[tuple[str, str]]:
    return [(a["text"], b["text"]) for a, b in itertools.combinations(boxes, 2)
            if min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) > slack
            and min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) > slack]


def test_no_label_overlaps_another_and_negative_ticks_keep_their_sign(served, page, tmp_path):
    """Tick labels, axis titles, panel titles, notes and legend never overlap, in every view.

    The "tiny" run's means are small and negative, so its tick labels are wide ("−0.0045"):
    the y titles must make room for them instead of hiding their minus signs.
    """
    url, root, app = served
    tiny = synthetic_run(3000, (("fc1", 4), ("fc2", 4)), batch_size=8, seed=3)
    for stat in ("bn_mean", "en_mean"):
        tiny[stat] = tiny[stat] * 1e-3 - 0.004
    write_synthetic(root / "tiny", tiny)
    app.catalog.refresh()
    views = {"evolution-graph": "/?run=tiny&neuron=fc1:0",
             "evolution-graph ": "/?run=tiny&run=bs4&run=bs128&neuron=fc1:0&neuron=fc3:1",
             "fluctuation-graph": "/?tab=fluctuation&run=tiny&run=bs4&run=bs128&scale=raw"
                                  "&neuron=fc1:0&neuron=fc3:1",
             "scatter-graph": "/?tab=scatter&run=tiny&run=bs4&run=bs128"}
    for key, view in views.items():
        graph = key.strip()
        page.goto(url + view)
        _wait(page, graph, "traces.length > 4")
        # the URL gains its defaults and the figure is drawn again; automargin redraws once more
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / f"{graph}{len(key)}.png"), full_page=True)
        boxes = _boxes(page, graph)
        assert len(boxes) > 20, [(b["kind"], b["text"]) for b in boxes]
        assert not _overlaps(boxes), (view, _overlaps(boxes))
        if "run=bs4" not in view:
            ticks = [b["text"] for b in boxes if b["kind"].endswith("tick")
                     and b["kind"].split()[-1].startswith("y")]
            assert any(t.startswith("−") and "0.00" in t for t in ticks), ticks
        elif graph == "evolution-graph":
            # the run without fc3[1] says so in its panels instead of leaving them blank
            notes = [b["text"] for b in boxes if b["text"].startswith("no fc3[1]")]
            assert notes == ["no fc3[1] in tiny"] * 2


def test_a_distributed_run_by_rank(served, page):
    """The rank selector appears for a distributed run; each rank is drawn beside the merged
    statistics, and choosing one rank writes it into the URL and redraws."""
    from dashboard_fixtures import distributed_run

    url, root, app = served
    distributed_run(root / "ddp", n_steps=600, batches=(3, 5))
    app.catalog.refresh()
    page.goto(url + "/?run=ddp&neuron=fc1:0&scalar=-&rank=each")
    _wait(page, "evolution-graph", "traces.length === 3 * 4")  # 2 ranks and merged, 4 stats
    ranks = {str(t["meta"]["rank"]) for t in _traces(page, "evolution-graph")}
    assert ranks == {"0", "1", "merged"}
    page.locator("#rank").get_by_text("rank 1").click()
    page.wait_for_url("**rank=1**", timeout=15000)
    _wait(page, "evolution-graph", "traces.length === 4 && traces.every(t => t.meta.rank === 1)")
    page.goto(url + "/?tab=fluctuation&run=ddp&rank=each&scale=raw&neuron=fc1:0&neuron=fc2:1")
    _wait(page, "fluctuation-graph", "traces.some(t => t.name === 'each rank')")
    traces = _traces(page, "fluctuation-graph")
    bars = [t for t in traces if t["meta"].get("rank") == "merged"]
    dots = [t for t in traces if t["name"] == "each rank"]
    assert len(bars) == 4 and len(dots) == 8 and all(t["n"] == 2 for t in bars + dots)
    boxes = _boxes(page, "fluctuation-graph")
    assert not _overlaps([b for b in boxes if "legend" in b["kind"] or "title" in b["kind"]])


def _console(page) -> list[str]:
    """Collects the page's console errors and uncaught exceptions from now on."""
    log: list[str] = []
    page.on("console", lambda m: log.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: log.append(str(e)))
    return log


def test_an_empty_evolution_cell_logs_no_console_error(served, page):
    """A run without the chosen neuron leaves its cells empty with a note; plotly.js drawing
    that figure over the page's first one logged "<path> attribute d: Expected number,
    "MNaN,NaN..." for them (on every load, depending on which arrived first)."""
    url, root, app = served
    write_synthetic(root / "other", synthetic_run(300, (("conv1", 4),), batch_size=8, seed=4))
    app.catalog.refresh()
    search = "?run=other&run=bs4&neuron=fc1:0&scalar=-"
    log = _console(page)
    page.goto(url + "/" + search)
    _wait(page, "evolution-graph", "traces.some(t => t.meta && t.meta.run === 'bs4')")
    page.wait_for_load_state("networkidle")
    notes = page.evaluate("""() => document.querySelector('#evolution-graph .js-plotly-plot')
                                   .layout.annotations.map(a => a.text)""")
    assert notes.count("no fc1[0] in other") == 2
    # the same drawing made deterministic: the graph's first figure, as the page's layout
    # sends it, then the server's answer for this view drawn over it
    drawn = page.evaluate("""async (search) => {
        const find = (node) => {
            if (!node || typeof node !== 'object') return null;
            if (node.props && node.props.id === 'evolution-graph') return node.props;
            for (const value of Object.values(node.props || node)) {
                for (const child of (Array.isArray(value) ? value : [value])) {
                    const hit = find(child);
                    if (hit) return hit;
                }
            }
            return null;
        };
        const first = find(await (await fetch('/_dash-layout')).json()).figure;
        const body = {output: 'evolution-graph.figure',
                      outputs: {id: 'evolution-graph', property: 'figure'},
                      inputs: [{id: 'url', property: 'search', value: search},
                               {id: 'version', property: 'data', value: null},
                               {id: 'evolution-zoom', property: 'data', value: null}],
                      changedPropIds: ['url.search'], state: []};
        const answer = await (await fetch('/_dash-update-component', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)})).json();
        const figure = answer.response['evolution-graph'].figure;
        const div = document.createElement('div');
        document.body.appendChild(div);
        await Plotly.newPlot(div, first.data || [], first.layout || {});
        await Plotly.react(div, figure.data, figure.layout);
        return figure.data.length;
    }""", search)
    page.wait_for_timeout(500)
    assert drawn == 2 + 4  # a placeholder in each of other's two cells, bs4's four lines
    assert log == []


def _window_controls(page) -> tuple:
    return (page.evaluate("""() => Array.from(document.querySelectorAll('#win-kind input'))
                                   .filter(i => i.checked).map(i => i.value)"""),
            page.locator("#win-start").input_value(), page.locator("#win-stop").input_value())


def _bn_mean(page) -> dict:
    """Steps and values of the evolution figure's BN_mean line, as plotly holds them."""
    return page.evaluate("""() => {
        const gd = document.querySelector('#evolution-graph .js-plotly-plot');
        const t = gd._fullData.find(t => t.meta && t.meta.stat === 'bn_mean');
        return {x: Array.from(t.x, Number), y: Array.from(t.y, Number)};
    }""")


def test_the_window_range_is_chosen_and_typed_in_the_controls(server, page):
    """Choosing "range" keeps the radio on range with the current window's steps in its
    boxes; a range being typed is left alone, and a complete one is drawn."""
    from statscope.store import open_run

    url, root = server
    page.goto(url + "/?run=bs4&neuron=fc1:0&scalar=-")
    _wait(page, "evolution-graph", "traces.length === 4")
    page.wait_for_load_state("networkidle")
    page.locator("#win-kind").get_by_text("range").click()
    page.wait_for_url("**window=2800:2999**", timeout=15000)
    assert _window_controls(page) == (["range"], "2800", "2999")
    page.locator("#win-start").fill("1000")
    page.locator("#win-start").press("Enter")
    page.wait_for_url("**window=1000:2999**", timeout=15000)
    # a last step before the first is being typed: nothing changes, nothing is reset
    page.locator("#win-stop").fill("500")
    page.locator("#win-stop").press("Enter")
    page.wait_for_timeout(1500)
    assert "window=1000:2999" in page.url
    assert _window_controls(page) == (["range"], "1000", "500")
    page.locator("#win-stop").fill("1100")
    page.locator("#win-stop").press("Enter")
    page.wait_for_url("**window=1000:1100**", timeout=15000)
    _wait(page, "evolution-graph", "traces.every(t => t.x.length === 101)")
    assert _window_controls(page) == (["range"], "1000", "1100")
    line = _bn_mean(page)
    stored = open_run(root / "bs4")
    np.testing.assert_array_equal(line["x"], np.arange(1000, 1101))
    np.testing.assert_allclose(line["y"], stored.bn_mean.values[1000:1101, 0], rtol=1e-6)


def _badges(page) -> str:
    return page.locator("#run-status").inner_text()


@pytest.mark.slow
def test_a_page_follows_a_rerun_a_killed_writer_and_a_run_that_goes_away(served, page):
    """A run re-run into its folder is drawn afresh; a run whose writer was killed is called
    stopped; a run renamed while shown is named in a notice."""
    from dashboard_fixtures import kill_writer, start_writer
    from statscope.store import open_run

    url, root, app = served
    write_synthetic(root / "c", synthetic_run(300, (("fc1", 4),), batch_size=4, seed=5))
    app.catalog.refresh()
    page.goto(url + "/?run=c&neuron=fc1:1&window=all&scalar=-")
    _wait(page, "evolution-graph", "traces.every(t => Number(t.x[t.x.length - 1]) === 299)")
    write_synthetic(root / "c", synthetic_run(700, (("fc1", 4),), batch_size=8, seed=6),
                    overwrite=True)
    _wait(page, "evolution-graph", "traces.every(t => Number(t.x[t.x.length - 1]) === 699)")
    page.wait_for_function("() => document.querySelector('#run-status').innerText"
                           ".includes('c · completed · step 699')", polling=200, timeout=15000)
    line = _bn_mean(page)
    stored = open_run(root / "c")
    np.testing.assert_array_equal(line["x"], stored.step.values)
    np.testing.assert_allclose(line["y"], stored.bn_mean.values[:, 1], rtol=1e-6)

    writer = start_writer(root / "k", 30)
    try:
        page.wait_for_function("() => document.querySelector('#run-status').innerText"
                               ".includes('k · running · step 29')", polling=200, timeout=15000)
    finally:
        kill_writer(writer)
    page.wait_for_function("() => document.querySelector('#run-status').innerText"
                           ".includes('k · stopped (no writer) · step 29')", polling=200,
                           timeout=15000)

    os.rename(root / "c", root / "c_renamed")
    page.wait_for_function("() => document.querySelector('#view-notice').innerText"
                           ".includes('Run c is not under')", polling=200, timeout=15000)
    assert "run=c&" not in page.url + "&"
