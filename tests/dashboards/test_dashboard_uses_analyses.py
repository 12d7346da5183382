"""The dashboard's fluctuation from window summaries and its per-rank gap are the analyses' numbers
(``statscope.analyses.fluctuation(..., source="windows")``, ``statscope.analyses.rank_gap``), and
both are checked against numpy on the values written to the stores: window summaries over one,
several, partial and inexact windows, a layer that skipped steps, a non-finite value, a run
keeping some units' per-step columns, raw and scale-free; per-neuron and per-layer rank gaps,
a rank missing steps."""

import numpy as np
import pytest

from dashboard_fixtures import distributed_run, merged_reference, synthetic_run, write_synthetic
from statscope import analyses as A
from statscope import schema as S
from statscope.dashboards import results, sources
from statscope.dashboards.data import RunCatalog
from statscope.dashboards.metrics import to_analyses_window
from statscope.dashboards.state import MERGED, Window
from statscope.store import Layout, ProbeInfo, open_windows
from statscope.writer import RunWriter, write_run

STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)


def _std(x, ran, skip_nan=False):
    """Per column, the sample std (ddof=1) over the steps that ran; a non-finite value makes the
    column NaN (as window summaries keep it) unless ``skip_nan`` (as the per-step analyses)."""
    x = np.where(ran, np.asarray(x, np.float64), np.nan)
    if skip_nan:
        x = np.where(np.isfinite(x), x, np.nan)
    bad = ran & ~np.isfinite(np.asarray(x, np.float64))
    n = (ran & np.isfinite(x)).sum(0) if skip_nan else ran.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.array([np.nanstd(x[:, j][np.isfinite(x[:, j])], ddof=1) if n[j] > 1 else np.nan
                        for j in range(x.shape[1])])
    return out if skip_nan else np.where(bad.any(0), np.nan, out)


def _sigma(bn_std, count):
    """σ̄ per column: sqrt of the mean over the steps that ran of bn_std² · n/(n−1)."""
    n = np.asarray(count, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(n > 1, np.asarray(bn_std, np.float64) ** 2 * n / (n - 1), np.nan)
    return np.sqrt(np.nanmean(v, 0))


def _dashboard(cat, run, window, scale_free, rank=None):
    f = results.fluct(cat, run, rank, window, scale_free)
    return f


# --- the fluctuation from window summaries ---------------------------------------------------


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    ds = synthetic_run(n_steps=600, layers=(("fc1", 4), ("fc2", 4)), seed=5)
    write_synthetic(tmp_path / "r", ds)
    monkeypatch.setattr(sources, "MAX_SERIES_VALUES", 0)  # the per-step series is "too large"
    return tmp_path, ds


@pytest.mark.parametrize("scale_free", [False, True])
@pytest.mark.parametrize("spec,used", [("last:200", (400, 600)), ("all", (0, 600)),
                                       ("200:599", (200, 600)), ("last:400", (200, 600)),
                                       ("last:300", (400, 600))])  # inexact: whole windows inside
def test_window_summaries_are_the_analyses_and_numpy_numbers(synthetic, scale_free, spec, used):
    root, ds = synthetic
    cat = RunCatalog(root)
    f = _dashboard(cat, "r", Window.parse(spec), scale_free)
    assert f.source.kind == sources.WINDOWS and f.source.exact == (spec != "last:300")
    ref = A.fluctuation(cat.dataset("r"), used, source="windows", windows=open_windows(root / "r"),
                        scale_free=scale_free)
    rows = slice(*used)
    ran = ds[S.COUNT].values[rows] > 0
    sigma = _sigma(ds[S.BN_STD].values[rows], ds[S.COUNT].values[rows]) if scale_free else 1.0
    for stat in STATS:
        want = _std(ds[stat].values[rows], ran) / sigma
        np.testing.assert_allclose(f.values[stat].values, ref[stat].values, rtol=1e-9,
                                   err_msg=stat)
        np.testing.assert_allclose(f.values[stat].values, want, rtol=5e-5, err_msg=stat)
    np.testing.assert_array_equal(f.values["n_valid"].values, used[1] - used[0])
    # the layer summary is of those values
    np.testing.assert_allclose(f.summary[S.BN_STD].sel(quantity="median").values,
                               A.layer_summary(ref)[S.BN_STD].sel(quantity="median").values,
                               rtol=1e-9)
    assert f.source.note in f.values.attrs[S.NOTES]


def _partial_run(path, counts=None, n_steps=500, seed=0):
    """fc1 (4 channels, per-step columns for units 0 and 2 only) and fc2 (3 channels); 500
    steps, so the last window of 200 is partial; fc2 skips steps 250..299 (count 0); fc1's
    unit 2 holds a NaN ``bn_mean`` at step 120. Returns the full-width statistics written and
    the per-layer counts."""
    rng = np.random.default_rng(seed)
    probes = (ProbeInfo("fc1", "fc1", "BatchNorm1d", "input", 1, 4, units=(0, 2)),
              ProbeInfo("fc2", "fc2", "BatchNorm1d", "input", 1, 3))
    stats = {S.BN_MEAN: rng.normal(size=(n_steps, 7)),
             S.BN_STD: 1 + rng.random((n_steps, 7)),
             S.EN_MEAN: rng.normal(size=(n_steps, 2)),
             S.EN_STD: 1 + rng.random((n_steps, 2))}
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    stats[S.BN_MEAN][120, 2] = np.nan
    count = np.full((n_steps, 2), 16) if counts is None else counts
    count[250:300, 1] = 0
    writer = RunWriter(path, Layout(probes=probes), flush_seconds=float("inf"), window_steps=200)
    writer.append(np.arange(n_steps), count, stats)
    writer.close()
    return stats, count


def _wide(stats, count):
    """The per-channel (7 columns) statistics and counts of :func:`_partial_run`."""
    en = [0, 0, 0, 0, 1, 1, 1]
    return ({S.BN_MEAN: stats[S.BN_MEAN], S.BN_STD: stats[S.BN_STD],
             S.EN_MEAN: stats[S.EN_MEAN][:, en], S.EN_STD: stats[S.EN_STD][:, en]},
            count[:, en])


@pytest.mark.parametrize("scale_free", [False, True])
@pytest.mark.parametrize("spec,used", [("all", (0, 500)), ("0:399", (0, 400)),
                                       ("400:499", (400, 500)), ("last:250", (400, 500)),
                                       ("200:499", (200, 500))])
def test_partial_windows_skipped_steps_nan_and_kept_units(tmp_path, monkeypatch, scale_free,
                                                          spec, used):
    monkeypatch.setattr(sources, "MAX_SERIES_VALUES", 0)  # also past the inexact window
    stats, count = _partial_run(tmp_path / "p")
    wide, n = _wide(stats, count)
    cat = RunCatalog(tmp_path)
    assert cat.dataset("p").sizes[S.NEURON] == 5  # fc1: units 0, 2; fc2: all three
    f = _dashboard(cat, "p", Window.parse(spec), scale_free)
    assert f.source.kind == sources.WINDOWS  # the summaries cover more channels
    assert f.values.sizes[S.NEURON] == 7
    ref = A.fluctuation(cat.dataset("p"), used, source="windows",
                        windows=open_windows(tmp_path / "p"), scale_free=scale_free)
    rows = slice(*used)
    ran = n[rows] > 0
    sigma = _sigma(wide[S.BN_STD][rows], n[rows]) if scale_free else 1.0
    for stat in STATS:
        want = _std(wide[stat][rows], ran) / sigma
        np.testing.assert_allclose(f.values[stat].values, ref[stat].values, rtol=1e-9,
                                   err_msg=stat)
        np.testing.assert_allclose(f.values[stat].values, want, rtol=5e-5, err_msg=stat)
    np.testing.assert_array_equal(f.values["n_valid"].values, ran.sum(0))
    # both summary paths make a window holding a NaN NaN for its channel; the per-step
    # analyses skip the step instead (the shared, documented limit of window summaries)
    nan_in = used[0] <= 120 < used[1]
    assert np.isnan(f.values[S.BN_MEAN].values[2]) == nan_in
    if nan_in:
        assert np.isfinite(_std(wide[S.BN_MEAN][rows], ran, skip_nan=True)[2])
    assert f.find("fc1", 3) == 3 and f.find("fc2", 0) == 4 and f.find("fc1", 4) is None


def test_scale_free_with_a_varying_element_count_is_exact(tmp_path, monkeypatch):
    """Batches of 2 and 16 elements alternate: σ̄ = sqrt(mean of bn_std² · n/(n−1)) needs each
    step's n with its bn_std. The analyses refuse it from window summaries; the dashboard
    takes the per-step series then, which gives the numpy value."""
    count = np.where(np.arange(500)[:, None] % 2, 2, 16) * np.ones((1, 2), int)
    stats, count = _partial_run(tmp_path / "v", counts=count)
    wide, n = _wide(stats, count)
    cat = RunCatalog(tmp_path)
    rows = slice(0, 400)
    f = _dashboard(cat, "v", Window.parse("0:399"), True)
    kept = [0, 2, 4, 5, 6]
    ran = n[rows] > 0
    sigma = _sigma(wide[S.BN_STD][rows], n[rows])
    for stat in STATS:
        want = (_std(wide[stat][rows], ran, skip_nan=True) / sigma)[kept]
        np.testing.assert_allclose(f.values[stat].values, want, rtol=5e-5, err_msg=stat)
    raw = _dashboard(cat, "v", Window.parse("0:399"), False)  # raw: the summaries still serve
    assert raw.source.kind == sources.WINDOWS and raw.values.sizes[S.NEURON] == 7


# --- the per-rank gap ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    raw = distributed_run(root / "ddp", batches=(3, 5))
    return root, raw


def _rank_reference(raw, rows, scale_free):
    """Per-rank and merged fluctuation of every neuron straight from the raw batches."""
    per = {}
    for r, x in enumerate(raw["x"]):
        n = raw["batches"][r]
        cuts = np.cumsum([0] + [c for _, c in raw["layers"]])
        en_m = np.concatenate([np.repeat(x[:, :, a:b].reshape(len(x), -1).mean(1)[:, None], b - a,
                                         1) for a, b in zip(cuts[:-1], cuts[1:])], 1)
        en_s = np.concatenate([np.repeat(x[:, :, a:b].reshape(len(x), -1).std(1)[:, None], b - a,
                                         1) for a, b in zip(cuts[:-1], cuts[1:])], 1)
        st = {S.BN_MEAN: x.mean(1), S.BN_STD: x.std(1), S.EN_MEAN: en_m, S.EN_STD: en_s}
        sig = _sigma(st[S.BN_STD][rows], np.full_like(st[S.BN_STD][rows], n)) if scale_free \
            else 1.0
        per[r] = {s: np.std(st[s][rows], 0, ddof=1) / sig for s in STATS}
    glob = merged_reference(raw)
    total = sum(raw["batches"])
    sig = _sigma(glob[S.BN_STD][rows], np.full_like(glob[S.BN_STD][rows], total)) if scale_free \
        else 1.0
    merged = {s: np.std(glob[s][rows], 0, ddof=1) / sig for s in STATS}
    return per, merged


@pytest.mark.parametrize("force_windows", [False, True])
@pytest.mark.parametrize("scale_free", [False, True])
@pytest.mark.parametrize("spec", ["last:200", "all", "100:349"])
def test_rank_gap_per_neuron_is_the_analyses_and_numpy_gap(ddp, monkeypatch, scale_free, spec,
                                                           force_windows):
    root, raw = ddp
    if force_windows:  # each rank's fluctuation from its window summaries where they apply
        monkeypatch.setattr(sources, "MAX_SERIES_VALUES", 0)
    cat = RunCatalog(root)
    window = Window.parse(spec)
    neurons = [("fc1", 0), ("fc1", 3), ("fc2", 1)]
    cols = [0, 3, 5]
    rc = results.rank_comparison(cat, "ddp", window, scale_free, "neuron", neurons)
    rows = window.rows(cat.steps("ddp"))
    per, merged = _rank_reference(raw, rows, scale_free)
    g = A.rank_gap(cat.dataset("ddp").isel({S.STEP: rows}), "all", scale_free=scale_free)
    for s in STATS:
        for r in (0, 1):
            np.testing.assert_allclose(rc.per_rank[r][s], per[r][s][cols], rtol=1e-4)
            np.testing.assert_allclose(rc.per_rank[r][s],
                                       g.per_rank.sel(statistic=s, rank=r).values[cols],
                                       rtol=5e-5)
        np.testing.assert_allclose(rc.merged[s], merged[s][cols], rtol=1e-4)
        local = np.sqrt((per[0][s] ** 2 + per[1][s] ** 2) / 2)[cols]
        np.testing.assert_allclose(rc.gap[s]["per_rank"], local, rtol=1e-4)
        np.testing.assert_allclose(rc.gap[s]["gap"], 1 - merged[s][cols] / local, atol=1e-4)
        np.testing.assert_allclose(rc.gap[s]["gap"], g.removed.sel(statistic=s).values[cols],
                                   atol=5e-5)
    want = 1 - np.sqrt((1 / 8) / np.mean([1 / 3, 1 / 5]))
    np.testing.assert_allclose(rc.expected, want)
    np.testing.assert_allclose(rc.expected, g.expected.values[cols])


@pytest.mark.parametrize("scale_free", [False, True])
def test_rank_gap_per_layer_draws_medians_and_their_gap(ddp, scale_free):
    """Per layer: bars the median global fluctuation, circles each rank's median, labelled
    with 1 − median global / RMS over ranks of the medians (the change between what is drawn);
    the expected gap is that of the layer's element counts."""
    root, raw = ddp
    cat = RunCatalog(root)
    window = Window.parse("last:200")
    rc = results.rank_comparison(cat, "ddp", window, scale_free, "layer", ())
    assert rc.labels == ("fc1", "fc2")
    per, merged = _rank_reference(raw, slice(200, 400), scale_free)
    g = A.layer_summary(A.rank_gap(cat.dataset("ddp"), 200, scale_free=scale_free))
    for s in STATS:
        med = {r: np.array([np.median(per[r][s][:4]), np.median(per[r][s][4:])]) for r in (0, 1)}
        glob = np.array([np.median(merged[s][:4]), np.median(merged[s][4:])])
        for r in (0, 1):
            np.testing.assert_allclose(rc.per_rank[r][s], med[r], rtol=1e-4)
            np.testing.assert_allclose(
                rc.per_rank[r][s], g.per_rank.sel(statistic=s, rank=r, quantity="median").values,
                rtol=5e-5)
        np.testing.assert_allclose(rc.merged[s], glob, rtol=1e-4)
        np.testing.assert_allclose(rc.merged[s],
                                   g.merged.sel(statistic=s, quantity="median").values, rtol=5e-5)
        rms = np.sqrt((med[0] ** 2 + med[1] ** 2) / 2)
        np.testing.assert_allclose(rc.gap[s]["per_rank"], rms, rtol=1e-4)
        np.testing.assert_allclose(rc.gap[s]["gap"], 1 - glob / rms, atol=1e-4)
    np.testing.assert_allclose(rc.expected, 1 - np.sqrt((1 / 8) / np.mean([1 / 3, 1 / 5])))
    np.testing.assert_allclose(rc.expected, g.expected.sel(quantity="median").values)


def _ragged_ddp(path, stops=(400, 300), n_steps=400, batches=(4, 4), seed=3):
    """Two ranks of one layer of 3 channels; rank r recorded steps ``0..stops[r]-1`` only.
    Returns per rank its (steps, batch, 3) raw values."""
    rng = np.random.default_rng(seed)
    probes = (ProbeInfo("fc1", "fc1", "BatchNorm1d", "input", 1, 3),)
    xs = []
    for r, (stop, b) in enumerate(zip(stops, batches)):
        x = rng.normal(size=(stop, b, 3)) * (1 + r)
        xs.append(x)
        e = x.reshape(stop, -1)
        write_run(path / f"rank{r}", probes,
                  {S.BN_MEAN: x.mean(1).astype(np.float32), S.BN_STD: x.std(1).astype(np.float32),
                   S.EN_MEAN: e.mean(1)[:, None].astype(np.float32),
                   S.EN_STD: e.std(1)[:, None].astype(np.float32)},
                  count=np.full((stop, 1), b), rank=r, world_size=2)
    return xs


def test_a_rank_missing_steps_compares_the_steps_every_rank_ran(tmp_path):
    """Rank 1 stopped at step 300: over the last 200 steps, per-rank and global fluctuation
    are both taken over steps 200..299, where every rank ran (the analyses' definition: the
    gap compares the same steps). Before the dashboard used the analyses, it compared rank 1's
    100 steps with a global fluctuation over 200 steps, half of them rank 0's alone."""
    xs = _ragged_ddp(tmp_path / "ddp")
    cat = RunCatalog(tmp_path)
    rc = results.rank_comparison(cat, "ddp", Window.parse("last:200"), False, "neuron",
                                 [("fc1", 0), ("fc1", 2)])
    both = slice(200, 300)
    per = {r: np.std(x[both].mean(1), 0, ddof=1)[[0, 2]] for r, x in enumerate(xs)}
    glob = np.std(np.concatenate([x[both] for x in xs], 1).mean(1), 0, ddof=1)[[0, 2]]
    # the dashboard's last 200 steps of the run (A.rank_gap's window=200 would count 200 steps
    # at which every rank ran: 100..299)
    g = A.rank_gap(cat.dataset("ddp").isel({S.STEP: slice(200, 400)}), "all")
    for r in (0, 1):
        np.testing.assert_allclose(rc.per_rank[r][S.BN_MEAN], per[r], rtol=1e-4)
    np.testing.assert_allclose(rc.merged[S.BN_MEAN], glob, rtol=1e-4)
    local = np.sqrt((per[0] ** 2 + per[1] ** 2) / 2)
    np.testing.assert_allclose(rc.gap[S.BN_MEAN]["gap"], 1 - glob / local, atol=1e-4)
    np.testing.assert_allclose(rc.gap[S.BN_MEAN]["gap"],
                               g.removed.sel(statistic=S.BN_MEAN).values[[0, 2]], atol=5e-5)


def test_a_rank_absent_from_the_window_has_no_gap(tmp_path):
    """Rank 1 stopped at step 150: over the last 200 steps only rank 0 ran, so there is no
    per-rank/global gap (the analyses refuse it); the bars and circles still draw."""
    xs = _ragged_ddp(tmp_path / "ddp", stops=(400, 150))
    cat = RunCatalog(tmp_path)
    rc = results.rank_comparison(cat, "ddp", Window.parse("last:200"), False, "neuron",
                                 [("fc1", 1)])
    want = np.std(xs[0][200:].mean(1), 0, ddof=1)[1]
    np.testing.assert_allclose(rc.per_rank[0][S.BN_MEAN], [want], rtol=1e-4)
    np.testing.assert_allclose(rc.merged[S.BN_MEAN], [want], rtol=1e-4)
    assert np.isnan(rc.per_rank[1][S.BN_MEAN]).all()
    assert not np.isfinite(rc.gap.get(S.BN_MEAN, {}).get("gap", [np.nan])).any() \
        or np.allclose(rc.gap[S.BN_MEAN]["gap"], 0, atol=1e-6)
    assert rc.window
