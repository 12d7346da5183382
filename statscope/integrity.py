"""Checking a run store before it is believed: the commit marker, array metadata, missing objects.

Format 2 writes every chunk, in shards that carry crc32c checksums, so a shard missing below the
commit marker is damage, found by one listing of the store; a damaged byte is found when its
chunk is read (:class:`CheckedArray` turns the codec's error into a
:class:`~statscope.errors.StoreDamagedError` naming the array and steps). Format 1 stores skip the
missing-object check: there an absent chunk may legitimately be all fill value.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from statscope import schema as S
from statscope.errors import StoreDamagedError

__all__ = ["Damage", "check_marker", "check_array", "step_damage", "missing_shards",
           "bounds_region", "chunk_regions", "row_axis", "opener", "CheckedArray"]


@dataclass(frozen=True)
class Damage:
    """A region of one array that cannot be read.

    Attributes:
        array: the array's name.
        rows: (first, stop) row range (steps by position, not by step value).
        columns: (first, stop) column range, or None for 1-D arrays.
        reason: what is wrong, e.g. ``"missing"`` or the codec's error.
    """

    array: str
    rows: tuple[int, int]
    columns: tuple[int, int] | None
    reason: str

    def describe(self, steps: np.ndarray | None = None) -> str:
        """The region in words: steps (by value, from ``steps``) of a per-step array, windows
        of a window summary, neurons of a per-neuron array such as ``running_mean0``."""
        first, stop = self.rows
        axis = row_axis(self.array)
        where = f"{axis} {first}..{stop - 1}"
        if axis == "rows" and steps is not None and len(steps) >= stop > first:
            where = f"steps {int(steps[first])}..{int(steps[stop - 1])}"
        cols = f", columns {self.columns[0]}..{self.columns[1] - 1}" if self.columns else ""
        return f"{self.array!r} {where}{cols}: {self.reason}"

    def to_json(self) -> dict:
        return {"array": self.array, "rows": list(self.rows),
                "columns": list(self.columns) if self.columns else None, "reason": self.reason}


def row_axis(name: str) -> str:
    """What the first axis of the array ``name`` counts, for messages: ``"neurons"`` (the
    initial running buffers), ``"windows"`` (window summaries) or ``"rows"`` (steps)."""
    if name in (S.RUNNING_MEAN0, S.RUNNING_VAR0):
        return "neurons"
    return "windows" if name.startswith(f"{S.WINDOWS_GROUP}/") else "rows"


def opener(names) -> str:
    """The function that reads the arrays ``names`` and takes ``damaged="mask"``:
    ``open_windows`` for window summaries, else ``open_run``."""
    names = list(names)
    if names and all(n.startswith(f"{S.WINDOWS_GROUP}/") for n in names):
        return "open_windows"
    return "open_run"


def check_marker(path: str, attrs: Mapping[str, Any]) -> int:
    """The committed row count, after checking that the marker and status are sane.

    Raises:
        StoreDamagedError: ``n_steps`` missing, not an integer, or negative; an unknown status.
    """
    n = attrs.get(S.ATTR_N_STEPS)
    status = attrs.get(S.ATTR_STATUS)
    if status not in S.STATUSES:
        raise StoreDamagedError(f"path={path!r}: status={status!r} in the run's attributes; "
                                f"expected one of {S.STATUSES}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StoreDamagedError(f"path={path!r}: the commit marker n_steps={n!r} is not a "
                                "non-negative integer; the run's metadata is damaged")
    last = attrs.get(S.ATTR_LAST_STEP)
    if (last is None) != (n == 0) or (last is not None and (isinstance(last, bool)
                                                           or not isinstance(last, int))):
        raise StoreDamagedError(f"path={path!r}: last_step={last!r} does not fit "
                                f"n_steps={n}; the run's metadata is damaged")
    return n


def step_damage(steps: np.ndarray, last: int | None) -> list[Damage]:
    """What is wrong with the committed step array ``steps`` (one value per row) against the
    marker's ``last_step``: rows whose steps do not increase (a row never written, read as the
    fill value -1; a second writer's rows) or a last row that is not ``last_step``. Each such
    row would be misfiled as another step's."""
    out = []
    bad = np.flatnonzero(np.diff(steps) <= 0)
    if bad.size:
        i = int(bad[0])
        out.append(Damage(S.STEP, (i, int(bad[-1]) + 2), None,
                          f"steps do not increase ({bad.size} places; rows {i}, {i + 1}: "
                          f"{int(steps[i])}, {int(steps[i + 1])})"))
    if steps.size and last is not None and int(steps[-1]) != int(last):
        out.append(Damage(S.STEP, (steps.size - 1, steps.size), None,
                          f"the last row's step {int(steps[-1])} is not the commit marker's "
                          f"last_step={last}"))
    return out


def check_array(path: str, name: str, arr, *, rows: int, width: int | None, dtype: str) -> None:
    """Check one array's metadata against what the run's attributes say it holds.

    Raises:
        StoreDamagedError: wrong dtype, too few rows or columns, or wrong dimensions.
    """
    shape = arr.shape
    want_dims = 1 if width is None else 2
    if len(shape) != want_dims or np.dtype(arr.dtype) != np.dtype(dtype):
        raise StoreDamagedError(f"path={path!r}: array {name!r} has shape {shape} and dtype "
                                f"{arr.dtype}; expected {want_dims} dims of {dtype}")
    if shape[0] < rows or (width is not None and shape[1] < width):
        raise StoreDamagedError(f"path={path!r}: array {name!r} has shape {shape} but the commit "
                                f"marker needs {rows} rows" + (f" × {width} columns"
                                                               if width is not None else ""))


def shard_shape(arr) -> tuple[int, ...]:
    """The shape of the objects an array is stored in (shards, or chunks when unsharded)."""
    return tuple(arr.shards or arr.chunks)


def missing_shards(name: str, arr, rows: int, width: int | None, keys: dict[str, int]
                   ) -> list[Damage]:
    """Shards of ``arr`` that hold committed rows but are not among ``keys`` (a listing: key to
    size), or are empty: zarr would read an empty shard as all fill value."""
    shape = shard_shape(arr)
    extent = (rows,) if width is None else (rows, width)
    if 0 in extent:
        return []
    counts = [math.ceil(e / s) for e, s in zip(extent, shape)]
    sep = arr.metadata.chunk_key_encoding.separator
    out = []
    for idx in itertools.product(*(range(c) for c in counts)):
        key = f"{name}/c{sep}" + sep.join(map(str, idx)) if sep == "/" else \
            f"{name}/c.{'.'.join(map(str, idx))}"
        if not keys.get(key):
            out.append(_region(name, idx, shape, extent, "missing" if key not in keys else "empty"))
    return out


def _region(name, idx, shape, extent, reason) -> Damage:
    r0 = idx[0] * shape[0]
    rows = (r0, min(r0 + shape[0], extent[0]))
    cols = None
    if len(idx) > 1:
        c0 = idx[1] * shape[1]
        cols = (c0, min(c0 + shape[1], extent[1]))
    return Damage(name, rows, cols, reason)


_READ_TRIES = 3
"""Reads of a region before it counts as damaged: zarr reads a shard's index and then its chunks
with separate requests, so a reader following a live run can pair the index of one version of a
shard with the bytes of the next (a checksum error); a read again sees one version."""


class CheckedArray:
    """A zarr array seen through ``[:rows, :width]``, whose read errors name the array and steps.

    Regions listed in ``masked`` read as ``fill`` instead of raising. Dask reads it block by
    block (``dask.array.from_array``).
    """

    def __init__(self, path: str, name: str, arr, rows: int, width: int | None, fill,
                 masked: list[Damage] = ()):
        self.path, self.name, self._arr = path, name, arr
        self.shape = (rows,) if width is None else (rows, width)
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)
        self.fill = fill
        self.masked = list(masked)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        bounds, after, squeeze = [], [], []
        for axis, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, (int, np.integer)):  # dask fuses x[:, 3] into the read
                k = int(k) + n if k < 0 else int(k)
                bounds.append((k, k + 1))
                after.append(slice(None))
                squeeze.append(axis)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step == 1:
                    bounds.append((start, max(start, stop)))
                    after.append(slice(None))
                else:
                    idx = np.arange(start, stop, step)
                    lo, hi = (int(idx.min()), int(idx.max()) + 1) if len(idx) else (0, 0)
                    bounds.append((lo, hi))
                    after.append(idx - lo)
            else:
                idx = np.asarray(k, np.int64)
                idx = np.where(idx < 0, idx + n, idx)
                lo, hi = (int(idx.min()), int(idx.max()) + 1) if idx.size else (0, 0)
                bounds.append((lo, hi))
                after.append(idx - lo)
        out = self._read(bounds)
        if any(not (isinstance(a, slice) and a == slice(None)) for a in after):
            for axis, a in enumerate(after):
                if not isinstance(a, slice):
                    out = np.take(out, a, axis=axis)
        return out.squeeze(tuple(squeeze)) if squeeze else out

    def _read(self, bounds) -> np.ndarray:
        masks = [d for d in self.masked if _overlaps(d, bounds)]
        try:
            out = self._read_again_if_torn(bounds)
        except Exception as exc:  # any codec, store or OS error: the bytes are not what was written
            if not masks:
                raise self._error(bounds, exc) from None
            out = self._read_around(bounds, masks)
        for d in masks:
            sel = [slice(max(d.rows[0], bounds[0][0]) - bounds[0][0],
                         min(d.rows[1], bounds[0][1]) - bounds[0][0])]
            if self.ndim > 1 and d.columns:
                sel.append(slice(max(d.columns[0], bounds[1][0]) - bounds[1][0],
                                 min(d.columns[1], bounds[1][1]) - bounds[1][0]))
            out[tuple(sel)] = self.fill
        return out

    def _read_around(self, bounds, masks: list[Damage]) -> np.ndarray:
        """``bounds`` read chunk by chunk, the chunks inside ``masks`` left as fill: a damaged
        chunk masks itself, not the rest of its shard."""
        out = np.full(tuple(b - a for a, b in bounds), self.fill, self.dtype)
        chunks = getattr(self._arr, "chunks", None)
        if chunks is None:  # no chunk grid to go by
            return out
        for piece in chunk_regions(tuple(chunks[:self.ndim]), bounds):
            if any(_covers(d, piece) for d in masks):
                continue
            try:
                block = self._read_again_if_torn(piece)
            except Exception as exc:  # noqa: BLE001 - a damaged chunk that is not masked
                raise self._error(piece, exc) from None
            out[tuple(slice(a - b[0], z - b[0]) for (a, z), b in zip(piece, bounds))] = block
        return out

    def _error(self, bounds, exc: Exception) -> StoreDamagedError:
        return StoreDamagedError(
            f"path={self.path!r}: array {self.name!r} {row_axis(self.name)} {bounds[0][0]}.."
            f"{bounds[0][1] - 1} cannot be read ({type(exc).__name__}: {exc}); pass "
            f"damaged='mask' to {opener([self.name])} to read the rest")

    def _read_again_if_torn(self, bounds) -> np.ndarray:
        region = bounds_region(bounds)
        for attempt in range(1, _READ_TRIES):
            try:
                return np.asarray(self._arr[region])
            except Exception:  # noqa: BLE001 - whatever it is, the last try below says it
                time.sleep(0.01 * attempt)  # let the writer's rename land
        return np.asarray(self._arr[region])


def bounds_region(bounds) -> tuple[slice, ...]:
    """``bounds`` ((start, stop) per axis) as the slices that index them."""
    return tuple(slice(a, b) for a, b in bounds)


def chunk_regions(chunks: tuple[int, ...], bounds) -> list[tuple[tuple[int, int], ...]]:
    """The parts of ``bounds`` ((start, stop) per axis) that each lie in one chunk of the grid
    ``chunks``, in row-major order."""
    axes = [[(max(lo, c), min(hi, c + size)) for c in range(lo - lo % size, hi, size)]
            for (lo, hi), size in zip(bounds, chunks)]
    return list(itertools.product(*axes))


def _covers(d: Damage, bounds) -> bool:
    if d.rows[0] > bounds[0][0] or d.rows[1] < bounds[0][1]:
        return False
    if d.columns and len(bounds) > 1:
        return d.columns[0] <= bounds[1][0] and d.columns[1] >= bounds[1][1]
    return True


def _overlaps(d: Damage, bounds) -> bool:
    if d.rows[1] <= bounds[0][0] or d.rows[0] >= bounds[0][1]:
        return False
    if d.columns and len(bounds) > 1:
        return not (d.columns[1] <= bounds[1][0] or d.columns[0] >= bounds[1][1])
    return True
