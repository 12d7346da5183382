"""Synthetic runs in the store schema, generated from known distributions.

Every batch is drawn explicitly (N elements per channel) and its statistics are computed with
numpy exactly as the probes define them (population std, non-excess kurtosis, EN pooled over the
group's channels and the batch), so the analyses can be checked against closed forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from statscope import schema as S


@dataclass(frozen=True)
class Layer:
    """How one synthetic layer's activations are drawn at each step.

    x[t, n, c] = offset[c] + sigma[c] * scale_t * (z[t, n, c] + jitter_t),
    z i.i.d. from ``dist`` with unit variance; scale_t = exp(scale_jitter * g_t), jitter_t =
    mean_jitter * g'_t with g, g' standard normal per step; drift adds drift * t / T to offsets.
    spread_jitter rescales each batch's deviations from its own mean by exp(spread_jitter * g''_t),
    which makes bn_std noisier without touching bn_mean.
    """

    name: str
    channels: int = 8
    sigma: tuple | float = 1.0
    offset: tuple | float = 0.0
    groups: int = 1
    dist: str = "normal"
    scale_jitter: float = 0.0
    mean_jitter: float = 0.0
    drift: float = 0.0
    spread_jitter: float = 0.0


def _draw(rng, dist, size):
    if dist == "normal":
        return rng.standard_normal(size)
    if dist == "laplace":  # kurtosis 6
        return rng.laplace(size=size) / np.sqrt(2.0)
    if dist == "t6":  # kurtosis 3 + 6/(6-4) = 6
        return rng.standard_t(6, size=size) / np.sqrt(6 / 4)
    raise ValueError(dist)


KURTOSIS = {"normal": 3.0, "laplace": 6.0, "t6": 6.0}


def spread_jitter_draw(rng, size, n_steps):
    return size * rng.standard_normal((n_steps, 1, 1)) if size else np.zeros((n_steps, 1, 1))


def batch_stats(x: np.ndarray, groups: int) -> dict[str, np.ndarray]:
    """Statistics of batches x (T, N, C) as probes record them: (T, C) each."""
    t, n, c = x.shape
    m = x.mean(1)
    sd = x.std(1)
    kurt = ((x - m[:, None]) ** 4).mean(1) / sd ** 4
    g = x.reshape(t, n, groups, c // groups)
    em = np.repeat(g.mean((1, 3)), c // groups, axis=1)
    es = np.repeat(g.std((1, 3)), c // groups, axis=1)
    return {S.BN_MEAN: m, S.BN_STD: sd, S.BN_KURT: kurt, S.EN_MEAN: em, S.EN_STD: es}


def make_run(layers=(Layer("fc1"), Layer("fc2")), *, n_steps=300, batch_size=16, seed=0,
             kurt=True, step0=0, norm=None, running0=None, return_batches=False):
    """A run Dataset (step, neuron) in the schema, drawn from the layers' distributions."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in (*S.DEFAULT_STATS, S.BN_KURT)}
    layer, unit, group, probes, batches = [], [], [], [], []
    for spec in layers:
        c = spec.channels
        sig = np.broadcast_to(np.asarray(spec.sigma, float), (c,))
        off = np.broadcast_to(np.asarray(spec.offset, float), (c,))
        z = _draw(rng, spec.dist, (n_steps, batch_size, c))
        jit = spec.mean_jitter * rng.standard_normal((n_steps, 1, 1))
        scale = np.exp(spec.scale_jitter * rng.standard_normal((n_steps, 1, 1)))
        trend = spec.drift * np.arange(n_steps)[:, None, None] / n_steps
        spread = np.exp(spread_jitter_draw(rng, spec.spread_jitter, n_steps))
        zbar = z.mean(1, keepdims=True)
        z = zbar + spread * (z - zbar)
        x = off + trend + sig * scale * (z + jit)
        batches.append(x)
        for k, v in batch_stats(x, spec.groups).items():
            cols[k].append(v)
        layer += [spec.name] * c
        unit += list(range(c))
        group += list(np.repeat(np.arange(spec.groups), c // spec.groups))
        probes.append({"name": spec.name, "module": spec.name, "type": "BatchNorm1d",
                       "where": "input", "channel_dim": 1, "channels": c, "groups": spec.groups,
                       "norm": norm})
    dims = (S.STEP, S.NEURON)
    names = [*S.DEFAULT_STATS] + ([S.BN_KURT] if kurt else [])
    data = {k: (dims, np.concatenate(cols[k], 1).astype(np.float32)) for k in names}
    data[S.COUNT] = (dims, np.full((n_steps, len(layer)), batch_size, np.int64))
    if running0 is not None:
        data[S.RUNNING_MEAN0] = ((S.NEURON,), np.asarray(running0[0], np.float32))
        data[S.RUNNING_VAR0] = ((S.NEURON,), np.asarray(running0[1], np.float32))
    ds = xr.Dataset(
        data,
        coords={S.STEP: np.arange(step0, step0 + n_steps, dtype=np.int64),
                S.LAYER: (S.NEURON, layer), S.UNIT: (S.NEURON, unit),
                S.GROUP: (S.NEURON, group)},
        attrs={S.ATTR_PROBES: probes, S.ATTR_LAYERS: [p["name"] for p in probes],
               S.ATTR_META: {S.META_BATCH_SIZE: batch_size, S.META_SEED: seed},
               S.ATTR_STATUS: S.STATUS_COMPLETED, S.ATTR_N_STEPS: n_steps},
    )
    return (ds, batches) if return_batches else ds


def stack(runs: dict[str, xr.Dataset]) -> xr.Dataset:
    """Stack in-memory runs as open_runs does: outer-aligned on step, count 0 past a run's end."""
    names = list(runs)
    metas = [r.attrs[S.ATTR_META] for r in runs.values()]
    out = xr.concat([r.drop_attrs() for r in runs.values()], dim=S.RUN, join="outer",
                    fill_value={S.COUNT: 0}, coords="minimal", compat="override",
                    combine_attrs="drop")
    coords = {S.RUN: names,
              S.META_BATCH_SIZE: (S.RUN, [m[S.META_BATCH_SIZE] for m in metas]),
              S.ATTR_N_STEPS: (S.RUN, [r.sizes[S.STEP] for r in runs.values()])}
    out = out.assign_coords(coords)
    first = next(iter(runs.values()))
    out.attrs = {S.ATTR_PROBES: first.attrs[S.ATTR_PROBES],
                 S.ATTR_LAYERS: first.attrs[S.ATTR_LAYERS],
                 "runs": {n: dict(r.attrs) for n, r in runs.items()}}
    return out


def to_store(ds: xr.Dataset, path, *, units=None, **attrs) -> str:
    """Write an in-memory single run to a real store on disk with statscope.writer.write_run.

    ``units``: layer -> the channels whose per-step columns are kept (window summaries keep
    all); ``attrs``: more root attributes (``rank``, ``world_size``, ``every``, ...)."""
    import dataclasses

    from statscope.store import ProbeInfo
    from statscope.writer import write_run

    probes = [ProbeInfo(**p) for p in ds.attrs[S.ATTR_PROBES]]
    if units:
        probes = [dataclasses.replace(p, units=tuple(units[p.name])) if p.name in units else p
                  for p in probes]
    data = {}
    first_of_group = np.flatnonzero(
        np.r_[True, (np.diff(ds[S.GROUP].values) != 0)
              | (ds[S.LAYER].values[1:] != ds[S.LAYER].values[:-1])])
    for s in (S.BN_MEAN, S.BN_STD, S.BN_KURT):
        if s in ds:
            data[s] = ds[s].values
    for s in (S.EN_MEAN, S.EN_STD):
        data[s] = ds[s].values[:, first_of_group]
    first_of_probe = np.flatnonzero(np.r_[True, ds[S.LAYER].values[1:] != ds[S.LAYER].values[:-1]])
    return write_run(path, probes, data, steps=ds[S.STEP].values,
                     count=ds[S.COUNT].values[:, first_of_probe], meta=ds.attrs[S.ATTR_META],
                     **attrs)
