"""Local dataset loading: the IDX reader, data folders, the shipped subset, CIFAR-10 batches."""

import dataclasses
import doctest
import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from statscope.errors import StatscopeError, StatscopeWarning
from statscope.experiments import datasets, download, idx
from statscope.experiments.datasets import DATASET_NAMES, load_dataset
from statscope.experiments.idx import read_idx

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
          np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}
_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
          "t10k-labels-idx1-ubyte")


def idx_bytes(array):
    """An IDX encoding written from the format's definition, independent of the reader."""
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I",
                                                                           *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def make_mnist_arrays(seed=0, n_train=50, n_test=20):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test, dtype=np.uint8))


def write_mnist(folder, arrays, *, gz):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(_STEMS, arrays):
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


pytestmark = pytest.mark.usefixtures("isolated_env")


# ---- read_idx --------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(sorted(_CODES, key=str)),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), gz=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_read_idx_round_trips_every_dtype_and_shape(tmp_path_factory, dtype, shape, gz, seed):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("idx") / "f"
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    got = read_idx(path)
    assert got.dtype == dtype.newbyteorder("=") and got.shape == tuple(shape)
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_wrong_magic_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(StatscopeError, match=r"path='.*train-images-idx3-ubyte': has magic "
                                             r"2049, expected 2051"):
        read_idx(path, expect_magic=idx.IMAGES_MAGIC)


@pytest.mark.parametrize("cut", [2, 9, 4 + 12 + 100])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rejects_truncated_files(tmp_path, cut, gz):
    data = idx_bytes(np.ones((2, 28, 28), np.uint8))[:cut]
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data)[:-9] if gz else data)
    with pytest.raises(StatscopeError, match=r"t10k-images-idx3-ubyte'.*truncated"):
        read_idx(path)


@pytest.mark.parametrize("data, reason", [
    (idx_bytes(np.zeros(3, np.uint8)) + b"\0", "trailing bytes"),
    (b"PK\x03\x04 not an idx file", "not an IDX magic"),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 0]), "not an IDX magic"),
])
def test_read_idx_rejects_malformed_files(tmp_path, data, reason):
    path = tmp_path / "f"
    path.write_bytes(data)
    with pytest.raises(StatscopeError, match=reason):
        read_idx(path)


def test_read_idx_missing_file_is_a_statscope_error(tmp_path):
    with pytest.raises(StatscopeError, match="cannot be read"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("module", [idx, download, datasets])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---- MNIST-format folders ----------------------------------------------------------------------

@pytest.mark.parametrize("layout, gz", [(".", False), ("MNIST/raw", True), ("mnist", True)])
def test_data_dir_loads_flat_and_torchvision_layouts(tmp_path, layout, gz):
    arrays = make_mnist_arrays()
    write_mnist(tmp_path / "data" / layout, arrays, gz=gz)
    ds = load_dataset("mnist", tmp_path / "data", download=False)
    assert ds.name == "mnist" and Path(ds.source) == tmp_path / "data" / layout
    for got, want in zip((ds.train_x, ds.train_y, ds.test_x, ds.test_y), arrays):
        np.testing.assert_array_equal(got.numpy(), want)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    pixels = arrays[0].astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-12)


def test_fashion_mnist_uses_its_torchvision_folder(tmp_path):
    arrays = make_mnist_arrays(seed=1)
    write_mnist(tmp_path / "MNIST" / "raw", make_mnist_arrays(seed=2), gz=True)
    write_mnist(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.source.endswith("FashionMNIST/raw")
    np.testing.assert_array_equal(ds.test_x.numpy(), arrays[2])


def test_wrong_magic_in_data_dir_is_an_error_and_nothing_is_overwritten(tmp_path):
    folder = tmp_path / "d"
    arrays = list(make_mnist_arrays())
    write_mnist(folder, arrays, gz=False)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(arrays[1]))
    before = snapshot(tmp_path)
    expected = (f"data_dir='{folder}': train-images-idx3-ubyte has magic 2049, expected 2051")
    with pytest.raises(StatscopeError, match=expected):
        load_dataset("mnist", folder)
    assert snapshot(tmp_path) == before


def test_truncated_gz_in_data_dir_is_an_error_and_nothing_is_overwritten(tmp_path):
    folder = tmp_path / "d"
    write_mnist(folder, make_mnist_arrays(), gz=True)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    before = snapshot(tmp_path)
    with pytest.raises(StatscopeError, match=r"data_dir='.*/d': t10k-labels-idx1-ubyte.gz "
                                             r"truncated or corrupt gzip"):
        load_dataset("mnist", folder)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit, reason", [
    (lambda a: [a[0][:, :27, :27].copy(), *a[1:]], r"has shape \(50, 27, 27\), expected"),
    (lambda a: [a[0], a[1][:-1], *a[2:]], "has 49 labels for 50 images"),
    (lambda a: [*a[:3], a[3] + 10], "expected 0..9"),
])
def test_inconsistent_mnist_folder_is_an_error(tmp_path, edit, reason):
    write_mnist(tmp_path, edit(list(make_mnist_arrays())), gz=False)
    with pytest.raises(StatscopeError, match=reason):
        load_dataset("mnist", tmp_path)


def test_data_dir_lacking_files_says_what_was_expected(tmp_path):
    write_mnist(tmp_path, make_mnist_arrays(), gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(StatscopeError, match=r"no complete mnist copy; expected "
                                             r".*t10k-images-idx3-ubyte\[\.gz\].*MNIST/raw"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(StatscopeError, match=r"data_dir='.*/absent': no such folder"):
        load_dataset("mnist", tmp_path / "absent")


def test_statscope_data_env_is_searched_and_bad_files_there_are_errors(tmp_path, monkeypatch):
    arrays = make_mnist_arrays()
    write_mnist(tmp_path / "env" / "MNIST" / "raw", arrays, gz=True)
    monkeypatch.setenv("STATSCOPE_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(load_dataset("mnist", download=False).train_y.numpy(),
                                  arrays[1])
    (tmp_path / "env" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(StatscopeError, match=r"\$STATSCOPE_DATA='.*/env': MNIST/raw/"
                                             r"train-labels-idx1-ubyte.gz has magic"):
        load_dataset("mnist", download=False)


def test_statscope_data_without_the_dataset_moves_on_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STATSCOPE_DATA", str(tmp_path / "env"))
    (tmp_path / "env").mkdir()
    arrays = make_mnist_arrays(seed=3)
    write_mnist(tmp_path / "cache" / "mnist", arrays, gz=True)
    ds = load_dataset("mnist", download=False)
    assert ds.source == str(tmp_path / "cache" / "mnist")
    np.testing.assert_array_equal(ds.train_x.numpy(), arrays[0])


def test_loose_files_in_a_shared_root_are_not_guessed_to_be_a_dataset(tmp_path, monkeypatch):
    write_mnist(tmp_path / "env", make_mnist_arrays(), gz=True)  # MNIST or Fashion-MNIST?
    monkeypatch.setenv("STATSCOPE_DATA", str(tmp_path / "env"))
    no_debian = dataclasses.replace(datasets._SPECS["fashion-mnist"], system_dirs=())
    monkeypatch.setitem(datasets._SPECS, "fashion-mnist", no_debian)
    with pytest.raises(StatscopeError, match=r"name='fashion-mnist': not found in .*/env, "):
        load_dataset("fashion-mnist", download=False)
    # A data_dir is taken at its word, but a dataset's own subfolder comes first.
    fashion = make_mnist_arrays(seed=5)
    write_mnist(tmp_path / "env" / "FashionMNIST" / "raw", fashion, gz=False)
    ds = load_dataset("fashion-mnist", tmp_path / "env")
    np.testing.assert_array_equal(ds.train_x.numpy(), fashion[0])
    assert load_dataset("mnist", tmp_path / "env").source == str(tmp_path / "env")


def test_unknown_name_lists_the_datasets():
    with pytest.raises(StatscopeError, match="name='cifar100': unknown dataset; available: "
                                             + ", ".join(DATASET_NAMES)):
        load_dataset("cifar100")


# ---- the shipped subset --------------------------------------------------------------------

def test_shipped_subset_is_real_stratified_mnist():
    ds = load_dataset("mnist-5k-subset")
    assert ds.name == "mnist-5k-subset" and Path(ds.source).stat().st_size < 1_000_000
    assert tuple(ds.train_x.shape) == (4000, 28, 28) and tuple(ds.test_x.shape) == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(ds.train_y.numpy()), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(ds.test_y.numpy()), np.full(10, 100))
    train, test = ds.train_x.numpy(), ds.test_x.numpy()
    assert train.min() == 0 and train.max() == 255
    assert not {x.tobytes() for x in test} & {x.tobytes() for x in train}
    assert len(set(ds.train_y[:40].tolist())) == 10, "classes must be mixed, not sorted"
    # Handwritten digits are centred on a blank border and differ by class; noise is neither.
    border = np.concatenate([train[:, :2].ravel(), train[:, -2:].ravel(),
                             train[:, :, :2].ravel(), train[:, :, -2:].ravel()])
    assert border.mean() < 1 and train[:, 10:18, 10:18].mean() > 80
    centroids = np.stack([train[ds.train_y.numpy() == c].mean(0).ravel() for c in range(10)])
    distances = ((test.reshape(1000, 1, -1) - centroids) ** 2).sum(-1)
    assert (distances.argmin(1) == ds.test_y.numpy()).mean() > 0.75
    # The training set's mean/std are those of full MNIST to two digits (0.1307, 0.3081).
    assert ds.mean[0] == pytest.approx(0.1307, abs=0.005)
    assert ds.std[0] == pytest.approx(0.3081, abs=0.005)


def test_subset_takes_no_data_dir(tmp_path):
    with pytest.raises(StatscopeError, match="data_dir=.*reads no data_dir"):
        load_dataset("mnist-5k-subset", tmp_path)


def test_mnist_without_copy_or_download_warns_and_uses_the_subset():
    with pytest.warns(StatscopeWarning, match=r"download=False; using the bundled "
                                              r"'mnist-5k-subset' \(5,000 real images, not "
                                              r"comparable with full MNIST\)"):
        ds = load_dataset("mnist", download=False)
    assert ds.name == "mnist-5k-subset" and ds.train_x.shape[0] == 4000


def test_normalize_standardises_the_training_set():
    ds = load_dataset("mnist-5k-subset")
    z = ds.normalize(ds.train_x[:4000]).numpy()
    assert z.dtype == np.float32 and z.shape == (4000, 28, 28)
    assert abs(z.mean()) < 1e-5 and z.std() == pytest.approx(1.0, abs=1e-5)


# ---- CIFAR-10 --------------------------------------------------------------------------------

def make_cifar_batches(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {b: {b"batch_label": b.encode(), b"data": rng.integers(0, 256, (n, 3072), np.uint8),
                b"labels": rng.integers(0, 10, n).tolist(),
                b"filenames": [b"x.png"] * n}
            for b in datasets._CIFAR_BATCHES}


def write_cifar(folder, batches, protocol=2, *, numpy1=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, record in batches.items():
        data = pickle.dumps(record, protocol=protocol)
        if numpy1:  # the original batches name numpy.core, numpy 2's deprecated alias
            data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("protocol, numpy1", [(2, False), (2, True), (5, False)])
def test_cifar_batches_folder(tmp_path, protocol, numpy1):
    batches = make_cifar_batches()
    write_cifar(tmp_path / "cifar-10-batches-py", batches, protocol, numpy1=numpy1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ds = load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10" and tuple(ds.train_x.shape) == (30, 3, 32, 32)
    train = np.concatenate([batches[b][b"data"] for b in datasets._CIFAR_BATCHES[:5]])
    np.testing.assert_array_equal(ds.train_x.numpy().reshape(30, -1), train)
    np.testing.assert_array_equal(ds.test_y.numpy(), batches["test_batch"][b"labels"])
    rgb = train.reshape(30, 3, 1024).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, rgb.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, rgb.std(axis=(0, 2)), rtol=1e-12)
    z = ds.normalize(ds.train_x).numpy()
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_cifar_truncated_batch_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, make_cifar_batches())
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:500])
    with pytest.raises(StatscopeError, match=r"data_dir='.*': cifar-10-batches-py/data_batch_3 "
                                             r"is not a CIFAR-10 batch"):
        load_dataset("cifar10", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_batch_with_foreign_globals_is_refused(tmp_path):
    batches = make_cifar_batches()
    batches["test_batch"][b"labels"] = _Exploit()
    write_cifar(tmp_path, batches)
    with pytest.raises(StatscopeError, match=r"test_batch is not a CIFAR-10 batch \(refuses the "
                                             r"global"):
        load_dataset("cifar10", tmp_path)


def test_cifar_without_any_copy_is_a_clear_error(tmp_path):
    with pytest.raises(StatscopeError, match=r"name='cifar10': not found in .*cache/cifar10, and "
                                             r"download=False"):
        load_dataset("cifar10", download=False)


# ---- Debian's Fashion-MNIST, where installed ------------------------------------------------

_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (_DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_found_without_download():
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.source == str(_DEBIAN_FASHION)
    assert tuple(ds.train_x.shape) == (60000, 28, 28) and tuple(ds.test_x.shape) == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(ds.train_y.numpy()), np.full(10, 6000))
    # The published Fashion-MNIST statistics.
    assert ds.mean[0] == pytest.approx(0.2860, abs=5e-5)
    assert ds.std[0] == pytest.approx(0.3530, abs=5e-5)
