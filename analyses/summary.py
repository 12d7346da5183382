"""Aggregate per-neuron results per layer: median, interquartile range and the paper's neuron i-1."""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import layer_order, quiet
from ._names import N_VALID, QUANTITIES, QUANTITY

__all__ = ["layer_summary"]


def nanquantiles(values: np.ndarray, qs) -> np.ndarray:
    """``np.nanquantile(values, qs, axis=-1)`` (linear interpolation, NaN skipped) that keeps
    infinite values: numpy interpolates as ``a + (b − a)·t``, which is NaN next to an inf even at
    ``t = 0`` (the median of [1, 2, inf] read NaN; it is 2, the 75th percentile inf, and the
    median of [−inf, 3] −inf).

    Returns:
        (len(qs), ...) quantiles; NaN where a row is all NaN.
    """
    qs = np.asarray(qs, np.float64)
    with quiet():
        lo = np.nanquantile(values, qs, axis=-1, method="lower")
        hi = np.nanquantile(values, qs, axis=-1, method="higher")
        n = np.sum(~np.isnan(values), axis=-1)
        pos = np.multiply.outer(qs, np.maximum(n - 1, 0))
        t = pos - np.floor(pos)
        # (1 − t)·a + t·b: finite beside an inf, and -inf or inf when one of the two is
        return np.where((lo == hi) | (t == 0), lo, (1 - t) * lo + t * hi)


def layer_summary(result: xr.Dataset) -> xr.Dataset:
    """Summarise per-neuron values (e.g. :func:`fluctuation`) per layer.

    Args:
        result: Dataset whose float vars have dims (neuron,) or (run, neuron) with a ``layer``
            coordinate (and ``unit``) along neuron.

    Returns:
        Dataset with the same float vars, dims (layer, quantity) or (layer, run, quantity),
        layers in store order; ``quantity`` is median, q25, q75 (over the layer's neurons,
        NaN-skipping) and first (the layer's unit 0, the paper's "neuron i-1"). Coordinate
        ``n_neurons`` along layer. attrs are kept.

    Example:
        >>> import xarray as xr
        >>> f = xr.Dataset({"bn_mean": ("neuron", [1.0, 2.0, 3.0, 10.0])},
        ...                coords={"layer": ("neuron", ["a", "a", "a", "b"]),
        ...                        "unit": ("neuron", [0, 1, 2, 0])})
        >>> layer_summary(f).bn_mean.sel(layer="a").values.tolist()
        [2.0, 1.5, 2.5, 1.0]
    """
    if not isinstance(result, xr.Dataset) or S.LAYER not in result.coords:
        raise StatscopeError("layer_summary: expected a per-neuron Dataset with a 'layer' "
                             "coordinate, e.g. the result of fluctuation()")
    layers = layer_order(result[S.LAYER].values)
    lay = np.asarray(result[S.LAYER].values)
    units = (np.asarray(result[S.UNIT].values) if S.UNIT in result.coords
             else np.zeros(lay.size, int))
    out = {}
    for name, var in result.data_vars.items():
        if S.NEURON not in var.dims or name == N_VALID or not np.issubdtype(var.dtype, np.floating):
            continue
        other = [d for d in var.dims if d != S.NEURON]
        arr = var.transpose(*other, S.NEURON).values
        res = np.empty(arr.shape[:-1] + (len(layers), len(QUANTITIES)))
        for j, layer in enumerate(layers):
            sel = np.flatnonzero(lay == layer)
            sub = arr[..., sel]
            with quiet():
                res[..., j, :3] = np.moveaxis(nanquantiles(sub, [0.5, 0.25, 0.75]), 0, -1)
            res[..., j, 3] = sub[..., int(np.argmin(units[sel]))]
        dims = [*other, S.LAYER, QUANTITY]
        da = xr.DataArray(res, dims=dims)
        out[name] = da.transpose(S.LAYER, *other, QUANTITY)
    n_neurons = [int((lay == layer).sum()) for layer in layers]
    coords = {S.LAYER: layers, QUANTITY: list(QUANTITIES), "n_neurons": (S.LAYER, n_neurons)}
    summary = xr.Dataset(out, coords=coords, attrs=dict(result.attrs))
    run_coords = {k: v for k, v in result.coords.items()
                  if S.NEURON not in v.dims and k not in summary.coords}
    return summary.assign_coords(run_coords)
