"""What ``statscope report`` says, checked number by number against numpy/scipy.

The runs are written with the public writer (``statscope.writer.write_run``) from batches drawn
here, and every expectation is computed here from those batches' statistics with numpy/scipy,
following the definitions in docs/analyses.md — never with statscope.analyses' own helpers.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from scipy import stats

from statscope.analyses import build_report, render_markdown
from statscope.store import ProbeInfo, open_run
from statscope.writer import write_run

FLUCT = ("bn_mean", "bn_std", "en_mean", "en_std")


# --- runs with known statistics ---------------------------------------------------------------

def _draw(rng, t, n, c, *, mean_jitter=0.0, spread_jitter=0.0):
    """(t, n, c) batches: Gaussian elements; a per-step shift common to the layer's channels
    (moves bn_mean only) and a per-step rescaling of each batch's deviations (moves bn_std)."""
    z = rng.standard_normal((t, n, c))
    zbar = z.mean(1, keepdims=True)
    if spread_jitter:
        z = zbar + np.exp(spread_jitter * rng.standard_normal((t, 1, 1))) * (z - zbar)
    if mean_jitter:
        z = z + mean_jitter * rng.standard_normal((t, 1, 1))
    return z


def _write(path, layers, *, t=300, n=8, seed=0, count=None, status="completed", data=None,
           meta=None):
    """Write a run whose layers are ``[(name, channels, draw options)]`` (one EN group each);
    return the per-step arrays as written (float32), EN per layer."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in (*FLUCT, "bn_kurt")}
    for _, c, opts in layers:
        x = _draw(rng, t, n, c, **opts)
        m, sd = x.mean(1), x.std(1)
        cols["bn_mean"].append(m)
        cols["bn_std"].append(sd)
        cols["bn_kurt"].append(((x - m[:, None]) ** 4).mean(1) / sd ** 4)
        cols["en_mean"].append(x.mean((1, 2))[:, None])
        cols["en_std"].append(x.std((1, 2))[:, None])
    arrays = data or {k: np.concatenate(v, 1).astype(np.float32) for k, v in cols.items()}
    probes = [ProbeInfo(name=name, module=name, type="BatchNorm1d", where="input", channel_dim=1,
                        channels=c, groups=1) for name, c, _ in layers]
    count = np.full((t, len(layers)), n, np.int64) if count is None else count
    write_run(path, probes, arrays, count=count, status=status,
              meta={"batch_size": n, "seed": seed, **(meta or {})})
    return _Ref(arrays, layers, count)


class _Ref:
    """numpy reference of one run, from its per-step arrays."""

    def __init__(self, arrays, layers, count):
        sizes = [c for _, c, _ in layers]
        self.names = [name for name, _, _ in layers]
        self.layer = np.repeat(self.names, sizes)
        self.count = np.repeat(count, sizes, axis=1).astype(float)
        self.layer_count = count
        self.x = {k: np.asarray(arrays[k], float) for k in ("bn_mean", "bn_std", "bn_kurt")}
        for k in ("en_mean", "en_std"):
            self.x[k] = np.repeat(np.asarray(arrays[k], float), sizes, axis=1)

    def window(self, w):
        rows = np.flatnonzero((self.layer_count > 0).any(1))[-w:]
        cnt = self.count[rows]
        out = {}
        for k, v in self.x.items():
            v = v[rows].copy()
            v[~((cnt > 0) & np.isfinite(v))] = np.nan
            out[k] = v
        out["n"] = np.where(cnt > 0, cnt, np.nan)
        return out

    def sd(self, w):
        win = self.window(w)
        with _quiet():
            return {k: np.nanstd(win[k], axis=0, ddof=1) for k in FLUCT}, win

    @staticmethod
    def sigma_bar(win):
        n = win["n"]
        with _quiet():
            return np.sqrt(np.nanmean(win["bn_std"] ** 2 * n / (n - 1), 0))

    def baseline(self, w):
        """sd(μ̂) = σ/√N and sd(σ̂) ≈ σ√((N−1)κ−N+3)/(2N), κ from per-step unbiased μ₄, σ⁴."""
        win = self.window(w)
        n, m2 = win["n"], win["bn_std"] ** 2
        m4 = win["bn_kurt"] * m2 ** 2
        # E m4 = a μ4 + b σ⁴, E m2² = c μ4 + d σ⁴ for N i.i.d. values (divisor N moments)
        a = (n - 1) * (n * n - 3 * n + 3) / n ** 3
        b = 3 * (n - 1) * (2 * n - 3) / n ** 3
        c = (n - 1) ** 2 / n ** 3
        d = (n - 1) * (n * n - 2 * n + 3) / n ** 3
        mat = np.stack([np.stack([a, b], -1), np.stack([c, d], -1)], -2)
        ok = np.isfinite(mat).all((-1, -2)) & np.isfinite(m4) & (n >= 4)
        sol = np.full(n.shape + (2,), np.nan)
        sol[ok] = np.linalg.solve(mat[ok], np.stack([m4, m2 ** 2], -1)[ok][..., None])[..., 0]
        with _quiet():
            kappa = np.nanmean(sol[..., 0], 0) / np.nanmean(sol[..., 1], 0)
        kappa = np.clip(np.where(np.isfinite(kappa), kappa, 3.0), 1.0, None)
        with _quiet():
            sigma2 = np.nanmean(m2 * n / (n - 1), 0)
            inv_n = np.nanmean(1 / n, 0)
            factor = np.nanmean(((n - 1) * kappa - n + 3) / (4 * n * n), 0)
        return {"bn_mean": np.sqrt(sigma2 * inv_n), "bn_std": np.sqrt(sigma2 * factor)}

    def table(self, w):
        sd, _ = self.sd(w)
        base = self.baseline(w)
        out = {}
        for s in FLUCT:
            for la in self.names:
                v = sd[s][self.layer == la]
                ex = np.nan
                with _quiet():
                    if s in base:
                        ex = np.nanmedian((sd[s] / base[s])[self.layer == la])
                    out[(la, s)] = {"median": np.nanpercentile(v, 50),
                                    "q25": np.nanpercentile(v, 25),
                                    "q75": np.nanpercentile(v, 75), "first": v[0], "excess": ex}
        return out

    def effects(self, w):
        sd, win = self.sd(w)
        with _quiet():
            gm = np.nanmean(np.abs(win["bn_mean"] - win["en_mean"]), 0)
            gs = np.nanmean(np.abs(win["bn_std"] - win["en_std"]), 0)
            scaled = {s: sd[s] / self.sigma_bar(win) for s in ("bn_mean", "bn_std")}
            out = {}
            for la in self.names:
                m = self.layer == la
                out[("a", la, "mean")] = np.nanmedian(np.log(sd["bn_mean"][m] / sd["en_mean"][m]))
                out[("a", la, "std")] = np.nanmedian(np.log(sd["bn_std"][m] / sd["en_std"][m]))
                out[("b", la, "mean gap / std gap")] = np.nanmedian(np.log(gm[m] / gs[m]))
                out[("c", la, "bn_std vs bn_mean")] = np.nanmedian(
                    np.log(sd["bn_std"][m] / sd["bn_mean"][m]))
            for s in ("bn_mean", "bn_std"):
                med = [np.nanmedian(scaled[s][self.layer == la]) for la in self.names]
                out[("d", self.names[0], s)] = np.log(med[0]) - np.log(np.nanmax(med[1:]))
        return out


@contextmanager
def _quiet():
    """numpy's all-NaN and empty-slice warnings off: NaN is the expected answer there."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _holm(p):
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (ok.size - i) * p[j]))
        out[j] = running
    return out


def _bh(p):
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 1.0
    for i in range(ok.size - 1, -1, -1):
        running = min(running, ok.size * p[order[i]] / (i + 1))
        out[order[i]] = running
    return out


def _t_interval(x, confidence):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    lo, hi = stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=stats.sem(x))
    return x.mean(), lo, hi


def _check_report(rep, refs, window, *, confidence=0.95, adjust="holm"):
    """Every number and verdict of the report's tables against the numpy references."""
    for _, r in rep.fluctuation.iterrows():
        want = refs[r.run].table(window)[(r.layer, r.statistic)]
        for k, v in want.items():
            assert np.isclose(r[k], v, rtol=1e-6, equal_nan=True), (r.run, r.layer, r.statistic, k)
    c = rep.claims.to_dataframe()
    for _, r in c.iterrows():
        want = refs[r.run].effects(window).get((r.claim, r.layer, r.statistic), np.nan)
        assert np.isclose(r.effect, want, rtol=1e-6, atol=1e-12, equal_nan=True), r.to_dict()
        if np.isfinite(r.p_value):  # the p-value tests what the interval shows, at one level
            assert (r.p_value < 1 - confidence) == (r.ci_low > 0 or r.ci_high < 0), r.to_dict()
    adjusted = {"holm": _holm, "bh": _bh, "none": np.asarray}[adjust](c.p_value.to_numpy())
    np.testing.assert_allclose(c.p_adjusted.to_numpy(), adjusted, rtol=1e-12)
    for _, r in c.iterrows():
        significant = np.isfinite(r.p_adjusted) and r.p_adjusted < 1 - confidence
        want = ("inconclusive" if not significant else "holds" if r.effect > 0
                else "does not hold")
        assert r.verdict == want, r.to_dict()
        assert r.verdict != "inconclusive" or r.note, r.to_dict()  # always says why
    for p in rep.pooled.rows:
        seeds = c[(c.config == p.config) & (c.claim == p.claim) & (c.layer == p.layer)
                  & (c.statistic == p.statistic)]
        assert len(seeds) == p.n_runs
        if p.n_runs == 1:
            row = seeds.iloc[0]
            assert (p.effect, p.verdict) == (row.effect, row.verdict) or np.isnan(p.effect)
            continue
        mean, lo, hi = _t_interval(seeds.effect, confidence)
        np.testing.assert_allclose([p.effect, p.ci_low, p.ci_high], [mean, lo, hi], rtol=1e-9)
        want = ("holds" if (seeds.verdict == "holds").all() and lo > 0 else
                "does not hold" if (seeds.verdict == "does not hold").all() and hi < 0
                else "inconclusive")
        assert p.verdict == want
    for _, r in rep.fluctuation_pooled.iterrows():
        g = rep.fluctuation[(rep.fluctuation.config == r.config) & (rep.fluctuation.layer == r.layer)
                            & (rep.fluctuation.statistic == r.statistic)]
        assert r.n_runs == len(g)
        if len(g) > 1:
            np.testing.assert_allclose([r.median_over_seeds, r.ci_low, r.ci_high],
                                       _t_interval(g["median"], confidence), rtol=1e-9)


# --- the numbers ------------------------------------------------------------------------------

LAYERS = [("fc1", 8, dict(spread_jitter=0.4)), ("fc2", 8, {}), ("fc3", 6, dict(mean_jitter=0.3))]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two seeds at batch size 4, one at 64: three layers of different behaviour."""
    root = tmp_path_factory.mktemp("sweep")
    refs = {}
    for name, n, seed in (("bs4_s0", 4, 0), ("bs4_s1", 4, 1), ("bs64_s0", 64, 2)):
        refs[name] = _write(root / name, LAYERS, n=n, seed=seed)
    return root, refs


def test_every_table_number_and_verdict_matches_numpy(sweep):
    root, refs = sweep
    rep = build_report({k: open_run(root / k) for k in refs}, 200, n_boot=150)
    _check_report(rep, refs, 200)
    assert [r.config for r in rep.runs] == ["batch size 4", "batch size 4", "batch size 64"]
    # the scaling slope: least squares of log(layer-median σ̄-scaled sd) on log(batch size)
    [series] = rep.scaling
    for la in ("fc1", "fc2", "fc3"):
        for s in FLUCT:
            x, y = [], []
            for name, ref in refs.items():
                sd, win = ref.sd(200)
                x.append(np.log(4 if name.startswith("bs4") else 64))
                y.append(np.log(np.median((sd[s] / ref.sigma_bar(win))[ref.layer == la])))
            slope = np.polyfit(x, y, 1)[0]
            assert np.isclose(float(series.result.slope.sel(layer=la, statistic=s)), slope,
                              rtol=1e-6)


@pytest.mark.parametrize("confidence, adjust", [(0.9, "bh"), (0.99, "none")])
def test_other_levels_and_adjustments(sweep, confidence, adjust):
    root, refs = sweep
    rep = build_report({k: open_run(root / k) for k in refs}, 150, n_boot=100,
                       confidence=confidence, adjust=adjust)
    _check_report(rep, refs, 150, confidence=confidence, adjust=adjust)


def test_markdown_shows_the_report_numbers(sweep):
    root, refs = sweep
    rep = build_report({k: open_run(root / k) for k in refs}, 200, n_boot=100)
    text = render_markdown(rep)
    for p in rep.pooled.rows:  # every summary cell, formatted from the pooled row
        assert f"{p.verdict} ({p.seeds_text}) · {p.effect:+.2f} [" in text
    for _, r in rep.fluctuation.iterrows():
        assert (f"| {r.run} | {r.config} | {r.batch_size:.4g} | {r.layer} | {r.statistic} | "
                f"{r['median']:.4g} | {r.q25:.4g} | {r.q75:.4g} | {r['first']:.4g} |") in text


def test_a_layer_that_skips_steps_and_nan_rows(tmp_path):
    t = 300
    count = np.full((t, 2), 8)
    count[::2, 1] = 0  # fc2 runs every other step
    layers = [("fc1", 4, {}), ("fc2", 4, {})]
    refs = {"skip": _write(tmp_path / "skip", layers, t=t, count=count, seed=3)}
    clean = _write(tmp_path / "tmp", layers, t=t, seed=4)
    arrays = {k: clean.x[k].astype(np.float32) for k in ("bn_mean", "bn_std", "bn_kurt")}
    arrays |= {k: clean.x[k][:, [0, 4]].astype(np.float32) for k in ("en_mean", "en_std")}
    for k in arrays:
        arrays[k][250:260, 0] = np.nan  # fc1's first neuron and its EN: NaN for 10 steps
    refs["nan"] = _write(tmp_path / "nan", layers, t=t, data=arrays, seed=4)
    rep = build_report({k: open_run(tmp_path / k) for k in refs}, 200, n_boot=100)
    _check_report(rep, refs, 200)
    notes = " ".join(rep.notes)
    assert "'fc2' in 100" in notes and "were NaN/Inf although the layer ran" in notes
    fc2 = [r for r in rep.claims.rows if r.run == "skip" and r.layer == "fc2"]
    assert all("ran in 100 of the window's 200 steps" in r.note for r in fc2)


def test_layer_order_is_the_store_order(tmp_path):
    layers = [("zeta", 4, dict(mean_jitter=0.5)), ("alpha", 4, {}), ("mid", 4, {})]
    refs = {"r": _write(tmp_path / "r", layers, seed=5)}
    rep = build_report({"r": open_run(tmp_path / "r")}, 200, n_boot=100)
    _check_report(rep, refs, 200)
    assert list(dict.fromkeys(rep.fluctuation.layer)) == ["zeta", "alpha", "mid"]
    assert {r.layer for r in rep.pooled.rows if r.claim == "d"} == {"zeta"}
    assert "| claim | statistic | config | zeta | alpha | mid |" in render_markdown(rep)


def test_a_contradicted_claim_fails_and_a_short_one_says_so(tmp_path):
    # (c) at batch size 4 on Gaussian batches: sd(BN_std)/sd(BN_mean) ≈ √((κ−1)/4) < 1
    refs = {"g": _write(tmp_path / "g", [("fc1", 16, {}), ("fc2", 16, {})], n=4, seed=6)}
    rep = build_report({"g": open_run(tmp_path / "g")}, 200, n_boot=150)
    c_rows = [p for p in rep.pooled.rows if p.claim == "c"]
    assert c_rows and all(p.verdict == "does not hold" for p in c_rows)
    short = _write(tmp_path / "short", [("fc1", 4, {}), ("fc2", 4, {})], t=6, seed=7)
    rep = build_report({"short": open_run(tmp_path / "short")}, "all", n_boot=100)
    assert all(r.verdict == "inconclusive" and "not evaluable" in r.note
               for r in rep.claims.rows)
    assert all(p.seeds_text == "0 of 1 testable" for p in rep.pooled.rows)
    del short


def test_a_single_step_run_is_refused_naming_the_window(tmp_path, capsys):
    from statscope.cli import main

    _write(tmp_path / "one", [("fc1", 4, {}), ("fc2", 4, {})], t=1)
    assert main(["report", str(tmp_path / "one"), "--window", "all",
                 "-o", str(tmp_path / "r.md")]) == 2
    assert "1 recorded row" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


# --- defects found by this check --------------------------------------------------------------

def test_runs_of_different_models_are_not_pooled_as_seeds(tmp_path):
    """Two runs at one batch size whose layer sets differ are two models, not two seeds."""
    _write(tmp_path / "small", [("fc1", 4, {}), ("fc2", 4, {})], seed=0)
    _write(tmp_path / "big", [("conv", 4, {}), ("fc1", 4, {}), ("fc2", 4, {})], seed=1)
    rep = build_report({k: open_run(tmp_path / k) for k in ("small", "big")}, 200, n_boot=100)
    configs = {r.name: r.config for r in rep.runs}
    assert configs["small"] != configs["big"]
    assert all(p.n_runs == 1 for p in rep.pooled.rows)
    assert (rep.fluctuation_pooled.n_runs == 1).all()
    assert set(rep.fluctuation_pooled.config) == set(configs.values())
    # seeds of one model stay pooled
    _write(tmp_path / "small2", [("fc1", 4, {}), ("fc2", 4, {})], seed=2)
    rep = build_report({k: open_run(tmp_path / k) for k in ("small", "big", "small2")}, 200,
                       n_boot=100)
    by = {r.name: r.config for r in rep.runs}
    assert by["small"] == by["small2"] != by["big"]
    assert {p.n_runs for p in rep.pooled.rows if p.config == by["small"]} == {2}


def _constant(tmp_path, name, std):
    t = 300
    data = {"bn_mean": np.ones((t, 8), np.float32), "bn_std": np.full((t, 8), std, np.float32),
            "bn_kurt": np.full((t, 8), 3.0, np.float32), "en_mean": np.ones((t, 2), np.float32),
            "en_std": np.full((t, 2), std, np.float32)}
    _write(tmp_path / name, [("fc1", 4, {}), ("fc2", 4, {})], t=t, data=data)


def test_constant_statistics_get_a_clear_note(tmp_path):
    """Zero variance over the window: no silent NaN, and no wrong reason (EN groups of one
    channel) for it."""
    _constant(tmp_path, "const", 2.0)
    rep = build_report({"const": open_run(tmp_path / "const")}, 200, n_boot=100)
    assert (rep.fluctuation["median"] == 0).all()
    assert any("constant" in n and "fc1" in n for n in rep.notes)
    for r in rep.claims.rows:
        assert r.verdict == "inconclusive" and np.isnan(r.effect)
        assert "EN groups of one channel" not in r.note, r
        assert "constant" in r.note, r


def test_inconclusive_rows_say_why_even_with_a_caveat(sweep):
    """Claim (c) rows carry the caveat "batch size 4"; one whose interval includes 0 must
    still say so."""
    root, refs = sweep
    rep = build_report({k: open_run(root / k) for k in refs}, 200, n_boot=150)
    rows = [r for r in rep.claims.rows if r.verdict == "inconclusive" and np.isfinite(r.p_value)]
    assert any(r.claim == "c" for r in rows)  # fc1's spread jitter puts (c) near 0 at bs 4
    for r in rows:
        assert ("the interval includes 0" in r.note
                or "significant only before" in r.note), (r.claim, r.layer, r.note)


def test_claim_d_names_the_layers_it_leaves_out(tmp_path):
    """A layer without data in the window drops out of the max in (d); the row must say so."""
    t = 300
    count = np.full((t, 3), 4)
    count[150:, 2] = 0  # fc3 stops running half-way: no data in the last 100 steps
    layers = [("fc1", 4, dict(mean_jitter=0.5)), ("fc2", 4, {}), ("fc3", 4, {})]
    refs = {"r": _write(tmp_path / "r", layers, t=t, n=4, count=count, seed=8)}
    rep = build_report({"r": open_run(tmp_path / "r")}, 100, n_boot=100)
    _check_report(rep, refs, 100)
    for r in (r for r in rep.claims.rows if r.claim == "d"):
        assert "fc3" in r.note and "fc2" in r.note, r.note


def test_bad_window_is_an_argument_error(tmp_path, capsys):
    from statscope.cli import main

    _write(tmp_path / "runs" / "r", [("fc1", 4, {}), ("fc2", 4, {})])
    for bad in ("-5", "1", "0", "1.5", "0.0", "5:3"):
        for argv in (["report", str(tmp_path / "runs"), "--window", bad,
                      "-o", str(tmp_path / "r.md")],
                     ["analyze", str(tmp_path / "runs"), "--window", bad]):  # one check
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"--window={bad}" in err and "skipping" not in err, err


def test_a_failed_run_is_flagged(tmp_path):
    _write(tmp_path / "ok", [("fc1", 4, {}), ("fc2", 4, {})], seed=0)
    _write(tmp_path / "died", [("fc1", 4, {}), ("fc2", 4, {})], seed=1, status="failed")
    rep = build_report({k: open_run(tmp_path / k) for k in ("ok", "died")}, 200, n_boot=100)
    flagged = [n for n in rep.notes if "died" in n and "failed" in n]
    assert flagged and not any("ok" in n.split(":")[0] for n in flagged)
    assert any("died" in n and "failed" in n for n in render_markdown(rep).splitlines()
               if n.startswith("- "))


# --- calibration and real runs ----------------------------------------------------------------

@pytest.mark.slow
def test_claim_intervals_cover_the_truth(tmp_path):
    """Claim (a) on Gaussian batches with C independent channels: sd(BN_mean)/sd(EN_mean) =
    √C exactly, so the effect's truth is ½ log C. 200 replicate runs: 95 % within binomial
    error (3 sd)."""
    from statscope.analyses import claims

    c, n, reps = 8, 8, 200
    truth = 0.5 * np.log(c)
    hits = 0
    for k in range(reps):
        _write(tmp_path / f"r{k}", [("l1", c, {}), ("l2", c, {})], t=200, n=n, seed=1000 + k)
        res = claims({"r": open_run(tmp_path / f"r{k}")}, "all", n_boot=300, seed=k)
        [row] = [r for r in res.rows if (r.claim, r.layer, r.statistic) == ("a", "l2", "mean")]
        hits += row.ci_low <= truth <= row.ci_high
    sd = np.sqrt(0.95 * 0.05 / reps)
    assert abs(hits / reps - 0.95) < 3 * sd, hits


@pytest.mark.slow
def test_real_mnist_runs_match_numpy(tmp_path):
    from statscope import schema as S

    refs = {}
    for bs in (4, 128):
        out = tmp_path / f"bs{bs}"
        subprocess.run([sys.executable, "-m", "statscope", "run", "mnist-fc", "--bs", str(bs),
                        "--max-steps", "300", "--quiet", "--no-download", "--device", "cpu",
                        "--out", str(out)], check=True, timeout=600)
        ds = open_run(out)
        lay = np.asarray(ds[S.LAYER].values).astype(str)
        names = list(dict.fromkeys(lay))
        sizes = [int((lay == la).sum()) for la in names]
        first = np.cumsum([0] + sizes[:-1])
        arrays = {k: np.asarray(ds[k].values) for k in FLUCT}
        arrays["bn_kurt"] = (np.asarray(ds["bn_kurt"].values) if "bn_kurt" in ds
                             else np.full_like(arrays["bn_std"], np.nan))
        for k in ("en_mean", "en_std"):
            arrays[k] = arrays[k][:, first]
        count = np.asarray(ds[S.COUNT].values)[:, first]
        refs[out.name] = _Ref(arrays, [(la, c, {}) for la, c in zip(names, sizes)], count)
    rep = build_report({k: open_run(tmp_path / k) for k in refs}, 200, n_boot=100)
    _check_report(rep, refs, 200)


def test_figure_6_whiskers_use_the_reports_seed(sweep):
    """With one seed, Figure 6's whiskers are the run's bootstrap interval: drawn with the
    report's --seed, like every other interval of the report."""
    pytest.importorskip("plotly")
    from statscope.analyses import fluctuation_ci
    from statscope.commands.report import report_figures

    root, _ = sweep
    runs = {"bs64_s0": open_run(root / "bs64_s0")}
    rep = build_report(runs, 200, n_boot=100, seed=7)
    [fig6] = [f for fig_id, _, f in report_figures(rep, runs, 200) if fig_id == "fig6"]
    bars = next(t for t in fig6.data if t.name == "BN_mean")
    want = fluctuation_ci(runs["bs64_s0"], 200, n_boot=100, seed=7)["bn_mean"].sel(
        quantity="median")
    lower, upper = want.sel(bound="lower").values, want.sel(bound="upper").values
    np.testing.assert_allclose(np.asarray(bars.y) + np.asarray(bars.error_y.array), upper)
    np.testing.assert_allclose(np.asarray(bars.y) - np.asarray(bars.error_y.arrayminus), lower)
