"""Checks and masks shared by the analyses (private)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

FLUCT_STATS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)


def require(ds: xr.Dataset | Mapping[str, xr.Dataset], names, what: str) -> None:
    """Raise StatscopeError naming the variables of ``names`` that ``ds`` (a run, stacked runs
    or a mapping of runs) lacks."""
    if isinstance(ds, Mapping) and ds and all(isinstance(v, xr.Dataset) for v in ds.values()):
        for name, one in cast(Mapping[str, xr.Dataset], ds).items():
            require(one, names, f"{what} (run {name!r})")
        return
    if not isinstance(ds, xr.Dataset):
        raise StatscopeError(f"{what}: expected an xarray Dataset from statscope.open_run or "
                             f"open_runs, or a mapping of names to them; got "
                             f"{type(ds).__name__}")
    missing = [n for n in names if n not in ds.variables]
    if missing:
        have = ", ".join(sorted(map(str, ds.data_vars))) or "none"
        raise StatscopeError(f"{what}: the dataset has no {', '.join(missing)}; "
                             f"variables present: {have}")


def stacked(ds: xr.Dataset) -> bool:
    """Whether ``ds`` holds several runs stacked along ``run`` (from open_runs)."""
    return S.RUN in ds.dims


def run_name(ds: xr.Dataset, i: int | None = None) -> str:
    """A printable name for run ``i`` of a stacked dataset, or for a single run."""
    if i is not None:
        return str(ds[S.RUN].values[i])
    if S.RUN in ds.coords and ds[S.RUN].ndim == 0:
        return str(ds[S.RUN].values)
    return str(ds.attrs.get(S.ATTR_NAME, ds.attrs.get(S.ATTR_MODEL, "run")))


def ranked(ds: xr.Dataset) -> bool:
    """Whether ``ds`` is a distributed run with a ``rank`` dimension (open_run of its folder)."""
    return S.RANK in ds.dims


def every_of(ds: xr.Dataset, name: str | None = None) -> int:
    """The run's step stride (``attrs['every']``: one step in ``every`` recorded; 1 if absent).

    Args:
        ds: one run, or stacked runs (then ``name`` picks the run's own attrs).
        name: the run's name within stacked runs.
    """
    attrs = ds.attrs
    if name is not None and isinstance(attrs.get("runs"), Mapping):
        attrs = attrs["runs"].get(name) or attrs
    value = attrs.get(S.ATTR_EVERY) or 1
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        raise StatscopeError(f"attrs['every']={value!r}: expected a positive int") from None


def size_notes(ds: xr.Dataset) -> list[str]:
    """Sentences on what the run's size controls mean for an analysis of it: one step in
    ``every`` recorded, and layers whose per-step columns keep a subset of their channels."""
    notes = []
    every = every_of(ds)
    if every > 1:
        notes.append(f"the run records one training step in {every} (every={every}): a window of "
                     f"W steps holds ceil(W/{every}) recorded rows, and bootstrap block lengths "
                     f"count recorded rows")
    for rec in ds.attrs.get(S.ATTR_PROBES, []) or []:
        units = rec.get("units")
        if units is None:
            continue
        shown = ", ".join(map(str, list(units)[:4])) + (", ..." if len(units) > 4 else "")
        notes.append(f"{rec.get('name')}: per-step columns keep {len(units)} of its "
                     f"{rec.get('channels')} channels (units {shown}); per-neuron results and "
                     f"layer medians are over those, 'first' is its lowest kept unit; window "
                     f"summaries cover every channel (source='windows')")
    return notes


def valid(ds: xr.Dataset, name: str) -> xr.DataArray:
    """True where statistic ``name`` is usable: the layer ran (count > 0) and the value is finite."""
    return (ds[S.COUNT] > 0) & np.isfinite(ds[name])


def masked(ds: xr.Dataset, name: str) -> xr.DataArray:
    """Statistic ``name`` as float64 with NaN wherever it is not :func:`valid`."""
    return ds[name].astype(np.float64).where(valid(ds, name))


def sigma2_series(ds: xr.Dataset) -> xr.DataArray:
    """Per step, ``bn_std² · n/(n−1)``: unbiased for the channel's variance σ² (NaN if n < 2).

    Scale-free results divide by ``sqrt(window mean of this)`` rather than by the mean of
    ``bn_std``, whose small-batch bias (E σ̂ ≈ 0.80 σ at n = 4 for Gaussian data) would otherwise
    leak into comparisons across batch sizes.
    """
    n = ds[S.COUNT].astype(np.float64)
    return (masked(ds, S.BN_STD) ** 2 * n / (n - 1)).where(n > 1)


def sigma_bar(ds: xr.Dataset) -> xr.DataArray:
    """The neuron's σ over the window: sqrt of the window mean of :func:`sigma2_series`."""
    # a ufunc on a DataArray returns a DataArray, which numpy's stubs cannot say
    return cast(xr.DataArray, np.sqrt(sigma2_series(ds).mean(S.STEP)))


def layer_order(layer_coord) -> list[str]:
    """Layer names in the order they first appear along neuron (store order)."""
    values = np.asarray(layer_coord)
    _, first = np.unique(values, return_index=True)
    return [str(values[i]) for i in sorted(first)]


@dataclass(frozen=True)
class Layers:
    """The layers of a run's neuron axis.

    Attributes:
        names: layer names in store order.
        index: per layer, the positions of its neurons along ``neuron``.
        first: per layer, the position of its lowest unit (the paper's "neuron i-1").
    """

    names: tuple[str, ...]
    index: tuple[np.ndarray, ...]
    first: np.ndarray

    @classmethod
    def of(cls, ds: xr.Dataset) -> "Layers":
        lay = np.asarray(ds[S.LAYER].values)
        units = (np.asarray(ds[S.UNIT].values) if S.UNIT in ds.coords
                 else np.zeros(lay.size, int))
        names = tuple(layer_order(lay))
        index = tuple(np.flatnonzero(lay == name) for name in names)
        first = np.array([i[int(np.argmin(units[i]))] for i in index], dtype=int)
        return cls(names, index, first)

    @property
    def ordinal(self) -> np.ndarray:
        """(neuron,) the index of each neuron's layer in ``names``."""
        out = np.empty(sum(i.size for i in self.index), dtype=int)
        for k, i in enumerate(self.index):
            out[i] = k
        return out

    def median(self, values: np.ndarray) -> np.ndarray:
        """Layer medians over the last axis (neurons), NaN skipped: (..., n_layers)."""
        return np.stack([nanmedian(values[..., i]) for i in self.index], -1)

    def first_unit(self, values: np.ndarray) -> np.ndarray:
        """Each layer's first neuron over the last axis: (..., n_layers)."""
        return values[..., self.first]


def nanmedian(values: np.ndarray) -> np.ndarray:
    """Median over the last axis, NaN skipped (all-NaN: NaN); np.median where nothing is NaN,
    which is many times faster than np.nanmedian on small rows."""
    values = np.asarray(values, dtype=np.float64)
    nan = np.isnan(values)
    if not nan.any():
        return np.median(values, axis=-1)
    with quiet():
        return np.nanmedian(values, axis=-1)


def t_quantile(p, df):
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (scipy.special, no stats)."""
    from scipy.special import stdtrit

    return stdtrit(df, p)


def t_two_sided(t, df):
    """Two-sided p-value of a t statistic with ``df`` degrees of freedom."""
    from scipy.special import stdtr

    return 2.0 * stdtr(df, -np.abs(t))


def probe_records(ds: xr.Dataset) -> dict[str, dict]:
    """The probe records of ``ds.attrs['probes']`` keyed by layer name."""
    return {str(p["name"]): dict(p) for p in ds.attrs.get(S.ATTR_PROBES, []) or []}


def batch_sizes(ds: xr.Dataset) -> np.ndarray | None:
    """Batch size per run (stacked) or a 0-d array (single run); None when unknown."""
    if S.META_BATCH_SIZE in ds.coords:
        return np.asarray(ds[S.META_BATCH_SIZE].values, dtype=float)
    meta = ds.attrs.get(S.ATTR_META) or {}
    if S.META_BATCH_SIZE in meta and meta[S.META_BATCH_SIZE] is not None:
        return np.asarray(float(meta[S.META_BATCH_SIZE]))
    return None


@contextmanager
def quiet():
    """Silence numpy's all-NaN and ddof warnings: the callers count and report those cases."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
