"""Every multi-run analysis takes a mapping ``{name: run}`` as docs/analyses.md says, with the
same result as the runs stacked by ``open_runs``, and keeps its own coordinates when stacked."""

import re

import numpy as np
import pytest
import xarray as xr

from statscope import schema as S
from statscope import analyses as A
from statscope.errors import StatscopeError

from analyses_synthetic import make_run, stack

CALLS = {
    "fluctuation": lambda d: A.fluctuation(d, 200),
    "fluctuation_ci": lambda d: A.fluctuation_ci(d, 200, n_boot=60),
    "sampling_baseline": lambda d: A.sampling_baseline(d, 200),
    "excess_fluctuation": lambda d: A.excess_fluctuation(d, 200),
    "bn_en_gap": lambda d: A.bn_en_gap(d, 200),
    "compare_statistics": lambda d: A.compare_statistics(d, window=200, n_boot=60),
    "compare_runs": lambda d: A.compare_runs(d, "bs4", "bs64", window=200, n_boot=60),
}


@pytest.fixture(scope="module")
def runs():
    return {"bs4": make_run(batch_size=4, seed=1), "bs64": make_run(batch_size=64, seed=2)}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_mapping_of_runs_gives_what_the_stacked_runs_give(runs, name):
    from_mapping, from_stack = CALLS[name](runs), CALLS[name](stack(runs))
    assert set(from_mapping.data_vars) == set(from_stack.data_vars)
    for var in from_stack.data_vars:
        a, b = from_mapping[var], from_stack[var]
        assert a.dims == b.dims, var
        np.testing.assert_array_equal(a.values, b.values, err_msg=var)


def test_stacked_interval_keeps_layer_quantity_and_bound(runs):
    # map_windows dropped every coordinate not along neuron, so a stacked fluctuation_ci could
    # not be selected by quantity or matched to its layers
    one = A.fluctuation_ci(runs["bs4"], 200, n_boot=60)
    both = A.fluctuation_ci(stack(runs), 200, n_boot=60)
    for c in ("layer", "quantity", "bound"):
        np.testing.assert_array_equal(both[c].values, one[c].values)
    picked = both[S.BN_MEAN].sel(run="bs4", quantity="median", drop=True)
    xr.testing.assert_equal(picked.drop_vars([c for c in picked.coords if c not in picked.dims]),
                            one[S.BN_MEAN].sel(quantity="median", drop=True))


def test_a_mapping_lacking_a_statistic_names_the_run(runs):
    bad = {"bs4": runs["bs4"], "old": runs["bs64"].drop_vars(S.BN_STD)}
    with pytest.raises(StatscopeError, match=r"run 'old'.*no bn_std"):
        A.fluctuation(bad, 200)


BAD_SETTINGS = [({"confidence": 1.5}, "confidence=1.5"), ({"confidence": 0.0}, "confidence=0.0"),
                ({"n_boot": 0}, "n_boot=0"), ({"n_boot": -5}, "n_boot=-5"),
                ({"n_boot": 1.5}, "n_boot=1.5"), ({"block": 1.5}, "block=1.5"),
                ({"seed": -1}, "seed=-1")]


@pytest.mark.parametrize(("kw", "said"), BAD_SETTINGS)
@pytest.mark.parametrize("call", ["fluctuation_ci", "claims", "batch_size_scaling",
                                  "compare_statistics", "block_bootstrap"])
def test_bad_bootstrap_settings_are_refused_by_name_before_any_work(runs, call, kw, said):
    # batch_size_scaling over seeds gave NaN bounds for confidence=1.5 or n_boot=0, seed=-1
    # escaped as numpy's ValueError, block=1.5 was truncated (an outside check)
    seeds = {f"bs{b}_s{s}": make_run(batch_size=b, seed=10 * b + s) for b in (8, 64) for s in (0, 1)}
    calls = {
        "fluctuation_ci": lambda: A.fluctuation_ci(runs["bs4"], 200, **kw),
        "claims": lambda: A.claims(runs, 200, **kw),
        "batch_size_scaling": lambda: A.batch_size_scaling(seeds, 200, **kw),
        "compare_statistics": lambda: A.compare_statistics(runs["bs4"], window=200, **kw),
        "block_bootstrap": lambda: A.block_bootstrap(
            {"x": np.ones((50, 2))}, **{k: v for k, v in kw.items() if k != "confidence"}),
    }
    if call == "block_bootstrap" and "confidence" in kw:
        pytest.skip("block_bootstrap has no confidence")
    with pytest.raises(StatscopeError, match=re.escape(said)):
        calls[call]()


@pytest.mark.parametrize("p", [[1.5, 0.2], [-0.2, 0.5], [0.1, np.inf]])
def test_adjusting_p_values_outside_zero_one_is_refused(p):
    for adjust in (A.holm, A.benjamini_hochberg):
        with pytest.raises(StatscopeError, match="p-values must lie in"):
            adjust(p)
    np.testing.assert_array_equal(A.holm([np.nan, 0.01]), [np.nan, 0.01])  # NaN: untested
