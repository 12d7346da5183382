"""The arrays of a run store as a reader meets them: checked against the attributes, listed for
missing shards, read through :class:`~statscope.integrity.CheckedArray` into lazy dask arrays.

:func:`statscope.store.open_run` and :func:`statscope.store.open_windows` build their Datasets
from these pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StoreDamagedError, StoreError
from statscope.integrity import (CheckedArray, Damage, bounds_region, check_array,
                                 chunk_regions, missing_shards, opener, shard_shape)
from statscope.storage import list_keys

__all__ = ["Entry", "entries", "missing", "verify", "lazy", "check_chunks", "expand"]


@dataclass(frozen=True)
class Entry:
    """One array of a run and the part of it a reader may see.

    Attributes:
        array: the zarr array.
        rows: rows below the commit marker.
        width: columns named by the attributes (None for 1-D arrays).
        fill: what a masked (damaged) region reads as.
    """

    array: Any
    rows: int
    width: int | None
    fill: Any


def entries(path: str, group, want: Mapping[str, tuple[int, int | None, str, Any]],
            optional: Mapping[str, tuple[int, int | None, str, Any]] = {}) -> dict[str, Entry]:
    """Open and check the arrays ``want`` (name -> rows, width, dtype, fill), and those of
    ``optional`` that exist.

    Raises:
        StoreDamagedError: an array is missing, its metadata cannot be read or does not fit.
    """
    out = {}
    for name, spec in [*want.items(), *optional.items()]:
        try:
            arr = group[name]
        except KeyError:
            if name in optional:
                continue
            if spec[0] == 0:
                # nothing committed yet, and a writer makes its arrays after the run's root
                # attributes: a run read during its first moments, or killed before its first
                # commit, is an empty run, not a damaged one
                out[name] = Entry(_empty_array(*spec), 0, spec[1], spec[3])
                continue
            raise StoreDamagedError(f"path={path!r}: array {name!r} is named by the run's "
                                    "attributes but missing") from None
        except Exception as exc:  # damaged zarr.json of the array
            raise StoreDamagedError(f"path={path!r}: array {name!r} metadata cannot be read "
                                    f"({type(exc).__name__}: {exc})") from None
        rows, width, dtype, fill = spec
        check_array(path, name, arr, rows=rows, width=width, dtype=dtype)
        out[name] = Entry(arr, rows, width, fill)
    return out


def _empty_array(rows: int, width: int | None, dtype: str, fill: Any):
    """An in-memory zarr array of no rows, standing in for one a writer has not made yet."""
    import zarr

    shape = (0,) if width is None else (0, width)
    chunks = (1,) if width is None else (1, max(width, 1))
    return zarr.create_array(store=zarr.storage.MemoryStore(), shape=shape, chunks=chunks,
                             dtype=dtype, fill_value=fill)


def missing(path: str, attrs: Mapping[str, Any], arrays: Mapping[str, Entry]) -> list[Damage]:
    """Shards below the commit marker that are absent or empty, from one listing (format 2)."""
    if attrs.get(S.ATTR_FORMAT, 1) < 2:
        return []  # format 1 left all-fill chunks unwritten: absence is not damage there
    try:
        keys = list_keys(path)
    except OSError as exc:
        raise StoreError(f"path={path!r}: cannot list the run ({exc})") from None
    out = []
    for name, e in arrays.items():
        out += missing_shards(name, e.array, e.rows, e.width, keys)
    return out


def verify(path: str, attrs: Mapping[str, Any], arrays: Mapping[str, Entry]) -> list[Damage]:
    """:func:`missing`, then every other shard read once: what cannot be read is damaged, chunk
    by chunk (each chunk carries its own checksum); a shard none of whose chunks can be read
    (its index is damaged) is damaged as a whole."""
    found = missing(path, attrs, arrays)
    for name, e in arrays.items():
        shape = shard_shape(e.array)
        for r0 in range(0, e.rows, shape[0]):
            for c0 in range(0, e.width, shape[1]) if e.width is not None else (None,):
                bounds = ((r0, min(r0 + shape[0], e.rows)),)
                if c0 is not None:
                    bounds += ((c0, min(c0 + shape[1], e.width)),)
                if any(d.array == name and d.rows[0] == r0
                       and (c0 is None or d.columns[0] == c0) for d in found):
                    continue
                try:
                    e.array[bounds_region(bounds)]
                except Exception:  # noqa: BLE001 - the chunks below say which and why
                    found += _damaged_chunks(name, e.array, bounds)
    return found


def _damaged_chunks(name: str, arr, bounds) -> list[Damage]:
    """The chunks of the shard ``bounds`` of ``arr`` that cannot be read, or the whole shard
    when none can."""
    bad = []
    pieces = chunk_regions(tuple(arr.chunks), bounds)
    for piece in pieces:
        try:
            arr[bounds_region(piece)]
        except Exception as exc:  # the codec's checksum or decompression failed
            bad.append((piece, f"unreadable ({type(exc).__name__}: {exc})"))
    if bad and len(bad) == len(pieces):
        bad = [(bounds, bad[0][1])]
    return [Damage(name, piece[0], piece[1] if len(piece) > 1 else None, reason)
            for piece, reason in bad]


def lazy(path: str, name: str, e: Entry, found: list[Damage], chunks: Mapping[str, int] | None,
         token: str, whole_shards: bool = False):
    """A dask array of the visible part of ``e``, one task per shard, masked where ``found``
    says, rechunked to ``chunks`` (by dimension name) if given. With ``whole_shards``, a task
    reads a whole shard (for arrays read by whole rows, such as window summaries)."""
    import dask.array as da

    checked = CheckedArray(path, name, e.array, e.rows, e.width, e.fill,
                           [d for d in found if d.array == name])
    # a task per shard's rows and per chunk's columns: reading a few neurons decodes only
    # their chunks, and a whole read runs in parallel over column blocks (both measured)
    shape = shard_shape(e.array)[:1] + tuple(e.array.chunks[1:checked.ndim])
    if whole_shards:  # a task per chunk re-reads its shard's index: whole rows ~7x faster
        shape = shard_shape(e.array)[:checked.ndim]
    native = da.from_array(checked, chunks=shape, asarray=False, lock=False,
                           name=f"statscope-{path}-{name}-{e.rows}-{token}")
    if not chunks:
        return native
    names = e.array.metadata.dimension_names or ()
    alias = {S.EN_GROUP: S.NEURON, S.PROBE: S.NEURON}
    return native.rechunk(tuple(chunks.get(alias.get(d, d), c)
                                for d, c in zip(names, native.chunksize)))


def check_chunks(chunks, dims: tuple[str, ...]) -> None:
    """Raise StatscopeError unless ``chunks`` maps some of ``dims`` to positive ints."""
    if chunks is None:
        return
    if not isinstance(chunks, Mapping):
        raise StatscopeError(f"chunks={chunks!r}: expected a mapping like {{'{dims[0]}': 4096}}")
    for dim, size in chunks.items():
        if dim not in dims:
            raise StatscopeError(f"chunks={dict(chunks)!r}: unknown dimension {dim!r}; "
                                 f"expected one of {list(dims)}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise StatscopeError(f"chunks={dict(chunks)!r}: {dim}={size!r} must be a positive "
                                 "int")


def expand(columns, index: np.ndarray, block: int = 8192):
    """``columns[:, index]`` chunk by chunk: one task per row chunk and per ``block`` output
    columns, not one per column. The column blocks let a read of a few neurons of a wide run
    build only their blocks (one block of all 655,360 neurons was 1.3 GB of int64 ``count``
    per 256 rows, for two columns)."""
    import dask.array as da

    whole = columns.rechunk({1: -1})
    if len(index) <= block:
        return whole.map_blocks(lambda b: b[:, index], dtype=columns.dtype,
                                chunks=(whole.chunks[0], (len(index),)))
    parts = [whole.map_blocks(lambda b, part=index[lo:lo + block]: b[:, part],
                              dtype=columns.dtype,
                              chunks=(whole.chunks[0], (len(index[lo:lo + block]),)))
             for lo in range(0, len(index), block)]
    return da.concatenate(parts, axis=1)


def damage_error(path: str, found: list[Damage], steps: np.ndarray | None) -> StoreDamagedError:
    """The error for regions that are damaged, naming up to five of them."""
    return StoreDamagedError(f"path={path!r}: " + "; ".join(d.describe(steps) for d in found[:5])
                             + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
                             + f"; pass damaged='mask' to {opener(d.array for d in found)} "
                             "to read the rest")
