"""Fixtures shared by the statscope.nn tests (no tests here)."""

import pytest
import torch

from statscope import native
from statscope.nn import routes


@pytest.fixture
def one_thread():
    """Run on one torch thread: tests of many tiny ops (gradcheck, thousands of small batches)
    wait milliseconds per OpenMP region for a descheduled thread on a loaded machine, and their
    numbers do not depend on the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def force_route(monkeypatch, route):
    """Make every HN/EN input take ``route`` ("kernel", "composed" or "function") in training.

    Skips the test where the route is the C++ kernel and it did not build.
    """
    if route == "kernel" and native.kernels() is None:
        pytest.skip(f"statscope.nn's C++ kernels are unavailable: {native.status()}")
    big = 10**9
    monkeypatch.setattr(routes, "_KERNEL_LIMIT", big if route == "kernel" else -1)
    monkeypatch.setattr(routes, "_SMALL", big if route == "composed" else 0)
    monkeypatch.setattr(routes, "_SMALL_EN", big if route == "composed" else 0)
