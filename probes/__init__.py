"""Capture: forward hooks that record normalization statistics at every training step.

Example:
    >>> import statscope.probes as probes
    >>> sorted(probes.STATISTICS)[:2]
    ['bn_kurt', 'bn_mean']
"""

from statscope.probes.recorder import Recorder, open_recorders, record
from statscope.probes.selection import Target, select
from statscope.probes.statistics import STATISTICS, Moments, Statistic, register_statistic

__all__ = ["record", "open_recorders", "Recorder", "select", "Target", "register_statistic",
           "Statistic", "Moments", "STATISTICS"]
