"""statscope.native: the switches, threads and kill points of building the C++ kernels."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from statscope import native
from statscope.errors import StatscopeError, StatscopeWarning
from statscope.nn import make_norm


@pytest.fixture
def fresh(monkeypatch):
    """A loader that has not tried to build yet, with the build replaced by ``monkeypatch``."""
    monkeypatch.setattr(native, "_state", {})
    return monkeypatch


def test_switched_off_by_the_environment(fresh):
    fresh.setenv("STATSCOPE_NATIVE", "0")
    fresh.setattr(native, "_build", lambda: pytest.fail("built although switched off"))
    assert native.kernels() is None
    assert "STATSCOPE_NATIVE=0" in native.status()


def test_a_bad_switch_names_the_variable_and_value(fresh):
    fresh.setenv("STATSCOPE_NATIVE", "yes")
    with pytest.raises(StatscopeError, match="STATSCOPE_NATIVE='yes': expected 0, 1 or auto"):
        native.kernels()


def test_a_failed_build_warns_once_and_leaves_the_python_routes(fresh):
    def broken():
        raise OSError("no C++ compiler")

    fresh.setenv("STATSCOPE_NATIVE", "auto")
    fresh.setattr(native, "_build", broken)
    with pytest.warns(StatscopeWarning, match="no C\\+\\+ compiler"):
        assert native.kernels() is None
    assert native.kernels() is None  # no second warning: pytest's -W error would raise
    assert "build failed: OSError: no C++ compiler" in native.status()
    layer = make_norm("hn", 8)
    assert "CppNode" not in layer(torch.randn(4, 8)).grad_fn.name()


def test_a_required_build_that_fails_is_an_error(fresh):
    def broken():
        raise OSError("no C++ compiler")

    fresh.setenv("STATSCOPE_NATIVE", "1")
    fresh.setattr(native, "_build", broken)
    with pytest.raises(StatscopeError, match="STATSCOPE_NATIVE=1: .* no C\\+\\+ compiler"):
        native.kernels()


def test_threads_asking_at_once_share_one_build(fresh):
    calls = []
    release = threading.Event()

    def slow_build():
        calls.append(threading.get_ident())
        assert release.wait(timeout=30)
        return "module"

    fresh.setenv("STATSCOPE_NATIVE", "auto")
    fresh.setattr(native, "_build", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(native.kernels())) for _ in range(6)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert got == ["module"] * 6 and len(calls) == 1


BUILD = """
import sys
from statscope import native
module = native.kernels()
print(native.status(), flush=True)
sys.exit(0 if module is not None else 1)
"""


@pytest.mark.slow
def test_a_build_killed_in_flight_blocks_no_later_build(tmp_path):
    """kill -9 during the compile, then two processes build at once: both load, none hangs."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "STATSCOPE_NATIVE": "1"}
    first = subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # torch's lock file appears when the compile starts
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/lock")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    assert list(tmp_path.glob("*/lock")), "the first build never started"
    first.kill()
    first.wait(timeout=30)
    first.stdout.close()
    assert list(tmp_path.glob("*/lock")), "a killed build leaves torch's lock file behind"
    later = [subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for proc in later:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "compiled" in out, out


def test_without_waiting_the_build_runs_in_the_background(fresh):
    release = threading.Event()

    def slow_build():
        assert release.wait(timeout=30)
        return "module"

    fresh.setenv("STATSCOPE_NATIVE", "auto")
    fresh.setattr(native, "_build", slow_build)
    t0 = time.monotonic()
    # a training step never waits for a compiler, neither the first nor the ones after it
    assert native.kernels(wait=False) is None
    for _ in range(3):
        assert native.kernels(wait=False) is None
    assert time.monotonic() - t0 < 5 and native.status() == "not loaded yet"
    release.set()
    native._state["thread"].join(timeout=30)
    assert native.kernels(wait=False) == "module" and native.status() == "compiled"


def test_a_background_build_that_fails_warns_the_first_caller_that_waits(fresh):
    def broken():
        raise OSError("no C++ compiler")

    fresh.setenv("STATSCOPE_NATIVE", "auto")
    fresh.setattr(native, "_build", broken)
    assert native.kernels(wait=False) is None
    native._state["thread"].join(timeout=30)  # quiet on its thread: -W error would kill it
    assert native.kernels(wait=False) is None
    with pytest.warns(StatscopeWarning, match="no C\\+\\+ compiler"):
        assert native.kernels() is None
    assert native.kernels() is None  # once


def test_torch_before_2_4_is_refused(fresh):
    # c10::optional was not std::optional then: weight and bias would get no gradient
    fresh.setattr(torch, "__version__", "2.3.1+cpu")
    with pytest.raises(RuntimeError, match="torch 2.3.1\\+cpu: the kernels need torch >= 2.4"):
        native._build()
