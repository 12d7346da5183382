"""statscope.analyses: turn recorded runs into fluctuation metrics, baselines, tests and claims.

Pure numpy/scipy/xarray on the Dataset of :func:`statscope.open_run` (or stacked runs from
:func:`statscope.open_runs`); never imports torch. Importing the package registers the
``ds.statscope`` accessor. See ``docs/analyses.md`` for the methods.
"""

from .accessor import StatscopeAccessor
from .baseline import excess_fluctuation, sampling_baseline
from .bootstrap import BootstrapMoments, block_bootstrap, fluctuation_ci
from .claims import CLAIMS, ClaimRow, Claims, claims
from .report import fluctuation_table, markdown_report
from .fluctuation import fluctuation
from .gaps import bn_en_gap
from .running import batch_vs_running, running_stats
from .scaling import batch_size_scaling
from .summary import layer_summary
from .variance_tests import compare_runs, compare_statistics, levene
from .window import describe_window, load_window, select_window

__all__ = [
    "select_window",
    "describe_window",
    "load_window",
    "fluctuation",
    "layer_summary",
    "fluctuation_ci",
    "block_bootstrap",
    "BootstrapMoments",
    "bn_en_gap",
    "sampling_baseline",
    "excess_fluctuation",
    "running_stats",
    "batch_vs_running",
    "levene",
    "compare_statistics",
    "compare_runs",
    "batch_size_scaling",
    "claims",
    "Claims",
    "ClaimRow",
    "CLAIMS",
    "fluctuation_table",
    "markdown_report",
    "StatscopeAccessor",
]
