"""The data of the built-in experiments: MNIST, Fashion-MNIST and CIFAR-10, held in memory.

:func:`load_dataset` looks for a dataset in this order and takes the first complete copy:

1. ``data_dir``, when given: that folder only. Missing or bad files there are an error.
2. ``$STATSCOPE_DATA``, when set. Bad files are an error; missing files move on.
3. The cache, ``<cache_dir()>/<name>``: ``$STATSCOPE_CACHE``, else ``$XDG_CACHE_HOME/statscope``,
   else ``~/.cache/statscope``.
4. System folders: ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
5. A download into the cache (``download=True``), verified by md5 and renamed into place only
   when it matches, from ``mirrors``, else ``$STATSCOPE_<NAME>_URL`` (e.g.
   ``$STATSCOPE_MNIST_URL``), else the standard mirrors. A download that reached no mirror is
   not tried again from the same mirrors for a day (:mod:`statscope.experiments.download`).
6. MNIST only: the real 5,000-sample subset shipped in the package, with a
   :class:`~statscope.errors.StatscopeWarning`; the result is named ``"mnist-5k-subset"``.

In the folders of steps 1-2 the files may lie under ``<name>/`` (as in the cache) or in
torchvision's layout (``MNIST/raw``, ``FashionMNIST/raw``, ``cifar-10-batches-py``); loose in
the folder itself only for ``data_dir`` and CIFAR-10, whose file names say what they hold. IDX
files may be plain or ``.gz``; CIFAR-10 may be the extracted ``cifar-10-batches-py`` folder or
``cifar-10-python.tar.gz``.
Nothing is ever written outside the cache.
"""

from __future__ import annotations

import importlib.resources
import os
import pickle
import posixpath
import tarfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from statscope.errors import StatscopeError, StatscopeWarning
from statscope.experiments.download import (FAILED_MARKER, CacheNotWritableError,
                                            UnreachableError, download as _download,
                                            forget_failure, recent_failure, remember_failure,
                                            retry_seconds)
from statscope.experiments.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["DATASET_NAMES", "Dataset", "cache_dir", "load_dataset"]

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "mnist-5k-subset")

SUBSET_NAME = "mnist-5k-subset"
_SUBSET_FILE = "mnist_5k.npz"
_SUBSET_TRAIN_PER_CLASS = 400
_IDX_STEMS = (("train-images-idx3-ubyte", IMAGES_MAGIC), ("train-labels-idx1-ubyte", LABELS_MAGIC),
              ("t10k-images-idx3-ubyte", IMAGES_MAGIC), ("t10k-labels-idx1-ubyte", LABELS_MAGIC))
_CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                  "data_batch_5", "test_batch")
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


@dataclass(frozen=True)
class _Spec:
    name: str
    files: tuple[tuple[str, str], ...]  # (download file name, md5)
    mirrors: tuple[str, ...]
    torchvision_dir: str
    system_dirs: tuple[str, ...] = ()
    fallback: bool = False

    @property
    def url_env(self) -> str:
        return f"STATSCOPE_{self.name.upper().replace('-', '_')}_URL"


_SPECS = {spec.name: spec for spec in (
    _Spec("mnist", (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
          ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
          "MNIST/raw", fallback=True),
    _Spec("fashion-mnist", (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
          ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
          "FashionMNIST/raw", system_dirs=("/usr/share/datasets/fashion-mnist",)),
    _Spec("cifar10", ((_CIFAR_ARCHIVE, "c58f30108f718f92721af3b95e74349a"),),
          ("https://www.cs.toronto.edu/~kriz/",), "cifar-10-batches-py"),
)}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in memory as torch tensors.

    Attributes:
        name: the dataset actually loaded: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or
            ``"mnist-5k-subset"`` (the offline fallback; record it with the run).
        source: the folder, archive or shipped file the data was read from.
        train_x: uint8 pixels 0..255, (N, 28, 28) for the MNISTs, (N, 3, 32, 32) for CIFAR-10.
        train_y: int64 class labels 0..9, (N,).
        test_x: as ``train_x``, (M, ...).
        test_y: as ``train_y``, (M,).
        mean: the training set's pixel mean in [0, 1] units (pixel / 255): one value for the
            greyscale sets, one per channel (R, G, B) for CIFAR-10.
        std: the matching population standard deviations, same units and length.
    """

    name: str
    source: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """The number of classes, 10 for every built-in dataset."""
        return 10

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` with the training set's statistics.

        Args:
            x: uint8 pixels shaped like ``train_x`` or a batch of it, (B, 28, 28) or
                (B, 3, 32, 32), on any device.

        Returns:
            float32 tensor of the same shape and device.

        Example:
            >>> ds = load_dataset("mnist-5k-subset")
            >>> z = ds.normalize(ds.train_x)
            >>> round(z.mean().item(), 4), round(z.std(unbiased=False).item(), 4)
            (0.0, 1.0)
        """
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return (x.to(torch.float32) / 255.0 - mean) / std


def cache_dir() -> Path:
    """The download cache: ``$STATSCOPE_CACHE``, else ``$XDG_CACHE_HOME/statscope``, else
    ``~/.cache/statscope``. Each dataset lives in a subfolder named after it.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict("os.environ", {"STATSCOPE_CACHE": "/data/cache"}):
        ...     print(cache_dir())
        /data/cache
    """
    if os.environ.get("STATSCOPE_CACHE"):
        return Path(os.environ["STATSCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "statscope"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 quiet: bool = False, mirrors: str | Sequence[str] | None = None,
                 checksums: Mapping[str, str] | None = None) -> Dataset:
    """Load a built-in dataset into memory, looking for it in the order the module describes.

    Args:
        name: one of :data:`DATASET_NAMES`. ``"mnist-5k-subset"`` asks for the shipped subset
            directly (no warning): 4,000 train / 1,000 test images, 400 / 100 per class.
        data_dir: a folder holding the files; when given, nothing else is searched.
        download: allow step 5, a download into the cache.
        quiet: no download progress bar.
        mirrors: base URLs to download from, tried in order; overrides ``$STATSCOPE_<NAME>_URL``
            (whitespace-separated URLs) and the standard mirrors.
        checksums: file name -> md5 overriding the published checksums, e.g. for a private
            mirror of repackaged files.

    Returns:
        Dataset with uint8 images, int64 labels and the training set's mean/std.

    Raises:
        StatscopeError: an unknown ``name``; ``data_dir`` missing, incomplete or with a bad
            file (truncated, wrong IDX magic, unreadable batch); a bad file in
            ``$STATSCOPE_DATA`` or the cache; a download whose md5 does not match; and for
            Fashion-MNIST and CIFAR-10, no copy found and none downloadable.

    Warns:
        StatscopeWarning: MNIST could be neither found nor downloaded; the subset is used.

    Example:
        >>> ds = load_dataset("mnist-5k-subset")
        >>> ds.name, tuple(ds.train_x.shape), tuple(ds.test_y.shape), ds.train_x.dtype
        ('mnist-5k-subset', (4000, 28, 28), (1000,), torch.uint8)
    """
    if name not in DATASET_NAMES:
        raise StatscopeError(f"name={name!r}: unknown dataset; available: "
                             + ", ".join(DATASET_NAMES))
    if name == SUBSET_NAME:
        if data_dir is not None:
            raise StatscopeError(f"data_dir={str(data_dir)!r}: {SUBSET_NAME!r} is shipped in "
                                 "the package and reads no data_dir; leave it out")
        return _load_subset()
    spec = _SPECS[name]
    if data_dir is not None:
        return _load_root(spec, Path(data_dir).expanduser(), "data_dir", required=True)
    searched = []
    if os.environ.get("STATSCOPE_DATA"):
        root = Path(os.environ["STATSCOPE_DATA"]).expanduser()
        searched.append(str(root))
        found = _load_root(spec, root, "$STATSCOPE_DATA", required=False)
        if found is not None:
            return found
    cache = cache_dir() / spec.name
    for folder, label in [(cache, "cache"), *((Path(d), "system_dir") for d in spec.system_dirs)]:
        searched.append(str(folder))
        found = _load_folder(spec, folder, label, folder)
        if found is not None:
            return found
    if not download:
        reason = "download=False"
    else:
        urls = _mirrors(spec, mirrors)
        period = _period(retry_seconds())
        failed = recent_failure(cache, urls)
        if failed is not None:
            reason = (f"its download failed {failed.ago()} (not retried for {period}; delete "
                      f"{FAILED_MARKER} there to retry now)")
        else:
            try:
                _download_missing(spec, cache, urls, checksums, quiet)
                forget_failure(cache)
                return _load_folder(spec, cache, "cache", cache)
            except CacheNotWritableError as exc:
                # nothing can be downloaded into it (a read-only cache): as offline
                reason = f"it could not be downloaded: the cache {exc}"
            except UnreachableError as exc:
                url, why = exc.tried[0] if exc.tried else ("", str(exc))
                remember_failure(cache, urls, f"{url}: {why}")
                more = len(exc.tried) - 1
                reason = (f"its download failed ({urlsplit(url).netloc or url}: {why}"
                          + (f", and {more} more mirror{'s' if more > 1 else ''}" if more > 0
                             else "") + f"; not retried for {period})")
    where = ", ".join(searched)
    if not spec.fallback:
        raise StatscopeError(f"name={name!r}: not found in {where}, and {reason}; pass data_dir "
                             "or see docs/data.md for offline machines")
    warnings.warn(f"name={name!r}: not found in {where}, and {reason}; using the bundled "
                  f"{SUBSET_NAME!r} (5,000 real images, not comparable with full MNIST)",
                  StatscopeWarning, stacklevel=2)
    return _load_subset()


def _load_root(spec: _Spec, root: Path, arg: str, *, required: bool) -> Dataset | None:
    """The first complete copy in ``root/<name>``, the torchvision layout or ``root`` itself."""
    # Loose IDX files in a shared root could be MNIST or Fashion-MNIST; CIFAR's names are unique.
    loose = required or spec.name == "cifar10"
    folders = [root / spec.name, root / spec.torchvision_dir, *([root] if loose else [])]
    for folder in folders:
        found = _load_folder(spec, folder, arg, root)
        if found is not None:
            return found
    if not required:
        return None
    if not root.is_dir():
        raise StatscopeError(f"{arg}={str(root)!r}: no such folder")
    if spec.name == "cifar10":
        expected = f"{', '.join(_CIFAR_BATCHES)} or {_CIFAR_ARCHIVE}"
    else:
        expected = ", ".join(f"{stem}[.gz]" for stem, _ in _IDX_STEMS)
    raise StatscopeError(f"{arg}={str(root)!r}: no complete {spec.name} copy; expected "
                         f"{expected} in one of " + ", ".join(str(f) for f in folders))


def _load_folder(spec: _Spec, folder: Path, arg: str, root: Path) -> Dataset | None:
    """The dataset in ``folder``, ``None`` if a file is missing; bad files raise."""
    if not folder.is_dir():
        return None
    if spec.name == "cifar10":
        if all((folder / batch).is_file() for batch in _CIFAR_BATCHES):
            return _read_cifar(folder, arg, root)
        if (folder / _CIFAR_ARCHIVE).is_file():
            return _read_cifar(folder / _CIFAR_ARCHIVE, arg, root)
        return None
    paths = [_idx_path(folder, stem) for stem, _ in _IDX_STEMS]
    if None in paths:
        return None
    return _read_mnist_like(spec.name, paths, arg, root)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _bad(arg: str, root: Path, path: Path, reason: str) -> StatscopeError:
    hint = "; delete it to download it again" if arg == "cache" else ""
    return StatscopeError(f"{arg}={str(root)!r}: {path.relative_to(root)} {reason}{hint}")


def _read_mnist_like(name: str, paths: list[Path], arg: str, root: Path) -> Dataset:
    arrays = []
    for path, (_, magic) in zip(paths, _IDX_STEMS):
        try:
            arrays.append(parse_idx(read_bytes(path), expect_magic=magic))
        except StatscopeError as exc:
            raise _bad(arg, root, path, str(exc)) from exc
    for i in (0, 2):
        images, labels = arrays[i], arrays[i + 1]
        if images.shape[1:] != (28, 28):
            raise _bad(arg, root, paths[i], f"has shape {images.shape}, expected (N, 28, 28)")
        if labels.shape != images.shape[:1]:
            raise _bad(arg, root, paths[i + 1], f"has {labels.shape[0]} labels for "
                       f"{images.shape[0]} images in {paths[i].name}")
        if images.shape[0] == 0:
            raise _bad(arg, root, paths[i], "holds no images")
        if labels.size and labels.max() > 9:
            raise _bad(arg, root, paths[i + 1], f"has label {labels.max()}, expected 0..9")
    source = str(paths[0].parent)
    return _make(name, source, *arrays)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing else.

    Pickle can run arbitrary code; a data folder is not trusted to that degree.
    """

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 spells bytes in Python 3
            return super().find_class(module, name)
        allowed = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                      "numpy.core.numeric", "numpy._core.numeric") and name in allowed:
            # Old pickles name numpy.core, which numpy 2 only keeps as a deprecated alias.
            module = "numpy._core" + module[len("numpy.core"):] if (
                module.startswith("numpy.core") and hasattr(np, "_core")) else module
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refuses the global {module}.{name}")


def _read_cifar(path: Path, arg: str, root: Path) -> Dataset:
    batches = {}
    if path.is_dir():
        for batch in _CIFAR_BATCHES:
            try:
                with open(path / batch, "rb") as handle:
                    batches[batch] = _parse_cifar_batch(handle)
            # A damaged pickle may raise "AttributeError, EOFError, ImportError, and IndexError"
            # and more (pickle docs); each must name the file, not escape as itself.
            except Exception as exc:
                raise _bad(arg, root, path / batch, f"is not a CIFAR-10 batch ({exc})") from exc
    else:
        try:
            with tarfile.open(path, "r:gz") as archive:
                for member in archive:
                    batch = posixpath.basename(member.name)
                    if batch in _CIFAR_BATCHES and member.isfile():
                        batches[batch] = _parse_cifar_batch(archive.extractfile(member))
        except Exception as exc:  # as above, plus OSError, TarError or zlib.error from the archive
            raise _bad(arg, root, path, f"is not a readable CIFAR-10 archive ({exc})") from exc
        missing = [b for b in _CIFAR_BATCHES if b not in batches]
        if missing:
            raise _bad(arg, root, path, "lacks " + ", ".join(missing))
    train = [batches[b] for b in _CIFAR_BATCHES[:-1]]
    return _make("cifar10", str(path), np.concatenate([x for x, _ in train]),
                 np.concatenate([y for _, y in train]), *batches["test_batch"])


def _parse_cifar_batch(handle) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, 32, 32) uint8, labels (n,) uint8) from one pickled batch dict."""
    record = _CifarUnpickler(handle, encoding="bytes").load()
    if not isinstance(record, dict):
        raise StatscopeError(f"holds a {type(record).__name__}, expected a dict")
    data = record.get(b"data", record.get("data"))
    labels = record.get(b"labels", record.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise StatscopeError(f"data is {got}, expected uint8 (n, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise StatscopeError(f"labels are not integers ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise StatscopeError(f"has {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise StatscopeError(f"labels span {labels.min()}..{labels.max()}, expected 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _period(seconds: float) -> str:
    return "a day" if seconds == 86400 else f"{seconds:g} s"


def _mirrors(spec: _Spec, mirrors: str | Sequence[str] | None) -> tuple[str, ...]:
    """The base URLs to download ``spec`` from: ``mirrors``, else ``$STATSCOPE_<NAME>_URL``,
    else the standard ones."""
    if isinstance(mirrors, str):
        return (mirrors,)
    if mirrors is None:
        return tuple(os.environ.get(spec.url_env, "").split() or spec.mirrors)
    return tuple(mirrors)


def _download_missing(spec: _Spec, cache: Path, mirrors: Sequence[str], checksums,
                      quiet: bool) -> None:
    known = dict(spec.files)
    for filename in checksums or {}:
        if filename not in known:
            raise StatscopeError(f"checksums={dict(checksums)!r}: {filename!r} is not a "
                                 f"{spec.name} file; expected " + ", ".join(known))
    md5s = {**known, **(checksums or {})}
    for filename, md5 in md5s.items():
        if not (cache / filename).is_file():
            _download(filename, md5, list(mirrors), cache, quiet=quiet)


def _load_subset() -> Dataset:
    resource = importlib.resources.files("statscope.experiments") / "data" / _SUBSET_FILE
    with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    train, test = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        train.append(rows[:_SUBSET_TRAIN_PER_CLASS])
        test.append(rows[_SUBSET_TRAIN_PER_CLASS:])
    # The file is sorted by class; a fixed shuffle keeps batches taken in order mixed.
    rng = np.random.default_rng(0)
    train, test = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
    return _make(SUBSET_NAME, str(resource), images[train], labels[train], images[test],
                 labels[test])


def _make(name: str, source: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
          test_y: np.ndarray) -> Dataset:
    import torch

    mean, std = _pixel_stats(train_x)
    return Dataset(name=name, source=source,
                   train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
                   train_y=torch.from_numpy(train_y.astype(np.int64)),
                   test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
                   test_y=torch.from_numpy(test_y.astype(np.int64)), mean=mean, std=std)


def _pixel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact mean and population std in [0, 1] units from 256-bin histograms: global for
    (N, H, W), per channel for (N, C, H, W)."""
    planes = [images] if images.ndim == 3 else [images[:, c] for c in range(images.shape[1])]
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for plane in planes:
        counts = np.bincount(plane.ravel(), minlength=256).astype(np.float64)
        mean = counts @ values / counts.sum()
        means.append(float(mean))
        stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())))
    return tuple(means), tuple(stds)
