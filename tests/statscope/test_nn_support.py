"""Fixtures shared by the statscope.nn tests (no tests here)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run on one torch thread: tests of many tiny ops (gradcheck, thousands of small batches)
    wait milliseconds per OpenMP region for a descheduled thread on a loaded machine, and their
    numbers do not depend on the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
