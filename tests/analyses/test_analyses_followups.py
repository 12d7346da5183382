"""Follow-ups of the outside check of ``statscope report``: configurations of runs of different
models (``statscope analyze`` and the Python API), the effective sample of a layer that ran in
only some steps, and the "ran in k of N steps" note where values are NaN.

Expectations are computed here with numpy from the arrays written, never with the analyses'
own helpers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from statscope.analyses import (bootstrap_statistic, build_report, claims, fluctuation_table,
                                pooled_fluctuation_table)
from statscope.store import open_run

from test_report_content import FLUCT, _write

SMALL = [("fc1", 4, {}), ("fc2", 4, dict(mean_jitter=0.3))]
BIG = [("conv", 4, dict(spread_jitter=0.3)), ("fc1", 4, {}), ("fc2", 4, {})]


# --- 1. runs of different models at one batch size are not seeds of one configuration ---------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two seeds of a two-layer model and one run of a three-layer model, all at batch size 8."""
    root = tmp_path_factory.mktemp("models")
    refs = {"small_s0": _write(root / "small_s0", SMALL, seed=0),
            "small_s1": _write(root / "small_s1", SMALL, seed=1),
            "big_s0": _write(root / "big_s0", BIG, seed=2)}
    return root, refs


def _analyze_csv(paths, tmp_path) -> pd.DataFrame:
    from statscope.cli import main

    out = tmp_path / "table.csv"
    assert main(["analyze", *map(str, paths), "--window", "200", "--format", "csv",
                 "-o", str(out)]) == 0
    return pd.read_csv(out)


def test_analyze_tells_two_models_at_one_batch_size_apart(models, tmp_path):
    root, _ = models
    table = _analyze_csv([root], tmp_path)
    config = {run.rsplit("/", 1)[-1]: set(g.config) for run, g in table.groupby("run")}
    assert all(len(c) == 1 for c in config.values()), config
    small0, small1, big = (config[k].pop() for k in ("small_s0", "small_s1", "big_s0"))
    assert small0 == small1  # seeds of one model stay one configuration
    assert big != small0, (big, small0)
    # the labels name what tells them apart, and the table's own pooling keeps them apart
    assert "conv" in big
    pooled = pooled_fluctuation_table(table)
    assert set(pooled.n_runs[pooled.config == small0]) == {2}
    assert set(pooled.n_runs[pooled.config == big]) == {1}


def test_analyze_knows_a_model_by_all_its_layers_under_layers(models, tmp_path):
    """Narrowed to a layer both models probe, the runs are still of two models."""
    from statscope.cli import main

    root, _ = models
    out = tmp_path / "fc1.csv"
    assert main(["analyze", str(root), "--layers", "fc1", "--format", "csv", "-o", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table.layer) == {"fc1"}
    config = {run.rsplit("/", 1)[-1]: g.config.iloc[0] for run, g in table.groupby("run")}
    assert config["small_s0"] == config["small_s1"] != config["big_s0"]


def test_analyze_labels_runs_among_all_runs_given(tmp_path):
    """Each run was labelled on its own, so settings that split the runs (here the learning
    rate) never reached the label: two configurations looked like two seeds of one."""
    for name, lr, seed in (("a_s0", 0.1, 0), ("a_s1", 0.1, 1), ("b_s0", 0.01, 2)):
        _write(tmp_path / "runs" / name, SMALL, seed=seed, meta={"lr": lr})
    table = _analyze_csv([tmp_path / "runs"], tmp_path)
    config = {run.rsplit("/", 1)[-1]: g.config.iloc[0] for run, g in table.groupby("run")}
    assert config["a_s0"] == config["a_s1"] != config["b_s0"]
    assert "lr 0.1" in config["a_s0"] and "lr 0.01" in config["b_s0"]


def test_python_api_tables_and_claims_share_the_configurations(models):
    root, refs = models
    runs = {k: open_run(root / k) for k in refs}
    table = fluctuation_table(runs, 200)
    config = table.groupby("run").config.first().to_dict()
    assert config["small_s0"] == config["small_s1"] != config["big_s0"]
    pooled = pooled_fluctuation_table(table)
    assert set(pooled.n_runs[pooled.config == config["big_s0"]]) == {1}
    # the pooled numbers of the two-layer model: mean over its two seeds of numpy's medians
    for (la, s), g in pooled[pooled.config == config["small_s0"]].groupby(["layer", "statistic"]):
        meds = [refs[k].table(200)[(la, s)]["median"] for k in ("small_s0", "small_s1")]
        assert int(g.n_runs.iloc[0]) == 2
        np.testing.assert_allclose(g.median_over_seeds.iloc[0], np.mean(meds), rtol=1e-6)
    # claims, the report and the tables all label a run alike
    cl = claims(runs, 200, n_boot=50)
    assert {r.run: r.config for r in cl.rows} == config
    rep = build_report(runs, 200, n_boot=50)
    assert {r.name: r.config for r in rep.runs} == config
    assert rep.fluctuation.groupby("run").config.first().to_dict() == config
    assert {p.n_runs for p in rep.pooled.rows if p.config == config["big_s0"]} == {1}


def test_config_labels_take_the_layer_sets():
    from statscope.analyses.seeds import config_labels

    metas = [{"batch_size": 8, "seed": s} for s in range(3)]
    layers = [("fc1", "fc2"), ("fc1", "fc2"), ("conv", "fc1", "fc2")]
    labels = config_labels(metas, layers)
    assert labels[0] == labels[1] != labels[2]
    # where the settings already tell runs apart, the layers are not added
    metas[2]["batch_size"] = 16
    assert config_labels(metas, layers) == ["batch size 8", "batch size 8", "batch size 16"]


# --- 2. n_eff of a layer that ran in only some of the window's steps ---------------------------

def _ar1(rng, n, cols, phi):
    e = rng.standard_normal((n, cols))
    x = np.empty_like(e)
    x[0] = e[0] / np.sqrt(1 - phi * phi)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def _tau(x):
    """Integrated autocorrelation time per column, Sokal's automatic window (c = 5)."""
    d = x - x.mean(0)
    n = x.shape[0]
    r = np.array([(d[:n - k] * d[k:]).sum(0) / n for k in range(n // 4)])
    rho = r / r[0]
    cum = 1 + 2 * np.cumsum(rho[1:], axis=0)
    out = []
    for j in range(x.shape[1]):
        m = next((m for m in range(1, cum.shape[0]) if m >= 5 * cum[m - 1, j]), cum.shape[0])
        out.append(cum[m - 1, j])
    return np.asarray(out)


@pytest.mark.parametrize("where", ["every other step", "first half"])
def test_n_eff_counts_the_steps_with_data(where):
    rng = np.random.default_rng(11)
    t, cols, phi = 2000, 40, 0.5
    valid = _ar1(rng, t // 2, cols, phi)
    x = np.full((t, cols), np.nan)
    rows = np.arange(0, t, 2) if where == "every other step" else np.arange(t // 2)
    x[rows] = valid
    want = (t // 2) / np.median(_tau(valid))  # ≈ 1000 / 3
    groups = np.zeros(cols, int)
    iv = bootstrap_statistic({"x": x}, [lambda m: np.median(m.mean["x"], -1)[..., None],
                                        lambda m: np.median(m.std["x"], -1)[..., None]],
                             n_boot=100, groups=groups)
    np.testing.assert_allclose(iv.n_eff, want, rtol=0.3)


def test_too_short_counts_the_steps_with_data():
    """60 steps with data of an AR(1) at 0.9 (τ = 19) are an effective sample of ≈3: no interval,
    though the window has 400 steps."""
    rng = np.random.default_rng(12)
    x = np.full((400, 40), np.nan)
    x[340:] = _ar1(rng, 60, 40, 0.9)
    iv = bootstrap_statistic({"x": x}, lambda m: np.median(m.std["x"], -1)[..., None],
                             n_boot=100, groups=np.zeros(40, int))
    assert np.isnan(iv.lower[0]) and iv.block[0] == 0, (iv.n_eff, iv.block)
    assert "too short for its autocorrelation: 60 steps" in iv.notes[0], iv.notes
    assert iv.n_eff[0] < 10


def test_claims_n_eff_of_a_layer_that_skips_steps(tmp_path):
    t = 300
    count = np.full((t, 2), 8)
    count[::2, 1] = 0  # fc2 runs every other step: 100 of the window's 200
    _write(tmp_path / "skip", SMALL, t=t, count=count, seed=3)
    cl = claims({"skip": open_run(tmp_path / "skip")}, 200, n_boot=100)
    for claim, stat in (("a", "mean"), ("a", "std"), ("b", "mean gap / std gap")):
        n_eff = {r.layer: r.n_eff for r in cl.rows if (r.claim, r.statistic) == (claim, stat)}
        # batches are independent from step to step (τ ≈ 1): fc1 ≈ 200, fc2 ≈ 100
        assert 140 < n_eff["fc1"] < 280, n_eff
        assert 60 < n_eff["fc2"] < 140, n_eff


# --- 3. "the layer ran in k of N steps" counts steps with finite values -------------------------

def _nan_run(tmp_path, nan_rows):
    """fc2 runs at every step, but its statistics (BN and EN) are NaN at ``nan_rows``."""
    t = 300
    clean = _write(tmp_path / "clean", SMALL, t=t, seed=4)
    arrays = {k: clean.x[k].astype(np.float32) for k in ("bn_mean", "bn_std", "bn_kurt")}
    arrays |= {k: clean.x[k][:, [0, 4]].astype(np.float32) for k in ("en_mean", "en_std")}
    for k in arrays:
        cols = slice(4, 8) if arrays[k].shape[1] == 8 else slice(1, 2)
        arrays[k][nan_rows, cols] = np.nan
    _write(tmp_path / "nan", SMALL, t=t, data=arrays, seed=4)
    win = slice(t - 200, t)
    fc2 = [arrays[k][win, 4:] if arrays[k].shape[1] == 8 else arrays[k][win, 1:] for k in FLUCT]
    finite = np.all([np.isfinite(v).any(1) for v in fc2], axis=0)
    return open_run(tmp_path / "nan"), int(finite.sum())


def test_ran_counts_steps_with_finite_values(tmp_path):
    ds, k = _nan_run(tmp_path, np.arange(100, 300, 2))  # NaN at every other window step
    assert k == 100
    cl = claims({"nan": ds}, 200, n_boot=100)
    fc2 = [r for r in cl.rows if r.layer == "fc2"]
    assert fc2
    for r in fc2:
        assert f"values in {k} of the window's 200 steps" in r.note, r.note
        assert "NaN" in r.note and "100" in r.note, r.note
    assert not any("of the window's" in r.note for r in cl.rows if r.layer == "fc1")


def test_a_layer_with_too_few_finite_steps_is_not_evaluable(tmp_path):
    nan_rows = np.arange(100, 300)
    keep = np.arange(100, 300, 40)  # 5 finite steps in the window
    ds, k = _nan_run(tmp_path, np.setdiff1d(nan_rows, keep))
    assert k == 5
    cl = claims({"nan": ds}, 200, n_boot=100)
    fc2 = [r for r in cl.rows if r.layer == "fc2" and r.claim in "abc"]
    assert fc2
    for r in fc2:
        assert np.isnan(r.effect) and r.verdict == "inconclusive", r
        assert "not evaluable" in r.note and f"values in {k} of" in r.note, r.note
