"""Fixtures for the analyses tests; the generators live in analyses_synthetic.py."""

import pytest

from analyses_synthetic import make_run


@pytest.fixture
def run():
    """A small two-layer Gaussian run, batch 16, 300 steps."""
    return make_run()
