import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from statscope.analyses import adjust_p, benjamini_hochberg, claims, holm
from statscope.errors import StatscopeError

from analyses_synthetic import Layer, make_run, stack


def test_holm_and_bh_against_a_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # Holm: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, max(0.04·1, 0.06) = 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02, np.nan])
    # BH: 0.005·4/1 = 0.02, 0.01·4/2 = 0.02, 0.03·4/3 = 0.04, 0.04·4/4 = 0.04
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02, np.nan])
    assert np.isnan(holm([np.nan])).all() and holm([]).size == 0
    with pytest.raises(StatscopeError, match="adjust='bonf'"):
        adjust_p(p, "bonf")


def _holm_loop(p):
    """Holm by its definition: reject in ascending order while p(i) ≤ α/(m − i); the adjusted
    value is the smallest α at which row i is rejected."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_matches_its_definition(p):
    np.testing.assert_allclose(holm(p), _holm_loop(p))
    assert (holm(p) >= np.asarray(p) - 1e-15).all()
    assert (benjamini_hochberg(p) <= holm(p) + 1e-15).all()


def test_claims_adjust_over_the_whole_table():
    ds = stack({"bs8": make_run(batch_size=8, seed=1), "bs64": make_run(batch_size=64, seed=2)})
    c = claims(ds, 300, n_boot=200)
    df = c.to_dataframe()
    np.testing.assert_allclose(df.p_adjusted, holm(df.p_value.to_numpy()))
    raw = claims(ds, 300, n_boot=200, adjust="none").to_dataframe()
    np.testing.assert_allclose(raw.p_adjusted, raw.p_value)
    assert c.adjust == "holm" and any("Holm" in n for n in c.notes)
    alpha = 1 - c.confidence
    for r in c.rows:
        if r.verdict != "inconclusive":
            assert r.p_adjusted < alpha and (r.ci_low > 0 or r.ci_high < 0)
