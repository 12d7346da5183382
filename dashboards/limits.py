"""What one request may cost: the caps every view applies, in one place.

A view's cost grows with the runs, neurons and steps it draws. Each cap below bounds one of them,
so that no URL, however long, makes a callback read gigabytes or send the browser megabytes; past
a cap a view draws less (downsampled, paged or the first few) and says so on the page.
"""

from __future__ import annotations

__all__ = ["RUNS_PER_PAGE", "MAX_NEURONS", "MAX_SCALARS", "MAX_POINTS", "MIN_TRACE_POINTS",
           "MAX_SCATTER_POINTS", "MAX_HEATMAP_CELLS", "MAX_HEATMAP_ROWS", "MAX_READ_VALUES",
           "MAX_OPTIONS", "MAX_QUERY_ITEMS", "MAX_REQUEST_BYTES", "MAX_SERIES_VALUES",
           "MAX_CLAIMS_NEURONS", "points_per_trace"]

RUNS_PER_PAGE = 6
"""Runs drawn side by side at once; more chosen runs are split into pages."""
MAX_NEURONS = 16
"""Neurons a view draws at once (the evolution view has two rows per neuron)."""
MAX_SCALARS = 4
"""Logged scalars (loss, lr, ...) drawn above the statistics at once."""
MAX_POINTS = 100_000
"""Points of all line traces of one figure together: about 1.1 MB of JSON."""
MIN_TRACE_POINTS = 200
"""A trace is never reduced below this many points, whatever the budget."""
MAX_SCATTER_POINTS = 20_000
"""Neurons drawn in the std-versus-mean view, over all its panels."""
MAX_HEATMAP_CELLS = 256_000
"""Cells of the layer overview (neuron rows × step columns) sent to the browser."""
MAX_HEATMAP_ROWS = 256
"""Neuron rows of the layer overview; a wider layer is shown as means of adjacent units."""
MAX_READ_VALUES = 50_000_000
"""Values (200 MB of float32) one request may read from the store; a view that needs more asks
the user to zoom in or choose a shorter window."""
MAX_SERIES_VALUES = 20_000_000
"""Neurons × steps the fluctuation views analyse from the per-step series of one run (the
analyses stream it in chunks; five variables of it are read). Past it they use the run's window
summaries (``steps / 200`` rows of every channel), or an evenly spaced sample of each layer's
neurons when a run keeps none (``statscope.dashboards.sources``)."""
MAX_CLAIMS_NEURONS = 2_048
"""Neurons the run panel's paper-claims table bootstraps per run; a wider run's claims use an
evenly spaced sample of each layer (``statscope report`` evaluates every neuron)."""
MAX_OPTIONS = 200
"""Entries of the neuron selector's list; typing searches every neuron of the chosen runs."""
MAX_QUERY_ITEMS = 256
"""Runs or neurons read from one URL; the rest of an over-long link is ignored."""
MAX_REQUEST_BYTES = 1 << 20
"""Largest request body the server accepts (a callback's inputs are a few kilobytes)."""


def points_per_trace(n_traces: int, most: int) -> int:
    """Points each of ``n_traces`` traces may keep so that the figure stays within :data:`MAX_POINTS`.

    Args:
        n_traces: line traces in the figure.
        most: the most any trace needs (its own cap, e.g. 2,000 for a min/max envelope).

    Example:
        >>> points_per_trace(16, 2000), points_per_trace(400, 2000), points_per_trace(5000, 2000)
        (2000, 250, 200)
    """
    share = MAX_POINTS // max(1, n_traces)
    return int(min(most, max(MIN_TRACE_POINTS, share - share % 2)))
