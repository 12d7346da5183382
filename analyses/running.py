"""Batch versus running statistics: rebuild BatchNorm's running buffers from the recorded batches.

PyTorch's BatchNorm, in training mode, updates per channel after each forward

    num_batches_tracked += 1
    f = momentum, or 1 / num_batches_tracked when momentum is None (cumulative average)
    running_mean ← (1 − f) · running_mean + f · batch_mean
    running_var  ← (1 − f) · running_var  + f · batch_var · n / (n − 1)

with ``batch_var`` the population variance over the ``n`` elements of the channel. Only layers
whose probe record names a torch BatchNorm type (:data:`REPLAYABLE`) are replayed: other norm
layers keep running statistics by other rules (statscope.nn's ``HeteroNorm`` tracks the
variance of its std set, InstanceNorm averages per-instance variances) and get a note instead. The store
holds ``bn_mean``, ``bn_std`` (population), ``count`` = n, the buffers at the start of recording
(``running_mean0``, ``running_var0``) and ``momentum``/``num_batches_tracked`` in the probe's
``norm`` record, so the buffers can be replayed exactly up to rounding (float64 here, float32 in
torch) with no extra capture. Steps with count 0 (the layer did not run) leave them unchanged.
This assumes one training forward per recorded step and a probe on the norm layer's input.

The replay is a first-order linear filter (:func:`scipy.signal.lfilter`) run chunk by chunk along
step with its state carried over, so memory is bounded by one chunk.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import every_of, probe_records, quiet, ranked, require, stacked
from ._names import NOTES
from .window import select_window

__all__ = ["running_stats", "batch_vs_running", "REPLAYABLE"]

_CHUNK = 8192

REPLAYABLE = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                        "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"})
"""Module types (probe record ``type``) whose running-statistics update is BatchNorm's."""


def _layers(ds: xr.Dataset):
    """(name, neuron positions, norm record) of each probe whose running buffers can be rebuilt,
    and (name, reason) of the others."""
    records = probe_records(ds)
    lay = np.asarray(ds[S.LAYER].values)
    out, skipped = [], []
    for name, rec in records.items():
        norm = rec.get("norm")
        kind = str(rec.get("type", "?"))
        if not norm or rec.get("where") != "input":
            skipped.append((name, "not the input of a norm layer"))
        elif not norm.get("track_running_stats", True):
            skipped.append((name, f"{kind} does not track running statistics"))
        elif kind not in REPLAYABLE:
            skipped.append((name, f"{kind} keeps its running statistics by a rule the replay does "
                                  f"not know (only torch BatchNorm layers are replayed)"))
        else:
            out.append((name, np.flatnonzero(lay == name), norm))
    return out, skipped


def _replay(ds: xr.Dataset, stop: int, keep_from: int):
    """Running buffers after each step's update for positions [keep_from, stop): two arrays
    (stop - keep_from, neuron), float64, NaN for neurons without rebuildable buffers."""
    from scipy.signal import lfilter  # heavy; only the replay needs it

    layers, skipped = _layers(ds)
    if not layers:
        why = "; ".join(f"{n}: {r}" for n, r in skipped) or "the run has no probe records"
        raise StatscopeError(f"running statistics: no probe is the input of a torch BatchNorm "
                             f"tracking running statistics ({why})")
    n_keep = stop - keep_from
    rm_out = np.full((n_keep, ds.sizes[S.NEURON]), np.nan)
    rv_out = np.full_like(rm_out, np.nan)
    rm0 = ds[S.RUNNING_MEAN0].values.astype(np.float64)
    rv0 = ds[S.RUNNING_VAR0].values.astype(np.float64)
    for name, idx, norm in layers:
        m = norm.get("momentum")
        rm, rv = rm0[idx].copy(), rv0[idx].copy()
        k = int(norm.get("num_batches_tracked") or 0)
        for lo in range(0, stop, _CHUNK):
            hi = min(stop, lo + _CHUNK)
            part = ds.isel({S.STEP: slice(lo, hi), S.NEURON: idx})
            mean = part[S.BN_MEAN].values.astype(np.float64)
            n = part[S.COUNT].values[:, 0].astype(np.float64)
            with quiet():
                var = part[S.BN_STD].values.astype(np.float64) ** 2 * (n / (n - 1))[:, None]
            ok = n > 0
            a_mean, a_var = np.empty_like(mean), np.empty_like(mean)
            if m is None:
                ks = k + np.cumsum(ok)
                cm = np.cumsum(np.where(ok[:, None], mean, 0.0), 0)
                cv = np.cumsum(np.where(ok[:, None], var, 0.0), 0)
                with quiet():
                    a_mean = np.where(ks[:, None] > 0, (k * rm + cm) / ks[:, None], rm)
                    a_var = np.where(ks[:, None] > 0, (k * rv + cv) / ks[:, None], rv)
                a_mean[~ok] = np.nan
                a_var[~ok] = np.nan
                if ok.any():
                    k = int(ks[-1])
            else:
                b, a = [m], [1.0, -(1.0 - m)]
                if ok.any():
                    a_mean[ok] = lfilter(b, a, mean[ok], axis=0, zi=((1 - m) * rm)[None])[0]
                    a_var[ok] = lfilter(b, a, var[ok], axis=0, zi=((1 - m) * rv)[None])[0]
                a_mean[~ok] = np.nan
                a_var[~ok] = np.nan
            # Steps where the layer did not run keep the previous buffers.
            last = np.maximum.accumulate(np.where(ok, np.arange(hi - lo), -1))
            a_mean = np.where((last >= 0)[:, None], a_mean[np.maximum(last, 0)], rm)
            a_var = np.where((last >= 0)[:, None], a_var[np.maximum(last, 0)], rv)
            rm, rv = a_mean[-1], a_var[-1]
            s = max(lo, keep_from)
            if s < hi:
                rm_out[s - keep_from:hi - keep_from, idx] = a_mean[s - lo:]
                rv_out[s - keep_from:hi - keep_from, idx] = a_var[s - lo:]
    return rm_out, rv_out, skipped


def _check(ds: xr.Dataset, what: str) -> None:
    if stacked(ds):
        raise StatscopeError(f"{what}: got {ds.sizes[S.RUN]} stacked runs; pass one run, "
                             f"e.g. ds.isel(run=0)")
    if ranked(ds):
        raise StatscopeError(f"{what}: got a distributed run with {ds.sizes[S.RANK]} ranks; pass "
                             f"one rank, e.g. ds.isel(rank=0) (DistributedDataParallel "
                             f"broadcasts rank 0's buffers by default)")
    every = every_of(ds)
    if every > 1:
        raise StatscopeError(f"{what}: the run records one step in {every} (every={every}); "
                             f"replaying the running statistics needs every training step's "
                             f"batch statistics")
    require(ds, [S.BN_MEAN, S.BN_STD, S.COUNT, S.RUNNING_MEAN0, S.RUNNING_VAR0], what)


def _positions(ds: xr.Dataset, window) -> tuple[np.ndarray, str]:
    w = select_window(ds, window)
    return np.searchsorted(ds[S.STEP].values, w[S.STEP].values), w.attrs["window"]


def running_stats(ds: xr.Dataset, window="all") -> xr.Dataset:
    """BatchNorm running buffers after each step's update, replayed from the start of recording.

    Args:
        ds: one run with ``running_mean0``/``running_var0`` and probe ``norm`` records.
        window: the steps to return (see :func:`statscope.analyses.select_window`); the replay
            always starts at the first recorded step.

    Returns:
        Dataset (step, neuron), float64 ``running_mean`` and ``running_var`` (NaN for neurons
        of probes that are not inputs of a torch BatchNorm tracking running statistics, each
        named in a note with the reason); attrs: window, notes.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> ds = demo_run(n_steps=50).assign(running_mean0=("neuron", [0.0] * 16),
        ...                                  running_var0=("neuron", [1.0] * 16))
        >>> for p in ds.attrs["probes"]:
        ...     p["norm"] = {"momentum": 0.1, "eps": 1e-5, "track_running_stats": True,
        ...                  "num_batches_tracked": 0}
        >>> running_stats(ds, 10).running_mean.shape
        (10, 16)
    """
    _check(ds, "running_stats")
    pos, desc = _positions(ds, window)
    rm, rv, skipped = _replay(ds, int(pos[-1]) + 1, int(pos[0]))
    rows = pos - pos[0]
    out = xr.Dataset({"running_mean": ((S.STEP, S.NEURON), rm[rows]),
                      "running_var": ((S.STEP, S.NEURON), rv[rows])},
                     coords={**{k: v for k, v in ds.coords.items() if v.dims == (S.NEURON,)},
                             S.STEP: ds[S.STEP].values[pos]})
    out.attrs = {"window": desc, NOTES: _notes(skipped)}
    return out


def batch_vs_running(ds: xr.Dataset, window=200, *, eps: float | None = None) -> xr.Dataset:
    """How far each step's batch statistics sit from the running ones used at inference.

    The running buffers compared with step t are those in force before step t's update (what
    an evaluation just before that batch would normalise with).

    Args:
        ds: one run (see :func:`running_stats`).
        window: see :func:`statscope.analyses.select_window`.
        eps: added to variances as BatchNorm does; default each layer's recorded ``eps``.

    Returns:
        Dataset (step, neuron), float64:
        ``mean_shift`` = (bn_mean − running_mean) / √(running_var + eps) (in running sds),
        ``std_ratio`` = √(bn_std² + eps) / √(running_var + eps) (1 = same scale),
        ``running_mean``, ``running_var``; per neuron ``rms_mean_shift`` and
        ``rms_log_std_ratio`` over the window's valid steps. attrs: window, notes.
    """
    _check(ds, "batch_vs_running")
    pos, desc = _positions(ds, window)
    lo = int(pos[0])
    rm, rv, skipped = _replay(ds, int(pos[-1]) + 1, max(lo - 1, 0))
    if lo == 0:
        init_m = ds[S.RUNNING_MEAN0].values.astype(np.float64)
        init_v = ds[S.RUNNING_VAR0].values.astype(np.float64)
        nan = np.isnan(rm[0])
        rm = np.vstack([np.where(nan, np.nan, init_m), rm])
        rv = np.vstack([np.where(nan, np.nan, init_v), rv])
    before_m, before_v = rm[pos - lo], rv[pos - lo]
    eps_n = _eps(ds) if eps is None else np.full(ds.sizes[S.NEURON], float(eps))
    part = ds.isel({S.STEP: pos})
    ok = (part[S.COUNT].values > 0)
    bm = np.where(ok, part[S.BN_MEAN].values.astype(np.float64), np.nan)
    bs = np.where(ok, part[S.BN_STD].values.astype(np.float64), np.nan)
    with quiet():
        shift = (bm - before_m) / np.sqrt(before_v + eps_n)
        ratio = np.sqrt(bs ** 2 + eps_n) / np.sqrt(before_v + eps_n)
        rms_shift = np.sqrt(np.nanmean(shift ** 2, 0))
        rms_log = np.sqrt(np.nanmean(np.log(ratio) ** 2, 0))
    dims = (S.STEP, S.NEURON)
    out = xr.Dataset(
        {"mean_shift": (dims, shift), "std_ratio": (dims, ratio),
         "running_mean": (dims, before_m), "running_var": (dims, before_v),
         "rms_mean_shift": ((S.NEURON,), rms_shift), "rms_log_std_ratio": ((S.NEURON,), rms_log)},
        coords={**{k: v for k, v in ds.coords.items() if v.dims == (S.NEURON,)},
                S.STEP: ds[S.STEP].values[pos]})
    out.attrs = {"window": desc, NOTES: _notes(skipped)}
    return out


def _eps(ds: xr.Dataset) -> np.ndarray:
    lay = np.asarray(ds[S.LAYER].values)
    eps = np.zeros(lay.size)
    for name, rec in probe_records(ds).items():
        eps[lay == name] = float((rec.get("norm") or {}).get("eps") or 0.0)
    return eps


def _notes(skipped: list[tuple[str, str]]) -> list[str]:
    return [f"no running statistics for {name} (NaN): {reason}" for name, reason in skipped]
