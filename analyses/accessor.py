"""The ``ds.statscope`` accessor: the analyses as methods of a run Dataset.

Registered when :mod:`statscope.analyses` is imported::

    import statscope, statscope.analyses
    ds = statscope.open_run("runs/bs4")
    ds.statscope.fluctuation(window=200, scale_free=True)
"""

from __future__ import annotations

import xarray as xr

__all__ = ["StatscopeAccessor"]


@xr.register_dataset_accessor("statscope")
class StatscopeAccessor:
    """Methods mirroring the free functions of :mod:`statscope.analyses`; each passes the Dataset
    as the first argument and forwards the rest.

    Example:
        >>> import statscope.analyses
        >>> from statscope.analyses._demo import demo_run
        >>> demo_run().statscope.fluctuation(window=50).sizes["neuron"]
        16
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def select_window(self, window=200, **kw):
        """See :func:`statscope.analyses.select_window`."""
        from .window import select_window

        return select_window(self._ds, window, **kw)

    def fluctuation(self, window=200, **kw):
        """See :func:`statscope.analyses.fluctuation`."""
        from .fluctuation import fluctuation

        return fluctuation(self._ds, window, **kw)

    def layer_summary(self, window=200, **kw):
        """:func:`statscope.analyses.layer_summary` of :func:`fluctuation` (same keywords)."""
        from .fluctuation import fluctuation
        from .summary import layer_summary

        return layer_summary(fluctuation(self._ds, window, **kw))

    def fluctuation_ci(self, window=200, **kw):
        """See :func:`statscope.analyses.fluctuation_ci`."""
        from .bootstrap import fluctuation_ci

        return fluctuation_ci(self._ds, window, **kw)

    def bn_en_gap(self, window=200, **kw):
        """See :func:`statscope.analyses.bn_en_gap`."""
        from .gaps import bn_en_gap

        return bn_en_gap(self._ds, window, **kw)

    def sampling_baseline(self, window=200, **kw):
        """See :func:`statscope.analyses.sampling_baseline`."""
        from .baseline import sampling_baseline

        return sampling_baseline(self._ds, window, **kw)

    def excess_fluctuation(self, window=200, **kw):
        """See :func:`statscope.analyses.excess_fluctuation`."""
        from .baseline import excess_fluctuation

        return excess_fluctuation(self._ds, window, **kw)

    def claims(self, window=200, **kw):
        """See :func:`statscope.analyses.claims`."""
        from .claims import claims

        return claims(self._ds, window, **kw)

    def running_stats(self, window="all", **kw):
        """See :func:`statscope.analyses.running_stats`."""
        from .running import running_stats

        return running_stats(self._ds, window, **kw)

    def batch_vs_running(self, window=200, **kw):
        """See :func:`statscope.analyses.batch_vs_running`."""
        from .running import batch_vs_running

        return batch_vs_running(self._ds, window, **kw)

    def compare_statistics(self, a, b, window=200, **kw):
        """See :func:`statscope.analyses.compare_statistics`."""
        from .variance_tests import compare_statistics

        return compare_statistics(self._ds, a, b, window, **kw)

    def compare_runs(self, run_a, run_b, statistic, window=200, **kw):
        """See :func:`statscope.analyses.compare_runs`."""
        from .variance_tests import compare_runs

        return compare_runs(self._ds, run_a, run_b, statistic, window, **kw)

    def rank_gap(self, window=200, **kw):
        """See :func:`statscope.analyses.rank_gap` (a distributed run)."""
        from .rank_gap import rank_gap

        return rank_gap(self._ds, window, **kw)

    def merge_ranks(self, layers=None):
        """The global statistics of a distributed run, merged exactly from the ranks' moments
        and counts: :func:`statscope.ranks.merge_ranks`.

        Example:
            >>> import statscope.analyses
            >>> from statscope.analyses._demo import demo_ranks
            >>> demo_ranks(n_ranks=2).statscope.merge_ranks()["count"].values[0, 0]
            np.int64(32)
        """
        from statscope.ranks import merge_ranks

        return merge_ranks(self._ds, layers)

    def batch_size_scaling(self, window=200, **kw):
        """See :func:`statscope.analyses.batch_size_scaling`."""
        from .scaling import batch_size_scaling

        return batch_size_scaling(self._ds, window, **kw)
