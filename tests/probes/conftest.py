"""Fixtures shared by the probes' tests."""

import pytest

from statscope import native
from statscope.probes import fastpath, hooks


@pytest.fixture(params=["cpp", "python"])
def bn_route(request, monkeypatch):
    """Which BatchNorm fast path the recorders of the test get: the C++ probe and training
    forward (:mod:`statscope.native`, built now) or the Python ones (as without a compiler).
    Returns the route's name and the list of the Python probe's calls (the C++ ones' fallbacks).
    """
    calls = []
    install = hooks._install_native
    if request.param == "cpp":
        if native.kernels(wait=True) is None:
            pytest.skip(f"statscope's C++ kernels: {native.status()}")

        def counted(rec, cap, cell, fallback, building, transformed=False):
            def python_probe(*args):
                calls.append(args[0])
                return fallback(*args)

            install(rec, cap, cell, python_probe, building, transformed)
            assert not building[0] and cap.buffer_bn
            assert (cell[1] is None) == (fastpath.native_dims(cap.target.module) is None)

        monkeypatch.setattr(hooks, "_install_native", counted)
    else:
        def python_only(rec, cap, cell, fallback, building, transformed=False):
            building[0] = False

        monkeypatch.setattr(hooks, "_install_native", python_only)
    return request.param, calls
