import numpy as np
import pytest
from hypothesis import given, strategies as st

from statscope import schema as S
from statscope.dashboards.state import EACH, GROUPINGS, MERGED, SCALES, TABS, ViewState, Window
from statscope.errors import StatscopeError

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                max_size=12)
windows = st.one_of(
    st.just(Window("all")),
    st.integers(1, 10**6).map(lambda n: Window("last", n=n)),
    st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)).map(
        lambda ab: Window("range", start=min(ab), stop=max(ab))))


@given(st.builds(
    ViewState, tab=st.sampled_from(TABS), runs=st.lists(names, unique=True).map(tuple),
    layer=st.none() | names,
    neurons=st.lists(st.tuples(names, st.integers(0, 999)).map(lambda t: f"{t[0]}:{t[1]}"),
                     unique=True).map(tuple),
    stat=st.sampled_from(S.ALL_STATS), window=windows, scale=st.sampled_from(SCALES),
    by=st.sampled_from(GROUPINGS), page=st.integers(0, 50),
    scalars=st.none() | st.lists(names.filter(lambda n: n != "-"), unique=True).map(tuple),
    rank=st.sampled_from([MERGED, EACH]) | st.integers(0, 10**6)))
def test_url_round_trip(state):
    assert ViewState.from_query(state.to_query()) == state


def test_bad_values_fall_back_to_defaults():
    s = ViewState.from_query("?tab=nope&stat=loss&window=last:-3&scale=x&by=y&run=a&page=-2")
    assert s == ViewState(runs=("a",))
    assert ViewState.from_query("?page=0").page == 0 and ViewState.from_query("?page=x").page == 0


def test_an_overlong_link_is_cut_to_the_query_cap():
    from statscope.dashboards.limits import MAX_QUERY_ITEMS

    s = ViewState.from_query("?" + "&".join(f"neuron=fc1:{i}&run=r{i}" for i in range(5000)))
    assert len(s.neurons) == len(s.runs) == MAX_QUERY_ITEMS
    assert ViewState.from_query(None) == ViewState()


def test_window_rows_match_a_brute_force_selection():
    steps = np.array([0, 2, 4, 6, 8, 10, 12])
    assert steps[Window("last", n=3).rows(steps)].tolist() == [8, 10, 12]
    assert steps[Window("last", n=30).rows(steps)].tolist() == steps.tolist()
    assert steps[Window("all").rows(steps)].tolist() == steps.tolist()
    for a, b in [(3, 9), (0, 0), (2, 12), (13, 20)]:
        ref = [s for s in steps if a <= s <= b]
        assert steps[Window("range", start=a, stop=b).rows(steps)].tolist() == ref


@pytest.mark.parametrize("spec", ["", "last:x", "1:2:3", "range", "5:1", "last:0"])
def test_window_parse_rejects_malformed_specs(spec):
    with pytest.raises(StatscopeError, match="window"):
        Window.parse(spec)
