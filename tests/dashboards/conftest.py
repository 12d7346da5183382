"""Fixtures for the dashboard tests."""

from __future__ import annotations

import pytest

from dashboard_fixtures import synthetic_run, write_synthetic


@pytest.fixture
def two_runs():
    """Batch size 4 and batch size 128, as in the paper's Figures 6 and 7."""
    return {"bs4": synthetic_run(batch_size=4, seed=1), "bs128": synthetic_run(batch_size=128, seed=2)}


@pytest.fixture
def store_root(tmp_path):
    """A folder with two real stores (bs4, bs128) written by the store's writer."""
    root = tmp_path / "runs"
    root.mkdir()
    write_synthetic(root / "bs4", synthetic_run(batch_size=4, seed=1))
    write_synthetic(root / "bs128", synthetic_run(batch_size=128, seed=2))
    return root
