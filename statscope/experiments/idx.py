"""The IDX file format of MNIST and Fashion-MNIST: a strict reader.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the values in C order, big-endian. MNIST images have magic 2051 (uint8,
3 dims) and labels magic 2049 (uint8, 1 dim). Files may be gzip-compressed; the gzip signature is
recognised from the content, not the file name.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from statscope.errors import StatscopeError

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "read_idx"]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_SIGNATURE = b"\x1f\x8b"


def read_idx(path: str | os.PathLike, *, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file, plain or gzip-compressed, and check that it is complete.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.
        expect_magic: the magic number the file must have (2051 for MNIST images, 2049 for
            labels); ``None`` accepts any valid IDX type.

    Returns:
        ndarray with the shape the header declares, in native byte order; uint8 for MNIST,
        e.g. (60000, 28, 28) images or (60000,) labels.

    Raises:
        StatscopeError: naming ``path`` when the file cannot be read, is not gzip or IDX, has the
            wrong magic number, is truncated, or has bytes past the declared end.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> _ = f.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
        >>> read_idx(f, expect_magic=LABELS_MAGIC)
        array([7, 2, 1], dtype=uint8)
    """
    try:
        return parse_idx(read_bytes(path), expect_magic=expect_magic)
    except StatscopeError as exc:
        raise StatscopeError(f"path={os.fspath(path)!r}: {exc}") from exc


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of ``path``, gunzipped when it starts with the gzip signature.

    Raises:
        StatscopeError: with the reason only (the caller names the file) when the file cannot be
            read or its gzip stream is truncated or corrupt.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise StatscopeError(f"cannot be read ({exc.strerror or exc})") from exc
    if not raw.startswith(_GZIP_SIGNATURE):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise StatscopeError(f"truncated or corrupt gzip data ({exc})") from exc


def parse_idx(buf: bytes, *, expect_magic: int | None = None) -> np.ndarray:
    """Parse IDX bytes (already decompressed); see :func:`read_idx`.

    Raises:
        StatscopeError: with the reason only, e.g. ``has magic 2049, expected 2051``.

    Example:
        >>> parse_idx(bytes([0, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0, 2, 5, 6])).tolist()
        [[5, 6]]
    """
    if len(buf) < 4:
        raise StatscopeError(f"truncated: {len(buf)} bytes, shorter than the 4-byte IDX magic")
    magic = int.from_bytes(buf[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        raise StatscopeError(f"has magic {magic}, expected {expect_magic}")
    code, ndim = buf[2], buf[3]
    if buf[:2] != b"\x00\x00" or code not in _DTYPES or ndim == 0:
        raise StatscopeError(f"has magic {magic}, which is not an IDX magic number")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise StatscopeError(f"truncated: {len(buf)} bytes, the {ndim}-dim header needs {header}")
    shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        kind = "truncated" if len(buf) < expected else "has trailing bytes"
        raise StatscopeError(f"{kind}: {len(buf)} bytes, header shape {shape} needs {expected}")
    values = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)
