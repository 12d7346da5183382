"""Append-only, crash-safe writing of one run store.

:class:`RunWriter` stages rows in host memory and writes them to zarr in chunk-aligned blocks,
or at least every ``flush_seconds``. After the data of a block is written, the root attribute
``n_steps`` is advanced: that write is atomic (zarr's local store writes a temporary file and
renames it; object stores replace whole objects), so a reader or a process killed at any moment
sees every row up to the last commit and nothing half written. Only the writer's thread calls it.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError
from statscope.store import Layout, ProbeInfo, _is_url, read_attrs, zarr_store

__all__ = ["RunWriter", "write_run", "check_path", "check_scalar_name", "package_versions",
           "now_iso"]

def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run's numbers depend on (no imports needed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("statscope", "torch", "numpy", "zarr", "xarray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _compressors():
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


class RunWriter:
    """Create (or resume) a run store and append rows to it.

    Args:
        path: run folder or fsspec URL.
        layout: the probes and statistics of the run.
        attrs: root attributes to set on creation (model, meta, command, ...).
        overwrite: replace an existing run at ``path``.
        resume: continue an existing run after its last committed step.
        chunk_steps: chunk length along step on disk.
        neuron_chunk: chunk width along neuron on disk.
        flush_seconds: write staged rows at least this often.
        running0: initial running buffers per neuron, ``{"running_mean0": (n,), ...}``.

    Raises:
        StoreError: ``path`` holds something and neither ``overwrite`` nor ``resume`` is set, or
            ``resume`` finds no run or a run with another layout.
    """

    def __init__(self, path, layout: Layout, *, attrs: Mapping[str, Any] | None = None,
                 overwrite: bool = False, resume: bool = False, chunk_steps: int = 8192,
                 neuron_chunk: int = 64, flush_seconds: float = 2.0,
                 running0: Mapping[str, np.ndarray] | None = None):
        import zarr

        self.path = os.fspath(path)
        self.layout = layout
        self.chunk_steps = int(chunk_steps)
        self.flush_seconds = float(flush_seconds)
        exists = check_path(self.path, overwrite=overwrite, resume=resume)
        if resume and exists:
            old = read_attrs(self.path)
            if not Layout.from_attrs(old).same_neurons(layout):
                raise StoreError(f"path={self.path!r}: resume=True but the store's layers "
                                 f"{old[S.ATTR_LAYERS]} or statistics {old[S.ATTR_STATS]} differ "
                                 f"from this run's {[p.name for p in layout.probes]}, "
                                 f"{list(layout.stats)}")
            self._group = zarr.open_group(zarr_store(self.path, read_only=False), mode="r+",
                                          zarr_format=3)
            self.n_steps = int(old.get(S.ATTR_N_STEPS, 0))
            self._truncate()
            self.nonfinite = dict(old.get(S.ATTR_NONFINITE, {}))
            self._scalars = list(old.get(S.ATTR_SCALARS, []))
            last = old.get(S.ATTR_LAST_STEP)
            self.next_step = 0 if last is None else int(last) + 1
            self._group.attrs.update({S.ATTR_STATUS: S.STATUS_RUNNING, S.ATTR_ENDED: None,
                                      S.ATTR_ERROR: None, **(attrs or {}),
                                      S.ATTR_META: old.get(S.ATTR_META)})
        else:
            if exists:
                _remove_run(self.path)
            self._group = self._create(attrs or {}, neuron_chunk, running0 or {})
            self.n_steps = 0
            self.nonfinite = {}
            self._scalars = []
            self.next_step = 0
        self._idx = layout.neuron_index()
        self._arrays = {name: self._group[name] for name in self._data_names()}
        self._stage: list[dict[str, np.ndarray]] = []
        self._staged = 0
        self._last_write = time.monotonic()
        self.closed = False

    # -- creation ---------------------------------------------------------------------------

    def _data_names(self) -> list[str]:
        return [S.STEP, S.COUNT, *self.layout.stats, *self._scalars]

    def _create(self, attrs: Mapping[str, Any], neuron_chunk: int, running0):
        import zarr

        lay = self.layout
        names = [p.name for p in lay.probes]
        if len(set(names)) != len(names):
            raise StatscopeError(f"layout: probe names repeat: {names}")
        for p in lay.probes:
            if p.channels < 1 or p.groups < 1 or p.channels % p.groups:
                raise StatscopeError(f"groups={p.groups} for layer {p.name!r}: its "
                                     f"channels={p.channels} are not divisible by it")
        root = {
            S.ATTR_FORMAT: S.FORMAT_VERSION, S.ATTR_STATUS: S.STATUS_RUNNING, S.ATTR_N_STEPS: 0,
            S.ATTR_LAST_STEP: None, S.ATTR_PROBES: [p.to_json() for p in lay.probes],
            S.ATTR_LAYERS: names, S.ATTR_STATS: list(lay.stats), S.ATTR_SCALARS: [],
            S.ATTR_META: {}, S.ATTR_VERSIONS: package_versions(), S.ATTR_STARTED: now_iso(),
            S.ATTR_ENDED: None, S.ATTR_ERROR: None, S.ATTR_NONFINITE: {},
            S.ATTR_STD_DEFINITION: S.STD_DEFINITION, S.ATTR_PROBE_OVERHEAD: None,
        }
        root.update(attrs)
        group = zarr.open_group(zarr_store(self.path, read_only=False), mode="w", zarr_format=3,
                                attributes=_jsonable(root))
        cs, n, g, p = self.chunk_steps, lay.n_neurons, lay.n_groups, len(lay.probes)
        nc = max(1, min(neuron_chunk, n))
        comp = _compressors()
        group.create_array(S.STEP, shape=(0,), chunks=(cs,), dtype="int64", fill_value=-1,
                           dimension_names=(S.STEP,), compressors=comp)
        group.create_array(S.COUNT, shape=(0, p), chunks=(cs, p), dtype="int64", fill_value=0,
                           dimension_names=(S.STEP, S.PROBE), compressors=comp)
        for s in lay.neuron_stats:
            group.create_array(s, shape=(0, n), chunks=(cs, nc), dtype="float32",
                               fill_value=np.nan, dimension_names=(S.STEP, S.NEURON),
                               compressors=comp)
        for s in lay.group_stats:
            group.create_array(s, shape=(0, g), chunks=(cs, max(1, min(g, 256))), dtype="float32",
                               fill_value=np.nan, dimension_names=(S.STEP, S.EN_GROUP),
                               compressors=comp)
        for name, values in running0.items():
            values = np.asarray(values, dtype=np.float32)
            if values.shape != (n,):
                raise StatscopeError(f"running0[{name!r}]: shape {values.shape}, expected ({n},)")
            arr = group.create_array(name, shape=(n,), chunks=(n,), dtype="float32",
                                     fill_value=np.nan, dimension_names=(S.NEURON,))
            arr[:] = values
        return group

    def _truncate(self) -> None:
        """Drop rows past the commit marker, left by a writer that died mid-block."""
        for name in self._group.array_keys():
            arr = self._group[name]
            if arr.metadata.dimension_names[:1] == (S.STEP,) and arr.shape[0] > self.n_steps:
                arr.resize((self.n_steps, *arr.shape[1:]))

    # -- appending --------------------------------------------------------------------------

    def append(self, steps: np.ndarray, count: np.ndarray, stats: Mapping[str, np.ndarray],
               scalars: Mapping[str, np.ndarray] | None = None) -> int:
        """Stage ``k`` rows; write them when a chunk fills or ``flush_seconds`` have passed.

        Args:
            steps: (k,) int64 global steps, increasing.
            count: (k, n_probes) int64 elements per channel; 0 where a probe did not run.
            stats: per statistic of the layout, (k, n_neurons) or, for EN, (k, n_groups) float32.
            scalars: optional (k,) float arrays by name (NaN where not logged).

        Returns:
            The number of new non-finite statistics among rows where the probe ran.
        """
        k = len(steps)
        if k == 0:
            return 0
        row: dict[str, np.ndarray] = {S.STEP: np.asarray(steps, np.int64),
                                      S.COUNT: np.asarray(count, np.int64)}
        ran = row[S.COUNT] > 0
        bad = 0
        for s in self.layout.stats:
            a = np.asarray(stats[s], np.float32)
            row[s] = a
            cols = _group_probe(self.layout) if s in S.PER_GROUP_STATS else self._idx["probe"]
            n_bad = int(np.count_nonzero(~np.isfinite(a) & ran[:, cols]))
            if n_bad:
                self.nonfinite[s] = self.nonfinite.get(s, 0) + n_bad
                bad += n_bad
        for name, values in (scalars or {}).items():
            self._ensure_scalar(name)
            row[name] = np.asarray(values, np.float64)
        self._stage.append(row)
        self._staged += k
        boundary = self.chunk_steps - (self.n_steps % self.chunk_steps)
        if self._staged >= boundary or time.monotonic() - self._last_write >= self.flush_seconds:
            self.flush()
        return bad

    def _ensure_scalar(self, name: str) -> None:
        if name in self._scalars:
            return
        check_scalar_name(name, self.layout.stats)
        self._group.create_array(name, shape=(self.n_steps,), chunks=(self.chunk_steps,),
                                 dtype="float64", fill_value=np.nan, dimension_names=(S.STEP,),
                                 compressors=_compressors())
        self._scalars.append(name)
        self._arrays[name] = self._group[name]

    def flush(self) -> None:
        """Write every staged row, then advance the commit marker."""
        if not self._staged:
            self._last_write = time.monotonic()
            return
        k = self._staged
        n0, n1 = self.n_steps, self.n_steps + k
        for name, arr in self._arrays.items():
            parts = [r[name] if name in r else _nan_rows(r, arr.shape[1:]) for r in self._stage]
            block = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr.resize((n1, *arr.shape[1:]))
            arr[n0:n1] = block
        last = int(self._stage[-1][S.STEP][-1])
        self._stage, self._staged = [], 0
        self.n_steps, self.next_step = n1, last + 1
        self._group.attrs.update({S.ATTR_N_STEPS: n1, S.ATTR_LAST_STEP: last,
                                  S.ATTR_SCALARS: list(self._scalars),
                                  S.ATTR_NONFINITE: dict(self.nonfinite)})
        self._last_write = time.monotonic()

    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes (e.g. the measured probe overhead)."""
        self._group.attrs.update(_jsonable(attrs))

    def close(self, status: str = S.STATUS_COMPLETED, error: str | None = None) -> None:
        """Flush, and mark the run ``completed`` or ``failed`` (with the error's text)."""
        if self.closed:
            return
        if status not in S.STATUSES:
            raise StatscopeError(f"status={status!r}: expected one of {S.STATUSES}")
        self.flush()
        self._group.attrs.update({S.ATTR_STATUS: status, S.ATTR_ENDED: now_iso(),
                                  S.ATTR_ERROR: error})
        self.closed = True


def _nan_rows(row: Mapping[str, np.ndarray], tail: tuple[int, ...]) -> np.ndarray:
    return np.full((len(row[S.STEP]), *tail), np.nan)


def _group_probe(layout: Layout) -> np.ndarray:
    return np.repeat(np.arange(len(layout.probes)), [p.groups for p in layout.probes])


def check_path(path: str, *, overwrite: bool, resume: bool) -> bool:
    """Check that a run may be written at ``path``; return whether something is there already.

    Raises:
        StatscopeError: both ``overwrite`` and ``resume``.
        StoreError: ``path`` holds something and neither is set, or holds something that is not a
            statscope run (which neither replaces nor continues).
    """
    if overwrite and resume:
        raise StatscopeError("overwrite=True, resume=True: choose one")
    exists = _exists(path)
    if exists and not (overwrite or resume):
        raise StoreError(f"path={path!r}: already exists; pass overwrite=True to replace it or "
                         "resume=True to continue it")
    if exists:
        read_attrs(path)
    return exists


def check_scalar_name(name: str, taken=()) -> None:
    """Raise StatscopeError unless ``name`` can be a logged scalar: an identifier that is neither
    a schema name nor one of ``taken`` (the run's statistics)."""
    if name in S.RESERVED_NAMES or name in taken or not name.isidentifier():
        raise StatscopeError(f"log({name}=...): {name!r} is reserved or not an identifier; "
                             f"reserved: {sorted(S.RESERVED_NAMES | set(taken))}")


def _exists(path: str) -> bool:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p) and bool(fs.ls(p))
    p = Path(path.removeprefix("file://"))
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


def _remove_run(path: str) -> None:
    """Delete an existing run; refuse to delete anything that is not one."""
    read_attrs(path)  # raises StoreError unless it is a run: never delete a user's folder
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        fs.rm(p, recursive=True)
    else:
        shutil.rmtree(path.removeprefix("file://"))


def _jsonable(value: Any) -> Any:
    """Attribute values as JSON: numpy scalars to Python, tuples to lists, unknowns to str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_run(path, probes, data: Mapping[str, np.ndarray], *, steps=None, count=None,
              scalars: Mapping[str, np.ndarray] | None = None, meta: Mapping[str, Any] | None = None,
              status: str = S.STATUS_COMPLETED, overwrite: bool = False, **attrs: Any) -> str:
    """Write a whole run at once, e.g. synthetic data for tests and benchmarks.

    Args:
        path: run folder or URL.
        probes: ProbeInfo records, or a mapping ``{layer name: channels}`` (one EN group each).
        data: ``bn_mean``, ``bn_std`` [, ``bn_kurt``] as (T, n_neurons) and ``en_mean``,
            ``en_std`` as (T, n_groups) arrays; the statistics present define the layout.
        steps: (T,) int steps; default ``arange(T)``.
        count: (T, n_probes) elements per channel; default 1 everywhere.
        scalars: per-step scalars, (T,) each.
        meta: the run's user metadata (``batch_size``, ``seed``, ...).
        status: final status to mark.
        overwrite: replace an existing run.
        **attrs: more root attributes.

    Returns:
        The path written.
    """
    if isinstance(probes, Mapping):
        probes = [ProbeInfo(name=k, module=k, type="synthetic", where="input", channel_dim=-1,
                            channels=int(c)) for k, c in probes.items()]
    stats = tuple(s for s in S.ALL_STATS if s in data)
    layout = Layout(probes=tuple(probes), stats=stats)
    t = len(next(iter(data.values())))
    steps = np.arange(t) if steps is None else np.asarray(steps)
    count = np.ones((t, len(layout.probes)), np.int64) if count is None else np.asarray(count)
    writer = RunWriter(path, layout, attrs={S.ATTR_META: dict(meta or {}), **attrs},
                       overwrite=overwrite, flush_seconds=float("inf"))
    writer.append(steps, count, {s: data[s] for s in stats}, scalars)
    writer.close(status)
    return os.fspath(path)
