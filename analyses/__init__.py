"""statscope.analyses: turn recorded runs into fluctuation metrics, baselines, tests and claims.

Pure numpy/scipy/xarray on the Dataset of :func:`statscope.open_run` (or stacked runs from
:func:`statscope.open_runs`, or a mapping name -> run); never imports torch. Importing the
package registers the ``ds.statscope`` accessor. See ``docs/analyses.md`` for the methods.
"""

from .accessor import StatscopeAccessor
from .baseline import excess_fluctuation, sampling_baseline
from .blocklength import BlockLength, block_length
from .bootstrap import BootstrapMoments, block_bootstrap, fluctuation_ci
from .claims import CLAIMS, ClaimRow, Claims, PooledClaims, PooledRow, claims
from .fluctuation import fluctuation
from .gaps import bn_en_gap
from .rank_gap import rank_gap
from .multiplicity import adjust_p, benjamini_hochberg, holm
from .report import Report, build_report, markdown_report, render_markdown
from .intervals import Interval, bootstrap_statistic, contrast, interval
from .resampling import Moments, Resampled, resample
from .running import batch_vs_running, running_stats
from .scaling import batch_size_scaling
from .summary import layer_summary
from .tables import COLUMNS, fluctuation_table, pooled_fluctuation_table
from .variance_tests import compare_runs, compare_statistics, levene
from .window import RunWindow, describe_window, load_window, run_windows, select_window

__all__ = [
    "select_window",
    "describe_window",
    "load_window",
    "run_windows",
    "RunWindow",
    "fluctuation",
    "layer_summary",
    "fluctuation_ci",
    "block_bootstrap",
    "BootstrapMoments",
    "block_length",
    "BlockLength",
    "resample",
    "interval",
    "contrast",
    "bootstrap_statistic",
    "Moments",
    "Resampled",
    "Interval",
    "bn_en_gap",
    "sampling_baseline",
    "excess_fluctuation",
    "running_stats",
    "batch_vs_running",
    "levene",
    "compare_statistics",
    "compare_runs",
    "batch_size_scaling",
    "rank_gap",
    "holm",
    "benjamini_hochberg",
    "adjust_p",
    "claims",
    "Claims",
    "ClaimRow",
    "PooledClaims",
    "PooledRow",
    "CLAIMS",
    "fluctuation_table",
    "pooled_fluctuation_table",
    "COLUMNS",
    "markdown_report",
    "build_report",
    "render_markdown",
    "Report",
    "StatscopeAccessor",
]
