"""Export a run, once or as it grows: the windows and scalars not yet written go to a sink.

One :class:`Exporter` serves both ``statscope export`` (one :meth:`Exporter.update` over a
finished run) and the live export of the training callbacks (an update every N steps while the
recorder writes the store; each update reads only what the store has committed since the last).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError
from statscope.export.summaries import (STATISTICS, Histogram, scalar_summaries,
                                        window_summaries)

__all__ = ["Exporter", "ExportResult", "export_run", "ATTR_STEP_OFFSET"]

ATTR_STEP_OFFSET = "trainer_step_offset"
"""Root attribute the training callbacks set: the trainer's step number of store step 0 as its
loggers write it (store step k is written at k + offset), the default offset of an export."""

_LOAD_STEPS = 8192
"""Steps read into memory at once: windows are cut from these in-memory rows, not from the store."""


@dataclass(frozen=True)
class ExportResult:
    """What one or more updates wrote.

    Attributes:
        windows: windows summarised.
        scalars: scalar points written (fluctuation medians and logged scalars).
        histograms: histograms written.
        last_step: the run's last committed step (None before the first).
    """

    windows: int = 0
    scalars: int = 0
    histograms: int = 0
    last_step: int | None = None

    def __add__(self, other: "ExportResult") -> "ExportResult":
        last = other.last_step if other.last_step is not None else self.last_step
        return ExportResult(self.windows + other.windows, self.scalars + other.scalars,
                            self.histograms + other.histograms, last)


class Exporter:
    """Writes a run's summaries to a sink incrementally.

    Args:
        run: the run store (a folder or URL); it need not exist yet.
        sink: a sink from :func:`statscope.export.sinks.open_sink`; the exporter does not close it.
        window: W, the steps per window (≥ 2). Only complete windows are written.
        offset: added to every step written, so that the summaries line up with the trainer's
            own curves; None (default): the run's ``trainer_step_offset`` attribute, which the
            callbacks set, else 0.

    Raises:
        StatscopeError: ``window`` < 2 or ``offset`` neither an int nor None.
    """

    def __init__(self, run: str | os.PathLike, sink, *, window: int = 200,
                 offset: int | None = None):
        _check(window, offset)
        self.run = os.fspath(run)
        self.sink = sink
        self.window = window
        self.offset = offset
        self._next_window: int | None = None  # index k of the next window [kW, (k+1)W)
        self._next_scalar_step: int | None = None
        self._layout_written = False

    def update(self) -> ExportResult:
        """Write the complete windows and logged scalars committed since the last update.

        Returns:
            What this update wrote; nothing while the store does not exist or holds no step.
        """
        from statscope.store import is_run, open_run

        if not is_run(self.run):
            return ExportResult()
        ds = open_run(self.run)
        if ds.sizes[S.STEP] == 0:
            return ExportResult()
        steps = np.asarray(ds[S.STEP].values)
        first, last = int(steps[0]), int(steps[-1])
        if self.offset is None:
            self.offset = int(ds.attrs.get(ATTR_STEP_OFFSET) or 0)
        if not self._layout_written:
            layers = [str(name) for name in ds.attrs.get(S.ATTR_LAYERS, [])]
            self.sink.layout(layers)
            self._layout_written = True
        start = first if self._next_scalar_step is None else self._next_scalar_step
        scalars = scalar_summaries(ds, start, last + 1, self.offset)
        self.sink.write(scalars)
        self._next_scalar_step = last + 1
        result = ExportResult(scalars=len(scalars), last_step=last)
        k0 = math.ceil(first / self.window) if self._next_window is None else self._next_window
        k1 = (last + 1) // self.window  # windows k0..k1-1 are complete
        per_load = max(1, _LOAD_STEPS // self.window)
        stats = [s for s in (*STATISTICS, S.COUNT) if s in ds.data_vars]
        for a in range(k0, k1, per_load):  # written load by load: memory stays bounded
            b = min(k1, a + per_load)
            rows = ds[stats].sel({S.STEP: slice(a * self.window, b * self.window - 1)}).load()
            for k in range(a, b):
                lo, hi = k * self.window, (k + 1) * self.window
                items = window_summaries(rows.sel({S.STEP: slice(lo, hi - 1)}),
                                         hi - 1 + self.offset)
                self.sink.write(items)
                n_hist = sum(isinstance(i, Histogram) for i in items)
                result += ExportResult(int(bool(items)), len(items) - n_hist, n_hist)
        self._next_window = max(k0, k1)
        self.sink.flush()
        return result


def export_run(run: str | os.PathLike, to: str, target: str | os.PathLike, *, window: int = 200,
               offset: int | None = None) -> ExportResult:
    """Export a run's fluctuation summaries and logged scalars (``statscope export``).

    Args:
        run: a run store.
        to: the format, a key of :data:`statscope.export.SINKS` (``"tensorboard"``).
        target: where the format writes (TensorBoard: a log folder).
        window: steps per window; offset: added to every step (see :class:`Exporter`).

    Returns:
        What was written. The export appears in ``target`` only once complete: an export that
        fails (a damaged run) leaves ``target`` as it was, an earlier export there included.

    Raises:
        StatscopeError: ``run`` is not a run, or a bad format, window or offset;
            StoreDamagedError: the run cannot be read.

    Example:
        >>> export_run("runs/demo", "tensorboard", "tb/demo")  # doctest: +SKIP
        ExportResult(windows=5, scalars=..., histograms=..., last_step=999)
    """
    from statscope.export.sinks import open_sink
    from statscope.store import read_attrs

    _check(window, offset)
    read_attrs(run)  # a clear StoreError for anything that is not a run
    sink = open_sink(to, target, staged=True)
    try:
        result = Exporter(run, sink, window=window, offset=offset).update()
    except BaseException:
        sink.discard()
        raise
    sink.close()
    return result


def _check(window, offset) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise StatscopeError(f"window={window!r}: expected an int of at least 2 steps")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise StatscopeError(f"offset={offset!r}: expected an int or None")
