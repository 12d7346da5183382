"""Synthetic runs in the store schema for the dashboard tests (helpers; fixtures in conftest)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from statscope import schema as S


def synthetic_run(n_steps: int = 400, layers=(("fc1", 4), ("fc2", 4)), batch_size: int = 8,
                  seed: int = 0, groups: int = 2, status: str = S.STATUS_COMPLETED) -> xr.Dataset:
    """A run whose statistics are known noise around per-neuron offsets; EN has ``groups`` groups."""
    rng = np.random.default_rng(seed)
    t = n_steps
    cols = {k: [] for k in (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)}
    layer, unit, group = [], [], []
    for li, (name, c) in enumerate(layers):
        scale = 1.0 / np.sqrt(batch_size) / (li + 1)
        cols[S.BN_MEAN].append(np.arange(c) + scale * rng.normal(size=(t, c)))
        cols[S.BN_STD].append(1 + np.arange(c) + 2 * scale * rng.normal(size=(t, c)))
        g = np.arange(c) * groups // c
        en_m = 0.2 * scale * rng.normal(size=(t, groups))
        en_s = 1 + 0.2 * scale * rng.normal(size=(t, groups))
        cols[S.EN_MEAN].append(en_m[:, g])
        cols[S.EN_STD].append(en_s[:, g])
        layer += [name] * c
        unit += list(range(c))
        group += g.tolist()
    dims = (S.STEP, S.NEURON)
    data = {k: (dims, np.concatenate(v, 1).astype(np.float32)) for k, v in cols.items()}
    data[S.COUNT] = (dims, np.full((t, len(layer)), batch_size, np.int64))
    data["loss"] = ((S.STEP,), np.exp(-np.arange(t) / t).astype(np.float32))
    probes = [{"name": n, "module": n, "type": "BatchNorm1d", "where": "input", "channel_dim": 1,
               "channels": c, "groups": groups, "norm": None} for n, c in layers]
    return xr.Dataset(
        data,
        coords={S.STEP: np.arange(t, dtype=np.int64), S.NEURON: np.arange(len(layer)),
                S.LAYER: (S.NEURON, layer), S.UNIT: (S.NEURON, unit),
                S.GROUP: (S.NEURON, group)},
        attrs={S.ATTR_STATUS: status, S.ATTR_N_STEPS: t, S.ATTR_LAST_STEP: t - 1,
               S.ATTR_META: {S.META_BATCH_SIZE: batch_size, S.META_SEED: seed,
                             S.META_LR: 0.1, S.META_EPOCHS: 1, S.META_DATASET: "synthetic"},
               S.ATTR_PROBES: probes, S.ATTR_LAYERS: [n for n, _ in layers],
               S.ATTR_SCALARS: ["loss"],
               S.ATTR_MODEL: "MLP", S.ATTR_PROBE_OVERHEAD: 0.031},
    )


def _write_run():
    try:
        from statscope.store import write_run
    except ImportError:  # the writer lives beside the store
        from statscope.writer import write_run
    return write_run


def write_synthetic(path, ds: xr.Dataset, *, status: str | None = None,
                    overwrite: bool = False) -> str:
    """Write a :func:`synthetic_run` Dataset as a real store with the store's own writer
    (``overwrite``: re-run into the folder of an earlier run, as ``--overwrite`` does)."""
    from statscope.store import ProbeInfo

    lay = ds[S.LAYER].values
    grp = ds[S.GROUP].values
    probes, cols = [], []
    for p in ds.attrs[S.ATTR_PROBES]:
        sel = lay == p["name"]
        groups = int(grp[sel].max()) + 1
        probes.append(ProbeInfo(name=p["name"], module=p["module"], type=p["type"],
                                where=p["where"], channel_dim=p["channel_dim"],
                                channels=int(sel.sum()), groups=groups))
        cols += [int(np.flatnonzero(sel & (grp == g))[0]) for g in range(groups)]
    data = {s: ds[s].values for s in (S.BN_MEAN, S.BN_STD)}
    data.update({s: ds[s].values[:, cols] for s in (S.EN_MEAN, S.EN_STD)})
    count = ds[S.COUNT].values[:, [int(np.flatnonzero(lay == p.name)[0]) for p in probes]]
    attrs = {k: v for k, v in ds.attrs.items()
             if k in (S.ATTR_MODEL, S.ATTR_PROBE_OVERHEAD)}
    return _write_run()(path, probes, data, steps=ds[S.STEP].values, count=count,
                        scalars={"loss": ds["loss"].values}, meta=ds.attrs[S.ATTR_META],
                        status=status or ds.attrs[S.ATTR_STATUS], overwrite=overwrite, **attrs)


class LiveRun:
    """A run being written step by step with the store's own writer, as during training."""

    def __init__(self, path, layers=(("fc1", 4),), seed: int = 0):
        from statscope.store import Layout, ProbeInfo
        try:
            from statscope.store import RunWriter
        except ImportError:
            from statscope.writer import RunWriter

        probes = tuple(ProbeInfo(name=n, module=n, type="BatchNorm1d", where="input",
                                 channel_dim=1, channels=c, groups=1) for n, c in layers)
        self.n_neurons = sum(c for _, c in layers)
        self.n_probes = len(probes)
        self.writer = RunWriter(path, Layout(probes=probes), flush_seconds=0,
                                attrs={S.ATTR_META: {S.META_BATCH_SIZE: 8}})
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def append(self, k: int) -> dict[str, np.ndarray]:
        """Write ``k`` more steps and commit them; return what was written."""
        n, g = self.n_neurons, self.n_probes
        stats = {S.BN_MEAN: self.rng.normal(size=(k, n)).astype(np.float32),
                 S.BN_STD: (1 + self.rng.random((k, n))).astype(np.float32),
                 S.EN_MEAN: self.rng.normal(size=(k, g)).astype(np.float32),
                 S.EN_STD: (1 + self.rng.random((k, g))).astype(np.float32)}
        self.writer.append(np.arange(self.steps, self.steps + k), np.full((k, g), 8), stats)
        self.writer.flush()
        self.steps += k
        return stats

    def close(self) -> None:
        """Mark the run completed."""
        self.writer.close()


_DTYPES = {"f4": np.float32, "f8": np.float64, "i1": np.int8, "i2": np.int16, "i4": np.int32,
           "u1": np.uint8, "u2": np.uint16, "u4": np.uint32}


def decode(value):
    """A figure dict as the browser gets it, with typed arrays decoded back into numpy arrays."""
    import base64

    if isinstance(value, dict) and set(value) >= {"dtype", "bdata"}:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), _DTYPES[value["dtype"]])
        if "shape" in value:
            arr = arr.reshape([int(n) for n in value["shape"].split(",")])
        return arr
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def figure(spec):
    """A callback's figure dict as a validated ``plotly.graph_objects.Figure``: it fails on any
    property plotly.js would not know."""
    import plotly.graph_objects as go

    return go.Figure(decode(spec))


def distributed_run(path, n_steps: int = 400, layers=(("fc1", 4), ("fc2", 4)),
                    batches=(3, 5), seed: int = 0) -> dict:
    """A distributed run written as ``path/rank{r}`` stores by ``statscope.writer.write_run``
    (as DDP ranks write them, with window summaries of 200 steps), from raw batches.

    Rank ``r`` sees ``batches[r]`` examples per step; its store holds the per-channel mean and
    population std of its own batch (EN: over all of a layer's channels), as DDP ranks record.

    Returns:
        ``{"x": [per rank (steps, batch, neurons) float64], "layers": [...], "batches": ...}``:
        the raw batches, from which tests compute the merged statistics independently (numpy
        over the concatenated batches).
    """
    from statscope.store import ProbeInfo
    from statscope.writer import write_run

    rng = np.random.default_rng(seed)
    n = sum(c for _, c in layers)
    offsets = rng.normal(size=n)
    scales = 1 + rng.random(n)
    drift = np.cumsum(rng.normal(0, 0.01, (n_steps, 1, n)), axis=0)
    xs = [offsets + drift + scales * rng.normal(size=(n_steps, b, n)) * (1 + 0.2 * r)
          for r, b in enumerate(batches)]
    probes = tuple(ProbeInfo(name=name, module=name, type="BatchNorm1d", where="input",
                             channel_dim=1, channels=c) for name, c in layers)
    cuts = np.cumsum([0] + [c for _, c in layers])
    for r, x in enumerate(xs):
        en = [x[:, :, a:b].reshape(n_steps, -1) for a, b in zip(cuts[:-1], cuts[1:])]
        stats = {S.BN_MEAN: x.mean(1).astype(np.float32), S.BN_STD: x.std(1).astype(np.float32),
                 S.EN_MEAN: np.stack([e.mean(1) for e in en], 1).astype(np.float32),
                 S.EN_STD: np.stack([e.std(1) for e in en], 1).astype(np.float32)}
        write_run(f"{path}/rank{r}", probes, stats,
                  count=np.full((n_steps, len(layers)), batches[r]),
                  scalars={"loss": np.full(n_steps, 1.0 + r)},
                  meta={S.META_BATCH_SIZE: int(batches[r])}, rank=r, world_size=len(batches))
    return {"x": xs, "layers": layers, "batches": tuple(batches)}


def merged_reference(raw: dict) -> dict[str, np.ndarray]:
    """The merged statistics of :func:`distributed_run`'s batches, straight from the
    concatenated raw values: (steps, neurons) each."""
    x = np.concatenate(raw["x"], axis=1)
    cuts = np.cumsum([0] + [c for _, c in raw["layers"]])
    en_m = np.concatenate([np.repeat(x[:, :, a:b].reshape(len(x), -1).mean(1)[:, None], b - a, 1)
                           for a, b in zip(cuts[:-1], cuts[1:])], 1)
    en_s = np.concatenate([np.repeat(x[:, :, a:b].reshape(len(x), -1).std(1)[:, None], b - a, 1)
                           for a, b in zip(cuts[:-1], cuts[1:])], 1)
    return {S.BN_MEAN: x.mean(1), S.BN_STD: x.std(1), S.EN_MEAN: en_m, S.EN_STD: en_s}


_WRITER = """
import sys, time
sys.path.insert(0, {here!r})
from dashboard_fixtures import LiveRun
live = LiveRun(sys.argv[1])
if int(sys.argv[2]):
    live.append(int(sys.argv[2]))
print("ready", flush=True)
time.sleep(600)
"""


def start_writer(path, steps: int):
    """A process writing the run at ``path`` with the store's writer (``steps`` committed),
    then idling as training does between commits; returned once the run is on disk.

    Raises:
        RuntimeError: the process did not get there within two minutes.
    """
    import select
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(here=here), str(path),
                             str(steps)], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    if not ready or proc.stdout.readline().strip() != "ready":
        kill_writer(proc)
        raise RuntimeError("the writer process did not start")
    return proc


def kill_writer(proc) -> None:
    """``kill -9`` a process from :func:`start_writer` and reap it (a zombie's pid would still
    look alive)."""
    import signal

    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if proc.stdout is not None:
        proc.stdout.close()
