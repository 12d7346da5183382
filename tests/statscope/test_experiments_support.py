"""Helpers for the experiment and ``statscope run`` tests: tiny datasets on disk, store reading.

(Named ``test_*`` only so that it sits with the tests it serves; it holds no tests.)
"""

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import zarr

from statscope import schema as S


def idx_bytes(array):
    """An IDX file holding a uint8 array."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=64, n_test=20, seed=0):
    """A small MNIST-format folder of random digits; returns (train_x, train_y, test_x, test_y)."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_test, dtype=np.uint8))
    os.makedirs(folder, exist_ok=True)
    for stem, array in zip(("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), arrays):
        with open(os.path.join(folder, stem), "wb") as handle:
            handle.write(idx_bytes(array))
    return arrays


def write_cifar(folder, per_batch=8, seed=0):
    """A CIFAR-10 python-format folder with ``per_batch`` random images in each of six batches."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        record = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                  b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(record, handle, protocol=2)


def raw_arrays(path):
    """Every array of a store as raw bytes, up to its commit marker, keyed by name (the window
    summaries as ``windows/<name>``, up to ``n_windows``)."""
    group = zarr.open_group(path, mode="r")
    n = int(group.attrs[S.ATTR_N_STEPS])
    out = {}
    for name, array in group.arrays():
        data = array[:]
        if array.ndim and array.shape[0] >= n and name not in (S.RUNNING_MEAN0, S.RUNNING_VAR0,
                                                              S.NEURON_PROBE, S.NEURON_UNIT,
                                                              S.NEURON_GROUP):
            data = data[:n]
        out[name] = data.tobytes()
    if S.WINDOWS_GROUP in group:  # the window summaries, up to their own marker
        windows = int(group.attrs.get(S.ATTR_N_WINDOWS, 0))
        for name, array in group[S.WINDOWS_GROUP].arrays():
            out[f"{S.WINDOWS_GROUP}/{name}"] = array[:windows].tobytes()
    return out


def offline_env(tmp_path, monkeypatch=None):
    """Environment that keeps the dataset search inside ``tmp_path`` and downloads failing fast."""
    env = {"STATSCOPE_CACHE": str(tmp_path / "cache"),
           "STATSCOPE_MNIST_URL": "http://127.0.0.1:9/",
           "STATSCOPE_FASHION_MNIST_URL": "http://127.0.0.1:9/",
           "STATSCOPE_CIFAR10_URL": "http://127.0.0.1:9/"}
    if monkeypatch is not None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("STATSCOPE_DATA", raising=False)
    return env


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended and waiting to be reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
