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
