"""Run stores: open and stack the zarr v3 stores that probes write (found by
:mod:`statscope.discovery`, whose functions are importable from here too).

One run is one zarr v3 group, on disk or at any fsspec URL. :func:`open_run` turns it into the
Dataset described in :mod:`statscope.schema`; :func:`open_runs` stacks several along ``run``.
Readers trust the commit marker ``n_steps`` only after checking it: rows past it may be half
written and are never shown, so a store opened while a run writes it, or after the writer was
killed, shows a consistent prefix; missing or damaged data is a
:class:`~statscope.errors.StoreDamagedError` naming the array and steps, never fill values.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StatscopeWarning, StoreDamagedError, StoreError
from statscope.arrays import check_chunks, damage_error, entries, expand, lazy, missing, verify
from statscope.discovery import (find_runs, is_run, is_single_run, open_checked, rank_paths,
                                 rank_stores, read_attrs, scan_runs)
from statscope.integrity import CheckedArray, Damage, check_marker, step_damage
from statscope.layout import Layout, ProbeInfo
from statscope.storage import store_errors, use_options, zarr_store

if TYPE_CHECKING:  # imported where used: xarray is heavy
    import xarray as xr

__all__ = ["ProbeInfo", "Layout", "open_run", "open_runs", "open_windows", "find_runs",
           "scan_runs", "is_run",
           "rank_paths", "rank_stores", "read_attrs", "check_marker", "verify_run", "zarr_store"]

# per array, what entries() opens: rows, columns (None: a single column), dtype, fill
_Want = tuple[int, int | None, str, Any]


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
    S.SET_MEAN: ("set mean", "activation units", "mean over the layer's pixel sets (tokens, "
                 "samples) of each set's mean, per EN group"),
    S.SET_MEAN_SD: ("set mean spread", "activation units", "standard deviation over the pixel "
                    "sets of each set's mean, per EN group"),
    S.SET_STD: ("set std", "activation units", "mean over the pixel sets of each set's standard "
                "deviation (population, no eps), per EN group"),
    S.SET_STD_SD: ("set std spread", "activation units", "standard deviation over the pixel sets "
                   "of each set's standard deviation, per EN group"),
}


def open_run(path: str | os.PathLike, *, chunks: Mapping[str, int] | None = None,
             damaged: str = "raise", merge_synced: bool = True,
             storage_options: Mapping | None = None) -> xr.Dataset:
    """Open one run as a lazy, chunked ``xarray.Dataset`` in the schema of :mod:`statscope.schema`.

    Args:
        path: a run folder or an fsspec URL; or the folder of a distributed run, whose per-rank
            stores are stacked along a ``rank`` dimension.
        chunks: dask chunks by dimension name (``step``, ``neuron``), positive ints; default the
            store's shards.
        damaged: ``"raise"`` (default): missing data is an error. ``"mask"``: read every chunk
            now, and show missing or unreadable regions as NaN (``count`` 0), listed in the
            attribute ``damaged``.
        merge_synced: for a distributed run, show on every rank the merged statistics of layers
            that synchronize them (SyncBatchNorm), as they normalized with those
            (:func:`statscope.ranks.merge_synced`).
        storage_options: fsspec options for a URL (endpoint, credentials); see
            :mod:`statscope.storage`.

    Returns:
        Dataset with dims (step, neuron), or (rank, step, neuron) for a distributed run:
        ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``, ``count`` (and ``bn_kurt`` when
        recorded), float32 except ``count`` (int64); scalars (step,); coords ``step``, ``layer``,
        ``unit``, ``group``, ``label``; the run's attrs. Every variable has ``long_name``,
        ``units`` and ``description`` attributes; ``attrs["name"]`` is the run's folder name
        (not stored), by which analyses name it.

    Raises:
        StoreError: not a run, or a format this version does not read.
        StoreDamagedError: the commit marker, metadata or data below it is missing or damaged.

    Warns:
        StatscopeWarning: of a distributed run's folder, rank stores of an earlier run (another
            ``world_size`` than the store started last records) are left out, or ranks of
            ``0..world_size-1`` have no store (:func:`statscope.discovery.rank_stores`); the
            attributes ``stale_ranks`` and ``missing_ranks`` list them.

    Example:
        >>> ds = open_run("runs/demo")  # doctest: +SKIP
        >>> ds.bn_std.sel(step=slice(0, 10))  # doctest: +SKIP
    """
    import statscope.analyses.accessor  # noqa: F401  registers ds.statscope (see STYLE.md)

    if damaged not in ("raise", "mask"):
        raise StatscopeError(f"damaged={damaged!r}: expected 'raise' or 'mask'")
    check_chunks(chunks, (S.STEP, S.NEURON))
    path = os.fspath(path)
    restore = use_options(path, storage_options)
    try:
        with store_errors(path):  # credentials, an endpoint, a bucket the store lacks
            ranks = not is_single_run(path) and bool(rank_paths(path))
            ds = (_open_ranks(path, chunks, damaged, merge_synced) if ranks
                  else _open_one(path, chunks, damaged))
    except BaseException:
        restore()  # options that did not open it are not kept for later calls
        raise
    ds.attrs.setdefault(S.ATTR_NAME, _run_names([path])[0])
    return ds


def _open_one(path: str, chunks, damaged: str):
    import xarray as xr

    group, attrs = open_checked(path)
    n = check_marker(path, attrs)
    layout = Layout.from_attrs(attrs)
    idx = layout.neuron_index()
    want: dict[str, _Want] = {S.STEP: (n, None, "int64", -1),
                              S.COUNT: (n, len(layout.probes), "int64", 0)}
    want.update({s: (n, layout.n_neurons, "float32", np.nan) for s in layout.neuron_stats})
    want.update({s: (n, layout.n_groups, "float32", np.nan) for s in layout.group_stats})
    want.update({s: (n, None, "float64", np.nan) for s in attrs.get(S.ATTR_SCALARS, [])})
    optional = {s: (layout.n_neurons, None, "float32", np.nan)
                for s in (S.RUNNING_MEAN0, S.RUNNING_VAR0)}
    arrays = entries(path, group, want, optional)
    found = verify(path, attrs, arrays) if damaged == "mask" else missing(path, attrs, arrays)
    step = _steps(path, arrays[S.STEP], found, attrs.get(S.ATTR_LAST_STEP))
    if found and damaged == "raise":
        raise damage_error(path, found, step)

    def read(name):
        return lazy(path, name, arrays[name], found, chunks, damaged)

    per_step = (S.STEP, S.NEURON)
    data: dict[str, tuple[tuple[str, ...], Any]] = {s: (per_step, read(s))
                                                    for s in layout.neuron_stats}
    data.update({s: (per_step, expand(read(s), idx["group_column"])) for s in layout.group_stats})
    data[S.COUNT] = (per_step, expand(read(S.COUNT), idx["probe"]))
    for name in attrs.get(S.ATTR_SCALARS, []):
        data[name] = ((S.STEP,), read(name))
    for name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
        if name in arrays:
            data[name] = ((S.NEURON,), read(name).compute())
    out_attrs = dict(attrs)
    if found:
        out_attrs[S.ATTR_DAMAGED] = [d.to_json() for d in found]
    ds = xr.Dataset(data, coords={S.STEP: step.astype(np.int64), **_neuron_coords(layout, idx)},
                    attrs=out_attrs)
    _describe(ds, attrs.get(S.ATTR_SCALARS, []))
    ds[S.STEP].attrs.update(long_name="training step", units="1")
    return ds


def _read_steps(path: str, entry) -> np.ndarray:
    """The committed rows of the step array (each chunk's checksum checked)."""
    return np.asarray(CheckedArray(path, S.STEP, entry.array, entry.rows, None, -1)[:])


def _steps(path: str, entry, found, last) -> np.ndarray:
    """The committed steps; the step array damaged (also in ``damaged="mask"``: the rows
    cannot be placed without it) raises."""
    bad = [d for d in found if d.array == S.STEP]
    steps = np.zeros(0, np.int64)
    if not bad:
        steps = _read_steps(path, entry)
        bad = step_damage(steps, last)
    if bad:
        raise StoreDamagedError(f"path={path!r}: the step array is damaged ("
                                + "; ".join(d.describe() for d in bad)
                                + "): the rows cannot be placed")
    return steps


def _neuron_coords(layout: Layout, idx: Mapping[str, np.ndarray]) -> dict:
    names = np.array([p.name for p in layout.probes], dtype=object)
    layer = names[idx["probe"]].astype(str) if len(names) else np.zeros(0, str)
    label = np.array([f"{lay}[{u}]" for lay, u in zip(layer, idx["unit"])], dtype=str)
    return {S.NEURON: np.arange(len(idx["probe"])),
            S.LAYER: (S.NEURON, layer),
            S.UNIT: (S.NEURON, idx["unit"].astype(np.int64)),
            S.GROUP: (S.NEURON, idx["group"].astype(np.int64)),
            S.LABEL: (S.NEURON, label)}


def _describe(ds, scalars) -> None:
    for name, (long_name, units, description) in _DESCRIBE.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, units=units, description=description)
    for name in scalars:
        ds[name].attrs.update(long_name=name, units="as logged",
                              description="scalar logged with Recorder.log; NaN where not logged")


def _open_ranks(path: str, chunks, damaged: str, merge: bool):
    """The per-rank runs of a distributed run stacked along ``rank`` (outer-aligned on step):
    those of its latest run (:func:`statscope.discovery.rank_stores`), with a warning for
    stores left out and ranks missing."""
    import xarray as xr

    from statscope.ranks import merge_synced

    stores = rank_stores(path)
    for problem in stores.problems(path):
        warnings.warn(problem, StatscopeWarning, stacklevel=3)
    ranks = list(stores.paths)
    runs = [_open_one(p, chunks, damaged) for p in ranks]
    _check_stackable(ranks, runs, "path")
    stacked = xr.concat([ds.drop_attrs(deep=False) for ds in runs], dim=S.RANK, join="outer",
                        fill_value={S.COUNT: 0}, coords="minimal", compat="override",
                        combine_attrs="drop")
    stacked = stacked.assign_coords({S.RANK: [int(ds.attrs.get(S.ATTR_RANK, r))
                                               for r, ds in zip(stores.ranks, runs)]})
    stacked.attrs = read_attrs(path)
    return merge_synced(stacked) if merge else stacked


def _check_stackable(paths, runs, what: str) -> None:
    ref = runs[0]
    for p, ds in zip(paths[1:], runs[1:]):
        if (ds.sizes[S.NEURON] != ref.sizes[S.NEURON]
                or not np.array_equal(ds[S.LAYER].values, ref[S.LAYER].values)):
            raise StoreError(
                f"{what}: run {p!r} has layers {_layer_widths(ds)}, but {paths[0]!r} has "
                f"{_layer_widths(ref)} (name: neurons); only runs with the same layers can be "
                "stacked")
        if not np.array_equal(ds[S.GROUP].values, ref[S.GROUP].values):
            raise StoreError(
                f"{what}: run {p!r} has EN groups {_groups(ds)} per layer, but "
                f"{paths[0]!r} has {_groups(ref)}; EN statistics of different groupings cannot "
                "be stacked: open them with open_run one by one")


def open_windows(path: str | os.PathLike, *, damaged: str = "raise",
                 storage_options: Mapping | None = None) -> xr.Dataset:
    """Open a run's window summaries (:mod:`statscope.windows`) as a lazy ``xarray.Dataset``.

    Args:
        path: a run folder or URL (one rank's store for a distributed run).
        damaged, storage_options: as in :func:`open_run`.

    Returns:
        Dataset with dims (window, summary, neuron) over **every** channel (also those whose
        per-step columns were not kept): per statistic, its mean and its standard deviation
        (ddof = 1) over the steps of each window at which the layer ran (``summary`` = ``mean``,
        ``std``); ``count`` (window, neuron): those steps; coords ``window`` (index), ``step``
        along window (the window's first step), ``layer``, ``unit``, ``group``, ``label``.
        Attribute ``window_steps``: W.

    Raises:
        StoreError: the run keeps no window summaries (``window_steps=None``, or format 1), or
            ``path`` is a distributed run's folder (its ranks keep their own).
    """
    import dask.array as da
    import xarray as xr

    if damaged not in ("raise", "mask"):
        raise StatscopeError(f"damaged={damaged!r}: expected 'raise' or 'mask'")
    path = os.fspath(path)
    use_options(path, storage_options)
    if not is_single_run(path) and rank_paths(path):
        raise StoreError(f"path={path!r}: a distributed run; window summaries are per rank "
                         f"(open_windows of {path.rstrip('/')}/rank0, ...)")
    group, attrs = open_checked(path)
    check_marker(path, attrs)
    width = attrs.get(S.ATTR_WINDOW_STEPS)
    if not width:
        raise StoreError(f"path={path!r}: this run keeps no window summaries (window_steps="
                         f"{width!r})")
    layout = Layout.from_attrs(attrs)
    idx = layout.neuron_index(all_channels=True)
    w = S.WINDOWS_GROUP
    want = _windows_want(path, attrs, layout)
    n = want[f"{w}/{S.STEP}"][0]
    arrays = entries(path, group, want)
    found = verify(path, attrs, arrays) if damaged == "mask" else missing(path, attrs, arrays)
    if found and damaged == "raise":
        raise damage_error(path, found, None)

    def read(name):  # whole rows of every channel are the usual read: a task per shard
        return lazy(path, f"{w}/{name}", arrays[f"{w}/{name}"], found, None, damaged,
                    whole_shards=True)

    data: dict[str, tuple[tuple[str, ...], Any]] = {}
    for s in layout.stats:
        parts = [read(f"{s}_{part}") for part in S.SUMMARIES]
        if s in S.PER_GROUP_STATS:
            parts = [expand(p, idx["group_column"]) for p in parts]
        data[s] = ((S.WINDOW_DIM, S.SUMMARY, S.NEURON), da.stack(parts, axis=1))
    data[S.COUNT] = ((S.WINDOW_DIM, S.NEURON), expand(read(S.COUNT), idx["probe"]))
    starts = CheckedArray(path, f"{w}/{S.STEP}", arrays[f"{w}/{S.STEP}"].array, n, None, -1)[:]
    coords = {S.WINDOW_DIM: np.arange(n), S.SUMMARY: list(S.SUMMARIES),
              S.STEP: (S.WINDOW_DIM, starts.astype(np.int64)), **_neuron_coords(layout, idx)}
    out_attrs = dict(attrs)
    if found:
        out_attrs[S.ATTR_DAMAGED] = [d.to_json() for d in found]
    ds = xr.Dataset(data, coords=coords, attrs=out_attrs)
    _describe(ds, [])
    ds[S.COUNT].attrs.update(long_name="steps", units="1",
                             description="steps of the window at which the layer ran")
    return ds


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
    with store_errors(path):
        return _verify_one(path)


def _windows_want(path: str, attrs: Mapping, layout: Layout) -> dict[str, _Want]:
    """What :func:`entries` opens of a run's window summaries (``windows/...``)."""
    n = attrs.get(S.ATTR_N_WINDOWS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StoreDamagedError(f"path={path!r}: n_windows={n!r} is not a non-negative integer")
    w = S.WINDOWS_GROUP
    want: dict[str, _Want] = {f"{w}/{S.STEP}": (n, None, "int64", -1),
                              f"{w}/{S.COUNT}": (n, len(layout.probes), "int64", 0)}
    for s in layout.stats:
        cols = layout.n_groups if s in S.PER_GROUP_STATS else layout.n_channels
        want.update({f"{w}/{s}_{part}": (n, cols, "float32", np.nan) for part in S.SUMMARIES})
    return want


def _verify_one(path: str) -> list[Damage]:
    group, attrs = open_checked(path)
    n = check_marker(path, attrs)
    layout = Layout.from_attrs(attrs)
    want: dict[str, _Want] = {S.STEP: (n, None, "int64", -1),
                              S.COUNT: (n, len(layout.probes), "int64", 0)}
    want.update({s: (n, layout.n_groups if s in S.PER_GROUP_STATS else layout.n_neurons,
                     "float32", np.nan) for s in layout.stats})
    want.update({s: (n, None, "float64", np.nan) for s in attrs.get(S.ATTR_SCALARS, [])})
    if n and attrs.get(S.ATTR_WINDOW_STEPS) and attrs.get(S.ATTR_N_WINDOWS):  # open_windows reads
        want.update(_windows_want(path, attrs, layout))
    # what open_run reads beside the per-step arrays, where the run has it
    optional = {s: (layout.n_neurons, None, "float32", np.nan)
                for s in (S.RUNNING_MEAN0, S.RUNNING_VAR0)}
    arrays = entries(path, group, want, optional)
    found = verify(path, attrs, arrays)
    if not any(d.array == S.STEP for d in found):
        found += step_damage(_read_steps(path, arrays[S.STEP]), attrs.get(S.ATTR_LAST_STEP))
    return found


def open_runs(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], *,
              storage_options: Mapping | None = None) -> xr.Dataset:
    """Open several runs stacked along a leading ``run`` dimension.

    Args:
        paths_or_dir: a folder of runs, or an iterable of run paths.
        storage_options: as in :func:`open_run`, for every URL given.

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
    runs = [open_run(p, storage_options=storage_options) for p in paths]
    ref = runs[0]
    _check_stackable(paths, runs, "paths_or_dir")
    names = _run_names(paths)
    metas = [ds.attrs.get(S.ATTR_META, {}) or {} for ds in runs]
    keys = [k for k in S.META_KEYS if any(k in m for m in metas)]
    fill = {S.COUNT: 0}
    stacked = xr.concat([ds.drop_attrs(deep=False) for ds in runs], dim=S.RUN, join="outer",
                        fill_value=fill, coords="minimal", compat="override",
                        combine_attrs="drop")
    coords: dict[str, Any] = {S.RUN: names,
              S.ATTR_N_STEPS: (S.RUN, [int(ds.attrs.get(S.ATTR_N_STEPS, 0)) for ds in runs]),
              S.ATTR_STATUS: (S.RUN, [str(ds.attrs.get(S.ATTR_STATUS)) for ds in runs])}
    for k in keys:
        coords[k] = (S.RUN, [m.get(k) for m in metas])
    stacked = stacked.assign_coords(coords)
    stacked.attrs = {S.ATTR_PROBES: ref.attrs[S.ATTR_PROBES], S.ATTR_LAYERS: ref.attrs[S.ATTR_LAYERS],
                     "runs": {n: dict(ds.attrs) for n, ds in zip(names, runs)}}
    return stacked


def _layer_widths(ds) -> dict[str, int]:
    """Each layer's number of neuron columns, in order."""
    return dict(collections.Counter(ds[S.LAYER].values.tolist()))


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
