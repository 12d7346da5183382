"""Export runs to the tools people watch training in (``statscope export RUN --to tensorboard DIR``).

Per window of W steps, the per-layer fluctuation of each statistic (BN and EN, mean and std, raw
and scale-free) as scalars, the per-neuron fluctuation as histograms, and the logged scalars,
all computed with :mod:`statscope.analyses`. See ``docs/integrations.md``.

>>> from statscope.export import SINKS
>>> sorted(SINKS)
['tensorboard']
"""

from statscope.export.exporter import Exporter, ExportResult, export_run
from statscope.export.sinks import SINKS, TensorBoardSink, open_sink
from statscope.export.summaries import Histogram, Scalar, custom_layout, scalar_summaries, \
    window_summaries

__all__ = ["export_run", "Exporter", "ExportResult", "SINKS", "open_sink", "TensorBoardSink",
           "Scalar", "Histogram", "window_summaries", "scalar_summaries", "custom_layout"]
