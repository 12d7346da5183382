"""Windows: the steps an analysis looks at.

A window is one of

* an int ``W``: the last ``W`` training steps with data (count > 0 for some neuron), per run when
  stacked (the paper's Figure 6 uses ``W = 200``). A run that records one step in ``every``
  (``attrs['every']``) has ``ceil(W / every)`` recorded rows in them: ``W`` always counts training
  steps, never rows;
* a tuple ``(start, stop)`` of global steps, start inclusive, stop exclusive;
* a float ``f`` in (0, 1]: the last ``ceil(f * n)`` rows of each run, ``n`` the rows from its first
  to its last step with data (a fraction of training as recorded);
* ``"all"`` or None: every step.

For a stacked dataset whose runs end at different steps, the result spans the union of the
per-run windows and each run is masked outside its own (statistics NaN, count 0), so later
reductions along ``step`` see exactly each run's window. The ranks of a distributed run (dim
``rank``) share one window: the steps at which some rank has data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError, StatscopeWarning

from ._data import every_of, ranked, require, run_name, size_notes, stacked
from .runs import GLOBAL, expand_ranks, split_runs

__all__ = ["select_window", "describe_window", "load_window", "RunWindow", "split_runs",
           "expand_ranks", "run_windows", "map_windows", "window_rows", "window_problem",
           "GLOBAL"]

_SEARCH_BLOCK = 1024
_LOAD_LIMIT = 256 * 2**20
"""Windows up to this many bytes are read into memory at once: one read of a few chunks beats
building a dask graph per reduction (the default 200-step window of a 512-neuron run is 2 MB)."""


def describe_window(window) -> str:
    """The window as text for result attrs and reports.

    >>> describe_window(200), describe_window((0, 500)), describe_window(0.1), describe_window(None)
    ('last 200 steps', 'steps [0, 500)', 'last 10% of training', 'all steps')
    """
    if window is None or (isinstance(window, str) and window == "all"):
        return "all steps"
    if isinstance(window, tuple):
        return f"steps [{window[0]}, {window[1]})"
    if isinstance(window, float):
        return f"last {window:.0%} of training"
    return f"last {window} steps"


def _has_data(count: xr.DataArray) -> np.ndarray:
    """(step,) bool for one run: some neuron's layer ran at that step (on some rank)."""
    return np.asarray((count > 0).any([d for d in count.dims if d != S.STEP]))


def _last_positions(count: xr.DataArray, w: int, name: str) -> np.ndarray:
    """Positions of the last ``w`` rows with data, reading the store backwards a block at a time."""
    n = count.sizes[S.STEP]
    size = min(n, max(2 * w, _SEARCH_BLOCK))
    while True:
        idx = np.flatnonzero(_has_data(count.isel({S.STEP: slice(n - size, n)}))) + (n - size)
        if idx.size >= w or size == n:
            break
        size = min(n, size * 4)
    if idx.size == 0:
        raise StatscopeError(f"run {name!r} has no steps with data (count is 0 everywhere)")
    if idx.size < w:
        raise StatscopeError(f"window={w}: longer than run {name!r}, which has {idx.size} steps "
                             f"with data; pass a smaller window or window='all'")
    return idx[-w:]


def _extent(count: xr.DataArray, name: str) -> tuple[int, int]:
    """First and last positions with data of one run."""
    last = _last_positions(count, 1, name)[0]
    n = count.sizes[S.STEP]
    start = 0
    while start < n:
        stop = min(n, start + _SEARCH_BLOCK)
        hits = np.flatnonzero(_has_data(count.isel({S.STEP: slice(start, stop)})))
        if hits.size:
            return start + int(hits[0]), int(last)
        start = stop
    raise StatscopeError(f"run {name!r} has no steps with data (count is 0 everywhere)")


def window_rows(window: int, every: int = 1) -> int:
    """Recorded rows in the last ``window`` training steps of a run that records one step in
    ``every``: ``ceil(window / every)``.

    >>> window_rows(200), window_rows(200, 10), window_rows(200, 3)
    (200, 20, 67)
    """
    return -(-int(window) // max(1, int(every)))


def window_problem(window) -> str | None:
    """What is wrong with ``window`` whatever the run (None when nothing is): a bool, an int
    below 2, a fraction outside (0, 1], a ``(start, stop)`` with stop ≤ start, another type.

    >>> window_problem(200) is None, window_problem(1)
    (True, 'expected at least 2 steps')
    """
    if isinstance(window, (bool, np.bool_)):
        return "expected an int, a (start, stop) tuple, a float in (0, 1] or 'all'"
    if isinstance(window, (int, np.integer)):
        return "expected at least 2 steps" if window < 2 else None
    if isinstance(window, (float, np.floating)):
        return None if 0.0 < window <= 1.0 else "a fraction must lie in (0, 1]"
    if isinstance(window, (tuple, list)) and len(window) == 2:
        try:
            start, stop = (int(v) for v in window)
        except (TypeError, ValueError):
            return "expected two int steps (start, stop)"
        return "stop must exceed start" if stop <= start else None
    if window is None or (isinstance(window, str) and window == "all"):
        return None
    return "expected an int, a (start, stop) tuple, a float in (0, 1] or 'all'"


def _positions(count: xr.DataArray, steps: np.ndarray, window, name: str,
               every: int = 1) -> np.ndarray:
    """Positions along step that one run's window covers."""
    why = window_problem(window)
    if why is not None:
        shown = tuple(window) if isinstance(window, (tuple, list)) else \
            window if isinstance(window, (int, float, np.number)) and \
            not isinstance(window, (bool, np.bool_)) else repr(window)
        raise StatscopeError(f"window={shown}: {why}")
    if isinstance(window, (int, np.integer)):
        rows = window_rows(int(window), every)
        if rows < 2:
            raise StatscopeError(f"window={window}: run {name!r} records one step in {every}, "
                                 f"so the last {window} steps hold {rows} recorded row; pass at "
                                 f"least {2 * every} steps")
        try:
            return _last_positions(count, rows, name)
        except StatscopeError as err:
            if every == 1 or "longer than run" not in str(err):
                raise
            raise StatscopeError(f"window={window}: longer than run {name!r}, which records one "
                                 f"step in {every} and has fewer than {rows} recorded rows with "
                                 f"data; pass a smaller window or window='all'") from None
    first, last = _extent(count, name)
    if window is None or (isinstance(window, str) and window == "all"):
        if last == first:  # one step: no fluctuation to measure, as for any other window
            raise StatscopeError(f"window={window!r}: run {name!r} has 1 recorded row with "
                                 f"data (step {first}); a window needs at least 2")
        return np.arange(first, last + 1)
    if isinstance(window, (float, np.floating)):
        k = max(1, math.ceil(window * (last - first + 1)))
        if k < 2:
            raise StatscopeError(f"window={window}: that fraction of the {last - first + 1} "
                                 f"recorded rows of run {name!r} is {k} row; a window needs at "
                                 f"least 2")
        return np.arange(last - k + 1, last + 1)
    if isinstance(window, (tuple, list)) and len(window) == 2:
        start, stop = (int(v) for v in window)
        if start < steps[first] or stop > steps[last] + 1:
            raise StatscopeError(f"window={tuple(window)}: outside run {name!r}, which has data "
                                 f"at steps {steps[first]}..{steps[last]}")
        pos = np.flatnonzero((steps >= start) & (steps < stop))
        if pos.size < 2:
            raise StatscopeError(f"window={tuple(window)}: fewer than 2 steps of run {name!r}")
        return pos
    raise StatscopeError(f"window={window!r}: expected an int, a (start, stop) tuple, a float in "
                         f"(0, 1] or 'all'")


def select_window(ds: xr.Dataset, window=200) -> xr.Dataset:
    """Restrict a run (or stacked runs) to a window of steps.

    Args:
        ds: a run from ``statscope.open_run`` (dims step, neuron) or runs from ``open_runs``
            (dims run, step, neuron).
        window: int ``W`` (last W steps with data, per run), ``(start, stop)`` steps (stop
            exclusive), float in (0, 1] (last fraction of training) or ``"all"``/None.

    Returns:
        Dataset with the same variables, lazily sliced along step; ``attrs['window']`` holds
        the window as text. With stacked runs each run is masked (NaN statistics, count 0)
        outside its own window.

    Raises:
        StatscopeError: the window is malformed, longer than a run, or a run has no data.

    Example:
        >>> import numpy as np, xarray as xr
        >>> ds = xr.Dataset({"count": (("step", "neuron"), np.full((5, 1), 4))},
        ...                 coords={"step": np.arange(5)})
        >>> select_window(ds, 3).step.values.tolist()
        [2, 3, 4]
    """
    require(ds, [S.COUNT], f"select_window(window={window!r})")
    if S.STEP not in ds.dims or ds.sizes[S.STEP] == 0:
        raise StatscopeError("select_window: the dataset has no steps (empty run)")
    steps = np.asarray(ds[S.STEP].values)
    if not stacked(ds):
        every = every_of(ds)
        pos = _positions(ds[S.COUNT], steps, window, run_name(ds), every)
        out = ds.isel({S.STEP: slice(int(pos[0]), int(pos[-1]) + 1)})
        if pos.size != pos[-1] - pos[0] + 1:
            keep = np.zeros(out.sizes[S.STEP], bool)
            keep[pos - pos[0]] = True
            out = _mask_steps(out, xr.DataArray(keep, dims=[S.STEP]))
        # a new dict: isel shares the run's attrs, and the run (a dashboard's cached one) would
        # keep this window's text for every later "all"
        out.attrs = {**out.attrs, "window": _label(ds, window, every, pos.size)}
        return out
    per_run = [_positions(ds[S.COUNT].isel({S.RUN: i}), steps, window, run_name(ds, i),
                          every_of(ds, run_name(ds, i)))
               for i in range(ds.sizes[S.RUN])]
    lo = min(int(p[0]) for p in per_run)
    hi = max(int(p[-1]) for p in per_run) + 1
    keep = np.zeros((ds.sizes[S.RUN], hi - lo), bool)
    for i, p in enumerate(per_run):
        keep[i, p - lo] = True
    out = ds.isel({S.STEP: slice(lo, hi)})
    if not keep.all():
        out = _mask_steps(out, xr.DataArray(keep, dims=[S.RUN, S.STEP]))
    out.attrs = {**out.attrs, "window": _label(ds, window)}
    return out


def _label(ds: xr.Dataset, window, every: int = 1, rows: int = 0) -> str:
    """The window's text; "all" of a dataset that is already a window keeps that window's text.
    A run that records one step in ``every`` says how many recorded rows the window holds."""
    if (window is None or (isinstance(window, str) and window == "all")) and "window" in ds.attrs:
        return str(ds.attrs["window"])
    text = describe_window(window)
    return f"{text} ({rows} recorded rows, one step in {every})" if every > 1 else text


def _mask_steps(ds: xr.Dataset, keep: xr.DataArray) -> xr.Dataset:
    """Blank the steps outside ``keep``: statistics to NaN, count to 0."""
    out = ds.copy()
    for name, var in ds.data_vars.items():
        if S.STEP not in var.dims:
            continue
        if name == S.COUNT:
            out[name] = var.where(keep, 0)
        else:
            out[name] = var.where(keep)
    return out


def load_window(ds: xr.Dataset, window=200, *, limit_bytes: int = _LOAD_LIMIT) -> xr.Dataset:
    """:func:`select_window`, read into memory when the window is at most ``limit_bytes``.

    Larger windows stay lazy (dask-chunked along step), so memory stays bounded by chunks.

    Example:
        >>> import numpy as np, xarray as xr
        >>> ds = xr.Dataset({"count": (("step", "neuron"), np.full((5, 1), 4))}).chunk()
        >>> load_window(ds, 2)["count"].chunks is None
        True
    """
    w = select_window(ds, window)
    if w.nbytes <= limit_bytes:
        w = w.load()
    return w


@dataclass(frozen=True)
class RunWindow:
    """One run's window, read into memory when small.

    Attributes:
        name: the run's name (``run`` coordinate, mapping key, or the run's attrs).
        data: Dataset (step, neuron) of the window (see :func:`load_window`).
        meta: the run's settings: its ``meta`` attrs (batch_size, seed, ...) and ``model``.
    """

    name: str
    data: xr.Dataset
    meta: Mapping[str, Any] = field(default_factory=dict)


def run_windows(runs, window=200, *, load: bool = True) -> list[RunWindow]:
    """Each run's own window, read separately (no padding of shorter runs is ever read).

    Args:
        runs: see :func:`split_runs` (a distributed run gives one entry per rank and a global
            one).
        window: see :func:`select_window`.
        load: read small windows into memory (:func:`load_window`); False leaves them lazy
            (dask), for a computation that reads them where it runs (a dask worker).

    Returns:
        One :class:`RunWindow` per run, in order. A distributed run's ranks share one window
        (:func:`select_window` of the run); a rank with fewer than two steps with data in it (it
        stopped earlier than the others) is left out with a
        :class:`~statscope.errors.StatscopeWarning`, the other ranks and the global entry kept.
    """
    pick = load_window if load else select_window
    out = []
    for name, ds, meta in split_runs(runs, ranks=False):
        if not ranked(ds):
            out.append(RunWindow(name, pick(ds, window), meta))
            continue
        shared = select_window(ds, window)
        for entry, one, entry_meta in expand_ranks(shared, name, meta):
            rows = int(_has_data(one[S.COUNT]).sum())
            if rows < 2:
                warnings.warn(f"{entry}: {rows} recorded row{'s' if rows != 1 else ''} with "
                              f"data in the ranks' window ({shared.attrs['window']}): left out "
                              f"(a window needs at least 2)", StatscopeWarning, stacklevel=2)
                continue
            out.append(RunWindow(entry, pick(one, "all"), entry_meta))
    return out


def _per_rank(w: xr.Dataset, fn: Callable[[xr.Dataset], xr.Dataset]) -> xr.Dataset:
    """``fn`` on each rank of a distributed run's window, stacked along ``rank``."""
    ranks = np.asarray(w[S.RANK].values)
    results = [fn(w.isel({S.RANK: i}).drop_vars(S.RANK, errors="ignore"))
               for i in range(ranks.size)]
    out = xr.concat(results, dim=S.RANK, coords="minimal", compat="override",
                    combine_attrs="override").assign_coords({S.RANK: ranks})
    notes = []
    for r, res in zip(ranks, results):
        for n in res.attrs.get(S.NOTES, []):
            if f"rank {r}: {n}" not in notes:
                notes.append(f"rank {r}: {n}")
    out.attrs = {**results[0].attrs, S.NOTES: notes}
    return out


def _with_notes(result: xr.Dataset, ds: xr.Dataset) -> xr.Dataset:
    """``result`` with the notes on the run's size controls (:func:`size_notes`) added."""
    extra = [n for n in size_notes(ds) if n not in result.attrs.get(S.NOTES, [])]
    if extra:
        result.attrs = {**result.attrs, S.NOTES: [*result.attrs.get(S.NOTES, []), *extra]}
    return result


def map_windows(runs, window, fn: Callable[[xr.Dataset], xr.Dataset]) -> xr.Dataset:
    """Apply ``fn`` to each run's window; stack the results along ``run`` for several runs.

    Args:
        runs: see :func:`split_runs`; several runs must share one neuron layout.
        window: see :func:`select_window`.
        fn: window Dataset (step, neuron) -> result Dataset without ``step``.

    Returns:
        ``fn``'s result for one run; for several, concatenated along ``run`` with the run
        coordinates of ``runs`` (``run`` and the settings in schema.META_KEYS); attrs from the
        first run, with each run's notes prefixed by its name when they differ. A distributed
        run's result has a ``rank`` dimension: ``fn`` of each rank over the ranks' shared
        window. Notes on the run's size controls (``every``, kept units) are added.
    """
    parts = [RunWindow(name, load_window(ds, window), meta)
             for name, ds, meta in split_runs(runs, ranks=False)]
    results = [_with_notes(_per_rank(p.data, fn) if ranked(p.data) else fn(p.data), p.data)
               for p in parts]
    if isinstance(runs, xr.Dataset) and not stacked(runs):
        return results[0]
    first = parts[0].data
    for p in parts[1:]:
        if not np.array_equal(p.data[S.LAYER].values, first[S.LAYER].values):
            raise StatscopeError(f"runs {parts[0].name!r} and {p.name!r} have different layers; "
                                 f"analyse them separately")
    # a run's own scalar coordinates (its name, settings) give way to the stacked ones; index
    # coordinates (a summary's layer, quantity, bound) and the neuron's labels are kept
    clean = [r.drop_vars([c for c in r.coords if c not in r.dims and S.NEURON not in r[c].dims],
                         errors="ignore")
             for r in results]
    out = xr.concat(clean, dim=S.RUN, coords="minimal", compat="override",
                    combine_attrs="override")
    coords: dict[str, Any] = {S.RUN: [p.name for p in parts]}
    for key in S.META_KEYS:
        if any(key in p.meta for p in parts):
            coords[key] = (S.RUN, [p.meta.get(key) for p in parts])
    out = out.assign_coords(coords)
    attrs = dict(results[0].attrs)
    for key, value in attrs.items():
        if isinstance(value, list) and key != S.NOTES:  # e.g. block lengths: union over runs
            attrs[key] = list(dict.fromkeys(v for r in results for v in r.attrs.get(key, [])))
    notes = []
    for p, r in zip(parts, results):
        for n in r.attrs.get(S.NOTES, []):
            text = n if len(parts) == 1 else f"{p.name}: {n}"
            if text not in notes:
                notes.append(text)
    out.attrs = {**attrs, S.NOTES: notes}
    return out
