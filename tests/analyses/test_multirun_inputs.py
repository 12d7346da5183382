"""Every multi-run analysis takes a mapping ``{name: run}`` as docs/analyses.md says, with the
same result as the runs stacked by ``open_runs``, and keeps its own coordinates when stacked."""

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
