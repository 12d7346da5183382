"""A tiny synthetic run in the store schema, for doctests and examples (private)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S


def demo_run(n_steps: int = 300, layers=(("fc1", 8), ("fc2", 8)), batch_size: int = 16,
             seed: int = 0) -> xr.Dataset:
    """A run whose neurons see i.i.d. Gaussian batches; EN pools the whole layer (one group).

    Returns:
        Dataset (step, neuron) with bn_mean, bn_std, en_mean, en_std, bn_kurt, count.
    """
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD, S.BN_KURT)}
    layer, unit = [], []
    probes = []
    for name, c in layers:
        x = rng.normal(size=(n_steps, batch_size, c)) * (1 + np.arange(c)) + np.arange(c)
        m = x.mean(1)
        sd = x.std(1)
        cols[S.BN_MEAN].append(m)
        cols[S.BN_STD].append(sd)
        cols[S.BN_KURT].append(((x - m[:, None]) ** 4).mean(1) / sd ** 4)
        flat = x.reshape(n_steps, -1)
        cols[S.EN_MEAN].append(np.repeat(flat.mean(1, keepdims=True), c, 1))
        cols[S.EN_STD].append(np.repeat(flat.std(1, keepdims=True), c, 1))
        layer += [name] * c
        unit += list(range(c))
        probes.append({"name": name, "module": name, "type": "BatchNorm1d", "where": "input",
                       "channel_dim": 1, "channels": c, "groups": 1, "norm": None})
    dims = (S.STEP, S.NEURON)
    data = {k: (dims, np.concatenate(v, 1).astype(np.float32)) for k, v in cols.items()}
    data[S.COUNT] = (dims, np.full((n_steps, len(layer)), batch_size, np.int64))
    return xr.Dataset(
        data,
        coords={S.STEP: np.arange(n_steps, dtype=np.int64), S.LAYER: (S.NEURON, layer),
                S.UNIT: (S.NEURON, unit), S.GROUP: (S.NEURON, [0] * len(layer))},
        attrs={S.ATTR_PROBES: probes, S.ATTR_LAYERS: [n for n, _ in layers],
               S.ATTR_META: {S.META_BATCH_SIZE: batch_size}, S.ATTR_STATUS: S.STATUS_COMPLETED},
    )


def demo_ranks(n_ranks: int = 2, n_steps: int = 300, layers=(("fc1", 8), ("fc2", 8)),
               batch_size: int = 16, seed: int = 0) -> xr.Dataset:
    """A distributed run: ``n_ranks`` ranks each drawing their own Gaussian batches.

    Returns:
        Dataset (rank, step, neuron), as ``open_run`` shows a folder of per-rank runs.
    """
    runs = [demo_run(n_steps, layers, batch_size, seed + r) for r in range(n_ranks)]
    out = xr.concat(runs, dim=S.RANK, coords="minimal", compat="override",
                    combine_attrs="override")
    out = out.assign_coords({S.RANK: np.arange(n_ranks)})
    out.attrs = {**runs[0].attrs, S.ATTR_RANK: 0, S.ATTR_WORLD_SIZE: n_ranks}
    return out
