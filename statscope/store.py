"""Run stores: locate, open and stack the zarr v3 stores that probes write.

One run is one zarr v3 group, on disk or at any fsspec URL. :func:`open_run` turns it into the
Dataset described in :mod:`statscope.schema`; :func:`open_runs` stacks several along ``run``.
Readers trust the commit marker ``n_steps`` only after checking it: rows past it may be half
written and are never shown, so a store opened while a run writes it, or after the writer was
killed, shows a consistent prefix; missing or damaged data is a
:class:`~statscope.errors.StoreDamagedError` naming the array and steps, never fill values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StoreDamagedError, StoreError
from statscope.integrity import (CheckedArray, Damage, check_array, check_marker, missing_shards,
                                 shard_shape)
from statscope.storage import is_url, list_keys, local_path, zarr_store

__all__ = ["ProbeInfo", "Layout", "open_run", "open_runs", "find_runs", "is_run", "read_attrs",
           "check_marker", "verify_run", "zarr_store"]


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
        try:
            probes = tuple(ProbeInfo(**p) for p in attrs[S.ATTR_PROBES])
            return cls(probes=probes, stats=tuple(attrs[S.ATTR_STATS]))
        except (KeyError, TypeError) as exc:
            raise StoreDamagedError(f"attrs: the run's probe records are damaged ({exc!r})") \
                from None


def read_attrs(path: str | os.PathLike) -> dict:
    """Return a run's root attributes, checking that it is a statscope run of a known format.

    Raises:
        StoreError: the path does not exist, is not a statscope run, or has an unknown format.
        StoreDamagedError: its root metadata cannot be read.
    """
    return _open_checked(path)[1]


def _open_checked(path: str | os.PathLike):
    """The run's root group (read only) and its attributes, checked as :func:`read_attrs` says."""
    import zarr

    path = os.fspath(path)
    if not is_url(path):
        p = local_path(path)
        if not p.exists():
            raise StoreError(f"path={path!r}: no such file or directory")
        if not (p / "zarr.json").exists():
            raise StoreError(f"path={path!r}: not a statscope run (no zarr.json)")
    try:
        group = zarr.open_group(zarr_store(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
    except PermissionError as exc:
        raise StoreError(f"path={path!r}: permission denied ({exc.filename or path})") from None
    except StoreError:
        raise
    except Exception as exc:  # zarr raises several types for a non-store or damaged JSON
        kind = StoreDamagedError if not is_url(path) else StoreError
        raise kind(f"path={path!r}: not a readable statscope run (its root zarr.json: "
                   f"{type(exc).__name__}: {exc})") from None
    version = attrs.get(S.ATTR_FORMAT)
    if version is None:
        raise StoreError(f"path={path!r}: not a statscope run (no {S.ATTR_FORMAT!r} attribute)")
    if isinstance(version, bool) or version not in S.READABLE_FORMATS:
        raise StoreError(f"path={path!r}: store format version {version!r} is unknown; this "
                         f"statscope reads versions {list(S.READABLE_FORMATS)}")
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

    Only local folders are searched; a URL must name a run. A subfolder with a ``zarr.json`` that
    is not a readable run is left out here (``analyze`` and the dashboard name such folders).
    """
    root = os.fspath(root)
    if is_url(root) or is_run(root):
        return [root]
    base = local_path(root)
    if not base.is_dir():
        raise StoreError(f"path={root!r}: no such directory")
    return sorted(str(p) for p in base.iterdir() if p.is_dir() and (p / "zarr.json").exists()
                  and is_run(p))


# Variables' attributes in the Dataset, following the CF conventions' long_name/units.
_DESCRIBE = {
    S.BN_MEAN: ("BN mean", "activation units", "per-channel batch mean over N and positions"),
    S.BN_STD: ("BN std", "activation units",
               "per-channel batch standard deviation (population, ddof=0, no eps)"),
    S.EN_MEAN: ("EN mean", "activation units", "mean over the channels of the EN group, N and "
                "positions"),
    S.EN_STD: ("EN std", "activation units", "standard deviation over the EN group's channels, N "
               "and positions (population, ddof=0, no eps)"),
    S.BN_KURT: ("BN kurtosis", "1", "per-channel kurtosis m4/sigma^4 (3 for a Gaussian)"),
    S.COUNT: ("elements", "1", "elements each channel's statistics came from; 0: not run"),
}


def open_run(path: str | os.PathLike, *, chunks: Mapping[str, int] | None = None,
             damaged: str = "raise"):
    """Open one run as a lazy, chunked ``xarray.Dataset`` in the schema of :mod:`statscope.schema`.

    Args:
        path: a run folder or an fsspec URL.
        chunks: dask chunks by dimension name (``step``, ``neuron``), positive ints; default the
            store's shards.
        damaged: ``"raise"`` (default): missing data is an error. ``"mask"``: read every chunk
            now, and show missing or unreadable regions as NaN (``count`` 0), listed in the
            attribute ``damaged``.

    Returns:
        Dataset with dims (step, neuron): ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``,
        ``count`` (and ``bn_kurt`` when recorded), float32 except ``count`` (int64); scalars
        (step,); coords ``step``, ``layer``, ``unit``, ``group``, ``label``; the run's attrs.
        Every variable has ``long_name``, ``units`` and ``description`` attributes.

    Raises:
        StoreError: not a run, or a format this version does not read.
        StoreDamagedError: the commit marker, metadata or data below it is missing or damaged.

    Example:
        >>> ds = open_run("runs/demo")  # doctest: +SKIP
        >>> ds.bn_std.sel(step=slice(0, 10))  # doctest: +SKIP
    """
    import dask.array as da
    import xarray as xr

    import statscope.analyses.accessor  # noqa: F401  registers ds.statscope (see STYLE.md)

    if damaged not in ("raise", "mask"):
        raise StatscopeError(f"damaged={damaged!r}: expected 'raise' or 'mask'")
    _check_chunks(chunks)
    path = os.fspath(path)
    group, attrs = _open_checked(path)
    n = check_marker(path, attrs)
    layout = Layout.from_attrs(attrs)
    idx = layout.neuron_index()
    arrays = _arrays(path, group, attrs, layout, n)
    found = _verify(path, attrs, arrays, n) if damaged == "mask" else _missing(path, attrs, arrays, n)
    if any(d.array == S.STEP for d in found):
        raise StoreDamagedError(f"path={path!r}: the step array is damaged ("
                                + "; ".join(d.describe() for d in found if d.array == S.STEP)
                                + "): the rows cannot be placed")
    step = CheckedArray(path, S.STEP, arrays[S.STEP][0], n, None, -1)[:]
    if found and damaged == "raise":
        raise StoreDamagedError(f"path={path!r}: " + "; ".join(d.describe(step) for d in found[:5])
                                + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
                                + "; pass damaged='mask' to open_run to read the rest")

    def lazy(name, rows=n):
        arr, width, fill = arrays[name]
        checked = CheckedArray(path, name, arr, rows, width, fill,
                               [d for d in found if d.array == name])
        native = da.from_array(checked, chunks=shard_shape(arr)[:checked.ndim], asarray=False,
                               lock=False, name=f"statscope-{path}-{name}-{n}-{damaged}")
        return native.rechunk(_chunks(native, arr, chunks)) if chunks else native

    per_step = (S.STEP, S.NEURON)
    data = {s: (per_step, lazy(s)) for s in layout.neuron_stats}
    data.update({s: (per_step, _expand(lazy(s), idx["group_column"])) for s in layout.group_stats})
    data[S.COUNT] = (per_step, _expand(lazy(S.COUNT), idx["probe"]))
    for name in attrs.get(S.ATTR_SCALARS, []):
        data[name] = ((S.STEP,), lazy(name))
    for name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
        if name in arrays:
            data[name] = ((S.NEURON,), lazy(name, layout.n_neurons).compute())
    names = np.array([p.name for p in layout.probes], dtype=object)
    labels = [f"{p.name}[{u}]" for p in layout.probes for u in range(p.channels)]
    out_attrs = dict(attrs)
    if found:
        out_attrs[S.ATTR_DAMAGED] = [d.to_json() for d in found]
    ds = xr.Dataset(
        data,
        coords={
            S.STEP: step.astype(np.int64),
            S.NEURON: np.arange(layout.n_neurons),
            S.LAYER: (S.NEURON, names[idx["probe"]].astype(str)),
            S.UNIT: (S.NEURON, idx["unit"].astype(np.int64)),
            S.GROUP: (S.NEURON, idx["group"].astype(np.int64)),
            S.LABEL: (S.NEURON, np.array(labels, dtype=str)),
        },
        attrs=out_attrs,
    )
    for name, (long_name, units, description) in _DESCRIBE.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, units=units, description=description)
    for name in attrs.get(S.ATTR_SCALARS, []):
        ds[name].attrs.update(long_name=name, units="as logged",
                              description="scalar logged with Recorder.log; NaN where not logged")
    ds[S.STEP].attrs.update(long_name="training step", units="1")
    return ds


def _arrays(path: str, group, attrs, layout: Layout, n: int) -> dict[str, tuple[Any, Any, Any]]:
    """Every array the Dataset needs, checked against the attributes: name -> (array, width, fill)."""
    want = {S.STEP: (None, "int64", -1), S.COUNT: (len(layout.probes), "int64", 0)}
    want.update({s: (layout.n_neurons, "float32", np.nan) for s in layout.neuron_stats})
    want.update({s: (layout.n_groups, "float32", np.nan) for s in layout.group_stats})
    want.update({s: (None, "float64", np.nan) for s in attrs.get(S.ATTR_SCALARS, [])})
    out = {}
    for name, (width, dtype, fill) in want.items():
        out[name] = (_array(path, group, name), width, fill)
        check_array(path, name, out[name][0], rows=n, width=width, dtype=dtype)
    for name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
        try:
            arr = group[name]
        except KeyError:
            continue
        except Exception as exc:
            raise StoreDamagedError(f"path={path!r}: array {name!r} metadata cannot be read "
                                    f"({type(exc).__name__}: {exc})") from None
        check_array(path, name, arr, rows=layout.n_neurons, width=None, dtype="float32")
        out[name] = (arr, None, np.nan)
    return out


def _array(path: str, group, name: str):
    try:
        return group[name]
    except KeyError:
        raise StoreDamagedError(f"path={path!r}: array {name!r} is named by the run's "
                                "attributes but missing") from None
    except Exception as exc:  # damaged zarr.json of the array
        raise StoreDamagedError(f"path={path!r}: array {name!r} metadata cannot be read "
                                f"({type(exc).__name__}: {exc})") from None


def _missing(path: str, attrs, arrays, n: int) -> list[Damage]:
    if attrs.get(S.ATTR_FORMAT, 1) < 2:
        return []  # format 1 left all-fill chunks unwritten: absence is not damage there
    try:
        keys = list_keys(path)
    except OSError as exc:
        raise StoreError(f"path={path!r}: cannot list the run ({exc})") from None
    out = []
    for name, (arr, width, _) in arrays.items():
        rows = n if name not in (S.RUNNING_MEAN0, S.RUNNING_VAR0) else arr.shape[0]
        out += missing_shards(name, arr, rows, width, keys)
    return out


def verify_run(path: str | os.PathLike) -> list[Damage]:
    """Read every committed chunk of a run and list what is missing or damaged.

    Args:
        path: a run folder or URL.

    Returns:
        The damaged regions, empty when the run is intact.

    Raises:
        StoreError, StoreDamagedError: the run's root or array metadata cannot be read.
    """
    path = os.fspath(path)
    group, attrs = _open_checked(path)
    n = check_marker(path, attrs)
    return _verify(path, attrs, _arrays(path, group, attrs, Layout.from_attrs(attrs), n), n)


def _verify(path: str, attrs, arrays, n: int) -> list[Damage]:
    found = _missing(path, attrs, arrays, n)
    for name, (arr, width, _) in arrays.items():
        rows = n if name not in (S.RUNNING_MEAN0, S.RUNNING_VAR0) else arr.shape[0]
        shape = shard_shape(arr)
        for r0 in range(0, rows, shape[0]):
            for c0 in range(0, width, shape[1]) if width is not None else (None,):
                region = (slice(r0, min(r0 + shape[0], rows)),)
                if c0 is not None:
                    region += (slice(c0, min(c0 + shape[1], width)),)
                if any(d.array == name and d.rows[0] == r0
                       and (c0 is None or d.columns[0] == c0) for d in found):
                    continue
                try:
                    arr[region]
                except Exception as exc:  # the codec's checksum or decompression failed
                    found.append(Damage(name, (r0, region[0].stop),
                                        None if c0 is None else (c0, region[1].stop),
                                        f"unreadable ({type(exc).__name__}: {exc})"))
    return found


def _check_chunks(chunks) -> None:
    if chunks is None:
        return
    if not isinstance(chunks, Mapping):
        raise StatscopeError(f"chunks={chunks!r}: expected a mapping like {{'step': 4096}}")
    for dim, size in chunks.items():
        if dim not in (S.STEP, S.NEURON):
            raise StatscopeError(f"chunks={dict(chunks)!r}: unknown dimension {dim!r}; "
                                 f"expected {S.STEP!r} or {S.NEURON!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise StatscopeError(f"chunks={dict(chunks)!r}: {dim}={size!r} must be a positive "
                                 "int")


def _expand(columns, index: np.ndarray):
    """``columns[:, index]`` chunk by chunk: one task per step chunk, not one per column."""
    whole = columns.rechunk({1: -1})
    return whole.map_blocks(lambda block: block[:, index], dtype=columns.dtype,
                            chunks=(whole.chunks[0], (len(index),)))


def _chunks(native, arr, chunks: Mapping[str, int]) -> tuple[int, ...]:
    names = arr.metadata.dimension_names or ()
    return tuple(chunks.get({S.EN_GROUP: S.NEURON, S.PROBE: S.NEURON}.get(d, d), c)
                 for d, c in zip(names, native.chunksize))


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
        StoreError: no runs found, or runs whose neuron layouts or EN groups differ.
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
        if not np.array_equal(ds[S.GROUP].values, ref[S.GROUP].values):
            raise StoreError(
                f"paths_or_dir: run {p!r} has EN groups {_groups(ds)} per layer, but "
                f"{paths[0]!r} has {_groups(ref)}; EN statistics of different groupings cannot "
                "be stacked: open them with open_run one by one")
    names = _run_names(paths)
    metas = [ds.attrs.get(S.ATTR_META, {}) or {} for ds in runs]
    keys = [k for k in S.META_KEYS if any(k in m for m in metas)]
    fill = {S.COUNT: 0}
    stacked = xr.concat([ds.drop_attrs(deep=False) for ds in runs], dim=S.RUN, join="outer",
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


def _groups(ds) -> dict[str, int]:
    layers, groups = ds[S.LAYER].values, ds[S.GROUP].values
    return {str(l): int(groups[layers == l].max()) + 1 for l in dict.fromkeys(layers.tolist())}


def _run_names(paths: Sequence[str]) -> list[str]:
    names = [Path(p.rstrip("/")).name or p for p in paths]
    if len(set(names)) == len(names):
        return names
    return [p.rstrip("/") for p in paths]
