"""Where the fluctuation views' numbers come from: the per-step series, or the window summaries.

The Fluctuation (Fig. 6) and Std-vs-mean views need the fluctuation of *every* neuron of a run
over the chosen window. From the per-step series that reads neurons × steps values: nothing for
the paper's net, 524 million for an LLM's 80 × 8,192 channels over 200 steps. Runs also keep
**window summaries** (:func:`statscope.store.open_windows`): the mean and standard deviation
(ddof = 1) of every statistic of every channel over each window of W steps. The fluctuation over
whole windows follows from them exactly — for one window it *is* the window's std; over several,
the pooled variance of their means, stds and step counts — reading steps / W rows.

Per run and rank choice, :func:`choose` picks, and the page says which:

1. **window summaries**, when the chosen window is exactly a run of whole windows and the
   per-step read exceeds :data:`~statscope.dashboards.limits.MAX_SERIES_VALUES` or the series
   keeps fewer channels than the summaries (``neurons=`` at recording);
2. **per-step series** (``statscope.analyses``), when its read fits the budget — exact for any
   window, with bootstrap intervals and the sampling baseline;
3. **window summaries of the whole windows inside** the chosen window (a slightly different
   window, named on the page), when the series is too large;
4. **a sample** of each layer's neurons, evenly spaced, from the per-step series, when the run
   keeps no summaries (or the view merges ranks, which have none) and has more neurons than
   :data:`~statscope.dashboards.limits.MAX_SCATTER_POINTS`;
5. otherwise the per-step series of every neuron (exact, slow).

The numbers from window summaries are ``statscope.analyses.fluctuation(..., source="windows")``
(:func:`statscope.dashboards.results.fluct` calls it). Its scale-free version needs each layer's
element count constant over the windows (as with a fixed batch size); where it is not, the
analyses refuse and the view takes the per-step series (2, 4 or 5) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from statscope import schema as S

from .data import layer_slices
from .limits import MAX_SCATTER_POINTS, MAX_SERIES_VALUES

__all__ = ["SERIES", "WINDOWS", "SAMPLE", "Source", "Fluct", "choose", "whole_windows",
           "sample_positions", "FLUCT_STATS"]

SERIES, WINDOWS, SAMPLE = "per-step series", "window summaries", "sample"
FLUCT_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)


@dataclass(frozen=True)
class Source:
    """How one run view's fluctuation is computed.

    Attributes:
        kind: :data:`SERIES`, :data:`WINDOWS` or :data:`SAMPLE`.
        note: the line the page shows about it ("" for the per-step series of every neuron).
        windows: for :data:`WINDOWS`, the window rows used, ``(first, stop)``.
        exact: whether the numbers are those of the chosen window and every neuron.
        positions: for :data:`SAMPLE`, the neurons analysed (positions along ``neuron``).
    """

    kind: str
    note: str = ""
    windows: tuple[int, int] | None = None
    exact: bool = True
    positions: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Fluct:
    """The fluctuation of one run view, as ``statscope.analyses.fluctuation`` lays it out.

    Attributes:
        values: (neuron,) ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std`` and ``n_valid``, with
            coords ``layer``, ``unit``, over the neurons the source covers.
        summary: ``analyses.layer_summary(values)``: (layer, quantity).
        source: how it was computed.
        find: ``find(layer, unit)``: a neuron's position in ``values``, or ``None``.
    """

    values: xr.Dataset
    summary: xr.Dataset
    source: Source
    find: Callable[[str, int], int | None]

    @property
    def nbytes(self) -> int:
        """Bytes held (for the dashboard's byte-bounded cache)."""
        return int(self.values.nbytes) + int(self.summary.nbytes)


def whole_windows(w: xr.Dataset, steps: np.ndarray, rows: slice) -> tuple[int, int, bool] | None:
    """The window summaries that lie wholly inside ``rows`` of a run's steps.

    A summary row ``k`` (first step ``s_k``) holds the recorded steps in ``[s_k, s_k + W)``; it
    is inside when all of them fall in ``rows`` (the run's last, partial window counts once it
    is written, at the end of the run).

    Args:
        w: ``open_windows`` of the run.
        steps: (step,) the run's recorded steps.
        rows: the chosen rows of ``steps``.

    Returns:
        ``(first, stop, exact)``: summary rows ``first..stop-1`` are inside, ``exact`` when
        together they hold exactly the chosen rows; ``None`` when none is inside.

    Example:
        >>> w = xr.Dataset(coords={"step": ("window", [0, 200, 400])},
        ...                attrs={"window_steps": 200})
        >>> whole_windows(w, np.arange(600), slice(400, 600)), whole_windows(w, np.arange(600),
        ...                                                                   slice(350, 600))
        ((2, 3, True), (2, 3, False))
    """
    width = int(w.attrs.get(S.ATTR_WINDOW_STEPS) or 0)
    starts = np.asarray(w[S.STEP].values, np.int64)
    if not width or not starts.size or rows.stop <= rows.start:
        return None
    lo = np.searchsorted(steps, starts, "left")
    hi = np.searchsorted(steps, starts + width, "left")
    inside = np.flatnonzero((lo >= rows.start) & (hi <= rows.stop) & (hi > lo))
    if not inside.size:
        return None
    first, last = int(inside[0]), int(inside[-1])
    if last - first + 1 != inside.size:  # windows are consecutive; a gap would be damage
        return None
    exact = lo[first] == rows.start and hi[last] == rows.stop
    return first, last + 1, bool(exact)


def choose(n_neurons: int, steps: np.ndarray, rows: slice, w: xr.Dataset | None,
           layers: dict[str, np.ndarray] | None = None) -> Source:
    """Pick the source of one run view's fluctuation (the rules in the module docstring).

    Args:
        n_neurons: neurons of the view's per-step series.
        steps: (step,) the run's recorded steps.
        rows: the chosen window's rows of ``steps``.
        w: the view's window summaries, or ``None`` (none kept, in memory, merged ranks).
        layers: the view's layer positions (:func:`~statscope.dashboards.data.layer_slices`),
            needed to draw a sample.
    """
    n_rows = rows.stop - rows.start
    series = n_neurons * n_rows
    span = whole_windows(w, steps, rows) if w is not None else None
    wider = w is not None and w.sizes[S.NEURON] > n_neurons
    if span is not None and span[2] and (series > MAX_SERIES_VALUES or wider):
        return Source(WINDOWS, _window_note(w, steps, span), span[:2], True)
    if series <= MAX_SERIES_VALUES:
        return Source(SERIES)
    if span is not None:
        return Source(WINDOWS, _window_note(w, steps, span), span[:2], False)
    if n_neurons > MAX_SCATTER_POINTS and layers:
        per_layer = max(1, MAX_SERIES_VALUES // max(1, n_rows) // len(layers))
        pos = sample_positions(layers, per_layer)
        return Source(SAMPLE, f"fluctuation of {pos.size:,} of {n_neurons:,} neurons (evenly "
                              f"spaced in each layer; this run keeps no window summaries for "
                              "this view)", None, False, pos)
    return Source(SERIES)


def _window_note(w: xr.Dataset, steps: np.ndarray, span: tuple[int, int, bool]) -> str:
    first, stop, exact = span
    width = int(w.attrs[S.ATTR_WINDOW_STEPS])
    starts = np.asarray(w[S.STEP].values)
    a = int(starts[first])
    b = int(min(starts[stop - 1] + width, steps[-1] + 1)) - 1
    n = stop - first
    what = f"{n:,} window{'s' if n > 1 else ''} of {width:,} steps"
    if exact:
        return f"from the window summaries ({what}, every channel)"
    return (f"from the window summaries of steps {a:,}–{b:,} ({what}, every channel): the "
            "whole windows inside the chosen window, whose per-step series is too large")


def sample_positions(layers: dict[str, np.ndarray], per_layer: int) -> np.ndarray:
    """Up to ``per_layer`` evenly spaced positions of each layer (its first always), sorted.

    Example:
        >>> sample_positions({"a": np.arange(10), "b": np.arange(10, 12)}, 3).tolist()
        [0, 4, 9, 10, 11]
    """
    out = []
    for pos in layers.values():
        if pos.size <= per_layer:
            out.append(pos)
        else:
            out.append(pos[np.unique(np.linspace(0, pos.size - 1, per_layer).astype(np.int64))])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def channel_finder(w: xr.Dataset, layers: dict[str, np.ndarray]) -> Callable[[str, int], int | None]:
    """``find(layer, unit)`` over window summaries, which hold every channel of each layer in
    unit order: the layer's first position plus the unit."""
    first = {k: int(v[0]) for k, v in layers.items()}
    size = {k: int(v.size) for k, v in layers.items()}

    def find(layer: str, unit: int) -> int | None:
        if layer not in first or not 0 <= int(unit) < size[layer]:
            return None
        return first[layer] + int(unit)

    return find


def index_finder(values: xr.Dataset) -> Callable[[str, int], int | None]:
    """``find(layer, unit)`` over the neurons of ``values`` (a dict built once)."""
    index = {(str(l), int(u)): i for i, (l, u) in enumerate(
        zip(values[S.LAYER].values.tolist(), values[S.UNIT].values.tolist()))}
    return lambda layer, unit: index.get((layer, int(unit)))


def windows_layers(w: xr.Dataset) -> dict[str, np.ndarray]:
    """Positions of each layer's channels in window summaries."""
    return layer_slices(np.asarray(w[S.LAYER].values))
