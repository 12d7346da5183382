"""The zarr side of a run's writer: its arrays and root attributes, created, resumed, widened.

:class:`WriterArrays` is a part of :class:`~statscope.writer.RunWriter` (a mixin; the state it
reads and writes is set up in ``RunWriter.__init__``). It creates a new run (every array sharded
and checksummed), resumes one (cutting every array back to what the commit marker covers,
rebuilding the window in progress) and appends columns for probes that join later. Appending
rows and committing them is :mod:`statscope.writer`.
"""

from __future__ import annotations

import datetime as _dt
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError
from statscope.integrity import shard_shape
from statscope.storage import list_keys, zarr_store
from statscope.store import Layout, ProbeInfo, check_marker, read_attrs
from statscope.windows import WindowArrays, Windows

__all__ = ["WriterArrays", "now_iso", "package_versions"]

_SHARD_BYTES = 64 << 20  # the largest shard, raw; bounds what one flush rewrites per array
_INNER_STEPS = 1024  # rows of a chunk inside a shard: what a reader of a step range reads
_WINDOW_ROWS = 64  # windows per shard of the window summaries


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


def _codecs():
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


class WriterArrays:
    """Creating, resuming and widening the arrays of a :class:`~statscope.writer.RunWriter`
    (a mixin)."""

    # -- creation and resumption ------------------------------------------------------------

    def _create(self, layout: Layout, attrs: Mapping[str, Any], running0) -> None:
        import zarr

        _check_layout(layout)
        if self.chunk_steps is None:
            self.chunk_steps = _auto_rows(layout)
        root = {
            S.ATTR_FORMAT: S.FORMAT_VERSION, S.ATTR_STATUS: S.STATUS_RUNNING, S.ATTR_N_STEPS: 0,
            S.ATTR_LAST_STEP: None, S.ATTR_PROBES: [], S.ATTR_LAYERS: [],
            S.ATTR_STATS: list(layout.stats), S.ATTR_SCALARS: [], S.ATTR_META: {},
            S.ATTR_VERSIONS: package_versions(), S.ATTR_STARTED: now_iso(), S.ATTR_ENDED: None,
            S.ATTR_ERROR: None, S.ATTR_NONFINITE: {}, S.ATTR_STD_DEFINITION: S.STD_DEFINITION,
            S.ATTR_PROBE_OVERHEAD: None, S.ATTR_LEASE: self.lease.holder.describe(),
            S.ATTR_WRITER_ID: self.lease.holder.owner, S.ATTR_RESUMED_AT: None,
            S.ATTR_WINDOW_STEPS: self.window_steps, S.ATTR_N_WINDOWS: 0,
        }
        root.update(attrs)
        try:
            self._group = zarr.open_group(zarr_store(self.path, read_only=False), mode="w-",
                                          zarr_format=3, attributes=_jsonable(root))
        except OSError as exc:
            raise StoreError(f"path={self.path!r}: cannot create the run: "
                             f"{exc.strerror or exc}") from None
        self.layout = Layout((), layout.stats)
        self.n_steps, self.next_step = 0, 0
        self.nonfinite: dict[str, int] = {}
        self._scalars: list[str] = []
        self._arrays: dict[str, Any] = {}
        self._new_array(S.STEP, (0,), "int64", -1, (S.STEP,))
        self._new_array(S.COUNT, (0, 0), "int64", 0, (S.STEP, S.PROBE))
        for s in layout.neuron_stats:
            self._new_array(s, (0, 0), "float32", np.nan, (S.STEP, S.NEURON))
        for s in layout.group_stats:
            self._new_array(s, (0, 0), "float32", np.nan, (S.STEP, S.EN_GROUP))
        if self.window_steps:
            self.windows = Windows(self.window_steps, self._window_widths(self.layout), 0)
            self._warrays = WindowArrays(self._group, self._make)
            self._warrays.create(self._window_widths(self.layout), 0)
        self.add_probes(layout.probes, running0)
        self._commit()

    def _resume(self, layout: Layout, attrs: Mapping[str, Any], running0,
                at: int | None = None) -> None:
        import zarr

        old = read_attrs(self.path)
        check_marker(self.path, old)
        stored = Layout.from_attrs(old)
        if tuple(stored.stats) != tuple(layout.stats):
            raise StoreError(f"path={self.path!r}: resume=True but the store records statistics "
                             f"{list(stored.stats)}, this run {list(layout.stats)}")
        if old.get(S.ATTR_FORMAT) != S.FORMAT_VERSION:
            raise StoreError(f"path={self.path!r}: resume=True on a format "
                             f"{old.get(S.ATTR_FORMAT)} store; this statscope appends to format "
                             f"{S.FORMAT_VERSION} only: start a new run")
        given = {p.name: p for p in layout.probes}
        for p in stored.probes:
            q = given.get(p.name)
            if q is not None and _probe_key(q) != _probe_key(p):
                raise StoreError(f"path={self.path!r}: resume=True but layer {p.name!r} is "
                                 f"{_probe_key(p)} in the store and {_probe_key(q)} now")
        self._group = zarr.open_group(zarr_store(self.path, read_only=False), mode="r+",
                                      zarr_format=3)
        self.chunk_steps = shard_shape(self._group[S.STEP])[0]  # the run's own, whatever given
        self.layout = stored
        self.n_steps = int(old[S.ATTR_N_STEPS])
        last = old.get(S.ATTR_LAST_STEP)
        self.next_step = 0 if last is None else int(last) + 1
        self.nonfinite = dict(old.get(S.ATTR_NONFINITE, {}))
        self._scalars = list(old.get(S.ATTR_SCALARS, []))
        if at is not None:
            last = self._cut_at(at, stored, old, last)
        self._truncate(stored, running0)
        self.window_steps = old.get(S.ATTR_WINDOW_STEPS)
        if self.window_steps:
            self._resume_windows(old, last)
        self._group.update_attributes(_jsonable({
            S.ATTR_STATUS: S.STATUS_RUNNING, S.ATTR_ENDED: None, S.ATTR_ERROR: None, **attrs,
            S.ATTR_META: old.get(S.ATTR_META), S.ATTR_LEASE: self.lease.holder.describe(),
            S.ATTR_WRITER_ID: self.lease.holder.owner, S.ATTR_RESUMED_AT: self.next_step}))
        known = {p.name for p in stored.probes}
        self.add_probes([p for p in layout.probes if p.name not in known], running0)

    def _resume_windows(self, old, last) -> None:
        """Keep the committed windows that the resumed run adds no step to; rebuild from the
        stored rows the window of the last kept step where the run continues it or it was not
        committed (columns without per-step values are NaN in it)."""
        W = self.window_steps
        self._warrays = WindowArrays(self._group, self._make)
        keep = self._windows_kept(old, last, self.next_step)
        if keep < int(old.get(S.ATTR_N_WINDOWS) or 0):
            # the marker first, as in _cut_at: a writer killed before its next commit leaves
            # rows that no reader sees, not a marker naming rows the arrays no longer hold
            self._group.update_attributes({S.ATTR_N_WINDOWS: keep})
        self._warrays.open(keep, self.layout.stats)
        self.n_windows = keep
        self.windows = Windows(W, self._window_widths(self.layout), len(self.layout.probes))
        if last is None:
            return
        current = int(last) // W
        starts = self._group[f"{S.WINDOWS_GROUP}/{S.STEP}"][:keep]
        if current * W in starts:  # committed whole, and the run adds no step to it
            return
        steps = self._arrays[S.STEP][:self.n_steps]
        first = int(np.searchsorted(steps, current * W))
        if first == self.n_steps:
            return
        rows = slice(first, self.n_steps)
        count = self._arrays[S.COUNT][rows]
        values, lost = {}, {}
        cols = self._kept_columns(self.layout)
        for s in self.layout.stats:
            kept = self._arrays[s][rows]
            if s in S.PER_GROUP_STATS:
                values[s] = kept
                continue
            full = np.full((len(kept), self.layout.n_channels), np.nan, np.float32)
            full[:, cols] = kept
            values[s] = full
            lost[s] = np.ones(self.layout.n_channels, bool)
            lost[s][cols] = False
        self.windows.add(steps[rows], count, values, self._probe_of(self.layout), lost)

    def _cut_at(self, at: int, stored: Layout, old: dict, last) -> int | None:
        """Resume at step ``at``: drop the committed rows of that step and later (the commit
        marker first, so that a writer killed before the arrays are cut leaves them uncommitted),
        take their non-finite values out of the counts, and return the new last step."""
        self.next_step = at
        steps = self._group[S.STEP][:self.n_steps]
        keep = int(np.searchsorted(steps, at))
        if keep == self.n_steps:
            return last
        self._uncount_nonfinite(stored, keep)
        last = int(steps[keep - 1]) if keep else None
        windows = self._windows_kept(old, last, at)
        self.n_steps = keep
        self._group.update_attributes(_jsonable({
            S.ATTR_N_STEPS: keep, S.ATTR_LAST_STEP: last, S.ATTR_N_WINDOWS: windows,
            S.ATTR_NONFINITE: dict(self.nonfinite)}))
        return last

    @staticmethod
    def _continues(old: Mapping[str, Any], last, next_step: int) -> bool:
        """Whether the first step a run resumed at ``next_step`` records (the next multiple of
        its ``every``) falls in the window of its last kept step ``last``, by the run's own
        window length: then that window is rebuilt, else it is complete and kept."""
        W, every = old.get(S.ATTR_WINDOW_STEPS), int(old.get(S.ATTR_EVERY) or 1)
        if not W or last is None:
            return False
        return -(-int(next_step) // every) * every // W == int(last) // W

    def _windows_kept(self, old: Mapping[str, Any], last, next_step: int) -> int:
        """The committed windows that a run resumed at ``next_step``, its last kept step
        ``last`` (None: none), keeps: those before the window of ``last``, and that one too
        where the run adds no step to it (:meth:`_continues`). A window that holds every
        channel's summaries of its steps is not rebuilt from the rows, which, with
        ``neurons=``, hold only the kept channels."""
        W = old.get(S.ATTR_WINDOW_STEPS)
        if not W or last is None:
            return 0
        starts = self._group[f"{S.WINDOWS_GROUP}/{S.STEP}"][:int(old.get(S.ATTR_N_WINDOWS, 0))]
        end = int(last) // W + (0 if self._continues(old, last, next_step) else 1)
        return int(np.count_nonzero(starts < end * W))

    def _uncount_nonfinite(self, stored: Layout, keep: int) -> None:
        """Take the non-finite values of rows ``keep:`` out of the run's counts (those of the
        columns it keeps: with ``neurons=``, the others' were counted but not stored)."""
        if not any(self.nonfinite.values()):
            return
        ran = self._group[S.COUNT][keep:self.n_steps] > 0
        probe_of = self._probe_of(stored)
        kept = None if stored.n_neurons == stored.n_channels else self._kept_columns(stored)
        for s in list(self.nonfinite):
            if s not in stored.stats:
                continue
            cols = probe_of[s] if kept is None or s in S.PER_GROUP_STATS else probe_of[s][kept]
            values = self._group[s][keep:self.n_steps]
            left = self.nonfinite[s] - int(np.count_nonzero(~np.isfinite(values) & ran[:, cols]))
            if left > 0:
                self.nonfinite[s] = left
            else:
                del self.nonfinite[s]

    def _truncate(self, stored: Layout, running0) -> None:
        """Cut every array back to what the commit marker covers; drop uncommitted arrays.

        A writer killed after creating a scalar's array, or after appending a probe's columns,
        but before the commit that names them, leaves them on disk: they hold no committed row.
        """
        committed = {S.STEP, S.COUNT, *stored.stats, *self._scalars}
        width = {S.COUNT: len(stored.probes), S.EN_GROUP: stored.n_groups,
                 S.NEURON: stored.n_neurons}
        present = [a for a in _array_names(self.path) if a != S.WINDOWS_GROUP]
        self._arrays = {}
        for name in present:
            arr = self._group[name]
            dims = arr.metadata.dimension_names
            if name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
                if arr.shape[0] != stored.n_neurons:
                    arr.resize((stored.n_neurons,))
                self._arrays[name] = arr.with_config({"write_empty_chunks": True})
                continue
            if name not in committed:
                del self._group[name]
                continue
            shape = (self.n_steps, *([width[S.COUNT] if name == S.COUNT else width[dims[1]]]
                                     if len(dims) > 1 else []))
            if arr.shape != shape:
                arr.resize(shape)
            self._arrays[name] = arr.with_config({"write_empty_chunks": True})
        missing = committed - set(self._arrays)
        if missing:
            from statscope.errors import StoreDamagedError

            raise StoreDamagedError(f"path={self.path!r}: arrays {sorted(missing)} are named by "
                                    "the commit marker but missing; the run cannot be resumed")

    def _new_array(self, name: str, shape, dtype: str, fill, dims) -> None:
        self._arrays[name] = self._make(self._group, name, shape, dtype, fill, dims)

    def _make(self, group, name: str, shape, dtype: str, fill, dims):
        """Create a sharded, checksummed array that writes every chunk."""
        # window summaries gain a row per window: short shards keep their rewrites small
        rows = _WINDOW_ROWS if dims[0] == S.WINDOW_DIM else self.chunk_steps
        width = _SHARD_BYTES // (8 * rows) if len(shape) > 1 else 0
        shards = (rows,) if len(shape) == 1 else \
            (rows, max(self.neuron_chunk, width // self.neuron_chunk * self.neuron_chunk))
        chunks = (min(_INNER_STEPS, rows),) if len(shape) == 1 else \
            (min(_INNER_STEPS, rows), self.neuron_chunk)
        if dims == (S.NEURON,):
            shards, chunks = (1 << 16,), (1 << 12,)
        return group.create_array(name, shape=shape, shards=shards, chunks=chunks,
                                  dtype=dtype, fill_value=fill, dimension_names=dims,
                                  compressors=_codecs(), overwrite=True,
                                  config={"write_empty_chunks": True})

    # -- probes that join later -------------------------------------------------------------

    def add_probes(self, probes: Sequence[ProbeInfo], running0=None) -> None:
        """Append columns for ``probes``: NaN and count 0 for the rows already written.

        Args:
            probes: new probes (names not in the layout).
            running0: their initial running buffers of every channel,
                ``{"running_mean0": (channels,), ...}`` concatenated in probe order; NaN where a
                probe has none.
        """
        if not probes:
            return
        self.flush()
        lay = Layout((*self.layout.probes, *probes), self.layout.stats)
        _check_layout(lay)
        n = self.n_steps
        if running0:  # keep the units with per-step columns
            new = Layout(tuple(probes), lay.stats)
            running0 = {k: np.asarray(v)[self._kept_columns(new)] for k, v in running0.items()}
        widths = {S.COUNT: len(lay.probes), **{s: lay.n_neurons for s in lay.neuron_stats},
                  **{s: lay.n_groups for s in lay.group_stats}}
        for name, width in widths.items():
            arr = self._arrays[name]
            old = arr.shape[1]
            arr.resize((n, width))
            if n:
                arr[:, old:] = 0 if name == S.COUNT else np.nan
        for name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
            given = (running0 or {}).get(name)
            if name not in self._arrays and given is not None:
                self._new_array(name, (0,), "float32", np.nan, (S.NEURON,))
                self._arrays[name].resize((self.layout.n_neurons,))
                if self.layout.n_neurons:
                    self._arrays[name][:] = np.nan
            if name in self._arrays:
                arr = self._arrays[name]
                values = np.full(lay.n_neurons - self.layout.n_neurons, np.nan, np.float32)
                if given is not None:
                    values[:] = np.asarray(given, np.float32)
                arr.resize((lay.n_neurons,))
                arr[self.layout.n_neurons:] = values
        if self.windows is not None:
            widths = self._window_widths(lay)
            self.windows.widen(widths, len(lay.probes))
            self._warrays.widen(widths, len(lay.probes), self.n_windows)
        self.layout = lay
        self._commit()

    @staticmethod
    def _window_widths(lay: Layout) -> dict[str, int]:
        return {s: lay.n_groups if s in S.PER_GROUP_STATS else lay.n_channels for s in lay.stats}

    @staticmethod
    def _probe_of(lay: Layout) -> dict[str, np.ndarray]:
        """Per statistic, the probe of each column of its all-channel values."""
        per_channel = lay.neuron_index(all_channels=True)["probe"]
        return {s: _group_probe(lay) if s in S.PER_GROUP_STATS else per_channel
                for s in lay.stats}

    @staticmethod
    def _kept_columns(lay: Layout) -> np.ndarray:
        """Columns of the kept units among all channels."""
        offsets = np.cumsum([0, *(p.channels for p in lay.probes)])
        parts = [o + p.kept for o, p in zip(offsets, lay.probes)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _auto_rows(layout: Layout) -> int:
    """Rows per shard so that one shard row-block over the kept columns is ~64 MiB."""
    rows = _SHARD_BYTES // (4 * max(1, layout.n_neurons))
    return int(min(8192, max(256, 1 << max(0, rows.bit_length() - 1))))


def _probe_key(p: ProbeInfo) -> dict:
    return {"module": p.module, "where": p.where, "channels": p.channels, "groups": p.groups}


def _check_layout(lay: Layout) -> None:
    names = [p.name for p in lay.probes]
    if len(set(names)) != len(names):
        raise StatscopeError(f"layout: probe names repeat: {names}")
    for p in lay.probes:
        if p.channels < 1 or p.groups < 1 or p.channels % p.groups:
            raise StatscopeError(f"groups={p.groups} for layer {p.name!r}: its "
                                 f"channels={p.channels} are not divisible by it")


def _array_names(path: str) -> list[str]:
    """The arrays of a run, from one listing (zarr's own listing warns on foreign files)."""
    return sorted({k.split("/")[0] for k in list_keys(path)
                   if k.count("/") == 1 and k.endswith("/zarr.json")})


def _group_probe(layout: Layout) -> np.ndarray:
    return np.repeat(np.arange(len(layout.probes)), [p.groups for p in layout.probes])


def _jsonable(value: Any) -> Any:
    """Attribute values as JSON: numpy scalars to Python, tuples to lists, unknowns to str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN; zarr would write a non-standard token
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
