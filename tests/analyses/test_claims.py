import numpy as np
import pytest

from statscope import schema as S
from statscope.analyses import claims
from statscope.analyses.claims import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE

from analyses_synthetic import Layer, make_run, stack

KW = dict(window=300, n_boot=300)


def _verdicts(c, claim, **match):
    return {(r.layer, r.statistic): r.verdict for r in c.rows if r.claim == claim
            and all(getattr(r, k) == v for k, v in match.items())}


def test_claim_a_holds_when_en_pools_many_neurons():
    c = claims(make_run((Layer("fc1", channels=16), Layer("fc2", channels=16)), n_steps=300), **KW)
    assert set(_verdicts(c, "a").values()) == {HOLDS}
    df = c.to_dataframe()
    assert {"claim", "effect", "ci_low", "ci_high", "p_value", "verdict"} <= set(df.columns)
    assert (df.loc[df.claim == "a", "p_value"] < 0.05).all()


def test_claim_a_fails_when_en_is_noisier():
    # Shared per-step jitter moves every neuron together, and EN (one big group of 16 channels
    # with different offsets) adds the between-channel spread; make BN the flat one instead by
    # giving EN groups of one neuron each — then BN == EN and the claim is inconclusive.
    ds = make_run((Layer("fc1", channels=4, groups=4), Layer("fc2", channels=4, groups=4)))
    c = claims(ds, **KW)
    assert set(_verdicts(c, "a").values()) == {INCONCLUSIVE}


def test_claim_b_holds_and_fails():
    holds = make_run((Layer("fc1", offset=tuple(range(8))), Layer("fc2", offset=tuple(range(8)))))
    assert set(_verdicts(claims(holds, **KW), "b").values()) == {HOLDS}
    sig = tuple(np.linspace(0.2, 3, 8))
    fails = make_run((Layer("fc1", sigma=sig), Layer("fc2", sigma=sig)))
    assert set(_verdicts(claims(fails, **KW), "b").values()) == {DOES_NOT_HOLD}


def test_claim_c_uses_the_smallest_batch_and_tracks_kurtosis():
    heavy = (Layer("fc1", spread_jitter=0.5), Layer("fc2", spread_jitter=0.5))
    ds = stack({"bs128": make_run(batch_size=128, seed=1), "bs4": make_run(heavy, batch_size=4,
                                                                        seed=2)})
    c = claims(ds, **KW)
    rows = [r for r in c.rows if r.claim == "c"]
    assert {r.run for r in rows} == {"bs4"} and {r.verdict for r in rows} == {HOLDS}
    # Gaussian batches: sd(σ̂)/sd(μ̂) ≈ √(1/2) < 1, so the claim does not hold.
    gauss = stack({"bs128": make_run(batch_size=128, seed=1), "bs8": make_run(batch_size=8,
                                                                           seed=2)})
    rows = [r for r in claims(gauss, **KW).rows if r.claim == "c"]
    assert {r.verdict for r in rows} == {DOES_NOT_HOLD}
    np.testing.assert_allclose([r.effect for r in rows], np.log(np.sqrt(0.5)), atol=0.15)


def test_claim_c_is_evaluated_on_every_seed_at_the_smallest_batch():
    ds = stack({"bs4_s0": make_run(batch_size=4, seed=1), "bs128": make_run(batch_size=128, seed=2),
                "bs4_s1": make_run(batch_size=4, seed=3)})
    rows = [r for r in claims(ds, **KW).rows if r.claim == "c"]
    assert {r.run for r in rows} == {"bs4_s0", "bs4_s1"}


def test_claim_c_without_batch_size_is_inconclusive(run):
    run.attrs[S.ATTR_META] = {}
    rows = [r for r in claims(run, **KW).rows if r.claim == "c"]
    assert rows and all(r.verdict == INCONCLUSIVE and "batch size" in r.note for r in rows)


def test_claim_d_holds_and_fails():
    noisy_first = make_run((Layer("fc1", mean_jitter=0.5, scale_jitter=0.3), Layer("fc2"),
                            Layer("fc3")))
    assert set(_verdicts(claims(noisy_first, **KW), "d").values()) == {HOLDS}
    noisy_last = make_run((Layer("fc1"), Layer("fc2"), Layer("fc3", mean_jitter=0.5,
                                                             scale_jitter=0.3)))
    assert set(_verdicts(claims(noisy_last, **KW), "d").values()) == {DOES_NOT_HOLD}
    single = make_run((Layer("fc1"),))
    rows = [r for r in claims(single, **KW).rows if r.claim == "d"]
    assert {r.verdict for r in rows} == {INCONCLUSIVE}


def test_claims_effect_matches_brute_force(run):
    c = claims(run, window=200, n_boot=50)
    x = run.isel(step=slice(-200, None))
    fc1 = (x[S.LAYER] == "fc1").values
    sd = {s: x[s].values[:, fc1].astype(np.float64).std(0, ddof=1) for s in
          (S.BN_MEAN, S.EN_MEAN)}
    [row] = [r for r in c.rows if r.claim == "a" and r.layer == "fc1" and r.statistic == "mean"]
    assert row.effect == pytest.approx(np.median(np.log(sd[S.BN_MEAN] / sd[S.EN_MEAN])))
    assert row.ci_low <= row.effect <= row.ci_high


def test_identical_bn_and_en_are_inconclusive_with_the_reason_not_a_silent_nan():
    # EN groups of one channel make EN equal BN: claim (a) has nothing to compare and claim (b)
    # divides 0 by 0; both say so (the suite runs with warnings as errors).
    ds = make_run((Layer("fc1", channels=4, groups=4), Layer("fc2", channels=4, groups=4)))
    rows = [r for r in claims(ds, **KW).rows if r.claim in ("a", "b")]
    assert {r.verdict for r in rows} == {INCONCLUSIVE}
    assert all("identical" in r.note for r in rows)


def test_pooled_over_seeds_counts_seeds_and_gives_a_between_seed_interval():
    runs = {f"bs8_s{s}": make_run(batch_size=8, seed=s) for s in range(3)}
    runs["bs64_s0"] = make_run(batch_size=64, seed=9)
    c = claims(runs, **KW)
    pooled = {(r.config, r.claim, r.layer, r.statistic): r for r in c.pooled().rows}
    row = pooled[("batch size 8", "a", "fc1", "mean")]
    effects = [r.effect for r in c.rows if r.config == "batch size 8" and r.claim == "a"
               and r.layer == "fc1" and r.statistic == "mean"]
    from scipy import stats

    mean, half = np.mean(effects), stats.t.ppf(0.975, 2) * np.std(effects, ddof=1) / np.sqrt(3)
    assert row.n_runs == 3 and row.n_holds == 3 and row.verdict == HOLDS
    assert row.seeds_text == "3/3 hold"
    np.testing.assert_allclose([row.effect, row.ci_low, row.ci_high],
                               [mean, mean - half, mean + half])
    one = pooled[("batch size 64", "a", "fc1", "mean")]
    run = next(r for r in c.rows if r.run == "bs64_s0" and r.claim == "a" and r.layer == "fc1"
               and r.statistic == "mean")
    assert one.n_runs == 1 and (one.ci_low, one.ci_high) == (run.ci_low, run.ci_high)
    assert {r.claim for r in c.pooled().rows if r.config == "batch size 64"} == {"a", "b", "d"}


@pytest.mark.parametrize(("key", "values", "label"), [
    ("en_groups", (1, 8), "EN groups"), ("weight_decay", (0.0, 5e-4), "weight decay"),
    ("momentum", (0.9, 0.0), "momentum"), ("max_steps", (None, 500), "max steps"),
    ("experiment", ("mnist-fc", "cifar-resnet18"), ""),
])
def test_runs_differing_in_a_training_setting_are_not_seeds_of_one_config(key, values, label):
    # statscope run stores these beside the seed; runs that differ in one are not replicates
    from statscope.analyses.seeds import config_labels

    metas = [{"batch_size": 4, "lr": 0.01, "seed": s, key: v} for v in values for s in (0, 1)]
    labels = config_labels(metas)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
    assert all(label in lab for lab in labels)
    runs = {}
    for i, m in enumerate(metas):
        runs[f"r{i}"] = make_run(batch_size=4, seed=i)
        runs[f"r{i}"].attrs["meta"] = m
    pooled = claims(runs, **KW).pooled().rows
    assert {r.n_runs for r in pooled} == {2}


def test_pooled_verdict_needs_every_seed():
    from statscope.analyses.claims import ClaimRow, Claims

    def row(seed, effect, verdict, p):
        return ClaimRow("a", f"s{seed}", "fc1", "mean", effect, effect - 0.1, effect + 0.1, p,
                        verdict, config="bs 4", seed=seed)

    mixed = Claims((row(0, 1.0, HOLDS, 1e-4), row(1, 1.1, HOLDS, 1e-4),
                    row(2, 0.02, INCONCLUSIVE, 0.6)), "last 200 steps", 0.95, 100, (4,))
    [p] = mixed.pooled().rows
    assert p.verdict == INCONCLUSIVE and p.seeds_text == "2 hold, 1 inconclusive, of 3"
    untested = Claims((row(0, 1.0, INCONCLUSIVE, np.nan), row(1, 1.1, INCONCLUSIVE, np.nan)),
                      "last 200 steps", 0.95, 100, (4,))
    [p] = untested.pooled().rows
    assert p.verdict == INCONCLUSIVE and p.seeds_text == "0 of 2 testable"


def test_claims_on_runs_of_different_models():
    runs = {"mlp": make_run((Layer("fc1"), Layer("fc2")), batch_size=8, seed=1),
            "cnn": make_run((Layer("c1", channels=4), Layer("c2", channels=4),
                             Layer("c3", channels=4)), batch_size=16, seed=2)}
    runs["cnn"].attrs[S.ATTR_MODEL] = "cnn"
    runs["mlp"].attrs[S.ATTR_MODEL] = "mlp"
    c = claims(runs, **KW)
    assert {r.layer for r in c.rows if r.run == "cnn"} == {"c1", "c2", "c3"}
    # (c) goes to the smallest batch size of each model, so to both runs here
    assert {r.run for r in c.rows if r.claim == "c"} == {"mlp", "cnn"}


def test_too_short_windows_are_inconclusive_and_say_why():
    # a slow drift shared by every step of 60 steps: the effective sample is tiny
    ds = make_run((Layer("fc1", drift=30.0), Layer("fc2", drift=30.0)), n_steps=60)
    rows = [r for r in claims(ds, window=60, n_boot=100).rows if r.claim == "a"]
    short = [r for r in rows if "too short" in r.note]
    assert short and all(r.verdict == INCONCLUSIVE and r.block == 0 for r in short)


def test_claim_c_ignores_a_learning_rate_scaled_with_the_batch_size():
    runs = {"bs8": make_run(batch_size=8, seed=1), "bs64": make_run(batch_size=64, seed=2)}
    for name, lr in (("bs8", 0.00625), ("bs64", 0.05)):
        runs[name].attrs[S.ATTR_META] = {**runs[name].attrs[S.ATTR_META], S.META_LR: lr}
    c = claims(runs, **KW)
    assert {r.run for r in c.rows if r.claim == "c"} == {"bs8"}
    assert {r.config for r in c.rows} == {"batch size 8", "batch size 64"}


def test_a_layer_that_skips_steps_says_so_and_one_that_ran_too_rarely_is_not_evaluable():
    ds = make_run((Layer("fc1"), Layer("fc2"), Layer("fc3")))
    cols = {name: (ds[S.LAYER] == name).values for name in ("fc2", "fc3")}
    for name, ran in (("fc2", np.arange(0, 300, 2)), ("fc3", np.arange(5))):
        idle = np.setdiff1d(np.arange(300), ran)
        for var in ds.data_vars:
            ds[var].values[np.ix_(idle, cols[name])] = 0 if var == S.COUNT else np.nan
    rows = claims(ds, **KW).rows
    fc2 = [r for r in rows if r.layer == "fc2" and r.claim in "ab"]
    assert fc2 and all("ran in 150 of the window's 300 steps" in r.note for r in fc2)
    assert all(np.isfinite(r.effect) for r in fc2)
    fc3 = [r for r in rows if r.layer == "fc3" and r.claim in "ab"]
    assert fc3 and all(r.verdict == INCONCLUSIVE and np.isnan(r.effect) for r in fc3)
    assert all(r.note == "not evaluable: the layer ran in 5 of the window's 300 steps"
               for r in fc3)
