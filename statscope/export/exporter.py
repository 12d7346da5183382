"""Export a run, once or as it grows: the windows and scalars not yet written go to a sink.

One :class:`Exporter` serves both ``statscope export`` (one :meth:`Exporter.update` over a
finished run) and the live export of the training callbacks (an update every N steps while the
recorder writes the store; each update reads only what the store has committed since the last).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError
from statscope.export.summaries import (STATISTICS, Histogram, scalar_summaries,
                                        window_summaries)

__all__ = ["Exporter", "ExportResult", "export_run", "ATTR_STEP_OFFSET", "MAX_STEP_OFFSET"]

ATTR_STEP_OFFSET = "trainer_step_offset"
MAX_STEP_OFFSET = 2**62
"""The largest step offset: store step k is written at step k + offset, an int64 in the event
file."""
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
        nonfinite: statistic values (step × neuron, EN per neuron) of the windows written that
            are NaN or ±inf where their layer ran: a diverging run's, left out of the summaries.
        first_nonfinite: the first step holding one (None: none).
    """

    windows: int = 0
    scalars: int = 0
    histograms: int = 0
    last_step: int | None = None
    nonfinite: int = 0
    first_nonfinite: int | None = None

    def __add__(self, other: "ExportResult") -> "ExportResult":
        last = other.last_step if other.last_step is not None else self.last_step
        firsts = [f for f in (self.first_nonfinite, other.first_nonfinite) if f is not None]
        return ExportResult(self.windows + other.windows, self.scalars + other.scalars,
                            self.histograms + other.histograms, last,
                            self.nonfinite + other.nonfinite, min(firsts, default=None))


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
        StatscopeError: ``window`` < 2, or ``offset`` neither None nor an int in 0..2**62.
    """

    def __init__(self, run: str | os.PathLike, sink, *, window: int = 200,
                 offset: int | None = None):
        _check(window, offset)
        self.run = os.fspath(run)
        self.sink = sink
        self.window = window
        self.offset = offset
        self._given_offset = offset
        self._next_window: int | None = None  # index k of the next window [kW, (k+1)W)
        self._next_scalar_step: int | None = None
        self._layout_written = False
        self._writer: tuple | None = None  # the writer session and last step seen last time

    def update(self) -> ExportResult:
        """Write the complete windows and logged scalars committed since the last update.

        A run continued by another writer since the last update (resumed, which may have
        replaced the rows from its checkpoint on, or overwritten) is written again from its
        first window into a new event file, which replaces what the sink holds.

        Returns:
            What this update wrote; nothing while the store does not exist or holds no step.

        Raises:
            StatscopeError: ``run`` is a distributed run's folder (export each ``rank{r}`` store,
                or use :func:`export_run`).
        """
        from statscope.store import is_run, open_run

        if not is_run(self.run):
            return ExportResult()
        ds = open_run(self.run)
        if S.RANK in ds.dims:
            raise StatscopeError(f"run={self.run!r}: a distributed run's folder; export each "
                                 "rank's store (rank0, rank1, ...), or use export_run")
        if ds.sizes[S.STEP] == 0:
            return ExportResult()
        steps = np.asarray(ds[S.STEP].values)
        first, last = int(steps[0]), int(steps[-1])
        writer = str(ds.attrs.get(S.ATTR_WRITER_ID) or ds.attrs.get(S.ATTR_LEASE))
        if self._writer is not None and (last < self._writer[1] or (
                writer != self._writer[0] and _replaced(ds.attrs, self._writer[1]))):
            self.sink.restart()  # rows already written were replaced
            self._next_window = self._next_scalar_step = None
            self._layout_written = False
            self.offset = self._given_offset
        self._writer = (writer, last)
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
                window = rows.sel({S.STEP: slice(lo, hi - 1)})
                items = window_summaries(window, hi - 1 + self.offset)
                self.sink.write(items)
                n_hist = sum(isinstance(i, Histogram) for i in items)
                bad, first_bad = _nonfinite(window, stats)
                result += ExportResult(int(bool(items)), len(items) - n_hist, n_hist,
                                       nonfinite=bad, first_nonfinite=first_bad)
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

    A distributed run's folder (``rank0``, ``rank1``, ...) exports each rank's store into
    ``target/rank{r}``.

    Returns:
        What was written. The export appears in ``target`` only once complete: an export that
        fails (a damaged run) leaves ``target`` as it was, an earlier export there included.

    Raises:
        StatscopeError: ``run`` is not a run, a bad format, window or offset, or ``target``
            cannot be written; StoreDamagedError: the run cannot be read.

    Warns:
        NonFiniteWarning: statistics in the exported windows are NaN or ±inf where their layer
            ran (a diverging run): they are left out of the summaries, as the analyses leave
            them out; the warning says how many and from which step.

    Example:
        >>> export_run("runs/demo", "tensorboard", "tb/demo")  # doctest: +SKIP
        ExportResult(windows=5, scalars=..., histograms=..., last_step=999)
    """
    import warnings

    from statscope.discovery import is_single_run, rank_paths
    from statscope.errors import NonFiniteWarning
    from statscope.export.sinks import open_sink
    from statscope.store import read_attrs

    _check(window, offset)
    read_attrs(run)  # a clear StoreError for anything that is not a run
    ranks = [] if is_single_run(os.fspath(run)) else rank_paths(run)
    if ranks:
        results = [export_run(path, to, os.path.join(os.fspath(target), os.path.basename(path)),
                              window=window, offset=offset) for path in ranks]
        total = sum(results, ExportResult())
        lasts = [r.last_step for r in results if r.last_step is not None]
        return dataclasses.replace(total, last_step=max(lasts, default=None))
    sink = open_sink(to, target, staged=True)
    try:
        result = Exporter(run, sink, window=window, offset=offset).update()
    except BaseException:
        sink.discard()
        raise
    sink.close()
    if result.nonfinite:
        warnings.warn(f"run={os.fspath(run)!r}: {result.nonfinite} statistic values of the "
                      f"exported windows are NaN or inf where their layer ran (a diverging run?), "
                      f"from step {result.first_nonfinite}; they are left out of the summaries",
                      NonFiniteWarning, stacklevel=2)
    return result


def _nonfinite(rows, stats: list[str]) -> tuple[int, int | None]:
    """Non-finite statistic values of ``rows`` (step, neuron) where the layer ran, and the
    first step holding one."""
    ran = np.asarray(rows[S.COUNT].values) > 0 if S.COUNT in rows else True
    bad = np.zeros(rows.sizes[S.STEP], np.int64)
    for stat in stats:
        if stat != S.COUNT:
            bad += np.sum(~np.isfinite(np.asarray(rows[stat].values)) & ran, axis=1)
    where = np.flatnonzero(bad)
    return int(bad.sum()), (int(rows[S.STEP].values[where[0]]) if where.size else None)


def _check(window, offset) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise StatscopeError(f"window={window!r}: expected an int of at least 2 steps")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)
                               or not 0 <= offset <= MAX_STEP_OFFSET):
        raise StatscopeError(f"offset={offset!r}: expected an int in 0..2**62 (store step k is "
                             "written at step k + offset) or None")


def _replaced(attrs, seen: int) -> bool:
    """Whether a run that another writer opened since the last update may have replaced rows up
    to step ``seen``: a new run in its folder, or one resumed at or before ``seen`` (a resume
    after it only appends)."""
    resumed = attrs.get(S.ATTR_RESUMED_AT)
    return resumed is None or int(resumed) <= seen
