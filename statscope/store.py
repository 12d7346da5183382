"""Run stores: locate, open and stack the zarr v3 stores that probes write.

One run is one zarr v3 group, on disk or at any fsspec URL. :func:`open_run` turns it into the
Dataset described in :mod:`statscope.schema`; :func:`open_runs` stacks several along ``run``.
Readers trust the commit marker ``n_steps``: rows past it may be half written and are never shown,
so a store opened while a run writes it, or after the writer was killed, shows a consistent prefix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StoreError

__all__ = ["ProbeInfo", "Layout", "open_run", "open_runs", "find_runs", "is_run", "read_attrs",
           "zarr_store"]


@dataclass(frozen=True)
class ProbeInfo:
    """One probed tensor: a module's input or output.

    Attributes:
        name: the value of the ``layer`` coordinate (the module's qualified name, with
            ``schema.INPUT_SUFFIX``/``OUTPUT_SUFFIX`` when the module is probed at both ends).
        module: qualified name from ``named_modules()``.
        type: the module's class name, e.g. ``"BatchNorm1d"``.
        where: ``"input"`` or ``"output"``.
        channel_dim: dimension of the probed tensor that holds the channels (negative = from end).
        channels: number of channels (neurons) of this probe.
        groups: number of EN groups; channels must be divisible by it.
        norm: for a probed norm layer, what rebuilding its running statistics needs
            (``momentum``, ``eps``, ``track_running_stats``, ``num_batches_tracked``), else None.
    """

    name: str
    module: str
    type: str
    where: str
    channel_dim: int
    channels: int
    groups: int = 1
    norm: Mapping[str, Any] | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """The neuron layout of a run: its probes in store order and the statistics recorded."""

    probes: tuple[ProbeInfo, ...]
    stats: tuple[str, ...] = S.DEFAULT_STATS

    @property
    def n_neurons(self) -> int:
        return sum(p.channels for p in self.probes)

    @property
    def n_groups(self) -> int:
        return sum(p.groups for p in self.probes)

    @property
    def neuron_stats(self) -> tuple[str, ...]:
        return tuple(s for s in self.stats if s not in S.PER_GROUP_STATS)

    @property
    def group_stats(self) -> tuple[str, ...]:
        return tuple(s for s in self.stats if s in S.PER_GROUP_STATS)

    def neuron_index(self) -> dict[str, np.ndarray]:
        """Per-neuron arrays: probe index, unit in probe, global EN-group column, group in probe."""
        probe, unit, gcol, glocal = [], [], [], []
        g0 = 0
        for i, p in enumerate(self.probes):
            per = p.channels // p.groups
            local = np.arange(p.channels) // per
            probe.append(np.full(p.channels, i, np.int32))
            unit.append(np.arange(p.channels, dtype=np.int32))
            glocal.append(local.astype(np.int32))
            gcol.append((g0 + local).astype(np.int32))
            g0 += p.groups
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32))
        return {"probe": cat(probe), "unit": cat(unit), "group_column": cat(gcol),
                "group": cat(glocal)}

    def same_neurons(self, other: "Layout") -> bool:
        """True when both record the same statistics of the same channels in the same order."""
        key = (lambda lay: ([(p.name, p.module, p.where, p.channels, p.groups) for p in lay.probes],
                            lay.stats))
        return key(self) == key(other)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "Layout":
        probes = tuple(ProbeInfo(**p) for p in attrs[S.ATTR_PROBES])
        return cls(probes=probes, stats=tuple(attrs[S.ATTR_STATS]))


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def zarr_store(path: str | os.PathLike, *, read_only: bool = True):
    """Return the zarr store for a local path or an fsspec URL (``s3://``, ``memory://``, ...)."""
    from zarr.storage import FsspecStore, LocalStore

    path = os.fspath(path)
    if _is_url(path):
        return FsspecStore.from_url(path, read_only=read_only)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return LocalStore(path, read_only=read_only)


def read_attrs(path: str | os.PathLike) -> dict:
    """Return a run's root attributes, checking that it is a statscope run of a known format.

    Raises:
        StoreError: the path does not exist, is not a statscope run, or has an unknown format.
    """
    return _open_checked(path)[1]


def _open_checked(path: str | os.PathLike):
    """The run's root group (read only) and its attributes, checked as :func:`read_attrs` says."""
    import zarr

    path = os.fspath(path)
    if not _is_url(path) and not Path(path.removeprefix("file://")).exists():
        raise StoreError(f"path={path!r}: no such file or directory")
    try:
        group = zarr.open_group(zarr_store(path), mode="r", zarr_format=3)
    except Exception as exc:  # zarr raises several types for a non-store
        raise StoreError(f"path={path!r}: not a statscope run (no zarr v3 group: {exc})") from None
    attrs = dict(group.attrs)
    version = attrs.get(S.ATTR_FORMAT)
    if version is None:
        raise StoreError(f"path={path!r}: not a statscope run (no {S.ATTR_FORMAT!r} attribute)")
    if not isinstance(version, int) or version > S.FORMAT_VERSION or version < 1:
        raise StoreError(f"path={path!r}: store format version {version!r} is unknown; this "
                         f"statscope reads versions 1..{S.FORMAT_VERSION}")
    return group, attrs


def is_run(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a statscope run of a format this version reads."""
    try:
        read_attrs(path)
    except StoreError:
        return False
    return True


def find_runs(root: str | os.PathLike) -> list[str]:
    """Return the runs at ``root``: the root itself if it is a run, else its run subfolders, sorted.

    Only local folders are searched; a URL must name a run.
    """
    root = os.fspath(root)
    if _is_url(root) or is_run(root):
        return [root]
    base = Path(root.removeprefix("file://"))
    if not base.is_dir():
        raise StoreError(f"path={root!r}: no such directory")
    return sorted(str(p) for p in base.iterdir() if p.is_dir() and (p / "zarr.json").exists()
                  and is_run(p))


def open_run(path: str | os.PathLike, *, chunks: Mapping[str, int] | None = None):
    """Open one run as a lazy, chunked ``xarray.Dataset`` in the schema of :mod:`statscope.schema`.

    Args:
        path: a run folder or an fsspec URL.
        chunks: dask chunks; default the store's own chunks.

    Returns:
        Dataset with dims (step, neuron): ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``,
        ``count`` (and ``bn_kurt`` when recorded), float32 except ``count`` (int64); scalars
        (step,); coords ``step``, ``layer``, ``unit``, ``group``; the run's attrs.

    Raises:
        StoreError: not a run, or a format this version does not read.

    Example:
        >>> ds = open_run("runs/demo")  # doctest: +SKIP
        >>> ds.bn_std.sel(step=slice(0, 10))  # doctest: +SKIP
    """
    import dask.array as da
    import xarray as xr

    group, attrs = _open_checked(path)
    layout = Layout.from_attrs(attrs)
    idx = layout.neuron_index()
    # Arrays are read one by one, each cut at the commit marker: a writer killed between
    # resizing two arrays leaves them of different lengths, and only the committed rows count.
    n = min(int(attrs.get(S.ATTR_N_STEPS, 0)), group[S.STEP].shape[0])

    def steps(name):
        arr = group[name]
        return da.from_zarr(arr, chunks=_chunks(arr, chunks))[:n]

    per_step = (S.STEP, S.NEURON)
    data = {s: (per_step, steps(s)) for s in layout.neuron_stats}
    data.update({s: (per_step, _expand(steps(s), idx["group_column"])) for s in layout.group_stats})
    data[S.COUNT] = (per_step, _expand(steps(S.COUNT), idx["probe"]))
    for name in attrs.get(S.ATTR_SCALARS, []):
        data[name] = ((S.STEP,), steps(name))
    for name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
        if name in group:
            data[name] = ((S.NEURON,), group[name][:])
    names = np.array([p.name for p in layout.probes], dtype=object)
    ds = xr.Dataset(
        data,
        coords={
            S.STEP: group[S.STEP][:n].astype(np.int64),
            S.NEURON: np.arange(layout.n_neurons),
            S.LAYER: (S.NEURON, names[idx["probe"]].astype(str)),
            S.UNIT: (S.NEURON, idx["unit"].astype(np.int64)),
            S.GROUP: (S.NEURON, idx["group"].astype(np.int64)),
        },
        attrs=attrs,
    )
    return ds


def _expand(columns, index: np.ndarray):
    """``columns[:, index]`` chunk by chunk: one task per step chunk, not one per column."""
    whole = columns.rechunk({1: -1})
    return whole.map_blocks(lambda block: block[:, index], dtype=columns.dtype,
                            chunks=(whole.chunks[0], (len(index),)))


def _chunks(arr, chunks: Mapping[str, int] | None) -> tuple[int, ...]:
    names = arr.metadata.dimension_names
    return tuple((chunks or {}).get(d, c) for d, c in zip(names, arr.chunks))


def open_runs(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike]):
    """Open several runs stacked along a leading ``run`` dimension.

    Args:
        paths_or_dir: a folder of runs, or an iterable of run paths.

    Returns:
        Dataset (run, step, neuron). Coords ``run`` (the run's folder name), and per run
        ``n_steps``, ``status`` and each of ``schema.META_KEYS`` present in any run's meta.
        Runs are outer-aligned on ``step``: past a run's end its statistics are NaN and its
        ``count`` is 0.

    Raises:
        StoreError: no runs found, or runs whose neuron layouts differ.
    """
    import xarray as xr

    if isinstance(paths_or_dir, (str, os.PathLike)):
        paths = find_runs(paths_or_dir)
    else:
        paths = [os.fspath(p) for p in paths_or_dir]
    if not paths:
        raise StoreError(f"paths_or_dir={os.fspath(paths_or_dir)!r}: no statscope runs found"
                         if isinstance(paths_or_dir, (str, os.PathLike))
                         else "paths_or_dir=[]: no runs given")
    runs = [open_run(p) for p in paths]
    ref = runs[0]
    for p, ds in zip(paths[1:], runs[1:]):
        if (ds.sizes[S.NEURON] != ref.sizes[S.NEURON]
                or not np.array_equal(ds[S.LAYER].values, ref[S.LAYER].values)):
            raise StoreError(
                f"paths_or_dir: run {p!r} has layers {_layer_list(ds)}, but {paths[0]!r} has "
                f"{_layer_list(ref)}; only runs with the same layers can be stacked")
    names = _run_names(paths)
    metas = [ds.attrs.get(S.ATTR_META, {}) or {} for ds in runs]
    keys = [k for k in S.META_KEYS if any(k in m for m in metas)]
    fill = {S.COUNT: 0}
    stacked = xr.concat([ds.drop_attrs() for ds in runs], dim=S.RUN, join="outer",
                        fill_value=fill, coords="minimal", compat="override",
                        combine_attrs="drop")
    coords = {S.RUN: names,
              S.ATTR_N_STEPS: (S.RUN, [int(ds.attrs.get(S.ATTR_N_STEPS, 0)) for ds in runs]),
              S.ATTR_STATUS: (S.RUN, [str(ds.attrs.get(S.ATTR_STATUS)) for ds in runs])}
    for k in keys:
        coords[k] = (S.RUN, [m.get(k) for m in metas])
    stacked = stacked.assign_coords(coords)
    stacked.attrs = {S.ATTR_PROBES: ref.attrs[S.ATTR_PROBES], S.ATTR_LAYERS: ref.attrs[S.ATTR_LAYERS],
                     "runs": {n: dict(ds.attrs) for n, ds in zip(names, runs)}}
    return stacked


def _layer_list(ds) -> list[str]:
    return list(dict.fromkeys(ds[S.LAYER].values.tolist()))


def _run_names(paths: Sequence[str]) -> list[str]:
    names = [Path(p.rstrip("/")).name or p for p in paths]
    if len(set(names)) == len(names):
        return names
    return [p.rstrip("/") for p in paths]
