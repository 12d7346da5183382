"""Fixtures shared by the dataset, experiment and ``statscope run`` tests."""

import pytest

from test_experiments_support import offline_env, write_mnist


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No user data, cache or mirror settings leak in; the cache is empty and per test.

    Returns:
        The cache folder.
    """
    for var in ("STATSCOPE_DATA", "STATSCOPE_MNIST_URL", "STATSCOPE_FASHION_MNIST_URL",
                "STATSCOPE_CIFAR10_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STATSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Keep dataset lookups inside ``tmp_path``; downloads fail fast on a closed local port."""
    offline_env(tmp_path, monkeypatch)


@pytest.fixture
def mnist_dir(tmp_path):
    """A tiny MNIST folder of IDX files (64 train, 20 test images)."""
    folder = tmp_path / "mnist"
    write_mnist(folder, n_train=64, n_test=20)
    return str(folder)
