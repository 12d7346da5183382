"""Live stores seen from outside: runs that are still being written, checked against numbers
computed here with numpy from the raw batches (never with ``statscope.analyses``).

A distributed run is written by one store per rank, and the ranks' writers commit at their own
pace: while it trains, one rank's store may hold steps another's does not hold yet. The merged
(global) statistics of such a step do not exist yet; the dashboard must not draw the ranks that
got there first as if they were the global ones.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from dashboard_fixtures import LiveRun, decode
from statscope import schema as S

LAYERS = (("fc1", 3), ("fc2", 2))
BATCHES = (3, 5)


class LiveDistributed:
    """A two-rank run whose ranks commit separately, as DDP ranks' writers do; every raw batch
    is kept so that the tests compute the global statistics themselves."""

    def __init__(self, path, seed: int = 0, window_steps: int = 50):
        from statscope.store import Layout, ProbeInfo
        from statscope.writer import RunWriter

        probes = tuple(ProbeInfo(name=n, module=n, type="BatchNorm1d", where="input",
                                 channel_dim=1, channels=c, groups=1) for n, c in LAYERS)
        self.writers = [RunWriter(f"{path}/rank{r}", Layout(probes=probes), flush_seconds=0,
                                  window_steps=window_steps,
                                  attrs={S.ATTR_META: {S.META_BATCH_SIZE: b}, S.ATTR_RANK: r,
                                         S.ATTR_WORLD_SIZE: len(BATCHES)})
                        for r, b in enumerate(BATCHES)]
        self.rng = np.random.default_rng(seed)
        self.raw: list[list[np.ndarray]] = [[] for _ in BATCHES]
        self.done = [0] * len(BATCHES)
        self.cuts = np.cumsum([0] + [c for _, c in LAYERS])

    def append(self, rank: int, k: int) -> None:
        """Rank ``rank`` trains ``k`` more steps and commits them."""
        b, n = BATCHES[rank], int(self.cuts[-1])
        x = 0.5 + self.rng.normal(size=(k, b, n)) * (1 + rank)
        en = [x[:, :, a:c].reshape(k, -1) for a, c in zip(self.cuts[:-1], self.cuts[1:])]
        stats = {S.BN_MEAN: x.mean(1).astype(np.float32), S.BN_STD: x.std(1).astype(np.float32),
                 S.EN_MEAN: np.stack([e.mean(1) for e in en], 1).astype(np.float32),
                 S.EN_STD: np.stack([e.std(1) for e in en], 1).astype(np.float32)}
        w = self.writers[rank]
        w.append(np.arange(self.done[rank], self.done[rank] + k), np.full((k, len(LAYERS)), b),
                 stats)
        w.flush()
        self.done[rank] += k
        self.raw[rank].append(x)

    def merged(self, upto: int) -> dict[str, np.ndarray]:
        """The global statistics of steps ``0..upto-1`` over every rank's batch, (steps, neurons),
        straight from the concatenated raw values."""
        x = np.concatenate([np.concatenate(r)[:upto] for r in self.raw], axis=1)
        out = {S.BN_MEAN: x.mean(1), S.BN_STD: x.std(1)}
        for stat, fn in ((S.EN_MEAN, np.mean), (S.EN_STD, np.std)):
            out[stat] = np.concatenate(
                [np.repeat(fn(x[:, :, a:c].reshape(upto, -1), axis=1)[:, None], c - a, 1)
                 for a, c in zip(self.cuts[:-1], self.cuts[1:])], 1)
        return out

    def close(self) -> None:
        for w in self.writers:
            w.close()


def _line(fig: dict, stat: str) -> tuple[np.ndarray, np.ndarray]:
    t = next(t for t in fig["data"] if (t.get("meta") or {}).get("stat") == stat)
    return np.asarray(t["x"], np.int64), np.asarray(t["y"], np.float64)


def _bars(fig: dict) -> dict[str, np.ndarray]:
    return {t["meta"]["stat"]: np.asarray(t["y"], np.float64) for t in fig["data"]
            if t.get("type") == "bar"}


def test_a_live_distributed_run_merges_only_the_steps_every_rank_committed(tmp_path):
    """Rank 1's writer is 50 steps behind rank 0's: the merged view draws steps 0–249, the
    global statistics of those steps, and their fluctuation; once rank 1 catches up, steps
    250–299 join with their global values. (Before, steps 250–299 were drawn "merged" from rank
    0 alone: batch size 3 posing as the global batch of 8.)"""
    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.data import RunCatalog

    root = tmp_path / "runs"
    ddp = LiveDistributed(root / "ddp")
    try:
        ddp.append(0, 300)
        ddp.append(1, 250)
        catalog = RunCatalog(root)
        evo = "?run=ddp&neuron=fc1:1&window=all&scalar=-"
        bars = "?tab=fluctuation&run=ddp&neuron=fc1:1&neuron=fc2:0&scale=raw"
        ref = ddp.merged(250)
        for stat in (S.BN_MEAN, S.BN_STD, S.EN_STD):
            x, y = _line(decode(cb.evolution(catalog, evo)), stat)
            np.testing.assert_array_equal(x, np.arange(250))
            np.testing.assert_allclose(y, ref[stat][:, 1], rtol=2e-6, atol=1e-7)
        got = _bars(decode(cb.fluctuation(catalog, bars)))
        for stat, y in got.items():  # last 200 steps every rank committed: 50..249
            np.testing.assert_allclose(y, np.std(ref[stat][50:250][:, [1, 3]], 0, ddof=1),
                                       rtol=1e-5)
        # the global bars of "each rank" are over the same steps: the same numbers
        each = _bars(decode(cb.fluctuation(catalog, bars + "&rank=each")))
        for stat in got:
            np.testing.assert_allclose(each[stat], got[stat], rtol=1e-5)
        assert catalog.info("ddp").last_step == 249  # the badge says what is drawn

        ddp.append(1, 50)  # rank 1 catches up
        catalog.refresh()
        ref = ddp.merged(300)
        x, y = _line(decode(cb.evolution(catalog, evo)), S.BN_STD)
        np.testing.assert_array_equal(x, np.arange(300))
        np.testing.assert_allclose(y, ref[S.BN_STD][:, 1], rtol=2e-6, atol=1e-7)
        got = _bars(decode(cb.fluctuation(catalog, bars)))
        for stat, y in got.items():
            np.testing.assert_allclose(y, np.std(ref[stat][100:300][:, [1, 3]], 0, ddof=1),
                                       rtol=1e-5)
        assert catalog.info("ddp").last_step == 299
    finally:
        ddp.close()


@pytest.mark.parametrize("search", ["?tab=fluctuation&run=fresh", "?tab=scatter&run=fresh",
                                    "?tab=heatmap&run=fresh", "?tab=run&run=fresh&run=old",
                                    "?tab=fluctuation&run=fresh&run=old&scale=raw"])
def test_a_run_with_no_step_yet_says_so_in_every_view(tmp_path, search):
    """A run whose training has not committed a step yet says "fresh has no steps recorded
    yet", as the evolution view does, not the analyses' "select_window: the dataset has no
    steps" or the heatmap's "No steps in this range."; beside another run, that run draws."""
    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.data import RunCatalog

    root = tmp_path / "runs"
    fresh = LiveRun(root / "fresh", LAYERS)
    try:
        old = LiveRun(root / "old", LAYERS, seed=1)
        written = old.append(300)
        old.close()
        catalog = RunCatalog(root)
        tab = search.split("tab=")[1].split("&")[0]
        if tab == "run":
            assert "fresh has no steps recorded yet" in str(cb.runs_tab(catalog, search))
            assert "select_window" not in str(cb.runs_tab(catalog, search))
            return
        fig = decode(getattr(cb, tab)(catalog, search))
        texts = [a.get("text", "") for a in fig["layout"].get("annotations", [])]
        title = fig["layout"].get("title", {}).get("text", "")
        assert "fresh has no steps recorded yet" in " ".join(texts + [title]), (texts, title)
        assert "select_window" not in " ".join(texts + [title])
        if "run=old" in search:
            got = _bars(fig)
            for stat, y in got.items():  # old's default neurons: each layer's first
                ref = np.std(written[stat][100:300].astype(np.float64), 0, ddof=1)
                np.testing.assert_allclose(y, ref[[0, 3]] if stat.startswith("bn") else ref,
                                           rtol=1e-5)
    finally:
        fresh.close()


CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.slow
@pytest.mark.browser
def test_in_chromium_a_live_distributed_run_is_merged_over_committed_steps(tmp_path):
    """In a real browser, with the page open while the lagging rank catches up: the bars and
    the evolution line are the global statistics computed here from the raw batches, before
    and after, with no reload and no console error."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    from statscope.dashboards import create_app
    from statscope.dashboards.server import bind

    root = tmp_path / "runs"
    ddp = LiveDistributed(root / "ddp", seed=3)
    profile = tmp_path / "chromium-profile"
    server = None
    try:
        ddp.append(0, 260)
        ddp.append(1, 220)
        server = bind(create_app(root), "127.0.0.1", 0).start()
        url = server.url.rstrip("/")
        with playwright.sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, args=ARGS, headless=True,
                viewport={"width": 1400, "height": 1000})
            try:
                page = ctx.new_page()
                log: list[str] = []
                page.on("console", lambda m: log.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: log.append(str(e)))
                page.goto(url + "/?tab=fluctuation&run=ddp&neuron=fc1:0&neuron=fc2:1&scale=raw")

                def bars(last_step: int, before: float | None = None) -> dict:
                    # the badge moves with the poll; the figure is redrawn after it
                    page.wait_for_function("""([last, before]) => {
                        const gd = document.querySelector('#fluctuation-graph .js-plotly-plot');
                        if (!gd || !gd._fullData) return false;
                        const bar = gd._fullData.find(t => t.type === 'bar');
                        return bar && Number(bar.y[0]) !== before
                            && document.querySelector('#run-status').innerText
                                   .includes('ddp · running · step ' + last);
                    }""", arg=[last_step, before], polling=200, timeout=60000)
                    return page.evaluate("""() => Object.fromEntries(
                        document.querySelector('#fluctuation-graph .js-plotly-plot')._fullData
                            .filter(t => t.type === 'bar')
                            .map(t => [t.meta.stat, Array.from(t.y, Number)]))""")

                got = bars(219)
                ref = ddp.merged(220)
                for stat, y in got.items():
                    np.testing.assert_allclose(
                        y, np.std(ref[stat][20:220][:, [0, 4]], 0, ddof=1), rtol=1e-5)
                ddp.append(1, 40)  # the page stays open; the poll finds the new steps
                got = bars(259, before=got[S.BN_MEAN][0])
                ref = ddp.merged(260)
                for stat, y in got.items():
                    np.testing.assert_allclose(
                        y, np.std(ref[stat][60:260][:, [0, 4]], 0, ddof=1), rtol=1e-5)
                assert log == []
            finally:
                ctx.close()
    finally:
        if server is not None:
            server.stop()
        ddp.close()
        shutil.rmtree(profile, ignore_errors=True)


def _recorded_subset(path, steps: int = 60) -> None:
    """A run that keeps the per-step columns of 2 channels of each layer (as ``neurons=2`` at
    recording) and window summaries of 20 steps of every channel, written by the store's
    writer."""
    from statscope.store import Layout, ProbeInfo
    from statscope.writer import RunWriter

    layers = (("1", 8), ("4", 6))
    probes = tuple(ProbeInfo(name=n, module=n, type="BatchNorm1d", where="input", channel_dim=1,
                             channels=c, groups=1, units=(0, 1)) for n, c in layers)
    rng = np.random.default_rng(7)
    n = sum(c for _, c in layers)
    writer = RunWriter(path, Layout(probes=probes), flush_seconds=0, window_steps=20,
                       attrs={S.ATTR_META: {S.META_BATCH_SIZE: 4}})
    writer.append(np.arange(steps), np.full((steps, 2), 4),
                  {S.BN_MEAN: rng.normal(size=(steps, n)).astype(np.float32),
                   S.BN_STD: (1 + rng.random((steps, n))).astype(np.float32),
                   S.EN_MEAN: rng.normal(size=(steps, 2)).astype(np.float32),
                   S.EN_STD: (1 + rng.random((steps, 2))).astype(np.float32)})
    writer.close()


def test_a_run_shorter_than_the_last_n_steps_gets_the_pages_advice_not_pythons(tmp_path):
    """Under "last 200" a live run at step 50 is left out with the analyses' reason; the advice
    was a Python caller's ("pass a smaller window or window='all'"), now the page's controls."""
    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.data import RunCatalog

    root = tmp_path / "runs"
    short = LiveRun(root / "short", LAYERS)
    try:
        short.append(50)
        old = LiveRun(root / "old", LAYERS, seed=1)
        written = old.append(300)
        old.close()
        fig = decode(cb.fluctuation(RunCatalog(root),
                                    "?tab=fluctuation&run=short&run=old&scale=raw"))
        texts = " ".join(a.get("text", "") for a in fig["layout"].get("annotations", []))
        texts += fig["layout"].get("title", {}).get("text", "")
        assert "short left out" in texts and "choose fewer steps under 'last', or 'all'" in texts
        assert "window='all'" not in texts
        for stat, y in _bars(fig).items():  # the other run draws its last 200 steps
            ref = np.std(written[stat][100:300].astype(np.float64), 0, ddof=1)
            np.testing.assert_allclose(y, ref[[0, 3]] if stat.startswith("bn") else ref,
                                       rtol=1e-5)
    finally:
        short.close()


def test_clicking_a_channel_kept_only_in_the_window_summaries_says_so(tmp_path):
    """The std-vs-mean view draws every channel from the window summaries; clicking one whose
    per-step columns were not kept cannot open its evolution. The page says why and stays,
    instead of opening the evolution of other neurons (the defaults) as if it were that one."""
    from statscope.dashboards import callbacks as cb
    from statscope.store import open_windows

    root = tmp_path / "runs"
    _recorded_subset(root / "sub")
    from statscope.dashboards.data import RunCatalog

    catalog = RunCatalog(root)
    search = "?tab=scatter&run=sub&window=all&scale=raw"
    fig = decode(cb.scatter(catalog, search))
    points = {k: (x, y) for t in fig["data"] if t.get("customdata") is not None
              for k, x, y in zip(t["customdata"], t["x"], t["y"])}
    # every channel, numbers from the summaries: the pooled std of the three 20-step windows
    w = open_windows(root / "sub")
    n = w["count"].values.astype(np.float64)
    for stat, axis in ((S.BN_MEAN, 0), (S.BN_STD, 1)):
        m = w[stat].sel(summary="mean").values.astype(np.float64)
        sd = w[stat].sel(summary="std").values.astype(np.float64)
        mean = (n * m).sum(0) / n.sum(0)
        ref = np.sqrt((((n - 1) * sd ** 2).sum(0) + (n * (m - mean) ** 2).sum(0))
                      / (n.sum(0) - 1))
        keys = [f"{l}:{u}" for l, u in zip(w[S.LAYER].values, w[S.UNIT].values)]
        np.testing.assert_allclose([points[k][axis] for k in keys], ref, rtol=1e-5)
    assert "1:5" in points

    def click(key):
        return cb.sync_state(catalog, "scatter-graph", search, None, ["sub"], None, None, None,
                             "all", 200, None, None, "raw", "neuron", "scatter", 0, None,
                             {"points": [{"customdata": key}]}, None, None)

    kept = click("1:1")  # a kept channel opens its evolution
    assert "neuron=1:1" in kept[0] and "tab=" not in kept[0]
    out = click("1:5")
    # the view stays on the scatter, rather than opening the defaults' evolution in its place
    assert "neuron=1:5" not in str(out[0]) and "tab=scatter" in str(out[0])
    assert out[16] == "scatter"
    notice = " ".join(map(str, out[-1]))
    assert "1[5]" in notice and "window summaries" in notice, notice
    # the same neuron typed into the URL: the defaults are drawn and the page says why
    # (before, they replaced it silently)
    typed = cb.sync_state(catalog, "url", "?tab=evolution&run=sub&neuron=1:5&neuron=1:1",
                          None, None, None, None, None, None, None, None, None, None, None, None,
                          None, None, None, None, None)
    assert "neuron=1:1" in str(typed[0]) and "1:5" not in str(typed[0])
    notice = " ".join(map(str, typed[-1]))
    assert "1[5]: no per-step series in sub" in notice and "showing 1[1]" in notice, notice


def test_a_range_reaching_past_a_live_runs_last_step_is_analysed_over_its_steps(tmp_path):
    """A range chosen to follow a live run into steps it has not reached (``window=100:999`` at
    step 299) draws steps 100–299 in the evolution view; the fluctuation, std-vs-mean and run
    views analyse the same steps, say which, and follow the run as it grows (they refused the
    whole range as "outside run", though it holds 200 of the run's steps)."""
    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.data import RunCatalog

    root = tmp_path / "runs"
    live = LiveRun(root / "live", LAYERS)
    try:
        parts = [live.append(300)]
        catalog = RunCatalog(root)
        search = "?tab=fluctuation&run=live&neuron=fc1:2&neuron=fc2:1&scale=raw&window=100:999"
        for upto in (300, 450):
            written = {s: np.concatenate([p[s] for p in parts]).astype(np.float64)
                       for s in parts[0]}
            fig = decode(cb.fluctuation(catalog, search))
            # the title names the chosen range; a note, the steps the run has of it so far
            title = fig["layout"]["title"]["text"]
            assert "statistics, steps 100–999" in title
            assert f"live: steps 100–{upto - 1}, the steps it has of steps 100–999" in title
            got = _bars(fig)
            assert set(got) == {S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD}
            for stat, y in got.items():
                cols = [2, 4] if stat.startswith("bn") else [0, 1]
                np.testing.assert_allclose(
                    y, np.std(written[stat][100:upto][:, cols], 0, ddof=1), rtol=1e-5)
            scatter = decode(cb.scatter(catalog, search.replace("fluctuation", "scatter")))
            assert f"live: steps 100–{upto - 1}" in scatter["layout"]["title"]["text"]
            x = np.concatenate([np.asarray(t["x"], float) for t in scatter["data"]
                                if t.get("customdata") is not None])
            np.testing.assert_allclose(  # raw scale: the std of BN_mean over the steps
                np.sort(x), np.sort(np.std(written[S.BN_MEAN][100:upto], 0, ddof=1)), rtol=1e-5)
            if upto == 300:  # the claims table too (its bootstrap takes seconds)
                card = str(cb.runs_tab(catalog, search.replace("fluctuation", "run")))
                assert "outside run" not in card and "verdict" in card, card
                assert "live: steps 100–299" in card
            parts.append(live.append(150))
            catalog.refresh()
    finally:
        live.close()
